"""The automatic rigid core: the Gaussians that move least across the latent space.

A pose refinement against decoded models needs a frame that the network cannot move: when every
Gaussian is free, the network learns part of each particle's pose error as a deformation, and
where the decoded model is wrong (a flexible domain in a not-quite-right place) the best rigid
fit of the whole model to the image is pulled away from the true pose by the wrong part. The
rigid core is found from the trained decoder alone, with no mask from the user:

1. decode the latent vectors of up to ``n_sample`` particles (evenly spaced rows), with each
   decoded model's rigid-body motion relative to the neutral model removed (the gauge of
   :class:`refine.LatentModels`);
2. each Gaussian's motion is the RMS distance (Angstrom) of its decoded centres from their mean
   over the sample;
3. the core is every Gaussian whose motion is at most ``median + k * 1.4826 MAD`` of the motions
   (a robust outlier bound: the moving domains are the outliers), and at least the
   ``min_fraction`` least-moving Gaussians.

The refinement then scores the core only (the focus path of :func:`refine.refine_poses`: the
projection of the other Gaussians, decoded for that particle, is subtracted from the image), so
the pose is the rigid core's, which the decoded models agree on.

``gmmhet refine --core auto`` (:func:`refinement_core`, opt-in) uses a simpler, sharper motion:
each Gaussian's RMS distance of its decoded centres from their mean over the particles' latents,
with NO fit removed, and a tighter bound ``k`` = :data:`FOCUS_K` = 1. On the simulator's swinging
arm the raw motion separates arm from core better (ROC AUC 0.96-0.99 against the true arm) than
the affine-removed one (0.90-0.92). Measured (benchmarks/bench_refine.py ``--refine-core auto``,
SNR 1, no mask, ``--rounds auto``, median angle error): simulator arm 800 particles -38% with
every Gaussian scored -> -47%; 1AKE hinge 1,000 particles -56% -> -50%; but at exact poses only
68% of the simulator's particles stay unchanged (FSC vs truth 0.5052 -> 0.5041; every Gaussian:
100%), so it is not the default. Each particle scored against its TRUE GMM reaches -70%
(results/refine_ceiling_snr1.md): the decoded arm, not the search, limits the trained model.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

CORE_K = 3.0
CORE_MIN_FRACTION = 0.5
#: bound of the refinement's default focus (:func:`refinement_core`), in robust standard deviations
FOCUS_K = 1.0


def remove_affine_motion(centers_A: torch.Tensor, neutral_A: torch.Tensor, weights: torch.Tensor,
                         iterations: int = 4) -> torch.Tensor:
    """Centres ``(B, N, 3)`` minus their robust affine fit to ``neutral_A`` ``(N, 3)`` (least
    squares ``c ~ [c0, 1] T``, reweighted by a Cauchy factor of each Gaussian's residual, as
    :func:`refine.remove_rigid_motion`): what is left is the motion no global linear map explains
    (a domain moving relative to the rest), not the small rotations and shears with which a
    network mimics pose errors."""
    B, N = centers_A.shape[:2]
    X = torch.cat([neutral_A, torch.ones(N, 1, dtype=neutral_A.dtype, device=neutral_A.device)], 1)  # (N, 4)
    w = weights.abs().expand(B, -1).clamp_min(1e-12)
    for _ in range(iterations):
        Xw = X[None] * w[..., None]  # (B, N, 4)
        T = torch.linalg.solve(Xw.transpose(1, 2) @ X[None] + 1e-6 * torch.eye(4, dtype=X.dtype, device=X.device),
                               Xw.transpose(1, 2) @ centers_A)  # (B, 4, 3)
        res = centers_A - X[None] @ T
        r = res.norm(dim=-1)
        r0 = r.median(dim=1, keepdim=True).values.clamp_min(0.5)
        w = weights.abs().expand(B, -1) / (1.0 + (r / r0) ** 2)
    return res


def gaussian_motion_A(models, n_sample: int = 1024, device="cpu", batch: int = 256) -> np.ndarray:
    """RMS motion (Angstrom) of each Gaussian across the decoded models of up to ``n_sample``
    evenly spaced particle rows of ``models`` (a :class:`refine.ParticleModels`; ``(N,)``),
    after each model's robust affine fit to the neutral model is removed
    (:func:`remove_affine_motion`)."""
    c0 = torch.as_tensor(models.neutral_centers_A, dtype=torch.float64)
    amp = getattr(getattr(models, "model", None), "neutral", None)
    wts = torch.as_tensor(amp.amplitudes, dtype=torch.float64) if amp is not None else torch.ones(len(c0), dtype=torch.float64)
    n = len(getattr(models, "latents", [])) or len(getattr(models, "state_of_row", []))
    if n == 0:
        return np.zeros(len(models.neutral_centers_A))
    rows = np.unique(np.linspace(0, n - 1, min(n, n_sample)).round().astype(np.int64))
    s1 = s2 = None
    for i in range(0, len(rows), batch):
        c, _, _ = models.gaussians(rows[i:i + batch], device)
        c = remove_affine_motion(c.double().cpu(), c0, wts)
        s1 = c.sum(0) if s1 is None else s1 + c.sum(0)
        s2 = (c * c).sum(0) if s2 is None else s2 + (c * c).sum(0)
    mean = s1 / len(rows)
    var = (s2 / len(rows) - mean * mean).sum(-1).clamp_min(0.0)  # (N,) summed over x, y, z
    return torch.sqrt(var).cpu().numpy()


def rigid_core(models, k: float = CORE_K, min_fraction: float = CORE_MIN_FRACTION, n_sample: int = 1024,
               device="cpu") -> np.ndarray:
    """Boolean mask ``(N,)`` of the rigid core of ``models`` (module docstring)."""
    motion = gaussian_motion_A(models, n_sample, device)
    med = float(np.median(motion))
    core = core_from_motion(motion, k, min_fraction)
    log.info("refine: automatic rigid core: %d of %d Gaussians (motion across the latent space <= %.2f A; "
             "median %.2f A, largest %.2f A)", int(core.sum()), len(core), float(motion[core].max()), med,
             float(motion.max()))
    return core


def core_from_motion(motion_A: np.ndarray, k: float, min_fraction: float = CORE_MIN_FRACTION) -> np.ndarray:
    """Boolean ``(N,)``: the Gaussians whose motion (Angstrom) is at most ``median + k * 1.4826
    MAD``, and at least the ``min_fraction`` least-moving ones."""
    motion = np.asarray(motion_A, dtype=np.float64)
    med = float(np.median(motion))
    mad = float(np.median(np.abs(motion - med))) * 1.4826
    core = motion <= med + k * mad
    n_min = int(np.ceil(min_fraction * len(motion)))
    if core.sum() < n_min:
        core = np.zeros_like(core)
        core[np.argsort(motion, kind="stable")[:n_min]] = True
    return core


def refinement_core(tm, latents: np.ndarray, k: float = FOCUS_K, n_sample: int = 4096,
                    batch: int = 512) -> np.ndarray:
    """Indices (int64) of the Gaussians ``gmmhet refine`` scores by default: the core of the
    trained model ``tm`` (a :class:`training.trained.TrainedModel`) by the raw RMS motion of its
    decoded centres over up to ``n_sample`` evenly spaced ``latents`` rows (the training latents
    in ``gmmhet refine``; module docstring)."""
    z = np.asarray(latents, dtype=np.float32)
    rows = np.unique(np.linspace(0, len(z) - 1, min(len(z), n_sample)).round().astype(np.int64))
    s1 = s2 = None
    for i in range(0, len(rows), batch):
        c = tm.decode(torch.as_tensor(z[rows[i:i + batch]]))[0].double().cpu()
        s1 = c.sum(0) if s1 is None else s1 + c.sum(0)
        s2 = (c * c).sum(0) if s2 is None else s2 + (c * c).sum(0)
    mean = s1 / len(rows)
    motion = torch.sqrt((s2 / len(rows) - mean * mean).sum(-1).clamp_min(0.0)).numpy()
    core = core_from_motion(motion, k)
    log.info("refine: focus on the automatic rigid core: %d of %d Gaussians (decoded motion <= %.2f A; median "
             "%.2f A, largest %.2f A); --core none scores every Gaussian", int(core.sum()), len(core),
             float(motion[core].max()), float(np.median(motion)), float(motion.max()))
    return np.flatnonzero(core).astype(np.int64)


class AnchoredCoreModels:
    """``models`` with the rigid core held at the neutral model: each particle's Gaussians are
    its decoded ones, except the core's, which are the neutral model's (the anchor). Scored with
    the core as the focus, the refinement aligns each particle's core to one fixed structure,
    which no per-particle deformation can bend towards a wrong pose; the decoded rest is
    subtracted from the image."""

    def __init__(self, models, core: np.ndarray):
        self.models, self.core = models, np.asarray(core, dtype=bool)
        self.neutral_centers_A = models.neutral_centers_A
        self.median_sigma_A = models.median_sigma_A
        self._core_t = torch.as_tensor(self.core)
        self._c0 = torch.as_tensor(np.asarray(models.neutral_centers_A), dtype=torch.float32)

    def gaussians(self, rows, device):
        c, a, s = self.models.gaussians(rows, device)
        c = c.clone()
        core = self._core_t.to(c.device)
        c[:, core] = self._c0.to(device=c.device, dtype=c.dtype)[core]
        return c, a, s
