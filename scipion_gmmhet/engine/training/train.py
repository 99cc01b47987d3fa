"""The training loop of the heterogeneity network, its checkpoints and statistics files.

Loss (per particle, averaged over a batch): ``-FRC(P(decoder(encoder(g) + noise)), image)``,
the decoded GMM projected at the particle's pose with its CTF (see :mod:`io.data` for the
``ctf_mode``s) and compared over the rings between ``lowres_A`` and ``highres_A``, plus
``latent_reg * |z|^2``. ``g`` are the gradient features of :mod:`features`.

Reproducibility: initial weights depend on ``seed`` only; the order of particles, the latent
noise and dropout in epoch ``e`` depend only on ``(seed, e)``. Checkpoints hold the model and
the optimiser state after each complete epoch, so ``--resume`` reproduces an uninterrupted run
exactly on CPU.

Reliability: a bounded sample of the images is checked for NaN/Inf pixels before anything
else, and every batch when it is read (:meth:`io.data.Particles.batch`). Every file is
written atomically (:mod:`atomic`: temporary file + rename; a full disk is a one-line
InputError). Device out-of-memory halves the physical batch (:class:`device.AdaptiveBatch`):
a training batch is then processed in chunks whose gradients add up to the batch's (same
batch size, same Adam steps; bit-identical to a run started with that chunk size), and a
batch of 1 that does not fit is an InputError naming the settings to lower.

Acceleration (``--amp``, ``--compile``): :mod:`acceleration`; settings, defaults and the band:
:mod:`config`; loading the result: :mod:`trained`.

Data path:

- ``prefetch`` (default on, ``--no-prefetch`` to turn off): the images (and cached features)
  of the next batches of the epoch's seeded order are read on one background thread, two
  batches ahead (:mod:`prefetch`), into pinned host memory on CUDA and copied with
  ``non_blocking=True``; only the reading overlaps the training, so results are bit-identical
  with or without it.
- batch size: ``--batch-size`` particles per Adam step (0: automatic, see :mod:`config`); on
  CUDA the physical chunk starts at the batch size and halves on out-of-memory (Reliability).
- on CUDA (``loader``): block-shuffled order, ``loader_threads`` reader threads into reused
  pinned buffers (:mod:`io.loader`), features in batches of 1,024 and held on the GPU when they
  fit (:func:`batching.resident_rows`); the loss is summed on the device and read back every
  ``log_every`` steps and per epoch only; a NaN/Inf loss stops the run with one line.

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
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..device import AdaptiveBatch, is_oom
from ..errors import InputError
from ..io.data import HostBatch, Particles
from ..io.loader import BatchLoader, block_shuffled_order
from ..io.outputs import TrainFolder
from ..io.torch_files import json_field, load_torch_file
from ..model.fourier import LOSSES, RingBinner
from ..model.gmm import GMM, project, projection_precision
from ..model.networks import HetModel, parse_changes
from .acceleration import Amp, autocast, compile_mlps
from .centering import center_for_training
from .latent_posterior import final_latents
from .batching import MIN_STEPS_PER_EPOCH, REFERENCE_BATCH, probe_batch_size, resident_rows, scaled_lr
from .config import PRIORS, TrainConfig, auto_highres, default_band, fingerprint as run_fingerprint, split_items
from .distributed import Dist
from .features import FeatureCache, FeatureSource, GradientFeatures, feature_param_types, focus_mask_gaussians
from .prefetch import Prefetcher
from .selection import keep_best as _keep_best, restore_best as _restore_best, run_summary as _run_summary
from .trained import MODEL_FILE_VERSION, encode_items, model_payload

log = logging.getLogger(__name__)


def _frc_loss(model: HetModel, binner: RingBinner, x, b, box: int, apix: float, noise: float, gen,
              latent_reg: float):
    z, (c, a, s) = model(x, noise, gen)
    F = project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf)
    frc = binner.score(F, b.F_img)
    loss = -frc.mean()
    if latent_reg > 0:
        loss = loss + latent_reg * (z * z).sum(1).mean()
    return loss, frc, z


def _chunk_step(model, binner: RingBinner, x, b, box: int, apix: float, noise_std: float, noise,
                latent_reg: float, scale: float, amp: Amp | None = None, kl_weight: float = 0.0):
    """Forward and backward of one chunk of a training batch: the loss is the chunk's SUM of
    per-particle losses (``-FRC + latent_reg |z|^2``) times ``scale`` (1 / global batch size,
    times the number of processes under DDP), so the gradients of a batch's chunks (and
    processes) add up to the gradient of the mean over the global batch. With ``amp`` the
    model's forward runs under autocast and everything after it in float32 (loss scaling for
    fp16). Returns the chunk's per-particle FRC (detached)."""
    with autocast(amp):
        z, (c, a, s) = model(x, noise_std, None, noise)
    z, c, a, s = z.float(), c.float(), a.float(), s.float()  # no-ops without amp
    F = project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf, precision=_proj(amp))
    frc = binner.score(F, b.F_img)
    loss = -frc.sum()
    net = getattr(model, "module", model)  # under DDP
    if net.variational:
        loss = loss + kl_weight * net.kl_terms.float().sum()
    elif latent_reg > 0:
        loss = loss + latent_reg * (z * z).sum()
    if amp is not None:
        amp.backward(loss * scale)
    else:
        (loss * scale).backward()
    return frc.detach()


