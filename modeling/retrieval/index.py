"""faiss indexes over datastore keys: exact (IndexFlatL2) and approximate (HNSW, IVF), built in chunks from float16
keys on disk, and their comparison against exact search (build time, memory, queries/s, recall@k).

Why faiss: it is installed with the project's retrieval extra, releases the GIL in `search` (so a worker thread
overlaps with the decoder's forward), writes its own non-pickle format (`faiss.write_index`), and covers exact, graph
(HNSW) and inverted-file (IVF) search with one API (`faiss.index_factory`). hnswlib / usearch offer HNSW only; they
are measured beside faiss on the same keys and queries ("hnswlib" and "usearch" kinds of `compare_indexes`, same M,
efConstruction and efSearch) but never used by a datastore.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivf")
LIBRARY_KINDS = ("hnswlib", "usearch")  # HNSW from other libraries: in the comparison only
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


@contextlib.contextmanager
def faiss_threads(count: int):
    """faiss's OpenMP threads for the searches this thread makes inside the block, restored after (OpenMP keeps the
    setting per calling thread, so a retrieval worker's setting leaves the main thread's alone). Decoding searches
    one query per sequence: there is no work to split, and faiss's idle threads spin-wait on the cores that torch's
    own OpenMP threads use (faiss ships its own libgomp), which slowed plain decoding beside them up to 3x here."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def index_nbytes(index) -> int:
    """Bytes of the index as its library serializes it (vectors, graph links, lists): its memory, give or take
    buffers."""
    if isinstance(index, (HnswlibIndex, UsearchIndex)):
        return index.nbytes()
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def _import_library(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ValueError(f"index kind {name!r} needs the {name} package: pip install {name} (it is in the dev extra), "
                         "or leave it out of the compared kinds.") from None


class HnswlibIndex:
    """hnswlib's HNSW over `keys` behind faiss's `search(queries, k) -> (distances, ids)`, for the comparison."""

    def __init__(self, keys: np.ndarray, hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128,
                 threads: int = 1, seed: int = 0) -> None:
        hnswlib = _import_library("hnswlib")
        self.index = hnswlib.Index(space="l2", dim=int(keys.shape[1]))
        self.index.init_index(max_elements=int(keys.shape[0]), ef_construction=ef_construction, M=hnsw_m,
                              random_seed=seed)
        for start in range(0, keys.shape[0], ADD_CHUNK):
            chunk = np.ascontiguousarray(keys[start : start + ADD_CHUNK], dtype=np.float32)
            self.index.add_items(chunk, np.arange(start, start + len(chunk)), num_threads=threads)
        self.index.set_ef(ef_search)
        self.threads = threads

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, distances = self.index.knn_query(np.atleast_2d(queries), k=k, num_threads=self.threads)
        return distances, ids.astype(np.int64)

    def nbytes(self) -> int:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/index.bin"
            self.index.save_index(path)
            return os.path.getsize(path)


class UsearchIndex:
    """usearch's HNSW (float32 vectors, squared L2) behind faiss's `search` signature, for the comparison."""

    def __init__(self, keys: np.ndarray, hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128,
                 threads: int = 1) -> None:
        _import_library("usearch")
        from usearch.index import Index

        self.index = Index(ndim=int(keys.shape[1]), metric="l2sq", dtype="f32", connectivity=hnsw_m,
                           expansion_add=ef_construction, expansion_search=ef_search)
        for start in range(0, keys.shape[0], ADD_CHUNK):
            chunk = np.ascontiguousarray(keys[start : start + ADD_CHUNK], dtype=np.float32)
            self.index.add(np.arange(start, start + len(chunk)), chunk, threads=threads)
        self.threads = threads

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(queries)
        matches = self.index.search(queries, k, threads=self.threads)
        if queries.shape[0] == 1:  # one query gives `Matches` (1-D, only what was found), not `BatchMatches`
            ids, distances = np.full((1, k), -1, dtype=np.int64), np.full((1, k), np.inf, dtype=np.float32)
            ids[0, : len(matches.keys)], distances[0, : len(matches.keys)] = matches.keys, matches.distances
            return distances, ids
        found = np.arange(k)[None, :] < matches.counts[:, None]  # (Q, k); entries past `counts` are padding
        return (np.where(found, matches.distances, np.inf).astype(np.float32),
                np.where(found, matches.keys.astype(np.int64), -1))

    def nbytes(self) -> int:
        return len(self.index.save())


def build_comparison_index(keys: np.ndarray, kind: str, threads: int, **build_options):
    """A faiss index (`build_index`) or, for a `LIBRARY_KINDS` name, that library's HNSW with the same M,
    efConstruction and efSearch."""
    if kind in LIBRARY_KINDS:
        options = {name: build_options[name] for name in ("hnsw_m", "ef_construction", "ef_search")
                   if name in build_options}
        return (HnswlibIndex if kind == "hnswlib" else UsearchIndex)(keys, threads=threads, **options)
    return build_index(keys, kind, **build_options)


def recall_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact k neighbours that the approximate search found, `(Q, k)` ids each."""
    if approximate_ids.shape != exact_ids.shape:
        raise ValueError(f"id arrays differ in shape: {approximate_ids.shape} vs {exact_ids.shape}.")
    hits = [len(set(a.tolist()) & set(e.tolist()) - {-1}) for a, e in zip(approximate_ids, exact_ids)]
    return float(np.mean(hits) / exact_ids.shape[1]) if len(hits) else float("nan")


def _measure_index(keys: np.ndarray, queries: np.ndarray, kind: str, k: int, threads: int,
                   build_options: dict) -> tuple[dict, np.ndarray]:
    """One row of `compare_indexes` (without recall) and the ids the batched search found `(Q, k)`."""
    started = time.perf_counter()
    index = build_comparison_index(keys, kind, threads, **build_options)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _, ids = index.search(queries, k)
    batch_seconds = time.perf_counter() - started
    single = queries[: min(len(queries), 256)]
    started = time.perf_counter()
    for row in single:
        index.search(row[None], k)
    single_seconds = time.perf_counter() - started
    hnsw_m = build_options.get("hnsw_m", 32)
    return {
        "index": kind, "threads": threads,
        "factory": f"{kind} HNSW M={hnsw_m}" if kind in LIBRARY_KINDS else index_factory_string(kind, len(keys), hnsw_m),
        "num_keys": int(len(keys)), "dim": int(keys.shape[1]), "num_queries": int(len(queries)), "k": k,
        "build_seconds": build_seconds, "bytes": index_nbytes(index),
        "queries_per_second_batched": len(queries) / max(batch_seconds, 1e-9),
        "queries_per_second_single": len(single) / max(single_seconds, 1e-9),
    }, ids


def compare_indexes(keys: np.ndarray, queries: np.ndarray, kinds=("flat", "hnsw", "ivf"), k: int = 8,
                    threads: int | None = None, **build_options) -> list[dict]:
    """Build each index kind over the same `keys`, search the same `queries` `(Q, d)`, and report per kind: build
    seconds, bytes, queries per second (one batch of all queries, then one query at a time as a decoder asks) and
    recall@k against exact search (IndexFlatL2). Kinds: faiss's ("flat", "hnsw", "ivf", a factory string) and
    `LIBRARY_KINDS`; every library builds and searches with `threads` threads (default: faiss's OpenMP count).
    A timing measurement: run it on a quiet machine."""
    import faiss

    threads = threads or faiss.omp_get_max_threads()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows, exact_ids = [], None
    with faiss_threads(threads):
        for kind in ("flat", *[k_ for k_ in kinds if k_ != "flat"]):
            row, ids = _measure_index(keys, queries, kind, k, threads, build_options)
            exact_ids = ids if kind == "flat" else exact_ids
            rows.append({**row, f"recall_at_{k}": recall_at_k(ids, exact_ids)})
    return [r for r in rows if r["index"] in kinds]
