"""Significance gate of a half model's moves, for an honest motion-corrected FSC.

A model trained on particles that hold no motion (or no signal at all) still decodes moves: the
encoder reads each image and the decoder moves the Gaussians to fit that image's noise (27 A
RMS on pure-noise particles, box 64). Inserting a particle along moves fitted to its own noise
pulls the noise into the shape of the neutral model, in both half maps alike (the halves share
the neutral model), and their FSC rises at the lowest shells (0.98 / 0.89 / 0.35 at
192 / 96 / 64 A on pure noise) although the particles hold nothing: reference bias.

The test must therefore score the decoded model on image data that decided neither the latent
nor the network's weights:

- **particles**: those of the *other* half set (the model never trained on them, so its weights
  hold nothing of their noise; ``rlnRandomSubset``), a seeded subset of at most
  :data:`MAX_GATE_PARTICLES`;
- **Fourier split**: the coefficients of the training band (``lowres_A`` .. ``highres_A``) are
  cut into :data:`N_SECTORS` angular sectors (angle modulo 180 deg, so a coefficient and its
  Hermitian mirror fall together), alternately A and B. Each particle is encoded from the band
  restricted to A (the encoder's gradient features of the band correlation over A only,
  normalised like the training's features but with statistics of these features, from a
  seeded sample), decoded, and scored on B: the band correlation of the image with the
  CTF-modulated projection of the decoded model minus that with the neutral model's
  projection, over B only; then the same with A and B swapped. The particle's gain is the
  mean of both.

Noise in B is independent of the noise in A (Fourier coefficients of stationary noise; the
sectors touch only along their edges), and of the weights, so moves fitted to noise have an
expected gain of exactly zero; real moves predict the image in B as well as in A. The gain is
paired (same image in both terms), so its mean over ``n`` particles has standard error
``sd / sqrt(n)``; the moves pass when the mean is at least ``z`` = :data:`DEFAULT_GATE_Z` = 3
standard errors (noise passes by chance 0.1 % of the time). A model that fails is given zero
displacement: its half map is the plain reconstruction. Only one bit (kept / zeroed) of the
other half reaches a half map, which cannot inflate the half-map FSC.

Why not the simpler tests (measured on half models trained with the current defaults,
``benchmarks/bench_motion_gate.py``; z of half 1 / half 2, docs/motion_corrected.md):

- held-out particles scored where the encoder looked (the other half encoded from the whole
  band, or the training's validation particles): the encoder reads the image it is scored on,
  so its decoded model beats the neutral one by fitting that image's noise (pure noise,
  2,000 particles: z +44 / +40; homogeneous: +33 / +32);
- the model's own particles scored on the rings just finer than the training band (the first
  gate): honest, but once the band reaches the neutral GMM's resolution (``--loss corr``) those
  rings hold little signal and real motion was rejected (arm swing, SNR 0.1, 1,000 particles:
  z -1.4 / -1.8; 5,000: -4.0 / -1.5). This test: +15.7 / +17.5 and +42.6 / +43.2 (500
  particles: +7.5 / +8.0); homogeneous -0.9 / +1.4; pure noise -0.7 / -1.5 (four more noise
  sets: -1.0 ... +1.5; a band forced to 17.5 A: +2.6 / -1.0).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

#: the moves pass when their mean cross-validated gain is at least this many standard errors
DEFAULT_GATE_Z = 3.0
#: angular sectors (over 180 deg) of the training band, alternately encoded from and scored on
N_SECTORS = 8
#: at most this many particles of the other half set are scored (a seeded subset)
MAX_GATE_PARTICLES = 3000
#: particles of the seeded sample that normalises the split features
N_STATS = 512

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    """``passed``; ``n`` scored particles; ``gain`` mean correlation gain (decoded - neutral);
    ``z`` gain / standard error; ``reason`` one line for the log."""
    passed: bool
    n: int
    gain: float
    z: float
    reason: str


def sector_split(box: int, n_sectors: int = N_SECTORS, device=None) -> torch.Tensor:
    """``(box, box//2+1)`` bool over a ``box``-px image's rfft: True in the even angular sectors
    (angle of ``(kx, ky)`` modulo 180 deg, ``n_sectors`` of them), False in the odd ones; the
    origin is False. A coefficient and its Hermitian mirror get the same value."""
    ky = torch.fft.fftfreq(box, d=1.0 / box, device=device, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(box, d=1.0 / box, device=device, dtype=torch.float64)[None, :]
    ky = ky.expand(-1, kx.shape[1]).clone()
    if box % 2 == 0:  # the Nyquist column holds (ky, D/2) and its mirror (-ky, -D/2) = (-ky, D/2): one angle
        ky[:, -1] = ky[:, -1].abs()
    theta = torch.remainder(torch.atan2(ky, kx.expand(ky.shape[0], -1)), math.pi)
    sector = torch.clamp((theta / (math.pi / n_sectors)).floor().long(), max=n_sectors - 1)
    out = sector % 2 == 0
    out[0, 0] = False
    return out


def restricted_binner(binner, pixels: torch.Tensor):
    """A copy of ``binner`` (:class:`fourier.RingBinner`) that sums only over the band's
    coefficients where ``pixels`` ``(H, W)`` is True."""
    import copy
    out = copy.copy(binner)
    keep = pixels.to(binner.flat_index.device).reshape(-1)[binner.flat_index]
    out.pixel_mask = binner.pixel_mask & pixels.to(binner.pixel_mask.device)
    out.flat_index = binner.flat_index[keep]
    out.onehot = binner.onehot[keep]
    out._hw = None
    return out


def _particles_of(model, meta, device):
    """:class:`io.data.Particles` of ``meta`` with the model's CTF mode, cropped to its band."""
    from ..io.data import ParticleImages, Particles, ctf_of
    mode, ctf, premultiplied = ctf_of(meta, model.config.get("ctf_mode", "auto"), "particles")
    p = Particles(ParticleImages(meta), meta.rotation_matrices(), meta.origins_A(), meta.box, meta.apix,
                  ctf=ctf, ctf_mode=mode, device=device, premultiplied=premultiplied)
    p.crop(model.config.get("highres_A"))
    return p


def split_gains(model, meta, rows: np.ndarray, device="cpu", batch_size: int = 64, seed: int = 0,
                n_sectors: int = N_SECTORS) -> np.ndarray:
    """Per-particle gains ``(len(rows),)`` of ``model``'s decoded models over its neutral model
    for the star rows ``rows`` of ``meta``: encoded from one set of angular sectors of the
    training band, scored (band correlation) on the other, both ways, averaged (module docstring).
    ``model``: :class:`training.trained.TrainedModel` (C1); the rows must not be its training particles."""
    from ..model.fourier import RingBinner
    from ..model.gmm import project
    from ..training.features import GradientFeatures, feature_param_types
    dev = torch.device(device)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros(0, np.float32)
    parts = _particles_of(model, meta.subset(rows), dev)
    cfg = model.config
    band = RingBinner(parts.fbox, parts.fapix, cfg.get("lowres_A"), cfg.get("highres_A"), device=dev, loss="corr")
    a_side = sector_split(parts.fbox, n_sectors, dev)
    sides = (restricted_binner(band, a_side), restricted_binner(band, ~a_side))
    types = feature_param_types(cfg["changes"])
    mobile = torch.as_tensor(model.mobile, device=dev)
    feats = []
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(rows), min(N_STATS, len(rows)), replace=False))
    for enc in sides:  # the encoder's features of one side, normalised with that side's own statistics
        f = GradientFeatures(model.neutral, enc, mobile, types, dev)
        f.estimate_stats(parts, sample, batch_size)
        feats.append(f)
    c0, a0, s0 = model.neutral.tensors(dev)
    net = model.model.to(dev).eval()
    out = []
    for i0 in range(0, len(rows), batch_size):
        b = parts.batch(np.arange(i0, min(len(rows), i0 + batch_size)))
        with torch.no_grad():
            Fn = project(c0, a0, s0, b.rotations, parts.fbox, parts.fapix, b.origins_A, b.ctf)
            gain = torch.zeros(b.rotations.shape[0], device=dev)
            for k, score_side in ((0, sides[1]), (1, sides[0])):
                z = net.encode(feats[k](b))
                c, a, s = net.decoder(z)
                Fd = project(c, a, s, b.rotations, parts.fbox, parts.fapix, b.origins_A, b.ctf)
                gain += 0.5 * (score_side.band_corr(Fd, b.F_img) - score_side.band_corr(Fn, b.F_img))
        out.append(gain.cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def gate_model(model, meta, rows: np.ndarray, z_threshold: float = DEFAULT_GATE_Z, device="cpu",
               seed: int = 0) -> GateResult:
    """Gate ``model`` (:class:`training.trained.TrainedModel`, C1) on the star rows ``rows`` of
    ``meta``: particles it was not trained on (the other half set; module docstring)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size < 2:
        return GateResult(True, int(rows.size), float("nan"), float("nan"),
                          "fewer than 2 particles of the other half set to test the moves on; moves kept untested")
    if rows.size > MAX_GATE_PARTICLES:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_GATE_PARTICLES, replace=False))
    return gate_from_gains(split_gains(model, meta, rows, device, seed=seed), z_threshold)


def gate_from_gains(gains: np.ndarray, z_threshold: float = DEFAULT_GATE_Z) -> GateResult:
    """The verdict on per-particle gains (:func:`split_gains`): passed when their mean is at
    least ``z_threshold`` standard errors."""
    g = np.asarray(gains, np.float64).reshape(-1)
    n = g.size
    mean = float(g.mean()) if n else float("nan")
    se = float(g.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    z = mean / se if se > 0 else (math.inf if mean > 0 else 0.0)
    passed = bool(z >= z_threshold)
    verdict = "moves kept" if passed else "moves not significant: zero displacement (the plain map for this half)"
    reason = (f"correlation gain of the decoded over the neutral model on the other half's particles, "
              f"encoded and scored on disjoint Fourier sectors of the training band: {mean:+.5f} on {n} particles "
              f"({z:+.1f} standard errors, threshold {z_threshold:g}): {verdict}")
    return GateResult(passed, n, mean, z, reason)
