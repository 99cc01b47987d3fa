"""Per-particle orientation refinement against each particle's own (decoded) GMM.

A consensus refinement aligns every particle to one average map; a moving domain blurs that
map and biases the poses. Here every particle is aligned again, locally, to the CTF-applied
projection of ITS decoded GMM (the trained network's Gaussians at the particle's latent
point; any :class:`ParticleModels`), scored by a whitened correlation (or e2gmm's FRC) over the
rings of a resolution band.

Pose update (RELION terms)
    With ``A = Rz(psi) Ry(tilt) Rz(rot)`` the RELION matrix of :mod:`conventions` (map frame ->
    projection frame), a candidate pose is ``A_new = R(delta) @ A_cur``: the small rotation
    ``R(delta)`` (rotation vector ``delta`` in degrees, matrix exponential) acts in the frame
    of the image. ``delta_z`` is an in-plane rotation (it changes psi), ``delta_x``/``delta_y``
    tilt the viewing direction about the image's x/y axes, and the angular distance between
    the old and new pose is exactly ``|delta|`` (:func:`conventions.angular_distance_deg`),
    so the user's angular range is the ball ``|delta| <= max_angle_deg``. Shifts are RELION
    origins (``rlnOriginX/YAngst``): ``origin_new = origin_cur + d`` with ``|d| <= max_shift_A``.

Score
    ``wcc`` (default): the cross-correlation over the band of the image with the model scaled
    per ring, ``a_r M``, each ring whitened by the noise power per pixel estimated for the batch
    (the power left after the best per-ring fit of the model, ``p_img (1 - FRC^2)``, at the
    current poses and again at the coarse optimum). By Cauchy-Schwarz its expectation is
    largest at the true pose, and it is the maximum-likelihood score for images
    ``X = s a_r M + noise`` with that noise spectrum and a free image scale ``s``. ``a_r`` is
    the per-ring scale of the images to the model (``sum cross / sum |M|^2``) measured at the
    REFINED poses of the batches before (the first batch: 1), so the ring weights ``a_r /
    noise_r`` follow how well the model holds each ring (disorder, a smeared or coarse
    reference), as RELION's local searches weight by the reference's spectral SNR, and not how
    far the input poses are off (measured at the input poses, a pose error damps the high
    rings: on noise-free particles a domain's focused search lost a quarter of its precision).
    So the weights differ from batch to batch (most in the first ones): a particle's
    ``score_before`` and ``score_after`` compare with each other, not across batches.
    Measured against ``a_r = 1`` (before 0.2.0): benchmarks/results/refine_ringscale_*.md.
    ``frc``: the plain mean of the ring FRCs (:meth:`fourier.RingBinner.mean_frc`, e2gmm's
    training loss), unbiased too but noisy: it gives the signal-poor outer rings as much weight
    as the signal-rich inner ones (on simulated box-32 particles at SNR 1 the true pose beats
    one rotated by 4 degrees in 61-75 % of particles with ``frc``, 82-93 % with a
    cross-correlation). A ring mean weighted by the model's ring amplitude was tried and
    rejected: it is biased (its normaliser changes with the view).

Objective (MAP, as RELION's local searches)
    A search over ~100 candidates maximising a noisy score drifts to the edge of the search
    ball, where most candidates are. The search therefore maximises
    ``-n/2 log(1 - score^2) - |delta|^2 / (2 s_a^2) - |d_px|^2 / (2 s_p^2)``: the profile
    log-likelihood of a correlation ``score`` over ``n`` real degrees of freedom (the band's
    Fourier coefficients), with the noise level unknown (``~ n CC^2 / 2`` at low SNR, sharp at
    high SNR), plus a Gaussian prior on the change,
    with ``s_a = max_angle / 3`` per component and ``s_p = max_shift / 3`` (``prior=False``:
    the score alone).

Search (batched over particles and candidates, no loop over particles; :mod:`pose_search`)
    1. Coarse: every ``delta`` on a cubic lattice of step ``max_angle/2`` inside the ball (33
       candidates), scored at low resolution (rings up to 30% of the band's top), and for every
       candidate ALL integer-pixel shifts inside the shift disk at once: the FRC's denominators
       do not depend on the shift, so the score as a function of the shift is one inverse FFT
       of the ring-weighted cross-power spectrum (exact at integer pixels); the peak gets a
       parabolic sub-pixel correction.
    2. ``levels`` fine levels over the full band (step halved each time): the 6 axis
       neighbours of the best rotation and the vertex of the per-axis parabola, each with its
       own best shift.
    3. Shift polish at the final rotation (sub-pixel lattices on a phase ramp), then optionally
       ``polish_steps`` Adam steps on the exact objective (default 0).
    4. The best pose seen is kept only if it beats the current pose in score and in objective
       by at least ``min_gain`` nats (default 5.5: a likelihood-ratio test at 95% for the 5 pose
       parameters, since twice the gain a search finds by fitting noise alone is about
       chi-square(5)); otherwise the current pose is kept unchanged. Without this test every
       particle moves by the pose estimate's own noise even at its true pose (on simulated
       box-32 particles at SNR 10, against the exact model: median 0.73 deg with
       ``min_gain=0``, 0 with 5.5, where 3% of the particles moved; perturbed poses are corrected
       as well as before). The test is calibrated for an exact model only; ``gmmhet refine``
       then checks the whole set against the half maps (:mod:`refine_gate`).
    Candidate projections come from :class:`pose_projector.PoseProjector` (the particle's
    envelopes once per batch, per candidate only phases and one real matrix product, rings
    only up to the band's top); on CUDA when the particles are there. Box 64, 1,393 Gaussians,
    one CPU thread: ~10x the particles/s of the earlier per-call :func:`gmm.project` search at
    the same accuracy (``benchmarks/bench_refine.py``).

Focus mask
    With a mask, only the Gaussians whose (neutral) centres lie inside it are scored: the
    projection of the Gaussians outside it (at the current pose, scaled to the image by least
    squares in the band) is first subtracted from the particle, so the refined pose is the
    masked domain's.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from ..errors import InputError
from ..model.fourier import RingBinner
from ..model.gmm import project

log = logging.getLogger(__name__)

SCORES = ("wcc", "frc")
#: default evidence a new pose needs (nats of the MAP objective over the input pose): under the
#: null hypothesis "the input pose is right", twice the gain of the best of a local search over
#: the 5 pose parameters is ~chi-square(5), whose 95% quantile is 11.07
MIN_GAIN_NATS = 5.5
#: ``gmmhet refine``'s default from the second round on: 0 (the MAP pose). Once the gold-standard
#: check has accepted a round, the poses are known to carry errors the data correct, and the
#: per-particle test (calibrated for an exact model) only holds back the smaller corrections;
#: the check guards the set in every round. Held-back conditions (3,000 particles, SNR 1), 5.5 vs
#: 0 from round 2 on: 1AKE hinge 0.86 vs 0.81 deg (2 nats), independent openings 1.11 vs 1.02,
#: hinge with 1 A thermal fluctuations 1.28 vs 1.18 (results/refine_thermal.md)
LATER_ROUNDS_MIN_GAIN_NATS = 0.0
#: rings whose image-to-model scale is below this fraction of the largest ring's are weighted as if
#: at it (the model does not match the images there: next to no weight, never a negative one)
RING_SCALE_FLOOR = 1e-3
PRIOR_FRACTION = 3.0  # prior sigma (per component) = search range / 3, as RELION's local searches


# ---------------------------------------------------------------------------------------------
# Particle-specific models: rows -> Gaussians
# ---------------------------------------------------------------------------------------------
class ParticleModels(Protocol):
    """Gives each particle row its Gaussians. ``neutral_centers_A`` ``(N, 3)`` (for focus masks)
    and ``median_sigma_A`` (for the default FRC band)."""

    neutral_centers_A: np.ndarray
    median_sigma_A: float

    def gaussians(self, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``centers_A (B, N, 3)``, ``amplitudes (B, N)``, ``sigmas_A (B, N)`` float32 tensors."""


