"""Encoder inputs, as in e2gmm: per-particle gradients of the FRC loss at the neutral GMM.

For particle ``i`` (image ``I_i``, RELION pose ``A_i``, origin, CTF) the loss is
``L_i = -FRC(P(theta0; A_i, origin_i, CTF_i), I_i)`` averaged over the rings of the training
band (:class:`fourier.RingBinner`), and the feature vector is ``dL_i/dtheta`` at the neutral
parameters ``theta0`` for the Gaussians that may change (all of them without a focus mask),
ordered ``[centres (Nm x 3, xyz), amplitudes (Nm), widths (Nm, only when widths may change)]``.

Batched: the neutral parameters are expanded into a ``(B, N, ...)`` leaf, one per particle;
the per-particle losses are summed and ONE backward pass gives every particle's gradient
(particle ``b``'s loss depends only on row ``b`` of the leaf).

The CTF of the projection follows the particles' ``ctf_mode`` (:mod:`io.data`).

Normalisation (documented, stored with the model so new particles are encoded the same way):
from a seeded sample of up to ``n_stats`` particles, each feature's mean is subtracted and each
parameter type (centres, amplitudes, widths) is divided by its own root-mean-square over the
sample, so the three types (with different units: 1/Angstrom, 1/density, 1/Angstrom) enter the
encoder on the same scale while relative sizes within a type are kept.

Features are either computed once and cached on disk (``features.f16``: float16 memory map,
``n_items x n_features``, rows in item order; see :class:`FeatureCache`) or computed on the fly
for each training batch. Neither path holds more than a batch of gradients in RAM.

Reading a training batch (:class:`FeatureSource`) has a host half (images and cached rows into
host memory; safe on the prefetch thread of :mod:`prefetch`) and a device half.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ..device import AdaptiveBatch, pinned
from ..errors import InputError
from ..io.atomic import atomic_path, reserve_space, write_text
from ..io.data import Batch, HostBatch, Particles
from ..io.outputs import TrainFolder
from ..model.fourier import RingBinner
from ..model.gmm import GMM, project

log = logging.getLogger(__name__)

PARAM_TYPES = ("centers", "amplitudes", "sigmas")


def feature_param_types(changes) -> tuple[str, ...]:
    """Parameter types whose gradients form the features: centres and amplitudes always (they
    carry conformational and compositional signal whatever may change), widths when widths may
    change."""
    return ("centers", "amplitudes", "sigmas") if "widths" in changes else ("centers", "amplitudes")


class GradientFeatures:
    """Computes e2gmm's gradient features for batches of particles (see the module docstring).

    ``binner`` is built on the particles' (cropped) grid ``(fbox, fapix)``.
    ``mobile`` (LongTensor) lists the Gaussians that may change; only their gradients are kept.
    ``stats`` = ``{'mean': (F,), 'scale': {type: float}}`` once estimated or loaded.
    """

    def __init__(self, neutral: GMM, binner: RingBinner, mobile: torch.Tensor,
                 param_types=("centers", "amplitudes"), device="cpu", stats: dict | None = None):
        self.device = torch.device(device)
        self.c0, self.a0, self.s0 = neutral.tensors(self.device)
        self.box, self.apix = binner.box, binner.apix  # the (cropped) projection grid
        self.binner = binner
        self.mobile = mobile.to(self.device)
        self.param_types = tuple(param_types)
        nm = int(self.mobile.numel())
        self.sizes = {"centers": 3 * nm, "amplitudes": nm, "sigmas": nm}
        self.n_features = sum(self.sizes[t] for t in self.param_types)
        self.stats = None
        if stats is not None:
            self.set_stats(stats)

    def raw(self, b: Batch) -> torch.Tensor:
        """Un-normalised gradients ``(B, F)`` of ``-FRC`` w.r.t. the mobile Gaussians' parameters,
        for a whole batch in one backward pass."""
        B = b.rotations.shape[0]
        with torch.enable_grad():
            leaves = {"centers": self.c0.expand(B, -1, -1).clone().requires_grad_(True),
                      "amplitudes": self.a0.expand(B, -1).clone().requires_grad_(True),
                      "sigmas": self.s0.expand(B, -1).clone().requires_grad_(True)}
            F = project(leaves["centers"], leaves["amplitudes"], leaves["sigmas"], b.rotations, self.box,
                        self.apix, b.origins_A, b.ctf)
            loss = -self.binner.score(F, b.F_img)
            wanted = [leaves[t] for t in self.param_types]
            grads = torch.autograd.grad(loss.sum(), wanted)
        return torch.cat([g[:, self.mobile].reshape(B, -1) for g in grads], dim=1).detach()

    def set_stats(self, stats: dict) -> None:
        mean = torch.as_tensor(np.asarray(stats["mean"], dtype=np.float32), device=self.device)
        if mean.numel() != self.n_features:
            raise ValueError(f"feature statistics for {mean.numel()} features, model has {self.n_features}")
        scale = torch.cat([torch.full((self.sizes[t],), float(stats["scale"][t]), device=self.device)
                           for t in self.param_types])
        self.stats = stats
        self._mean, self._inv_scale = mean, 1.0 / scale

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self._mean) * self._inv_scale

    def __call__(self, b: Batch) -> torch.Tensor:
        """Normalised features ``(B, F)``."""
        return self.normalize(self.raw(b))

    def estimate_stats(self, particles: Particles, items: np.ndarray, batch_size: int) -> dict:
        """Per-feature mean and per-type RMS from the given items (a seeded sample)."""
        acc = {"total": None, "total_sq": None, "count": 0}
        items = np.asarray(items)

        def step(i0, i1):
            g = self.raw(particles.batch(np.sort(items[i0:i1]))).double()
            acc["total"] = g.sum(0) if acc["total"] is None else acc["total"] + g.sum(0)
            acc["total_sq"] = (g * g).sum(0) if acc["total_sq"] is None else acc["total_sq"] + (g * g).sum(0)
            acc["count"] += g.shape[0]

        AdaptiveBatch(batch_size, "feature statistics", self.device).run(len(items), step)
        total, total_sq, count = acc["total"], acc["total_sq"], acc["count"]
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        scale, o = {}, 0
        for t in self.param_types:
            n = self.sizes[t]
            rms = float(var[o:o + n].mean().sqrt())
            scale[t] = rms if rms > 0 else 1.0
            o += n
        stats = {"mean": mean.float().cpu().numpy(), "scale": scale, "n_sample": count}
        self.set_stats(stats)
        return stats


class FeatureCache:
    """``DIR/features.f16`` (float16 memory map, ``n_items x n_features``) + ``features.json``.

    The JSON (written last, atomically) records the shape and a fingerprint of everything the
    features depend on; a cache whose JSON is missing or whose fingerprint differs is rebuilt.
    """

    def __init__(self, directory: str):
        folder = TrainFolder(directory)
        self.path = folder.feature_cache
        self.meta_path = folder.feature_cache_meta
        self.array = None

    def load(self, fingerprint: dict) -> bool:
        if not (os.path.exists(self.meta_path) and os.path.exists(self.path)):
            return False
        with open(self.meta_path) as f:
            meta = json.load(f)
        if meta.get("fingerprint") != fingerprint:
            return False
        shape = (int(meta["n_items"]), int(meta["n_features"]))
        if os.path.getsize(self.path) != shape[0] * shape[1] * 2:
            return False
        self.array = np.memmap(self.path, dtype=np.float16, mode="r", shape=shape)
        return True

    def build(self, features: GradientFeatures, particles: Particles, batch_size: int, fingerprint: dict,
              dist=None) -> None:
        """Compute every item's features into ``features.f16``.

        Written to ``features.f16.tmp`` (its blocks reserved first with ``posix_fallocate``, so
        a full disk is a one-line InputError and not a SIGBUS on a memory-map page), renamed
        into place, and only then is ``features.json`` written: a kill at any moment never
        leaves a cache that loads as complete. With ``dist`` (:mod:`distributed`, several
        processes), each rank computes its own block of rows into the shared temporary file.
        """
        n, nf = len(particles), features.n_features
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        tmp = self.path + ".tmp"
        if rank == 0:
            for p in (self.meta_path, self.path):  # an older cache must not outlive a half-built one
                if os.path.exists(p):
                    os.remove(p)
        if world == 1:
            with atomic_path(self.path) as tmp:
                self._fill(tmp, features, particles, batch_size, 0, n, n, nf, create=True)
        else:
            err = None
            if rank == 0:
                try:
                    self._create(tmp, n, nf)
                except InputError as exc:
                    err = exc
            dist.raise_if_any(err)
            lo, hi = n * rank // world, n * (rank + 1) // world
            self._fill(tmp, features, particles, batch_size, lo, hi, n, nf, create=False)
            dist.barrier()
            if rank == 0:
                os.replace(tmp, self.path)
        if rank == 0:
            write_text(self.meta_path, json.dumps({"n_items": n, "n_features": nf, "dtype": "float16",
                                                   "fingerprint": fingerprint}))
        if dist is not None:
            dist.barrier()
        self.array = np.memmap(self.path, dtype=np.float16, mode="r", shape=(n, nf))

    @staticmethod
    def _create(path: str, n: int, nf: int) -> None:
        from ..io.atomic import disk_full_error
        try:
            with open(path, "wb") as f:
                f.truncate(n * nf * 2)
            reserve_space(path)
        except OSError as exc:
            err = disk_full_error(path, exc)
            if err is not None:
                try:
                    os.remove(path)
                except OSError:
                    pass
                raise err from None
            raise

    def _fill(self, path, features, particles, batch_size, lo, hi, n, nf, create: bool) -> None:
        if create:
            self._create(path, n, nf)
        if hi <= lo:
            return
        out = np.memmap(path, dtype=np.float16, mode="r+", shape=(n, nf))
        fmax = float(np.finfo(np.float16).max)

        def step(i0, i1):
            x = features(particles.batch(np.arange(lo + i0, lo + i1))).clamp(-fmax, fmax).cpu().numpy()
            out[lo + i0:lo + i1] = x

        AdaptiveBatch(batch_size, "gradient features", features.device).run(hi - lo, step)
        out.flush()  # the map is closed when this returns (before the rename)

    def get(self, items: np.ndarray, device) -> torch.Tensor:
        """Features ``(len(items), F)`` float32 on ``device``, rows in the order of ``items``."""
        return self.to_device(self.read(items, device), device)

    def read(self, items: np.ndarray, device=None) -> torch.Tensor:
        """The host half of :meth:`get`: float16 rows ``(len(items), F)`` in the order of
        ``items`` (read in sorted order from the memory map), pinned when ``device`` is CUDA."""
        items = np.asarray(items, dtype=np.int64)
        order = np.argsort(items, kind="stable")
        rows = np.empty((len(items), self.array.shape[1]), dtype=np.float16)
        rows[order] = self.array[items[order]]
        return pinned(torch.as_tensor(rows), torch.device(device or "cpu"))

    @staticmethod
    def to_device(rows: torch.Tensor, device) -> torch.Tensor:
        """Host float16 rows (:meth:`read`) -> float32 on ``device`` (non-blocking copy)."""
        return rows.to(device, non_blocking=True).float()


class FeatureSource:
    """Features for items from the disk cache or on the fly, plus the images' batch.

    ``read(items)`` is the host half (images and cached feature rows into host memory; safe on
    the prefetch thread), ``load(host)`` the device half; calling the source does both."""

    def __init__(self, particles: Particles, feats: GradientFeatures, cache: FeatureCache | None, device):
        self.particles, self.feats, self.cache, self.device = particles, feats, cache, device
        self.resident = None  # the whole feature table on the device (batching.resident_rows), or None

    def read_features(self, items: np.ndarray):
        """Host float16 feature rows of ``items`` (None without a cache or with a resident table)."""
        if self.cache is None or self.resident is not None:
            return None
        return self.cache.read(items, self.device)

    def read(self, items: np.ndarray) -> HostBatch:
        host = self.particles.read(items)
        host.features = self.read_features(items)
        return host

    def load(self, host: HostBatch):
        b = self.particles.to_device(host)
        if self.resident is not None:
            x = self.resident.index_select(0, b.items).float()
        elif host.features is not None:
            x = FeatureCache.to_device(host.features, self.device)
        else:
            x = self.feats(b)
        return x, b

    def __call__(self, items: np.ndarray):
        return self.load(self.read(items))


def focus_mask_gaussians(neutral: GMM, mask_path: str | None, option: str = "--mask") -> np.ndarray:
    """Indices of the Gaussians that may change: all without a mask; with an MRC mask, those
    whose centre's nearest voxel of the mask's own grid has a value > 0.5 (centres outside the
    mask's box are outside). InputError (naming ``option``) when the mask selects none."""
    n = len(neutral)
    if mask_path is None:
        return np.arange(n)
    from ..io.mrc import read_map
    from ..io.validate import check_mask_matches
    vol, apix = read_map(mask_path)
    check_mask_matches(vol.shape, apix, (neutral.box,) * 3, neutral.apix, f"{option} {mask_path}",
                       "the Gaussian model")
    d = vol.shape[0]
    idx = np.rint(neutral.centers_A.astype(np.float64) / apix).astype(np.int64) + d // 2  # (N, 3) xyz
    inside = np.all((idx >= 0) & (idx < d), axis=1)
    keep = np.zeros(n, dtype=bool)
    ii = idx[inside]
    keep[inside] = vol[ii[:, 2], ii[:, 1], ii[:, 0]] > 0.5
    if not keep.any():
        raise InputError(f"{option} {mask_path}: selects none of the {n} Gaussians (no centre where the mask "
                         "is > 0.5); check that the mask covers the region of interest at the map's "
                         "pixel size and box")
    return np.nonzero(keep)[0]
