"""The simulators' image stack writer: noiseless images in batches plus white noise at an SNR."""
from __future__ import annotations

import math

import mrcfile
import numpy as np

from ..io.atomic import atomic_path, reserve_space

CALIBRATION_PARTICLES = 512


def write_stack(stack_path: str, n: int, box: int, apix: float, snr: float, images, rng_noise: np.random.Generator,
                batch_size: int) -> tuple[int, float, float]:
    """Write the ``(n, box, box)`` float32 stack atomically, in batches: ``images(slice)`` gives the
    noiseless images of those rows; white noise of variance (mean image variance of the first
    ``n_cal`` images) / ``snr`` is added. Returns ``(n_cal, signal_variance, noise_sigma)``."""
    n_cal = min(n, CALIBRATION_PARTICLES, max(16, (1 << 22) // (box * box)))
    stats = {"min": math.inf, "max": -math.inf, "sum": 0.0, "sumsq": 0.0}
    with atomic_path(stack_path) as tmp:  # InputError on a full disk; no stray .tmp
        with mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
            reserve_space(tmp)
            def batches(i0, i1):
                return np.concatenate([images(slice(j, min(j + batch_size, i1))) for j in range(i0, i1, batch_size)])
            def write(i0, clean, noise_sigma):
                img = clean
                if noise_sigma > 0:
                    img = clean + rng_noise.standard_normal(clean.shape, dtype=np.float32) * np.float32(noise_sigma)
                m.data[i0:i0 + len(img)] = img
                stats["min"] = min(stats["min"], float(img.min()))
                stats["max"] = max(stats["max"], float(img.max()))
                stats["sum"] += float(img.sum(dtype=np.float64))
                stats["sumsq"] += float(np.square(img, dtype=np.float64).sum())

            cal = batches(0, n_cal)
            signal_var = float(cal.reshape(len(cal), -1).var(axis=1, dtype=np.float64).mean())
            noise_sigma = math.sqrt(signal_var / snr) if math.isfinite(snr) else 0.0
            write(0, cal, noise_sigma)
            del cal
            for i0 in range(n_cal, n, batch_size):
                write(i0, batches(i0, min(n, i0 + batch_size)), noise_sigma)
            m.set_image_stack()
            m.voxel_size = apix
            count = n * box * box
            mean = stats["sum"] / count
            m.header.dmin, m.header.dmax, m.header.dmean = stats["min"], stats["max"], mean
            m.header.rms = math.sqrt(max(0.0, stats["sumsq"] / count - mean * mean))
    return n_cal, signal_var, noise_sigma
