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
mean half-map FSC over the shells (1 to Nyquist) is higher with them; otherwise every particle
keeps its input pose.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    """Mean half-map FSC (shells 1 to Nyquist) with the input and with the refined poses."""

    fsc_input: float
    fsc_refined: float

    @property
    def accepted(self) -> bool:
        """True when the refined poses' half maps agree better than the input poses'."""
        return self.fsc_refined > self.fsc_input


def half_map_fsc_mean(meta, device="cpu", ctf_mode: str | None = None) -> float:
    """Mean FSC of the two half maps of ``meta``'s particles over shells 1 to Nyquist (unmasked)."""
    from .reconstruct import reconstruct_particles
    rec = reconstruct_particles(meta, device=device, ctf_mode=ctf_mode, progress=False, mask=False)
    f = np.asarray(rec.fsc["fsc"], dtype=np.float64)
    return float(np.mean(f[1:])) if len(f) > 1 else float("nan")


def gold_standard_gate(meta_in, meta_out, device="cpu", ctf_mode: str | None = None) -> GateResult:
    """Compare the half-map agreement of the input poses ``meta_in`` and the refined poses
    ``meta_out`` (:class:`metadata.ParticleMetadata` of the same particles, same halves)."""
    from .reconstruct import normalise_ctf_mode
    mode = normalise_ctf_mode(ctf_mode)
    g = GateResult(half_map_fsc_mean(meta_in, device, mode), half_map_fsc_mean(meta_out, device, mode))
    log.info("refine: gold-standard check: mean half-map FSC %.4f with the input poses, %.4f with the refined "
             "poses: %s", g.fsc_input, g.fsc_refined,
             "keeping the refined poses" if g.accepted else
             "the input poses were already as good; every particle keeps its input pose (--no-gate: keep the "
             "refined poses anyway)")
    return g
