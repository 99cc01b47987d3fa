"""A finer reference for pose refinement: a GMM of the particles' own reconstruction, deformed
per particle by the network's decoded motion (``gmmhet refine --reference layered`` / ``fine``).
``gmmhet refine --reference auto`` (``network``, the default) builds the same GMM
(:func:`build_fine_reference`) and retrains the network on it instead, so the motion is
learnt at its resolution (commands/refine.py). ``gmmhet train --finer-model auto`` builds it of
the motion-corrected reconstruction at the input poses (``moves``; training/finer_model.py)
and trains on it.

Why: the neutral GMM the network deforms is built at the training resolution (``gmmhet build
--resolution 8``: ~170 Gaussians for adenylate kinase at 1.5 A/px). It describes the motion
well, but as a reference for a pose search it is coarse. On the 1AKE hinge at SNR 1 (3,000
particles, box 64; poses refined once, then refined again from 1.16 deg median error),
one refinement against

- the decoded 8 A models: 1.11 deg; the same decoder at each particle's TRUE conformation: 1.04;
- the true atomic model at the true conformation: 0.52 (at one fixed conformation: 1.58);
- a 5 A GMM of the particles' reconstruction at the refined poses, each Gaussian moved by the
  decoded motion of the 8 A Gaussians around it (this module): 0.89 (of the clean consensus
  map: 0.80; of the reconstruction at the perturbed input poses: 1.23, a blurred reference
  is worse than the coarse one, hence only from the second round on).

So the decoder, not the encoder, set the floor; this module keeps the decoder's motion and takes
the detail from the data.

Deformation: the displacement of fine Gaussian ``i`` is the weighted mean of the decoded
displacements ``c_j(z) - c_j(neutral)`` of the coarse Gaussians ``j`` (after the decoded model's
rigid gauge, :class:`refine.LatentModels`), with the weights of the motion-corrected map's
displacement field (:func:`motion_corrected.move_weights`: amplitude times
``exp(-|x_i - x_j|^2 / (2 sigma^2))`` within 3 sigma, sigma the larger of the coarse Gaussians'
median width and 2 px; a first version with 8 nearest neighbours and rho 3 / 5 / 8 A gave
0.79 / 0.80 / 0.85 deg against the clean consensus); amplitude changes, when the network makes
them, scale the fine amplitudes by the same weighted mean of the coarse ratios. Widths stay the
fine model's.

Which resolution: where the reconstruction's half maps agree at FSC = 0.5 (masked; the signal
dominates the noise there), but no finer than
:data:`FINEST` x the neutral's (8 A -> 4.8 A: about 4.6x the Gaussians, the search's cost; 4 and
5 A gave the same 0.79-0.80 deg) nor than 2.5 px; the reference is used only when that is finer
than :data:`FINER_THAN` x the neutral GMM's build resolution (``target_resolution_A`` in its info;
a GMM without one is kept as it is).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

FSC_THRESHOLD = 0.5     #: the map is modelled to where its half maps agree at FSC 0.5 (signal dominates)
FINER_THAN = 0.8        #: use a fine reference only when its resolution < 0.8 x the neutral's
FINEST = 0.6            #: ... and no finer than 0.6 x the neutral's (~4.6x its Gaussians: search cost)
NYQUIST_MARGIN = 1.25   #: ... nor than 1.25 x Nyquist (2.5 px)


@dataclass
class FineReference:
    """A GMM of a reconstruction (``gmm``, Angstrom, same box and pixel as the neutral model),
    the resolution it was built at (``resolution_A``) and where it came from (``source``)."""
    gmm: object
    resolution_A: float
    source: str

    def describe(self) -> str:
        return f"{len(self.gmm)} Gaussians at {self.resolution_A:.2f} A from {self.source}"


def neutral_resolution_A(neutral) -> float | None:
    """The build resolution of a neutral GMM (``gmmhet build --resolution``), or None."""
    try:
        return float(neutral.info["target_resolution_A"])
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class FineTarget:
    """The particles' reconstruction at their current poses (``rec``, a
    :class:`reconstruct.Reconstruction`) and the resolution a finer GMM of it is built at
    (``resolution_A``: :func:`fine_target`)."""
    rec: object
    resolution_A: float


def fine_target(meta, neutral, *, device="cpu", ctf_mode: str | None = None, seed: int = 0,
                label: str = "the particles",
                purpose: str = "refining against the decoded models") -> FineTarget | None:
    """Reconstruct the particles of ``meta`` (:class:`metadata.ParticleMetadata`, at their current
    poses); the resolution of a finer GMM of the map (its half maps' FSC 0.5, clamped as the module
    docstring says), or None with a log line (ending in ``purpose``) when that is not finer than
    :data:`FINER_THAN` x the neutral GMM's build resolution (or it records none)."""
    from ..model.fourier import resolution_at_threshold
    from .reconstruct import normalise_ctf_mode, reconstruct_particles
    coarse = neutral_resolution_A(neutral)
    if coarse is None:
        log.info("the neutral GMM records no build resolution; %s", purpose)
        return None
    rec = reconstruct_particles(meta, device=str(device), ctf_mode=normalise_ctf_mode(ctf_mode), progress=False,
                                seed=seed)
    table = rec.fsc_masked if rec.fsc_masked is not None else rec.fsc
    res = resolution_at_threshold(table["freq_invA"], table["fsc"], FSC_THRESHOLD)
    res = max(float(res), FINEST * coarse, NYQUIST_MARGIN * 2.0 * float(meta.apix))
    if not (math.isfinite(res) and res < FINER_THAN * coarse):
        log.info("the reconstruction of %s reaches %.2f A (half-map FSC 0.5), not finer than %.2f x the neutral "
                 "GMM's %.2f A; %s", label, res, FINER_THAN, coarse, purpose)
        return None
    return FineTarget(rec, res)


