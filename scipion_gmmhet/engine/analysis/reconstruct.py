"""3D reconstruction of a particle subset by direct Fourier inversion, with CTF correction.

Method (RELION's backprojector, simplified):

1. Each image has its background mean removed (the mean of the pixels outside the circle of
   radius ``D/2``, as RELION normalises: :func:`subtract_background`); its transform
   ``X = image_to_fourier(img)`` has its origin shift undone
   (``X * conj(origin_phase)``, see :mod:`conventions`) and is weighted by the CTF ``c``:
   the numerator gets ``c * X`` and the weight ``c^2`` (CTF-premultiplied data, where
   ``X = c * S``: numerator ``X``, weight ``c^2``; phase-flipped data, ``X = sign(c) c S``:
   numerator ``|c| X``, weight ``c^2``; data without CTF: numerator ``X``, weight 1).
2. The coefficient at image frequency ``(kx, ky)`` (Fourier pixels of the ``D`` box) is
   inserted into a 3D half-grid (the ``rfftn`` layout) of a box padded ``pad`` times at
   ``pad * A.T @ (kx, ky, 0)`` (the central-slice convention), by trilinear insertion
   (each sample spread over its 8 grid neighbours with the trilinear weights). Points with
   a negative x coordinate are inserted at ``-k`` with the conjugate value (Friedel), and
   the ``x = 0`` plane is made Hermitian before the division. Insertion is one
   ``index_add_`` per batch on any torch device.
3. Wiener-style division: ``V(k) = N(k) / (W(k) + lambda_s)`` where ``lambda_s`` is the
   **regulariser**: ``reg_frac`` (default 0.01) times the mean weight ``W`` over the
   occupied voxels of the shell ``s`` that ``k`` lies in. Well-sampled voxels are scaled
   by ``1/(1 + reg_frac)`` at most (a constant per shell: no effect on any FSC), while
   voxels whose summed ``CTF^2`` is small (near CTF zeros, poorly sampled directions)
   are damped instead of amplifying noise. Voxels beyond the images' Nyquist radius are set
   to zero.
4. Inverse FFT of the padded grid, **gridding correction** (division by ``sinc^2`` of the
   real-space coordinate over the padded box: the transform of the trilinear kernel),
   and cropping to the ``D`` box with the origin at voxel ``D//2``.

Two half maps come from the star's ``rlnRandomSubset`` (1/2) when present, otherwise from a
seeded random split; the full map is reconstructed from both halves' sums. Their FSC is
reported unmasked and, as RELION's post-processing does, under an automatic soft solvent mask
(:func:`auto_mask`) with the mask's own correlation removed by phase randomisation
(:func:`masked_fsc`). Particles are streamed in batches: memory is two padded grids plus one
batch.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..conventions import ctf_2d, fourier_grid, image_to_fourier, origin_phase
from ..ctf_modes import CTF_MODES, ctf_mode as parse_ctf_mode
from ..io.outputs import reconstruction_paths, write_fsc_csv
from ..errors import InputError
from ..model.fourier import fsc_table, resolution_at_threshold, shell_index_3d
from ..io.validate import check_images_finite

log = logging.getLogger(__name__)

def normalise_ctf_mode(mode: str | None) -> str | None:
    """``None`` (from the metadata: ``auto`` or None) or one of :data:`ctf_modes.CTF_MODES`
    (version 0.1 spellings, e.g. from an old training's config, accepted)."""
    mode = parse_ctf_mode(mode, "CTF mode", quiet=True)
    return None if mode == "auto" else mode
DEFAULT_REG_FRAC = 0.01
#: optics-table flag the Scipion plugin writes for phase-flipped images
PHASE_FLIPPED_LABEL = "rlnGmmhetPhaseFlipped"


def _image_frequencies(box: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer Fourier-pixel frequencies ``(jx, jy)`` of an rfft image inside the Nyquist
    circle, and the flat indices of those coefficients in the ``(D, D//2+1)`` layout."""
    jy = torch.fft.fftfreq(box, d=1.0 / box, device=device)
    jx = torch.fft.rfftfreq(box, d=1.0 / box, device=device)
    JY, JX = torch.meshgrid(jy, jx, indexing="ij")
    keep = (JX * JX + JY * JY) <= (box // 2) ** 2
    flat = keep.reshape(-1).nonzero().squeeze(1)
    return JX.reshape(-1)[flat], JY.reshape(-1)[flat], flat


class Backprojector:
    """Accumulates CTF-weighted central slices on a padded 3D Fourier half-grid.

    ``box`` (px) and ``apix`` (Angstrom/px) of the particle images; ``pad`` the oversampling
    factor of the 3D grid (2 keeps the trilinear interpolation error small). The grid is
    ``[z, y, x]`` with ``x`` the rfft half axis, frequencies in fft order.
    """

    def __init__(self, box: int, apix: float, pad: int = 2, device="cpu", dtype=torch.float32):
        self.box, self.apix, self.pad = int(box), float(apix), int(pad)
        self.device = torch.device(device)
        self.dtype = dtype
        P = self.box * self.pad
        self.P, self.H = P, P // 2 + 1
        n = P * P * self.H
        self.data = torch.zeros(n, 2, dtype=dtype, device=self.device)  # real, imag
        self.weight = torch.zeros(n, dtype=dtype, device=self.device)
        self.count = 0
        self._jx, self._jy, self._flat = _image_frequencies(self.box, self.device)
        self._jx, self._jy = self._jx.to(dtype), self._jy.to(dtype)

    def insert(self, F: torch.Tensor, rotations: torch.Tensor, weight_ctf: torch.Tensor | None,
               ctf_mode: str = "full", premultiplied: torch.Tensor | None = None) -> None:
        """Insert a batch: ``F`` ``(B, D, D//2+1)`` complex image transforms with the origin shift
        already undone, ``rotations`` ``(B, 3, 3)`` RELION matrices, ``weight_ctf`` ``(B, D, D//2+1)``
        the CTF (None for ``ctf_mode='none'``). ``premultiplied`` ``(B,)`` bool marks particles
        whose images are CTF-premultiplied within a ``'full'`` batch (mixed optics groups)."""
        if ctf_mode not in CTF_MODES:
            raise ValueError(f"ctf_mode must be one of {CTF_MODES}, got {ctf_mode!r}")
        B = F.shape[0]
        if B == 0:
            return
        dev, dt = self.device, self.dtype
        X = F.reshape(B, -1)[:, self._flat].to(dev)
        if ctf_mode == "none" or weight_ctf is None:
            num = X
            w = torch.ones(X.shape, dtype=dt, device=dev)
        else:
            c = weight_ctf.reshape(B, -1)[:, self._flat].to(device=dev, dtype=dt)
            if ctf_mode == "full":
                num = X * c
                if premultiplied is not None and bool(premultiplied.any()):
                    num = torch.where(premultiplied.to(dev).reshape(B, 1), X, num)
            elif ctf_mode == "phase_flipped":
                num = X * c.abs()
            else:  # premultiplied
                num = X
            w = c * c
        R = rotations.to(device=dev, dtype=dt)
        # 3D position (padded Fourier pixels, xyz) of each sample: pad * A.T @ (jx, jy, 0)
        pos = self.pad * (self._jx[None, :, None] * R[:, None, 0, :] + self._jy[None, :, None] * R[:, None, 1, :])
        flip = pos[..., 0] < 0
        pos = torch.where(flip[..., None], -pos, pos)
        num_re, num_im = num.real.to(dt), torch.where(flip, -num.imag, num.imag).to(dt)
        base = torch.floor(pos)
        frac = pos - base
        base = base.long()
        P, H = self.P, self.H
        vals = torch.stack([num_re, num_im], dim=-1).reshape(-1, 2)
        wflat = w.reshape(-1)
        for dz in (0, 1):
            fz = frac[..., 2] if dz else 1.0 - frac[..., 2]
            iz = torch.remainder(base[..., 2] + dz, P)
            for dy in (0, 1):
                fy = frac[..., 1] if dy else 1.0 - frac[..., 1]
                iy = torch.remainder(base[..., 1] + dy, P)
                for dx in (0, 1):
                    fx = frac[..., 0] if dx else 1.0 - frac[..., 0]
                    ix = base[..., 0] + dx
                    kern = (fz * fy * fx).reshape(-1)
                    idx = ((iz * P + iy) * H + ix).reshape(-1)
                    ok = ix.reshape(-1) < H
                    if not bool(ok.all()):
                        idx, k_ok = idx[ok], kern[ok]
                        self.data.index_add_(0, idx, vals[ok] * k_ok[:, None])
                        self.weight.index_add_(0, idx, wflat[ok] * k_ok)
                    else:
                        self.data.index_add_(0, idx, vals * kern[:, None])
                        self.weight.index_add_(0, idx, wflat * kern)
        self.count += B

    def merged(self, other: "Backprojector") -> "Backprojector":
        """A new accumulator holding the sums of both."""
        out = Backprojector.__new__(Backprojector)
        out.__dict__.update(self.__dict__)
        out.data = self.data + other.data
        out.weight = self.weight + other.weight
        out.count = self.count + other.count
        return out

    def _hermitian_x0(self, grid: torch.Tensor) -> torch.Tensor:
        """Make the x = 0 plane of a (P, P, H[, 2]) half-grid Hermitian by summing each voxel
        with its Friedel mate (both halves were filled from one side only)."""
        P = self.P
        neg = (-torch.arange(P, device=grid.device)) % P
        plane = grid[:, :, 0]
        mate = plane[neg][:, neg]
        if grid.dim() == 4:  # complex as (re, im): conjugate the mate
            mate = torch.stack([mate[..., 0], -mate[..., 1]], dim=-1)
        grid = grid.clone()
        grid[:, :, 0] = plane + mate
        return grid

    def reconstruct(self, reg_frac: float = DEFAULT_REG_FRAC, gridding_correction: bool = True) -> np.ndarray:
        """The map ``(D, D, D)`` [z, y, x] float32 (see the module docstring, steps 3-4)."""
        P, H, D = self.P, self.H, self.box
        data = self._hermitian_x0(self.data.reshape(P, P, H, 2))
        weight = self._hermitian_x0(self.weight.reshape(P, P, H))
        shells = torch.as_tensor(shell_index_3d(P).astype(np.int32), device=self.device)  # padded-grid shells
        nmax = int(shells.max()) + 1
        occupied = weight > 0
        occ_shells = shells[occupied].long()
        wsum = torch.zeros(nmax, dtype=torch.float64, device=self.device).index_add_(
            0, occ_shells, weight[occupied].double())
        wcnt = torch.zeros(nmax, dtype=torch.float64, device=self.device).index_add_(
            0, occ_shells, torch.ones_like(weight[occupied], dtype=torch.float64))
        del occ_shells
        mean_w = (wsum / wcnt.clamp(min=1.0)).to(weight.dtype)
        lam = reg_frac * mean_w[shells.long()]
        denom = weight + lam
        inside = (shells <= self.pad * (D // 2)) & (denom > 0)
        V = torch.complex(data[..., 0], data[..., 1])
        V = torch.where(inside, V / torch.where(inside, denom, torch.ones_like(denom)), torch.zeros_like(V))
        vol = torch.fft.irfftn(V, s=(P, P, P))
        vol = torch.fft.fftshift(vol)
        if gridding_correction:
            r = (torch.arange(P, device=self.device, dtype=vol.dtype) - P // 2) / P
            s = torch.special.sinc(r) ** 2
            s = s.clamp(min=1e-3)
            vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
        lo = P // 2 - D // 2
        return vol[lo:lo + D, lo:lo + D, lo:lo + D].float().cpu().numpy()


def subtract_background(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, D, D)`` minus each one's background mean: the mean of its pixels outside the
    circle of radius ``D / 2`` centred on pixel ``D // 2`` (RELION's background area, where the
    particle is not). Unnormalised images (e.g. integer stacks with a large offset) otherwise carry
    the offset at the Fourier origin, where the CTF is small (about -amplitude contrast): divided by
    ``c^2`` it becomes a large constant that the gridding correction turns into a bowl. Normalised
    images (background mean 0) are changed by the noise of that mean only."""
    box = images.shape[-1]
    c = np.arange(box) - box // 2
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > (box / 2.0) ** 2  # on the host: no device sync
    if not outside.any():  # only for boxes of 1 px
        return images
    w = torch.as_tensor(outside / outside.sum(), dtype=torch.float64, device=images.device)
    bg = (images.double() * w).sum(dim=(-2, -1))
    return images - bg.to(images.dtype)[..., None, None]


def prepare_batch(images: torch.Tensor, origins_A: torch.Tensor | None, ctf_params: dict | None, apix: float,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real images ``(B, D, D)`` -> (centred transforms with the origin shift undone, CTF or None).

    Each image's background mean is removed first (:func:`subtract_background`). ``origins_A``
    ``(B, 2)`` RELION origins (x, y) in Angstrom; ``ctf_params`` a dict of ``(B,)`` arrays as
    :meth:`ParticleMetadata.ctf_params` returns (None: no CTF). Every map of the engine (plain,
    motion-corrected, the refinement gate's and the domain maps) reads its images through here."""
    box = images.shape[-1]
    dev = images.device
    ky, kx = fourier_grid(box, apix, rfft=True, device=dev)
    F = image_to_fourier(subtract_background(images.float()))
    if origins_A is not None:
        o = torch.as_tensor(origins_A, dtype=torch.float32, device=dev)
        F = F * torch.conj(origin_phase(ky, kx, o[:, 0], o[:, 1]))
    ctf = None
    if ctf_params is not None:
        p = {k: torch.as_tensor(np.asarray(v, dtype=np.float32), device=dev) for k, v in ctf_params.items()}
        ctf = ctf_2d(ky, kx, p["defocus_u_A"], p["defocus_v_A"], p["defocus_angle_deg"], p["voltage_kv"],
                     p["cs_mm"], p["amplitude_contrast"], p.get("phase_shift_deg", 0.0),
                     p.get("bfactor", 0.0), p.get("scale", 1.0))
    return F, ctf


def auto_mask(vol: np.ndarray, apix: float, lowpass_A: float, threshold_frac: float = 0.2,
              dilate_px: int = 3, soft_px: int = 4) -> np.ndarray:
    """A soft solvent mask ``(D, D, D)`` in [0, 1] from a map: low-pass to ``lowpass_A``,
    threshold at ``threshold_frac`` of the maximum, keep the largest connected blob, dilate by
    ``dilate_px`` voxels, then a raised-cosine edge ``soft_px`` voxels wide (RELION's
    ``relion_mask_create`` recipe)."""
    from scipy import ndimage
    from ..model.fourier import lowpass_map
    lp = lowpass_map(np.asarray(vol, np.float32), apix, lowpass_A)
    core = lp > threshold_frac * lp.max()
    lab, n = ndimage.label(core)
    if n > 1:
        sizes = ndimage.sum(core, lab, index=np.arange(1, n + 1))
        core = lab == (1 + int(np.argmax(sizes)))
    if dilate_px > 0:
        core = ndimage.binary_dilation(core, iterations=int(dilate_px))
    dist = ndimage.distance_transform_edt(~core)
    edge = (dist > 0) & (dist < soft_px)
    mask = core.astype(np.float32)
    mask[edge] = 0.5 + 0.5 * np.cos(np.pi * dist[edge] / soft_px)
    return mask


def _randomise_phases(vol: np.ndarray, from_shell: int, seed: int) -> np.ndarray:
    from ..model.fourier import shell_index_3d
    F = np.fft.rfftn(vol.astype(np.float64))
    shells = shell_index_3d(vol.shape[0])
    beyond = shells >= from_shell
    rng = np.random.default_rng(seed)
    F[beyond] = np.abs(F[beyond]) * np.exp(2j * np.pi * rng.random(int(beyond.sum())))
    return np.fft.irfftn(F, s=vol.shape, axes=(-3, -2, -1))


def masked_fsc(map1: np.ndarray, map2: np.ndarray, mask: np.ndarray, apix: float,
               randomise_from_shell: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """FSC of two maps under ``mask``, corrected for the mask's own correlation by phase
    randomisation (Chen et al. 2013, as RELION's post-processing): the phases of ``map1`` and
    ``map2`` beyond ``randomise_from_shell`` (default: where their unmasked FSC first drops
    below 0.8) are randomised, the masked FSC of those maps ``FSC_r`` measured, and beyond that
    shell ``FSC = (FSC_m - FSC_r) / (1 - FSC_r)``. Returns :func:`fourier.fsc_table` with
    ``fsc`` the corrected curve plus ``fsc_masked`` and ``fsc_random``."""
    table = fsc_table(map1, map2, apix)
    if randomise_from_shell is None:
        below = np.nonzero(table["fsc"][1:] < 0.8)[0]
        randomise_from_shell = int(below[0] + 1) if below.size else len(table["fsc"])
    m1, m2 = map1 * mask, map2 * mask
    fm = fsc_table(m1, m2, apix)["fsc"]
    r1 = _randomise_phases(map1, randomise_from_shell, seed) * mask
    r2 = _randomise_phases(map2, randomise_from_shell, seed + 1) * mask
    fr = fsc_table(r1, r2, apix)["fsc"]
    corrected = fm.copy()
    hi = np.arange(fm.size) >= randomise_from_shell
    corrected[hi] = np.clip((fm[hi] - fr[hi]) / np.maximum(1e-6, 1.0 - fr[hi]), -1.0, 1.0)
    table.update(fsc=corrected, fsc_masked=fm, fsc_random=fr,
                 randomised_from_shell=np.array(randomise_from_shell))
    return table


@dataclass
class Reconstruction:
    """A reconstruction with its half maps and their FSC. Maps ``(D, D, D)`` float32 [z, y, x]."""

    volume: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    apix: float
    n_particles: int
    half_sizes: tuple[int, int]
    fsc: dict = field(default_factory=dict)  # fourier.fsc_table of the half maps
    resolution_0143_A: float = float("nan")
    seconds: float = 0.0
    mask: np.ndarray | None = None          # auto_mask of the map (None: not computed)
    fsc_masked: dict | None = None          # masked_fsc of the half maps (phase-randomisation corrected)
    resolution_0143_masked_A: float = float("nan")

    def write(self, out_path: str) -> dict[str, str]:
        """Write ``MAP.mrc``, ``MAP_half1.mrc``, ``MAP_half2.mrc``, ``MAP_fsc.csv`` (atomically);
        returns the paths by role."""
        from ..io.mrc import write_map
        paths = reconstruction_paths(out_path, mask=self.mask is not None)
        write_map(paths["map"], self.volume, self.apix)
        write_map(paths["half1"], self.half1, self.apix)
        write_map(paths["half2"], self.half2, self.apix)
        if self.mask is not None:
            write_map(paths["mask"], self.mask, self.apix)
        write_fsc_csv(paths["fsc"], self.fsc, None if self.fsc_masked is None else self.fsc_masked["fsc"])
        return paths

    def summary(self) -> dict:
        return {"n_particles": int(self.n_particles), "half_sizes": [int(v) for v in self.half_sizes],
                "resolution_0143_A": float(self.resolution_0143_A),
                "resolution_0143_masked_A": float(self.resolution_0143_masked_A),
                "seconds": round(float(self.seconds), 2)}


def half_assignment(meta, seed: int = 0) -> np.ndarray:
    """Half (1 or 2) of every row of the star: ``rlnRandomSubset`` when it holds only 1s and 2s
    and both occur, else a seeded random split of all rows (so subsets of the star keep one
    consistent split)."""
    n = len(meta)
    parts = getattr(meta, "particles", None)
    if parts is not None and "rlnRandomSubset" in parts.columns and n:
        h, problem = _random_subset_problem(parts["rlnRandomSubset"])
        if problem is None:
            return h
        log.warning("rlnRandomSubset %s; the half maps use a seeded random split of these %d particles instead",
                    problem, n)
    rng = np.random.default_rng(seed)
    h = np.ones(n, dtype=np.int64)
    h[rng.permutation(n)[n // 2:]] = 2
    return h


def _random_subset_problem(column) -> tuple[np.ndarray | None, str | None]:
    """``(halves, None)`` when ``rlnRandomSubset`` holds 1s and 2s only, both present; else
    ``(None, what is wrong)`` in words (only one subset, other values, not whole numbers)."""
    values = pd.to_numeric(pd.Series(np.asarray(column)), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        return None, f"holds {int(bad.sum())} value(s) that are not whole numbers (e.g. {np.asarray(column)[bad][0].item()!r})"
    h = values.astype(np.int64)
    present = sorted(set(np.unique(h).tolist()))
    other = [v for v in present if v not in (1, 2)]
    if other:
        return None, (f"holds values other than 1 and 2 ({', '.join(str(v) for v in other[:3])}"
                      f"{', ...' if len(other) > 3 else ''} in {int(np.isin(h, other).sum())} rows)")
    if len(present) == 1:
        return None, (f"puts every particle in subset {present[0]} (no subset {3 - present[0]}: the star holds one "
                      "half of a data set, e.g. one half of an --even-odd pair)")
    return h, None


def auto_batch_size(box: int, budget_samples: int = 1 << 22) -> int:
    """Particles per batch so that one batch's insertion stays near ``budget_samples`` grid
    updates (about 100 MB of temporaries)."""
    per_image = int(0.4 * box * box) * 8
    return int(max(1, min(1024, budget_samples // max(1, per_image))))


def ctf_mode_of(meta) -> str:
    """The CTF mode of a particle set: 'none' without CTF parameters; 'phase_flipped' when every
    optics group carries ``rlnGmmhetPhaseFlipped = 1`` (the plugin's label: RELION has none);
    else 'full' (particles flagged CTF-premultiplied in their optics group are handled per
    particle)."""
    has = getattr(meta, "has_ctf", None)
    optics = getattr(meta, "optics", None)
    if optics is not None and PHASE_FLIPPED_LABEL in optics.columns and \
            bool((np.asarray(optics[PHASE_FLIPPED_LABEL], dtype=np.float64) != 0).all()):
        return "phase_flipped" if (has is None or has()) else "none"
    if has is not None and not bool(has() if callable(has) else has):
        return "none"
    return "full"


def reconstruct_particles(meta, rows=None, *, images=None, halves: np.ndarray | None = None, seed: int = 0,
                          pad: int = 2, reg_frac: float = DEFAULT_REG_FRAC, batch_size: int | None = None,
                          device="cpu", ctf_mode: str | None = None, progress: bool = True,
                          mask: bool = True) -> Reconstruction:
    """Reconstruct the particles ``rows`` (0-based star rows; default all) of ``meta``
    (:class:`metadata.ParticleMetadata`) with two half maps and their FSC.

    ``images``: a :class:`data.ParticleImages` (default: opened from ``meta``); ``halves``:
    half (1/2) per star row (default :func:`half_assignment`); ``ctf_mode``: one of
    :data:`CTF_MODES` (default :func:`ctf_mode_of`: 'full', with the optics groups'
    ``rlnCtfDataAreCtfPremultiplied`` honoured per particle; give 'phase_flipped' for
    phase-flipped stacks, which star files do not flag). ``mask``: also compute an automatic
    solvent mask (:func:`auto_mask`) and the phase-randomisation-corrected masked FSC
    (:func:`masked_fsc`), as RELION's post-processing reports it.
    """
    t0 = time.time()
    rows, images, h = select_rows(meta, rows, images, halves, seed)
    if not ((h == 1).any() and (h == 2).any()):  # a tiny subset may fall in one half
        h = np.where(np.arange(rows.size) % 2 == 0, 1, 2)
    ctf_mode = normalise_ctf_mode(ctf_mode) or ctf_mode_of(meta)
    box, apix = int(meta.box), float(meta.apix)
    bps = {1: Backprojector(box, apix, pad, device), 2: Backprojector(box, apix, pad, device)}
    done, last_log = 0, time.time()
    for half, r, F, R, ctf, pm in particle_batches(meta, images, rows, h, ctf_mode,
                                                   batch_size or auto_batch_size(box), device):
        bps[half].insert(F, R, ctf, ctf_mode, pm)
        done += r.size
        if progress and time.time() - last_log > 10:
            log.info("reconstruct: %d / %d particles (%.0f /s)", done, rows.size, done / max(1e-9, time.time() - t0))
            last_log = time.time()
    rec = finish_reconstruction(bps, h, apix, reg_frac, mask, seed)
    rec.seconds = time.time() - t0
    return rec


def read_indices(path: str, n_particles: int | None = None) -> np.ndarray:
    """0-based particle rows from a ``.npy`` file or a text file (whitespace/comma separated,
    ``#`` comments). InputError for non-integers, negatives or rows past ``n_particles``."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such index file; check the --indices path")
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                text = " ".join(line.split("#", 1)[0] for line in f).replace(",", " ")
            arr = np.array([float(t) for t in text.split()], dtype=np.float64)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a list of particle rows ({exc}); write 0-based integers, one per "
                         "line, or a .npy array") from None
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype == bool:
        arr = np.nonzero(arr)[0]
    if arr.size and not np.all(np.asarray(arr, dtype=np.float64) == np.round(np.asarray(arr, dtype=np.float64))):
        raise InputError(f"{path}: particle rows must be integers; write 0-based row numbers")
    arr = np.asarray(arr, dtype=np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(f"{path}: negative particle row {arr.min()}; rows are 0-based")
    if n_particles is not None and arr.size and arr.max() >= n_particles:
        raise InputError(f"{path}: row {arr.max()} past the end of the star ({n_particles} particles); "
                         "rows are 0-based")
    if np.unique(arr).size != arr.size:
        raise InputError(f"{path}: duplicate particle rows; list each row once")
    return arr


def nyquist_fraction_at(table: dict, threshold: float) -> float:
    """Fraction of Nyquist where an FSC curve first drops below ``threshold`` (1.0 if never)."""
    res = resolution_at_threshold(table["freq_invA"], table["fsc"], threshold)
    nyq = table["freq_invA"][-1]
    return float(min(1.0, (1.0 / res) / nyq)) if math.isfinite(res) and res > 0 else 0.0


def finish_reconstruction(bps: dict, halves: np.ndarray, apix: float, reg_frac: float, mask: bool,
                          seed: int) -> "Reconstruction":
    """Half maps, full map and FSC from the two half-set inserters ``bps`` ({1: ..., 2: ...});
    with ``mask``, the automatic mask (the full map low-passed to 1.5x the unmasked resolution, at
    least 4 px) and the masked, phase-randomisation-corrected FSC. ``halves``: each used row's
    half (1 or 2). ``apix`` in A/px."""
    half1, half2 = bps[1].reconstruct(reg_frac), bps[2].reconstruct(reg_frac)
    full = bps[1].merged(bps[2]).reconstruct(reg_frac)
    table = fsc_table(half1, half2, apix)
    res = resolution_at_threshold(table["freq_invA"], table["fsc"], 0.143)
    rec = Reconstruction(full, half1, half2, apix, int(halves.size),
                         (int((halves == 1).sum()), int((halves == 2).sum())), table, res)
    if mask:
        lp = max(4.0 * apix, 1.5 * res) if math.isfinite(res) else 4.0 * apix
        rec.mask = auto_mask(full, apix, lp)
        rec.fsc_masked = masked_fsc(half1, half2, rec.mask, apix, seed=seed)
        rec.resolution_0143_masked_A = resolution_at_threshold(rec.fsc_masked["freq_invA"],
                                                               rec.fsc_masked["fsc"], 0.143)
    return rec


def select_rows(meta, rows, images, halves, seed: int):
    """``(rows, images, half of each row)`` for a reconstruction from the star rows ``rows``
    (0-based; all when None); InputError for rows outside the star or fewer than 2 particles.
    ``images`` defaults to the star's memory-mapped stacks, ``halves`` to
    :func:`half_assignment`."""
    n_all = len(meta)
    rows = np.arange(n_all) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n_all):
        raise InputError(f"particle indices: must be 0-based rows in [0, {n_all - 1}], got "
                         f"{rows.min()}..{rows.max()}; fix the index file")
    if rows.size < 2:
        raise InputError(f"particle subset: {rows.size} particle(s); a reconstruction with half maps needs "
                         "at least 2")
    if images is None:
        from ..io.data import ParticleImages
        images = ParticleImages(meta)
    halves = half_assignment(meta, seed) if halves is None else np.asarray(halves)
    return rows, images, halves[rows]


def particle_batches(meta, images, rows: np.ndarray, h: np.ndarray, ctf_mode: str, batch_size: int, device):
    """Half set 1 then half set 2 in sorted batches of ``batch_size`` rows: yields ``(half, rows,
    F, R, ctf, premultiplied)`` with the centred Fourier images ``F`` (shifts undone), rotation
    matrices ``R`` (RELION convention) and CTFs on ``device``. Images are checked for NaN/Inf on
    the host before the transfer."""
    apix, dev = float(meta.apix), torch.device(device)
    rot_all = np.asarray(meta.rotation_matrices(), dtype=np.float32)
    org_all = np.asarray(meta.origins_A(), dtype=np.float32)
    ctf_all = meta.ctf_params() if ctf_mode != "none" else None
    premult_all = np.asarray(meta.ctf_premultiplied(), dtype=bool) if ctf_mode == "full" else None
    for half in (1, 2):
        sel = rows[h == half]
        for s in range(0, sel.size, batch_size):
            r = np.sort(sel[s:s + batch_size])
            batch = np.asarray(images.get(r), dtype=np.float32)
            check_images_finite(batch, name="particles", rows=r)
            ctfp = None if ctf_all is None else {k: np.asarray(v)[r] for k, v in ctf_all.items()}
            F, ctf = prepare_batch(torch.as_tensor(batch, device=dev), torch.as_tensor(org_all[r], device=dev),
                                   ctfp, apix)
            pm = None if premult_all is None else torch.as_tensor(premult_all[r])
            yield half, r, F, torch.as_tensor(rot_all[r], device=dev), ctf, pm
