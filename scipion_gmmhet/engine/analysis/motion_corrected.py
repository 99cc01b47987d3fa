"""Motion-corrected consensus map: every particle reconstructed with its own deformation undone.

For each particle the trained decoder gives how every Gaussian of the neutral model moves
(``d_j`` Angstrom, the decoded centre minus the neutral centre). The moves become a smooth
3D displacement field over the neutral frame by Gaussian-weighted interpolation::

    d(x) = sum_j w_j(x) d_j / (sum_j w_j(x) + eps),   w_j(x) = |a_j| exp(-|x - c_j|^2 / (2 s^2))

(``c_j``, ``a_j`` the neutral centres and amplitudes, ``s`` = ``field_sigma_A``, default the
larger of the neutral Gaussians' median width and 2 pixels; ``eps`` = 1e-3 of the largest
weight sum, so the field fades to zero in the solvent). The field is evaluated on a grid of
``D//2 + 1`` nodes per axis (every 2 voxels, a sparse node x Gaussian product truncated at
3 ``s``) and interpolated trilinearly to the ``D^3`` voxels; only one batch of fields is held.

Deformed backprojection (real space). With ``A`` the particle's RELION rotation, the point
that sits at ``x`` in the neutral frame is at ``x + d(x)`` in this particle, which projects to
image pixel ``(A (x + d(x)))_{x,y} / apix + D//2`` (the origin shift is undone in Fourier space
beforehand, as in :func:`reconstruct.prepare_batch`). The numerator volume ``N_def``
accumulates, for every voxel ``x`` of the neutral frame, the particle's CTF-weighted image
``c X`` (``|c| X`` phase-flipped, ``X`` premultiplied or without CTF; the Fourier components
inside the Nyquist circle, upsampled ``oversample`` = 2 times by Fourier padding) sampled there
(bilinear, periodic image). The weight volume accumulates, with the undeformed geometry, the
backprojection of each particle's ``c^2`` point-spread function (the image whose transform is
``c^2``, centred): the response of the normal operator ``sum A^T c^2 A`` to a point at the
centre. Both carry the same interpolation and box-truncation kernel, so a volume ``N`` is
divided as ``RS(N) = F^-1[ F(N) / (max(F(weight), 0) + lambda_s) ]`` with the Wiener regulariser
``lambda_s`` = ``reg_frac`` x the mean weight in the shell (as
:class:`reconstruct.Backprojector`), zero beyond Nyquist, no gridding correction (the shared
kernel cancels). The weight ignores the local rotation a deformation causes: for the smooth
fields of a GMM decoder this is DynaMight's approximation too.

Formulations (:data:`FORMULATIONS`, chosen by measurement, docs/motion_corrected.md):

- ``real_space``: ``V = RS(N_def)``. Its kernel (box-truncated backprojection) differs from the
  direct Fourier inversion's, so even with zero displacement it departs from the plain map
  where the noise dominates (FSC with the plain map 0.92 at Nyquist/2 on 300 particles of
  SNR 0.1, box 32).
- ``hybrid`` (default): ``V = V_plain + RS(N_def - N_undef)``, the plain direct Fourier
  inversion (:class:`reconstruct.Backprojector`, same insertion, gridding and regulariser)
  plus the real-space backprojection of what the deformation changes (``N_undef``: the same
  backprojection with ``d = 0``). Zero displacement gives exactly the plain map; where the
  particle does not move (the static part) the two real-space terms cancel and the plain
  map's quality is kept; where it moves, the undeformed (blurred) contribution is swapped for
  the deformed one. Costs one more image sampling per voxel (about 1.5x ``real_space``).

Half maps: the halves' deformations must come from two models trained independently on the two
half sets (``rlnRandomSubset``; DynaMight's recipe): one model trained on all particles would
correlate the halves and inflate the FSC. The full map is reconstructed from both halves' sums;
FSC, automatic mask and the phase-randomised masked FSC as :func:`reconstruct.reconstruct_particles`.

Significance gate (:mod:`motion_gate`, ``gate_z`` of :func:`half_moves`): each half model is
scored on the other half's particles (never trained on), encoded from one set of angular
sectors of the training band and scored on the other; a model whose decoded moves do not beat
the neutral model there by ``gate_z`` standard errors gets zero displacement, so moves fitted
to noise cannot pull the noise into the neutral model's shape in both halves (pure-noise
half-map FSC 0.98 at 192 A without the gate, chance with it).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..conventions import fourier_to_image
from ..errors import InputError
from ..model.fourier import shell_index_3d
from .reconstruct import (CTF_MODES, DEFAULT_REG_FRAC, Backprojector, Reconstruction, ctf_mode_of,
                          finish_reconstruction, normalise_ctf_mode, particle_batches, select_rows)
from .motion_gate import DEFAULT_GATE_Z, gate_model

log = logging.getLogger(__name__)

#: ``hybrid`` (default): the plain direct Fourier inversion plus the real-space backprojection of
#: (deformed - undeformed); ``real_space``: the deformed real-space backprojection alone
FORMULATIONS = ("hybrid", "real_space")


def move_weights(points_A: torch.Tensor, centers_A: torch.Tensor, amplitudes: torch.Tensor, sigma_A: float,
                 chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """How Gaussian moves carry to other points: the sparse ``(M, N)`` weights of the ``N``
    Gaussians (centres ``centers_A``, Angstrom) at the ``M`` points ``points_A`` (Angstrom),
    ``|amplitude| exp(-d^2 / (2 sigma^2))`` within ``3 sigma``, each row normalised to sum 1 (plus
    1e-3 of the largest row sum, so points far from every Gaussian move little), and the rows' raw
    sums ``(M,)``. A point's move is its row times the Gaussians' moves. Used for the displacement
    field of :class:`DisplacementField` (points: its nodes) and for deforming a finer GMM with
    the decoded moves (:mod:`fine_reference`; points: the fine Gaussians)."""
    c, a = centers_A.float(), amplitudes.float().abs()
    p = points_A.to(c.device).float()
    cutoff = (3.0 * float(sigma_A)) ** 2
    rows, cols, vals = [], [], []
    for i0 in range(0, p.shape[0], chunk):
        d2 = torch.cdist(p[i0:i0 + chunk], c).square()
        r, j = (d2 < cutoff).nonzero(as_tuple=True)
        rows.append(r + i0)
        cols.append(j)
        vals.append(a[j] * torch.exp(-d2[r, j] / (2.0 * float(sigma_A) ** 2)))
    rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    M = p.shape[0]
    wsum = torch.zeros(M, device=c.device).index_add_(0, rows, vals)
    eps = 1e-3 * float(wsum.max()) if wsum.numel() and float(wsum.max()) > 0 else 1.0
    vals = vals / (wsum[rows] + eps)
    W = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (M, c.shape[0]), check_invariants=False).coalesce()
    return W, wsum


class DisplacementField:
    """Gaussian-weighted interpolation of per-Gaussian moves into a 3D displacement field
    (:func:`move_weights` on a grid of nodes every 2 voxels, then trilinear).

    ``centers_A`` ``(N, 3)`` neutral centres (xyz Angstrom from the box centre), ``amplitudes``
    ``(N,)``, ``box`` / ``apix`` of the map frame, ``sigma_A`` the interpolation width.
    """

    def __init__(self, centers_A, amplitudes, box: int, apix: float, sigma_A: float, device="cpu",
                 chunk: int = 4096):
        self.box, self.apix, self.sigma_A = int(box), float(apix), float(sigma_A)
        self.device = torch.device(device)
        c = torch.as_tensor(np.asarray(centers_A, np.float32), device=self.device)
        a = torch.as_tensor(np.asarray(amplitudes, np.float32), device=self.device)
        self.n_gauss = int(c.shape[0])
        D = self.box
        self.G = D // 2 + 1
        node_px = torch.linspace(0.0, D - 1.0, self.G, device=self.device) - D // 2
        zz, yy, xx = torch.meshgrid(node_px, node_px, node_px, indexing="ij")
        nodes = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3) * self.apix  # xyz A, [z, y, x] order
        self.weights, wsum = move_weights(nodes, c, a, self.sigma_A, chunk)
        # voxels the field can reach: the nodes' weight sums interpolated like the field, > 0
        reach = F.interpolate(wsum.reshape(1, 1, self.G, self.G, self.G), size=(D, D, D), mode="trilinear",
                              align_corners=True).reshape(-1)
        self.support = (reach > 0).nonzero().squeeze(1)

    def nodes_field(self, moves_A: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` moves (Angstrom) -> ``(B, 3, G, G, G)`` field (xyz Angstrom) on the nodes."""
        B = moves_A.shape[0]
        m = moves_A.to(self.device, torch.float32).permute(1, 0, 2).reshape(self.n_gauss, B * 3)
        f = torch.sparse.mm(self.weights, m)  # (M, B*3)
        return f.reshape(self.G, self.G, self.G, B, 3).permute(3, 4, 0, 1, 2)

    def field(self, moves_A: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` moves -> ``(B, 3, D, D, D)`` field (xyz Angstrom) at every voxel [z, y, x]."""
        D = self.box
        return F.interpolate(self.nodes_field(moves_A), size=(D, D, D), mode="trilinear", align_corners=True)

    def projected_px(self, moves_A: torch.Tensor, rotations: torch.Tensor, voxels: torch.Tensor | None = None,
                     ) -> torch.Tensor:
        """In-plane image shift ``(B, 2, M)`` (pixels, x then y) ``(A d(x))_{x,y} / apix`` of the
        flat voxel indices ``voxels`` (default all ``D^3``; :attr:`support`: where it can be non-zero)."""
        nf = self.nodes_field(moves_A)  # (B, 3, G, G, G)
        B = nf.shape[0]
        R = rotations.to(self.device, torch.float32)[:, :2, :] / self.apix
        p = torch.einsum("bij,bjm->bim", R, nf.reshape(B, 3, -1)).reshape(B, 2, self.G, self.G, self.G)
        D = self.box
        if voxels is None:
            return F.interpolate(p, size=(D, D, D), mode="trilinear", align_corners=True).reshape(B, 2, -1)
        v = voxels.to(self.device)
        zyx = torch.stack([v // (D * D), (v // D) % D, v % D], dim=1).float() * (2.0 / (D - 1)) - 1.0
        grid = zyx.flip(1).reshape(1, 1, 1, -1, 3).expand(B, 1, 1, -1, 3)  # (x, y, z) order
        return F.grid_sample(p, grid, mode="bilinear", align_corners=True)[:, :, 0, 0, :]


def default_field_sigma_A(sigmas_A, apix: float) -> float:
    """The larger of the neutral Gaussians' median width and 2 pixels (Angstrom)."""
    s = np.asarray(sigmas_A, np.float64)
    return float(max(2.0 * apix, np.median(s) if s.size else 0.0))


def _tiled(img: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, S, S)`` repeated 3 x 3 (the periodic continuation :func:`_sample` reads)."""
    return img.repeat(1, 1, 3, 3)


def _sample(tiled: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(B, C, M)`` of periodic images at pixel coordinates ``uv`` ``(B, 2, M)``
    (x then y; pixel ``i`` at ``i``), from their :func:`_tiled` form ``(B, C, 3S, 3S)``;
    coordinates are valid within ``[-S, 2S)`` (a backprojection reaches ``0.87 S`` from the centre)."""
    S3 = tiled.shape[-1]
    S = S3 // 3
    grid = (uv + S) * (2.0 / (S3 - 1)) - 1.0  # align_corners=True: pixel centres at -1..1
    out = F.grid_sample(tiled, grid.permute(0, 2, 1).unsqueeze(1), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[:, :, 0, :]


class DeformedBackprojector:
    """Real-space accumulator of a motion-corrected reconstruction (module docstring).

    ``numerator`` and ``weight`` are ``(D, D, D)`` [z, y, x] volumes on ``device``."""

    def __init__(self, box: int, apix: float, device="cpu", oversample: int = 2, formulation: str = "hybrid",
                 pad: int = 2):
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        self.box, self.apix, self.oversample = int(box), float(apix), int(oversample)
        self.formulation = formulation
        self.device = torch.device(device)
        D = self.box
        self.numerator = torch.zeros(D ** 3, device=self.device)
        self.weight = torch.zeros(D ** 3, device=self.device)
        hybrid = formulation == "hybrid"
        self.undeformed = torch.zeros(D ** 3, device=self.device) if hybrid else None
        self.fourier = Backprojector(box, apix, pad, self.device) if hybrid else None
        self.count = 0
        r = torch.arange(D, device=self.device, dtype=torch.float32) - D // 2
        zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
        self._xyz = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)  # voxel coordinates, px from the centre
        ky = torch.fft.fftfreq(D, d=1.0 / D, device=self.device)
        kx = torch.fft.rfftfreq(D, d=1.0 / D, device=self.device)
        self._nyquist = ((kx[None, :] ** 2 + ky[:, None] ** 2) <= (D // 2) ** 2).float()

    def insert(self, Fimg: torch.Tensor, rotations: torch.Tensor, ctf: torch.Tensor | None, ctf_mode: str = "full",
               premultiplied: torch.Tensor | None = None, shift_px: torch.Tensor | None = None,
               voxels: torch.Tensor | None = None) -> None:
        """Insert a batch: ``Fimg`` ``(B, D, D//2+1)`` transforms with the origin shift undone,
        ``rotations`` ``(B, 3, 3)``, ``ctf`` as :meth:`reconstruct.Backprojector.insert`;
        ``shift_px`` ``(B, 2, M)`` the in-plane image shift from the deformation of the flat voxel
        indices ``voxels`` ``(M,)`` (default all ``D^3``; elsewhere the shift is zero), from
        :meth:`DisplacementField.projected_px` (None: no deformation)."""
        if ctf_mode not in CTF_MODES:
            raise ValueError(f"ctf_mode must be one of {CTF_MODES}, got {ctf_mode!r}")
        B = Fimg.shape[0]
        if B == 0:
            return
        dev, D = self.device, self.box
        X = Fimg.to(dev)
        if ctf_mode == "none" or ctf is None:
            num, w = X, torch.ones(X.shape, device=dev)
        else:
            c = ctf.to(device=dev, dtype=torch.float32)
            if ctf_mode == "full":
                num = X * c
                if premultiplied is not None and bool(premultiplied.any()):
                    num = torch.where(premultiplied.to(dev).reshape(B, 1, 1), X, num)
            elif ctf_mode == "phase_flipped":
                num = X * c.abs()
            else:
                num = X
            w = c * c
        img = self._upsampled(num * self._nyquist)
        psf = self._upsampled((w * self._nyquist).to(torch.complex64))
        R = rotations.to(device=dev, dtype=torch.float32)
        o = self.oversample
        uv = torch.einsum("mk,bik->bim", self._xyz, o * R[:, :2, :]) + o * D // 2  # (B, 2, D^3) undeformed
        hybrid = self.fourier is not None
        if hybrid:  # plain insertion + (deformed - undeformed) backprojection where the field acts
            self.fourier.insert(X, R, ctf, ctf_mode, premultiplied)
            self.weight += _sample(_tiled(psf[:, None]), uv)[:, 0].sum(0)
            if shift_px is not None:
                vox = torch.arange(D ** 3, device=dev) if voxels is None else voxels.to(dev)
                uvs = uv[:, :, vox]
                both = torch.cat([uvs + o * shift_px.to(dev), uvs], dim=2)
                vals = _sample(_tiled(img[:, None]), both)[:, 0].sum(0)
                n = vox.numel()
                self.numerator.index_add_(0, vox, vals[:n])
                self.undeformed.index_add_(0, vox, vals[n:])
        else:
            if shift_px is None:
                vals = _sample(_tiled(torch.stack([img, psf], 1)), uv).sum(0)
                self.weight += vals[1]
                self.numerator += vals[0]
            else:
                self.weight += _sample(_tiled(psf[:, None]), uv)[:, 0].sum(0)
                full = torch.zeros_like(uv)
                if voxels is None:
                    full = o * shift_px.to(dev)
                else:
                    full[:, :, voxels.to(dev)] = o * shift_px.to(dev)
                self.numerator += _sample(_tiled(img[:, None]), uv + full)[:, 0].sum(0)
        self.count += B

    def _upsampled(self, Fh: torch.Tensor) -> torch.Tensor:
        """Real images ``(B, oD, oD)`` (origin at pixel ``oD//2``) from half transforms ``(B, D, D//2+1)``
        by zero-padding in Fourier space (``oversample`` times finer pixels, same values)."""
        D, o = self.box, self.oversample
        if o == 1:
            return fourier_to_image(Fh, D)
        P = o * D
        out = torch.zeros(Fh.shape[0], P, P // 2 + 1, dtype=Fh.dtype, device=Fh.device)
        h = D // 2
        out[:, :h, :h + 1] = Fh[:, :h, :h + 1]
        out[:, P - h:, :h + 1] = Fh[:, D - h:, :h + 1]
        return fourier_to_image(out, P) * (o * o)

    def merged(self, other: "DeformedBackprojector") -> "DeformedBackprojector":
        out = DeformedBackprojector.__new__(DeformedBackprojector)
        out.__dict__.update(self.__dict__)
        out.numerator = self.numerator + other.numerator
        out.weight = self.weight + other.weight
        if self.fourier is not None:
            out.undeformed = self.undeformed + other.undeformed
            out.fourier = self.fourier.merged(other.fourier)
        out.count = self.count + other.count
        return out

    def reconstruct(self, reg_frac: float = DEFAULT_REG_FRAC) -> np.ndarray:
        """The map ``(D, D, D)`` [z, y, x] float32 (module docstring)."""
        D = self.box
        dims = (0, 1, 2)
        num = self.numerator if self.fourier is None else self.numerator - self.undeformed
        N = torch.fft.rfftn(torch.fft.ifftshift(num.reshape(D, D, D).double(), dim=dims))
        W = torch.fft.rfftn(torch.fft.ifftshift(self.weight.reshape(D, D, D).double(), dim=dims)).real.clamp(min=0)
        shells = torch.as_tensor(shell_index_3d(D).astype(np.int64), device=self.device)
        nmax = int(shells.max()) + 1
        wsum = torch.zeros(nmax, dtype=torch.float64, device=self.device).index_add_(0, shells.reshape(-1),
                                                                                       W.reshape(-1))
        cnt = torch.bincount(shells.reshape(-1), minlength=nmax).double()
        lam = reg_frac * (wsum / cnt.clamp(min=1))[shells]
        denom = W + lam
        inside = (shells <= D // 2) & (denom > 0)
        V = torch.where(inside, N / torch.where(inside, denom, torch.ones_like(denom)), torch.zeros_like(N))
        vol = torch.fft.fftshift(torch.fft.irfftn(V, s=(D, D, D)), dim=dims).float().cpu().numpy()
        return vol if self.fourier is None else self.fourier.reconstruct(reg_frac) + vol


class ModelMoves:
    """Per-particle Gaussian moves from a trained model: ``moves(rows)`` -> ``(B, N, 3)``
    Angstrom, the decoded centres at the particles' latents minus the neutral centres.

    ``model``: :class:`train.TrainedModel`; ``latents``: ``(n_star_rows, K)``, row ``i`` the
    latent of star row ``i`` (rows of the other half may hold anything: they are not read)."""

    def __init__(self, model, latents: np.ndarray):
        self.model = model
        self.latents = np.asarray(latents, np.float32)
        c0, a0, s0 = model.neutral.tensors(model.device)
        self.centers_A, self.amplitudes, self.sigmas_A = c0, a0, s0
        self.zero = False  # True: the significance gate (motion_gate) rejected the moves
        self.gate = None

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        if self.zero:
            return torch.zeros(len(rows), self.centers_A.shape[0], 3, device=self.centers_A.device)
        with torch.no_grad():
            c = self.model.decode(torch.as_tensor(self.latents[rows]))[0]
        return c - self.centers_A[None]


def reconstruct_motion_corrected(meta, moves: dict, rows=None, *, images=None, halves: np.ndarray | None = None,
                                 seed: int = 0, reg_frac: float = DEFAULT_REG_FRAC, batch_size: int | None = None,
                                 device="cpu", ctf_mode: str | None = None, field_sigma_A: float | None = None,
                                 formulation: str = "hybrid", progress: bool = True,
                                 mask: bool = True) -> Reconstruction:
    """Motion-corrected reconstruction of the particles ``rows`` (default all) of ``meta``.

    ``moves``: ``{1: M1, 2: M2}``, for each half a callable ``M(star_rows) -> (B, N, 3)``
    Gaussian moves in Angstrom with attributes ``centers_A`` ``(N, 3)``, ``amplitudes`` and
    ``sigmas_A`` (:class:`ModelMoves`; give the same object twice only when the halves' FSC
    need not be honest). ``halves``, ``ctf_mode``, ``mask`` as
    :func:`reconstruct.reconstruct_particles`; ``field_sigma_A`` the interpolation width of the
    displacement field (default :func:`default_field_sigma_A`); ``formulation`` one of
    :data:`FORMULATIONS` (module docstring). Returns a
    :class:`reconstruct.Reconstruction`."""
    t0 = time.time()
    rows, images, h = select_rows(meta, rows, images, halves, seed)
    if not ((h == 1).any() and (h == 2).any()):
        raise InputError("particle subset: all particles fall in one half set; a motion-corrected map needs both")
    ctf_mode = normalise_ctf_mode(ctf_mode) or ctf_mode_of(meta)
    box, apix = int(meta.box), float(meta.apix)
    bs = batch_size or max(1, min(64, (1 << 22) // box ** 3))
    dev = torch.device(device)
    bps = {h: DeformedBackprojector(box, apix, dev, formulation=formulation) for h in (1, 2)}
    done, last_log, fields = 0, time.time(), {}
    for half, r, Fimg, R, ctf, pm in particle_batches(meta, images, rows, h, ctf_mode, bs, dev):
        mv = moves[half]
        if half not in fields:  # one field per half model, built when its half starts
            sigma = field_sigma_A or default_field_sigma_A(np.asarray(torch.as_tensor(mv.sigmas_A).cpu()), apix)
            fields[half] = DisplacementField(torch.as_tensor(mv.centers_A).cpu().numpy(),
                                             torch.as_tensor(mv.amplitudes).cpu().numpy(), box, apix, sigma, dev)
        field = fields[half]
        if getattr(mv, "zero", False):  # gated: no deformation (the plain insertion)
            bps[half].insert(Fimg, R, ctf, ctf_mode, pm)
        else:
            bps[half].insert(Fimg, R, ctf, ctf_mode, pm, field.projected_px(mv(r), R, field.support),
                             field.support)
        done += r.size
        if progress and time.time() - last_log > 10:
            log.info("motion-corrected reconstruction: %d / %d particles (%.1f /s)", done, rows.size,
                     done / max(1e-9, time.time() - t0))
            last_log = time.time()
    rec = finish_reconstruction(bps, h, apix, reg_frac, mask, seed)
    rec.seconds = time.time() - t0
    return rec


# ----------------------------------------------------------------------------- half-set models
def _training_info(train_dir: str) -> dict:
    from ..io.outputs import TrainFolder
    folder = TrainFolder(train_dir)
    if not folder.is_finished():
        raise InputError(f"{train_dir}: no finished training there; give the output folder of a finished "
                         "'gmmhet train'")
    return folder.read_config()


def latents_for_rows(meta, train_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """``(latents (n_star_rows, K), found (n_star_rows,) bool)``: the training run's latent of
    every row of ``meta`` whose particle was among the run's training particles, matched by
    particle identity (the run's recorded keys, :mod:`io.pairing`: Scipion's particle id or
    the image), never by row position: ``meta`` may hold them in any order, with others."""
    from ..io.outputs import TrainFolder
    from ..io.pairing import latent_rows_for, latents_for
    info = _training_info(train_dir)
    if int(info.get("n_ops", 1)) != 1:
        raise InputError(f"{train_dir}: trained with symmetry expansion; motion-corrected maps need a C1 training")
    folder = TrainFolder(train_dir)
    lat = folder.read_latents()
    keys = folder.read_particle_keys()
    recorded = keys is not None
    if not recorded:  # a run from before the recorded keys
        keys = _training_star_keys(info, train_dir, len(lat))
    elif len(keys) != len(lat):
        raise InputError(f"{train_dir}: {len(keys)} recorded particle keys but {len(lat)} latent rows; the "
                         "training folder is inconsistent, retrain the half model into a new folder")
    star_keys = _star_keys(meta, keys, train_dir)
    found = pd.Series(star_keys).isin(keys).to_numpy()
    out = np.zeros((len(meta), lat.shape[1]), np.float32)
    if not found.any():
        return out, found
    if recorded:
        rows = latent_rows_for(meta.subset(np.flatnonzero(found)), folder, 1, n_latent_rows=len(lat))
    else:
        rows = _rows_by_keys(star_keys[found], keys, train_dir)
    if rows is None:
        raise InputError(f"{meta.source}: some particles appear more often than in the training of {train_dir}; "
                         "remove the repeated rows from the star")
    out[found] = latents_for(lat, rows)
    return out, found


def _star_keys(meta, train_keys: np.ndarray, train_dir: str) -> np.ndarray:
    """The keys of ``meta``'s particles of the kind the training recorded (id or image)."""
    if not (train_keys.size and str(train_keys[0]).startswith("id:")):
        return meta.particle_keys("image")
    if "rlnGmmhetParticleId" not in meta.particles.columns:
        raise InputError(f"{meta.source}: no rlnGmmhetParticleId column, but {train_dir} knows its particles by "
                         "Scipion particle id; give the star exported with the particles (it has that column)")
    return meta.particle_keys("id")


def _training_star_keys(info: dict, train_dir: str, n_rows: int) -> np.ndarray:
    """The particle keys of a run that predates their record: its training star's, when that
    star is still there with one row per latent row (it may have been rewritten: warned)."""
    import os
    from ..io.metadata import read_particles
    star = info.get("particles")
    if not star or not os.path.exists(star):
        raise InputError(f"{train_dir}: no recorded particle keys and its training star {star!r} is gone; "
                         "restore it or retrain the half model")
    keys = read_particles(star).particle_keys()
    if len(keys) != n_rows:
        raise InputError(f"{train_dir}: {n_rows} latent rows but its training star {star} has {len(keys)} "
                         "particles; restore the star it was trained on or retrain the half model")
    log.warning("%s predates recorded particle keys: its particles are identified through its training star %s "
                "(retrain the half model if that star was rewritten after the training)", train_dir, star)
    return keys


def _rows_by_keys(star_keys: np.ndarray, train_keys: np.ndarray, train_dir: str) -> np.ndarray | None:
    """Training row of each of ``star_keys`` (all among ``train_keys``); None when one repeats."""
    index = pd.Index(train_keys)
    if not index.is_unique:
        raise InputError(f"{train_dir}: its training star names a particle twice; retrain the half model")
    if pd.Index(star_keys).has_duplicates:
        return None
    return index.get_indexer(star_keys).astype(np.int64)


def half_moves(meta, halves: np.ndarray, half_dirs: dict, device="cpu", gate_z: float | None = DEFAULT_GATE_Z,
               ) -> dict:
    """``{1: ModelMoves, 2: ModelMoves}`` from two training folders, each trained on its own
    half set; every particle of a half must be in its model's training star. ``gate_z``: the
    significance gate of :mod:`motion_gate` (a half model whose moves do not predict the other
    half's particles, split in Fourier space, by ``gate_z`` standard errors gets zero
    displacement); None or 0: no gate."""
    from ..training.trained import load_trained
    out = {}
    for h, d in half_dirs.items():
        lat, found = latents_for_rows(meta, d)
        missing = int(((halves == h) & ~found).sum())
        if missing:
            raise InputError(f"{d}: {missing} particle(s) of half {h} were not in this model's training star; "
                             f"train it on the half-{h} particles (rlnRandomSubset = {h})")
        other = int(((halves != h) & found).sum())
        if other:
            raise InputError(f"{d}: trained on {other} particle(s) of the other half; the half maps' FSC would be "
                             f"inflated. Train it on the half-{h} particles only")
        out[h] = ModelMoves(load_trained(d, device), lat)
        if gate_z:
            out[h].gate = gate_model(out[h].model, meta, np.flatnonzero(halves != h), gate_z, device)
            out[h].zero = not out[h].gate.passed
            log.info("half %d model %s: %s", h, d, out[h].gate.reason)
    return out


def train_half_models(meta, halves: np.ndarray, train_dir: str, out_dir: str, device="cpu",
                      epochs: int | None = None) -> dict:
    """Train one model per half set with ``train_dir``'s settings and neutral GMM, into
    ``out_dir/half1`` and ``out_dir/half2`` (half stars ``out_dir/halfN.star``); a finished
    one is reused, an interrupted one resumed. Returns ``{1: dir, 2: dir}``."""
    import os
    from ..io.atomic import make_output_dir
    from ..io.metadata import write_particles
    from ..model.gmm import GMM
    from ..io.data import Particles
    from ..training.config import TrainConfig
    from ..training.train import train
    info = _training_info(train_dir)
    cfg = TrainConfig.from_dict(info["train"])
    if epochs:
        cfg.epochs = int(epochs)
    if cfg.mask and not os.path.exists(cfg.mask):
        raise InputError(f"{train_dir}: its focus mask {cfg.mask} is gone; restore it")
    from ..io.outputs import TrainFolder
    neutral = GMM.load(TrainFolder(train_dir).gmm)
    dirs = {}
    for h in (1, 2):
        d = os.path.join(out_dir, f"half{h}")
        dirs[h] = d
        if TrainFolder(d).is_finished():
            log.info("half %d: reusing the model in %s", h, d)
            continue
        make_output_dir(d, "--halves-dir")
        star = os.path.join(out_dir, f"half{h}.star")
        write_particles(star, meta.subset(np.flatnonzero(halves == h)))
        log.info("half %d: training on %d particles -> %s", h, int((halves == h).sum()), d)
        particles = Particles.from_star(star, symmetry=cfg.symmetry, ctf_mode=cfg.ctf_mode, device=device)
        train(particles, neutral, cfg, d, resume=os.path.isdir(os.path.join(d, "checkpoints")), star_path=star)
    return dirs