def build_fine_reference(meta, neutral, *, device="cpu", ctf_mode: str | None = None, seed: int = 0,
                         label: str = "the particles", moves=None,
                         target: FineTarget | None = None) -> FineReference | None:
    """Reconstruct the particles of ``meta`` (:class:`metadata.ParticleMetadata`, at their current
    poses) and build a GMM of the map at its gold-standard resolution, or None (with a log line
    saying why) when that is not finer than the neutral model (module docstring; ``target``: the
    :func:`fine_target` of these particles, when already made).

    ``moves``: each particle's decoded Gaussian moves (:class:`motion_corrected.ModelMoves`, row
    ``i`` = row ``i`` of ``meta``). The GMM is then built of the motion-corrected reconstruction
    (each particle's deformation undone, :func:`motion_corrected.reconstruct_motion_corrected`,
    the same moves for both half sets), at the plain reconstruction's resolution: shared moves
    make the corrected half maps' FSC not independent, so it is not used to pick the resolution. The
    corrected map is used only when its half maps agree (FSC 0.5) to that resolution: with few
    particles its real-space normal equations are ill-conditioned (32 particles a half, box 32:
    26 A against the plain map's 9.3 A; 400 a half: 7.6 against 7.5 A, and closer to the true
    middle state than the plain map)."""
    from ..model.build import build_gmm
    from ..model.fourier import resolution_at_threshold
    from .reconstruct import normalise_ctf_mode

    target = target or fine_target(meta, neutral, device=device, ctf_mode=ctf_mode, seed=seed, label=label)
    if target is None:
        return None
    rec, res = target.rec, target.resolution_A
    source = f"the reconstruction of {label}"
    if moves is not None:
        from .motion_corrected import reconstruct_motion_corrected
        from .reconstruct import half_assignment
        mc = reconstruct_motion_corrected(meta, {1: moves, 2: moves}, halves=half_assignment(meta, seed), seed=seed,
                                          device=str(device), ctf_mode=normalise_ctf_mode(ctf_mode), progress=False)
        mc_table = mc.fsc_masked if mc.fsc_masked is not None else mc.fsc
        mc_res = float(resolution_at_threshold(mc_table["freq_invA"], mc_table["fsc"], FSC_THRESHOLD))
        if math.isfinite(mc_res) and mc_res <= res * (1.0 + 1e-6):
            rec, source = mc, f"the motion-corrected reconstruction of {label}"
            log.info("motion-corrected reconstruction of %s (each particle's decoded motion undone; half maps "
                     "agree to %.2f A): %.0f s", label, mc_res, mc.seconds)
        else:  # too few particles for the deformed backprojection's normal equations (measured at 32 a half)
            log.info("the motion-corrected reconstruction of %s reaches only %.2f A (half-map FSC 0.5), coarser "
                     "than the %.2f A of the finer GMM; its GMM is built of the plain reconstruction",
                     label, mc_res, res)
    vol = np.asarray(rec.volume, dtype=np.float32)
    gmm = build_gmm(vol, float(meta.apix), res, device=str(device), seed=seed).gmm
    gmm.info["source"] = source
    ref = FineReference(gmm, res, source)
    log.info("finer GMM: %s (neutral GMM: %d Gaussians at %.2f A)", ref.describe(), len(neutral),
             neutral_resolution_A(neutral))
    return ref