class LatentModels:
    """Each particle's GMM decoded from its latent vector by a trained network
    (:class:`training.trained.TrainedModel`: ``decode(z (B, K)) -> centers_A (B,N,3), amplitudes (B,N),
    sigmas_A (B,N)``, ``neutral``). ``latents`` ``(n_particles, K)``: row ``i`` is particle row
    ``i`` of the particles being refined (never paired by position with another list).

    ``rigid_gauge``: a network trained on particles with pose errors learns to explain them as
    motions of the whole model (on simulated data the decoded models' mean translation
    correlates at 0.9 with the origin errors), which would hide exactly what the refinement
    must find. Each decoded model is therefore brought back onto the neutral one by its robust
    rigid fit (:func:`remove_rigid_motion`), so that only the deformation is kept and the rigid
    part is left to the pose search. Default (None): only when every Gaussian was free in
    training; a model trained with a focus mask keeps the other Gaussians at the neutral model,
    they hold the frame, and its decoded models are used as they are.

    ``gauge_rotation``: also undo the fit's rotation (default False: only its translation). The
    robust fit's rotation of a decoded model mixes the absorbed pose error with the real hinge
    motion, and undoing it rotates the reference away from the particle's true frame: measured
    at SNR 1 without a mask (800 particles, results/refine_defaults_snr1_gate.md), median angular
    error 2.76 -> 2.57 deg with the rotation undone, 2.76 -> 2.17 deg with the translation only
    (shift 0.85 -> 0.27 and 0.26 px, FSC mean vs truth 0.493 and 0.495).
    """

    def __init__(self, model, latents: np.ndarray, rigid_gauge: bool | None = None, gauge_rotation: bool = False):
        self.model = model
        self.latents = np.asarray(latents, dtype=np.float32)
        if rigid_gauge is None:
            mobile = getattr(model, "mobile", None)
            rigid_gauge = mobile is None or len(np.asarray(mobile)) == len(model.neutral)
        self.rigid_gauge = bool(rigid_gauge)
        self.gauge_rotation = bool(gauge_rotation)
        self.neutral_centers_A = model.neutral.centers_A
        self.median_sigma_A = float(np.median(model.neutral.sigmas_A))

    def gaussians(self, rows, device):
        with torch.no_grad():
            c, a, s = self.model.decode(torch.as_tensor(self.latents[np.asarray(rows)]))
        f = dict(device=device, dtype=torch.float32)
        c, a, s = c.detach().to(**f), a.detach().to(**f), s.detach().to(**f)
        if self.rigid_gauge:
            n = self.model.neutral
            c = remove_rigid_motion(c, torch.as_tensor(n.centers_A, **f), torch.as_tensor(n.amplitudes, **f),
                                    rotation=self.gauge_rotation)
        return c, a, s


