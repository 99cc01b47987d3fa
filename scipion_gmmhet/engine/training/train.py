"""Training the heterogeneity network, its checkpoints, and loading a trained model.

Loss (per particle, averaged over a batch): ``-FRC(P(decoder(encoder(g) + noise)), image)``,
the decoded GMM projected at the particle's pose with its CTF (see :mod:`features` for the
``ctf_mode``s) and compared over the rings between ``lowres_A`` and ``highres_A``, plus
``latent_reg * |z|^2``. ``g`` are the gradient features of :mod:`features`.

Defaults and why (see :class:`TrainConfig`):

- ``zdim 4``: e2gmm's default; enough for several independent motions/compositions.
- ``lr 1e-4``, Adam: e2gmm's rate; with LeakyReLU and the f(z) - f(0) decoder it converges in a
  few tens of epochs without the oscillations larger rates give on noisy data.
- ``batch_size 64``: small enough for many Adam steps per epoch on 5k-particle sets, large
  enough that each step is one batched matrix product (the GPU path may use 256+).
- ``epochs 30``: the validation loss of 5k-particle sets flattens after 20-30 epochs.
- ``latent_noise 0.05`` (fixed, non-trainable: e2gmm's continuity noise) and
  ``latent_reg 1e-3`` (keeps latents near the origin, so that noise of fixed size matters).
- band ``lowres_A = 100`` (e2gmm's default minimum resolution; lower rings hold the
  particle's overall envelope, shared by every state) to ``highres_A`` chosen from the data
  (:func:`auto_highres`: the last ring where the mean per-particle FRC of the neutral model
  is >= min(0.5, 0.6 x its peak), never finer than the GMM's resolution). Rings where one
  particle has no signal only add noise to an equally-weighted ring average: on simulated
  SNR 0.1 data (2,000 particles) a 30 A band gave |Spearman| 0.92 where the GMM's 12 A gave
  0.85, and on 5,000 particles a band one ring finer (27 A instead of 32 A) gave 0.89 instead
  of 0.92. Give ``highres_A`` to override.
- ``val_fraction 0.05``: a seeded 5% of particles (all symmetry copies of a particle go to the
  same side) never trains; its loss is logged every epoch to spot over-fitting.

Reproducibility: initial weights depend on ``seed`` only; the order of particles, the latent
noise and dropout in epoch ``e`` depend only on ``(seed, e)``. Checkpoints hold the model and
the optimiser state after each complete epoch, so ``--resume`` reproduces an uninterrupted run
exactly on CPU.

Reliability: a bounded sample of the images is checked for NaN/Inf pixels before anything
else, and every batch when it is read (:meth:`features.Particles.batch`). Every file is
written atomically (:mod:`atomic`: temporary file + rename; a full disk is a one-line
InputError). Device out-of-memory halves the physical batch (:class:`features.AdaptiveBatch`):
a training batch is then processed in chunks whose gradients add up to the batch's (same
batch size, same Adam steps; bit-identical to a run started with that chunk size), and a
batch of 1 that does not fit is an InputError naming the settings to lower.

GPU path (all optional; the defaults give the float32 results above):

- ``amp`` (``--amp off|bf16|fp16``, default off): the encoder and decoder MLPs (the model's
  forward) run under ``torch.autocast`` in bfloat16 or float16; their outputs are cast to
  float32 before the GMM projection, and the projection, the FRC (:class:`fourier.RingBinner`)
  and the loss stay in float32, so the FRC's ring sums keep their accuracy. The validation loss
  uses the same precision; ``latent.npy`` is encoded in float32. fp16 uses a
  ``torch.amp.GradScaler`` (loss scaling; a step whose gradients overflow is skipped) and is
  refused on the CPU; bf16 needs no scaling (float32's exponent range) and runs on both.
- ``compile`` (``--compile``): the encoder's and decoder's MLPs go through ``torch.compile``,
  tried once on a dummy batch (forward and backward) before training; a failure (no C
  compiler, no Triton, an unsupported torch) is a logged warning and training runs eagerly.
  Checkpoints and ``model.pt`` hold the plain modules' parameters (no ``_orig_mod.`` names).
- ``prefetch`` (default on, ``--no-prefetch`` to turn off): the images (and cached features)
  of the next batches of the epoch's seeded order are read on one background thread, two
  batches ahead (:mod:`prefetch`), into pinned host memory on CUDA and copied with
  ``non_blocking=True``; only the reading overlaps the training, so results are bit-identical
  with or without it.
- batch size: ``--batch-size`` particles per Adam step; on CUDA the physical chunk starts at
  the batch size (a whole batch in one forward/backward) and halves on out-of-memory (see
  Reliability below), so a large ``--batch-size`` (256+) fills the GPU without a separate
  chunk setting.

Several processes (``torchrun``, :mod:`distributed`): each takes its share of every global
batch of the same seeded order, the loss is scaled so that DDP's gradient average is the
global batch's mean, rank 0 writes the files, the latents are gathered in star order.

Files in the output directory: ``config.json``, ``gmm.npz`` (copy of the neutral model),
``features.f16`` + ``features.json`` (cache), ``feature_stats.npz``, ``checkpoints/epoch_NNNN.pt``
(last two kept), ``loss.csv`` (epoch, train_loss, val_loss, seconds), ``model.pt`` (trained
model + config), ``latent.npy`` (float32, n_items x zdim; row ``i * n_ops + s`` = particle row
``i`` of the star with symmetry operator ``s``; without symmetry row ``i`` = particle ``i``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..io import atomic
from .distributed import Dist
from ..errors import InputError
from .features import (AdaptiveBatch, FeatureCache, GradientFeatures, HostBatch, Particles, feature_param_types,
                       focus_mask_gaussians, is_oom)
from ..model.fourier import RingBinner
from ..model.gmm import GMM, project
from ..model.networks import HetModel, parse_changes
from .prefetch import Prefetcher

log = logging.getLogger(__name__)

MODEL_FILE_VERSION = 1
FRC_AUTO_THRESHOLD = 0.5


@dataclass
class TrainConfig:
    zdim: int = 4
    epochs: int = 30
    batch_size: int = 64
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


# ---------------------------------------------------------------------------------------------
# small helpers

def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def load_gmm(path: str) -> GMM:
    """A GMM from ``gmm.npz`` or a directory holding one (``gmmhet build``'s output)."""
    p = os.path.join(path, "gmm.npz") if os.path.isdir(path) else path
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


def auto_highres(particles: Particles, neutral: GMM, cfg: TrainConfig, n_sample: int = 512) -> tuple[float, list]:
    """Data-driven high-resolution limit of the training band.

    The mean per-particle FRC between the neutral GMM's projections and a seeded sample of
    particles is computed per ring; the band ends before the first ring (from the band's
    low-resolution end) where it falls below ``min(0.5, 0.6 x its peak)``: 0.5 means a single
    particle's signal-to-noise ratio in the ring is about 1; the relative limit keeps a band on
    very noisy data whose per-particle FRC never reaches 0.5. Finer rings hold mostly noise for
    one particle and,
    since the loss averages rings with equal weight, they only dilute the signal of
    domain-level heterogeneity. Never finer than the GMM's resolution (when recorded) or
    Nyquist; at least 3 rings above the low-resolution limit. Returns (highres_A, curve).
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
    peak = float(curve[lo_ring - 1:].max()) if len(curve) >= lo_ring else 0.0
    threshold = min(FRC_AUTO_THRESHOLD, 0.6 * peak)
    below = np.nonzero((curve < threshold) & (np.arange(len(curve)) >= lo_ring - 1))[0]
    last_ring = int(below[0]) if below.size else len(curve)  # curve[k] is ring k + 1
    last_ring = max(last_ring, lo_ring + 2)
    highres = particles.box * particles.apix / last_ring
    for key in ("target_resolution_A", "resolution_A"):
        try:
            highres = max(highres, float(neutral.info[key]))
            break
        except (KeyError, TypeError, ValueError):
            continue
    log.info("per-particle FRC of the neutral model by ring: %s -> training band up to %.1f A (last ring with "
             "FRC >= %.2f)", " ".join(f"{v:.2f}" for v in curve[:max(last_ring + 4, 8)]), highres, threshold)
    return float(highres), [round(float(v), 4) for v in curve]


def _atomic_save(obj, path: str) -> None:
    atomic.torch_save(obj, path)


def _atomic_text(text: str, path: str) -> None:
    atomic.write_text(path, text)


def _atomic_npy(arr: np.ndarray, path: str) -> None:
    atomic.save_npy(path, arr)


def split_items(n_particles: int, n_ops: int, val_fraction: float, seed: int):
    """Seeded particle-level split -> (train items, val items), each sorted."""
    rng = np.random.default_rng([int(seed), 7])
    perm = rng.permutation(n_particles)
    n_val = int(round(val_fraction * n_particles)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n_particles > 1 else 0), n_particles - 1)
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    expand = lambda rows: (rows[:, None] * n_ops + np.arange(n_ops)[None]).reshape(-1)  # noqa: E731
    return expand(train_rows), expand(val_rows)


class _FeatureSource:
    """Features for items from the disk cache or on the fly, plus the images' batch.

    ``read(items)`` is the host half (images and cached feature rows into host memory; safe on
    the prefetch thread), ``load(host)`` the device half; calling the source does both."""

    def __init__(self, particles: Particles, feats: GradientFeatures, cache: FeatureCache | None, device):
        self.particles, self.feats, self.cache, self.device = particles, feats, cache, device

    def read(self, items: np.ndarray) -> HostBatch:
        host = self.particles.read(items)
        if self.cache is not None:
            host.features = self.cache.read(items, self.device)
        return host

    def load(self, host: HostBatch):
        b = self.particles.to_device(host)
        x = FeatureCache.to_device(host.features, self.device) if host.features is not None else self.feats(b)
        return x, b

    def __call__(self, items: np.ndarray):
        return self.load(self.read(items))


AMP_MODES = ("off", "bf16", "fp16")


class _Amp:
    """Mixed precision of the model's forward (``--amp``, see the module docstring): an autocast
    context for the MLPs, and loss scaling (``torch.amp.GradScaler``) for fp16."""

    def __init__(self, mode: str, device: torch.device):
        mode = str(mode or "off").lower()
        if mode not in AMP_MODES:
            raise InputError(f"--amp {mode!r}: give one of {', '.join(AMP_MODES)}")
        device = torch.device(device)
        if mode == "fp16" and device.type != "cuda":
            raise InputError(f"--amp fp16: float16 training needs a CUDA device (the device is {device}); "
                             "use --amp bf16 or --amp off")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16 or --amp off")
        self.mode, self.device_type = mode, device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = _grad_scaler() if mode == "fp16" else None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """Context for the model's forward: autocast to ``dtype``, or nothing when off."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def install(self, model: HetModel) -> None:
        """Make the encoder's and decoder's MLPs return float32 (a forward hook), so that the
        latents, the decoder's ``f(z) - f(0)`` and the GMM parameters built from them are float32
        under autocast. No effect on float32 outputs; parameters and state_dict unchanged."""
        if self.enabled:
            for net in (model.encoder.net, model.decoder.net):
                net.register_forward_hook(_float32_output)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Adam step; with loss scaling the gradients are unscaled first and a step whose
        gradients hold Inf/NaN is skipped (the scale is then lowered)."""
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()


def _grad_scaler():
    try:
        return torch.amp.GradScaler("cuda")
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


def _float32_output(module, inputs, output):
    return output.float()


def _autocast(amp: _Amp | None):
    return amp.autocast() if amp is not None else contextlib.nullcontext()


def _compile_mlps(model: HetModel, n_features: int, device: torch.device, amp: _Amp | None) -> bool:
    """``torch.compile`` the encoder's and decoder's MLPs in place (their ``forward``; module
    names and state_dict unchanged) and try them once, forward and backward, on a dummy batch of
    2; on failure restore the eager modules and log a warning. The trial leaves the parameters,
    buffers, gradients and random number generators as they were. Returns True when compiled."""
    nets = (model.encoder.net, model.decoder.net)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for net in nets:
            net.forward = torch.compile(net.forward, **_compile_options())
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x = torch.ones((2, n_features), device=device)
            with _autocast(amp):
                z, (c, a, s) = model(x)
            (z.float().sum() + c.float().sum() + a.float().sum() + s.float().sum()).backward()
        ok = True
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train eagerly
        for net in nets:
            net.__dict__.pop("forward", None)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning("--compile: torch.compile failed (%s: %s); training without it", type(exc).__name__, first)
        ok = False
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    if ok:
        log.info("--compile: encoder and decoder MLPs compiled with torch.compile")
    return ok


def _compile_options() -> dict:
    """Each compiled MLP keeps its own graphs (train/eval, grad/no-grad, the decoder's zero row,
    static then dynamic batch: ~6 each; both MLPs share one code object, whose default limit of
    8 graphs would send the later ones back to eager mode)."""
    import inspect
    params = inspect.signature(torch.compile).parameters
    if "isolate_recompiles" in params and "recompile_limit" in params:
        return {"isolate_recompiles": True, "recompile_limit": 32}
    cfg = torch._dynamo.config  # older torch: one process-wide limit
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(int(getattr(cfg, name, 8)), 32))
    return {}


def _frc_loss(model: HetModel, binner: RingBinner, x, b, box: int, apix: float, noise: float, gen,
              latent_reg: float):
    z, (c, a, s) = model(x, noise, gen)
    F = project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf)
    frc = binner.mean_frc(F, b.F_img)
    loss = -frc.mean()
    if latent_reg > 0:
        loss = loss + latent_reg * (z * z).sum(1).mean()
    return loss, frc, z


def _chunk_step(model, binner: RingBinner, x, b, box: int, apix: float, noise_std: float, noise,
                latent_reg: float, scale: float, amp: _Amp | None = None):
    """Forward and backward of one chunk of a training batch: the loss is the chunk's SUM of
    per-particle losses (``-FRC + latent_reg |z|^2``) times ``scale`` (1 / global batch size,
    times the number of processes under DDP), so the gradients of a batch's chunks (and
    processes) add up to the gradient of the mean over the global batch. With ``amp`` the
    model's forward runs under autocast and everything after it in float32 (loss scaling for
    fp16). Returns the chunk's per-particle FRC (detached)."""
    with _autocast(amp):
        z, (c, a, s) = model(x, noise_std, None, noise)
    z, c, a, s = z.float(), c.float(), a.float(), s.float()  # no-ops without amp
    F = project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf)
    frc = binner.mean_frc(F, b.F_img)
    loss = -frc.sum()
    if latent_reg > 0:
        loss = loss + latent_reg * (z * z).sum()
    if amp is not None:
        amp.backward(loss * scale)
    else:
        (loss * scale).backward()
    return frc.detach()


