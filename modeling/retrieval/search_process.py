"""The kNN-LM's decoding-time search in a worker process, so that it runs beside the decoder for real, and the numpy
steps both the worker and the in-process (sequential) path share: neighbours' tokens and the sparse p_kNN.

Why a process and not a thread (measured on the 2-core machine, `outputs/sparse_moe`, 128 greedy tokens, 1 torch
thread, interleaved rounds): a worker thread shares the GIL with the decoder, whose forward takes it back between
every torch op, so the thread's Python glue and numpy work stall the forward; overlapped on a thread was no faster
than the search done in line (+38% against +32% per token), in a process +14%.

This file imports numpy only at the top (faiss inside the functions that need it), and the worker runs it as a
script, not as part of the package: it starts without torch in about a second. The index reaches the worker
serialized by faiss (its own format, never a pickle), the values as raw int64, then one frame per decoding step.

Protocol (native byte order, over the worker's stdin / stdout pipes):
    setup   -> 8-byte length + JSON header {index_nbytes, values_count}, the index bytes, the values (int64)
            <- int64 [0, faiss threads]: ready
    step    -> int64 [rows, dim, k] + float64 temperature + float32 queries (rows, dim)
            <- int64 [rows, n] + int64 rows (n) + int64 tokens (n) + float32 log p (n) + float32 nearest (rows)
    error   <- int64 [-1, nbytes] + the utf-8 message; the worker then exits
    end     the main process closes the worker's stdin; the worker exits
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import weakref
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np


@dataclass
class KnnDistribution:
    """p_kNN of N rows as its non-zero entries (at most k per row) and each row's nearest distance: what a search
    leaves for the mixing. Sparse because a row has at most k tokens out of V, so building it costs a few numpy calls
    on k values whatever the vocabulary."""

    rows: np.ndarray  # (n,) int64: the row of each entry
    tokens: np.ndarray  # (n,) int64: its token (unique within a row)
    log_probs: np.ndarray  # (n,) float32: log p_kNN(token)
    nearest: np.ndarray  # (N,) float32: the nearest squared distance of each row (inf = no neighbour)


def neighbour_tokens(distances: np.ndarray, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A faiss result `(Q, k)` as squared distances float32 (inf where fewer than k were found) and next-token ids
    int64 (0 there)."""
    missing = ids < 0
    tokens = np.asarray(values)[np.where(missing, 0, ids)].astype(np.int64)
    return np.where(missing, np.inf, distances).astype(np.float32), np.where(missing, 0, tokens)


def knn_distribution(distances: np.ndarray, tokens: np.ndarray, temperature: float) -> KnnDistribution:
    """p_kNN from neighbours' squared distances `(N, k)` (inf = no neighbour) and next tokens `(N, k)`: each
    neighbour's softmax(-d / temperature) weight summed onto its token."""
    distances = np.asarray(distances, dtype=np.float32)
    tokens = np.asarray(tokens, dtype=np.int64)
    scaled = -distances / np.float32(temperature)  # (N, k)
    top = scaled.max(axis=1, keepdims=True) if scaled.size else np.zeros((scaled.shape[0], 1), np.float32)
    found = np.isfinite(top)  # (N, 1): rows with at least one neighbour
    weights = np.exp(scaled - np.where(found, top, 0.0))  # (N, k); 0 for missing neighbours
    weights /= np.where(found, weights.sum(axis=1, keepdims=True), 1.0)
    rows = np.broadcast_to(np.arange(tokens.shape[0])[:, None], tokens.shape)
    keep = weights > 0
    stride = int(tokens.max()) + 1 if tokens.size else 1
    pairs, where = np.unique(rows[keep] * stride + tokens[keep], return_inverse=True)  # a row's repeated tokens
    summed = np.bincount(where.reshape(-1), weights=weights[keep], minlength=len(pairs))
    nearest = distances.min(axis=1) if distances.size else np.full(distances.shape[0], np.inf, np.float32)
    return KnnDistribution(rows=pairs // stride, tokens=pairs % stride, log_probs=np.log(summed).astype(np.float32),
                           nearest=nearest.astype(np.float32))


