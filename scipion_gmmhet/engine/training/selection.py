"""Model selection after training: early stopping (the model of the best validation epoch is
kept) and the run's ``summary.json`` (kept epoch, effective latent dimension, band and why).

``run`` is :func:`train.train`'s shared state (``model``, ``best``)."""
from __future__ import annotations

import logging

import numpy as np

from .trained import effective_dimension

log = logging.getLogger("scipion_gmmhet.engine.training.train")


def keep_best(run, history: list) -> None:
    """Early stopping's memory: a copy of the model's parameters at the lowest validation loss so
    far (ties: the earlier epoch). Without a validation set (``val_fraction 0``) nothing is kept."""
    h = history[-1]
    if not np.isfinite(h["val_loss"]) or (run.best is not None and h["val_loss"] >= run.best["val_loss"]):
        return
    run.best = {"epoch": int(h["epoch"]), "val_loss": float(h["val_loss"]),
                "state": {k: v.detach().clone() for k, v in run.model.state_dict().items()}}


def restore_best(run, history: list) -> int:
    """Load the best-validation parameters into the model (the final latents and ``model.pt``
    come from them); mark that epoch in ``history`` (``best``). Returns the epoch (the last one
    without a validation set)."""
    if not history:
        return 0
    best = run.best["epoch"] if run.best is not None else int(history[-1]["epoch"])
    if run.best is not None and best != history[-1]["epoch"]:
        run.model.load_state_dict(run.best["state"])
        log.info("early stopping: the model of epoch %d (validation loss %.5f, the lowest) is kept; the last "
                 "epoch's was %.5f", best, run.best["val_loss"], history[-1]["val_loss"])
    for h in history:
        h["best"] = int(h["epoch"] == best)
    return best


def run_summary(cfg, z: np.ndarray, history: list, info: dict) -> dict:
    """``summary.json``: the kept (best-validation) epoch, the effective latent dimension, the
    similarity, prior and band (with the reason for the band); also merged into ``info``."""
    eff = effective_dimension(z, cfg.prior)
    log.info("effective latent dimension %d of %d (principal variances %s; prior %s)", eff["effective_dim"],
             cfg.zdim, " ".join(f"{v:.3g}" for v in eff["latent_pc_variance"]), cfg.prior)
    summary = {"best_epoch": info["best_epoch"], "epochs_run": len(history), **eff, "zdim": cfg.zdim,
               "loss": cfg.loss, "prior": cfg.prior, "band_A": [cfg.lowres_A, cfg.highres_A],
               "band_reason": (cfg.extra or {}).get("band_reason", "given (--highres)"),
               "best_val_loss": next((h["val_loss"] for h in history if h.get("best")), None)}
    info.update(summary)
    return summary
