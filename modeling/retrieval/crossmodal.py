"""Cross-modal retrieval over the multimodal model's aligned embeddings (issue 18): a collection of images, audio clips
or texts is embedded with the model's aligned embedding for its modality (`get_{image,audio,text}_features`, through
`lightarch.evaluation.multimodal.embed_items`), L2-normalised and indexed with faiss; a query of any modality is
embedded into the same space and searched by cosine similarity.

On unit vectors the squared L2 distance is 2 - 2 cos, so the L2 indexes of `lightarch.retrieval.index.build_index`
("flat" exact, "hnsw", "ivf") rank exactly as inner product does; `search` returns cosine scores (1 - d / 2).

A saved index is one folder, in formats that never unpickle:

    crossmodal_config.json  modality, index kind and knobs, sizes, the embedding model's name and fingerprint
    embeddings.npy          (N, D) float32 unit-length embeddings (allow_pickle=False)
    index.faiss             faiss's own format
    items.json              one JSON object per item (its label, class name, source, ...)
    manifest.json           sha256 of each file above (`lightarch.retrieval.manifest`)

    index = CrossModalIndex.build(model, processor, images, "image", metadata=[{"label": 3}, ...])
    ids, scores = index.search(["a picture of a sneaker"], "text", k=5)     # (1, 5) item ids, cosine scores
    index.save_pretrained("image_index")
    index = CrossModalIndex.from_pretrained("image_index", model=model, processor=processor)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..evaluation.multimodal import EMBEDDED_MODALITIES, embed_items
from .index import build_index, set_search_parameters
from .manifest import FolderIntegrityError, verify_manifest, write_manifest

CONFIG_NAME = "crossmodal_config.json"
EMBEDDINGS_NAME = "embeddings.npy"
INDEX_NAME = "index.faiss"
ITEMS_NAME = "items.json"
FORMAT = "lightarch-crossmodal-index"
DATA_FILES = (CONFIG_NAME, EMBEDDINGS_NAME, INDEX_NAME, ITEMS_NAME)


class CrossModalIndexIntegrityError(FolderIntegrityError):
    """A cross-modal index file does not match its manifest (or is missing): the folder is refused."""


@dataclass
class CrossModalIndexConfig:
    """What an index holds and how it is searched."""

    modality: str = "image"  # the indexed items' modality: "image", "audio" or "text"
    index: str = "flat"  # "flat" (exact), "hnsw", "ivf" or a faiss factory string (`build_index`)
    ef_search: int = 128  # HNSW search breadth
    nprobe: int = 16  # IVF lists searched
    hnsw_m: int = 32  # HNSW links per node
    num_items: int = 0
    embed_dim: int = 0
    model_name_or_path: str = ""
    model_fingerprint: str = ""  # sha256 of the embedding model's weights (`model_fingerprint`)


def check_modality(modality: str, argument: str = "modality") -> str:
    """`modality` itself, or a ValueError naming `argument` and the choices."""
    if modality not in EMBEDDED_MODALITIES:
        raise ValueError(f"{argument} must be one of {EMBEDDED_MODALITIES}, got {modality!r}.")
    return modality


def l2_normalize(embeddings) -> np.ndarray:
    """(N, D) float32 rows of unit length (zero rows stay zero)."""
    array = np.asarray(embeddings, dtype=np.float32)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


def model_fingerprint(model) -> str:
    """sha256 over the model's parameter names and bytes: an index remembers which weights embedded it, so that
    searching it with other weights (whose space differs) is refused instead of returning noise."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_metadata(metadata: Sequence[dict] | None, count: int) -> list[dict]:
    if metadata is None:
        return [{} for _ in range(count)]
    metadata = [dict(item) for item in metadata]
    if len(metadata) != count:
        raise ValueError(f"metadata must have one dict per item: {len(metadata)} dicts for {count} items.")
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable (it is saved as {ITEMS_NAME}): {error}.") from None
    return metadata


