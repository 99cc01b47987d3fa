"""Encoder inputs, as in e2gmm: per-particle gradients of the FRC loss at the neutral GMM.

For particle ``i`` (image ``I_i``, RELION pose ``A_i``, origin, CTF) the loss is
``L_i = -FRC(P(theta0; A_i, origin_i, CTF_i), I_i)`` averaged over the rings of the training
band (:class:`fourier.RingBinner`), and the feature vector is ``dL_i/dtheta`` at the neutral
parameters ``theta0`` for the Gaussians that may change (all of them without a focus mask),
ordered ``[centres (Nm x 3, xyz), amplitudes (Nm), widths (Nm, only when widths may change)]``.

Batched: the neutral parameters are expanded into a ``(B, N, ...)`` leaf, one per particle;
the per-particle losses are summed and ONE backward pass gives every particle's gradient
(particle ``b``'s loss depends only on row ``b`` of the leaf).

CTF of the model projection (``ctf_mode``): ``ctf`` multiplies by RELION's CTF (raw images);
``flipped`` by ``|CTF|`` (phase-flipped images); ``premultiplied`` by ``CTF^2`` (images
already multiplied by the CTF, ``rlnCtfDataAreCtfPremultiplied``); ``none`` applies none.
``auto`` picks ``premultiplied`` for stars that say so, ``ctf`` when the star has CTF
parameters, else ``none``.

Normalisation (documented, stored with the model so new particles are encoded the same way):
from a seeded sample of up to ``n_stats`` particles, each feature's mean is subtracted and each
parameter type (centres, amplitudes, widths) is divided by its own root-mean-square over the
sample, so the three types (with different units: 1/Angstrom, 1/density, 1/Angstrom) enter the
encoder on the same scale while relative sizes within a type are kept.

Features are either computed once and cached on disk (``features.f16``: float16 memory map,
``n_items x n_features``, rows in item order; see :class:`FeatureCache`) or computed on the fly
for each training batch. Neither path holds more than a batch of gradients in RAM.

Reading a batch has a host half (:meth:`Particles.read`, :meth:`FeatureCache.read`: images and
cached rows into host memory, pinned when the device is CUDA; no device work, so it may run on
the prefetch thread of :mod:`prefetch`) and a device half (``to_device``: non-blocking
transfer, Fourier transform, geometry and CTF). ``Particles.batch`` does both.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..conventions import ctf_2d, fourier_grid, image_to_fourier
from ..io.atomic import atomic_path, write_text
from ..io.loader import read_rows
from ..errors import InputError
from ..model.fourier import RingBinner
from ..model.gmm import GMM, project

log = logging.getLogger(__name__)

CTF_MODES = ("auto", "ctf", "flipped", "premultiplied", "none")
PARAM_TYPES = ("centers", "amplitudes", "sigmas")
OOM_HINT = ("lower --n-gauss / use a smaller box (Fourier crop via --highres) or use --device cpu")
_CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast",
             "phase_shift_deg", "bfactor", "scale")


class ArrayImages:
    """Images held in an array ``(N, D, D)`` (tests, small sets); same ``get`` as data.ParticleImages."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def get(self, rows) -> np.ndarray:
        return np.asarray(self.images[np.asarray(rows)], dtype=np.float32)


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


@dataclass
class Batch:
    """One batch of items on the device: image transforms and the geometry/CTF to model them."""
    items: torch.Tensor          # (B,) long, expanded item numbers
    F_img: torch.Tensor          # (B, D, D//2+1) complex
    rotations: torch.Tensor      # (B, 3, 3) RELION matrices (symmetry-expanded)
    origins_A: torch.Tensor      # (B, 2)
    ctf: torch.Tensor | None     # (B, D, D//2+1) real, already in the ctf_mode's form