def _proj(amp: Amp | None) -> str:
    return getattr(amp, "projection", "fp32") if amp is not None else "fp32"


def _share(n: int, dist: Dist) -> tuple[np.ndarray, float]:
    """This process's positions in a global batch of ``n`` particles and its loss scale
    (``world_size / n``, see :func:`_chunk_step`); a process without particles (more processes
    than particles in a last batch) gets a zero-weight dummy of one particle."""
    pos = dist.shard(n) if dist.enabled else np.arange(n)
    if len(pos) == 0:
        return np.arange(1), 0.0
    return pos, dist.world_size / n


def _train_batch(model, ddp, binner, source: FeatureSource, host: HostBatch, pos: np.ndarray, scale: float,
                 noise: torch.Tensor | None, cfg: "TrainConfig", box: int, apix: float, chunk: AdaptiveBatch,
                 amp: Amp | None = None) -> torch.Tensor:
    """Gradients of one global batch into the parameters' ``.grad``, in chunks of ``chunk.size``
    particles: ``host`` holds this process's particles of it (positions ``pos`` in the global
    batch, loss scale ``scale``: :func:`_share`), read by ``source.read``. Returns the summed
    ``-FRC`` of this process's particles."""
    my_noise = noise
    if noise is not None and not (len(pos) == len(noise) and pos[-1] == len(pos) - 1):  # one process: all of it
        my_noise = noise[torch.as_tensor(pos).to(noise.device, non_blocking=True)]
    total = torch.zeros((), device=binner.onehot.device)
    starts = list(range(0, len(host), chunk.size))
    for k, i0 in enumerate(starts):
        sel = slice(i0, i0 + chunk.size)
        x, b = source.load(host[sel])
        sync = contextlib.nullcontext() if (ddp is None or k == len(starts) - 1) else ddp.no_sync()
        with sync:
            frc = _chunk_step(ddp if ddp is not None else model, binner, x, b, box, apix, cfg.latent_noise,
                              None if my_noise is None else my_noise[sel], cfg.latent_reg, scale, amp,
                              cfg.kl_weight)
        if scale > 0:
            total = total + (-frc).sum()
    return total


@dataclass
class _Run:
    """What one training run's steps share (built by :func:`train`)."""
    particles: Particles
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    amp: Amp
    binner: RingBinner
    source: FeatureSource
    model: HetModel
    opt: torch.optim.Optimizer
    ddp: object = None
    chunk: AdaptiveBatch | None = None
    best: dict | None = None     # {'epoch', 'val_loss', 'state'}: the model at the best validation loss


