"""Refine each particle's orientation and shift against its own decoded GMM.

For every particle of STAR, a local search around its current pose (rotations within
--max-angle degrees, origin shifts within --max-shift Angstrom) maximises the whitened
correlation (or FRC) between the particle and the CTF-applied projection of the GMM the trained network
decodes at the particle's latent point. With --mask only
the Gaussians inside the mask are scored (the rest is subtracted from the particle): the pose
of that domain. Writes OUT/particles.star (the input star with new rlnAngleRot/Tilt/Psi and
rlnOriginX/YAngst; every other column untouched) and OUT/pose_changes.csv (row, particle id
when the star has rlnGmmhetParticleId, delta_angle_deg, delta_shift_A, score_before,
score_after, and the new angles/origins), and logs the median and 90th-percentile changes.

Latents: --latents Z.npy (row i = particle row i of STAR); else, when every particle of STAR
is one of the training run's (in any order, or a subset), its training latent (TRAIN/latent.npy),
matched by particle id or image, never by row position; otherwise (or with --encode) the
particles are encoded with the trained encoder.

Examples:
  gmmhet refine --train train/ --particles particles.star --out refine/
  gmmhet refine --train train/ --particles particles.star --max-angle 4 --max-shift 6 \\
      --device cuda --out refine_fine/
  gmmhet refine --train train_arm/ --particles particles.star --mask arm_mask.mrc --out refine_arm/
  gmmhet refine --train train/ --particles particles.star --rounds 1 --out refine_once/

Iteration (--rounds, default auto; e2gmm's Extended Data Fig. 1): a network trained on
particles with pose errors partly explains them as deformations, so one refinement corrects
only part of the error; retraining on the refined poses and refining again corrects more. By
default the command repeats refine -> retrain until a round's median angular change falls below
the search's angular precision (at most --max-rounds refinements; at exact poses the first round
moves nothing and stops there).
A particle moves in the first round only with 5.5 nats of evidence, so correct poses stay; in
later rounds it takes its best pose (--min-gain sets every round). When the first round's
median change stays below the search's precision (the angular precision and 0.25 px), it found no
correction it can resolve for the typical particle, only moves that fit the model's errors (the
frames of a real molecular-dynamics trajectory at their exact poses: half of them moved by a
median 0.32 deg, and the map got worse): every particle keeps its input pose. Every round must make the
half maps agree better (a gold-standard FSC check), else all particles keep their poses. The
decoded models are compared in the frame of the neutral model (their own rigid translation
removed), so no mask is needed. OUT/rounds.csv and the log give each round's median change,
the evidence asked and the check.

Finer network (--reference auto = network, default): from the second round on, the particles
are reconstructed at the refined poses and, when that map is finer than the neutral GMM's build
resolution, a GMM of it (at its gold-standard resolution, no finer than 0.6 x the neutral's) is
the model of the retraining, in a band up to that resolution (chosen again from the particles'
signal); each particle is then aligned to the GMM this finer network decodes for it. Else the
retraining uses the neutral GMM, as in round 1.
--reference layered: the network retrained on the neutral GMM; the particle's decoded model up
to the training band's top and, beyond it, the finer GMM deformed by its decoded motion (the
default of 0.2.0's earlier builds); --reference fine: that deformed GMM at every resolution;
--reference decoded: the decoded models of the neutral GMM's network in every round.

--core auto (opt-in) scores only the automatic rigid core (the Gaussians that move least across
the decoded models; the rest of each particle's model is subtracted from its image). It helped
some perturbed sets but moved particles at exact poses, so it is not the default.

Measured settings and results: benchmarks/README.md and the README's refinement table.
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from ..ctf_modes import CTF_CHOICES, ctf_mode as ctf_mode_name
from ..io.atomic import atomic_write, make_output_dir
from ..io.outputs import RefineFolder, pose_change_summary as summary
from ..errors import InputError

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="DIR", help="output folder of 'gmmhet train'")
    p.add_argument("--particles", required=True, metavar="STAR", help="particle star file (poses are the start)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--mask", default=None, metavar="MASK.mrc",
                   help="focus mask: score only the Gaussians inside it (> 0.5); refines that region's pose")
    p.add_argument("--core", choices=["auto", "none"], default="none",
                   help="without --mask: none (default) scores every Gaussian; auto scores only the automatic "
                        "rigid core, the Gaussians that move least across the first network's decoded models "
                        "(the rest, decoded per particle, is subtracted), so a flexible part cannot pull the "
                        "pose (larger corrections on a big swinging domain, but moves some exact poses: see "
                        "rigid_core.refinement_core)")
    p.add_argument("--reference", choices=["auto", "network", "layered", "fine", "decoded"], default="auto",
                   help="what each particle is aligned to after the first round: auto = network (default): the "
                        "retraining learns a finer GMM of the reconstruction at the refined poses (when that "
                        "reconstruction is finer than the neutral GMM; scipion_gmmhet.engine.analysis.fine_reference) "
                        "to its resolution, and each particle is aligned to the GMM it decodes; layered: the "
                        "network retrained on the neutral GMM, its decoded model up to the training band's top and "
                        "the finer GMM deformed by the particle's decoded motion beyond it; fine: that deformed "
                        "finer GMM at every resolution; decoded: the decoded models of the neutral GMM's network")
    p.add_argument("--max-angle", type=float, default=6.0, metavar="DEG",
                   help="largest rotation away from the current pose in each round, degrees (default 6; "
                        "over several rounds a particle can move further)")
    p.add_argument("--max-shift", type=float, default=None, metavar="A",
                   help="largest origin change, Angstrom (default 2 pixels)")
    p.add_argument("--lowres", type=float, default=None, metavar="A",
                   help="FRC band low-resolution limit, Angstrom (default: the training band's)")
    p.add_argument("--highres", type=float, default=None, metavar="A",
                   help="high-resolution limit, Angstrom (default: where the median Gaussian's transform "
                        "falls to 1%%, 2.07 sigma, at least Nyquist)")
    p.add_argument("--score", choices=["wcc", "frc"], default="wcc",
                   help="wcc: cross-correlation over the band with each ring whitened by the noise power and "
                        "weighted by how well the model holds it (the images' ring scale to the model at the "
                        "refined poses of the batches before; default: the maximum-likelihood score, far less "
                        "noise-sensitive); frc: plain mean of the ring FRCs (e2gmm's training loss)")
    p.add_argument("--no-prior", dest="prior", action="store_false",
                   help="maximise the score alone (default: MAP with a Gaussian prior of sigma = range/3 on "
                        "the pose change, which stops noise from pushing poses to the edge of the range)")
    p.add_argument("--min-gain", type=float, default=None, metavar="NATS",
                   help="evidence a new pose needs over the input pose, in nats of the objective, in every "
                        "round (default: 5.5 in the first round, a 95%% likelihood-ratio test for the 5 pose "
                        "parameters, so correct poses stay; 0 from the second round on, after the "
                        "gold-standard check has accepted a round; 0: take any improvement)")
    p.add_argument("--no-gate", dest="gate", action="store_false",
                   help="keep the refined poses even when their half maps agree less than the input poses' "
                        "or the first round's median change is below the search's precision (default: both "
                        "checks; a trained network's model errors move particles that were right, and then "
                        "every particle keeps its input pose)")
    p.add_argument("--levels", type=int, default=3, help="finer rotation lattices after the coarse one (default 3)")
    p.add_argument("--polish-steps", type=int, default=0,
                   help="Adam steps on the exact score after the search (default 0: the lattice search and shift polish suffice)")
    p.add_argument("--latents", default=None, metavar="Z.npy",
                   help="latent vectors (n_particles x K .npy, row i = particle row i of STAR); default: the "
                        "training latents when STAR is the training star, else the particles are encoded")
    p.add_argument("--encode", action="store_true", help="encode the particles instead of using the training latents")
    p.add_argument("--ctf", dest="ctf_mode", choices=CTF_CHOICES, default=None,
                   help="how the images carry the CTF: full, phase_flipped, premultiplied, none or auto "
                        "(default: the training run's; ctf and flipped: old names of full and phase_flipped)")
    p.add_argument("--batch-size", type=int, default=64, help="particles per batch (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--rounds", default="auto", metavar="N|auto",
                   help="auto (default): refine, retrain on the refined poses, refine again... until a round's "
                        "median angular change falls below the search's angular precision (--max-angle / "
                        "2^(levels+1), 0.375 deg at the defaults), at most --max-rounds refinements; N: exactly N "
                        "refinements (1: refine once, written straight into OUT). With more than one possible "
                        "round, round r goes to OUT/round_r/ (particles.star, pose_changes.csv, train/); "
                        "OUT/particles.star holds the last round's poses, OUT/pose_changes.csv the changes from "
                        "the input poses, OUT/rounds.csv the median change per round")
    p.add_argument("--max-rounds", type=int, default=3, help="most refinements with --rounds auto (default 3)")
    p.add_argument("--retrain-epochs", type=int, default=None,
                   help="epochs of each retraining (default: the trained run's)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out with the same settings: keep its finished "
                        "rounds (round_r/refine_result.npz) and resume a retraining from its last checkpoint")


def main(args) -> int:
    from ..device import resolve_device
    from ..training.trained import load_trained

    if args.max_angle is not None and not args.max_angle >= 0:
        raise InputError(f"--max-angle {args.max_angle}: must be >= 0 degrees; e.g. 6")
    if args.max_shift is not None and not args.max_shift >= 0:
        raise InputError(f"--max-shift {args.max_shift}: must be >= 0 Angstrom; e.g. 2 pixels' worth")
    auto, n_rounds = _parse_rounds(args.rounds, args.max_rounds)
    if args.ctf_mode is not None:
        args.ctf_mode = ctf_mode_name(args.ctf_mode, "--ctf")
    if args.retrain_epochs is not None and args.retrain_epochs < 1:
        raise InputError(f"--retrain-epochs {args.retrain_epochs}: give at least 1")
    device = resolve_device(args.device)
    tm = load_trained(args.train, device)
    make_output_dir(args.out)
    precision = angular_precision(args.max_angle, args.levels)
    resume = _resumable(args)
    star, latents_arg, encode = args.particles, args.latents, args.encode
    meta0 = None
    history = []
    core = None  # the automatic focus: from the first network's training latents, kept for every round
    if args.mask is None and getattr(args, "core", "none") == "auto":
        from ..analysis.rigid_core import refinement_core
        core = refinement_core(tm, tm.latents())
    fine = None  # the deformed finer reference (from the second round on, --reference layered / fine)
    base = tm  # the input network: its neutral GMM and settings anchor every retraining
    mode = reference_mode(args)
    label = reference_name(None, None)
    round_core = core
    for r in range(1, n_rounds + 1):
        round_dir = args.out if n_rounds == 1 else RefineFolder(args.out).round(r).folder
        os.makedirs(round_dir, exist_ok=True)
        kept = _load_round(star, round_dir) if resume else None
        if kept is not None:
            meta, out_meta, res = kept
            log.info("refine round %d: finished before the interruption; kept %s", r, round_dir)
        else:
            meta, out_meta, res = _refine_once(tm, star, latents_arg, encode, args, device, round_dir, round_core,
                                               fine, min_gain=round_min_gain(args.min_gain, r), round_number=r)
            _save_round(res, round_dir)
        if meta0 is None:
            meta0, score0 = meta, res.score_before
        s = summary(res.delta_angle_deg, res.delta_shift_A, res.score_before, res.score_after)
        converged = s["angle_median_deg"] < precision
        history.append({"round": r, **s, "converged": converged, "min_gain_nats": round_min_gain(args.min_gain, r),
                        "reference": label,
                        "gate_fsc_input": float(res.gate_fsc_input), "gate_fsc_refined": float(res.gate_fsc_refined),
                        "gate_kept_input": bool(res.gate_kept_input), "gate_t": float(res.gate_t),
                        "gate_t_min": float(res.gate_t_min), "frame_drift_deg": float(res.frame_drift_deg),
                        "below_precision": bool(res.below_precision)})
        log.info("refine round %d/%s: median change %.3f deg and %.3f A (90th percentile %.3f deg, %.3f A)%s",
                 r, f"<={n_rounds}" if auto else n_rounds, s["angle_median_deg"], s["shift_median_A"],
                 s["angle_p90_deg"], s["shift_p90_A"],
                 f"; below the angular precision {precision:.3f} deg: done" if auto and converged else "")
        star = RefineFolder(round_dir).particles
        if r == n_rounds or (auto and converged):
            stop = "converged" if converged else "round limit"
            break
        # e2gmm's iteration: retrain on the refined poses, refine again
        train_dir = RefineFolder(round_dir).train.folder
        finer = None
        if mode == "network":
            finer = _finer_gmm(base, star, args, device, train_dir, resume, r)
            tm = _retrain(base, star, args, device, train_dir, resume,
                          neutral=finer.gmm if finer is not None else None)
            if core is not None and finer is not None:
                from ..analysis.fine_reference import carry_selection
                round_core = carry_selection(base.neutral, tm.neutral, core)
            label = (f"decoded models of the network retrained on {finer.describe()}" if finer is not None
                     else reference_name(None, None))
        else:
            tm = _retrain(tm, star, args, device, train_dir, resume)
            if mode != "decoded":
                finer = _finer_gmm(base, star, args, device, None, False, r)
            fine = finer
            label = reference_name(fine, layer_crossover_A(args, tm.config))
        latents_arg, encode = None, False  # the new run's latents are row i = particle i of the new star
    if n_rounds > 1:
        _write_overall(meta0, out_meta, score0, res.score_after, args.out)
    if n_rounds > 1 or auto:
        history[-1]["stop"] = stop
        RefineFolder(args.out).write_rounds(__import__("pandas").DataFrame(history))
        log.info("refine: %d round(s)%s; median change per round (deg): %s", len(history),
                 " (converged)" if history[-1]["converged"] else "",
                 ", ".join(f"{h['angle_median_deg']:.3f}" for h in history))
    return 0


def _finer_gmm(base, star: str, args, device, train_dir: str | None, resume: bool, r: int):
    """The finer GMM of the reconstruction of ``star`` (:func:`fine_reference.build_fine_reference`
    against ``base``'s neutral GMM), or None. With ``resume``, the one a retraining in
    ``train_dir`` already started from (its gmm.npz) is reused, not rebuilt (a rebuilt GMM need
    not be bit-identical, and the retraining's inputs must be)."""
    from ..analysis.fine_reference import FineReference, build_fine_reference
    from ..io import metadata
    from ..io.outputs import TrainFolder
    from ..model.gmm import GMM
    label = f"round {r}'s refined poses"
    if resume and train_dir and os.path.exists(TrainFolder(train_dir).gmm):
        gmm = GMM.load(TrainFolder(train_dir).gmm)
        if len(gmm) == len(base.neutral) and np.allclose(np.asarray(gmm.centers_A), np.asarray(base.neutral.centers_A)):
            return None  # that retraining used the neutral GMM (no finer reconstruction)
        log.info("refine: the retraining in %s started from a finer GMM (%d Gaussians); kept", train_dir, len(gmm))
        return FineReference(gmm, float(gmm.info.get("target_resolution_A", "nan")), f"the reconstruction of {label}")
    return build_fine_reference(metadata.read_particles(star), base.neutral, device=device,
                                ctf_mode=args.ctf_mode or base.config.get("ctf_mode"), label=label)


def reference_mode(args) -> str:
    """``--reference`` with ``auto`` resolved: ``network`` (default), ``layered``, ``fine`` or ``decoded``."""
    mode = getattr(args, "reference", "auto") or "auto"
    return "network" if mode == "auto" else mode


def layer_crossover_A(args, cfg: dict) -> float | None:
    """Resolution (Angstrom) below which a particle's decoded model stands for it in the later
    rounds' reference: the training band's top with ``--reference layered``, None with ``fine``."""
    return float(cfg["highres_A"]) if reference_mode(args) == "layered" else None


def reference_name(fine, crossover_A: float | None) -> str:
    """What a round aligned to, for rounds.csv and the log."""
    if fine is None:
        return "decoded models"
    if crossover_A is not None:
        return f"decoded models to {crossover_A:.1f} A, then {fine.describe()}"
    return fine.describe()


def angular_precision(max_angle_deg: float, levels: int) -> float:
    """The search's angular precision (degrees): the step of its finest rotation lattice,
    ``max_angle / 2^(levels + 1)``; ``--rounds auto`` stops when a round's median change falls below it."""
    return float(max_angle_deg) / 2.0 ** (int(levels) + 1)


#: the shift search's precision (pixels; its first sub-pixel step): with the angular precision, the
#: median change below which a first round found nothing it can resolve (:func:`below_precision`)
SHIFT_PRECISION_PX = 0.25


def below_precision(res, angle_deg: float, shift_A: float) -> bool:
    """Whether a refinement moved particles but the median particle's change stays below the
    search's precision in angle (``angle_deg``) and in shift (``shift_A``): then the moves fit the
    model's errors, not pose errors the search can resolve (``res``: :class:`refine.RefineResult`)."""
    moved = bool(res.delta_angle_deg.any() or res.delta_shift_A.any())
    return moved and float(np.median(res.delta_angle_deg)) < angle_deg and float(np.median(res.delta_shift_A)) < shift_A


def _parse_rounds(rounds, max_rounds: int) -> tuple[bool, int]:
    """``--rounds`` -> (automatic?, most refinements)."""
    if str(rounds).strip().lower() == "auto":
        if max_rounds < 1:
            raise InputError(f"--max-rounds {max_rounds}: give at least 1")
        return True, int(max_rounds)
    try:
        n = int(rounds)
    except ValueError:
        raise InputError(f"--rounds {rounds}: give auto or a number of refinements (1: refine once)") from None
    if n < 1:
        raise InputError(f"--rounds {rounds}: give at least 1 (refine once)")
    return False, n


def round_min_gain(min_gain: float | None, round_number: int) -> float:
    """Evidence (nats) a new pose needs in round ``round_number`` (1-based): ``--min-gain`` when
    given, else :data:`refine.MIN_GAIN_NATS` (5.5) in the first round and
    :data:`refine.LATER_ROUNDS_MIN_GAIN_NATS` (0) after it (each round still passes the
    gold-standard check). At exact poses the first round moves nothing and no second runs."""
    from ..analysis import refine
    if min_gain is not None:
        return float(min_gain)
    return refine.MIN_GAIN_NATS if int(round_number) <= 1 else refine.LATER_ROUNDS_MIN_GAIN_NATS


def _refine_once(tm, star: str, latents_path, encode: bool, args, device, out_dir: str, core=None, fine=None,
                 min_gain: float | None = None, round_number: int = 1):
    """Refinement round ``round_number`` of the particles of ``star`` against ``tm``'s decoded GMMs
    (with ``fine``, a :class:`fine_reference.FineReference`: that GMM deformed by them); writes
    ``out_dir/particles.star`` and ``out_dir/pose_changes.csv``. Returns (input metadata,
    output metadata, :class:`refine.RefineResult`)."""
    import pandas as pd

    from ..io import metadata
    from ..analysis import refine
    from ..conventions import matrix_to_euler
    from ..io.data import Particles
    from ..training.features import focus_mask_gaussians

    cfg = tm.config
    n_ops = 1
    sym = cfg.get("symmetry")
    if sym and str(sym).upper() not in ("C1", "NONE"):
        from ..model.symmetry import symmetry_operators
        n_ops = len(symmetry_operators(sym))
    ctf_mode = args.ctf_mode or cfg.get("ctf_mode", "auto")
    parts = Particles.from_star(star, ctf_mode=ctf_mode, device=device)
    meta = metadata.read_particles(star)
    n = len(meta)
    if parts.box != tm.neutral.box or abs(parts.apix - tm.neutral.apix) > 1e-3 * tm.neutral.apix:
        raise InputError(f"--particles {star}: box {parts.box} at {parts.apix:.4f} A/px but the model is "
                         f"box {tm.neutral.box} at {tm.neutral.apix:.4f} A/px; use the particles the model was trained on")

    latents = particle_latents(tm, star, n, n_ops, latents_path, encode, device, meta=meta)
    models = refine.LatentModels(tm, latents)
    focus = focus_mask_gaussians(tm.neutral, args.mask) if args.mask else core
    if fine is not None:
        models = warped_reference(models, fine, args, cfg)
        if focus is not None:  # the mask's (or the core's) coarse Gaussians, carried to the fine ones
            coarse = refine.selection_mask(focus, models.n_coarse)
            if args.mask:
                fine_sel = refine.selection_mask(focus_mask_gaussians(fine.gmm, args.mask), models.n_fine)
            else:  # core: a fine Gaussian follows its nearest coarse one
                fine_sel = coarse[models.nearest_coarse()]
            focus = models.focus(coarse, fine_sel)
    lowres = args.lowres if args.lowres is not None else cfg.get("lowres_A")
    highres = args.highres  # default: the model's own resolution (refine.refine_poses), finer than
    # the training band, which is chosen for the deformations rather than for the pose

    res = refine.refine_poses(parts, models, max_angle_deg=args.max_angle, max_shift_A=args.max_shift,
                              lowres_A=lowres, highres_A=highres, levels=args.levels,
                              polish_steps=args.polish_steps, focus=focus, score=args.score, prior=args.prior,
                              batch_size=args.batch_size,
                              min_gain=round_min_gain(args.min_gain, 1) if min_gain is None else min_gain)
    res, drift = refine.keep_input_frame(res, meta.rotation_matrices())
    if drift:
        res.frame_drift_deg = drift
        log.info("refine: the refined poses' object frame had turned by %.3f deg against the input poses' "
                 "(a global rotation the data cannot see); removed", drift)
    gate = None
    if getattr(args, "gate", True) and res.delta_angle_deg.any() | res.delta_shift_A.any():
        from ..analysis.refine_gate import gold_standard_gate
        trial = meta.with_poses(np.stack(matrix_to_euler(res.rotations), axis=1), np.asarray(res.origins_A))
        gate = gold_standard_gate(meta, trial, device=str(device), ctf_mode=ctf_mode)
        if gate.accepted:
            res.gate_fsc_input, res.gate_fsc_refined = gate.fsc_input, gate.fsc_refined
            res.gate_t, res.gate_t_min = gate.t, gate.t_min
        else:
            res = refine.unchanged_result(res, meta.rotation_matrices(), meta.origins_A(), gate)
    limits = (angular_precision(args.max_angle, args.levels), SHIFT_PRECISION_PX * parts.apix)
    if getattr(args, "gate", True) and round_number == 1 and below_precision(res, *limits):
        log.info("refine: median change %.3f deg and %.3f A, below the search's precision (%.3f deg, %.3f A): no "
                 "correction it can resolve for the typical particle; every particle keeps its input pose",
                 np.median(res.delta_angle_deg), np.median(res.delta_shift_A), *limits)
        res = refine.unchanged_result(res, meta.rotation_matrices(), meta.origins_A(), gate)
        res.gate_kept_input, res.below_precision = False, True
    euler = np.stack(matrix_to_euler(res.rotations), axis=1)
    origins = np.array(res.origins_A, dtype=np.float64)
    same = (res.delta_angle_deg == 0) & (res.delta_shift_A == 0)  # unchanged: keep the exact input values
    euler[same], origins[same] = meta.euler_deg()[same], meta.origins_A()[same]
    out_meta = meta.with_poses(euler, origins)
    folder = RefineFolder(out_dir)
    metadata.write_particles(folder.particles, out_meta)
    table = pd.DataFrame({"row": np.arange(n)})
    if "rlnGmmhetParticleId" in meta.particles.columns:
        table["particle_id"] = meta.particles["rlnGmmhetParticleId"].to_numpy()
    table["delta_angle_deg"] = res.delta_angle_deg
    table["delta_shift_A"] = res.delta_shift_A
    table["score_before"] = res.score_before
    table["score_after"] = res.score_after
    table["rot"], table["tilt"], table["psi"] = euler[:, 0], euler[:, 1], euler[:, 2]
    table["origin_x_A"], table["origin_y_A"] = origins[:, 0], origins[:, 1]
    folder.write_pose_changes(table)
    s = summary(res.delta_angle_deg, res.delta_shift_A, res.score_before, res.score_after)
    log.info("refine: pose changes: angle median %.3f deg, 90th percentile %.3f deg; shift median %.3f A, "
             "90th percentile %.3f A; %d of %d particles moved; mean score %.4f -> %.4f",
             s["angle_median_deg"], s["angle_p90_deg"], s["shift_median_A"], s["shift_p90_A"], s["n_moved"], n,
             s["score_before_mean"], s["score_after_mean"])
    log.info("refine: wrote %s and %s", folder.particles, folder.pose_changes)
    return meta, out_meta, res


def warped_reference(decoded, fine, args, cfg: dict):
    """The later rounds' reference (``--reference``): ``layered``, the particle's decoded model below
    the training band's top and the deformed fine reference above it
    (:class:`fine_reference.WarpedModels` with ``crossover_A``); ``fine``, the deformed fine
    reference at every resolution."""
    from ..analysis.fine_reference import WarpedModels
    return WarpedModels(decoded, fine, crossover_A=layer_crossover_A(args, cfg))


def particle_latents(tm, star: str, n: int, n_ops: int, latents_path, encode: bool, device,
                     meta=None) -> np.ndarray:
    """Latent vectors ``(n, K)`` of the ``n`` particles of ``star`` (``meta``: its metadata, read
    when not given): ``latents_path`` (.npy, row i = particle row i); else the training latents
    when every particle of ``star`` is a training particle, matched by particle identity
    (:func:`io.pairing.latent_rows_for`; identity-operator rows with symmetry); otherwise (or
    with ``encode``) encoded."""
    sym = tm.config.get("symmetry")
    latents = None
    if latents_path:
        try:
            latents = np.load(latents_path)
        except (OSError, ValueError) as exc:
            raise InputError(f"--latents {latents_path}: not a readable .npy file ({exc}); give an n x K array") from None
        if latents.ndim != 2 or latents.shape != (n, tm.zdim):
            raise InputError(f"--latents {latents_path}: shape {latents.shape}, expected ({n}, {tm.zdim}) "
                             "(one row per particle of --particles, the model's latent dimension)")
    elif not encode:
        from ..io import metadata
        from ..io.pairing import latent_rows_for
        z = tm.latents()
        rows = latent_rows_for(meta if meta is not None else metadata.read_particles(star), tm.train_dir, n_ops,
                               n_latent_rows=z.shape[0])
        if rows is not None:
            latents = z[rows * n_ops]  # the particle's training row, identity operator
            if n_ops > 1:
                log.warning("refine: the model was trained with symmetry %s; each particle is refined against the "
                            "GMM decoded at its identity-operator latent", sym)
        else:
            log.info("refine: %s has %d particles, not all among the training's %d; encoding the particles",
                     star, n, z.shape[0] // max(1, n_ops))
    if latents is None:
        latents = tm.encode_particles(star, device=str(device))[::n_ops]
    return latents


def _retrain(tm, star: str, args, device, out_dir: str, resume: bool = False, neutral=None):
    """Train a new network with the settings of ``tm``'s run (its neutral GMM, band, mask,
    seed; ``--retrain-epochs`` epochs, default the run's) on the refined particles ``star``.
    ``neutral``: another GMM to train (the finer GMM of ``--reference network``), with the band
    chosen again for it (the training's automatic band: up to the GMM's build resolution, no
    further than the particles' signal reaches). ``resume``: a finished retraining (model.pt) is
    loaded, an interrupted one goes on from its last checkpoint."""
    from ..io.data import Particles
    from ..io.outputs import TrainFolder
    from ..training.config import TrainConfig
    from ..training.train import train
    from ..training.trained import load_trained
    if resume and TrainFolder(out_dir).is_finished():
        log.info("refine: retraining in %s finished before the interruption; loading it", out_dir)
        return load_trained(out_dir, device)

    cfg = TrainConfig.from_dict(tm.config)
    cfg.center = "off"  # the refined shifts are the ones to train with (centring is for input poses)
    if neutral is not None:
        log.info("refine: the band of the retraining is chosen again for the finer GMM (the run's: %s A)",
                 cfg.highres_A)
        cfg.highres_A = None
    if args.retrain_epochs is not None:
        cfg.epochs = int(args.retrain_epochs)
    log.info("refine: retraining on the refined poses (%d epochs%s) into %s", cfg.epochs,
             "" if neutral is None else f", {len(neutral)} Gaussians of the finer GMM", out_dir)
    particles = Particles.from_star(star, symmetry=cfg.symmetry, ctf_mode=cfg.ctf_mode, device=device)
    train(particles, tm.neutral if neutral is None else neutral, cfg, out_dir, resume=resume, star_path=star)
    return load_trained(out_dir, device)


#: Settings that must not change for --resume to keep earlier rounds (the rest: device, batch size).
_RESUME_KEYS = ("train", "particles", "latents", "encode", "mask", "core", "reference", "max_angle", "max_shift",
                "lowres", "highres", "levels", "polish_steps", "score", "prior", "min_gain", "ctf_mode", "rounds",
                "max_rounds", "retrain_epochs", "gate")


def _resumable(args) -> bool:
    """Record the settings in OUT/refine_settings.json; True when ``--resume`` finds the same
    settings recorded by the interrupted run (else it starts from the first round and says so)."""
    import json

    from ..io.atomic import write_text
    path = RefineFolder(args.out).settings
    now = {k: getattr(args, k, None) for k in _RESUME_KEYS}
    now["reference"] = reference_mode(args)  # "auto" meant the layered reference before 0.2.0's finer network
    now = json.loads(json.dumps(now, default=str))
    same = False
    if args.resume:
        try:
            with open(path) as f:
                same = json.load(f) == now
        except (OSError, ValueError):
            same = False
        if not same:
            log.warning("refine --resume: %s holds no interrupted run with these settings; starting from the "
                        "first round", args.out)
    write_text(path, json.dumps(now, indent=1))
    return same


def _save_round(res, round_dir: str) -> None:
    """The round's exact result (written last: its presence marks a finished round)."""
    from dataclasses import asdict
    atomic_write(RefineFolder(round_dir).round_result, lambda tmp: np.savez(tmp, **asdict(res)), suffix=".tmp.npz")


def _load_round(star: str, round_dir: str):
    """(input metadata, output metadata, RefineResult) of a finished round, or None."""
    from ..analysis.refine import RefineResult
    from ..io import metadata
    folder = RefineFolder(round_dir)
    path = folder.round_result
    if not (os.path.exists(path) and os.path.exists(folder.particles)):
        return None
    with open(path, "rb") as f:
        with np.load(f, allow_pickle=False) as z:
            res = RefineResult(**{k: z[k] for k in z.files})
    return (metadata.read_particles(star), metadata.read_particles(folder.particles),
            res)


def _write_overall(meta0, out_meta, score_before, score_after, out_dir: str) -> None:
    """``OUT/particles.star`` (the last round's poses) and ``OUT/pose_changes.csv`` with the
    changes from the INPUT poses over all rounds (score before: the first round's model at the
    input pose; after: the last round's model at the final pose)."""
    import pandas as pd

    from ..io import metadata
    from ..conventions import angular_distance_deg
    folder = RefineFolder(out_dir)
    metadata.write_particles(folder.particles, out_meta)
    ang = angular_distance_deg(out_meta.rotation_matrices(), meta0.rotation_matrices())
    sh = np.linalg.norm(out_meta.origins_A() - meta0.origins_A(), axis=1)
    table = pd.DataFrame({"row": np.arange(len(meta0))})
    if "rlnGmmhetParticleId" in meta0.particles.columns:
        table["particle_id"] = meta0.particles["rlnGmmhetParticleId"].to_numpy()
    table["delta_angle_deg"], table["delta_shift_A"] = ang, sh
    table["score_before"], table["score_after"] = score_before, score_after
    euler = out_meta.euler_deg()
    table["rot"], table["tilt"], table["psi"] = euler[:, 0], euler[:, 1], euler[:, 2]
    table["origin_x_A"], table["origin_y_A"] = out_meta.origins_A()[:, 0], out_meta.origins_A()[:, 1]
    folder.write_pose_changes(table)