def remove_rigid_motion(centers_A: torch.Tensor, neutral_A: torch.Tensor, weights: torch.Tensor,
                        iterations: int = 4, rotation: bool = True) -> torch.Tensor:
    """Centres ``(B, N, 3)`` with their robust rigid motion relative to ``neutral_A`` ``(N, 3)``
    undone: iteratively reweighted Kabsch fit ``c ~ R (c0 - m0) + m`` (weights ``weights`` times
    a Cauchy factor ``1 / (1 + (r / r0)^2)`` of each Gaussian's residual, ``r0`` = median
    residual, at least 0.5 A), so that a domain that moves (a minority of the mass) does not
    drag the fit; returns ``R^T (c - m) + m0`` (``rotation=False``: ``c - m + m0``, the robust
    fit's translation undone only)."""
    B = centers_A.shape[0]
    c0 = neutral_A.expand(B, -1, -1)
    w = weights.abs().expand(B, -1).clamp_min(1e-12)
    for _ in range(iterations):
        wn = w / w.sum(1, keepdim=True)
        m0 = (wn[..., None] * c0).sum(1, keepdim=True)
        m = (wn[..., None] * centers_A).sum(1, keepdim=True)
        H = torch.einsum("bn,bni,bnj->bij", wn, c0 - m0, centers_A - m)  # (B, 3, 3)
        U, _, Vh = torch.linalg.svd(H.double())
        d = torch.sign(torch.linalg.det(Vh.transpose(1, 2) @ U.transpose(1, 2)))
        D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
        R = (Vh.transpose(1, 2) @ D @ U.transpose(1, 2)).to(centers_A.dtype)  # c - m ~ R (c0 - m0)
        r = (centers_A - m - torch.einsum("bij,bnj->bni", R, c0 - m0)).norm(dim=-1)  # (B, N)
        r0 = r.median(dim=1, keepdim=True).values.clamp_min(0.5)
        w = weights.abs().expand(B, -1) / (1.0 + (r / r0) ** 2)
    if not rotation:
        return centers_A - m + m0
    return torch.einsum("bji,bnj->bni", R, centers_A - m) + m0


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------
def rotvec_to_matrix(v_deg: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``(..., 3)`` in degrees -> matrices ``(..., 3, 3)`` (``exp`` of the skew
    matrix; right-handed rotation by ``|v|`` about ``v``). Differentiable."""
    v = v_deg * (math.pi / 180.0)
    z = torch.zeros_like(v[..., 0])
    K = torch.stack([torch.stack([z, -v[..., 2], v[..., 1]], -1),
                     torch.stack([v[..., 2], z, -v[..., 0]], -1),
                     torch.stack([-v[..., 1], v[..., 0], z], -1)], -2)
    return torch.linalg.matrix_exp(K)


def coarse_rotation_grid(max_angle_deg: float, radius_steps: int = 2) -> torch.Tensor:
    """Rotation vectors (degrees) on a cubic lattice of step ``max_angle/radius_steps`` inside
    the ball of radius ``max_angle`` (33 vectors for ``radius_steps=2``), the zero vector first."""
    r = radius_steps
    g = torch.arange(-r, r + 1, dtype=torch.float32)
    pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    pts = pts[(pts * pts).sum(1) <= r * r + 1e-6]
    pts = pts[torch.argsort((pts * pts).sum(1), stable=True)]
    return pts * (max_angle_deg / r)


def _clamp_norm(v: torch.Tensor, limit: float) -> torch.Tensor:
    n = v.norm(dim=-1, keepdim=True)
    return v * torch.clamp(limit / n.clamp_min(1e-12), max=1.0)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
class _Scorer:
    """Band-limited FRC scores of model projections against a batch of particle transforms."""

    def __init__(self, box: int, apix: float, lowres_A, highres_A, max_shift_A: float, device,
                 score: str = "wcc"):
        if score not in SCORES:
            raise InputError(f"--score {score}: unknown; use one of {', '.join(SCORES)}")
        self.box, self.apix, self.device, self.score = box, apix, torch.device(device), score
        self.binner = RingBinner(box, apix, lowres_A, highres_A, device=self.device)
        W = box // 2 + 1
        self.ring_of_band = self.binner.onehot.argmax(1)  # ring of each band pixel
        self.n_ring = self.binner.onehot.sum(0)  # band pixels per ring (R,)
        self.n_pix = float(self.n_ring.sum())
        self.inv_noise = None  # (1, R) set per batch by set_noise (wcc)
        self.ring_scale = None  # (1, R) per-ring scale of the images to the model at refined poses (wcc)
        self._scale_sums = None  # its numerator and denominator, summed over the batches so far
        # columns kx = 0 (and Nyquist for even box) count once in irfft2: double them (module doc)
        dbl = torch.ones(W, device=self.device)
        dbl[0] = 2.0
        if box % 2 == 0:
            dbl[-1] = 2.0
        self.col_weight = dbl
        self._band_col_weight = None
        # integer shifts d (pixels) inside the disk, as indices into the irfft2 output
        r = int(math.floor(max_shift_A / apix + 1e-6))
        r = min(r, box // 2 - 2)
        g = torch.arange(-r, r + 1, device=self.device) if r >= 0 else torch.zeros(1, dtype=torch.long, device=self.device)
        dy, dx = torch.meshgrid(g, g, indexing="ij")
        keep = (dx * dx + dy * dy) * apix * apix <= max_shift_A ** 2 + 1e-6
        self.shift_dx, self.shift_dy = dx[keep], dy[keep]  # (S,)
        self.max_shift_px = max_shift_A / apix

    def ring_coeffs(self, p_img: torch.Tensor, p_mod: torch.Tensor) -> torch.Tensor:
        """``c`` ``(P, R)`` with score ``= sum_r c_r * cross_r`` (``cross_r = Re sum_ring P conj(I)``),
        from the image's and the model's ring powers; neither depends on the shift."""
        if self.score == "frc":
            return 1.0 / (p_img.shape[1] * torch.sqrt(p_img * p_mod + 1e-30))
        # whitened cross-correlation of the image with the ring-scaled model ``a_r M``, with the
        # batch's noise power per pixel of each ring
        inv_nu = self.inv_noise if self.inv_noise is not None else self.n_ring / p_img.mean(0).clamp_min(1e-30)
        a = self.ring_scale if self.ring_scale is not None else torch.ones_like(inv_nu)
        norm = torch.sqrt((p_img * inv_nu).sum(1, keepdim=True) * (p_mod * (a * a * inv_nu)).sum(1, keepdim=True))
        return a * inv_nu / norm.clamp_min(1e-30)

    def set_noise(self, p_img: torch.Tensor, cross: torch.Tensor, p_mod: torch.Tensor) -> None:
        """Estimate the noise power per pixel of each ring from a batch at the current poses: the
        power left after the best per-ring fit of the model, ``p_img (1 - FRC^2)``, averaged over
        the batch (its shape is what whitening needs; a per-particle noise scale cancels)."""
        frc = (cross / torch.sqrt(p_img * p_mod).clamp_min(1e-30)).clamp(0.0, 1.0)
        resid = (p_img * (1.0 - frc * frc)).clamp_min(0.02 * p_img)  # (B, R)
        nu = (resid / self.n_ring).mean(0)
        self.inv_noise = (1.0 / torch.maximum(nu, 1e-6 * nu.max() + 1e-30))[None, :]  # no host sync

    def add_ring_scale(self, cross: torch.Tensor, p_mod: torch.Tensor) -> None:
        """Add a batch's fit at its REFINED poses (the poses the search returns: the new pose where
        it was accepted, else the input pose; ring sums ``(B, R)``) to the per-ring scale of the
        images to the model, ``a_r = sum cross_r / sum p_mod_r`` over the batches so far, which
        weights the rings of the batches after it (module docstring, Score): measured at refined
        poses it says how well the model holds each ring, not how far the input poses are off.
        Rings where the model does not match the images (``a_r <= 0``) get ~0 weight."""
        sums = torch.stack([cross.sum(0), p_mod.sum(0)])
        self._scale_sums = sums if self._scale_sums is None else self._scale_sums + sums
        a = self._scale_sums[0] / self._scale_sums[1].clamp_min(1e-30)
        a_max = a.max()
        # no ring with a positive scale (inverted contrast, a wrong template): no weighting (a_r = 1)
        self.ring_scale = torch.where(a_max > 0, torch.maximum(a, RING_SCALE_FLOOR * a_max),
                                      torch.ones_like(a))[None, :]  # no host sync

    def reset_ring_scale(self) -> None:
        """Forget the ring scale (``a_r`` = 1 again, as before the first batch)."""
        self.ring_scale, self._scale_sums = None, None

    def frc(self, Fimg: torch.Tensor, Fmod: torch.Tensor) -> torch.Tensor:
        """The score ``(B,)`` of model transforms against image transforms."""
        return self.frc_band(self.binner.gather(Fimg), self.binner.gather(Fmod))

    def frc_band(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """:meth:`frc` of band coefficients ``(B, P)`` (:meth:`RingBinner.gather`)."""
        b = self.binner
        cross = b.ring_sums((m * a.conj()).real)
        p1 = b.ring_sums(a.real ** 2 + a.imag ** 2)
        p2 = b.ring_sums(m.real ** 2 + m.imag ** 2)
        return (self.ring_coeffs(p1, p2) * cross).sum(1)

    def image_power(self, Fimg: torch.Tensor) -> torch.Tensor:
        """Ring powers ``(B, R)`` of image transforms (the shift-independent FRC denominators)."""
        a = self.binner.gather(Fimg)
        return self.binner.ring_sums(a.real ** 2 + a.imag ** 2)

    def shift_scores(self, Fimg: torch.Tensor, p_img: torch.Tensor, Fmod: torch.Tensor):
        """Best integer+sub-pixel shift (pixels, ``(P, 2)`` as dx, dy) of each model transform
        ``Fmod`` ``(P, H, W)`` against its image transform ``Fimg`` (ring powers ``p_img``), and
        the band-mean FRC there ``(P,)``."""
        return self.shift_scores_band(self.binner.gather(Fimg), p_img, self.binner.gather(Fmod))

    def shift_scores_band(self, a: torch.Tensor, p_img: torch.Tensor, m: torch.Tensor):
        """:meth:`shift_scores` of band coefficients ``(P, n_band)``."""
        b = self.binner
        p2 = b.ring_sums(m.real ** 2 + m.imag ** 2)
        w_ring = self.ring_coeffs(p_img, p2)  # (P, R)
        if self._band_col_weight is None:
            self._band_col_weight = self.col_weight.expand(self.box, -1).reshape(-1)[b.flat_index]
        g = (w_ring[:, self.ring_of_band] * self._band_col_weight) * (m * a.conj())
        D, W = self.box, self.box // 2 + 1
        G = torch.zeros(m.shape[0], D * W, dtype=g.dtype, device=g.device)
        G[:, b.flat_index] = g
        # score(d) = Re sum_half conj(I) P exp(+2 pi i k.d) w = D^2/2 irfft2(conj(I) P w')[d]
        cc = torch.fft.irfft2(G.reshape(-1, D, W), s=(D, D)) * (D * D / 2.0)  # (P, D, D)
        vals = cc[:, self.shift_dy % D, self.shift_dx % D]  # (P, S)
        best, k = vals.max(dim=1)
        dx, dy = self.shift_dx[k], self.shift_dy[k]
        P = torch.arange(cc.shape[0], device=cc.device)

        def sub(c_minus, c0, c_plus):
            """Parabola through three samples: vertex offset (clamped to +-0.5) and value gain."""
            den = c_minus - 2.0 * c0 + c_plus
            ok = den < 0
            off = torch.where(ok, 0.5 * (c_minus - c_plus) / den.clamp(max=-1e-12), torch.zeros_like(den))
            off = off.clamp(-0.5, 0.5)
            gain = torch.where(ok, 0.5 * (c_plus - c_minus) * off + 0.5 * den * off * off, torch.zeros_like(den))
            return off, gain.clamp_min(0.0)

        ox, gx = sub(cc[P, dy % D, (dx - 1) % D], best, cc[P, dy % D, (dx + 1) % D])
        oy, gy = sub(cc[P, (dy - 1) % D, dx % D], best, cc[P, (dy + 1) % D, dx % D])
        best = best + gx + gy
        shift = torch.stack([dx + ox, dy + oy], dim=1).to(m.real.dtype)
        shift = _clamp_norm(shift, self.max_shift_px)
        return shift, best


# ------------------------------------------------------------------------- The refinement
@dataclass
class RefineResult:
    """Refined poses and their changes, keyed by particle row (index into the inputs)."""

    rotations: np.ndarray        # (n, 3, 3) RELION matrices
    origins_A: np.ndarray        # (n, 2) RELION origins, Angstrom
    delta_rotvec_deg: np.ndarray  # (n, 3) A_new = R(delta) @ A_cur
    delta_angle_deg: np.ndarray  # (n,) |delta|
    delta_shift_A: np.ndarray    # (n,) |origin_new - origin_cur|
    score_before: np.ndarray     # (n,) score (wcc or frc) at the input pose
    score_after: np.ndarray      # (n,) at the output pose (>= score_before)
    gate_fsc_input: float = float("nan")    # mean half-map FSC with the input poses (refine_gate)
    gate_fsc_refined: float = float("nan")  # ... with the refined poses
    gate_kept_input: bool = False            # the gold-standard check kept every input pose
    gate_t: float = float("nan")             # its shell-wise t statistic of the FSC gain
    gate_t_min: float = float("nan")         # ... and the value it had to reach
    frame_drift_deg: float = 0.0             # object-frame rotation removed (keep_input_frame)
    below_precision: bool = False            # a first round's median change below the search's precision:
    #                                          every input pose kept (commands.refine.below_precision)


def unchanged_result(res: RefineResult, rotations: np.ndarray, origins_A: np.ndarray, gate=None) -> RefineResult:
    """``res`` with every particle back at its input pose (``rotations`` ``(n, 3, 3)``, RELION
    ``origins_A`` ``(n, 2)``): the gold-standard check of :mod:`refine_gate` (``gate``, its
    :class:`refine_gate.GateResult`) rejected the refined poses."""
    n = len(res.delta_angle_deg)
    return RefineResult(np.array(rotations, dtype=np.float64), np.array(origins_A, dtype=np.float64),
                        np.zeros((n, 3)), np.zeros(n), np.zeros(n), res.score_before,
                        np.array(res.score_before, copy=True),
                        float("nan") if gate is None else gate.fsc_input,
                        float("nan") if gate is None else gate.fsc_refined, True,
                        float(getattr(gate, "t", float("nan"))), float(getattr(gate, "t_min", float("nan"))))


#: fewest moved particles from which :func:`keep_input_frame` estimates a frame drift
FRAME_MIN_MOVED = 50


def keep_input_frame(res: RefineResult, rotations_in: np.ndarray,
                     min_moved: int = FRAME_MIN_MOVED) -> tuple[RefineResult, float]:
    """``res`` with the refined poses brought back into the input poses' object frame.

    One rotation of every particle's object frame (``A -> A G``, RELION matrices) leaves the
    images' agreement with a reference and the half maps' FSC unchanged: the data cannot see it,
    and a reference whose frame is turned (a finer reference built from a reconstruction and
    deformed by the decoded motion, a decoded model that absorbed a rotation) pulls the refined
    poses into its frame. The input poses' errors have no common rotation, so the mean object-frame
    change ``G`` of the moved particles (``A_new = A_in G_i``; chordal mean) is that drift; it is
    removed from the moved particles (``A_new G^T``), unmoved ones keep their input pose. Measured
    on 1AKE with the LID turning a full circle (3,000 particles, SNR 1): round 2 turned the frame by
    1.03 deg, median error 1.70 deg of which 1.34 without the turn. Removed only when the mean
    change's rotation vector is significant against its standard error (chi-square, 3 degrees
    of freedom, at 0.1%: the mean of few or scattered moves is noise) and at least ``min_moved``
    particles moved; a particle's change can then exceed the search range by the removed turn.
    Scores stay those of the search. Returns (result, removed rotation in degrees)."""
    from scipy.spatial.transform import Rotation
    from scipy.stats import chi2

    moved = np.asarray(res.delta_angle_deg) > 0
    n_moved = int(moved.sum())
    if n_moved < max(int(min_moved), 3):
        return res, 0.0
    A_in = np.asarray(rotations_in, dtype=np.float64)
    A_new = np.array(res.rotations, dtype=np.float64)
    change = Rotation.from_matrix(np.einsum("nji,njk->nik", A_in[moved], A_new[moved]))  # A_in^T A_new
    v = change.as_rotvec()
    se = v.std(axis=0, ddof=1) / math.sqrt(n_moved)
    if float(np.sum((v.mean(axis=0) / np.maximum(se, 1e-12)) ** 2)) < chi2.ppf(0.999, 3):
        return res, 0.0
    drift = change.mean()
    A_new[moved] = A_new[moved] @ drift.as_matrix().T
    delta = np.zeros((len(A_new), 3))
    delta[moved] = Rotation.from_matrix(np.einsum("nij,nkj->nik", A_new[moved], A_in[moved])).as_rotvec(degrees=True)
    angle = np.linalg.norm(delta, axis=1)
    return dataclasses.replace(res, rotations=A_new, delta_rotvec_deg=delta, delta_angle_deg=angle), \
        float(drift.magnitude() * 180.0 / math.pi)


def search_limits(models, apix: float, device: torch.device, highres_A: float | None = None,
                  max_elements: int | None = None) -> tuple[float, int]:
    """The pose search's defaults: ``highres_A`` where the median Gaussian's transform falls to 1%
    (2.07 sigma, Angstrom), at least Nyquist; ``max_elements`` per scoring chunk (2^27 on CUDA,
    2^21 on the CPU). Given values are kept."""
    if highres_A is None:
        sig = getattr(models, "median_sigma_A", None)
        highres_A = max(2.0 * apix, 2.07 * sig) if sig else 2.0 * apix
    if max_elements is None:
        max_elements = (1 << 27) if device.type == "cuda" else (1 << 21)
    return float(highres_A), int(max_elements)


def refine_poses(particles, models: ParticleModels, *, max_angle_deg: float = 6.0,
                 max_shift_A: float | None = None, lowres_A: float | None = None, highres_A: float | None = None,
                 levels: int = 3, polish_steps: int = 0, focus: np.ndarray | None = None,
                 score: str = "wcc", prior: bool = True, batch_size: int = 64, max_elements: int | None = None,
                 min_gain: float = MIN_GAIN_NATS, coarse_fraction: float | None = None,
                 progress: Callable[[int, int], None] | None = None) -> RefineResult:
    """Refine every particle's pose locally (see the module docstring).

    ``particles``: :class:`io.data.Particles` without symmetry expansion (images, current
    RELION rotations and origins, CTF in its ``ctf_mode``; its device is used);
    ``models.gaussians(rows)`` the particle-specific GMMs. ``max_angle_deg``: radius of the
    rotation search (degrees); ``max_shift_A``: radius of the shift search (Angstrom, default
    2 pixels); ``lowres_A``/``highres_A``: FRC band (default: ring 1 to the resolution where
    the median Gaussian's transform falls to 1%); ``levels``: finer rotation lattices after the
    coarse one; ``polish_steps``: Adam steps on the exact score; ``focus``: Gaussians (bool
    mask or indices) to score with a focus mask, None for all. ``min_gain``: nats of objective
    a new pose must gain over the input pose (module docstring, step 4). ``max_elements`` bounds the
    projection batch's intermediate size (floats; default 2^21 on CPU, cache-sized, 2^27 on CUDA).
    ``coarse_fraction``: top ring of the coarse stage as a fraction of the band's (default 0.3).
    """
    n_ops = getattr(particles, "n_ops", 1)
    if n_ops != 1:
        raise ValueError("refine_poses: give particles without symmetry expansion")
    n = int(particles.n_particles)
    box, apix, device = particles.box, particles.apix, particles.device
    if n < 1:
        raise InputError("particles: the set is empty; give at least one particle")
    if not max_angle_deg >= 0:
        raise InputError(f"--max-angle: {max_angle_deg} is not >= 0; give a range in degrees, e.g. 6")
    if max_shift_A is None:
        max_shift_A = 2.0 * apix
    if not max_shift_A >= 0:
        raise InputError(f"--max-shift: {max_shift_A} is not >= 0; give a range in Angstrom, e.g. {2 * apix:g}")
    if focus is not None:
        focus = selection_mask(focus, len(models.neutral_centers_A))
        if not focus.any():
            raise InputError("--mask: the focus mask selects no Gaussian; give a mask covering part of the model")
        focus = torch.as_tensor(focus, device=device)
    layers = projection_layers(models, focus)
    highres_A, max_elements = search_limits(models, apix, device, highres_A, max_elements)
    scorer = _Scorer(box, apix, lowres_A, highres_A, max_shift_A, device, score)
    scorer_lo = _coarse_scorer(scorer, lowres_A, max_shift_A, coarse_fraction)
    prior_deg = max(max_angle_deg, 1e-3) / PRIOR_FRACTION if prior else None
    prior_px = max(max_shift_A / apix, 1e-3) / PRIOR_FRACTION
    log.info("refine: %d particles, rotation range %.2f deg, shift range %.2f A, score %s over %s-%.1f A",
             n, max_angle_deg, max_shift_A, score, "%.1f" % lowres_A if lowres_A else "inf", highres_A)
    rot_all = particles.rotations.detach().cpu().double().numpy()
    org_all = particles.origins_A.detach().cpu().double().numpy()
    out_rot, out_org = rot_all.copy(), org_all.copy()
    out_vec = np.zeros((n, 3))
    s_before, s_after = np.zeros(n), np.zeros(n)
    t0 = last = time.time()
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        vec, dshift_A, sb, sa = _refine_batch(particles, rows, models, scorer, scorer_lo, max_angle_deg, levels,
                                              polish_steps, focus, max_elements, prior_deg, prior_px, min_gain,
                                              layers)
        R = rotvec_to_matrix(torch.as_tensor(vec, dtype=torch.float64)).numpy()
        out_rot[rows] = R @ rot_all[rows]
        out_org[rows] = org_all[rows] + dshift_A
        out_vec[rows], s_before[rows], s_after[rows] = vec, sb, sa
        if progress is not None:
            progress(int(rows[-1]) + 1, n)
        if time.time() - last > 10 or rows[-1] + 1 == n:
            el = time.time() - t0
            done = int(rows[-1]) + 1
            log.info("refine: %d / %d particles (%.1f /s, ETA %.0f s)", done, n, done / el, (n - done) * el / done)
            last = time.time()
    return RefineResult(out_rot, out_org, out_vec, np.linalg.norm(out_vec, axis=1),
                        np.linalg.norm(out_org - org_all, axis=1), s_before, s_after)


def _coarse_scorer(scorer, lowres_A, max_shift_A, coarse_fraction):
    """The coarse stage's scorer: rings up to ``coarse_fraction`` of the band's top ring, at
    least ``COARSE_MIN_RINGS`` rings (None when that is the whole band or the fraction is >= 1:
    the coarse stage then uses the full band)."""
    from .pose_search import COARSE_FRACTION, COARSE_MIN_RINGS
    f = COARSE_FRACTION if coarse_fraction is None else coarse_fraction
    b = scorer.binner
    top = max(int(round(f * b.hi)), b.lo + COARSE_MIN_RINGS - 1)
    if f >= 1 or top >= b.hi:
        return None
    return _Scorer(scorer.box, scorer.apix, lowres_A, scorer.box * scorer.apix / (top + 0.25), max_shift_A,
                   scorer.device, scorer.score)


def selection_mask(selection, n: int) -> np.ndarray:
    """Boolean mask ``(n,)`` of Gaussians from indices or a boolean array (a focus)."""
    selection = np.asarray(selection)
    if selection.dtype == bool:
        return selection
    out = np.zeros(n, dtype=bool)
    out[selection] = True
    return out


def projection_layers(models, focus: torch.Tensor | None) -> tuple[int, int, float] | None:
    """The layout of a layered reference's Gaussians (``models.layers()``,
    :meth:`fine_reference.WarpedModels.layers`) among the scored ones (``focus``: a boolean
    selection that keeps a fine Gaussian and its low-passed copy together), or None."""
    layout = models.layers() if hasattr(models, "layers") else None
    if layout is None or focus is None:
        return layout
    n_low, n_fine, tau = layout
    f = focus.detach().cpu()
    if not torch.equal(f[n_low:n_low + n_fine], f[n_low + n_fine:]):
        return None  # not paired: project every Gaussian
    return int(f[:n_low].sum()), int(f[n_low:n_low + n_fine].sum()), tau


def _refine_batch(particles, rows, models, scorer, scorer_lo, max_angle, levels, polish_steps, focus,
                  max_elements, prior_deg, prior_px, min_gain: float = MIN_GAIN_NATS, layers=None):
    """One batch: the focus subtraction, then :func:`pose_search.search_batch` (numpy results)."""
    from .pose_search import search_batch
    device, box, apix = particles.device, particles.box, particles.apix
    b = particles.batch(rows)
    Fimg, A0, o0, C = b.F_img, b.rotations, b.origins_A, b.ctf
    cen, amp, sig = (t.float() for t in models.gaussians(rows, device))
    with torch.no_grad():
        if focus is not None:
            # subtract the unmasked Gaussians' projection, scaled to the image by least squares
            full = project(cen, amp, sig, A0, box, apix, o0, C)
            rest = project(cen[:, ~focus], amp[:, ~focus], sig[:, ~focus], A0, box, apix, o0, C)
            g = scorer.binner
            a, f = g.gather(Fimg), g.gather(full)
            scale = (a * f.conj()).real.sum(1) / (f.real ** 2 + f.imag ** 2).sum(1).clamp_min(1e-20)
            Fimg = Fimg - scale[:, None, None] * rest
            cen, amp, sig = cen[:, focus], amp[:, focus], sig[:, focus]
        y = torch.einsum("bij,bnj->bni", A0.float(), cen)  # Gaussians in the current view frame (B, N, 3)
    grid = coarse_rotation_grid(max_angle) if max_angle > 0 else torch.zeros(1, 3)
    vec, shift_px, sb, sa = search_batch(Fimg, y, amp, sig, o0.float(), C, scorer, scorer_lo, max_angle=max_angle,
                                         levels=levels, polish_steps=polish_steps, max_elements=max_elements,
                                         prior_deg=prior_deg, prior_px=prior_px, min_gain=min_gain,
                                         rotvec_to_matrix=rotvec_to_matrix, coarse_grid=grid,
                                         repeat_first=focus is not None, layers=layers)
    return (vec.double().cpu().numpy(), (shift_px * apix).double().cpu().numpy(), sb.double().cpu().numpy(),
            sa.double().cpu().numpy())
