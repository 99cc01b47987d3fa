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
- batch size: ``--batch-size`` particles per Adam step; on CUDA the physical chunk starts at
  the batch size (a whole batch in one forward/backward) and halves on out-of-memory (see
  Reliability above), so a large ``--batch-size`` (256+) fills the GPU without a separate
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
import glob
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..device import AdaptiveBatch, is_oom
from ..errors import InputError
from ..io import atomic
from ..io.data import HostBatch, Particles
from ..model.fourier import RingBinner
from ..model.gmm import GMM, project
from ..model.networks import HetModel, parse_changes
from .acceleration import Amp, autocast, compile_mlps
from .config import TrainConfig, auto_highres, default_band, fingerprint as run_fingerprint, split_items
from .distributed import Dist
from .features import FeatureCache, FeatureSource, GradientFeatures, feature_param_types, focus_mask_gaussians
from .prefetch import Prefetcher
from .trained import MODEL_FILE_VERSION, encode_items, model_payload

log = logging.getLogger(__name__)


def _atomic_save(obj, path: str) -> None:
    atomic.torch_save(obj, path)


def _atomic_text(text: str, path: str) -> None:
    atomic.write_text(path, text)


def _atomic_npy(arr: np.ndarray, path: str) -> None:
    atomic.save_npy(path, arr)


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
                latent_reg: float, scale: float, amp: Amp | None = None):
    """Forward and backward of one chunk of a training batch: the loss is the chunk's SUM of
    per-particle losses (``-FRC + latent_reg |z|^2``) times ``scale`` (1 / global batch size,
    times the number of processes under DDP), so the gradients of a batch's chunks (and
    processes) add up to the gradient of the mean over the global batch. With ``amp`` the
    model's forward runs under autocast and everything after it in float32 (loss scaling for
    fp16). Returns the chunk's per-particle FRC (detached)."""
    with autocast(amp):
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


def _train_batch(model, ddp, binner, source: FeatureSource, host: HostBatch, pos: np.ndarray, scale: float,
                 noise: torch.Tensor | None, cfg: "TrainConfig", box: int, apix: float, chunk: AdaptiveBatch,
                 amp: Amp | None = None) -> torch.Tensor:
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


def train(particles: Particles, neutral: GMM, cfg: TrainConfig, out_dir: str, resume: bool = False,
          star_path: str | None = None, dist: Dist | None = None) -> dict:
    """Train on ``particles`` (already on their device) from the ``neutral`` GMM; write the
    output directory described in the module docstring. Returns a summary dict.

    ``dist``: the process group (:mod:`distributed`) when launched by ``torchrun`` with several
    processes; every process calls this with the same arguments, rank 0 writes the files.
    Device out-of-memory halves the physical batch (chunk) size and carries on: a batch is
    then processed in chunks whose gradients add up to the whole batch's, so the optimisation
    (batch size, number of Adam steps) is unchanged (see :class:`device.AdaptiveBatch`).
    """
    dist = dist if dist is not None else Dist(device=particles.device)
    main = dist.is_main
    device = particles.device
    amp, frc_curve = _settle_config(particles, neutral, cfg, star_path)
    fingerprint = run_fingerprint(cfg, particles, neutral, star_path)
    _prepare_out_dir(out_dir, cfg, fingerprint, resume, dist)

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
    source = _feature_source(particles, feats, cfg, out_dir, fingerprint, dist)

    train_items, val_items = split_items(particles.n_particles, particles.n_ops, cfg.val_fraction, cfg.seed)
    run = _Run(particles, cfg, dist, device, amp, binner, source, *_new_model(feats, neutral, mobile, cfg, device))
    history, start_epoch, resumed_chunk = _resume_state(run, out_dir, resume)
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
        rate = len(train_items) / max(dt, 1e-9)
        eta = dt * (cfg.epochs - epoch - 1)
        log.info("epoch %d/%d  train loss %.5f  val loss %.5f  %.0f particles/s  ETA %.0f s", epoch + 1, cfg.epochs,
                 train_loss, val_loss, rate, eta)
        if main:
            _save_checkpoint(run, history, epoch, out_dir)

    t_lat = time.time()
    n_all = len(particles)
    lo, hi = dist.block(n_all)
    z = encode_items(run.model, source, np.arange(lo, hi), max(cfg.batch_size, 256))
    z = dist.gather_rows(z, n_all)
    if main:
        _write_loss_csv(history, os.path.join(out_dir, "loss.csv"))
        _atomic_npy(z, os.path.join(out_dir, "latent.npy"))
        _atomic_save(model_payload(run.model, cfg, feats, mobile_np, info), os.path.join(out_dir, "model.pt"))
    dist.barrier()
    log.info("wrote %s (%d x %d) in %.1f s; training %.1f s", os.path.join(out_dir, "latent.npy"), z.shape[0],
             z.shape[1], time.time() - t_lat, time.time() - t_train)
    return {"history": history, "latent": z, "config": cfg.to_dict(), "info": info, "chunk_size": run.chunk.size,
            "compiled": compiled}