def nearest_gaussian(points_A, centers_A) -> np.ndarray:
    """Index ``(M,)`` of the nearest of the ``N`` centres ``centers_A`` (Angstrom) to each of the
    ``M`` points ``points_A`` (chunked: never an ``M x N`` matrix larger than 4096 rows)."""
    p = torch.as_tensor(np.asarray(points_A), dtype=torch.float32)
    c = torch.as_tensor(np.asarray(centers_A), dtype=torch.float32)
    return torch.cat([torch.cdist(p[i:i + 4096], c).argmin(1) for i in range(0, len(p), 4096)]).numpy()


def carry_selection(coarse, fine, selection) -> np.ndarray:
    """A selection of GMM ``coarse``'s Gaussians (indices or a boolean mask; e.g. the automatic
    core) carried to GMM ``fine``'s: each fine Gaussian takes its nearest coarse one's membership."""
    from .refine import selection_mask
    return selection_mask(selection, len(coarse))[nearest_gaussian(fine.centers_A, coarse.centers_A)]


def lowpass_width_A(crossover_A: float) -> float:
    """Width ``tau`` (Angstrom) of the Gaussian low-pass ``exp(-2 pi^2 tau^2 k^2)`` that is 1/2 at
    ``k = 1 / crossover_A``: ``tau = crossover_A sqrt(ln 2 / (2 pi^2))`` (1.50 A at 8 A)."""
    return float(crossover_A) * math.sqrt(math.log(2.0) / (2.0 * math.pi ** 2))


def low_passed(centers, amplitudes, sigmas, tau_A: float, sign: float = 1.0):
    """The Gaussians convolved with an isotropic Gaussian of width ``tau_A`` (Angstrom), each one's
    mass ``amplitude sigma^3`` kept: the model's transform times ``exp(-2 pi^2 tau^2 k^2)``
    (``sign`` -1: that, subtracted)."""
    wide = torch.sqrt(sigmas * sigmas + tau_A * tau_A)
    return centers, sign * amplitudes * (sigmas / wide) ** 3, wide