def _read_exact(stream: BinaryIO, nbytes: int) -> bytearray:
    """`nbytes` from a pipe (writable, as faiss's deserializer wants); EOFError if it closes first."""
    buffer = bytearray(nbytes)
    view, got = memoryview(buffer), 0
    while got < nbytes:
        count = stream.readinto(view[got:])
        if not count:
            raise EOFError(f"the pipe closed after {got} of {nbytes} bytes")
        got += count
    return buffer


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The worker's loop: set up from the first frame, then answer steps until the main process closes the pipe."""
    import faiss

    faiss.omp_set_num_threads(1)  # one query per sequence: nothing to split, and idle threads would spin
    try:
        (length,) = struct.unpack("=q", _read_exact(requests, 8))
        setup = json.loads(bytes(_read_exact(requests, length)))
        index = faiss.deserialize_index(np.frombuffer(_read_exact(requests, setup["index_nbytes"]), np.uint8))
        values = np.frombuffer(_read_exact(requests, 8 * setup["values_count"]), np.int64)
        replies.write(struct.pack("=qq", 0, faiss.omp_get_max_threads()))
        replies.flush()
        while True:
            head = requests.read(32)
            if not head:
                return
            rows, dim, k, temperature = struct.unpack("=qqqd", head)
            queries = np.frombuffer(_read_exact(requests, 4 * rows * dim), np.float32).reshape(rows, dim)
            knn = knn_distribution(*neighbour_tokens(*index.search(queries, k), values), temperature)
            replies.write(struct.pack("=qq", rows, len(knn.tokens)) + knn.rows.astype(np.int64).tobytes()
                          + knn.tokens.astype(np.int64).tobytes() + knn.log_probs.tobytes() + knn.nearest.tobytes())
            replies.flush()
    except Exception as error:  # noqa: BLE001 - reported to the main process, which raises it
        message = f"{type(error).__name__}: {error}".encode()
        replies.write(struct.pack("=qq", -1, len(message)) + message)
        replies.flush()


def _stop(process: subprocess.Popen) -> None:
    """Close the worker's input (it exits) and reap it; kill it if it does not exit."""
    try:
        process.stdin.close()
    except OSError:
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stdout.close()


class SearchProcess:
    """A faiss index searched in a worker process: `start(queries)` sends a step's queries `(B, d)` and returns at
    once; `result()` waits for their `KnnDistribution` (the same numbers as `knn_distribution(*neighbour_tokens(
    *index.search(queries, k), values), temperature)` in this process). One step is pending at a time. The worker
    holds its own copy of the index (memory: the index twice). `close()` stops it; so does garbage collection."""

    def __init__(self, index, values: np.ndarray) -> None:
        import faiss

        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, *_NO_SCRIPT_DIR, os.path.abspath(__file__)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._finalizer = weakref.finalize(self, _stop, self.process)
        self.dim, self.steps, self._pending = int(index.d), 0, False
        payload = faiss.serialize_index(index)  # (nbytes,) uint8
        values = np.ascontiguousarray(values, dtype=np.int64)
        header = json.dumps({"index_nbytes": int(payload.nbytes), "values_count": int(values.size)}).encode()
        try:
            self.process.stdin.write(struct.pack("=q", len(header)) + header)
            self.process.stdin.write(memoryview(payload))
            self.process.stdin.write(memoryview(values).cast("B"))
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: _read_header says why
        status, self.worker_threads = self._read_header()
        if status != 0:
            raise RuntimeError(f"the retrieval worker answered {status} to its setup")

    def start(self, queries: np.ndarray, k: int, temperature: float) -> None:
        """Send one step's queries `(B, d)`; collects (and drops) a previous step that was never collected."""
        if self._pending:
            self.result()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {queries.shape}.")
        try:
            self.process.stdin.write(struct.pack("=qqqd", queries.shape[0], self.dim, k, temperature)
                                     + queries.tobytes())
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # the worker died, or close() was called
            pass  # result() raises with the reason
        self._pending = True

    def result(self) -> KnnDistribution:
        """The pending step's p_kNN (waits for the worker); RuntimeError if nothing is pending or the worker failed."""
        if not self._pending:
            raise RuntimeError("SearchProcess.result() called before start(): no search is pending.")
        self._pending = False
        rows, count = self._read_header()
        body = np.frombuffer(self._read(20 * count + 4 * rows), np.uint8)
        self.steps += 1
        return KnnDistribution(rows=body[: 8 * count].view(np.int64), tokens=body[8 * count : 16 * count].view(np.int64),
                               log_probs=body[16 * count : 20 * count].view(np.float32),
                               nearest=body[20 * count :].view(np.float32))

    def _read_header(self) -> tuple[int, int]:
        first, second = struct.unpack("=qq", self._read(16))
        if first == -1:
            raise RuntimeError(f"the retrieval worker failed: {bytes(self._read(second)).decode(errors='replace')}")
        return first, second

    def _read(self, nbytes: int) -> bytearray:
        try:
            return _read_exact(self.process.stdout, nbytes)
        except (EOFError, ValueError, OSError):
            code = self.process.poll()
            raise RuntimeError(f"the retrieval worker process exited (code {code}); its error, if any, is on stderr. "
                               "Use overlap=False to search in this process.") from None

    def close(self) -> None:
        self._pending = False
        self._finalizer()


# `python -P` (3.11+) keeps this file's folder off the worker's sys.path, where its neighbours (index.py, ...) would
# shadow nothing today but might tomorrow; on 3.10 the worker drops it itself below.
_NO_SCRIPT_DIR = ("-P",) if sys.version_info >= (3, 11) else ()

if __name__ == "__main__":
    if sys.version_info < (3, 11):
        sys.path.pop(0)
    output = os.fdopen(os.dup(1), "wb")  # replies go to the real stdout; anything printed goes to stderr instead
    os.dup2(2, 1)
    serve(sys.stdin.buffer, output)