def _settle_config(particles: Particles, neutral: GMM, cfg: TrainConfig, star_path: str | None):
    """Check the inputs and settle ``cfg`` (in place): precision, changes, CTF mode, band and
    position scale. Returns (:class:`acceleration.Amp`, per-ring FRC curve or None)."""
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
    amp = Amp(cfg.amp, device)
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
    return amp, frc_curve


def _prepare_out_dir(out_dir: str, cfg: TrainConfig, fingerprint: dict, resume: bool, dist: Dist) -> None:
    """Create ``out_dir/checkpoints``; with ``resume``, refuse a folder of another run (other
    inputs or settings); without it, remove old checkpoints. Collective under ``dist``."""
    main = dist.is_main
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


def _feature_source(particles: Particles, feats: GradientFeatures, cfg: TrainConfig, out_dir: str,
                    fingerprint: dict, dist: Dist) -> FeatureSource:
    """Feature normalisation statistics (a seeded sample; every process computes the same, or
    reads ``feature_stats.npz``), then the feature cache (``--features cache``) or none."""
    main, device = dist.is_main, particles.device
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
    return FeatureSource(particles, feats, cache, device)


def _new_model(feats: GradientFeatures, neutral: GMM, mobile: torch.Tensor, cfg: TrainConfig, device):
    """The network (initial weights from ``cfg.seed`` only) and its Adam optimiser."""
    torch.manual_seed(int(cfg.seed))
    c0, a0, s0 = neutral.tensors(device)
    model = HetModel(feats.n_features, cfg.zdim, c0, a0, s0, mobile, cfg.changes, cfg.pos_scale_A, cfg.hidden,
                     cfg.layers, cfg.dropout, cfg.batchnorm).to(device)
    try:  # the fused kernel is ~3x faster than the default on CPU (and on GPU); same algorithm
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, opt


def _resume_state(run: _Run, out_dir: str, resume: bool):
    """With ``resume``, load the last checkpoint into the model, optimiser and loss scaler.
    Returns (history, first epoch to run, chunk size of the checkpoint or None)."""
    history, start_epoch, resumed_chunk = [], 0, None
    if resume:
        ckpts = _checkpoints(out_dir)
        if ckpts:
            ck = torch.load(ckpts[-1], map_location=run.device, weights_only=False)
            run.model.load_state_dict(ck["model"])
            run.opt.load_state_dict(ck["optimizer"])
            if run.amp.scaler is not None and ck.get("grad_scaler"):
                run.amp.scaler.load_state_dict(ck["grad_scaler"])
            history, start_epoch = ck["history"], int(ck["epoch"])
            resumed_chunk = ck.get("chunk_size")
            log.info("resuming from %s (epoch %d done)", ckpts[-1], start_epoch)
        else:
            log.info("--resume: no checkpoint in %s; starting from scratch", out_dir)
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


def _train_epoch(run: _Run, train_items: np.ndarray, epoch: int) -> float:
    """One epoch of Adam steps over the seeded order of ``train_items``; returns the mean
    training loss (over all processes)."""
    cfg, dist, device, opt, amp, chunk = run.cfg, run.dist, run.device, run.opt, run.amp, run.chunk
    rng = np.random.default_rng([int(cfg.seed), 1, epoch])
    order = rng.permutation(train_items)
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
    with Prefetcher(run.source.read, reads, depth=2, enabled=cfg.prefetch) as loader:
        for items, (pos, scale), host in zip(batches, shares, loader):
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
    return float(dist.all_reduce_sum(total.detach().reshape(1).clone())) / len(order)


def _save_checkpoint(run: _Run, history: list, epoch: int, out_dir: str) -> None:
    """``checkpoints/epoch_NNNN.pt`` after epoch ``epoch`` (0-based; the last
    ``keep_checkpoints`` are kept) and ``loss.csv`` so far."""
    cfg, amp = run.cfg, run.amp
    ck_path = os.path.join(out_dir, "checkpoints", f"epoch_{epoch + 1:04d}.pt")
    _atomic_save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch + 1,
                  "history": history, "config": cfg.to_dict(), "chunk_size": run.chunk.size,
                  "grad_scaler": amp.scaler.state_dict() if amp.scaler is not None else None}, ck_path)
    for old in _checkpoints(out_dir)[:-max(1, cfg.keep_checkpoints)]:
        os.remove(old)
    _write_loss_csv(history, os.path.join(out_dir, "loss.csv"))


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
        total.add_((-binner.mean_frc(project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf), b.F_img)).sum())

    AdaptiveBatch(batch_size, "validation loss", binner.onehot.device).run(len(items), step)
    model.train(was)
    if dist is not None:
        dist.all_reduce_sum(total.reshape(1))
    return float(total) / n