def train(particles: Particles, neutral: GMM, cfg: TrainConfig, out_dir: str, resume: bool = False,
          star_path: str | None = None, dist: Dist | None = None, warm_start=None,
          centering_from: TrainFolder | None = None) -> dict:
    """Train on ``particles`` (already on their device) from the ``neutral`` GMM; write the
    output directory described in the module docstring. Returns a summary dict.

    ``dist``: the process group (:mod:`distributed`) when launched by ``torchrun`` with several
    processes; every process calls this with the same arguments, rank 0 writes the files.
    Device out-of-memory halves the physical batch (chunk) size and carries on: a batch is
    then processed in chunks whose gradients add up to the whole batch's, so the optimisation
    (batch size, number of Adam steps) is unchanged (see :class:`device.AdaptiveBatch`).
    ``warm_start(model, source, train_items) -> dict``: fits a fresh network before the first
    epoch (:mod:`warm_start`; recorded in config.json's ``warm_start``). ``centering_from``: a
    TrainFolder of these particles (the finer model's first) whose shift corrections are used."""
    dist = dist if dist is not None else Dist(device=particles.device)
    main = dist.is_main
    device = particles.device
    folder = TrainFolder(out_dir)
    auto_batch = cfg.batch_size == 0
    amp, frc_curve, centering = _settle_config(particles, neutral, cfg, star_path, folder=folder, resume=resume,
                                               dist=dist, centering_from=centering_from)
    fingerprint = run_fingerprint(cfg, particles, neutral, star_path)
    auto_batch = _prepare_out_dir(folder, cfg, fingerprint, resume, dist, auto_batch)

    mobile_np = focus_mask_gaussians(neutral, cfg.mask)
    mobile = torch.as_tensor(mobile_np, device=device)
    particles.crop(cfg.highres_A)
    binner = RingBinner(particles.fbox, particles.fapix, cfg.lowres_A, cfg.highres_A, device=device, loss=cfg.loss)
    feats = GradientFeatures(neutral, binner, mobile, feature_param_types(cfg.changes), device)
    info = {"train": cfg.to_dict(), "fingerprint": fingerprint, "n_particles": particles.n_particles,
            "n_ops": particles.n_ops, "n_items": len(particles), "n_gaussians": len(neutral),
            "n_mobile": int(mobile.numel()), "n_features": feats.n_features, "rings": [binner.lo, binner.hi],
            "particles": os.path.abspath(star_path) if star_path else None, "device": str(device),
            "n_processes": dist.world_size, "particle_frc_per_ring": frc_curve,
            "centering": centering.summary() if centering is not None else None,
            "model_file_version": MODEL_FILE_VERSION}
    if main:
        neutral.save(folder.gmm)
    log.info("training on %d particles x %d symmetry operators, %d Gaussians (%d may change: %s), %d features, "
             "band %.1f-%.1f A (rings %d-%d, Fourier crop %d -> %d px), ctf %s, device %s, %d process(es)",
             particles.n_particles, particles.n_ops, len(neutral), mobile.numel(), ",".join(cfg.changes),
             feats.n_features, cfg.lowres_A, cfg.highres_A, binner.lo, binner.hi, particles.box, particles.fbox,
             particles.ctf_mode, device, dist.world_size)
    source = _feature_source(particles, feats, cfg, folder, fingerprint, dist)

    train_items, val_items = split_items(particles.n_particles, particles.n_ops, cfg.val_fraction, cfg.seed)
    run = _Run(particles, cfg, dist, device, amp, binner, source, *_new_model(feats, neutral, mobile, cfg, device))
    history, start_epoch, resumed_chunk = _resume_state(run, folder, resume)
    if warm_start is not None:  # a resumed run keeps the record of its start
        info["warm_start"] = folder.read_config().get("warm_start") if history else warm_start(run.model, source,
                                                                                                train_items)
    if auto_batch and not history:
        _choose_batch(run, train_items)  # one GPU: short probe; CPU and several processes: 64
    info["train"] = cfg.to_dict()
    if main:
        folder.write_config(info)
    dist.barrier()  # nobody reads a checkpoint that rank 0 is about to replace
    amp.install(run.model)
    compiled = bool(cfg.compile) and compile_mlps(run.model, feats.n_features, device, amp)
    run.ddp = _ddp(run.model, dist, device)
    local_batch = -(-cfg.batch_size // dist.world_size)
    run.chunk = AdaptiveBatch(min(local_batch, int((cfg.extra or {}).get("max_chunk", local_batch)),
                                  int(resumed_chunk or local_batch)), "training step", device)
    if run.chunk.size < local_batch:
        log.info("training batches of %d processed in chunks of %d particles", cfg.batch_size, run.chunk.size)

    t_train = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        train_loss = _train_epoch(run, train_items, epoch)
        val_loss = evaluate_loss(run.model, source, binner, val_items, cfg.batch_size, particles.fbox,
                                 particles.fapix, dist=dist, amp=amp)
        dt = time.time() - t0
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "seconds": dt})
        _keep_best(run, history)
        rate = len(train_items) / max(dt, 1e-9)
        eta = dt * (cfg.epochs - epoch - 1)
        log.info("epoch %d/%d  train loss %.5f  val loss %.5f  %.0f particles/s  ETA %.0f s", epoch + 1, cfg.epochs,
                 train_loss, val_loss, rate, eta)
        if main:
            _save_checkpoint(run, history, epoch, folder)
    info["best_epoch"] = _restore_best(run, history)
    run.ddp = None  # released while the process group exists (Dist.close)

    t_lat = time.time()
    n_all = len(particles)
    lo, hi = dist.block(n_all)
    z = encode_items(run.model, source, np.arange(lo, hi), max(cfg.batch_size, 256))
    z_encoder = dist.gather_rows(z, n_all)
    summary = _run_summary(cfg, z_encoder, history, info)  # effective dimension: the encoder's latents
    z, anchors, summary["latent_posterior"] = final_latents(run.model, particles, binner, z_encoder, lo, hi, dist,
                                                             cfg, device)
    if main:
        folder.write_loss(history)
        folder.write_summary(summary)
        from ..io.pairing import record_particle_keys  # results pair with particles by these keys
        record_particle_keys(folder, star_path, particles.n_particles)
        folder.write_latents(z)
        folder.write_model(model_payload(run.model, cfg, feats, mobile_np, info, anchors))
    dist.barrier()
    log.info("wrote %s (%d x %d) in %.1f s; training %.1f s", folder.latent, z.shape[0],
             z.shape[1], time.time() - t_lat, time.time() - t_train)
    return {"history": history, "latent": z, "config": cfg.to_dict(), "info": info, "chunk_size": run.chunk.size,
            "compiled": compiled, "summary": summary}


