"""Local refinement of one domain per particle (e2gmm's focused / heterogeneous refinement).

A flexible domain is blurred in a consensus map because it sits at a different orientation in
every particle. Here each particle gets a *domain pose*: the RELION pose (``A_dom``,
``origin_dom``) under which the neutral model's domain projects onto where that particle's
domain is. The particles with the rest of the model subtracted (:class:`DomainSignalImages`,
RELION's signal subtraction), reconstructed with the domain poses, give a map of the domain in
the neutral model's frame, read under the domain's mask.

Steps, batched over particles (no loop over particles; on the particles' device)
    1. Domain: the Gaussians whose neutral centres lie in ``--domain-mask`` (> 0.5), or, without
       a mask, the connected group the decoder moves most (:func:`domain_from_motion`).
    2. Decoded start: each particle's decoded domain is fitted rigidly to the neutral domain
       (weighted Kabsch, ``c_dec ~ Q c0 + t``), so the start pose is ``A_dom = A Q``,
       ``origin_dom = origin - (A t)_xy`` (``A`` the particle's RELION matrix, origins in
       Angstrom): the motion the network learnt, composed with the particle pose.
    3. Local search (:func:`pose_search.search_batch`, the pose refinement's batched lattice
       search, MAP objective and acceptance test): the particle minus the projection of its
       decoded rest (the Gaussians outside the domain at the particle pose, CTF applied, scaled
       by :func:`rest_scale`) against the projection of the NEUTRAL domain (the neutral model's
       centres, amplitudes and widths). Rotations ``R(delta)`` are about the domain's centre
       ``g`` (mass-weighted centroid of its neutral Gaussians), so a rotation does not displace
       the domain; as a RELION pose ``A_new = R A_dom``, ``origin_new = origin_dom + d +
       ((R - I) A_dom g)_xy`` (``d`` the shift found). The score weights each ring by the
       images' scale to the template measured at the poses of the batches before (0.2.0;
       :mod:`refine`, Score): on the same networks the LID's domain-masked FSC 0.7807 -> 0.7821,
       the simulator's arm 0.5317 -> 0.5287 (results/refine_domain_*_ringscale*.md).

Measured (``benchmarks/bench_refine_domain.py``, simulator's hinged arm, 1000 particles at SNR 1,
network trained without a mask, arm mask): the arm's median projected error 5.82 A with the
particle poses, 2.67 A from the decoded start alone, 1.46 A from the search alone (12 deg from
the particle pose), 1.37 A with both (2.08 A with each particle's decoded amplitudes as the
template instead of the neutral ones).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..model.gmm import project
from .refine import (MIN_GAIN_NATS, PRIOR_FRACTION, _coarse_scorer, _Scorer, coarse_rotation_grid, rotvec_to_matrix,
                     search_limits)

log = logging.getLogger(__name__)


@dataclass
class DomainResult:
    """Domain poses per particle row (RELION matrices / origins in Angstrom)."""

    rotations: np.ndarray         # (n, 3, 3) final domain poses
    origins_A: np.ndarray         # (n, 2)
    start_rotations: np.ndarray   # (n, 3, 3) decoded start (particle pose composed with the decoded motion)
    start_origins_A: np.ndarray   # (n, 2)
    delta_angle_deg: np.ndarray   # (n,) search change from the decoded start (about the domain centre)
    delta_shift_A: np.ndarray     # (n,) search shift of the domain centre's projection
    decoded_angle_deg: np.ndarray  # (n,) rotation of the decoded domain relative to the neutral one
    score_before: np.ndarray      # (n,) at the decoded start
    score_after: np.ndarray       # (n,)
    domain: np.ndarray            # (N,) bool: the domain's Gaussians


MIN_DOMAIN_MOTION_A = 1.0  # the automatic domain's seeds move at least this much (RMS, Angstrom)
MIN_DOMAIN_GAUSSIANS = 6   # fewer Gaussians do not define a domain's rigid motion
GROW_FRACTION = 0.25       # the domain grows through Gaussians moving at least this fraction of the seeds' median


def domain_from_motion(models, n_sample: int = 1024, device="cpu", min_motion_A: float = MIN_DOMAIN_MOTION_A,
                       grow_k: float = 1.0, link_spacings: float = 1.25) -> np.ndarray:
    """The domain the decoder moves, as a bool mask ``(N,)``, by hysteresis on each Gaussian's
    RMS motion across the latent space (:func:`rigid_core.gaussian_motion_A`, after each
    decoded model's affine fit is removed): seeds move more than the rigid core's bound
    (``median + 3 x 1.4826 MAD``) and at least ``min_motion_A``; the domain grows from them
    through neighbouring Gaussians (neutral centres within ``link_spacings`` times the 90th
    percentile of the nearest-neighbour distances) that move more than ``median + grow_k x
    1.4826 MAD`` and than ``GROW_FRACTION`` of the seeds' median motion (a hinged domain moves
    less near its hinge). Of the connected groups holding a seed (on adenylate kinase's hinge
    data LID and NMP are two), the one with the largest summed motion is the domain. InputError when nothing moves or the group is smaller
    than ``MIN_DOMAIN_GAUSSIANS``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    from .rigid_core import CORE_K, gaussian_motion_A
    motion = gaussian_motion_A(models, n_sample, device)
    med = float(np.median(motion))
    mad = float(np.median(np.abs(motion - med))) * 1.4826
    seed = (motion > med + CORE_K * mad) & (motion >= min_motion_A)
    if not seed.any():
        raise InputError(f"the decoded models show no moving domain (no Gaussian moves {min_motion_A:g} A across "
                         f"the latent space beyond the rest; largest motion {float(motion.max()):.2f} A); give "
                         "--domain-mask MASK.mrc")
    grow = seed | (motion > max(med + grow_k * mad, GROW_FRACTION * float(np.median(motion[seed]))))
    idx = np.flatnonzero(grow)
    c_all = np.asarray(models.neutral_centers_A, dtype=np.float64)
    nn = cKDTree(c_all).query(c_all, k=2)[0][:, 1]
    pairs = cKDTree(c_all[idx]).query_pairs(link_spacings * float(np.percentile(nn, 90)), output_type="ndarray")
    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(idx), len(idx)))
    _, lab = connected_components(adj, directed=False)
    score = np.bincount(lab, weights=motion[idx]) * (np.bincount(lab, weights=seed[idx].astype(float)) > 0)
    dom = np.zeros(len(motion), dtype=bool)
    dom[idx[lab == int(np.argmax(score))]] = True
    if dom.sum() < MIN_DOMAIN_GAUSSIANS:
        raise InputError(f"the decoded models' moving group has {int(dom.sum())} Gaussian(s) (fewer than "
                         f"{MIN_DOMAIN_GAUSSIANS}: no rigid domain); give --domain-mask MASK.mrc")
    log.info("refine-domain: automatic domain: %d of %d Gaussians (RMS motion across the latent space %.2f-%.2f A; "
             "median of all %.2f A)", int(dom.sum()), len(dom), float(motion[dom].min()), float(motion[dom].max()), med)
    return dom


