"""A data path that keeps a GPU fed: block-shuffled order, contiguous reads, reader threads.

Reading a memory-mapped stack in a random order costs one small read per image (one page
fault each on a cold cache, 64 kB at box 128 in float32); reading runs of consecutive images
costs one large sequential read per run. This module keeps the training order random at the
level of *blocks* of ``block`` consecutive items and reads each batch as a few contiguous runs:

- :func:`block_shuffled_order`: a seeded permutation of the items that visits every item
  exactly once, in blocks of consecutive items (the blocks in random order); cut into batches
  of a multiple of ``block`` items, each batch is ``batch / block`` runs.
- :func:`read_rows`: the images of particle rows into a float32 ``(B, D, D)`` buffer (a new
  array or a given one, e.g. page-locked), one slice of the memory map per contiguous run of
  each stack; the same images as :meth:`data.ParticleImages.get`.
- :class:`BatchLoader`: reads the batches of an epoch on ``threads`` reader threads, at most
  ``depth`` batches ahead, yields them in order. On CUDA the images land in a pool of pinned
  (page-locked) buffers that are reused once the device has finished copying from them (a CUDA
  event per buffer), so the transfer is asynchronous; on the CPU each batch gets its own array.

The device half (transfer, Fourier transform, Fourier crop and normalisation) is
:meth:`features.Particles.to_device`: it runs on the device of the particles, so on a GPU the
host only copies bytes. An exception raised while reading (a NaN image, a missing stack)
reaches the consumer at that batch's turn, after the batches before it.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError


def block_shuffled_order(items: np.ndarray, block: int, seed) -> np.ndarray:
    """``items`` (sorted expanded item numbers) in a seeded block-shuffled order.

    ``items`` is cut into consecutive blocks of ``block`` items (the last may be shorter); the
    full blocks are permuted with ``np.random.default_rng(seed)`` and concatenated, and the short
    block (if any) goes last, so batches of a multiple of ``block`` items are whole blocks.
    Every item appears exactly once. ``block <= 1`` is a plain permutation of the items.
    """
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    block = int(block)
    if block <= 1:
        return rng.permutation(items)
    n_full = items.size // block
    full = items[:n_full * block].reshape(n_full, block)[rng.permutation(n_full)].reshape(-1)
    return np.concatenate([full, items[n_full * block:]])


def contiguous_runs(index: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive values in a sorted int array: ``[(position, first value, length)]``."""
    index = np.asarray(index, dtype=np.int64)
    if index.size == 0:
        return []
    cut = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [index.size]])
    return [(int(s), int(index[s]), int(e - s)) for s, e in zip(starts, ends)]


