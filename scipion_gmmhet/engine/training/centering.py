"""Particle centring before training: each particle's shift checked against the neutral GMM.

Why
    A network trained on particles whose shifts (RELION origins ``rlnOriginX/YAngst``) carry
    errors learns the errors as motions: every latent direction goes to explaining where the
    particle sits, and the real motion is lost. MD-like 1AKE hinge (1 A disorder, all-atom
    frames), 6,000 particles, 64 px at 1.5 A/px, SNR 0.1, defaults, |Spearman(latent PC1, true
    hinge)|: exact poses 0.938; rotations off by a median 1.93 deg 0.926; shifts off by a
    median 1.14 px 0.318, and both 0.224 (all four latent directions used). Removing the
    rigid-body part of the decoder's moves (a translation or rigid gauge) does not help (0.14):
    the network absorbs a shift with amplitudes and bends. Centring the particles first does:
    0.929 (shift error 1.14 -> 0.29 px); at exact poses nothing moves (below) and the latents
    are those of ``--center off`` (benchmarks/results/centering_hinge_md_snr0.1.md).

Method
    A shift-only local search (:func:`analysis.refine.refine_poses` with ``max_angle_deg=0``)
    of each particle's image against the CTF-applied projection of the neutral GMM at the
    particle's rotation, within ``max_shift_px`` (default 3 px, prior sigma 1 px), scored by
    the whitened band correlation, with refine's evidence test (a new shift must gain 5.5
    nats; a correct shift stays exactly). Then refine's gold-standard check
    (:mod:`analysis.refine_gate`): the corrections are kept only when the two half maps agree
    better with them, significantly; otherwise every particle keeps its shift. The neutral
    model is not any particle's structure, so at exact poses the search still moves a few
    percent of the particles by their conformation (two motions: 483 of 6,000), and those moves
    make the half maps agree less (t = -3.6; hinge -4.0); real shift errors make them agree
    better (1.14 px errors: t = 4.7). So exact poses train exactly as without centring (the
    ungated moves had cost |Spearman| 0.002-0.006), in ~7 s of reconstructions for 6,000
    particles at box 64 on one CPU thread. Rotations are left alone: against one consensus
    model they are biased by the motion (the same search with rotations made them worse,
    1.93 -> 2.12 deg), and the network tolerates them. The corrections are used for the
    gradient features and the training loss; the input star is not changed (``gmmhet refine``
    refines the poses themselves). Units: Angstrom, added to the RELION origins.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

CENTER_MODES = ("auto", "off")
#: shift search radius in pixels: RELION/cryoSPARC consensus shifts are rarely off by more
MAX_SHIFT_PX = 3.0


@dataclass
class Centering:
    """Shift corrections ``shifts_A`` ``(n_particles, 2)`` (Angstrom, added to the RELION
    origins; 0 rows where the input shift was kept), how long the search took, and the
    gold-standard check (``gate``, :class:`analysis.refine_gate.GateResult`; None when not run)
    with the number of particles the search had moved (``n_found``) before it."""

    shifts_A: np.ndarray
    seconds: float = 0.0
    gate: object = None
    n_found: int | None = None

    @property
    def n_moved(self) -> int:
        return int(np.count_nonzero(np.any(self.shifts_A != 0, axis=1)))

    def summary(self) -> dict:
        """JSON-ready numbers for summary.json and the logs."""
        d = np.linalg.norm(self.shifts_A, axis=1)
        moved = d[d > 0]
        out = {"n_moved": self.n_moved, "n_particles": int(len(d)),
               "median_correction_A": round(float(np.median(moved)), 4) if moved.size else 0.0,
               "p90_correction_A": round(float(np.percentile(moved, 90)), 4) if moved.size else 0.0,
               "seconds": round(float(self.seconds), 2)}
        if self.gate is not None:
            out.update(n_found=self.n_found, gate_accepted=bool(self.gate.accepted),
                       gate_fsc_input=round(float(self.gate.fsc_input), 4),
                       gate_fsc_centred=round(float(self.gate.fsc_refined), 4), gate_t=round(float(self.gate.t), 2))
        return out


class _NeutralModels:
    """The neutral GMM for every particle (a :class:`analysis.refine.ParticleModels`)."""

    def __init__(self, neutral):
        self.neutral_centers_A = np.asarray(neutral.centers_A)
        self.median_sigma_A = float(np.median(neutral.sigmas_A))
        self._gmm = tuple(np.asarray(x, dtype=np.float32) for x in (neutral.centers_A, neutral.amplitudes,
                                                                        neutral.sigmas_A))
        self._on = {}

    def gaussians(self, rows, device):
        key = str(device)
        if key not in self._on:
            self._on[key] = tuple(torch.as_tensor(x, device=device) for x in self._gmm)
        c, a, s = self._on[key]
        B = len(rows)
        return c.expand(B, -1, -1), a.expand(B, -1), s.expand(B, -1)


def center_particles(particles, neutral, max_shift_px: float = MAX_SHIFT_PX, batch_size: int = 64) -> Centering:
    """The shift corrections of every particle of ``particles`` (:class:`io.data.Particles`,
    uncropped, any symmetry expansion: the search uses each particle's own rotation) against
    ``neutral`` (see the module docstring). Under several processes every process searches all
    particles (the noise whitening is estimated per batch, so splitting the set would change the
    result; the search runs at ~1,400 particles/s on one CPU thread at box 64)."""
    from ..analysis.refine import refine_poses
    t0 = time.time()
    p1 = particles
    if getattr(particles, "n_ops", 1) != 1:  # the particles themselves, not their symmetry copies
        p1 = copy.copy(particles)
        p1.n_ops = 1
        p1.sym_ops = torch.eye(3, dtype=torch.float32, device=particles.device)[None]
    search_log = logging.getLogger(refine_poses.__module__)
    level = search_log.level
    search_log.setLevel(logging.WARNING)  # its progress lines speak of refinement
    try:
        res = refine_poses(p1, _NeutralModels(neutral), max_angle_deg=0.0, max_shift_A=max_shift_px * p1.apix,
                           batch_size=batch_size)
    finally:
        search_log.setLevel(level)
    shifts = np.asarray(res.origins_A, dtype=np.float64) - p1.origins_A.double().cpu().numpy()
    return Centering(shifts, time.time() - t0)


def apply_centering(particles, centering: Centering) -> None:
    """Add the corrections to ``particles.origins_A`` (in place, on its device)."""
    s = torch.as_tensor(np.asarray(centering.shifts_A, dtype=np.float32), device=particles.origins_A.device)
    if s.shape != particles.origins_A.shape:
        raise ValueError(f"centering: {tuple(s.shape)} corrections for {tuple(particles.origins_A.shape)} origins")
    particles.origins_A = particles.origins_A + s


def center_for_training(particles, neutral, mode: str, saved_in=None, write_to=None, star_path=None):
    """What ``gmmhet train --center MODE`` does before anything else: 'off' -> None; 'auto' ->
    the :class:`Centering` of ``particles`` (read from the :class:`io.outputs.TrainFolder`
    ``saved_in`` when it holds one for these particles: a resumed run, or the finer model's first
    training; else searched and checked against the half maps of ``star_path``'s particles
    (:func:`gold_standard`; no check without a star)), written to the TrainFolder ``write_to``
    and applied to ``particles``' origins, with a log line (and a warning when most shifts were
    off)."""
    from ..errors import InputError
    if mode not in CENTER_MODES:
        raise InputError(f"--center {mode}: give one of {', '.join(CENTER_MODES)}")
    if mode == "off":
        return None
    saved = saved_in.read_centering() if saved_in is not None else None
    if saved is not None and saved.shape == (particles.n_particles, 2):
        centering = Centering(saved)
        log.info("centring: the corrections of %s", saved_in.centering)
    else:
        centering = center_particles(particles, neutral)
        if star_path is not None and centering.n_moved:
            centering = gold_standard(centering, star_path, particles)
    if write_to is not None and not (saved is not None and saved_in.centering == write_to.centering):
        os.makedirs(write_to.folder, exist_ok=True)
        write_to.write_centering(centering.shifts_A)
    apply_centering(particles, centering)
    s = centering.summary()
    if not s["n_moved"]:
        log.info("centring: every particle keeps the star's shift (%.1f s)", s["seconds"])
        return centering
    log.info("centring: %d of %d particles' shifts corrected against the neutral GMM (median %.2f A, 90th "
             "percentile %.2f A; %.1f s; --center off keeps the star's shifts)", s["n_moved"], s["n_particles"],
             s["median_correction_A"], s["p90_correction_A"], s["seconds"])
    if s["n_moved"] > 0.5 * s["n_particles"] and s["median_correction_A"] > 0.5 * particles.apix:
        log.warning("centring: most particles' shifts were off (median %.2f A): the poses carry errors the "
                    "latent space would otherwise learn as motions; `gmmhet refine` refines them",
                    s["median_correction_A"])
    return centering


def gold_standard(centering: Centering, star_path: str, particles) -> Centering:
    """``centering`` kept when the half maps of ``star_path``'s particles agree better with its
    corrections than without (:func:`analysis.refine_gate.compare_shells`), else all zeros."""
    from ..analysis.reconstruct import normalise_ctf_mode
    from ..analysis.refine_gate import compare_shells, half_map_fsc
    from ..io import metadata
    meta = metadata.read_particles(star_path)
    if len(meta) != len(centering.shifts_A):
        return centering
    t0 = time.time()
    mode = normalise_ctf_mode(particles.ctf_mode)
    device = str(particles.device)
    trial = meta.with_poses(None, meta.origins_A() + centering.shifts_A)
    gate = compare_shells(half_map_fsc(meta, device, mode), half_map_fsc(trial, device, mode))
    n_found = centering.n_moved
    log.info("centring: gold-standard check: mean half-map FSC %.4f with the star's shifts, %.4f centred (shell-"
             "wise gain t = %.2f, needs %.2f; %.1f s): %s", gate.fsc_input, gate.fsc_refined, gate.t, gate.t_min,
             time.time() - t0, "centring" if gate.accepted else
             f"the star's shifts were as good; the {n_found} moves followed the neutral model, not shift errors, "
             "and every particle keeps its shift")
    shifts = centering.shifts_A if gate.accepted else np.zeros_like(centering.shifts_A)
    return Centering(shifts, centering.seconds + time.time() - t0, gate, n_found)