def _settle_config(particles: Particles, neutral: GMM, cfg: TrainConfig, star_path: str | None,
                   folder: TrainFolder | None = None, resume: bool = False, dist: Dist | None = None,
                   centering_from: TrainFolder | None = None):
    """Check the inputs and settle ``cfg`` (in place): precision, changes, CTF mode, centring
    (``particles``' origins corrected in place, :mod:`centering`), band and position scale.
    Returns (:class:`acceleration.Amp`, per-ring FRC curve or None, :class:`centering.Centering`
    or None)."""
    device = particles.device
    if cfg.zdim < 1:
        raise InputError(f"--zdim {cfg.zdim}: the latent dimension must be at least 1")
    if cfg.epochs < 1 or cfg.batch_size < 0:
        raise InputError("--epochs must be at least 1 and --batch-size at least 1 (0: chosen automatically)")
    if cfg.batch_size == 0:
        cfg.batch_size = REFERENCE_BATCH  # until _choose_batch
    if particles.box != neutral.box or abs(particles.apix - neutral.apix) > 1e-3 * neutral.apix:
        raise InputError(f"--gmm: built for box {neutral.box} at {neutral.apix:.4g} A/px but the particles are "
                         f"box {particles.box} at {particles.apix:.4g} A/px; resample the consensus map to the "
                         f"particles' sampling (relion_image_handler --i map.mrc --angpix {neutral.apix:.4g} "
                         f"--rescale_angpix {particles.apix:.4g} --new_box {particles.box}) and rebuild the GMM")
    if particles.n_particles < 2:
        raise InputError(f"--particles: {particles.n_particles} particle(s); training needs at least 2")
    amp = Amp(cfg.amp, device)
    cfg.amp = amp.mode
    try:
        projection_precision(cfg.proj_precision, device)
    except ValueError:
        raise InputError(f"--proj-precision {cfg.proj_precision!r}: give fp32, bf16 or fp16") from None
    amp.projection = cfg.proj_precision
    # NaN/Inf pixels: a bounded sample now (every batch is checked again when it is read)
    particles.check_finite_sample(256, name=star_path, seed=cfg.seed)
    cfg.changes = parse_changes(cfg.changes)
    cfg.ctf_mode = particles.ctf_mode
    if cfg.loss not in LOSSES:
        raise InputError(f"--loss {cfg.loss}: give one of {', '.join(LOSSES)}")
    if cfg.prior not in PRIORS:
        raise InputError(f"--prior {cfg.prior}: give one of {', '.join(PRIORS)}")
    saved_in = centering_from if centering_from is not None else (folder if resume else None)
    centering = center_for_training(particles, neutral, cfg.center, saved_in,
                                    folder if (dist is None or dist.is_main) else None, star_path)
    frc_curve = None
    if cfg.highres_A is None:
        cfg.highres_A, frc_curve = auto_highres(particles, neutral, cfg)
    cfg.lowres_A, cfg.highres_A = default_band(neutral, particles.apix, particles.box, cfg.lowres_A, cfg.highres_A)
    if cfg.pos_scale_A is None:
        cfg.pos_scale_A = 0.1 * neutral.box * neutral.apix
    return amp, frc_curve, centering


