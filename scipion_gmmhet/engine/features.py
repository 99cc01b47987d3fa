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
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from .conventions import ctf_2d, fourier_grid, image_to_fourier
from .errors import InputError
from .fourier import RingBinner
from .gmm import GMM, project

log = logging.getLogger(__name__)

CTF_MODES = ("auto", "ctf", "flipped", "premultiplied", "none")
PARAM_TYPES = ("centers", "amplitudes", "sigmas")
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


@dataclass
class Batch:
    """One batch of items on the device: image transforms and the geometry/CTF to model them."""
    items: torch.Tensor          # (B,) long, expanded item numbers
    F_img: torch.Tensor          # (B, D, D//2+1) complex
    rotations: torch.Tensor      # (B, 3, 3) RELION matrices (symmetry-expanded)
    origins_A: torch.Tensor      # (B, 2)
    ctf: torch.Tensor | None     # (B, D, D//2+1) real, already in the ctf_mode's form


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
        from . import data, metadata
        from .symmetry import symmetry_operators
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
        """Load the images of expanded items (numpy or tensor ints) -> :class:`Batch` on the device."""
        items_np = np.asarray(items.cpu() if isinstance(items, torch.Tensor) else items, dtype=np.int64)
        rows = items_np // self.n_ops
        uniq, inverse = np.unique(rows, return_inverse=True)
        imgs = self.images.get(uniq)
        img = torch.as_tensor(np.asarray(imgs, dtype=np.float32))
        if len(uniq) != len(rows) or not np.array_equal(uniq, rows):
            img = img[torch.as_tensor(inverse)]
        if self.device.type == "cuda":
            img = img.pin_memory().to(self.device, non_blocking=True)
        items_t = torch.as_tensor(items_np, device=self.device)
        return self.geometry(items_t, self.crop_fourier(image_to_fourier(img.to(self.device))))

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
        total, total_sq, count = None, None, 0
        for start in range(0, len(items), batch_size):
            g = self.raw(particles.batch(np.sort(items[start:start + batch_size]))).double()
            total = g.sum(0) if total is None else total + g.sum(0)
            total_sq = (g * g).sum(0) if total_sq is None else total_sq + (g * g).sum(0)
            count += g.shape[0]
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

    def build(self, features: GradientFeatures, particles: Particles, batch_size: int, fingerprint: dict) -> None:
        n, nf = len(particles), features.n_features
        tmp = self.path + ".tmp"
        out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(n, nf))
        fmax = float(np.finfo(np.float16).max)
        for start in range(0, n, batch_size):
            items = np.arange(start, min(n, start + batch_size))
            out[items[0]:items[-1] + 1] = features(particles.batch(items)).clamp(-fmax, fmax).cpu().numpy()
        out.flush()
        del out
        os.replace(tmp, self.path)
        meta_tmp = self.meta_path + ".tmp"
        with open(meta_tmp, "w") as f:
            json.dump({"n_items": n, "n_features": nf, "dtype": "float16", "fingerprint": fingerprint}, f)
        os.replace(meta_tmp, self.meta_path)
        self.array = np.memmap(self.path, dtype=np.float16, mode="r", shape=(n, nf))

    def get(self, items: np.ndarray, device) -> torch.Tensor:
        order = np.argsort(items, kind="stable")
        rows = np.empty((len(items), self.array.shape[1]), dtype=np.float16)
        rows[order] = self.array[items[order]]
        return torch.as_tensor(rows, device=device).float()


def focus_mask_gaussians(neutral: GMM, mask_path: str | None) -> np.ndarray:
    """Indices of the Gaussians that may change: all without a mask; with an MRC mask, those
    whose centre's nearest voxel of the mask's own grid has a value > 0.5 (centres outside the
    mask's box are outside). InputError when the mask selects none."""
    n = len(neutral)
    if mask_path is None:
        return np.arange(n)
    from .mrc import read_map
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