def fit_domain_motion(cen: torch.Tensor, c0: torch.Tensor, w: torch.Tensor):
    """Weighted Kabsch fit ``cen ~ Q c0 + t`` of decoded domain centres ``(B, n, 3)`` to the
    neutral ones ``(n, 3)`` (weights ``(n,)``, e.g. amplitudes): ``Q`` ``(B, 3, 3)``, ``t`` ``(B, 3)`` A."""
    wn = (w.abs() / w.abs().sum().clamp_min(1e-20)).to(cen.dtype)
    m0 = (wn[:, None] * c0).sum(0)
    m = (wn[None, :, None] * cen).sum(1)
    H = torch.einsum("n,ni,bnj->bij", wn, c0 - m0, cen - m[:, None])
    U, _, Vh = torch.linalg.svd(H.double())
    d = torch.sign(torch.linalg.det(Vh.transpose(1, 2) @ U.transpose(1, 2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    Q = (Vh.transpose(1, 2) @ D @ U.transpose(1, 2)).to(cen.dtype)
    return Q, m - torch.einsum("bij,j->bi", Q, m0)


def _angle_deg(R: torch.Tensor) -> torch.Tensor:
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.rad2deg(torch.arccos(((tr - 1.0) / 2.0).clamp(-1.0, 1.0)))


def refine_domain(particles, models, domain, *, max_angle_deg: float = 6.0, max_shift_A: float | None = None,
                  lowres_A: float | None = None, highres_A: float | None = None, levels: int = 3,
                  score: str = "wcc", batch_size: int = 64, min_gain: float = MIN_GAIN_NATS,
                  max_elements: int | None = None, decoded_start: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> DomainResult:
    """Domain poses of every particle (module docstring). ``particles``: :class:`io.data.Particles`
    (no symmetry expansion) at their particle poses; ``models``: :class:`refine.ParticleModels`
    (e.g. :class:`refine.LatentModels`); ``domain``: bool mask or indices of the domain's
    Gaussians. Ranges, band, score, ``min_gain`` as :func:`refine.refine_poses` (rotations
    about the domain centre). ``decoded_start``: start from the decoded domain motion (step 2;
    False: from the particle pose)."""
    if getattr(particles, "n_ops", 1) != 1:
        raise ValueError("refine_domain: give particles without symmetry expansion")
    n, box, apix, device = int(particles.n_particles), particles.box, particles.apix, particles.device
    c0_all = np.asarray(models.neutral_centers_A, dtype=np.float32)
    domain = np.asarray(domain)
    dom = domain.copy() if domain.dtype == bool else np.isin(np.arange(len(c0_all)), domain)
    if dom.sum() < MIN_DOMAIN_GAUSSIANS or dom.all():
        raise InputError(f"domain: selects {int(dom.sum())} of {len(dom)} Gaussians; give a mask over part of "
                         f"the model (one domain, at least {MIN_DOMAIN_GAUSSIANS} Gaussians)")
    max_shift_A = 2.0 * apix if max_shift_A is None else float(max_shift_A)
    if not (max_angle_deg >= 0 and max_shift_A >= 0):
        raise InputError("--max-angle/--max-shift: give ranges >= 0 (degrees, Angstrom)")
    highres_A, max_elements = search_limits(models, apix, device, highres_A, max_elements)
    scorer = _Scorer(box, apix, lowres_A, highres_A, max_shift_A, device, score)
    scorer_lo = _coarse_scorer(scorer, lowres_A, max_shift_A, None)
    prior = (max(max_angle_deg, 1e-3) / PRIOR_FRACTION, max(max_shift_A / apix, 1e-3) / PRIOR_FRACTION)
    grid = coarse_rotation_grid(max_angle_deg) if max_angle_deg > 0 else torch.zeros(1, 3)
    neutral = getattr(getattr(models, "model", None), "neutral", None)  # the template's amplitudes and widths
    tmpl = None if neutral is None else tuple(torch.as_tensor(np.asarray(v, dtype=np.float32)[dom], device=device)
                                              for v in (neutral.amplitudes, neutral.sigmas_A))
    w = tmpl[0] if tmpl is not None else torch.ones(int(dom.sum()), device=device)  # weights of the fit and centre
    ctx = dict(dom=torch.as_tensor(dom, device=device), c0=torch.as_tensor(c0_all[dom], device=device), tmpl=tmpl, w=w,
               scorer=scorer, scorer_lo=scorer_lo, max_angle=max_angle_deg, levels=levels, prior=prior,
               min_gain=min_gain, max_elements=max_elements, grid=grid, decoded_start=decoded_start)
    out = {k: [] for k in ("R", "o", "R0", "o0", "dang", "dsh", "dec", "sb", "sa")}
    t0 = time.time()
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        for k, v in _domain_batch(particles, rows, models, ctx).items():
            out[k].append(v)
        if progress is not None:
            progress(int(rows[-1]) + 1, n)
    log.info("refine-domain: %d particles, %d domain Gaussians, %.1f particles/s", n, int(dom.sum()),
             n / max(1e-9, time.time() - t0))
    cat = {k: np.concatenate(v) for k, v in out.items()}
    return DomainResult(cat["R"], cat["o"], cat["R0"], cat["o0"], cat["dang"], cat["dsh"], cat["dec"], cat["sb"],
                        cat["sa"], dom)


def _domain_batch(particles, rows, models, ctx) -> dict:
    """One batch of :func:`refine_domain` (numpy results by key)."""
    from .pose_search import search_batch
    box, apix, device = particles.box, particles.apix, particles.device
    b = particles.batch(rows)
    Fimg, A0, o0, C = b.F_img, b.rotations.float(), b.origins_A.float(), b.ctf
    cen, amp, sig = (t.float() for t in models.gaussians(rows, device))
    dom, c0 = ctx["dom"], ctx["c0"]
    with torch.no_grad():
        rest = project(cen[:, ~dom], amp[:, ~dom], sig[:, ~dom], A0, box, apix, o0, C)
        part = project(cen[:, dom], amp[:, dom], sig[:, dom], A0, box, apix, o0, C)
        g = ctx["scorer"].binner
        Fimg = Fimg - rest_scale(g.gather(Fimg), g.gather(rest), g.gather(part))[:, None, None] * rest
        w = ctx["w"]
        if ctx["decoded_start"]:
            Q, t = fit_domain_motion(cen[:, dom], c0, w)
        else:
            Q, t = torch.eye(3, device=device).expand(len(rows), 3, 3), torch.zeros(len(rows), 3, device=device)
        A_d = A0 @ Q
        o_d = o0 - torch.einsum("bij,bj->bi", A0, t)[:, :2]
        g0 = ((w / w.sum()).to(c0.dtype)[:, None] * c0).sum(0)  # domain centre (neutral frame, A)
        gv = torch.einsum("bij,j->bi", A_d, g0)  # ... in each particle's view frame
        y = torch.einsum("bij,nj->bni", A_d, c0) - gv[:, None]
    if ctx["tmpl"] is not None:  # the neutral domain: neutral centres, amplitudes and widths
        t_amp, t_sig = (v.expand(len(rows), -1) for v in ctx["tmpl"])
    else:
        t_amp, t_sig = amp[:, dom], sig[:, dom]
    vec, shift_px, sb, sa = search_batch(Fimg, y, t_amp, t_sig, o_d - gv[:, :2], C, ctx["scorer"],
                                         ctx["scorer_lo"], max_angle=ctx["max_angle"], levels=ctx["levels"],
                                         polish_steps=0, max_elements=ctx["max_elements"], prior_deg=ctx["prior"][0],
                                         prior_px=ctx["prior"][1], min_gain=ctx["min_gain"],
                                         rotvec_to_matrix=rotvec_to_matrix, coarse_grid=ctx["grid"],
                                         repeat_first=True)
    R = rotvec_to_matrix(vec.double()).float()
    A_new = R @ A_d
    o_new = o_d + shift_px * apix + torch.einsum("bij,bj->bi", R - torch.eye(3, device=device), gv)[:, :2]
    np64 = lambda x: x.detach().double().cpu().numpy()  # noqa: E731
    return {"R": np64(A_new), "o": np64(o_new), "R0": np64(A_d), "o0": np64(o_d), "dang": np64(vec.norm(dim=1)),
            "dsh": np64(shift_px.norm(dim=1) * apix), "dec": np64(_angle_deg(Q)), "sb": np64(sb), "sa": np64(sa)}


def rest_scale(a: torch.Tensor, rest: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Scale ``(B,)`` of the rest's projection in the particle: the joint least-squares fit
    ``a ~ s_r rest + s_d domain`` of the image coefficients ``a`` ``(B, P)`` to the projections of
    the rest and of the (decoded) domain ``(B, P)``. Fitting both keeps a misplaced decoded domain
    from lowering ``s_r`` (one scale for the whole model would under-subtract the rest)."""
    def dot(x, y):
        return (x * y.conj()).real.sum(1)
    rr, dd, rd = dot(rest, rest), dot(part, part), dot(rest, part)
    ar, ad = dot(a, rest), dot(a, part)
    det = (rr * dd - rd * rd).clamp_min(1e-12 * (rr * dd).clamp_min(1e-30))
    return (ar * dd - ad * rd) / det


def domain_mask_map(models, domain: np.ndarray, box: int, apix: float) -> np.ndarray:
    """A soft mask ``(D, D, D)`` of the domain: its neutral Gaussians rendered, thresholded at 20% of
    the maximum, dilated 3 voxels, with a 4-voxel raised-cosine edge (:func:`reconstruct.auto_mask`)."""
    from ..model.gmm import render_map
    from .reconstruct import auto_mask
    c0 = torch.as_tensor(np.asarray(models.neutral_centers_A)[domain], dtype=torch.float32)
    sig = float(getattr(models, "median_sigma_A", 2.0 * apix))
    vol = render_map(c0, torch.ones(len(c0)), torch.full((len(c0),), sig), box, apix).numpy()
    return auto_mask(vol, apix, max(2.0 * apix, sig))


class DomainSignalImages:
    """The particles with their decoded rest subtracted (RELION's signal subtraction), for the
    domain's reconstruction: ``get(rows)`` gives ``image - s * P(rest)`` (real space, ``(B, D, D)``
    float32), ``P(rest)`` the CTF-applied projection of the Gaussians outside ``domain`` decoded for
    the particle, at its particle pose, and ``s`` the least-squares scale of the particle's full
    projection to the image. ``particles``: :class:`io.data.Particles` at the particle poses."""

    def __init__(self, particles, models, domain: np.ndarray):
        self.particles, self.models = particles, models
        self.rest = torch.as_tensor(~np.asarray(domain, dtype=bool), device=particles.device)

    def __len__(self) -> int:
        return int(self.particles.n_particles)

    def get(self, rows) -> np.ndarray:
        from ..conventions import fourier_to_image
        p = self.particles
        rows = np.asarray(rows)
        b = p.batch(rows)
        cen, amp, sig = (t.float() for t in self.models.gaussians(rows, p.device))
        r = self.rest
        with torch.no_grad():
            rest = project(cen[:, r], amp[:, r], sig[:, r], b.rotations, p.box, p.apix, b.origins_A, b.ctf)
            part = project(cen[:, ~r], amp[:, ~r], sig[:, ~r], b.rotations, p.box, p.apix, b.origins_A, b.ctf)
            n = len(rows)
            s = rest_scale(b.F_img.reshape(n, -1), rest.reshape(n, -1), part.reshape(n, -1))
            img = fourier_to_image(b.F_img - s[:, None, None] * rest, p.box)
        return img.float().cpu().numpy()
