"""Gold-standard check of a refinement: keep the refined poses only if the half maps agree better.

The per-particle acceptance test of :mod:`refine` (step 4: a new pose needs 5.5 nats of
evidence) is calibrated for an exact model. A trained network's decoded GMMs are not exact:
their errors differ from particle to particle and shift each particle's score optimum by about
as much as the pose noise (simulated hinge data, box 64, SNR 1, network trained on the exact
poses: 616 of 800 particles moved, median 1.93 deg, the score gains of those moves being
uncorrelated with the pose error). No test on one particle separates such a model-induced move
from a real pose correction; the population can. Poses that are closer to the truth make the
two independent half maps (RELION's gold standard, halves from ``rlnRandomSubset`` or a seeded
split) agree better; moves that only follow each particle's model error scatter the particles
and make them agree less. So both sets of poses are reconstructed (two half maps each, ~2 s
each at box 64 and 800 particles on one CPU core) and the refined poses are kept only when the
mean half-map FSC over the shells (1 to Nyquist) is higher with them, and significantly so;
otherwise every particle keeps its input pose.

Significance: the gain is measured shell by shell (each shell is its own set of Fourier voxels)
and the refined poses must win a one-sided t-test over the shells at 5% (t >= the 95% quantile of
Student's t with shells - 1 degrees of freedom, ~1.7 at box 64). A tiny mean gain can come from
moves that only follow the model's errors: simulator arm at exact poses with a neutral GMM built
at 12 A, 800 particles, 32% of them moved, mean gain +0.0008, t = 0.5 (now rejected: 100%
unchanged); the corrections measured so far had t 2.0-5.5 (simulator rounds 1 and 2: 3.2, 2.0;
1AKE hinge rounds 1-3: 5.5, 5.1, 1.9).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


SIGNIFICANCE = 0.05  #: one-sided level of the shell-wise t-test of the FSC gain


@dataclass
class GateResult:
    """Mean half-map FSC (shells 1 to Nyquist) with the input and with the refined poses, the
    t statistic of the shell-wise gain and the threshold it must reach."""

    fsc_input: float
    fsc_refined: float
    t: float = float("inf")
    t_min: float = 0.0

    @property
    def accepted(self) -> bool:
        """True when the refined poses' half maps agree better than the input poses', significantly."""
        return bool(self.fsc_refined > self.fsc_input and self.t >= self.t_min)


def half_map_fsc(meta, device="cpu", ctf_mode: str | None = None) -> np.ndarray:
    """FSC of the two half maps of ``meta``'s particles per shell, shells 1 to Nyquist (unmasked)."""
    from .reconstruct import reconstruct_particles
    rec = reconstruct_particles(meta, device=device, ctf_mode=ctf_mode, progress=False, mask=False)
    return np.asarray(rec.fsc["fsc"], dtype=np.float64)[1:]


def compare_shells(fsc_input: np.ndarray, fsc_refined: np.ndarray, level: float = SIGNIFICANCE) -> GateResult:
    """The gate's verdict from the two per-shell FSC curves (same shells)."""
    from scipy.stats import t as student_t
    d = np.asarray(fsc_refined, np.float64) - np.asarray(fsc_input, np.float64)
    k = len(d)
    if k < 3:
        return GateResult(float(np.mean(fsc_input)), float(np.mean(fsc_refined)))
    sd = float(np.std(d, ddof=1))
    if sd == 0:  # identical gain in every shell (e.g. none): its sign decides
        t = math.copysign(math.inf, float(d.mean())) if d.mean() != 0 else 0.0
    else:
        t = float(d.mean() / (sd / np.sqrt(k)))
    return GateResult(float(np.mean(fsc_input)), float(np.mean(fsc_refined)), t, float(student_t.ppf(1 - level, k - 1)))


def gold_standard_gate(meta_in, meta_out, device="cpu", ctf_mode: str | None = None) -> GateResult:
    """Compare the half-map agreement of the input poses ``meta_in`` and the refined poses
    ``meta_out`` (:class:`metadata.ParticleMetadata` of the same particles, same halves)."""
    from .reconstruct import normalise_ctf_mode
    mode = normalise_ctf_mode(ctf_mode)
    g = compare_shells(half_map_fsc(meta_in, device, mode), half_map_fsc(meta_out, device, mode))
    log.info("refine: gold-standard check: mean half-map FSC %.4f with the input poses, %.4f with the refined "
             "poses (shell-wise gain t = %.2f, needs %.2f): %s", g.fsc_input, g.fsc_refined, g.t, g.t_min,
             "keeping the refined poses" if g.accepted else
             "the input poses were already as good; every particle keeps its input pose (--no-gate: keep the "
             "refined poses anyway)")
    return g