def _prepare_out_dir(folder: TrainFolder, cfg: TrainConfig, fingerprint: dict, resume: bool, dist: Dist,
                     auto_batch: bool = False) -> bool:
    """Create the checkpoint folder; with ``resume``, refuse a folder of another run (other
    inputs or settings: :meth:`outputs.TrainFolder.resume_error`); without it, remove old
    checkpoints. Collective under ``dist``. A resumed run with an automatic batch size takes the
    old run's batch size and rate. Returns whether the batch size is still to be chosen."""
    main = dist.is_main
    if main:
        os.makedirs(folder.checkpoint_dir, exist_ok=True)
    err = None
    if resume:
        old = folder.read_config().get("train")
        if auto_batch and old:
            cfg.batch_size, cfg.lr, auto_batch = int(old["batch_size"]), float(old["lr"]), False
        why = folder.resume_error(cfg.to_dict(), fingerprint)
        err = InputError(why) if why else None
    dist.raise_if_any(err)
    if not resume and main:
        old_ckpts = folder.checkpoints()
        if old_ckpts or os.path.exists(folder.model):
            log.info("train: %s holds an earlier run; starting a new one there (its model.pt and latents are "
                     "replaced when this run writes its own; --resume continues the earlier run instead)",
                     folder.folder)
        for p in old_ckpts:
            os.remove(p)
    return auto_batch


