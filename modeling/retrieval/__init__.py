"""Knowledge retrieval beside the decoder (issue 18): a kNN-LM datastore over any causal LM's hidden states, the kNN-LM
mixture as a module and a `generate()` logits processor, retrieved passages prepended to the prompt (In-Context
RALM), each with its retrieval overlapped with the decoder's forward on a worker thread.

    from lightarch.retrieval import DatastoreConfig, KnnLM, KnnLMConfig, build_datastore
    datastore = build_datastore(model, token_ids, "datastore", DatastoreConfig(index="hnsw"))
    datastore.save_pretrained("datastore")                      # numpy + faiss formats, no pickle, sha256 manifest
    knn = KnnLM(model, Datastore.from_pretrained("datastore"), KnnLMConfig(k=8, lambda_=0.25))
    knn.generate(input_ids, max_new_tokens=32)                  # or perplexity(knn, blocks)
    CrossModalIndex.build(model, processor, images, "image").search(["a sneaker"], "text", k=5)  # multimodal
"""

from .context import (
    BM25Retriever,
    DenseRetriever,
    RalmConfig,
    RalmOutput,
    generate_with_context,
)
from .crossmodal import (
    CrossModalIndex,
    CrossModalIndexConfig,
    CrossModalIndexIntegrityError,
    model_fingerprint,
)
from .datastore import (
    Datastore,
    DatastoreConfig,
    DatastoreIntegrityError,
    build_datastore,
    window_plan,
)
from .hooks import KEY_SITES, capture_keys, decoder_layers, key_module
from .index import (
    INDEX_KINDS,
    LIBRARY_KINDS,
    build_comparison_index,
    build_index,
    compare_indexes,
    index_nbytes,
    recall_at_k,
)
from .knn_lm import (
    KnnLM,
    KnnLMConfig,
    KnnLogitsProcessor,
    interpolate,
    interpolation_weight,
    mix,
)
from .manifest import FolderIntegrityError
from .overlap import Prefetcher
from .search_process import (KnnDistribution, SearchProcess, knn_distribution, mixing_terms, neighbour_tokens,
                             row_lambdas)

__all__ = [
    "BM25Retriever", "build_comparison_index", "build_datastore", "build_index", "capture_keys", "compare_indexes",
    "CrossModalIndex", "CrossModalIndexConfig", "CrossModalIndexIntegrityError", "Datastore", "DatastoreConfig",
    "DatastoreIntegrityError", "decoder_layers", "DenseRetriever", "FolderIntegrityError", "generate_with_context",
    "INDEX_KINDS", "index_nbytes", "interpolate", "interpolation_weight", "key_module", "KEY_SITES", "knn_distribution",
    "KnnDistribution", "KnnLM", "KnnLMConfig", "KnnLogitsProcessor", "LIBRARY_KINDS", "mix", "mixing_terms",
    "model_fingerprint", "neighbour_tokens", "Prefetcher", "RalmConfig", "RalmOutput", "recall_at_k", "row_lambdas",
    "SearchProcess", "window_plan"
]