class WarpedModels:
    """Each particle's fine reference (:class:`FineReference` ``fine``) deformed by its decoded
    model (``decoded``: a :class:`refine.LatentModels`); a :class:`refine.ParticleModels`. The
    coarse Gaussians' moves carry to the fine ones by :func:`motion_corrected.move_weights` (the
    motion-corrected map's displacement field, same width :func:`motion_corrected.default_field_sigma_A`).

    ``crossover_A`` (the layered reference, ``gmmhet refine --reference layered``): below this
    resolution the particle's own decoded model stands for it, above it the deformed fine
    reference, with the smooth Gaussian crossover ``L(k) = exp(-2 pi^2 tau^2 k^2)``, 1/2 at
    ``1 / crossover_A`` (:func:`lowpass_width_A`): transform ``L D + (1 - L) F``. Since a Gaussian
    low-pass of a GMM is the same GMM with every width widened (mass kept), the layered model is
    one GMM: the decoded Gaussians widened, the fine Gaussians, and the fine Gaussians widened with
    negative amplitudes (``Nc + 2 Nf`` Gaussians; the pose search's candidates project only
    ``Nc + Nf`` of them and apply the copies as a ``1 - L`` filter, :meth:`layers`; the focus
    subtraction and the optional Adam polish project all). Why: the
    deformed fine reference takes its detail from the consensus map, where a domain that moves far
    is smeared; at the resolution the network was trained to, its decoded models describe that
    domain better. The crossover is the training band's top, where the decoder was fitted to the
    images. Mean log-likelihood of the particles at round 1's poses (band to ~3.7 A, 3,000
    particles, SNR 1), against the decoded models: LID turning a full circle: fine -1.4 nats,
    layered +42.5; MD-like hinge: fine +29.8, layered +32.2. None (``--reference fine``): the
    fine reference at every resolution.
    """

    def __init__(self, decoded, fine, crossover_A: float | None = None):
        from .motion_corrected import default_field_sigma_A, move_weights
        gmm = fine.gmm if isinstance(fine, FineReference) else fine
        self.decoded = decoded
        neutral = decoded.model.neutral
        self.coarse_centers = torch.as_tensor(np.asarray(neutral.centers_A), dtype=torch.float32)
        self.coarse_amplitudes = torch.as_tensor(np.asarray(neutral.amplitudes), dtype=torch.float32)
        self.fine_centers = torch.as_tensor(np.asarray(gmm.centers_A), dtype=torch.float32)
        self.fine_amplitudes = torch.as_tensor(np.asarray(gmm.amplitudes), dtype=torch.float32)
        self.fine_sigmas = torch.as_tensor(np.asarray(gmm.sigmas_A), dtype=torch.float32)
        self.crossover_A = None if crossover_A is None else float(crossover_A)
        self.tau_A = None if crossover_A is None else lowpass_width_A(crossover_A)
        # one row per Gaussian of gaussians(): [decoded widened, fine, fine widened (negative)] when layered
        self.neutral_centers_A = (np.concatenate([np.asarray(neutral.centers_A), np.asarray(gmm.centers_A),
                                                  np.asarray(gmm.centers_A)]) if self.layered
                                  else np.asarray(gmm.centers_A))
        self.n_coarse, self.n_fine = len(self.coarse_centers), len(self.fine_centers)
        self.median_sigma_A = float(np.median(gmm.sigmas_A))  # the search band follows the fine model
        self.sigma_A = default_field_sigma_A(neutral.sigmas_A, neutral.apix)
        self.weights, _ = move_weights(self.fine_centers, self.coarse_centers, self.coarse_amplitudes, self.sigma_A)

    @property
    def layered(self) -> bool:
        """True when the decoded models stand for the particle below :attr:`crossover_A`."""
        return self.crossover_A is not None

    def layers(self) -> tuple[int, int, float] | None:
        """``(n_low, n_fine, tau_A)`` of :meth:`gaussians`' rows when layered (for
        :class:`pose_projector.PoseProjector`: it applies the negative low-passed copies as a
        filter instead of projecting them), else None."""
        return (self.n_coarse, self.n_fine, self.tau_A) if self.layered else None

    def focus(self, coarse_focus: np.ndarray, fine_focus: np.ndarray) -> np.ndarray:
        """Boolean focus over :meth:`gaussians`' rows from one over the coarse (decoded) Gaussians
        ``(Nc,)`` and one over the fine Gaussians ``(Nf,)``."""
        fine_focus = np.asarray(fine_focus, dtype=bool)
        if not self.layered:
            return fine_focus
        return np.concatenate([np.asarray(coarse_focus, dtype=bool), fine_focus, fine_focus])

    def nearest_coarse(self) -> np.ndarray:
        """Index of each fine Gaussian's nearest coarse Gaussian ``(Nf,)`` (to carry a focus)."""
        return nearest_gaussian(self.fine_centers, self.coarse_centers)

    def _on(self, device) -> tuple:
        """The fixed tensors on ``device`` (moved once per device: no copy per batch)."""
        key = str(device)
        if getattr(self, "_cache_key", None) != key:
            self._cache = tuple(t.to(device) for t in (self.coarse_centers, self.coarse_amplitudes, self.fine_centers,
                                                     self.fine_amplitudes, self.fine_sigmas, self.weights))
            self._cache_key = key
        return self._cache

    def gaussians(self, rows, device):
        cc, ca, fc, fa, fs, W = self._on(device)
        c, a, s_dec = self.decoded.gaussians(rows, device)
        B, n = c.shape[0], cc.shape[0]
        moves = torch.cat([c - cc, (a / ca.clamp_min(1e-12))[..., None]], -1)      # (B, Nc, 4)
        fine = torch.sparse.mm(W, moves.permute(1, 0, 2).reshape(n, B * 4)).reshape(-1, B, 4).permute(1, 0, 2)
        warped = (fc + fine[..., :3], fa * fine[..., 3], fs.expand(B, -1).clone())
        if not self.layered:
            return warped
        low = low_passed(c.to(fc.dtype), a.to(fc.dtype), s_dec.to(fc.dtype), self.tau_A)
        minus = low_passed(*warped, self.tau_A, sign=-1.0)
        return tuple(torch.cat(parts, 1) for parts in zip(low, warped, minus))
