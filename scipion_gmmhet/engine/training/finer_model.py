"""A finer neutral model learnt from the data: ``gmmhet train --finer-model auto``.

The neutral GMM sets the finest detail the network can fit (``gmmhet build --resolution 8``:
the training band stops at 8 A), while particles often carry signal further. With
``--finer-model auto`` the particles are first reconstructed at their input poses; when that map
is finer than 0.8 x the neutral GMM's build resolution (:func:`fine_reference.fine_target`: its
half maps' FSC 0.5, no finer than 0.6 x the neutral's nor 2.5 px), the run

1. trains on the given neutral GMM as usual, into ``OUT/first_model`` (a complete
   ``gmmhet train`` folder);
2. builds a GMM of the motion-corrected reconstruction at that resolution: every particle
   reconstructed with the motion the first network decodes for it undone, so a moving domain is
   not smeared (:func:`fine_reference.build_fine_reference`; the plain map when the corrected
   half maps do not reach the resolution);
3. trains a second network on that finer GMM into ``OUT`` (the band chosen again: up to its
   resolution, or coarser where the particles carry no signal), with the KL weight per Fourier
   pixel of the first band (:func:`_band_kl_weight`), started from the first network
   (:mod:`warm_start`: its decoder fitted to the first one's motions carried to the fine
   Gaussians, its encoder to the first latents), on the particles as the first training
   centred them (its ``centering.csv``: the centring is decided once, against the given GMM;
   searched again against the finer GMM, the gold-standard check let 87 of 6,000 exact shifts
   move on the MD-like hinge's seed 2). ``OUT`` is then an ordinary training folder
   whose ``gmm.npz`` is the finer GMM; ``summary.json``'s ``finer_model`` says what was done.

Otherwise (no finer reconstruction, no recorded build resolution, symmetry, or several
processes under torchrun) the run trains once on the given GMM, as with ``--finer-model off``,
and says why in the log. Measured (README, issue 13): the MD-like 1AKE hinge at SNR 0.1, 6,000
particles, the neutral built at 8 A: |Spearman| PC1 0.944 -> 0.957 (kNN R2 0.884 -> 0.911), at
3-5x the training time; with two independent motions LID / NMP 0.952 / 0.807 -> 0.961 / 0.842
(0.758 for NMP with the second network from random weights; lost, one latent direction of the
first's two, with the KL weight unscaled too). The run warns when the
second latent space has fewer directions than the first (``summary.json``'s
``finer_model.fewer_directions``); ``OUT/first_model`` is then the run to compare with. With
``--resume`` a finished first model is kept and an interrupted second training goes on from its
own ``gmm.npz`` (never rebuilt).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import numpy as np

from ..io.outputs import TrainFolder
from ..model.gmm import GMM
from .config import FINER_MODELS, TrainConfig
from .train import train

log = logging.getLogger(__name__)

def train_model(make_particles: Callable, neutral: GMM, cfg: TrainConfig, out_dir: str, *, star_path: str,
                resume: bool = False, dist=None, device="cpu") -> dict:
    """``gmmhet train``: :func:`train.train` on ``neutral``, with ``cfg.finer_model == 'auto'``
    twice (module docstring). ``make_particles()`` returns the training particles afresh (a
    training corrects their origins and crops them in place). Returns the final training's summary
    (``summary['finer_model']``: the first model and the finer GMM, when made). ``device``: where
    the reconstructions run (the training's device)."""
    mode = getattr(cfg, "finer_model", "off")
    if mode not in FINER_MODELS:
        from ..errors import InputError
        raise InputError(f"--finer-model {mode}: give one of {', '.join(FINER_MODELS)}")
    once = dataclasses.replace(cfg, finer_model="off")
    target = _finer_target(star_path, neutral, cfg, dist, device) if mode == "auto" else None
    if target is None:
        return train(make_particles(), neutral, once, out_dir, resume=resume, star_path=star_path, dist=dist)
    folder = TrainFolder(out_dir)
    finer = _kept_finer_gmm(folder, neutral) if resume else None
    first = folder.first_model
    if finer is None:
        if not (resume and first.is_finished()):
            log.info("finer model: first training on the given GMM (%d Gaussians) into %s", len(neutral), first.folder)
            # a copy: train() sets its config's band, which the second training chooses again
            train(make_particles(), neutral, dataclasses.replace(once), first.folder, resume=resume,
                  star_path=star_path, dist=dist)
        finer = _finer_gmm(first, neutral, star_path, cfg, target, device)
    log.info("finer model: training on %d Gaussians at %.2f A (%s) into %s", len(finer),
             float(finer.info["target_resolution_A"]), finer.info.get("source", ""), out_dir)
    kl_weight = _band_kl_weight(cfg.kl_weight, first, float(finer.info["target_resolution_A"]))
    out = train(make_particles(), finer, dataclasses.replace(once, finer_model="auto", kl_weight=kl_weight), out_dir,
                resume=resume, star_path=star_path, dist=dist, warm_start=_warm_start(first, cfg, device),
                centering_from=first)
    summary = folder.read_summary()
    record = {"first_model": os.path.basename(first.folder), "neutral_gaussians": len(neutral),
              "gaussians": len(finer), "resolution_A": float(finer.info["target_resolution_A"]),
              "source": finer.info.get("source", ""), "kl_weight": kl_weight,
              "effective_dim": summary.get("effective_dim"),
              "first_effective_dim": first.read_summary().get("effective_dim"),
              "warm_start": folder.read_config().get("warm_start")}
    record["fewer_directions"] = bool(record["effective_dim"] is not None and record["first_effective_dim"] is not None
                                      and record["effective_dim"] < record["first_effective_dim"])
    if record["fewer_directions"]:  # measured: two independent openings, the weaker one lost (README)
        log.warning("finer model: its latent space has %d direction(s) carrying signal, the first model's %d: a "
                    "weaker motion may be lost; compare with %s (a whole training run, usable as --train)",
                    record["effective_dim"], record["first_effective_dim"], first.folder)
    summary["finer_model"] = record
    folder.write_summary(summary)
    out["summary"] = summary
    return out


def _band_kl_weight(kl_weight: float, first: TrainFolder, finer_A: float) -> float:
    """The second training's KL weight: ``kl_weight`` per Fourier pixel of the first training's
    band. The band correlation's gain from a motion is spread over every pixel of the band, so a
    band to ``finer_A`` (more pixels, mostly noisier) shrinks it against the same KL cost in nats
    and a weaker motion no longer pays for its latent direction. Scaled by the ratio of the bands'
    areas in Fourier space (1/highres^2 - 1/lowres^2), never up."""
    band = first.read_config().get("train", {})
    lo, hi = band.get("lowres_A"), band.get("highres_A")
    if not lo or not hi or finer_A >= hi:
        return kl_weight
    ratio = (1 / hi ** 2 - 1 / lo ** 2) / (1 / finer_A ** 2 - 1 / lo ** 2)
    log.info("finer model: KL weight %.3g x %.2f (the first band %.1f-%.1f A against %.1f-%.1f A)",
             kl_weight, ratio, lo, hi, lo, finer_A)
    return float(kl_weight * ratio)


def _warm_start(first: TrainFolder, cfg: TrainConfig, device):
    """The second training's warm start (:func:`warm_start.distill` from the first network and
    its latents), or None when the first run's latents do not match the particles (logged)."""
    from .trained import load_trained
    from .warm_start import distill
    tm = load_trained(first.folder, str(device))
    z = tm.latents()

    def fit(model, source, items):
        if z.shape[0] != len(source.particles):
            log.info("finer model: %s has %d latents for %d particles; the second network starts from random "
                     "weights", first.folder, z.shape[0], len(source.particles))
            return None
        return distill(model, source, items, tm, z, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    return fit


def _finer_target(star_path: str, neutral: GMM, cfg: TrainConfig, dist, device):
    """The :class:`fine_reference.FineTarget` of the particles at their input poses, or None (logged)."""
    from ..analysis.fine_reference import fine_target
    from ..io import metadata
    why = "training once on the given GMM (--finer-model auto)"
    if dist is not None and getattr(dist, "enabled", False):
        log.info("finer model: not under torchrun with several processes yet; %s", why)
        return None
    if str(cfg.symmetry).upper() not in ("C1", "NONE", ""):
        log.info("finer model: not with symmetry %s (a latent stands for one symmetry copy); %s", cfg.symmetry, why)
        return None
    return fine_target(metadata.read_particles(star_path), neutral, device=str(device), ctf_mode=cfg.ctf_mode,
                       seed=cfg.seed, label="the particles at their input poses", purpose=why)


def _finer_gmm(first: TrainFolder, neutral: GMM, star_path: str, cfg: TrainConfig, target, device) -> GMM:
    """The GMM of the motion-corrected reconstruction, each particle's motion decoded by the
    first network (its latents: row i = star row i) undone."""
    from ..analysis.fine_reference import build_fine_reference
    from ..analysis.motion_corrected import ModelMoves
    from ..io import metadata
    from .trained import load_trained
    tm = load_trained(first.folder, str(device))
    ref = build_fine_reference(metadata.read_particles(star_path), neutral, device=tm.device, ctf_mode=cfg.ctf_mode,
                               seed=cfg.seed, label="the particles at their input poses",
                               moves=ModelMoves(tm, tm.latents()), target=target)
    return ref.gmm


def _kept_finer_gmm(folder: TrainFolder, neutral: GMM) -> GMM | None:
    """With --resume: the finer GMM an interrupted second training started from (its gmm.npz),
    or None when there is none (or the folder's GMM is the given one)."""
    if not os.path.exists(folder.gmm):
        return None
    gmm = GMM.load(folder.gmm)
    if len(gmm) == len(neutral) and np.allclose(np.asarray(gmm.centers_A), np.asarray(neutral.centers_A)):
        return None
    log.info("finer model: the training in %s started from a finer GMM (%d Gaussians); kept", folder.folder, len(gmm))
    return gmm

