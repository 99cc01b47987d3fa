"""Reading the next batches on a background thread while the current one trains.

:class:`Prefetcher` runs ``load(job)`` for a list of jobs known in advance (e.g. the item lists
of an epoch's batches, from its seeded permutation) on ONE background thread, at most
``depth`` results ahead of the consumer, and yields the results in the order of the jobs.
Only the reading overlaps the training: the results, and their order, are those of calling
``load`` on each job in turn, so training is bit-identical with or without prefetching.

An exception raised by ``load`` (a NaN image's :class:`~errors.InputError`, a missing stack)
reaches the consumer at that job's turn, after the results of the jobs before it; the thread
then stops. Leaving the iteration early (an error in the consumer) stops the thread too.
``enabled=False`` calls ``load`` in the consumer's thread instead (same results).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

class Prefetcher:
    """``for result in Prefetcher(load, jobs, depth=2): ...`` (see the module docstring).

    Use as a context manager (or call :meth:`close`) so that the thread stops when the
    consumer leaves early; a consumer that reads every result needs neither.
    """

    def __init__(self, load: Callable, jobs: Iterable, depth: int = 2, enabled: bool = True,
                 name: str = "gmmhet-prefetch"):
        self.load, self.jobs, self.depth, self.enabled = load, list(jobs), max(1, int(depth)), bool(enabled)
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._thread: threading.Thread | None = None
        self.name = name

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        if not self.enabled:
            for job in self.jobs:
                yield self.load(job)
            return
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()
        try:
            while True:
                kind, value = self._queue.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            self.close()

    def _put(self, item) -> bool:
        """Queue ``item``, waiting for room; False when the consumer has stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        for job in self.jobs:
            if self._stop.is_set():
                return
            try:
                result = self.load(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                self._put(("error", exc))
                return
            if not self._put(("ok", result)):
                return
        self._put(("done", None))

    def close(self) -> None:
        """Stop the thread (results not yet consumed are dropped) and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while thread.is_alive():
            try:  # make room, so that a blocked put sees the stop flag
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
