"""A retrieval started now and collected later: on a worker thread while the decoder runs (overlapped), or run when
collected (sequential, the reference path). Retrieved context (`context.py`) uses it for its passage search, once
every `stride` tokens. The kNN-LM's search, once per token, runs in a worker process instead: a thread shares the
GIL with the decoder and measured no faster than searching in line (`search_process.py`)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Prefetcher:
    """One pending call at a time: `start(fn, *args)` then `result()`. With `overlap=False`, `result()` runs the
    call itself, so both modes compute the same thing from the same arguments and differ only in when."""

    def __init__(self, overlap: bool = True) -> None:
        self.overlap = overlap
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightarch-retrieval") if overlap
                          else None)
        self._pending: Future | tuple[Callable, tuple] | None = None

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        """Begin `fn(*args)` (overlapped) or remember it (sequential); replaces a pending call not yet collected."""
        self._pending = self._executor.submit(fn, *args) if self._executor is not None else (fn, args)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def result(self) -> Any:
        """The started call's result (waits for the worker); RuntimeError if nothing was started."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("Prefetcher.result() called before start(): no retrieval is pending.")
        if isinstance(pending, Future):
            return pending.result()
        fn, args = pending
        return fn(*args)

    def close(self) -> None:
        """Stop the worker thread (waits for a running call)."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