def read_rows(images, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Images ``(B, D, D)`` float32 of particle rows ``rows`` (in that order), read as contiguous
    runs of each stack of ``images`` (a :class:`data.ParticleImages`); other image sources
    (e.g. :class:`features.ArrayImages`) go through their ``get``. ``out``: a float32 buffer of at
    least ``len(rows)`` images to fill (a view of it is returned)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if not hasattr(images, "stack_code"):
        got = np.asarray(images.get(rows), dtype=np.float32)
        if out is None:
            return got
        out[:len(rows)] = got
        return out[:len(rows)]
    box = images.box
    if out is None:
        out = np.empty((rows.size, box, box), dtype=np.float32)
    out = out[:rows.size]
    if rows.size == 0:
        return out
    if rows.min() < 0 or rows.max() >= len(images):
        raise IndexError(f"particle rows out of range 0..{len(images) - 1}")
    codes, index = images.stack_code[rows], images.index[rows]
    for code in np.unique(codes):
        stack = images._stack(int(code))
        sel = np.flatnonzero(codes == code)
        order = np.argsort(index[sel], kind="stable")
        want = index[sel][order]
        if want[-1] >= stack.shape[0] or want[0] < 0:
            bad = int(want[-1] if want[-1] >= stack.shape[0] else want[0])
            raise InputError(f"{images.source}: image {bad + 1}@{images.stack_paths[code]} is outside the stack "
                             f"({stack.shape[0]} images); the star file and stack do not match")
        dest = sel[order]
        for pos, first, n in contiguous_runs(want):
            d = dest[pos:pos + n]
            if n > 1 and d[-1] - d[0] == n - 1 and np.all(np.diff(d) == 1):
                out[d[0]:d[0] + n] = stack[first:first + n]  # one sequential read into place
            else:
                out[d] = stack[first:first + n]
    return out


class BatchLoader:
    """``for host in BatchLoader(particles, batches): ...`` yields :class:`features.HostBatch`es
    of ``particles`` (a :class:`features.Particles`) for the item arrays ``batches`` in order
    (see the module docstring). ``threads`` reader threads, ``depth`` batches in flight;
    ``features(items)``, when given, fills ``host.features`` on the reader thread too.
    Use as a context manager (or call :meth:`close`) when the consumer may stop early.

    ``host.images`` of a CUDA loader lives in a reused pinned buffer: transfer it with
    :meth:`to_device` (which records when the copy is done) before asking for the next batch.
    """

    def __init__(self, particles, batches: Sequence[np.ndarray], threads: int = 4, depth: int = 4,
                 features: Callable | None = None):
        self.particles, self.features = particles, features
        self.batches = [np.asarray(b, dtype=np.int64) for b in batches]
        self.threads, self.depth = max(1, int(threads)), max(1, int(depth))
        self.cuda = particles.device.type == "cuda" and torch.cuda.is_available()
        self._pool: ThreadPoolExecutor | None = None
        self._free: queue.Queue = queue.Queue()
        self._events: dict[int, object] = {}
        self._closed = threading.Event()
        self.read_seconds = 0.0  # summed over reader threads
        self._lock = threading.Lock()
        if self.cuda:
            biggest = max((len(np.unique(b // particles.n_ops)) for b in self.batches), default=0)
            box = particles.box
            for k in range(self.depth + 1):
                self._free.put((k, torch.empty((biggest, box, box), dtype=torch.float32).pin_memory()))

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, items: np.ndarray):
        import time
        from .data import HostBatch
        t0 = time.perf_counter()
        p = self.particles
        rows = items // p.n_ops
        uniq, inverse = np.unique(rows, return_inverse=True)
        slot = None
        if self.cuda:
            while slot is None:
                if self._closed.is_set():
                    raise RuntimeError("loader closed")
                try:
                    slot = self._free.get(timeout=0.1)
                except queue.Empty:
                    continue
            ev = self._events.pop(slot[0], None)
            if ev is not None:
                ev.synchronize()  # the device has finished copying the previous batch out of it
            imgs = read_rows(p.images, uniq, slot[1].numpy())
        else:
            imgs = read_rows(p.images, uniq)
        if not np.isfinite(imgs).all():
            if slot is not None:
                self._free.put(slot)
            p._refuse_nonfinite(uniq, imgs)
        img = slot[1][:len(uniq)] if slot is not None else torch.from_numpy(imgs)  # the pinned tensor itself
        if len(uniq) != len(rows) or not np.array_equal(uniq, rows):
            img = img[torch.as_tensor(inverse)]  # symmetry copies: a new tensor, pinned below
            if slot is not None:
                img = img.pin_memory()
                self._free.put(slot)
                slot = None
        host = HostBatch(items, img, None if self.features is None else self.features(items))
        host.slot = slot
        with self._lock:
            self.read_seconds += time.perf_counter() - t0
        return host

    def to_device(self, host):
        """The device :class:`features.Batch` of ``host`` (transfer, FFT, crop, geometry, CTF);
        on CUDA the pinned buffer goes back to the pool once the copy has completed."""
        b = self.particles.to_device(host)
        self._give_back(host)
        return b

    def _give_back(self, host) -> None:
        """Return ``host``'s pinned buffer to the pool, marked free once the device's work queued
        so far (its copy) is done."""
        slot, host.slot = getattr(host, "slot", None), None
        if slot is None:
            return
        ev = torch.cuda.Event()
        ev.record()
        self._events[slot[0]] = ev
        self._free.put(slot)

    def __iter__(self) -> Iterator:
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gmmhet-read")
        pending: list[Future] = []
        nxt = 0
        try:
            for _ in range(len(self.batches)):
                while nxt < len(self.batches) and len(pending) < self.depth:
                    pending.append(self._pool.submit(self._read, self.batches[nxt]))
                    nxt += 1
                host = pending.pop(0).result()  # raises the reader's exception at this batch's turn
                yield host
                self._give_back(host)  # when the consumer did not call to_device
        finally:
            for f in pending:
                f.cancel()
            self.close()

    def close(self) -> None:
        """Stop the reader threads (batches not yet consumed are dropped)."""
        self._closed.set()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
