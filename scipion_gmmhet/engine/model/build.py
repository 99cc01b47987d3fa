"""Build a Gaussian mixture that matches a map at a chosen resolution (e2gmm's "build").

What is fitted
    The map itself, in Fourier space: the GMM's continuous 3D Fourier transform is evaluated
    analytically on the map's rfft grid up to the current resolution and compared with the
    map's transform by an FSC loss, the mean over shells 1..S of ``1 - FSC(shell)`` weighted by
    the shell index (the 3D analogue of e2gmm's mean-FRC score, insensitive to the map's scale
    and B-factor like e2gmm's; the weights favour the high shells that carry the detail). Why
    not projections, as e2gmm does: projections are central slices of this same 3D transform,
    each showing the loss one plane of it, whereas here every coefficient up to the current
    resolution is in every step, and the 3D transform of N Gaussians is separable too --
    ``F(kz, ky, kx) = sum_j w_j Gz_j(kz) Gy_j(ky) Gx_j(kx)`` -- i.e. one complex matrix product
    ``(rows (kz, ky) in the disc, N) @ (N, kx)`` per step.
    That costs ~pi/4 (2S+1)^2 (S+1) N complex multiply-adds, independent of the box: at 8 A on
    a 128-px, 2 A/px map (S = 32) about 0.25 G per step, less than 64 projections of 128 px
    (1.1 G) that would each see only one slice. It is exact (no voxel sampling of narrow
    Gaussians). When a step would cost more than ~6e7 multiply-adds, each step uses all rows
    of the inner quarter of the shells and a random subset of the others (stochastic, like
    e2gmm's minibatches of projections): at 128 px / 2048 Gaussians / 8 A this made the build
    4x faster on 2 CPU cores (65 s instead of 283 s) with the same final FSC.

Progressive schedule (e2gmm Methods)
    Start with ``N / 2^(K-1)`` Gaussians at resolution ``R0 = min(3 R, box apix / 3)`` and run
    Adam; then double the number of Gaussians (each split one is replaced by two copies
    displaced by +-sigma/2 along a random direction, amplitudes halved, so the low-resolution
    fit is kept), raise the resolution geometrically and repeat, ``K`` stages in all, the last
    at the target ``R`` (plus one shell, so the target shell itself is fitted). Gaussians whose
    centre leaves the mask (or the box) are dropped after each stage; near-empty Gaussians are
    the first to be replaced when splitting.

Parametrisation and regularisers
    amplitude = ``softplus(u) * a_ref`` (always positive); sigma = ``lo + (hi - lo) *
    sigmoid(v)`` with ``[lo, hi] = [max(0.5 apix, R_s / (4 pi)), 3 R_s / (2 pi)]`` at stage
    resolution ``R_s`` (so widths can never go negative, never alias at the voxel size and
    never grow beyond what the stage resolves); centres in Angstrom. Two weak penalties keep the
    model sane: a spectral-envelope term (per-shell log-power of the GMM vs the map, up to one
    global scale) so the rendered map looks like the input and not only correlates with it, and
    e2gmm's spread term (variance of log-amplitudes and log-widths). Measured on the test maps:
    without the envelope term the FSC is a little higher but the Gaussians widen to the top of
    their range (the model's power at the target shell fell to 1-40% of the map's); with it
    (weight 0.05) the power stays within ~10% and the model map correlates at > 0.998 with the
    low-passed input. After the fit, one global
    amplitude scale is solved in closed form (least squares on the fitted shells), so the
    rendered model has the input map's density scale.

Number of Gaussians when not given
    ``N = ceil(2 * V / R^3)`` clamped to [32, 16384], with ``V`` the volume (A^3) of the
    map low-pass filtered to ``R`` above the threshold ``max(mean + 3 sd of the solvent (the
    voxels outside the sphere of radius 0.45 box, or of the lowest-density half when there is
    no solvent), 0.1 x the 99.9th percentile)`` (inside the mask when one is given). ``2/R^3``
    is the sampling density needed to express a map at resolution ``R`` (8/R^3 samples) with 5
    parameters per Gaussian (2 x 5 > 8). For the e2gmm paper's examples this gives a few
    thousand (50S ribosome, V ~ 1.8e6 A^3 at 8 A: ~7000; e2gmm used ~3000 with a looser fit).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from .fourier import fsc_table, lowpass_map, resolution_at_threshold, shell_for_resolution
from .gmm import GMM, projection_weights

log = logging.getLogger("gmmhet.build")

N_MIN, N_MAX = 32, 16384
GAUSS_PER_RES_VOLUME = 2.0  # N = 2 V / R^3
FIT_MARGIN_SHELLS = 1  # the last stage fits this many shells beyond the target
SMALL_WORK = 4_000_000  # complex multiply-adds per step below which one CPU thread is used


# ----------------------------------------------------------------------------- input checks
def check_inputs(vol: np.ndarray, apix: float, resolution_A: float, mask: np.ndarray | None = None,
                 mask_apix: float | None = None, name: str = "map", mask_name: str = "mask") -> None:
    """Raise :class:`InputError` (one line) for a map/mask/resolution that cannot be built."""
    vol = np.asarray(vol)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"{name}: non-cubic map of shape {vol.shape[::-1]} (x, y, z); pad or crop it to a cube")
    if vol.shape[0] < 8:
        raise InputError(f"{name}: box of {vol.shape[0]} px is too small; give a map of at least 8 px")
    if not np.isfinite(vol).all():
        raise InputError(f"{name}: contains NaN or Inf values; fix or regenerate the map")
    if not np.any(vol != 0) or float(vol.max()) - float(vol.min()) <= 0:
        raise InputError(f"{name}: the map is empty (all values equal); give the consensus map")
    if not apix > 0:
        raise InputError(f"{name}: pixel size {apix} A is not positive; give the map's pixel size")
    box = vol.shape[0]
    if not resolution_A >= 2.0 * apix:
        raise InputError(f"--resolution {resolution_A} A is beyond Nyquist ({2 * apix:.3g} A at {apix:.4g} A/px); "
                         f"give a resolution of at least {2 * apix:.3g} A")
    if resolution_A > box * apix / 2.0:
        raise InputError(f"--resolution {resolution_A} A is coarser than half the box ({box * apix / 2:.4g} A); "
                         "give a finer target resolution")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != vol.shape:
            raise InputError(f"{mask_name}: box {mask.shape[::-1]} differs from the map's {vol.shape[::-1]}; "
                             "resample the mask onto the map's grid")
        if mask_apix is not None and abs(mask_apix - apix) > 1e-3 * apix:
            raise InputError(f"{mask_name}: pixel size {mask_apix:.4g} A differs from the map's {apix:.4g} A; "
                             "resample the mask onto the map's grid")
        if not np.isfinite(mask).all() or not np.any(mask > 0.5):
            raise InputError(f"{mask_name}: no voxel above 0.5 (or NaN values); give a binary or soft 0-1 mask")


# ----------------------------------------------------------------------------- number of Gaussians
def molecular_volume_A3(vol: np.ndarray, apix: float, resolution_A: float,
                        mask: np.ndarray | None = None) -> tuple[float, float]:
    """(volume in A^3 above the density threshold, the threshold) of the map low-passed to
    ``resolution_A``; the threshold rule is in the module docstring."""
    lp = lowpass_map(np.asarray(vol, np.float32), apix, resolution_A)
    box = lp.shape[0]
    r = np.sqrt(((np.indices(lp.shape) - box // 2) ** 2).sum(0))
    solvent = lp[r > 0.45 * box]
    if solvent.size < 100:
        solvent = np.sort(lp.ravel())[: lp.size // 2]
    thr = max(float(solvent.mean() + 3.0 * solvent.std()), 0.1 * float(np.percentile(lp, 99.9)))
    inside = lp > thr
    if mask is not None:
        inside &= np.asarray(mask) > 0.5
    return float(inside.sum()) * apix ** 3, thr


def choose_n_gaussians(vol: np.ndarray, apix: float, resolution_A: float, mask: np.ndarray | None = None) -> int:
    """Number of Gaussians for a map at a target resolution: ``ceil(2 V / R^3)`` in [32, 16384]."""
    v, _ = molecular_volume_A3(vol, apix, resolution_A, mask)
    return int(min(N_MAX, max(N_MIN, math.ceil(GAUSS_PER_RES_VOLUME * v / resolution_A ** 3))))


def stage_plan(n_gauss: int, resolution_A: float, box: int, apix: float, n_start: int = 256,
               max_stages: int = 5) -> list[tuple[int, float]]:
    """[(N, resolution_A)] per stage: N doubling up to ``n_gauss``, resolution from
    ``min(3 R, box apix / 3)`` geometrically down to ``R``."""
    k = 1 + max(1, math.ceil(math.log2(max(1.0, n_gauss / n_start))))
    k = min(k, max_stages)
    while k > 1 and n_gauss / 2 ** (k - 1) < 16:
        k -= 1
    r0 = max(resolution_A, min(3.0 * resolution_A, box * apix / 3.0))
    plan = []
    for i in range(k):
        n_i = int(math.ceil(n_gauss / 2 ** (k - 1 - i)))
        r_i = r0 * (resolution_A / r0) ** (i / (k - 1)) if k > 1 else resolution_A
        plan.append((n_i, float(r_i)))
    return plan


# ----------------------------------------------------------------------------- Fourier target
class FourierTarget:
    """The map's transform on the rfft half-grid up to shell ``S`` (rows ``(kz, ky)`` inside
    the disc ``kz^2 + ky^2 < (S + 1/2)^2``, columns ``kx = 0..S``), with shell indices, for the
    separable GMM transform of :func:`gmm_fourier` and the shell sums of the FSC loss."""

    def __init__(self, F_map: torch.Tensor, box: int, apix: float, shells: int):
        dev = F_map.device
        S = int(min(shells, box // 2 - 1))
        i = torch.arange(-S, S + 1, device=dev)
        iz, iy = torch.meshgrid(i, i, indexing="ij")
        disc = (iz * iz + iy * iy) < (S + 0.5) ** 2
        self.iz, self.iy = iz[disc], iy[disc]  # (R,)
        ix = torch.arange(0, S + 1, device=dev)
        r = torch.sqrt((self.iz[:, None] ** 2 + self.iy[:, None] ** 2 + ix[None, :] ** 2).double())
        shell = torch.round(r).long()
        self.valid = (shell >= 1) & (shell <= S)
        self.shell = torch.where(self.valid, shell, torch.zeros_like(shell))
        self.S, self.box, self.apix = S, box, apix
        unit = 1.0 / (box * apix)
        self.kz = (torch.arange(-S, S + 1, device=dev, dtype=torch.float32)) * unit  # (2S+1,)
        self.kx = ix.float() * unit  # (S+1,)
        self.rz, self.ry = self.iz + S, self.iy + S  # rows -> index into kz grid
        Fm = F_map[self.iz % box][:, :, :S + 1]  # (R, D, S+1)
        Fm = Fm[torch.arange(self.iz.numel(), device=dev), self.iy % box]  # (R, S+1)
        self.F = torch.where(self.valid, Fm, torch.zeros_like(Fm))
        self.flat_shell = self.shell.reshape(-1)
        self.p_map = self.shell_sums(self.F.real ** 2 + self.F.imag ** 2)

    def take(self, rows: torch.Tensor) -> "FourierTarget":
        """The same target restricted to some rows ``(kz, ky)`` (a stochastic step's subset)."""
        sub = object.__new__(FourierTarget)
        sub.__dict__.update(self.__dict__)
        sub.rz, sub.ry, sub.F = self.rz[rows], self.ry[rows], self.F[rows]
        sub.shell, sub.valid = self.shell[rows], self.valid[rows]
        sub.flat_shell = sub.shell.reshape(-1)
        sub.p_map = sub.shell_sums(sub.F.real ** 2 + sub.F.imag ** 2)
        return sub

    def row_sampler(self, work_per_step: float, n_gauss: int, generator: torch.Generator):
        """A function returning the rows of one step: all of them when the full step costs at
        most ``work_per_step`` complex multiply-adds, else every row of the inner quarter of the
        shells (few, and each low shell needs all its coefficients) plus a random subset of the
        others, so a step costs about ``work_per_step``."""
        n_rows, cols = self.rz.numel(), self.F.shape[1]
        frac = work_per_step / float(n_rows * cols * max(1, n_gauss))
        if frac >= 1.0:
            return lambda: None
        r2 = self.iz ** 2 + self.iy ** 2
        inner = (r2 <= (self.S / 4.0) ** 2).nonzero().squeeze(1)
        outer = (r2 > (self.S / 4.0) ** 2).nonzero().squeeze(1)
        k = max(1, int(frac * n_rows) - inner.numel())

        def sample():
            pick = torch.randperm(outer.numel(), generator=generator)[:k].to(outer.device)
            return torch.cat([inner, outer[pick]])
        return sample

    def shell_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``(R, S+1)`` values -> ``(S+1,)`` sums per shell (entry 0 collects the invalid ones)."""
        out = torch.zeros(self.S + 1, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.flat_shell, values.reshape(-1))

    def fsc(self, F_gmm: torch.Tensor) -> torch.Tensor:
        """FSC per shell 1..S between the model transform ``(R, S+1)`` and the map."""
        cross = self.shell_sums((F_gmm * self.F.conj()).real)
        p = self.shell_sums(F_gmm.real ** 2 + F_gmm.imag ** 2)
        return (cross / torch.sqrt(p * self.p_map + 1e-30))[1:], p[1:]


def map_transform(vol: np.ndarray, device="cpu") -> torch.Tensor:
    """rfft of a map with the origin at voxel ``D//2`` (the 3D version of
    :func:`conventions.image_to_fourier`)."""
    v = torch.as_tensor(np.ascontiguousarray(vol, dtype=np.float32), device=device)
    return torch.fft.rfftn(torch.fft.ifftshift(v, dim=(0, 1, 2)), dim=(0, 1, 2))


def gmm_fourier(centers_A: torch.Tensor, amplitudes: torch.Tensor, sigmas_A: torch.Tensor,
                target: FourierTarget) -> torch.Tensor:
    """The GMM's continuous 3D transform (voxel-sum normalisation, as a rendered map's DFT) on
    ``target``'s grid, ``(R, S+1)`` complex: ``sum_j w_j Gz_j Gy_j Gx_j`` as one matrix product."""
    w = projection_weights(amplitudes, sigmas_A, target.apix)  # (N,)
    s2 = (2.0 * math.pi ** 2) * sigmas_A ** 2  # (N,)

    def axis(k, c):  # (K,), (N,) -> (K, N)
        return torch.polar(torch.exp(-s2 * (k * k)[:, None]), (-2.0 * math.pi) * k[:, None] * c[None, :])

    Gz = axis(target.kz, centers_A[:, 2])
    Gy = axis(target.kz, centers_A[:, 1]) * w.to(Gz.dtype)
    Gx = axis(target.kx, centers_A[:, 0])
    ZY = Gz.index_select(0, target.rz) * Gy.index_select(0, target.ry)  # (R, N)
    return ZY @ Gx.T


