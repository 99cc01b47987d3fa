"""Significance gate of a half model's moves, for an honest motion-corrected FSC.

A model trained on particles that hold no motion (or no signal at all) still decodes moves: the
encoder reads each image and the decoder moves the Gaussians to fit that image's noise (27 A
RMS on pure-noise particles, box 64). Inserting a particle along moves fitted to its own noise
pulls the noise into the shape of the neutral model, in both half maps alike (the halves share
the neutral model), and their FSC rises at the lowest shells (0.98 / 0.89 / 0.35 at
192 / 96 / 64 A on pure noise) although the particles hold nothing: reference bias.

Held-out particles do not expose this: the encoder reads the held-out image too, so its
decoded model beats the neutral one on that image by fitting its noise (pure noise, 50
validation particles: mean FRC gain +0.15, 8 standard errors). What the network never sees is
the image outside its training band: the features and the loss use only the rings
``lowres_A`` .. ``highres_A``, and the noise of other rings is independent of the noise inside.
The gate therefore scores every particle of the model's half set on the
:data:`DEFAULT_TEST_RINGS` Fourier rings just finer than the band (the training's
``highres_A``; Nyquist caps them): the per-particle FRC of the image with the projection of its
decoded model minus that with the neutral model's projection (CTF-modulated, origin shift
undone), averaged over those rings. Real moves predict the image there (the arm swing,
box 64, SNR 0.1: +0.05, 11 standard errors); moves fitted to noise do not (pure noise: +0.002,
0.4 standard errors). The gain is paired (same image in both terms), so its mean over ``n``
particles has standard error ``sd / sqrt(n)``; the moves pass when the mean is at least ``z`` =
:data:`DEFAULT_GATE_Z` = 3 standard errors (moves that are noise pass by chance 0.1 % of the
time). A model that fails is given zero displacement: its half map is the plain
reconstruction. Each half is gated on its own particles only, so the halves stay independent.
A band that reaches Nyquist leaves no ring to test: the moves are kept, with a log line.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

#: the moves pass when their mean held-out FRC gain is at least this many standard errors
DEFAULT_GATE_Z = 3.0
#: Fourier rings just finer than the training band on which the moves are tested
DEFAULT_TEST_RINGS = 2
#: at most this many particles of the half set are scored (a seeded subset)
MAX_GATE_PARTICLES = 5000

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    """``passed``; ``n`` held-out particles; ``gain`` mean FRC gain (decoded - neutral);
    ``z`` gain / standard error; ``reason`` one line for the log."""
    passed: bool
    n: int
    gain: float
    z: float
    reason: str


def test_rings(model, box: int, apix: float) -> tuple[int, int]:
    """``(first, last)`` Fourier rings (of a ``box``-px image) just finer than the training band;
    ``first > last`` when the band reaches Nyquist."""
    from ..model.fourier import shell_for_resolution
    hi_A = model.config.get("highres_A")
    hi = box // 2 if hi_A is None else min(box // 2, shell_for_resolution(box, apix, float(hi_A)))
    return hi + 1, min(box // 2, hi + DEFAULT_TEST_RINGS)


def held_out_gains(model, latents: np.ndarray, meta, rows: np.ndarray, rings: tuple[int, int], device="cpu",
                   batch_size: int = 64) -> np.ndarray:
    """Per-particle FRC gains ``(len(rows),)`` of ``model``'s decoded models over its neutral
    model on the Fourier rings ``rings`` (first, last; module docstring) for the star rows
    ``rows`` of ``meta``, ``latents[i]`` the latent of row ``rows[i]``."""
    from ..io.data import ParticleImages
    from ..model.fourier import RingBinner
    from ..model.gmm import project
    from .reconstruct import ctf_mode_of, prepare_batch
    dev = torch.device(device)
    box, apix = int(meta.box), float(meta.apix)
    binner = RingBinner(box, apix, device=dev)
    sel = slice(rings[0] - binner.lo, rings[1] - binner.lo + 1)
    mode = ctf_mode_of(meta)
    rot_all = np.asarray(meta.rotation_matrices(), dtype=np.float32)
    org_all = np.asarray(meta.origins_A(), dtype=np.float32)
    ctf_all = meta.ctf_params() if mode != "none" else None
    images = ParticleImages(meta)
    c0, a0, s0 = model.neutral.tensors(dev)
    out = []
    for s in range(0, len(rows), batch_size):
        r = np.asarray(rows[s:s + batch_size])
        imgs = torch.as_tensor(np.asarray(images.get(r), dtype=np.float32), device=dev)
        ctfp = None if ctf_all is None else {k: np.asarray(v)[r] for k, v in ctf_all.items()}
        Fimg, ctf = prepare_batch(imgs, torch.as_tensor(org_all[r], device=dev), ctfp, apix)
        if ctf is not None and mode == "phase_flipped":
            ctf = ctf.abs()
        R = torch.as_tensor(rot_all[r], device=dev)
        with torch.no_grad():
            c, a, sg = model.decode(torch.as_tensor(latents[s:s + batch_size]))
            Fd = project(c.to(dev).float(), a.to(dev).float(), sg.to(dev).float(), R, box, apix, None, ctf)
            Fn = project(c0, a0, s0, R, box, apix, None, ctf)
            g = binner.frc(Fd, Fimg)[:, sel] - binner.frc(Fn, Fimg)[:, sel]
            out.append(g.mean(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def gate_model(model, z_threshold: float = DEFAULT_GATE_Z, device="cpu", seed: int = 0) -> GateResult:
    """Gate ``model`` (:class:`training.trained.TrainedModel`, C1) on the particles of its own
    training star, on the rings just finer than its training band (module docstring)."""
    import os
    from ..io.metadata import read_particles
    from ..io.outputs import TrainFolder
    try:  # the folder's own record (config.json) first, as motion_corrected.latents_for_rows reads it
        star = TrainFolder(model.train_dir).read_config().get("particles")
    except Exception:  # noqa: BLE001 - an unreadable config falls back to the model file's copy
        star = (model.info or {}).get("particles")
    if not star or not os.path.exists(star):
        return GateResult(True, 0, float("nan"), float("nan"), "training star not found; moves kept untested")
    meta = read_particles(star)
    first, last = test_rings(model, int(meta.box), float(meta.apix))
    if first > last:
        return GateResult(True, 0, float("nan"), float("nan"), "the training band reaches Nyquist, no ring left to "
                          "test the moves on; moves kept untested (the half-map FSC may be optimistic)")
    lat = TrainFolder(model.train_dir).read_latents()
    rows = np.arange(len(meta))
    if rows.size > MAX_GATE_PARTICLES:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_GATE_PARTICLES, replace=False))
    g = held_out_gains(model, lat[rows], meta, rows, (first, last), device)
    return gate_from_gains(g, z_threshold, meta.box * meta.apix / np.array([first, last], dtype=np.float64))


def gate_from_gains(gains: np.ndarray, z_threshold: float = DEFAULT_GATE_Z, band_A=(math.nan, math.nan),
                    ) -> GateResult:
    """The verdict on per-particle FRC gains (:func:`held_out_gains`): passed when their mean is
    at least ``z_threshold`` standard errors; ``band_A`` the test rings' resolutions (for the log)."""
    g = np.asarray(gains, np.float64).reshape(-1)
    n = g.size
    mean = float(g.mean()) if n else float("nan")
    se = float(g.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    z = mean / se if se > 0 else (math.inf if mean > 0 else 0.0)
    passed = bool(z >= z_threshold)
    verdict = "moves kept" if passed else "moves not significant: zero displacement (the plain map for this half)"
    reason = (f"FRC gain of the decoded over the neutral model outside the training band ({band_A[0]:.1f}-"
              f"{band_A[1]:.1f} A) {mean:+.4f} on {n} particles ({z:+.1f} standard errors, threshold "
              f"{z_threshold:g}): {verdict}")
    return GateResult(passed, n, mean, z, reason)
