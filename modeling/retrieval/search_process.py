"""The kNN-LM's decoding-time search in a worker process, so that it runs beside the decoder for real, and the numpy
steps both the worker and the in-process (sequential) path share: neighbours' tokens, the sparse p_kNN, lambda and
the mixing terms.

Why a process and not a thread (measured on the 2-core machine, `outputs/sparse_moe`, 128 greedy tokens, 1 torch
thread, interleaved rounds): a worker thread shares the GIL with the decoder, whose forward takes it back between
every torch op, so the thread's Python glue and numpy work stall the forward; overlapped on a thread was no faster
than the search done in line (+38% against +32% per token); in a process it costs +4.9% to +6.5% against +11% to
+12% sequential on an 11 ms step, and cost +12% to +28% against +24% to +35% on a faster machine's 3-4 ms step before
the decoder's share of the work was cut (README, Retrieval).

This file imports numpy only at the top (faiss inside the functions that need it), and the worker runs it as a
script, not as part of the package: it starts without torch in about a second. The index reaches the worker
serialized by faiss (its own format, never a pickle) and the values as raw int64, over its stdin. Each decoding step
then costs the decoder one numpy copy of the queries into a memory-mapped exchange file (in /dev/shm where there is
one), one byte to the worker and one byte back: no serialization on the decoder's thread. Between steps the worker
polls its pipe for `spin_seconds` before it blocks (OpenMP runtimes spin-wait the same way), so a step's byte finds it
awake: waking a blocked process costs a scheduler round trip on every token.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np


@dataclass
class KnnDistribution:
    """p_kNN of N rows as its non-zero entries (at most k per row) and each row's nearest distance: what a search
    leaves for the mixing. Sparse because a row has at most k tokens out of V, so building it costs a few numpy calls
    on k values whatever the vocabulary. The worker also fills the mixing terms when lambda needs no LM output
    (`mixing_terms`), so that the decoder's thread only adds them."""

    rows: np.ndarray  # (n,) int64: the row of each entry
    tokens: np.ndarray  # (n,) int64: its token (unique within a row)
    log_probs: np.ndarray  # (n,) float32: log p_kNN(token)
    nearest: np.ndarray  # (N,) float32: the nearest squared distance of each row (inf = no neighbour)
    log_keep: np.ndarray | None = None  # (N,) float32: log(1 - lambda) of each row, when computed with the search
    log_weighted: np.ndarray | None = None  # (n,) float32: log(lambda * p_kNN(token)), idem


LAMBDA_MODES = ("fixed", "distance", "entropy")


def row_lambdas(nearest: np.ndarray, lambda_: float, lambda_mode: str, lambda_scale: float,
                entropy_fraction: np.ndarray | None = None) -> np.ndarray:
    """lambda per row `(N,)` float64: `lambda_` ("fixed"), lambda_ * exp(-nearest distance / lambda_scale)
    ("distance"), or lambda_ * the LM's entropy / log(V) (`entropy_fraction`, "entropy"); 0 where no neighbour."""
    nearest = np.asarray(nearest, dtype=np.float64)
    lam = np.full(nearest.shape, lambda_)
    if lambda_mode == "distance":
        lam = lam * np.exp(-np.clip(nearest, 0, None) / lambda_scale)
    elif lambda_mode == "entropy":
        if entropy_fraction is None:
            raise ValueError("lambda_mode 'entropy' needs the LM's entropy (entropy_fraction).")
        lam = lam * entropy_fraction
    return np.where(np.isfinite(nearest), lam, 0.0)