def _share(n: int, dist: Dist) -> tuple[np.ndarray, float]:
    """This process's positions in a global batch of ``n`` particles and its loss scale
    (``world_size / n``, see :func:`_chunk_step`); a process without particles (more processes
    than particles in a last batch) gets a zero-weight dummy of one particle."""
    pos = dist.shard(n) if dist.enabled else np.arange(n)
    if len(pos) == 0:
        return np.arange(1), 0.0
    return pos, dist.world_size / n


def _train_batch(model, ddp, binner, source: _FeatureSource, host: HostBatch, pos: np.ndarray, scale: float,
                 noise: torch.Tensor | None, cfg: "TrainConfig", box: int, apix: float, chunk: AdaptiveBatch,
                 amp: _Amp | None = None) -> torch.Tensor:
    """Gradients of one global batch into the parameters' ``.grad``, in chunks of ``chunk.size``
    particles: ``host`` holds this process's particles of it (positions ``pos`` in the global
    batch, loss scale ``scale``: :func:`_share`), read by ``source.read``. Returns the summed
    ``-FRC`` of this process's particles."""
    my_noise = noise[torch.as_tensor(pos, device=noise.device)] if noise is not None else None
    total = torch.zeros((), device=binner.onehot.device)
    starts = list(range(0, len(host), chunk.size))
    for k, i0 in enumerate(starts):
        sel = slice(i0, i0 + chunk.size)
        x, b = source.load(host[sel])
        sync = contextlib.nullcontext() if (ddp is None or k == len(starts) - 1) else ddp.no_sync()
        with sync:
            frc = _chunk_step(ddp if ddp is not None else model, binner, x, b, box, apix, cfg.latent_noise,
                              None if my_noise is None else my_noise[sel], cfg.latent_reg, scale, amp)
        if scale > 0:
            total = total + (-frc).sum()
    return total