class CrossModalIndex:
    """Unit-length aligned embeddings `(N, D)` of one modality's items in a faiss index, the items' metadata, and
    (when given) the model and processor that embed queries of any modality."""

    def __init__(self, embeddings: np.ndarray, index, config: CrossModalIndexConfig, items: Sequence[dict],
                 model=None, processor=None) -> None:
        check_modality(config.modality, "config.modality")
        if embeddings.ndim != 2 or len(items) != embeddings.shape[0]:
            raise ValueError(f"embeddings must be (N, D) with one metadata dict per row, got {embeddings.shape} "
                             f"and {len(items)} items.")
        if index.ntotal != embeddings.shape[0] or index.d != embeddings.shape[1]:
            raise ValueError(f"index holds {index.ntotal} vectors of dim {index.d}, embeddings are "
                             f"{embeddings.shape}.")
        self.embeddings, self.index, self.config, self.items = embeddings, index, config, list(items)
        self.model, self.processor = model, processor

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def modality(self) -> str:
        return self.config.modality

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 the items' "label" (-1 where an item has none): what class-level recall compares."""
        return np.array([int(item.get("label", -1)) for item in self.items], dtype=np.int64)

    @classmethod
    def from_embeddings(cls, embeddings, modality: str, metadata: Sequence[dict] | None = None, index: str = "flat",
                        *, model=None, processor=None, ef_search: int = 128, nprobe: int = 16, hnsw_m: int = 32
                        ) -> CrossModalIndex:
        """An index over precomputed aligned embeddings `(N, D)` of `modality` items (normalised here)."""
        check_modality(modality)
        embeddings = l2_normalize(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"items must be a non-empty collection; got embeddings of shape {embeddings.shape}.")
        items = _check_metadata(metadata, len(embeddings))
        config = CrossModalIndexConfig(modality=modality, index=index, ef_search=ef_search, nprobe=nprobe,
                                       hnsw_m=hnsw_m, num_items=int(embeddings.shape[0]),
                                       embed_dim=int(embeddings.shape[1]))
        if model is not None:
            config.model_name_or_path = str(getattr(model, "name_or_path", "") or "")
            config.model_fingerprint = model_fingerprint(model)
        faiss_index = build_index(embeddings, index, hnsw_m=hnsw_m, ef_search=ef_search, nprobe=nprobe)
        return cls(embeddings, faiss_index, config, items, model, processor)

    @classmethod
    def build(cls, model, processor, items: Sequence, modality: str, metadata: Sequence[dict] | None = None,
              index: str = "flat", *, sampling_rate: int | None = None, batch_size: int = 128,
              show_progress: bool = False, **index_options) -> CrossModalIndex:
        """Embed `items` (images, audio clips at `sampling_rate`, or texts) with `model`'s aligned embedding for
        `modality` and index them (`index`: "flat" exact by default, "hnsw", "ivf"); `metadata`: one JSON-able dict
        per item (a "label" key enables class-level recall)."""
        check_modality(modality)
        if items is None or len(items) == 0:
            raise ValueError("items must be a non-empty collection of images, audio clips or texts; got none.")
        embeddings = embed_items(model, processor, items, modality, sampling_rate, batch_size, show_progress)
        return cls.from_embeddings(embeddings, modality, metadata, index, model=model, processor=processor,
                                   **index_options)

    def embed(self, query_items: Sequence, modality: str, sampling_rate: int | None = None,
              batch_size: int = 128) -> np.ndarray:
        """(Q, D) unit-length aligned embeddings of `query_items` of `modality`, with the attached model."""
        check_modality(modality)
        if self.model is None or self.processor is None:
            raise ValueError("this index has no model to embed queries: pass model= and processor= to "
                             "CrossModalIndex.from_pretrained (or use search_embeddings).")
        if query_items is None or len(query_items) == 0:
            raise ValueError("query_items must be a non-empty collection; got none.")
        return l2_normalize(embed_items(self.model, self.processor, query_items, modality, sampling_rate,
                                        batch_size))

    def search(self, query_items: Sequence, modality: str, k: int = 10, sampling_rate: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Item ids `(Q, k)` int64 and cosine scores `(Q, k)` float32 (best first) of the k items most similar to
        each query of `modality` ("image", "audio" or "text"; any modality searches any index)."""
        return self.search_embeddings(self.embed(query_items, modality, sampling_rate), k)

    def search_embeddings(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """`search` for precomputed query embeddings `(Q, D)` (normalised here). An approximate index may find fewer
        than k items: those slots hold id -1 and score -inf."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the number of indexed items), got {k}.")
        queries = np.ascontiguousarray(l2_normalize(queries))
        if queries.ndim != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries must be (Q, {self.embeddings.shape[1]}) embeddings, got {queries.shape}.")
        distances, ids = self.index.search(queries, k)  # squared L2 on unit vectors: 2 - 2 cos
        scores = np.where(ids < 0, -np.inf, 1.0 - distances / 2.0).astype(np.float32)
        return ids.astype(np.int64), scores

    def reindex(self, kind: str, **options) -> None:
        """Replace the faiss index by one of `kind` over the same embeddings (e.g. "flat" for exact search)."""
        for name in ("ef_search", "nprobe", "hnsw_m"):
            setattr(self.config, name, options.pop(name, getattr(self.config, name)))
        if options:
            raise TypeError(f"unknown reindex options {sorted(options)}; use ef_search, nprobe, hnsw_m.")
        self.index = build_index(self.embeddings, kind, hnsw_m=self.config.hnsw_m, ef_search=self.config.ef_search,
                                 nprobe=self.config.nprobe)
        self.config.index = kind

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the index as one folder (the module docstring's files), the manifest last."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / EMBEDDINGS_NAME, np.ascontiguousarray(self.embeddings, dtype=np.float32), allow_pickle=False)
        faiss.write_index(self.index, str(folder / INDEX_NAME))
        (folder / ITEMS_NAME).write_text(json.dumps(self.items, indent=1) + "\n", encoding="utf-8")
        self.config.num_items, self.config.embed_dim = len(self), int(self.embeddings.shape[1])
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8")
        write_manifest(folder, DATA_FILES, FORMAT)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, model=None, processor=None, verify: bool = True
                        ) -> CrossModalIndex:
        """Load a folder written by `save_pretrained`; every file is checked against manifest.json first
        (`CrossModalIndexIntegrityError` naming the file), nothing is unpickled. `model` / `processor` embed
        queries; a model whose weights differ from the ones that embedded the items is refused."""
        import faiss

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"index folder {folder}: no such folder (write one with CrossModalIndex.save_pretrained "
                             "or scripts/search_multimodal.py).")
        verify_manifest(folder, DATA_FILES, FORMAT, what="the cross-modal index",
                        writer="CrossModalIndex.save_pretrained", error=CrossModalIndexIntegrityError, verify=verify)
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        known = CrossModalIndexConfig.__dataclass_fields__
        config = CrossModalIndexConfig(**{k: v for k, v in raw.items() if k in known})
        if model is not None and config.model_fingerprint and model_fingerprint(model) != config.model_fingerprint:
            raise ValueError(f"model: its weights are not the ones that embedded {folder} (fingerprint mismatch; "
                             f"the index was built with {config.model_name_or_path or 'another model'}). Pass that "
                             "model, or rebuild the index with this one.")
        embeddings = np.load(folder / EMBEDDINGS_NAME, allow_pickle=False)
        items = json.loads((folder / ITEMS_NAME).read_text(encoding="utf-8"))
        index = faiss.read_index(str(folder / INDEX_NAME))
        set_search_parameters(index, config.ef_search, config.nprobe)
        return cls(embeddings, index, config, items, model, processor)
