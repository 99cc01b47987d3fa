"""Training settings (:class:`TrainConfig`), their defaults, and the choice of the training band.

Defaults and why (see :class:`TrainConfig`):

- ``zdim 4``: e2gmm's default; enough for several independent motions/compositions.
- ``lr 1e-4``, Adam: e2gmm's rate; with LeakyReLU and the f(z) - f(0) decoder it converges in a
  few tens of epochs without the oscillations larger rates give on noisy data.
- ``batch_size 0`` (auto): 64 on the CPU (small enough for many Adam steps per epoch on
  5k-particle sets, large enough that each step is one batched matrix product); on one GPU a
  short memory/throughput probe (:func:`batching.probe_batch_size`) doubles it while a step
  fits, gains >= 10% particles/s and leaves >= 32 steps per epoch, and the learning rate is
  then scaled by ``batch / 64`` (``lr`` is the rate at batch 64; :func:`batching.scaled_lr`: on
  2,000 simulated particles, 15 epochs, |Spearman| 0.923 at batch 64 and at 256, 0.913 at 512).
  An explicit ``batch_size`` is used as given, with ``lr`` as given.
- GPU data path (``loader 'auto'``): on CUDA the epoch visits the items in blocks of 64
  consecutive items in random block order (:func:`io.loader.block_shuffled_order`: contiguous
  reads) on ``loader_threads`` reader threads into reused pinned buffers (:class:`io.loader.
  BatchLoader`), and the feature table sits on the GPU when it fits; on the CPU one prefetch
  thread and the plain permutation (results as before). ``log_every`` steps: the running loss
  is read back (the only host synchronisation inside an epoch).
- ``proj_precision 'fp32'``: precision of the projection's matrix product (``bf16``/``fp16``:
  :func:`gmm.project`; float32 geometry and accumulation; benchmarks/results/precision_*.md).
- ``epochs 30``: the validation loss of 5k-particle sets flattens after 20-30 epochs.
- ``loss corr``: one correlation over every Fourier coefficient of the band (the white-noise
  Gaussian likelihood with the best scale), in the loss and in the encoder's gradient inputs;
  e2gmm's ring-averaged FRC (``loss frc``) weights a ring of 6 pixels like one of 70, so the
  noisy outer rings count as much as the signal-rich inner ones (measurements: README,
  benchmarks/bench_science.py, 1AKE hinge at zdim 4).
- ``prior kl``, ``kl_weight``: the encoder gives a posterior mean and width per latent
  dimension; KL(posterior || N(0, I)) in nats, weighted against the (unitless) similarity, lets
  a dimension that carries no signal collapse onto the prior (means ~0), so the leading latent
  direction is the motion; summary.json's effective dimension counts the directions that carry
  signal. ``prior l2``: e2gmm's fixed ``latent_noise 0.05`` and ``latent_reg 1e-3`` |z|^2
  penalty (used only then).
- early stopping: the model of the epoch with the lowest validation loss is kept (latent.npy,
  model.pt; ``best`` in loss.csv): on 6,000 particles with the l2 prior the validation loss
  rises after ~12 epochs while the training loss keeps falling.
- band ``lowres_A = 100`` (e2gmm's default minimum resolution; lower rings hold the
  particle's overall envelope, shared by every state) to ``highres_A`` from the model and the
  data (:func:`auto_highres`): the neutral GMM's resolution, or coarser where the particles
  carry no signal even together (the mean per-particle FRC of the neutral model over the
  sampled particles no longer 3 standard errors above 0: ``3 / sqrt(pi k n)`` at ring k with n
  particles). The likelihood adds every ring's information, however weak in one particle, so
  the band runs to where the model itself stops (simulator, 12 A GMM at 3 A/px, SNR 0.1: the
  band to 12 A gave |Spearman| 0.929 / 0.974 on two seeds against 0.918 / 0.941 when it
  stopped where one particle's FRC met its noise level, at 17.5 A). ``loss frc`` keeps e2gmm's
  rule (last ring with per-particle FRC >= min(0.5, 0.6 x peak)), where equal ring weights make
  noisy rings costly (it stopped at 19 A on the 1AKE hinge, 8 A GMM, 1.5 A/px). Give
  ``highres_A`` to override; the reason is logged and written to summary.json.
- ``center 'auto'``: before anything else each particle's shift is checked against the neutral
  GMM's projection (a shift-only local search with refine's evidence test, kept only when the
  half maps agree better with the corrections, :mod:`training.centering`) and the corrections
  are used for the features and the loss: shift
  errors of ~1 px otherwise become the latent space (MD-like 1AKE hinge, SNR 0.1: |Spearman|
  0.32 with shifts off by a median 1.14 px, 0.93 centred, 0.938 at exact shifts). ``'off'``:
  the star's shifts as they are.
- ``latent_estimate 'posterior'``: after training, each particle's latent is the posterior mean
  over a few dozen decoded latent states, weighted by the white-noise likelihood of its image
  (:mod:`training.latent_posterior`; 1AKE hinge, SNR 0.1: |Spearman| 0.958 -> 0.962, kNN R2
  0.904 -> 0.920). ``'encoder'``: the encoder's latents.
- ``finer_model 'auto'``: when the particles' reconstruction at their poses is finer than 0.8 x
  the neutral GMM's build resolution, train first on the given GMM, then a second network, started
  from the first, on a GMM of the motion-corrected reconstruction in a band to its resolution
  (:mod:`training.finer_model`; SNR 0.1, neutral built at 8 A: 1AKE hinge |Spearman| 0.962 ->
  0.973, MD-like 0.944 -> 0.957, two independent motions 0.952 / 0.807 -> 0.961 / 0.842, at 3-5x
  the training time; otherwise it trains once). ``'off'``: train once on the given GMM.
- ``val_fraction 0.05``: a seeded 5% of particles (all symmetry copies of a particle go to the
  same side) never trains; its loss is logged every epoch to spot over-fitting.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..device import AdaptiveBatch
from ..errors import InputError
from ..io.data import Particles
from ..io.outputs import gmm_file
from ..model.fourier import RingBinner
from ..model.gmm import GMM, project

log = logging.getLogger(__name__)

FRC_AUTO_THRESHOLD = 0.5
PRIORS = ("kl", "l2")
FINER_MODELS = ("off", "auto")  # gmmhet train --finer-model (training/finer_model.py)


@dataclass
class TrainConfig:
    zdim: int = 4
    epochs: int = 30
    batch_size: int = 0
    lr: float = 1e-4
    changes: tuple = ("positions", "amplitudes")
    hidden: int = 512
    layers: int = 3
    dropout: float = 0.0
    batchnorm: bool = False
    latent_noise: float = 0.05
    latent_reg: float = 1e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.05
    seed: int = 0
    lowres_A: float = 100.0
    highres_A: float | None = None
    pos_scale_A: float | None = None
    features: str = "cache"
    ctf_mode: str = "auto"
    symmetry: str = "C1"
    mask: str | None = None
    n_stats: int = 1000
    keep_checkpoints: int = 2
    amp: str = "off"
    compile: bool = False
    prefetch: bool = True
    loader: str = "auto"
    loader_threads: int = 4
    log_every: int = 200
    proj_precision: str = "fp32"
    loss: str = "corr"
    prior: str = "kl"
    kl_weight: float = 1e-3
    center: str = "auto"
    latent_estimate: str = "posterior"
    finer_model: str = "auto"  # train again on a finer GMM of the data when it reaches finer (finer_model.py)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["changes"] = list(self.changes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "changes" in d:
            d["changes"] = tuple(d["changes"])
        return cls(**d)


def load_gmm(path: str) -> GMM:
    """A GMM from ``gmm.npz`` or a directory holding one (``gmmhet build``'s output)."""
    p = gmm_file(path)
    if not os.path.exists(p):
        raise InputError(f"--gmm {path}: no gmm.npz there; give the output folder of 'gmmhet build' or its gmm.npz")
    try:
        return GMM.load(p)
    except Exception as exc:  # corrupt / not a GMM file
        raise InputError(f"--gmm {p}: not a readable gmm.npz ({type(exc).__name__}); "
                         "rebuild it with 'gmmhet build'") from None


def default_band(neutral: GMM, apix: float, box: int, lowres_A: float | None, highres_A: float | None):
    """Training band in Angstrom (see the module docstring), clipped to what the box holds."""
    if highres_A is None:
        for key in ("resolution_A", "target_resolution_A", "resolution"):
            try:
                highres_A = float(neutral.info[key])
                break
            except (KeyError, TypeError, ValueError):
                continue
    if highres_A is None:
        highres_A = max(4.0 * apix, 8.0)
    highres_A = max(float(highres_A), 2.0 * apix)
    lowres_A = 100.0 if lowres_A is None else float(lowres_A)
    lowres_A = min(lowres_A, box * apix / 1.0)  # at least ring 1
    if lowres_A <= highres_A:
        raise InputError(f"--lowres {lowres_A} / --highres {highres_A}: the low-resolution limit must be coarser "
                         "(larger, in Angstrom) than the high-resolution one")
    return lowres_A, highres_A


def band_last_ring(curve: np.ndarray, lo_ring: int, n_particles: int, loss: str) -> tuple[int, str]:
    """Last ring (1-based) of the training band from the mean per-particle FRC ``curve``.

    ``curve[k - 1]`` is ring k's FRC between the neutral model's projections and the particles,
    averaged over ``n_particles``. ``loss 'corr'`` (the likelihood): every ring where the mean is
    more than 3 standard errors above 0, ``3 / sqrt(pi k n)`` (a real image's ring k holds ~pi k
    independent coefficients). ``loss 'frc'`` (equal ring weights): e2gmm's rule, last ring with
    per-particle FRC >= min(0.5, 0.6 x peak). At least 3 rings from ``lo_ring``. Returns
    (ring, rule in words).
    """
    curve = np.asarray(curve, dtype=np.float64)
    rings = np.arange(1, len(curve) + 1)
    if loss == "frc":
        peak = float(curve[lo_ring - 1:].max()) if len(curve) >= lo_ring else 0.0
        threshold = np.full(len(curve), min(FRC_AUTO_THRESHOLD, 0.6 * peak))
        rule = f"last ring with per-particle FRC >= {threshold[0]:.2f}"
    else:
        threshold = 3.0 / np.sqrt(np.pi * rings * max(int(n_particles), 1))
        rule = (f"last ring where the mean FRC of {n_particles} particles is 3 standard errors above 0, "
                "3/sqrt(pi k n)")
    below = np.nonzero((curve < threshold) & (rings >= lo_ring))[0]
    last_ring = int(below[0]) if below.size else len(curve)  # curve[i] is ring i + 1
    return max(last_ring, lo_ring + 2), rule


def auto_highres(particles: Particles, neutral: GMM, cfg: TrainConfig, n_sample: int = 512) -> tuple[float, list]:
    """Data-driven high-resolution limit of the training band, Angstrom.

    The mean per-particle FRC between the neutral GMM's projections (at the particles' poses,
    with their CTFs) and a seeded sample of particles is computed per ring; the band ends where
    :func:`band_last_ring` finds no signal left, and never finer than the GMM's resolution
    (when recorded) or Nyquist. Returns (highres_A, curve).
    """
    rng = np.random.default_rng([int(cfg.seed), 13])
    n_items = len(particles)
    items = np.sort(rng.choice(n_items, size=min(n_sample, n_items), replace=False))
    particles.crop(None)
    binner = RingBinner(particles.box, particles.apix, None, None, device=particles.device)
    c0, a0, s0 = neutral.tensors(particles.device)
    total = torch.zeros(binner.n_rings, device=particles.device, dtype=torch.float64)

    @torch.no_grad()
    def step(i0, i1):
        b = particles.batch(items[i0:i1])
        F = project(c0, a0, s0, b.rotations, particles.box, particles.apix, b.origins_A, b.ctf)
        total.add_(binner.frc(F, b.F_img).double().sum(0))

    AdaptiveBatch(cfg.batch_size, "training band (per-particle FRC)", particles.device).run(len(items), step)
    curve = (total / len(items)).cpu().numpy()
    lo_ring = max(1, int(np.ceil(particles.box * particles.apix / (cfg.lowres_A or 100.0))))
    last_ring, rule = band_last_ring(curve, lo_ring, len(items), cfg.loss)
    highres = data_limit = particles.box * particles.apix / last_ring
    model_limit = _gmm_resolution(neutral)
    reason = f"particles' signal ({rule}) to {data_limit:.1f} A"
    if model_limit is not None and model_limit > highres:
        highres = model_limit
        reason = f"the neutral GMM's resolution {model_limit:.1f} A (the {reason})"
    log.info("per-particle FRC of the neutral model by ring: %s -> training band up to %.1f A: %s",
             " ".join(f"{v:.2f}" for v in curve[:max(last_ring + 4, 8)]), highres, reason)
    cfg.extra = {**(cfg.extra or {}), "band_reason": reason}
    return float(highres), [round(float(v), 4) for v in curve]


def _gmm_resolution(neutral: GMM) -> float | None:
    """The resolution the neutral GMM was built to (``gmmhet build``'s target), or None."""
    for key in ("target_resolution_A", "resolution_A"):
        try:
            return float(neutral.info[key])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def split_items(n_particles: int, n_ops: int, val_fraction: float, seed: int):
    """Seeded particle-level split -> (train items, val items), each sorted."""
    rng = np.random.default_rng([int(seed), 7])
    perm = rng.permutation(n_particles)
    n_val = int(round(val_fraction * n_particles)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n_particles > 1 else 0), n_particles - 1)
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    expand = lambda rows: (rows[:, None] * n_ops + np.arange(n_ops)[None]).reshape(-1)  # noqa: E731
    return expand(train_rows), expand(val_rows)


def fingerprint(cfg: TrainConfig, particles: Particles, neutral: GMM, star_path: str | None) -> dict:
    keys = ("changes", "ctf_mode", "symmetry", "mask", "lowres_A", "highres_A", "n_stats", "seed", "center")
    fp = {k: cfg.to_dict()[k] for k in keys}
    fp.update(n_items=len(particles), box=particles.box, apix=round(particles.apix, 6), n_gauss=len(neutral),
              gmm_sum=round(float(np.abs(neutral.centers_A).sum() + neutral.amplitudes.sum()
                                  + neutral.sigmas_A.sum()), 3),
              star=os.path.abspath(star_path) if star_path else None)
    return fp