def _checkpoints(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "epoch_*.pt")))


def _fingerprint(cfg: TrainConfig, particles: Particles, neutral: GMM, star_path: str | None) -> dict:
    keys = ("changes", "ctf_mode", "symmetry", "mask", "lowres_A", "highres_A", "n_stats", "seed")
    fp = {k: cfg.to_dict()[k] for k in keys}
    fp.update(n_items=len(particles), box=particles.box, apix=round(particles.apix, 6), n_gauss=len(neutral),
              gmm_sum=round(float(np.abs(neutral.centers_A).sum() + neutral.amplitudes.sum()
                                  + neutral.sigmas_A.sum()), 3),
              star=os.path.abspath(star_path) if star_path else None)
    return fp


# ---------------------------------------------------------------------------------------------
# training

def train(particles: Particles, neutral: GMM, cfg: TrainConfig, out_dir: str, resume: bool = False,
          star_path: str | None = None, dist: Dist | None = None) -> dict:
    """Train on ``particles`` (already on their device) from the ``neutral`` GMM; write the
    output directory described in the module docstring. Returns a summary dict.

    ``dist``: the process group (:mod:`distributed`) when launched by ``torchrun`` with several
    processes; every process calls this with the same arguments, rank 0 writes the files.
    Device out-of-memory halves the physical batch (chunk) size and carries on: a batch is
    then processed in chunks whose gradients add up to the whole batch's, so the optimisation
    (batch size, number of Adam steps) is unchanged (see :class:`features.AdaptiveBatch`).
    """
    dist = dist if dist is not None else Dist(device=particles.device)
    main = dist.is_main
    device = particles.device
    if cfg.zdim < 1:
        raise InputError(f"--zdim {cfg.zdim}: the latent dimension must be at least 1")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    if particles.box != neutral.box or abs(particles.apix - neutral.apix) > 1e-3 * neutral.apix:
        raise InputError(f"--gmm: built for box {neutral.box} at {neutral.apix:.4f} A/px but the particles are "
                         f"box {particles.box} at {particles.apix:.4f} A/px; rebuild the GMM from a map "
                         "sampled like the particles")
    if particles.n_particles < 2:
        raise InputError(f"--particles: {particles.n_particles} particle(s); training needs at least 2")
    amp = _Amp(cfg.amp, device)
    cfg.amp = amp.mode
    # NaN/Inf pixels: a bounded sample now (every batch is checked again when it is read)
    particles.check_finite_sample(256, name=star_path, seed=cfg.seed)
    cfg.changes = parse_changes(cfg.changes)
    cfg.ctf_mode = particles.ctf_mode
    frc_curve = None
    if cfg.highres_A is None:
        cfg.highres_A, frc_curve = auto_highres(particles, neutral, cfg)
    cfg.lowres_A, cfg.highres_A = default_band(neutral, particles.apix, particles.box, cfg.lowres_A, cfg.highres_A)
    if cfg.pos_scale_A is None:
        cfg.pos_scale_A = 0.1 * neutral.box * neutral.apix
    fingerprint = _fingerprint(cfg, particles, neutral, star_path)
    if main:
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    err = None
    if resume and os.path.exists(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json")) as f:
            old = json.load(f)
        if old.get("fingerprint") != fingerprint or any(
                old["train"].get(k) != cfg.to_dict()[k] for k in ("zdim", "batch_size", "lr", "hidden", "layers",
                                                                   "latent_noise", "latent_reg", "val_fraction")):
            err = InputError(f"--resume: {out_dir} holds a run with other inputs or settings; give the same "
                             "settings, or a new --out without --resume")
    dist.raise_if_any(err)
    if not resume and main:
        for p in _checkpoints(out_dir):
            os.remove(p)

    mobile_np = focus_mask_gaussians(neutral, cfg.mask)
    mobile = torch.as_tensor(mobile_np, device=device)
    particles.crop(cfg.highres_A)
    binner = RingBinner(particles.fbox, particles.fapix, cfg.lowres_A, cfg.highres_A, device=device)
    feats = GradientFeatures(neutral, binner, mobile, feature_param_types(cfg.changes), device)
    info = {"train": cfg.to_dict(), "fingerprint": fingerprint, "n_particles": particles.n_particles,
            "n_ops": particles.n_ops, "n_items": len(particles), "n_gaussians": len(neutral),
            "n_mobile": int(mobile.numel()), "n_features": feats.n_features, "rings": [binner.lo, binner.hi],
            "particles": os.path.abspath(star_path) if star_path else None, "device": str(device),
            "n_processes": dist.world_size, "particle_frc_per_ring": frc_curve,
            "model_file_version": MODEL_FILE_VERSION}
    if main:
        _atomic_text(json.dumps(info, indent=1), os.path.join(out_dir, "config.json"))
        neutral.save(os.path.join(out_dir, "gmm.npz"))
    log.info("training on %d particles x %d symmetry operators, %d Gaussians (%d may change: %s), %d features, "
             "band %.1f-%.1f A (rings %d-%d, Fourier crop %d -> %d px), ctf %s, device %s, %d process(es)",
             particles.n_particles, particles.n_ops, len(neutral), mobile.numel(), ",".join(cfg.changes),
             feats.n_features, cfg.lowres_A, cfg.highres_A, binner.lo, binner.hi, particles.box, particles.fbox,
             particles.ctf_mode, device, dist.world_size)

    # feature normalisation statistics (seeded sample; every process computes the same), then the cache
    stats_path = os.path.join(out_dir, "feature_stats.npz")
    stats = _load_stats(stats_path, fingerprint)
    if stats is None:
        t0 = time.time()
        rng = np.random.default_rng([int(cfg.seed), 11])
        n_items = len(particles)
        sample = np.sort(rng.choice(n_items, size=min(cfg.n_stats, n_items), replace=False))
        stats = feats.estimate_stats(particles, sample, cfg.batch_size)
        if main:
            _save_stats(stats, fingerprint, stats_path)
        log.info("feature statistics from %d particles in %.1f s (rms: %s)", len(sample), time.time() - t0,
                 ", ".join(f"{k} {v:.3g}" for k, v in stats["scale"].items()))
    else:
        feats.set_stats(stats)
    dist.barrier()
    cache = None
    if cfg.features == "cache":
        cache = FeatureCache(out_dir)
        ok = cache.load(fingerprint)
        if dist.enabled:  # all processes must agree before rank 0 may rebuild it
            flag = dist.all_reduce_sum(torch.tensor([float(ok)], device=dist._coll_device()))
            ok = float(flag) == dist.world_size
        if not ok:
            t0 = time.time()
            cache.build(feats, particles, max(cfg.batch_size, 64), fingerprint, dist=dist if dist.enabled else None)
            dt = time.time() - t0
            log.info("gradient features of %d items cached in %s (%.1f s, %.0f particles/s)", len(particles),
                     cache.path, dt, len(particles) / max(dt, 1e-9))
    elif cfg.features != "onthefly":
        raise InputError(f"--features {cfg.features!r}: give cache or onthefly")
    source = _FeatureSource(particles, feats, cache, device)

    train_items, val_items = split_items(particles.n_particles, particles.n_ops, cfg.val_fraction, cfg.seed)
    torch.manual_seed(int(cfg.seed))
    c0, a0, s0 = neutral.tensors(device)
    model = HetModel(feats.n_features, cfg.zdim, c0, a0, s0, mobile, cfg.changes, cfg.pos_scale_A, cfg.hidden,
                     cfg.layers, cfg.dropout, cfg.batchnorm).to(device)
    try:  # the fused kernel is ~3x faster than the default on CPU (and on GPU); same algorithm
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, start_epoch, resumed_chunk = [], 0, None
    if resume:
        ckpts = _checkpoints(out_dir)
        if ckpts:
            ck = torch.load(ckpts[-1], map_location=device, weights_only=False)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if amp.scaler is not None and ck.get("grad_scaler"):
                amp.scaler.load_state_dict(ck["grad_scaler"])
            history, start_epoch = ck["history"], int(ck["epoch"])
            resumed_chunk = ck.get("chunk_size")
            log.info("resuming from %s (epoch %d done)", ckpts[-1], start_epoch)
        else:
            log.info("--resume: no checkpoint in %s; starting from scratch", out_dir)
    dist.barrier()  # nobody reads a checkpoint that rank 0 is about to replace
    amp.install(model)
    compiled = bool(cfg.compile) and _compile_mlps(model, feats.n_features, device, amp)
    ddp = None
    if dist.enabled:
        import inspect
        DDP = torch.nn.parallel.DistributedDataParallel
        # the buffers (neutral GMM, mobile list) are identical constants on every process
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **sync)
    local_batch = -(-cfg.batch_size // dist.world_size)
    chunk = AdaptiveBatch(min(local_batch, int((cfg.extra or {}).get("max_chunk", local_batch)),
                              int(resumed_chunk or local_batch)), "training step", device)
    if chunk.size < local_batch:
        log.info("training batches of %d processed in chunks of %d particles", cfg.batch_size, chunk.size)

    t_train = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        rng = np.random.default_rng([int(cfg.seed), 1, epoch])
        order = rng.permutation(train_items)
        gen = torch.Generator(device=device)
        gen.manual_seed(int(cfg.seed) * 1000003 + epoch)
        torch.manual_seed(int(cfg.seed) * 7919 + epoch)  # dropout
        model.train()
        total = torch.zeros((), device=device)
        batches = [np.sort(order[i:i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
        if cfg.batchnorm:
            batches = [items for items in batches if len(items) >= 2]
        shares = [_share(len(items), dist) for items in batches]
        reads = [items[pos] for items, (pos, _) in zip(batches, shares)]  # this process's particles
        with Prefetcher(source.read, reads, depth=2, enabled=cfg.prefetch) as loader:
            for items, (pos, scale), host in zip(batches, shares, loader):
                noise = (torch.randn((len(items), cfg.zdim), generator=gen, device=device)
                         if cfg.latent_noise > 0 else None)
                while True:
                    try:
                        opt.zero_grad(set_to_none=True)
                        step_total = _train_batch(model, ddp, binner, source, host, pos, scale, noise, cfg,
                                                  particles.fbox, particles.fapix, chunk, amp)
                        break
                    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
                        if not is_oom(exc):
                            raise
                        del exc
                        opt.zero_grad(set_to_none=True)
                        chunk.shrink()  # InputError at chunk size 1
                amp.step(opt)
                total = total + step_total
        train_loss = float(dist.all_reduce_sum(total.detach().reshape(1).clone())) / len(order)
        val_loss = evaluate_loss(model, source, binner, val_items, cfg.batch_size, particles.fbox, particles.fapix,
                                 dist=dist, amp=amp)
        dt = time.time() - t0
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "seconds": dt})
        rate = len(order) / max(dt, 1e-9)
        eta = dt * (cfg.epochs - epoch - 1)
        log.info("epoch %d/%d  train loss %.5f  val loss %.5f  %.0f particles/s  ETA %.0f s", epoch + 1, cfg.epochs,
                 train_loss, val_loss, rate, eta)
        if main:
            ck_path = os.path.join(out_dir, "checkpoints", f"epoch_{epoch + 1:04d}.pt")
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                          "history": history, "config": cfg.to_dict(), "chunk_size": chunk.size,
                           "grad_scaler": amp.scaler.state_dict() if amp.scaler is not None else None}, ck_path)
            for old in _checkpoints(out_dir)[:-max(1, cfg.keep_checkpoints)]:
                os.remove(old)
            _write_loss_csv(history, os.path.join(out_dir, "loss.csv"))

    t_lat = time.time()
    n_all = len(particles)
    lo, hi = dist.block(n_all)
    z = encode_items(model, source, np.arange(lo, hi), max(cfg.batch_size, 256))
    z = dist.gather_rows(z, n_all)
    if main:
        _write_loss_csv(history, os.path.join(out_dir, "loss.csv"))
        _atomic_npy(z, os.path.join(out_dir, "latent.npy"))
        _atomic_save(_model_payload(model, cfg, feats, mobile_np, info), os.path.join(out_dir, "model.pt"))
    dist.barrier()
    log.info("wrote %s (%d x %d) in %.1f s; training %.1f s", os.path.join(out_dir, "latent.npy"), z.shape[0],
             z.shape[1], time.time() - t_lat, time.time() - t_train)
    return {"history": history, "latent": z, "config": cfg.to_dict(), "info": info, "chunk_size": chunk.size,
            "compiled": compiled}


