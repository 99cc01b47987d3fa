"""Benchmark of per-particle orientation refinement (``gmmhet refine``) against the truth.

Simulates a conformational dataset, perturbs its poses (rotations ``--perturb-deg`` RMS,
shifts ``--perturb-px`` RMS), trains the heterogeneity network on the perturbed particles
(neutral GMM: the simulator's middle-state GMM; ``--model truth`` skips training and uses
each particle's ground-truth GMM instead), refines the poses, and reports against the truth
(:func:`conventions.angular_distance_deg`, origin distances):

- median / 90th-percentile angular and shift errors before and after refinement;
- FSC between the reconstruction (``reconstruct.reconstruct_particles``) and the ground-truth
  consensus map (``consensus.mrc``) before and after: mean FSC over shells up to Nyquist and
  the resolution where it drops below 0.5;
- "no harm": the same refinement started from the TRUE poses: median change and FSC.

Run: ``python benchmarks/bench_refine.py [--n 3000 --box 64 --snr 0.1 --epochs 20 --device cuda]``.
Writes ``benchmarks/results/refine.md`` (the table and the settings).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# ``--speed-worker ROOT``: time the refinement of the engine checked out at ROOT (the speed
# comparison runs the old and the new engine in subprocesses of one run, alternately)
if "--speed-worker" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--speed-worker") + 1])
else:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scipion_gmmhet.engine.io import metadata  # noqa: E402
try:
    from scipion_gmmhet.engine.io.outputs import RefineFolder, TrainFolder  # noqa: E402
except ImportError:  # an older engine in the speed worker (--speed-baseline) does not need them
    RefineFolder = TrainFolder = None
from scipion_gmmhet.engine.analysis import refine  # noqa: E402
from scipion_gmmhet.engine.training.config import TrainConfig  # noqa: E402
from scipion_gmmhet.engine.simulation import simulate  # noqa: E402
from scipion_gmmhet.engine.simulation.atomic import SYSTEMS as ATOMIC_SYSTEMS  # noqa: E402
from scipion_gmmhet.engine.conventions import angular_distance_deg, euler_to_matrix, matrix_to_euler  # noqa: E402
from scipion_gmmhet.engine.io.data import ParticleImages  # noqa: E402
try:
    from scipion_gmmhet.engine.io.data import Particles  # noqa: E402
except ImportError:  # an engine from before the training split (--speed-baseline)
    from scipion_gmmhet.engine.training.features import Particles  # noqa: E402
from scipion_gmmhet.engine.model.fourier import fsc_table, resolution_at_threshold  # noqa: E402
from scipion_gmmhet.engine.io.mrc import read_map  # noqa: E402


def perturb(rot: np.ndarray, org: np.ndarray, apix: float, deg_rms: float, px_rms: float, seed: int):
    """``R(v) @ A`` with ``v`` isotropic Gaussian of RMS norm ``deg_rms``; origins + Gaussian of RMS
    norm ``px_rms`` pixels."""
    rng = np.random.default_rng(seed)
    n = len(rot)
    v = rng.normal(size=(n, 3)) * deg_rms / math.sqrt(3.0)
    R = refine.rotvec_to_matrix(torch.as_tensor(v)).numpy()
    return R @ rot, org + rng.normal(size=(n, 2)) * px_rms * apix / math.sqrt(2.0)


def write_arm_mask(mol, path: str, invert: bool = False) -> str:
    """A binary mask (box^3, the map's pixel size) of the voxels within 1.5 px of the arm's
    Gaussian centres, as a user would draw around the moving domain (``invert``: everything
    else, i.e. the rigid core)."""
    from scipion_gmmhet.engine.io.mrc import write_map
    box, apix = mol.box, mol.apix
    arm = mol.centers_A[mol.arm_slice()] / apix + box // 2  # voxel coordinates (x, y, z)
    g = np.arange(box)
    vol = np.zeros((box, box, box), np.float32)
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    for x, y, z in arm:
        vol[(xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2 <= 1.5 ** 2] = 1.0
    write_map(path, 1.0 - vol if invert else vol, apix)
    return path


def pose_errors(rot, org, rot_true, org_true, apix):
    ang = angular_distance_deg(rot, rot_true)
    sh = np.linalg.norm(org - org_true, axis=1) / apix
    return {"ang_med": float(np.median(ang)), "ang_p90": float(np.percentile(ang, 90)),
            "sh_med_px": float(np.median(sh)), "sh_p90_px": float(np.percentile(sh, 90))}


def fsc_vs_truth(meta, truth_map, device) -> dict:
    from scipion_gmmhet.engine.analysis.reconstruct import reconstruct_particles
    rec = reconstruct_particles(meta, device=device, progress=False)
    t = fsc_table(rec.volume, truth_map, meta.apix)
    nyq = len(t["fsc"])
    return {"fsc_mean": float(np.mean(t["fsc"][1:nyq])), "res05_A": resolution_at_threshold(t["freq_invA"], t["fsc"], 0.5),
            "curve": t["fsc"]}


def evaluate(m_in, m_out, rot_true, org_true, truth_map, device, seconds, d_ang, d_shift_A, apix) -> dict:
    """Pose errors before/after, FSC with the truth before/after, changes."""
    before = pose_errors(m_in.rotation_matrices(), m_in.origins_A(), rot_true, org_true, apix)
    after = pose_errors(m_out.rotation_matrices(), m_out.origins_A(), rot_true, org_true, apix)
    return dict(before=before, after=after, fsc_before=fsc_vs_truth(m_in, truth_map, device),
                fsc_after=fsc_vs_truth(m_out, truth_map, device), seconds=seconds,
                change_med=float(np.median(d_ang)), change_shift_med_px=float(np.median(d_shift_A) / apix),
                unchanged_pct=float(100 * np.mean((np.abs(d_ang) < 0.01) & (np.abs(d_shift_A) < 0.01))))


def summary_line(r: dict) -> str:
    return ("angle %.2f -> %.2f deg, shift %.3f -> %.3f px, FSC mean %.4f -> %.4f, FSC0.5 %.2f -> %.2f A, "
            "median change %.2f deg %.3f px, %.0f s" % (
                r["before"]["ang_med"], r["after"]["ang_med"], r["before"]["sh_med_px"], r["after"]["sh_med_px"],
                r["fsc_before"]["fsc_mean"], r["fsc_after"]["fsc_mean"], r["fsc_before"]["res05_A"],
                r["fsc_after"]["res05_A"], r["change_med"], r["change_shift_med_px"], r["seconds"]))


#: the atomic-structure systems of ``gmmhet simulate`` (tests/data/1ake.pdb) and how they move
ATOMIC = ATOMIC_SYSTEMS
ATOMIC_NAMES = {"hinge": "hinge (LID and NMP opening together)",
                "two_motions": "two-motion (LID and NMP opening independently)",
                "cyclic": "cyclic (LID turning a full circle)",
                "trajectory": "molecular-dynamics trajectory (each particle one frame of --pdb's MODELs)"}


def hinge_neutral_gmm(sim_dir: str, resolution_A: float, device) -> str:
    """The neutral GMM of the hinge data: ``build_gmm`` (``gmmhet build``) of its consensus map."""
    from scipion_gmmhet.engine.model.build import build_gmm
    path = os.path.join(sim_dir, f"gmm_{resolution_A:g}A.npz")
    if not os.path.exists(path):
        vol, apix = read_map(os.path.join(sim_dir, "consensus.mrc"))
        build_gmm(vol, apix, resolution_A, device=device, seed=0).gmm.save(path)
    return path


def neutral_truth_gmm(sim_dir: str) -> str:
    """The simulator's neutral GMM: ``truth_gmm/neutral.npz`` (the arm at c = 0.5), else (older
    simulations) the middle ``conf_*`` state."""
    path = os.path.join(sim_dir, "truth_gmm", "neutral.npz")
    if os.path.exists(path):
        return path
    states = sorted(f for f in os.listdir(os.path.join(sim_dir, "truth_gmm")) if f.startswith("conf_"))
    return os.path.join(sim_dir, "truth_gmm", states[len(states) // 2])


def trained_rows(args, sim_dir, star_p, meta, meta_p, mol, rot_true, org_true, truth_map, device, apix):
    """The user's recipe through the ``gmmhet`` command: train (``--train-mask arm``: only the
    arm's Gaussians may move), then ``gmmhet refine --rounds R`` (``--refine-mask core``: the
    core's pose, the arm's decoded projection subtracted), on the perturbed particles; and the
    same recipe on the unperturbed particles (its own training) for the no-harm check."""
    from scipion_gmmhet.engine import cli
    if args.kind in ATOMIC or args.neutral == "build":  # built from the consensus, as a user would
        neutral = hinge_neutral_gmm(sim_dir, args.resolution, device)
        neutral_note = f"gmmhet build of consensus.mrc at {args.resolution:g} A"
    else:
        neutral = neutral_truth_gmm(sim_dir)
        neutral_note = "simulator truth_gmm/" + os.path.basename(neutral)
    train_extra = ["--zdim", "4", "--epochs", str(args.epochs), "--changes", args.changes, "--device", device,
                   "--finer-model", args.finer_model]
    if args.train_mask == "arm":
        train_extra += ["--mask", write_arm_mask(mol, os.path.join(args.work, "arm_mask.mrc"))]
    refine_extra = ["--max-angle", str(args.max_angle), "--max-shift", str(args.max_shift_px * apix),
                    "--score", args.score, "--levels", str(args.levels), "--polish-steps", str(args.polish_steps),
                    "--rounds", str(args.rounds), "--device", device]
    if args.min_gain is not None:
        refine_extra += ["--min-gain", str(args.min_gain)]
    if args.highres:
        refine_extra += ["--highres", str(args.highres)]
    if not args.prior:
        refine_extra.append("--no-prior")
    if not args.gate:
        refine_extra.append("--no-gate")
    if args.refine_core != "none":
        refine_extra += ["--core", args.refine_core]
    refine_extra += ["--reference", args.reference]
    if args.refine_mask == "core":
        refine_extra += ["--mask", write_arm_mask(mol, os.path.join(args.work, "core_mask.mrc"), invert=True)]
    tag = f"{args.n}_{args.box}_{args.epochs}_{args.train_mask}_{args.changes.replace(',', '-')}"
    if args.kind not in ATOMIC and args.neutral == "build":
        tag += f"_built{args.resolution:g}A"
    if args.finer_model != "off":
        tag += f"_finer{args.finer_model}"
    starts = [("perturbed", star_p, meta_p)]
    if not args.skip_true:
        star_t = os.path.join(args.work, "true.star")
        metadata.write_particles(star_t, meta)
        starts.append(("true poses", star_t, meta))
    rows = {}
    for label, star, m in starts:
        key = "pert" if label == "perturbed" else "true"
        train_dir = os.path.join(args.work, f"train_{key}_{tag}")
        if not TrainFolder(train_dir).is_finished():
            if cli.main(["train", "--particles", star, "--gmm", neutral, "--out", train_dir] + train_extra):
                raise SystemExit("training failed")
        gain = f"{args.min_gain:g}" if args.min_gain is not None else "auto"
        out = os.path.join(args.work, f"refine_{key}_{tag}_{args.refine_mask}{'_core' if args.refine_core != 'none' else ''}"
                                      f"_r{args.rounds}_g{gain}"
                                      f"{'' if args.gate else '_nogate'}{'' if args.reference in ('auto', 'network') else '_' + args.reference}")
        t0 = time.time()
        if args.reuse and os.path.exists(RefineFolder(out).pose_changes):   # a finished refinement
            dt = float("nan")
        elif cli.main(["refine", "--train", train_dir, "--particles", star, "--out", out] + refine_extra):
            raise SystemExit("refine failed")
        else:
            dt = time.time() - t0
        m_out = metadata.read_particles(RefineFolder(out).particles)
        ch = pd.read_csv(RefineFolder(out).pose_changes)
        rows[label] = evaluate(m, m_out, rot_true, org_true, truth_map, device, dt, ch["delta_angle_deg"].to_numpy(),
                               ch["delta_shift_A"].to_numpy(), apix)
        folder = RefineFolder(out)
        if os.path.exists(folder.rounds):  # the angular error after each round
            n_done = len(pd.read_csv(folder.rounds))
            rows[label]["rounds"] = []
            for r in range(1, n_done + 1):
                r_star = folder.round(r).particles
                m_r = metadata.read_particles(r_star if os.path.exists(r_star) else folder.particles)
                rows[label]["rounds"].append(pose_errors(m_r.rotation_matrices(), m_r.origins_A(), rot_true, org_true,
                                                         apix)["ang_med"])
        print("trained", label, summary_line(rows[label]), rows[label].get("rounds"), flush=True)
    note = (f"trained network (`gmmhet train`, {args.epochs} epochs, changes {args.changes}, neutral GMM = "
            f"{neutral_note}, training focus mask: {'the arm' if args.train_mask == 'arm' else 'none'}, "
            f"--finer-model {args.finer_model}) "
            f"then `gmmhet refine --rounds {args.rounds}` (refine, retrain on the refined poses, refine...; focus mask: "
            f"{'the core (the arm subtracted)' if args.refine_mask == 'core' else 'none'}"
            f"{', --core auto' if args.refine_core != 'none' else ''}, --reference {args.reference}); the no-harm row trains its "
            "own network on the unperturbed particles")
    return rows, note


def speed_worker(argv) -> int:
    """Subprocess: refine ``--speed-n`` perturbed particles of ``--sim`` against their ground-truth
    GMMs with the engine on ``sys.path`` (its defaults), on ``--threads`` CPU threads; prints one
    JSON line: wall and CPU particles/s, median angle/shift errors after."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed-worker")
    ap.add_argument("--sim")
    ap.add_argument("--speed-n", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--n-gaussians", type=int)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    truth = pd.read_csv(os.path.join(a.sim, "truth.csv"))
    info = json.load(open(os.path.join(a.sim, "simulation.json")))
    meta = metadata.read_particles(os.path.join(a.sim, "particles.star"))
    n = min(a.speed_n, len(meta))
    meta = meta.subset(np.arange(n))
    truth = truth.iloc[:n]
    apix, box = meta.apix, meta.box
    rot_true = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
    org_true = truth[["origin_x_A", "origin_y_A"]].to_numpy()
    rot_p, org_p = perturb(rot_true, org_true, apix, 3.0, 1.0, a.seed + 100)
    mol = simulate.build_molecule(box, apix, int(info.get("molecule_seed", 0)), a.n_gaussians)
    models = mol.conformation_models(truth["conformation"].to_numpy())
    parts = Particles(ParticleImages(meta), rot_p, org_p, box, apix, ctf=meta.ctf_params(), ctf_mode="ctf",
                      device="cpu")
    t0, c0 = time.time(), time.process_time()
    res = refine.refine_poses(parts, models)
    wall, cpu = time.time() - t0, time.process_time() - c0
    print(json.dumps({"n": n, "wall_pps": n / wall, "cpu_pps": n / cpu,
                      "ang_med": float(np.median(angular_distance_deg(res.rotations, rot_true))),
                      "sh_med_px": float(np.median(np.linalg.norm(res.origins_A - org_true, axis=1) / apix))}))
    return 0


def speed_rows(args, sim_dir) -> list[str]:
    """The old engine (``--speed-baseline``, extracted with ``git archive``) and this one, each in
    a subprocess, alternately ``--speed-repeats`` times; best particles/s of each."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(args.work, f"engine_{args.speed_baseline}")
    if not os.path.exists(os.path.join(base, "scipion_gmmhet")):
        os.makedirs(base, exist_ok=True)
        arch = subprocess.run(["git", "-C", root, "archive", args.speed_baseline, "scipion_gmmhet"],
                              check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", base], input=arch, check=True)
    runs = {"baseline": [], "this": []}
    for _ in range(args.speed_repeats):
        for label, eng in (("baseline", base), ("this", root)):
            cmd = [sys.executable, os.path.abspath(__file__), "--speed-worker", eng, "--sim", sim_dir,
                   "--speed-n", str(args.speed_n), "--threads", str(args.speed_threads),
                   "--n-gaussians", str(args.n_gaussians), "--seed", str(args.seed)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": eng}).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
            print("speed", label, runs[label][-1], flush=True)
    best = {k: max(v, key=lambda r: r["cpu_pps"]) for k, v in runs.items()}
    b, t = best["baseline"], best["this"]
    return [f"## Speed (CPU, {args.speed_threads} thread(s), box {args.box}, {b['n']} perturbed particles, ground-truth GMMs, "
            f"each engine's defaults; best of {args.speed_repeats} alternating runs)", "",
            "| engine | particles/s (CPU time) | particles/s (wall) | median angle error after (deg) | median shift error after (px) |",
            "|---|---|---|---|---|",
            f"| before (`{args.speed_baseline}`) | {b['cpu_pps']:.1f} | {b['wall_pps']:.1f} | {b['ang_med']:.3f} | {b['sh_med_px']:.3f} |",
            f"| this checkout | {t['cpu_pps']:.1f} | {t['wall_pps']:.1f} | {t['ang_med']:.3f} | {t['sh_med_px']:.3f} |",
            "", f"Speed-up per particle: {t['cpu_pps'] / b['cpu_pps']:.1f}x (CPU time), "
            f"{t['wall_pps'] / b['wall_pps']:.1f}x (wall).", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="conformational", choices=("conformational",) + ATOMIC,
                    help="conformational: the simulator's pseudo-atomic molecule; hinge: adenylate kinase (--pdb) "
                         "with LID and NMP opening together (gmmhet simulate --kind hinge); two_motions: LID and "
                         "NMP opening independently; cyclic: LID turning a full circle; trajectory: the frames of a "
                         "molecular-dynamics trajectory (--pdb: a multi-model PDB, benchmarks/md_frames.py); the atomic systems' "
                         "neutral GMM is built from their consensus at --resolution (needs --model trained "
                         "--train-mask none --refine-mask none)"),
    ap.add_argument("--pdb", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "data", "1ake.pdb"))
    ap.add_argument("--resolution", type=float, default=8.0,
                    help="hinge and --neutral build: gmmhet build resolution, A (default 8)")
    ap.add_argument("--neutral", choices=["truth", "build"], default="truth",
                    help="conformational: the neutral GMM of the trained network: the simulator's truth_gmm/neutral.npz "
                         "(default) or gmmhet build of the consensus at --resolution, as a user would (the hinge "
                         "always builds)")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=3.0)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--n-gaussians", type=int, default=1600)
    ap.add_argument("--perturb-deg", type=float, default=3.0)
    ap.add_argument("--perturb-px", type=float, default=1.0)
    ap.add_argument("--max-angle", type=float, default=6.0)
    ap.add_argument("--max-shift-px", type=float, default=2.0)
    ap.add_argument("--highres", type=float, default=None)
    ap.add_argument("--score", default="wcc", choices=refine.SCORES)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--polish-steps", type=int, default=0)
    ap.add_argument("--no-prior", dest="prior", action="store_false")
    ap.add_argument("--min-gain", type=float, default=None,
                    help="evidence (nats) a new pose needs (gmmhet refine --min-gain; default the command's: "
                         "5.5 in the first round, 0 after it; --model truth: 5.5)")
    ap.add_argument("--no-gate", dest="gate", action="store_false",
                    help="gmmhet refine --no-gate (keep the refined poses without the gold-standard check)")
    ap.add_argument("--skip-true", action="store_true", help="skip the no-harm run from the true poses")
    ap.add_argument("--reuse", action="store_true",
                    help="--model trained: reuse finished refinements in --work (their time is then not measured)")
    ap.add_argument("--model", default="truth,trained",
                    help="comma-separated: truth (each particle's ground-truth GMM), trained (the network)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--finer-model", choices=["off", "auto"], default="off",
                    help="gmmhet train --finer-model for the trained network (default off, as the README's refinement rows were measured; gmmhet train's own default is auto: results/refine_finer_md_s*.md)")
    ap.add_argument("--changes", default=",".join(TrainConfig().changes),
                    help="what the network may change (gmmhet train --changes; default: gmmhet train's, "
                         "positions,amplitudes; results before 2026-12-06's refine_changes.md used positions)")
    ap.add_argument("--refine-core", choices=["none", "auto"], default="none",
                    help="gmmhet refine --core (without --refine-mask core): auto scores the automatic rigid core")
    ap.add_argument("--reference", choices=["auto", "network", "layered", "fine", "decoded"], default="auto",
                    help="gmmhet refine --reference (auto = network: from the second round on, the network "
                         "retrained on a finer GMM of the reconstruction and its decoded models; layered: the "
                         "decoded models up to the training band's top and the finer GMM deformed by the decoded "
                         "motion beyond it; fine: that deformed GMM at every resolution; decoded: the decoded "
                         "models of the neutral GMM's network)")
    ap.add_argument("--refine-mask", default="core", choices=("core", "none"),
                    help="core: refine the core's pose with the arm's decoded projection subtracted; none: whole model")
    ap.add_argument("--rounds", default="3", help="gmmhet refine --rounds (refine-retrain iterations; auto: the "
                                                  "command's default)")
    ap.add_argument("--train-mask", default="arm", choices=("arm", "none"),
                    help="arm: train with a focus mask on the moving arm (the core stays the neutral model's, "
                         "so the network cannot explain pose errors as motions of the whole particle); "
                         "none: every Gaussian may move")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".scratch", "refine"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "refine.md"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--thermal", type=float, default=0.0, metavar="A",
                    help="atomic kinds: RMS thermal fluctuation of every atom per particle, Angstrom (like a "
                         "molecular-dynamics ensemble; default 0: rigid domains)")
    ap.add_argument("--frame", choices=["core", "all"], default="core",
                    help="atomic kinds: frame of the true poses (gmmhet simulate --frame): core (default) or all "
                         "(each conformation superposed on the middle one by all atoms, as MD frames usually are)")
    ap.add_argument("--truth-widened", action="store_true",
                    help="--model truth on a --thermal set: the mean structure with every atom widened by the "
                         "disorder (sigma^2 + thermal^2 / 3, as the consensus map renders it): the best mean model "
                         "the particles' own average can give")
    ap.add_argument("--truth-thermal", action="store_true",
                    help="--model truth on a --thermal set: each particle's own fluctuated atoms (an oracle); "
                         "default: the mean structure at its truth coordinates (what a conformational model can be)")
    ap.add_argument("--speed-baseline", default="",
                    help="git revision of the engine to compare speed with (e.g. cfef752, before the batched "
                         "search); empty: no speed section")
    ap.add_argument("--speed-n", type=int, default=128, help="particles in the speed comparison")
    ap.add_argument("--speed-threads", type=int, default=1, help="CPU threads in the speed comparison")
    ap.add_argument("--speed-repeats", type=int, default=2, help="alternating runs of each engine")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    os.makedirs(args.work, exist_ok=True)
    times = {}

    # 1. data
    t0 = time.time()
    if args.kind in ATOMIC and "trained" in args.model and (args.train_mask != "none" or args.refine_mask != "none"):
        raise SystemExit(f"--kind {args.kind}: give --train-mask none --refine-mask none (no arm mask for the atomic "
                         "structure)")
    if args.kind in ATOMIC:
        from scipion_gmmhet.engine.simulation.atomic import simulate_atomic
        thermal = f"_thermal{args.thermal:g}" if args.thermal else ""
        thermal += "_frameall" if args.frame == "all" else ""
        thermal += "_" + os.path.splitext(os.path.basename(args.pdb))[0] if args.kind == "trajectory" else ""
        sim_dir = os.path.join(args.work, f"{args.kind}_{args.box}_{args.apix:g}_{args.n}_{args.snr:g}_s{args.seed}{thermal}")
        if not os.path.exists(os.path.join(sim_dir, "truth.csv")):
            simulate_atomic(sim_dir, args.kind, args.pdb, n=args.n, box=args.box, apix=args.apix, snr=args.snr,
                            seed=args.seed, thermal_A=args.thermal, frame=args.frame)
    else:
        sim_dir = os.path.join(args.work, f"sim_{args.box}_{args.n}_{args.snr:g}_{args.n_gaussians}")
        if not os.path.exists(os.path.join(sim_dir, "truth.csv")):
            simulate.simulate(sim_dir, "conformational", n=args.n, box=args.box, apix=args.apix, snr=args.snr,
                              seed=args.seed, n_gaussians=args.n_gaussians)
    times["simulate_s"] = time.time() - t0
    info = json.load(open(os.path.join(sim_dir, "simulation.json")))
    truth = pd.read_csv(os.path.join(sim_dir, "truth.csv"))
    meta = metadata.read_particles(os.path.join(sim_dir, "particles.star"))
    apix, box = meta.apix, meta.box
    rot_true = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
    org_true = truth[["origin_x_A", "origin_y_A"]].to_numpy()
    rot_p, org_p = perturb(rot_true, org_true, apix, args.perturb_deg, args.perturb_px, args.seed + 100)
    meta_p = meta.with_poses(np.stack(matrix_to_euler(rot_p), 1), org_p)
    star_p = os.path.join(args.work, "perturbed.star")
    metadata.write_particles(star_p, meta_p)
    rot_p = meta_p.rotation_matrices()  # as written (Euler round trip)
    mol = (simulate.build_molecule(box, apix, int(info.get("molecule_seed", 0)), args.n_gaussians)
           if args.kind == "conformational" else None)
    if args.kind in ATOMIC:  # each particle's atoms at its truth coordinates (and thermal displacement)
        from scipion_gmmhet.engine.simulation.atomic import (ATOM_SIGMA_A, AtomicParticleModels, build_system,
                                                              widened_sigma_A)
        truth_models = AtomicParticleModels(build_system(args.kind, args.pdb, info.get("frame", "core")),
                                            truth[list(info["truth_coordinates"])].to_numpy(),
                                            truth["particle"].to_numpy(),
                                            float(info.get("thermal_A", 0.0)) if args.truth_thermal else 0.0,
                                            int(info["seed"]),
                                            widened_sigma_A(float(info.get("thermal_A", 0.0)))
                                            if args.truth_widened else ATOM_SIGMA_A)
    else:
        truth_models = mol.conformation_models(truth["conformation"].to_numpy())

    # 2. the particle-specific models, and the refinements
    truth_map, _ = read_map(os.path.join(sim_dir, "consensus.mrc"))
    kw = dict(max_angle_deg=args.max_angle, max_shift_A=args.max_shift_px * apix, highres_A=args.highres,
              score=args.score, levels=args.levels, polish_steps=args.polish_steps, prior=args.prior,
              min_gain=refine.MIN_GAIN_NATS if args.min_gain is None else args.min_gain)
    sections = []
    speed_lines = speed_rows(args, sim_dir) if args.speed_baseline else []
    for model_kind in [m.strip() for m in args.model.split(",") if m.strip() and m.strip() != "none"]:
        t0 = time.time()
        if model_kind == "truth":
            models = truth_models
            rows = {}
            starts = [("perturbed", meta_p, rot_p, org_p), ("true poses", meta, rot_true, org_true)]
            for label, m, rot0, org0 in starts[:1] if args.skip_true else starts:
                parts = Particles(ParticleImages(m), rot0, org0, box, apix, ctf=m.ctf_params(), ctf_mode="full",
                                  device=device)
                t1 = time.time()
                res = refine.refine_poses(parts, models, **kw)
                m_ref = m.with_poses(np.stack(matrix_to_euler(res.rotations), 1), res.origins_A)
                rows[label] = evaluate(m, m_ref, rot_true, org_true, truth_map, device, time.time() - t1,
                                       res.delta_angle_deg, res.delta_shift_A, apix)
                print(model_kind, label, summary_line(rows[label]), flush=True)
            sections.append((model_kind, "ground-truth GMM of each particle's conformation (no training)", rows))
        elif model_kind == "trained":
            rows, notes = trained_rows(args, sim_dir, star_p, meta, meta_p, mol, rot_true, org_true, truth_map,
                                       device, apix)
            sections.append((model_kind, notes, rows))
        else:
            raise SystemExit(f"--model {model_kind}: unknown")
        times[f"model_{model_kind}_s"] = time.time() - t0

    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else (platform.processor() or "CPU")
    lines = [
        "# Orientation refinement benchmark (`benchmarks/bench_refine.py`)", "",
        f"Data: simulated {'conformational set' if args.kind == 'conformational' else ('' if args.kind == 'trajectory' else 'adenylate kinase ') + ATOMIC_NAMES[args.kind] + ' set (' + common.portable(args.pdb) + ')' + (f', thermal fluctuation {args.thermal:g} A RMS per atom' if args.thermal else '') + (', every conformation superposed on the middle one by all atoms (--frame all)' if args.frame == 'all' else '')}, {args.n} particles, box {box}, {apix:g} A/px, SNR {args.snr:g}, CTF; "
        f"poses perturbed by {args.perturb_deg:g} deg RMS rotations and {args.perturb_px:g} px RMS shifts. "
        f"Search: max angle {args.max_angle:g} deg, max shift {args.max_shift_px:g} px, score {args.score}, "
        f"prior {'on' if args.prior else 'off'}, evidence to move {'5.5 nats in the first round, 0 after it (gmmhet refine default)' if args.min_gain is None else format(args.min_gain, 'g') + ' nats'}. Device: {device} ({dev_name}, {os.cpu_count()} cores). "
        f"Command: `python benchmarks/bench_refine.py {' '.join(sys.argv[1:])}`", ""]
    for model_kind, model_note, rows in sections:
        lines += [f"## Model: {model_note}", "",
                  "| start | median angle error (deg) | p90 angle error | median shift error (px) | p90 shift error "
                  "| FSC vs truth (mean over shells) | FSC=0.5 (A) | refine time (s) | particles/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            b, a = r["before"], r["after"]
            lines.append(f"| {label} | {b['ang_med']:.2f} -> {a['ang_med']:.2f} | {b['ang_p90']:.2f} -> {a['ang_p90']:.2f} "
                         f"| {b['sh_med_px']:.3f} -> {a['sh_med_px']:.3f} | {b['sh_p90_px']:.3f} -> {a['sh_p90_px']:.3f} "
                         f"| {r['fsc_before']['fsc_mean']:.4f} -> {r['fsc_after']['fsc_mean']:.4f} "
                         f"| {r['fsc_before']['res05_A']:.2f} -> {r['fsc_after']['res05_A']:.2f} "
                         f"| {r['seconds']:.1f} | {args.n / r['seconds']:.1f} |")
        p, t = rows["perturbed"], rows.get("true poses")
        red_a = 100 * (1 - p["after"]["ang_med"] / p["before"]["ang_med"])
        red_s = 100 * (1 - p["after"]["sh_med_px"] / p["before"]["sh_med_px"])
        lines += ["", f"Perturbed start: median angular error reduced by {red_a:.0f}% and median shift error by "
                  f"{red_s:.0f}% (negative: increased)."]
        if p.get("rounds"):
            lines.append("Median angular error after each refine-retrain round: "
                         + " -> ".join(f"{v:.2f}" for v in [p["before"]["ang_med"]] + p["rounds"]) + " deg.")
        if t:
            lines.append(f"True-pose start (no harm): median pose change {t['change_med']:.2f} deg and "
                         f"{t['change_shift_med_px']:.3f} px, {t['unchanged_pct']:.1f}% unchanged (< 0.01 deg and 0.01 A); FSC mean {t['fsc_before']['fsc_mean']:.4f} -> "
                         f"{t['fsc_after']['fsc_mean']:.4f}.")
        lines.append("")
    lines += speed_lines
    lines += ["Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    common._atomic_write(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(speed_worker(sys.argv[1:]) if "--speed-worker" in sys.argv else main())