# ----------------------------------------------------------------------------- the model being fitted
class _Params(torch.nn.Module):
    """Unconstrained parameters of a GMM whose widths live in ``[lo, hi]`` Angstrom."""

    def __init__(self, centers_A, amplitudes, sigmas_A, lo, hi, a_ref):
        super().__init__()
        self.lo, self.hi, self.a_ref = float(lo), float(hi), float(a_ref)
        s = torch.as_tensor(sigmas_A, dtype=torch.float32).clamp(self.lo + 1e-3 * (hi - lo), self.hi - 1e-3 * (hi - lo))
        a = torch.as_tensor(amplitudes, dtype=torch.float32).clamp_min(1e-6 * self.a_ref) / self.a_ref
        self.c = torch.nn.Parameter(torch.as_tensor(centers_A, dtype=torch.float32).clone())
        self.u = torch.nn.Parameter(torch.where(a > 20, a, torch.log(torch.expm1(a))))  # softplus^-1
        self.v = torch.nn.Parameter(torch.logit((s - self.lo) / (self.hi - self.lo)))

    def values(self):
        amp = torch.nn.functional.softplus(self.u) * self.a_ref
        sig = self.lo + (self.hi - self.lo) * torch.sigmoid(self.v)
        return self.c, amp, sig


def width_range_A(resolution_A: float, apix: float) -> tuple[float, float]:
    """Allowed Gaussian widths (Angstrom) at a stage resolution (see the module docstring)."""
    lo = max(0.5 * apix, resolution_A / (4.0 * math.pi))
    hi = max(3.0 * resolution_A / (2.0 * math.pi), 2.0 * lo)
    return lo, hi