def _write_loss_csv(history: list, path: str) -> None:
    lines = ["epoch,train_loss,val_loss,seconds"]
    lines += [f"{h['epoch']},{h['train_loss']:.6f},{h['val_loss']:.6f},{h['seconds']:.3f}" for h in history]
    _atomic_text("\n".join(lines) + "\n", path)


def _save_stats(stats: dict, fingerprint: dict, path: str) -> None:
    atomic.atomic_write(path, lambda tmp: np.savez(tmp, mean=stats["mean"], scale_json=json.dumps(stats["scale"]),
                                                   n_sample=stats["n_sample"],
                                                   fingerprint=json.dumps(fingerprint, sort_keys=True)),
                        suffix=".tmp.npz")


def _load_stats(path: str, fingerprint: dict):
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        if str(z["fingerprint"]) != json.dumps(fingerprint, sort_keys=True):
            return None
        return {"mean": z["mean"], "scale": json.loads(str(z["scale_json"])), "n_sample": int(z["n_sample"])}


@torch.no_grad()
def evaluate_loss(model: HetModel, source, binner: RingBinner, items: np.ndarray, batch_size: int, box: int,
                  apix: float, dist: Dist | None = None, amp: _Amp | None = None) -> float:
    """Mean ``-FRC`` over ``items`` with the model in eval mode and no latent noise (nan if none);
    with ``dist``, each process takes its share and the sums are added. With ``amp`` the model's
    forward runs under autocast, the projection and FRC in float32 (as in training)."""
    if len(items) == 0:
        return float("nan")
    n = len(items)
    if dist is not None and dist.enabled:
        items = items[dist.shard(n)]
    was = model.training
    model.eval()
    total = torch.zeros((), device=binner.onehot.device, dtype=torch.float64)

    def step(i0, i1):
        x, b = source(items[i0:i1])
        with _autocast(amp):
            _, (c, a, s) = model(x)
        c, a, s = c.float(), a.float(), s.float()
        total.add_((-binner.mean_frc(project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf), b.F_img)).sum())

    AdaptiveBatch(batch_size, "validation loss", binner.onehot.device).run(len(items), step)
    model.train(was)
    if dist is not None:
        dist.all_reduce_sum(total.reshape(1))
    return float(total) / n