def _feature_source(particles: Particles, feats: GradientFeatures, cfg: TrainConfig, folder: TrainFolder,
                    fingerprint: dict, dist: Dist) -> FeatureSource:
    """Feature normalisation statistics (a seeded sample; every process computes the same, or
    reads ``feature_stats.npz``), then the feature cache (``--features cache``) or none."""
    main, device = dist.is_main, particles.device
    big = max(cfg.batch_size, FEATURE_BATCH_CUDA if device.type == "cuda" else 64)  # gradients in large GPU batches
    stats = folder.read_feature_stats(fingerprint)
    if stats is None:
        t0 = time.time()
        rng = np.random.default_rng([int(cfg.seed), 11])
        n_items = len(particles)
        sample = np.sort(rng.choice(n_items, size=min(cfg.n_stats, n_items), replace=False))
        stats = feats.estimate_stats(particles, sample, big if device.type == "cuda" else cfg.batch_size)
        if main:
            folder.write_feature_stats(stats, fingerprint)
        log.info("feature statistics from %d particles in %.1f s (rms: %s)", len(sample), time.time() - t0,
                 ", ".join(f"{k} {v:.3g}" for k, v in stats["scale"].items()))
    else:
        feats.set_stats(stats)
    dist.barrier()
    cache = None
    if cfg.features == "cache":
        cache = FeatureCache(folder.folder)
        ok = cache.load(fingerprint)
        if dist.enabled:  # all processes must agree before rank 0 may rebuild it
            flag = dist.all_reduce_sum(torch.tensor([float(ok)], device=dist._coll_device()))
            ok = float(flag) == dist.world_size
        if not ok:
            t0 = time.time()
            cache.build(feats, particles, big, fingerprint, dist=dist if dist.enabled else None)
            dt = time.time() - t0
            log.info("gradient features of %d items cached in %s (%.1f s, %.0f particles/s)", len(particles),
                     cache.path, dt, len(particles) / max(dt, 1e-9))
    elif cfg.features != "onthefly":
        raise InputError(f"--features {cfg.features!r}: give cache or onthefly")
    source = FeatureSource(particles, feats, cache, device)
    if cache is not None:
        source.resident = resident_rows(cache.array, device)  # CUDA: the whole table on the GPU when it fits
    return source


FEATURE_BATCH_CUDA = 1024  # particles per gradient-feature batch on a GPU (halves on out-of-memory)