@dataclass
class BuildResult:
    gmm: GMM
    fsc: dict  # fourier.fsc_table of the rendered model vs the fitted map
    fsc05_resolution_A: float
    history: list = field(default_factory=list)  # per stage: n, resolution_A, steps, loss, mean_fsc, seconds
    seconds: float = 0.0


def _inside(centers_A: np.ndarray, box: int, apix: float, mask: np.ndarray | None) -> np.ndarray:
    """Which centres lie inside the box (and on a mask voxel > 0.5)."""
    vox = np.rint(centers_A / apix + box // 2).astype(np.int64)  # (N, 3) x, y, z voxel
    ok = ((vox >= 0) & (vox < box)).all(axis=1)
    if mask is not None:
        v = np.clip(vox, 0, box - 1)
        ok &= mask[v[:, 2], v[:, 1], v[:, 0]] > 0.5
    return ok


def _initial_model(vol, apix, n, mask, rng, resolution_A):
    """``n`` Gaussians at voxels drawn with probability ~ density (low-passed, above its
    threshold), amplitudes set so the total mass matches the map's."""
    box = vol.shape[0]
    lp = lowpass_map(vol, apix, resolution_A)
    _, thr = molecular_volume_A3(vol, apix, resolution_A, mask)
    p = np.where(lp > thr, lp, 0.0).astype(np.float64)
    if mask is not None:
        p *= np.asarray(mask) > 0.5
    if p.sum() <= 0:
        p = np.clip(lp, 0, None).astype(np.float64)
    if p.sum() <= 0:
        raise InputError("map: no positive density; give a map with protein density positive (white)")
    flat = p.ravel() / p.sum()
    idx = rng.choice(flat.size, size=n, replace=flat.size < n or np.count_nonzero(flat) < n, p=flat)
    z, y, x = np.unravel_index(idx, p.shape)
    centers = (np.stack([x, y, z], axis=1) - box // 2 + rng.uniform(-0.5, 0.5, (n, 3))) * apix
    lo, hi = width_range_A(resolution_A, apix)
    sig = np.full(n, math.sqrt(lo * hi), np.float32)
    mass = float(np.clip(lp, 0, None)[p > 0].sum())
    amp = np.full(n, mass / (n * (2 * math.pi) ** 1.5 * (sig[0] / apix) ** 3), np.float32)
    return centers.astype(np.float32), amp, sig


def _split(centers, amps, sigmas, n_new, rng):
    """Grow the model to ``n_new`` Gaussians: the emptiest are dropped and the heaviest split in
    two (copies at +-sigma/2 along a random direction, each with half the amplitude)."""
    mass = amps * sigmas ** 3
    order = np.argsort(-mass)
    dead = mass < 1e-3 * mass.mean()
    keep = order[~dead[order]]
    n_split = min(len(keep), n_new - len(keep))
    src = keep[:n_split]
    d = rng.normal(size=(n_split, 3))
    d *= (0.5 * sigmas[src] / np.linalg.norm(d, axis=1))[:, None]
    c = np.concatenate([centers[keep], centers[src] - d])
    c[:n_split] += d
    a = np.concatenate([amps[keep], amps[src] * 0.5])
    a[:n_split] *= 0.5
    s = np.concatenate([sigmas[keep], sigmas[src]])
    return c.astype(np.float32), a.astype(np.float32), s.astype(np.float32)


def _fit_stage(params: _Params, target: FourierTarget, steps: int, lr_center_A: float, log_every: int = 50,
               envelope_weight: float = 0.05, spread_weight: float = 1e-3, tol: float = 0.995,
               shell_power: float = 1.0, plateau: float = 1e-5, work_per_step: float = 6e7, seed: int = 0):
    """Adam on the shell-weighted ``1 - FSC`` plus the regularisers; returns (loss, mean FSC,
    steps run). Stops early when every shell's FSC exceeds ``tol`` or when the loss fell by less
    than ``plateau`` per step between the last two windows of ``log_every`` steps. A step whose
    full cost would exceed ``work_per_step`` complex multiply-adds uses a random subset of the
    Fourier rows (:meth:`FourierTarget.row_sampler`): stochastic, like e2gmm's minibatches of
    projections, and several times faster on large maps."""
    opt = torch.optim.Adam([{"params": [params.c], "lr": lr_center_A},
                            {"params": [params.u, params.v], "lr": 0.05}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.05 * lr_center_A)
    base = [g["lr"] for g in opt.param_groups]
    loss_v = fsc_v = float("nan")
    loss_prev = float("inf")
    shells = torch.arange(1, target.S + 1, dtype=torch.float32, device=target.F.device)
    shell_w = shells ** shell_power / (shells ** shell_power).sum()
    sample = target.row_sampler(work_per_step, params.c.shape[0], torch.Generator().manual_seed(seed))
    window = 0.0
    step = 0
    for step in range(1, steps + 1):
        rows = sample()
        tgt = target if rows is None else target.take(rows)
        c, a, s = params.values()
        F = gmm_fourier(c, a, s, tgt)
        curve, p = tgt.fsc(F)
        loss = ((1.0 - curve) * shell_w).sum()
        if envelope_weight:
            d = torch.log(p + 1e-30) - torch.log(tgt.p_map[1:] + 1e-30)
            loss = loss + envelope_weight * ((d - d.mean()) ** 2).mean()
        if spread_weight:
            loss = loss + spread_weight * (torch.log(a).var() + torch.log(s).var())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # the second group keeps its own schedule in proportion
        opt.param_groups[1]["lr"] = base[1] * opt.param_groups[0]["lr"] / base[0]
        loss_v, fsc_v = float(loss.detach()), float(curve.detach().mean())
        window += loss_v / log_every
        if step % log_every == 0:
            log.debug("    step %d loss %.4f mean FSC %.4f min FSC %.4f", step, window, fsc_v,
                      float(curve.detach().min()))
            if float(curve.detach().min()) > tol or loss_prev - window < plateau * log_every:
                break  # every shell fitted, or the mean loss has stopped falling
            loss_prev, window = window, 0.0
    return loss_v, fsc_v, step


def build_gmm(vol: np.ndarray, apix: float, resolution_A: float, mask: np.ndarray | None = None,
              n_gauss: int | None = None, device: str = "cpu", seed: int = 0, steps: int = 300,
              final_steps: int | None = None, n_start: int = 256) -> BuildResult:
    """Fit a GMM to ``vol[z, y, x]`` (apix A/px) up to ``resolution_A`` (module docstring).

    ``mask`` (same grid, 0-1): the map is fitted inside it and Gaussians outside are dropped.
    ``n_gauss``: target number of Gaussians (None: :func:`choose_n_gaussians`). ``steps``
    Adam steps per stage (``final_steps`` for the last, default ``2 * steps``). Returns a
    :class:`BuildResult` whose GMM has the map's box and apix, and ``info`` with
    ``target_resolution_A``, ``fsc05_resolution_A``, ``n_gauss``.
    """
    vol = np.asarray(vol, dtype=np.float32)
    check_inputs(vol, apix, resolution_A, mask)
    threads = torch.get_num_threads()
    try:
        return _build(vol, apix, resolution_A, mask, n_gauss, device, seed, steps, final_steps, n_start)
    finally:
        torch.set_num_threads(threads)


def _build(vol, apix, resolution_A, mask, n_gauss, device, seed, steps, final_steps, n_start) -> BuildResult:
    t0 = time.time()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible; use --device cpu")
    box = vol.shape[0]
    threads_default = torch.get_num_threads()
    if mask is not None:
        mask = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
        vol = vol * mask
    if n_gauss is None or n_gauss <= 0:
        n_gauss = choose_n_gaussians(vol, apix, resolution_A, mask)
    n_gauss = int(n_gauss)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    plan = stage_plan(n_gauss, resolution_A, box, apix, n_start=n_start)
    log.info("build: box %d, %.4g A/px, target %.4g A, %d Gaussians, %d stages %s", box, apix, resolution_A,
             n_gauss, len(plan), ", ".join(f"{n}@{r:.3g}A" for n, r in plan))
    F_map = map_transform(vol, device)
    centers, amps, sigmas = _initial_model(vol, apix, plan[0][0], mask, rng, plan[0][1])
    a_ref = float(np.median(amps))
    history = []
    final_steps = final_steps or 2 * steps
    for i, (n_i, r_i) in enumerate(plan):
        ts = time.time()
        last = i == len(plan) - 1
        if len(amps) < n_i:
            centers, amps, sigmas = _split(centers, amps, sigmas, n_i, rng)
        shells = shell_for_resolution(box, apix, r_i) + (FIT_MARGIN_SHELLS if last else 0)
        target = FourierTarget(F_map, box, apix, shells)
        if device == "cpu":  # small problems run faster on one thread than on contended cores
            torch.set_num_threads(1 if target.F.numel() * n_i < SMALL_WORK else threads_default)
        lo, hi = width_range_A(r_i, apix)
        params = _Params(centers, amps, sigmas, lo, hi, a_ref).to(device)
        loss, mfsc, n_steps = _fit_stage(params, target, final_steps if last else steps, lr_center_A=0.04 * r_i,
                                         seed=seed + i)
        c, a, s = (t.detach().cpu().numpy() for t in params.values())
        ok = _inside(c, box, apix, mask)
        centers, amps, sigmas = c[ok], a[ok], s[ok]
        history.append(dict(stage=i + 1, n=int(len(amps)), resolution_A=r_i, shells=target.S, steps=n_steps,
                            loss=loss, mean_fsc=mfsc, seconds=time.time() - ts))
        log.info("  stage %d: %d Gaussians (%d dropped outside), %.3g A (%d shells), %d steps, "
                 "mean FSC %.4f, %.1f s", i + 1, len(amps), int((~ok).sum()), r_i, target.S, n_steps, mfsc,
                 time.time() - ts)
    # one global scale so the model has the map's density scale (least squares on the fitted shells)
    with torch.no_grad():
        c_t, a_t, s_t = (torch.as_tensor(x, device=device) for x in (centers, amps, sigmas))
        F = gmm_fourier(c_t, a_t, s_t, target)
        num = float((F * target.F.conj()).real[target.valid].sum())
        den = float((F.real ** 2 + F.imag ** 2)[target.valid].sum())
    if num <= 0 or den <= 0:
        raise InputError("map: the model does not correlate with the map (negative density?); "
                         "give a map with protein density positive")
    amps = amps * (num / den)
    gmm = GMM(centers, amps, sigmas, box, apix)
    rendered = gmm.render()
    table = fsc_table(rendered, vol, apix)
    res05 = resolution_at_threshold(table["freq_invA"], table["fsc"], 0.5)
    gmm.info.update(target_resolution_A=float(resolution_A), fsc05_resolution_A=round(res05, 3),
                    n_gauss=len(gmm), n_gauss_requested=n_gauss, masked=mask is not None, seed=seed,
                    fitted_to="map transform, FSC loss up to the target shell")
    log.info("build: %d Gaussians; FSC(model, map) drops below 0.5 at %.3g A (target %.3g A); %.1f s",
             len(gmm), res05, resolution_A, time.time() - t0)
    return BuildResult(gmm, table, res05, history, time.time() - t0)