@torch.no_grad()
def encode_items(model: HetModel, source, items: np.ndarray, batch_size: int) -> np.ndarray:
    """Latents ``(len(items), zdim)`` float32 in the order of ``items`` (eval mode, no noise,
    float32 forward: no autocast, whatever the training's ``amp``)."""
    model.eval()
    out = []

    def step(i0, i1):
        sel = items[i0:i1]
        if source.cache is not None:
            x = source.cache.get(sel, source.device)
        else:
            x = source.feats(source.particles.batch(sel))
        out.append(model.encoder(x).float().cpu())

    AdaptiveBatch(batch_size, "encoding latents", source.device).run(len(items), step)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.decoder.zdim), np.float32)


def _model_payload(model: HetModel, cfg: TrainConfig, feats: GradientFeatures, mobile: np.ndarray, info: dict) -> dict:
    return {"version": MODEL_FILE_VERSION, "config": cfg.to_dict(), "info": info,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "n_features": feats.n_features, "mobile": np.asarray(mobile),
            "feature_stats": {"mean": np.asarray(feats.stats["mean"]), "scale": dict(feats.stats["scale"]),
                              "n_sample": int(feats.stats.get("n_sample", 0))}}


# ---------------------------------------------------------------------------------------------
# loading a trained model (the API the analysis, refinement and protocols use)

