"""The compute device: resolving ``--device``, pinned host memory, and the out-of-memory policy.

:func:`resolve_device` turns ``--device`` (``cpu``, ``cuda``, ``cuda:N``, a GPU number, ``auto``/empty) into a
``torch.device``; :class:`AdaptiveBatch` halves a batch size on device out-of-memory and carries
on (:func:`is_oom` tells such an error apart); :func:`pinned` puts a host tensor in page-locked
memory when it is going to a CUDA device.
"""
from __future__ import annotations

import logging

import torch

from .errors import InputError

log = logging.getLogger(__name__)

OOM_HINT = ("lower --n-gauss / use a smaller box (Fourier crop via --highres) or use --device cpu")


def resolve_device(device: str | None) -> torch.device:
    """``--device`` as a ``torch.device``: ``auto``/empty (CUDA when there is one), ``cpu``,
    ``cuda``/``gpu``, ``cuda:N`` or a bare GPU number ``N`` (as RELION's ``--gpu``). Anything else,
    or a CUDA device this machine lacks, is one :class:`InputError` that echoes the value."""
    text = "" if device is None else str(device).strip().lower()
    if text in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text.isdigit():
        text = "cuda:" + text
    elif text == "gpu":
        text = "cuda"
    index = None
    if text != "cuda":
        head, _, num = text.partition(":")
        if head != "cuda" or not num.isdigit():
            raise InputError(f"--device {device}: not a device; give cpu, auto, cuda, cuda:N or a GPU number N")
        index = int(num)
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if index is not None and index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(0 to {torch.cuda.device_count() - 1}); give one of those")
    return torch.device(text)


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` in page-locked host memory when it goes to a CUDA device (fast, asynchronous
    transfer); unchanged otherwise (no pinning without CUDA)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return t.pin_memory()
    return t


def is_oom(exc: BaseException) -> bool:
    """True for a device out-of-memory error (``torch.cuda.OutOfMemoryError``, or a RuntimeError
    saying 'out of memory', as some backends and older torch versions raise)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class AdaptiveBatch:
    """A batch size that halves on device out-of-memory (CUDA OOM).

    ``shrink()`` empties the device cache, halves ``size`` and logs it; when ``size`` is
    already 1 it raises :class:`InputError` naming the settings to lower. :meth:`run` walks
    ``[0, n)`` in chunks of the current size, retrying a chunk that ran out of memory with the
    halved size (``fn(start, stop)`` must have no effect when it raises).
    """

    def __init__(self, size: int, what: str, device=None):
        self.size, self.what, self.device = max(1, int(size)), what, device
        self.halvings = 0

    def shrink(self) -> None:
        if self.device is None or torch.device(self.device).type == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - no CUDA here (CPU tests inject the error)
                pass
        if self.size <= 1:
            raise InputError(f"{self.what}: does not fit in GPU memory even with batch size 1; {OOM_HINT}")
        old, self.size = self.size, max(1, self.size // 2)
        self.halvings += 1
        log.warning("%s: out of GPU memory with batch size %d; emptied the cache and carrying on with batch "
                    "size %d", self.what, old, self.size)

    def run(self, n: int, fn) -> None:
        start = 0
        while start < n:
            stop = min(n, start + self.size)
            try:
                fn(start, stop)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(exc):
                    raise
                del exc
                self.shrink()
                continue
            start = stop
