"""Batch size, learning rate and step bookkeeping for a device that wants large batches.

- :func:`scaled_lr`: the Adam learning rate for a batch size other than the reference 64
  (linear rule, see its docstring for the measurement behind it).
- :func:`probe_batch_size`: a short memory/throughput probe on CUDA: doubles the batch from the
  reference while a timed training step fits in memory and still gains throughput; the CPU
  keeps the reference (larger batches are not faster there, and 64 keeps CPU results as before).
- :class:`DeviceSum`: sums per-step values on the device and reads them back only when asked
  (every N steps / at the end of an epoch), so no ``.item()``/``.cpu()`` happens inside a step.
- :func:`resident_rows`: a float16 feature table (``features.f16``) copied to the device once
  when it fits in a fraction of the free device memory, so batches index it there.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch

from ..device import is_oom

log = logging.getLogger(__name__)

REFERENCE_BATCH = 64


def scaled_lr(lr: float, batch_size: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """Adam learning rate for ``batch_size`` given the rate ``lr`` tuned at ``reference_batch``:
    ``lr * batch_size / reference_batch`` (linear scaling). Measured on 2,000 simulated
    conformational particles, 15 epochs, box 64 (|Spearman| of latent PC1 with the truth; batch 64
    at 1e-4: 0.923): batch 256 0.923 linear / 0.919 square-root, 512 0.913 / 0.922, 1024 (2 steps
    per epoch) 0.913 / 0.901: both rules within 0.01 up to 512, linear the better one at 1024
    (benchmarks/results/batch_lr_cpu.md)."""
    return float(lr) * max(1, int(batch_size)) / float(reference_batch)


MIN_STEPS_PER_EPOCH = 32  # the probe never picks a batch that leaves fewer Adam steps per epoch


def probe_batch_size(trial: Callable[[int], None], device, start: int = REFERENCE_BATCH, max_batch: int = 4096,
                     n_items: int | None = None, min_gain: float = 1.10, repeats: int = 2,
                     cuda_only: bool = True, clock: Callable[[], float] = time.perf_counter) -> tuple[int, list]:
    """The batch size for ``device``: ``start`` on the CPU; on CUDA the fastest of ``start``,
    ``2 start``, ... (at most ``max_batch`` and ``n_items``) by particles/s of ``trial(batch)``
    (one full training step of that many particles: forward, backward, Adam; it must leave the
    model unchanged or the caller restores it), stopping at the first size that runs out of
    memory or gains less than ``min_gain`` x over the previous one. Each size is timed over
    ``repeats`` calls after one warm-up. Returns (batch size, [(batch, particles/s or None)]).
    ``cuda_only=False`` probes on any device (tests, or a CPU user who asks for it); ``clock``:
    the timer (tests give a simulated one)."""
    device = torch.device(device)
    if device.type != "cuda" and cuda_only:
        return int(start), []
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    cap = min(int(max_batch), int(n_items)) if n_items else int(max_batch)
    best, best_rate, tried = int(start), 0.0, []
    b = int(start)
    while b <= cap:
        try:
            trial(b)
            sync()
            t0 = clock()
            for _ in range(repeats):
                trial(b)
            sync()
            rate = repeats * b / max(clock() - t0, 1e-9)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory ends the probe quietly
            if not is_oom(exc):
                raise
            del exc
            if device.type == "cuda":
                torch.cuda.empty_cache()
            tried.append((b, None))
            break
        tried.append((b, rate))
        if rate < min_gain * best_rate:  # a marginal gain: keep the smaller batch (more Adam steps)
            break
        best, best_rate = b, rate
        b *= 2
    log.info("batch size probe on %s: %s -> batch %d", device,
             ", ".join(f"{k}: {'OOM' if r is None else f'{r:.0f}/s'}" for k, r in tried), best)
    return best, tried


class DeviceSum:
    """Running sums of per-step tensors kept on the device (``add``), read back to the host only
    by :meth:`value` (one synchronisation), e.g. every ``log_every`` steps and per epoch."""

    def __init__(self, device, dtype=torch.float64):
        self.total = torch.zeros((), device=device, dtype=dtype)
        self.steps = 0

    def add(self, value: torch.Tensor) -> None:
        self.total.add_(value.detach().to(self.total.dtype).sum())
        self.steps += 1

    def value(self) -> float:
        return float(self.total)


def resident_rows(array: np.ndarray, device, max_fraction: float = 0.25) -> torch.Tensor | None:
    """``array`` (e.g. the float16 feature memory map, ``n_items x F``) as one tensor on a CUDA
    ``device`` when it takes at most ``max_fraction`` of the device's free memory, else None
    (and always None on the CPU, where the memory map already is host memory)."""
    device = torch.device(device)
    if device.type != "cuda" or array is None:
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if array.nbytes > max_fraction * free:
        log.info("feature table %.0f MB > %.0f%% of free GPU memory: rows are read per batch",
                 array.nbytes / 2 ** 20, 100 * max_fraction)
        return None
    out = torch.empty(array.shape, dtype=torch.float16, device=device)
    step = max(1, (256 << 20) // max(1, array.shape[1] * 2))  # 256 MB pieces: no host copy of it all
    for i in range(0, array.shape[0], step):
        out[i:i + step] = torch.from_numpy(np.ascontiguousarray(array[i:i + step])).to(device)
    return out