def _choose_batch(run: _Run, train_items: np.ndarray) -> None:
    """``--batch-size`` 0 (auto): on one CUDA device, :func:`batching.probe_batch_size` times a
    training step (forward + backward, gradients then cleared; the random number generators are
    restored) at 64, 128, ... particles (at most 4,096 and at least 32 steps per epoch) and the
    rate at batch 64 is scaled by ``batch / 64`` (:func:`batching.scaled_lr`); on the CPU and with
    several processes the batch stays 64."""
    cfg, cuda = run.cfg, run.device.type == "cuda"
    if (not cuda and not (cfg.extra or {}).get("probe_cpu")) or run.dist.enabled:  # probe_cpu: tests
        return
    items = train_items[:min(len(train_items), 4096)]
    loaded: dict = {}

    def trial(b):
        if b not in loaded:  # read once per size (the warm-up call); the timed calls reuse it
            loaded.clear()
            loaded[b] = run.source(np.sort(items[:b]))
        x, bt = loaded[b]
        _chunk_step(run.model, run.binner, x, bt, run.particles.fbox, run.particles.fapix, cfg.latent_noise, None,
                    cfg.latent_reg, 1.0 / b, run.amp)
        run.model.zero_grad(set_to_none=True)

    devices = [run.device.index if run.device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        cap = max(REFERENCE_BATCH, len(train_items) // MIN_STEPS_PER_EPOCH)
        batch, _ = probe_batch_size(trial, run.device, start=REFERENCE_BATCH, max_batch=min(4096, cap),
                                    n_items=len(items), cuda_only=False)
    loaded.clear()
    run.model.zero_grad(set_to_none=True)  # also after an out-of-memory trial
    if cuda:
        torch.cuda.empty_cache()
    if batch != cfg.batch_size:
        cfg.lr = scaled_lr(cfg.lr, batch, REFERENCE_BATCH)
        for group in run.opt.param_groups:
            group["lr"] = cfg.lr
        cfg.batch_size = batch
    log.info("batch size %d (automatic), learning rate %.3g", cfg.batch_size, cfg.lr)


def _new_model(feats: GradientFeatures, neutral: GMM, mobile: torch.Tensor, cfg: TrainConfig, device):
    """The network (initial weights from ``cfg.seed`` only) and its Adam optimiser."""
    torch.manual_seed(int(cfg.seed))
    c0, a0, s0 = neutral.tensors(device)
    model = HetModel(feats.n_features, cfg.zdim, c0, a0, s0, mobile, cfg.changes, cfg.pos_scale_A, cfg.hidden,
                     cfg.layers, cfg.dropout, cfg.batchnorm, cfg.prior == "kl").to(device)
    try:  # the fused kernel is ~3x faster than the default on CPU (and on GPU); same algorithm
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, opt


def _resume_state(run: _Run, folder: TrainFolder, resume: bool):
    """With ``resume``, load the last checkpoint into the model, optimiser and loss scaler.
    Returns (history, first epoch to run, chunk size of the checkpoint or None)."""
    history, start_epoch, resumed_chunk = [], 0, None
    if resume:
        ckpts = folder.checkpoints()
        if ckpts:
            ck = load_torch_file(ckpts[-1], "checkpoint", map_location=run.device, require_format=False)
            run.model.load_state_dict(ck["model"])
            run.opt.load_state_dict(ck["optimizer"])
            if run.amp.scaler is not None and ck.get("grad_scaler"):
                run.amp.scaler.load_state_dict(ck["grad_scaler"])
            history = json_field(ck, "history_json", ckpts[-1]) if "history_json" in ck else ck["history"]
            start_epoch = int(ck["epoch"])
            run.best = ck.get("best")
            resumed_chunk = ck.get("chunk_size")
            log.info("resuming from %s (epoch %d done)", ckpts[-1], start_epoch)
        else:
            log.info("--resume: no checkpoint in %s; starting from scratch", folder.folder)
    return history, start_epoch, resumed_chunk


def _ddp(model: HetModel, dist: Dist, device: torch.device):
    """``DistributedDataParallel`` around ``model`` with several processes, else None."""
    if not dist.enabled:
        return None
    import inspect
    DDP = torch.nn.parallel.DistributedDataParallel
    # the buffers (neutral GMM, mobile list) are identical constants on every process
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **sync)


def _threaded_loader(run: _Run) -> bool:
    """The GPU data path (:mod:`io.loader`): ``loader 'threads'``, or ``'auto'`` on CUDA."""
    cfg = run.cfg
    if cfg.loader not in ("auto", "threads", "prefetch"):
        raise InputError(f"loader {cfg.loader!r}: give auto, threads or prefetch")
    return cfg.prefetch and (cfg.loader == "threads" or (cfg.loader == "auto" and run.device.type == "cuda"))


def _train_epoch(run: _Run, train_items: np.ndarray, epoch: int) -> float:
    """One epoch of Adam steps over the seeded order of ``train_items``; returns the mean
    training loss (over all processes). The loss is summed on the device; the host reads it
    every ``log_every`` steps and at the end (no other synchronisation inside a step)."""
    cfg, dist, device, opt, amp, chunk = run.cfg, run.dist, run.device, run.opt, run.amp, run.chunk
    threaded = _threaded_loader(run)
    if threaded:  # blocks of consecutive items in random order: contiguous reads
        order = block_shuffled_order(train_items, 64, [int(cfg.seed), 1, epoch])
    else:
        order = np.random.default_rng([int(cfg.seed), 1, epoch]).permutation(train_items)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(cfg.seed) * 1000003 + epoch)
    torch.manual_seed(int(cfg.seed) * 7919 + epoch)  # dropout
    run.model.train()
    total = torch.zeros((), device=device)
    batches = [np.sort(order[i:i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
    if cfg.batchnorm:
        batches = [items for items in batches if len(items) >= 2]
    shares = [_share(len(items), dist) for items in batches]
    reads = [items[pos] for items, (pos, _) in zip(batches, shares)]  # this process's particles
    if threaded:
        loader = BatchLoader(run.particles, reads, threads=cfg.loader_threads, depth=2 * max(1, cfg.loader_threads),
                             features=run.source.read_features)
    else:
        loader = Prefetcher(run.source.read, reads, depth=2, enabled=cfg.prefetch)
    seen = 0
    with loader:
        for k, (items, (pos, scale), host) in enumerate(zip(batches, shares, loader)):
            noise = (torch.randn((len(items), cfg.zdim), generator=gen, device=device)
                     if cfg.latent_noise > 0 else None)
            while True:
                try:
                    opt.zero_grad(set_to_none=True)
                    step_total = _train_batch(run.model, run.ddp, run.binner, run.source, host, pos, scale, noise,
                                              cfg, run.particles.fbox, run.particles.fapix, chunk, amp)
                    break
                except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
                    if not is_oom(exc):
                        raise
                    del exc
                    opt.zero_grad(set_to_none=True)
                    chunk.shrink()  # InputError at chunk size 1
            amp.step(opt)
            total = total + step_total
            seen += len(host)
            if cfg.log_every and (k + 1) % cfg.log_every == 0 and k + 1 < len(batches):
                running = float(total) / seen  # the one read-back every log_every steps
                _check_finite(running, epoch, cfg)
                log.info("epoch %d step %d/%d  running train loss %.5f", epoch + 1, k + 1, len(batches), running)
    loss = float(dist.all_reduce_sum(total.detach().reshape(1).clone())) / len(order)
    _check_finite(loss, epoch, cfg)
    return loss


def _check_finite(loss: float, epoch: int, cfg: TrainConfig) -> None:
    """A NaN/Inf training loss stops the run with one line (never a silent NaN model)."""
    if not math.isfinite(loss):
        raise InputError(f"training loss is {loss} in epoch {epoch + 1} (--amp {cfg.amp}, --proj-precision "
                         f"{cfg.proj_precision}, --lr {cfg.lr:g}); use --amp off --proj-precision fp32 or a lower "
                         "--lr, and check the particles for extreme values")


def _save_checkpoint(run: _Run, history: list, epoch: int, folder: TrainFolder) -> None:
    """The checkpoint after epoch ``epoch`` (0-based; the last ``keep_checkpoints`` are kept)
    and the loss table so far."""
    cfg, amp = run.cfg, run.amp
    folder.write_checkpoint(epoch + 1, {
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch + 1,
        "history_json": json.dumps(history), "config_json": json.dumps(cfg.to_dict()),
        "chunk_size": int(run.chunk.size), "best": run.best,
        "grad_scaler": amp.scaler.state_dict() if amp.scaler is not None else None})
    for old in folder.checkpoints()[:-max(1, cfg.keep_checkpoints)]:
        os.remove(old)
    folder.write_loss(history)


@torch.no_grad()
def evaluate_loss(model: HetModel, source, binner: RingBinner, items: np.ndarray, batch_size: int, box: int,
                  apix: float, dist: Dist | None = None, amp: Amp | None = None) -> float:
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
        with autocast(amp):
            _, (c, a, s) = model(x)
        c, a, s = c.float(), a.float(), s.float()
        F = project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf, precision=_proj(amp))
        total.add_((-binner.score(F, b.F_img)).sum())

    AdaptiveBatch(batch_size, "validation loss", binner.onehot.device).run(len(items), step)
    model.train(was)
    if dist is not None:
        dist.all_reduce_sum(total.reshape(1))
    return float(total) / n