@dataclass
class HostBatch:
    """One batch of items read into host memory, before the transfer (:meth:`Particles.read`):
    pinned when the device is CUDA. Slicing (``host[i0:i1]``) keeps rows aligned with ``items``."""
    items: np.ndarray                      # (B,) int64, expanded item numbers
    images: torch.Tensor                   # (B, D, D) float32, real space
    features: torch.Tensor | None = None   # (B, F) float16 rows of the feature cache, when used

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, sel: slice) -> "HostBatch":
        return HostBatch(self.items[sel], self.images[sel], None if self.features is None else self.features[sel])


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` in page-locked host memory when it goes to a CUDA device (fast, asynchronous
    transfer); unchanged otherwise (no pinning without CUDA)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return t.pin_memory()
    return t


class Particles:
    """Per-particle poses and CTF (small arrays, moved to the device once) plus lazily read
    images, with optional symmetry expansion (item ``i * n_ops + s`` = particle row ``i``
    with operator ``s``, see :mod:`symmetry`)."""

    def __init__(self, images, rotations: np.ndarray, origins_A: np.ndarray, box: int, apix: float,
                 ctf: dict | None = None, ctf_mode: str = "ctf", sym_ops: np.ndarray | None = None,
                 device="cpu"):
        self.images = images
        self.box, self.apix = int(box), float(apix)
        self.n_particles = int(np.asarray(rotations).shape[0])
        self.device = torch.device(device)
        if ctf_mode not in CTF_MODES or ctf_mode == "auto":
            raise ValueError(f"ctf_mode must be one of {CTF_MODES[1:]}, got {ctf_mode!r}")
        if ctf_mode != "none" and ctf is None:
            raise InputError("particles: no CTF parameters in the star file; give --ctf none (the CTF is then "
                             "ignored) or add rlnDefocusU/V/Angle and the optics columns")
        self.ctf_mode = ctf_mode
        ops = np.eye(3)[None] if sym_ops is None else np.asarray(sym_ops)
        self.n_ops = int(ops.shape[0])
        f32 = dict(dtype=torch.float32, device=self.device)
        self.rotations = torch.as_tensor(np.asarray(rotations, dtype=np.float32), **f32)
        self.origins_A = torch.as_tensor(np.asarray(origins_A, dtype=np.float32).reshape(-1, 2), **f32)
        self.sym_ops = torch.as_tensor(ops.astype(np.float32), **f32)
        self.ctf = None
        if ctf is not None and ctf_mode != "none":
            self.ctf = {k: torch.as_tensor(np.asarray(ctf[k], dtype=np.float32), **f32) for k in _CTF_KEYS if k in ctf}
            if "bfactor" in self.ctf and not bool((self.ctf["bfactor"] != 0).any()):
                del self.ctf["bfactor"]  # skips a per-batch host sync inside ctf_2d
        self.crop(None)

    def crop(self, highres_A: float | None) -> None:
        """Work on the Fourier coefficients up to ``highres_A`` only (Fourier cropping).

        The frequencies ``m / (D apix)`` with ``|m| < D'/2`` of a ``D``-px image are exactly
        those of a ``D'``-px image of pixel size ``D apix / D'``, so images are cropped in
        Fourier space to ``D' = 2 (ring(highres_A) + 1)`` (even, at most ``D``) and models
        projected at (``fbox``, ``fapix``) = (``D'``, ``D apix / D'``): the FRC over the band
        is unchanged, the cost falls by about ``(D / D')^2``. ``None``: no cropping.
        """
        if highres_A is None:
            fbox = self.box
        else:
            ring = int(np.floor(self.box * self.apix / float(highres_A)))
            fbox = min(self.box, 2 * (ring + 1))
        self.fbox = int(fbox)
        self.fapix = self.box * self.apix / self.fbox
        self.ky, self.kx = fourier_grid(self.fbox, self.fapix, rfft=True, device=self.device)
        half = self.fbox // 2
        self._crop_rows = torch.cat([torch.arange(half), torch.arange(self.box - half, self.box)]).to(self.device)

    def crop_fourier(self, F: torch.Tensor) -> torch.Tensor:
        """``(B, D, D//2+1)`` transforms -> ``(B, D', D'//2+1)`` (see :meth:`crop`)."""
        if self.fbox == self.box:
            return F
        return F.index_select(-2, self._crop_rows)[..., :self.fbox // 2 + 1]

    def __len__(self) -> int:
        return self.n_particles * self.n_ops

    @classmethod
    def from_star(cls, star_path: str, symmetry: str | None = None, ctf_mode: str = "auto", device="cpu",
                  check_files: bool = True) -> "Particles":
        """Particles of a RELION star (via :mod:`metadata` and :mod:`data`)."""
        from ..io import data, metadata
        from ..model.symmetry import symmetry_operators
        meta = metadata.read_particles(star_path)
        has_ctf = bool(meta.has_ctf())
        meta.validate(require_alignment=True, require_ctf=has_ctf and ctf_mode != "none", check_images=check_files)
        if ctf_mode == "auto":
            if not has_ctf:
                ctf_mode = "none"
                log.warning("%s: no CTF parameters; the CTF is ignored (images taken as phase-flipped "
                            "or CTF-free)", star_path)
            elif bool(np.any(meta.ctf_premultiplied())):
                ctf_mode = "premultiplied"
            else:
                ctf_mode = "ctf"
        ctf = meta.ctf_params() if (has_ctf and ctf_mode != "none") else None
        ops = symmetry_operators(symmetry)
        return cls(data.ParticleImages(meta), meta.rotation_matrices(), meta.origins_A(), meta.box, meta.apix,
                   ctf=ctf, ctf_mode=ctf_mode, sym_ops=ops if len(ops) > 1 else None, device=device)

    def batch(self, items) -> Batch:
        """Load the images of expanded items (numpy or tensor ints) -> :class:`Batch` on the device
        (:meth:`read` then :meth:`to_device`)."""
        return self.to_device(self.read(items))

    def read(self, items) -> HostBatch:
        """The host-side half of :meth:`batch`: read the images of expanded items into host memory
        (pinned when the device is CUDA), refusing NaN/Inf pixels. Touches no device, so it may
        run on a background thread (:mod:`prefetch`)."""
        items_np = np.asarray(items.cpu() if isinstance(items, torch.Tensor) else items, dtype=np.int64)
        rows = items_np // self.n_ops
        uniq, inverse = np.unique(rows, return_inverse=True)
        imgs = read_rows(self.images, uniq)  # contiguous runs of each stack: one read per run
        if not np.isfinite(imgs).all():  # cheap (host memory, before the transfer); one NaN spoils every latent
            self._refuse_nonfinite(uniq, imgs)
        img = torch.as_tensor(imgs)
        if len(uniq) != len(rows) or not np.array_equal(uniq, rows):
            img = img[torch.as_tensor(inverse)]
        return HostBatch(items_np, _pinned(img, self.device))

    def to_device(self, host: HostBatch) -> Batch:
        """The device half of :meth:`batch`: transfer (non-blocking from pinned memory), Fourier
        transform and crop the images, and add the items' geometry and CTF."""
        img = host.images.to(self.device, non_blocking=True)
        items_t = torch.as_tensor(host.items, device=self.device)
        return self.geometry(items_t, self.crop_fourier(image_to_fourier(img)))

    def image_name(self, row: int) -> str:
        """``'000005@stack.mrcs'`` for particle row ``row`` (0-based) when the images come from
        stacks (:class:`data.ParticleImages`), else ``'particle row N'`` (1-based)."""
        im = self.images
        if hasattr(im, "stack_paths") and hasattr(im, "index"):
            return f"{int(im.index[row]) + 1:06d}@{im.stack_paths[int(im.stack_code[row])]}"
        return f"particle row {int(row) + 1}"

    def _refuse_nonfinite(self, rows: np.ndarray, imgs: np.ndarray) -> None:
        bad = np.flatnonzero(~np.isfinite(imgs.reshape(len(imgs), -1)).all(axis=1))
        row = int(rows[bad[0]])
        source = getattr(self.images, "source", "particles")
        raise InputError(f"{source}: NaN or Inf pixel values in image {self.image_name(row)} (particle row {row + 1}"
                         f"{f' and {bad.size - 1} more in this batch' if bad.size > 1 else ''}); re-extract or "
                         "re-normalise the particles, or remove those rows")

    def check_finite_sample(self, sample: int = 256, name: str | None = None, seed: int = 0) -> None:
        """Refuse NaN/Inf pixels in a bounded sample of the images (first, last and ``sample``
        seeded random particles; see :func:`validate.check_images_finite`)."""
        from ..io.validate import check_images_finite
        if hasattr(self.images, "get") and hasattr(self.images, "__len__"):
            check_images_finite(self.images, sample=sample, name=name or getattr(self.images, "source", "particles"),
                                seed=seed)

    def geometry(self, items: torch.Tensor, F_img: torch.Tensor | None = None) -> Batch:
        rows = torch.div(items, self.n_ops, rounding_mode="floor")
        rot = self.rotations[rows]
        if self.n_ops > 1:
            rot = rot @ self.sym_ops[items % self.n_ops]
        ctf = None
        if self.ctf is not None:
            p = {k: v[rows] for k, v in self.ctf.items()}
            ctf = ctf_2d(self.ky, self.kx, **p)
            if self.ctf_mode == "flipped":
                ctf = ctf.abs()
            elif self.ctf_mode == "premultiplied":
                ctf = ctf * ctf
        return Batch(items, F_img, rot, self.origins_A[rows], ctf)


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
            loss = -self.binner.mean_frc(F, b.F_img)
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
        self.path = os.path.join(directory, "features.f16")
        self.meta_path = os.path.join(directory, "features.json")
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
            _reserve_space(path)
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
        return _pinned(torch.as_tensor(rows), torch.device(device or "cpu"))

    @staticmethod
    def to_device(rows: torch.Tensor, device) -> torch.Tensor:
        """Host float16 rows (:meth:`read`) -> float32 on ``device`` (non-blocking copy)."""
        return rows.to(device, non_blocking=True).float()


def _reserve_space(path: str) -> None:
    """Allocate a file's blocks now (as ``simulate._reserve_space``): a full disk is an ENOSPC
    here rather than a SIGBUS when a page of its memory map is written."""
    import errno
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
    finally:
        os.close(fd)


def focus_mask_gaussians(neutral: GMM, mask_path: str | None) -> np.ndarray:
    """Indices of the Gaussians that may change: all without a mask; with an MRC mask, those
    whose centre's nearest voxel of the mask's own grid has a value > 0.5 (centres outside the
    mask's box are outside). InputError when the mask selects none."""
    n = len(neutral)
    if mask_path is None:
        return np.arange(n)
    from ..io.mrc import read_map
    vol, apix = read_map(mask_path)
    d = vol.shape[0]
    idx = np.rint(neutral.centers_A.astype(np.float64) / apix).astype(np.int64) + d // 2  # (N, 3) xyz
    inside = np.all((idx >= 0) & (idx < d), axis=1)
    keep = np.zeros(n, dtype=bool)
    ii = idx[inside]
    keep[inside] = vol[ii[:, 2], ii[:, 1], ii[:, 0]] > 0.5
    if not keep.any():
        raise InputError(f"--mask {mask_path}: selects none of the {n} Gaussians (no centre where the mask "
                         "is > 0.5); check that the mask covers the region of interest at the map's "
                         "pixel size and box")
    return np.nonzero(keep)[0]
