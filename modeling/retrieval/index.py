"""faiss indexes over datastore keys: exact (IndexFlatL2) and approximate (HNSW, IVF), built in chunks from float16
keys on disk, and their comparison against exact search (build time, memory, queries/s, recall@k).

Why faiss: it is installed with the project's retrieval extra, releases the GIL in `search` (so a worker thread
overlaps with the decoder's forward), writes its own non-pickle format (`faiss.write_index`), and covers exact, graph
(HNSW) and inverted-file (IVF) search with one API (`faiss.index_factory`). hnswlib / usearch offer HNSW only.
"""

from __future__ import annotations

import math
import time

import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivf")
ADD_CHUNK = 65_536  # keys converted to float32 and added at a time (the memory bound while building)


def index_factory_string(kind: str, num_keys: int, hnsw_m: int = 32) -> str:
    """A faiss factory string for `kind` ("flat", "hnsw", "ivf"), or `kind` itself when it is one already
    (e.g. "IVF1024,SQfp16"). IVF uses about 4 * sqrt(N) lists (at least 39 training keys per list)."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m}"
    if kind == "ivf":
        return f"IVF{max(1, min(int(4 * math.sqrt(max(num_keys, 1))), num_keys // 39))},Flat"
    if kind and kind[0].isupper():  # a factory string given directly
        return kind
    raise ValueError(f"index must be one of {INDEX_KINDS} or a faiss factory string like 'IVF256,Flat', got {kind!r}.")


def set_search_parameters(index, ef_search: int = 128, nprobe: int = 16) -> None:
    """Search-time accuracy knobs: HNSW's efSearch and IVF's nprobe (no effect on exact indexes)."""
    import faiss

    base = faiss.downcast_index(index)
    if hasattr(base, "hnsw"):
        base.hnsw.efSearch = ef_search
    if hasattr(base, "nprobe"):
        base.nprobe = min(nprobe, base.nlist)


def build_index(keys: np.ndarray, kind: str = "hnsw", *, hnsw_m: int = 32, ef_construction: int = 80,
                ef_search: int = 128, nprobe: int = 16, train_size: int = 100_000, seed: int = 0):
    """A faiss L2 index over `keys` `(N, d)` (float16 memmap or any float array), added `ADD_CHUNK` rows at a time
    so that only the index itself, not a float32 copy of every key, is held in memory. IVF is trained on a random
    sample of at most `train_size` keys."""
    import faiss

    keys = np.asarray(keys) if not isinstance(keys, np.ndarray) else keys
    if keys.ndim != 2 or keys.shape[0] == 0:
        raise ValueError(f"keys must be a non-empty (N, d) array, got shape {keys.shape}.")
    num_keys, dim = keys.shape
    index = faiss.index_factory(dim, index_factory_string(kind, num_keys, hnsw_m), faiss.METRIC_L2)
    base = faiss.downcast_index(index)
    if hasattr(base, "hnsw"):
        base.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(num_keys, size=min(train_size, num_keys), replace=False))
        index.train(np.ascontiguousarray(keys[rows], dtype=np.float32))
    for start in range(0, num_keys, ADD_CHUNK):
        index.add(np.ascontiguousarray(keys[start : start + ADD_CHUNK], dtype=np.float32))
    set_search_parameters(index, ef_search, nprobe)
    return index


def index_nbytes(index) -> int:
    """Bytes of the index as faiss serializes it (vectors, graph links, lists): its memory, give or take buffers."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def recall_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact k neighbours that the approximate search found, `(Q, k)` ids each."""
    if approximate_ids.shape != exact_ids.shape:
        raise ValueError(f"id arrays differ in shape: {approximate_ids.shape} vs {exact_ids.shape}.")
    hits = [len(set(a.tolist()) & set(e.tolist()) - {-1}) for a, e in zip(approximate_ids, exact_ids)]
    return float(np.mean(hits) / exact_ids.shape[1]) if len(hits) else float("nan")


def compare_indexes(keys: np.ndarray, queries: np.ndarray, kinds=("flat", "hnsw", "ivf"), k: int = 8,
                    **build_options) -> list[dict]:
    """Build each index kind over the same `keys`, search the same `queries` `(Q, d)`, and report per kind: build
    seconds, bytes, queries per second (one batch of all queries, then one query at a time as a decoder asks) and
    recall@k against exact search (IndexFlatL2). A timing measurement: run it on a quiet machine."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exact_ids = None
    rows = []
    for kind in ("flat", *[k_ for k_ in kinds if k_ != "flat"]):
        started = time.perf_counter()
        index = build_index(keys, kind, **build_options)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        _, ids = index.search(queries, k)
        batch_seconds = time.perf_counter() - started
        single = queries[: min(len(queries), 256)]
        started = time.perf_counter()
        for row in single:
            index.search(row[None], k)
        single_seconds = time.perf_counter() - started
        if kind == "flat":
            exact_ids = ids
        rows.append({
            "index": kind, "factory": index_factory_string(kind, len(keys), build_options.get("hnsw_m", 32)),
            "num_keys": int(len(keys)), "dim": int(keys.shape[1]), "num_queries": int(len(queries)), "k": k,
            "build_seconds": build_seconds, "bytes": index_nbytes(index),
            "queries_per_second_batched": len(queries) / max(batch_seconds, 1e-9),
            "queries_per_second_single": len(single) / max(single_seconds, 1e-9),
            f"recall_at_{k}": recall_at_k(ids, exact_ids),
        })
    return [r for r in rows if r["index"] in kinds]