def mixing_terms(knn: KnnDistribution, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two terms of log(lambda p_kNN + (1 - lambda) p_LM), float32: log(1 - lambda) per row `(N,)`, added to the
    LM's log-probabilities, and log(lambda p_kNN) per entry `(n,)`, logaddexp-ed onto them (-inf where lambda = 0:
    the LM's value stays as it is)."""
    with np.errstate(divide="ignore"):
        log_keep = np.log1p(-lam).astype(np.float32)  # (N,)
        log_weighted = (np.log(lam[knn.rows]) + knn.log_probs).astype(np.float32)  # (n,)
    return log_keep, log_weighted


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


def wait_readable(stream: BinaryIO, spin_seconds: float) -> None:
    """Poll `stream` (a pipe) for up to `spin_seconds` (select with a zero timeout) until it has data or is closed;
    the read that follows then finds the data there, or blocks. Polling keeps the process on its core, so a byte is
    seen within microseconds of its arrival, where a process blocked in read() waits for the scheduler to wake it.
    No polling where select cannot wait on pipes (Windows)."""
    if spin_seconds <= 0 or os.name != "posix":
        return
    deadline = time.perf_counter() + spin_seconds
    while not select.select([stream], [], [], 0)[0] and time.perf_counter() < deadline:
        pass


def _write_all(stream: BinaryIO, data) -> None:
    """All of `data` into an unbuffered pipe (a raw write may take only part of it)."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += stream.write(view[done:])


def _exchange_layout(rows: int, k: int, dim: int) -> list[tuple[str, type, tuple[int, ...]]]:
    return [("control", np.int64, (3,)), ("params", np.float64, (5,)), ("queries", np.float32, (rows, dim)),
            ("rows", np.int64, (rows * k,)), ("tokens", np.int64, (rows * k,)),
            ("log_probs", np.float32, (rows * k,)), ("nearest", np.float32, (rows,)),
            ("log_keep", np.float32, (rows,)), ("log_weighted", np.float32, (rows * k,))]


def _aligned_nbytes(dtype, shape) -> int:
    return -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8  # every array starts 8-byte aligned


def exchange_nbytes(rows: int, k: int, dim: int) -> int:
    """Size of the exchange file for at most `rows` queries of `dim` and `k` neighbours."""
    return sum(_aligned_nbytes(dtype, shape) for _, dtype, shape in _exchange_layout(rows, k, dim))


def exchange_arrays(buffer, rows: int, k: int, dim: int) -> dict[str, np.ndarray]:
    """The exchange file's arrays (both processes map the same layout): control int64 [rows, k, n], params float64
    [temperature, lambda_ (nan: no mixing terms), lambda mode (index in LAMBDA_MODES), lambda_scale, spin_seconds],
    queries float32 (rows, dim), and the result: p_kNN's entries rows / tokens int64 (rows*k), log_probs float32
    (rows*k), nearest float32 (rows), and the mixing terms log_keep float32 (rows), log_weighted float32 (rows*k)."""
    arrays, offset = {}, 0
    for name, dtype, shape in _exchange_layout(rows, k, dim):
        arrays[name] = np.frombuffer(buffer, dtype, int(np.prod(shape)), offset).reshape(shape)
        offset += _aligned_nbytes(dtype, shape)
    return arrays


def _map_exchange(path: str, nbytes: int):
    import mmap

    with open(path, "r+b") as file:
        return mmap.mmap(file.fileno(), nbytes)


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The worker's loop: set up from the first frame, then answer one-byte commands until the main process closes
    the pipe: b"m" + length + path + int64 [rows, k, dim] maps a new exchange file, b"s" searches the queries in it;
    each is answered b"k", or b"e" + length + message (the worker then exits). `requests` is unbuffered, so that
    polling its file descriptor sees every byte that has not been read."""
    import faiss

    faiss.omp_set_num_threads(1)  # one query per sequence: nothing to split, and idle threads would spin
    try:
        (length,) = struct.unpack("=q", _read_exact(requests, 8))
        setup = json.loads(bytes(_read_exact(requests, length)))
        index = faiss.deserialize_index(np.frombuffer(_read_exact(requests, setup["index_nbytes"]), np.uint8))
        values = np.frombuffer(_read_exact(requests, 8 * setup["values_count"]), np.int64)
        spin_seconds = 0.0  # until the first step's params say otherwise
        _write_all(replies, struct.pack("=q", faiss.omp_get_max_threads()))
        exchange = None
        while True:
            wait_readable(requests, spin_seconds)
            command = requests.read(1)
            if not command:
                return
            if command == b"m":
                (length,) = struct.unpack("=q", _read_exact(requests, 8))
                path = bytes(_read_exact(requests, length)).decode()
                rows, k, dim = struct.unpack("=qqq", _read_exact(requests, 24))
                exchange = exchange_arrays(_map_exchange(path, exchange_nbytes(rows, k, dim)), rows, k, dim)
            else:
                count, k = (int(value) for value in exchange["control"][:2])
                temperature, lambda_, mode, scale, spin_seconds = (float(value) for value in exchange["params"])
                distances, ids = index.search(exchange["queries"][:count], k)
                knn = knn_distribution(*neighbour_tokens(distances, ids, values), temperature)
                n = len(knn.tokens)
                for name in ("rows", "tokens", "log_probs"):
                    exchange[name][:n] = getattr(knn, name)
                exchange["nearest"][:count] = knn.nearest
                if not np.isnan(lambda_):  # this lambda mode needs no LM output
                    lam = row_lambdas(knn.nearest, lambda_, LAMBDA_MODES[int(mode)], scale)
                    exchange["log_keep"][:count], exchange["log_weighted"][:n] = mixing_terms(knn, lam)
                exchange["control"][2] = n
            _write_all(replies, b"k")
    except Exception as error:  # noqa: BLE001 - reported to the main process, which raises it
        message = f"{type(error).__name__}: {error}".encode()
        _write_all(replies, b"e" + struct.pack("=q", len(message)) + message)


def _stop(process: subprocess.Popen, exchange_path: str) -> None:
    """Close the worker's input (it exits) and reap it (kill it if it does not exit); remove the exchange file."""
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
    with contextlib.suppress(FileNotFoundError):
        os.unlink(exchange_path)


class SearchProcess:
    """A faiss index searched in a worker process: `start(queries, k, temperature)` puts a step's queries `(B, d)` in
    a memory-mapped exchange file and sends the worker one byte; `result()` waits for its byte and reads the
    step's `KnnDistribution` back (the same numbers as `knn_distribution(*neighbour_tokens(*index.search(queries, k),
    values), temperature)` in this process). One step is pending at a time. The worker holds its own copy of the
    index (memory: the index twice). `close()` stops it; so does garbage collection.

    `spin_seconds` (an attribute too; the worker takes a new value with the next step): how long each side polls for
    the other's byte before it blocks (the worker after each answer, this process in `result()`). Polling saves a
    scheduler wake-up per step (here 105 -> 20 us a round trip) but keeps the worker's core busy, up to that long
    after the last step: use it only when the decoder leaves a core free (at 2 torch threads on 2 cores a polling
    worker doubled the time per token). 0 blocks at once."""

    def __init__(self, index, values: np.ndarray, spin_seconds: float = 0.05) -> None:
        import faiss

        env = dict(os.environ, OMP_NUM_THREADS="1")
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None  # memory, not disk, where there is one
        handle, self._exchange_path = tempfile.mkstemp(prefix="lightarch-search-", dir=folder)
        os.close(handle)
        self.process = subprocess.Popen([sys.executable, *_NO_SCRIPT_DIR, os.path.abspath(__file__)], bufsize=0,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._finalizer = weakref.finalize(self, _stop, self.process, self._exchange_path)
        self.dim, self.steps, self._pending, self._capacity, self._params = int(index.d), 0, False, (0, 0), None
        if not spin_seconds >= 0:
            raise ValueError(f"spin_seconds must be >= 0, got {spin_seconds}.")
        self.spin_seconds = float(spin_seconds)
        payload = faiss.serialize_index(index)  # (nbytes,) uint8
        values = np.ascontiguousarray(values, dtype=np.int64)
        header = json.dumps({"index_nbytes": int(payload.nbytes), "values_count": int(values.size)}).encode()
        try:
            for part in (struct.pack("=q", len(header)) + header, payload, values):
                _write_all(self.process.stdin, part)
        except BrokenPipeError:
            pass  # the worker died: _read says why
        (self.worker_threads,) = struct.unpack("=q", self._read(8))

    def _map(self, rows: int, k: int) -> None:
        """Size the exchange file for `rows` queries and `k` neighbours and have the worker map it too."""
        nbytes = exchange_nbytes(rows, k, self.dim)
        with open(self._exchange_path, "r+b") as file:
            file.truncate(nbytes)
        self._exchange = exchange_arrays(_map_exchange(self._exchange_path, nbytes), rows, k, self.dim)
        self._params = None  # a new file: write them again
        path = self._exchange_path.encode()
        self._send(b"m" + struct.pack("=q", len(path)) + path + struct.pack("=qqq", rows, k, self.dim))
        self._wait()
        self._capacity = (rows, k)

    def start(self, queries: np.ndarray, k: int, temperature: float, lambda_: float | None = None,
              lambda_mode: str = "fixed", lambda_scale: float = 1.0) -> None:
        """Send one step's queries `(B, d)`; collects (and drops) a previous step that was never collected. With
        `lambda_` (and a `lambda_mode` other than "entropy", which needs the LM's output) the worker also computes
        the mixing terms."""
        if self._pending:
            self.result()
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {tuple(queries.shape)}.")
        if lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {lambda_mode!r}.")
        count = queries.shape[0]
        if count > self._capacity[0] or k > self._capacity[1]:
            self._map(max(count, self._capacity[0]), max(k, self._capacity[1]))
        exchange = self._exchange
        exchange["queries"][:count] = queries
        exchange["control"][:2] = count, k
        params = (temperature, np.nan if lambda_ is None or lambda_mode == "entropy" else lambda_,
                  LAMBDA_MODES.index(lambda_mode), lambda_scale, self.spin_seconds)
        if params != self._params:  # the same every step of a generation: written once
            exchange["params"][:] = self._params = params
        self._send(b"s")
        self._pending = True

    @property
    def pending(self) -> bool:
        """A step was started and not yet collected."""
        return self._pending

    def result(self, copy: bool = True) -> KnnDistribution:
        """The pending step's p_kNN (waits for the worker), with its mixing terms when `start` asked for them;
        RuntimeError if nothing is pending or the worker failed. `copy=False` returns views of the exchange file,
        valid until the next `start` (what the decoder's mixing uses: no copy on its thread)."""
        if not self._pending:
            raise RuntimeError("SearchProcess.result() called before start(): no search is pending.")
        self._pending = False
        wait_readable(self.process.stdout, self.spin_seconds)
        self._wait()
        self.steps += 1
        exchange = self._exchange
        count, _, n = exchange["control"].tolist()
        knn = KnnDistribution(rows=exchange["rows"][:n], tokens=exchange["tokens"][:n],
                              log_probs=exchange["log_probs"][:n], nearest=exchange["nearest"][:count])
        if not np.isnan(self._params[1]):  # the worker computed the mixing terms
            knn.log_keep, knn.log_weighted = exchange["log_keep"][:count], exchange["log_weighted"][:n]
        if copy:
            knn = KnnDistribution(**{name: None if value is None else value.copy()
                                     for name, value in vars(knn).items()})
        return knn

    def _send(self, data: bytes) -> None:
        try:
            _write_all(self.process.stdin, data)
        except (BrokenPipeError, ValueError):  # the worker died, or close() was called: _wait says why
            pass

    def _wait(self) -> None:
        """The worker's answer to the last command: b"k", or its error raised here."""
        answer = self._read(1)
        if answer == b"e":
            (length,) = struct.unpack("=q", self._read(8))
            raise RuntimeError(f"the retrieval worker failed: {bytes(self._read(length)).decode(errors='replace')}")

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
    output = os.fdopen(os.dup(1), "wb", buffering=0)  # replies go to the real stdout; prints go to stderr instead
    os.dup2(2, 1)
    serve(sys.stdin.buffer.raw, output)