class TrainedModel:
    """A trained network and its neutral GMM, loaded from a training directory.

    ``neutral``: the neutral :class:`GMM`; ``zdim``; ``config`` (the training settings);
    ``train_dir``. ``decode`` maps latents to GMM parameters, ``gmm_at`` gives one GMM,
    ``latents`` the training latents (``latent.npy``), ``encode_particles`` latents of any star.
    """

    def __init__(self, train_dir: str, device="cpu"):
        path = os.path.join(train_dir, "model.pt")
        if not os.path.exists(path):
            raise InputError(f"--train {train_dir}: no model.pt; give the output folder of a finished 'gmmhet train'")
        self.train_dir = train_dir
        self.device = resolve_device(device)
        payload = torch.load(path, map_location="cpu", weights_only=False)
        self.payload = payload
        self.config = payload["config"]
        self.info = payload.get("info", {})
        self.neutral = GMM.load(os.path.join(train_dir, "gmm.npz"))
        self.zdim = int(self.config["zdim"])
        self.mobile = np.asarray(payload["mobile"])
        c0, a0, s0 = self.neutral.tensors(self.device)
        self.model = HetModel(int(payload["n_features"]), self.zdim, c0, a0, s0,
                              torch.as_tensor(self.mobile, device=self.device), tuple(self.config["changes"]),
                              float(self.config["pos_scale_A"]), int(self.config["hidden"]), int(self.config["layers"]),
                              float(self.config.get("dropout", 0.0)), bool(self.config.get("batchnorm", False)))
        self.model.load_state_dict(payload["state_dict"])
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)

    def decode(self, z: torch.Tensor, grad: bool = False):
        """Latents ``(B, K)`` -> ``centers_A (B, N, 3)``, ``amplitudes (B, N)``, ``sigmas_A (B, N)``
        (on ``self.device``). ``grad=True`` keeps the graph (e.g. to optimise ``z``); the
        network's weights are frozen either way."""
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        if z.dim() == 1:
            z = z[None]
        if z.shape[-1] != self.zdim:
            raise InputError(f"latent point of dimension {z.shape[-1]}; this model's latent space has {self.zdim}")
        with torch.set_grad_enabled(grad):
            return self.model.decoder(z)

    def gmm_at(self, z: np.ndarray) -> GMM:
        """The decoded GMM at one latent point ``(K,)``."""
        if isinstance(z, torch.Tensor):
            z = z.detach().cpu().numpy()
        z = np.asarray(z, dtype=np.float32).reshape(1, -1)
        c, a, s = self.decode(torch.as_tensor(z))
        return GMM(c[0].cpu().numpy(), a[0].cpu().numpy(), s[0].cpu().numpy(), self.neutral.box, self.neutral.apix,
                   {"latent": " ".join(f"{v:.6g}" for v in z.reshape(-1))})

    def latents(self) -> np.ndarray:
        """``latent.npy`` ``(n_items, K)`` of the training run."""
        return np.load(os.path.join(self.train_dir, "latent.npy"))

    def encode_particles(self, star_path: str, device=None, batch_size: int = 256) -> np.ndarray:
        """Latents of the particles of any star (same box/pixel size as the model), with the
        training run's symmetry expansion and CTF mode; features computed on the fly."""
        dev = self.device if device is None else resolve_device(device)
        if dev != self.device:
            self.model.to(dev)
            self.device = dev
        particles = Particles.from_star(star_path, symmetry=self.config.get("symmetry"),
                                        ctf_mode=self.config.get("ctf_mode", "auto"), device=dev)
        if particles.box != self.neutral.box or abs(particles.apix - self.neutral.apix) > 1e-3 * self.neutral.apix:
            raise InputError(f"{star_path}: particles are box {particles.box} at {particles.apix:.4f} A/px but the "
                             f"model is box {self.neutral.box} at {self.neutral.apix:.4f} A/px; use matching particles")
        particles.crop(self.config["highres_A"])
        binner = RingBinner(particles.fbox, particles.fapix, self.config["lowres_A"], self.config["highres_A"],
                            device=dev)
        feats = GradientFeatures(self.neutral, binner, torch.as_tensor(self.mobile),
                                 feature_param_types(self.config["changes"]), dev, stats=self.payload["feature_stats"])
        source = _FeatureSource(particles, feats, None, dev)
        return encode_items(self.model, source, np.arange(len(particles)), batch_size)


def load_trained(train_dir: str, device="cpu") -> TrainedModel:
    """Load the output of ``gmmhet train`` (see :class:`TrainedModel`)."""
    return TrainedModel(train_dir, device)
