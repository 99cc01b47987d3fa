"""Where the later rounds' pose error comes from: the second refinement of a finished
``bench_refine.py`` run, repeated from round 1's poses against references in which one part at a
time is replaced by the truth (issue 15's error budget).

Input: a ``bench_refine.py --work`` folder of an atomic kind (``--kind hinge|two_motions|cyclic``)
whose ``gmmhet refine --rounds auto`` has finished round 1 and its retraining
(``refine_pert_*/round_1/{particles.star,train}``). Each variant refines round 1's poses once with
the settings ``gmmhet refine`` uses from round 2 on (``--score wcc``, prior, evidence 0 nats,
6 deg / 2 px, 3 levels) and is scored against the simulation's true poses.

Variants (``--variants``, comma-separated):

- ``layered``: what round 2 does with ``gmmhet refine --reference layered`` (the default when
  the budget was measured): a GMM of the reconstruction at round 1's poses (its gold-standard
  resolution, no finer than 0.6 x the neutral's), deformed per particle by the retrained
  network's decoded motion, below the training band's top the decoded model itself
  (:class:`fine_reference.WarpedModels`, layered). The work folder's round 1 must have been
  retrained on the neutral GMM (``bench_refine.py --reference layered``, ``fine`` or
  ``decoded``), not on the finer GMM (the default ``network``).
- ``fine_true_poses``: the same, the reconstruction at the TRUE poses.
- ``fine_clean_consensus``: the same, a GMM of the noise-free population average (consensus.mrc).
- ``smoothed_latents``: ``layered`` with each particle's latent replaced by the kernel regression
  of the latents on its true coordinate (bandwidth 0.02): no latent noise.
- ``true_motion``: ``layered``'s fine GMM moved by the TRUE motion instead of the decoded one: the
  atoms' displacement sampled at the neutral GMM's Gaussians (weights of
  :func:`motion_corrected.move_weights`, 2 A) and carried to the fine Gaussians exactly as the
  decoded moves are (the low layer: the neutral GMM moved the same way).
- ``middle_decoded``: a GMM of the true middle state's map (``truth_maps``, ``--fine-res`` A)
  instead of the reconstruction, deformed by the decoded motion, layered.
- ``middle_true_motion``: that GMM moved by the true motion, layered.
- ``middle_true_motion_unlayered``: the same, the fine GMM at every resolution.
- ``middle_true_motion_unlayered_fine``: the same with the middle state's GMM at 3.2 A.
- ``truth``: each particle's true mean structure (atoms widened by the thermal disorder).
- ``mean_gauge``: ``layered`` with each decoded model's amplitude-weighted mean translation
  undone instead of its robust (core-weighted) one: the frame of an all-atom superposition.

Run: ``python benchmarks/bench_refine_budget.py --work WORK [--variants ...] [--out FILE]``; one
thread, ~1.5 min per variant at 3,000 particles, box 64.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from scipion_gmmhet.engine.analysis import refine  # noqa: E402
from scipion_gmmhet.engine.analysis.fine_reference import FineReference, WarpedModels, build_fine_reference  # noqa: E402
from scipion_gmmhet.engine.analysis.motion_corrected import move_weights  # noqa: E402
from scipion_gmmhet.engine.commands.refine import particle_latents  # noqa: E402
from scipion_gmmhet.engine.conventions import angular_distance_deg, euler_to_matrix  # noqa: E402
from scipion_gmmhet.engine.io import metadata  # noqa: E402
from scipion_gmmhet.engine.io.data import Particles  # noqa: E402
from scipion_gmmhet.engine.io.mrc import read_map  # noqa: E402
from scipion_gmmhet.engine.io.outputs import RefineFolder, TrainFolder  # noqa: E402
from scipion_gmmhet.engine.model.gmm import GMM  # noqa: E402
from scipion_gmmhet.engine.model.build import build_gmm  # noqa: E402
from scipion_gmmhet.engine.simulation.atomic import AtomicParticleModels, build_system, widened_sigma_A  # noqa: E402
from scipion_gmmhet.engine.training.trained import load_trained  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("layered", "fine_true_poses", "fine_clean_consensus", "smoothed_latents", "true_motion",
            "middle_decoded", "middle_true_motion", "middle_true_motion_unlayered",
            "middle_true_motion_unlayered_fine", "truth", "mean_gauge")
MOTION_SIGMA_A = 2.0     # atoms -> neutral Gaussians: the true displacement at each neutral Gaussian
LATENT_BANDWIDTH = 0.02  # kernel regression of the latents on the true coordinate


class TrueMotionModels:
    """The neutral GMM moved by the true atomic motion, as a decoded model would be
    (:class:`refine.ParticleModels`; ``model`` is the trained network, for its neutral GMM).
    ``gmm``: another GMM to move instead (bench_latent_budget.py); ``reference``: the true
    coordinates at which the GMM's Gaussians sit (default 0.5 each, the middle state)."""

    def __init__(self, tm, system, coords: np.ndarray, gmm=None, reference: np.ndarray | None = None):
        self.model, self.system, self.coords = tm, system, coords
        ref = np.full((1, coords.shape[1]), 0.5) if reference is None else np.asarray(reference).reshape(1, -1)
        self.atoms0 = system.centers(ref)[0].float()
        n = tm.neutral if gmm is None else gmm
        self.centers = torch.as_tensor(np.asarray(n.centers_A)).float()
        self.amplitudes = torch.as_tensor(np.asarray(n.amplitudes)).float()
        self.sigmas = torch.as_tensor(np.asarray(n.sigmas_A)).float()
        self.weights, _ = move_weights(self.centers, self.atoms0, torch.as_tensor(system.electrons).float(),
                                       MOTION_SIGMA_A)
        self.neutral_centers_A = np.asarray(n.centers_A)
        self.median_sigma_A = float(np.median(n.sigmas_A))

    def gaussians(self, rows, device):
        d = self.system.centers(self.coords[np.asarray(rows)]).float() - self.atoms0  # (B, atoms, 3)
        B, n_atoms = d.shape[0], d.shape[1]
        m = torch.sparse.mm(self.weights, d.permute(1, 0, 2).reshape(n_atoms, B * 3))
        m = m.reshape(-1, B, 3).permute(1, 0, 2)
        return ((self.centers + m).to(device), self.amplitudes.expand(B, -1).clone().to(device),
                self.sigmas.expand(B, -1).clone().to(device))


def _image_number(names: pd.Series) -> np.ndarray:
    """The stack position of each image name ``NNNNNN@stack`` (1-based)."""
    return names.astype(str).str.split("@").str[0].astype(int).to_numpy()


def truth_rows(truth: pd.DataFrame, meta) -> pd.DataFrame:
    """The simulation's truth table in the order of ``meta``'s particles, matched by image (not by position)."""
    where = pd.Index(_image_number(truth["image_name"])).get_indexer(_image_number(meta.particles["rlnImageName"]))
    if (where < 0).any():
        raise SystemExit(f"{int((where < 0).sum())} particles of round 1's star are not in the simulation's truth.csv")
    return truth.iloc[where].reset_index(drop=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="a bench_refine.py --work folder (round 1 finished)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--pdb", default=os.path.join(REPO, "tests", "data", "1ake.pdb"))
    ap.add_argument("--fine-res", type=float, default=None,
                    help="resolution (A) of the middle state's GMM (default: that of the layered variant's fine reference)")
    ap.add_argument("--out", default=None, help="markdown file (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants {','.join(bad)}: unknown; choose from {', '.join(VARIANTS)}")

    refine_dirs = sorted(glob.glob(os.path.join(args.work, "refine_pert_*")))
    sims = [d for d in sorted(glob.glob(os.path.join(args.work, "*"))) if os.path.exists(os.path.join(d, "truth.csv"))]
    if not refine_dirs or not sims:
        raise SystemExit(f"--work {args.work}: no refine_pert_* or simulation folder; give a bench_refine.py --work folder")
    r1 = RefineFolder(refine_dirs[0]).round(1)
    if not r1.train.is_finished():
        raise SystemExit(f"--work {args.work}: round 1's retraining ({r1.train.folder}) is not finished")
    sim = sims[0]
    info = json.load(open(os.path.join(sim, "simulation.json")))
    star = r1.particles
    tm = load_trained(r1.train.folder, "cpu")
    first = sorted(glob.glob(os.path.join(args.work, "train_pert_*")))
    if first and len(GMM.load(TrainFolder(first[0]).gmm)) != len(tm.neutral):
        raise SystemExit(f"--work {args.work}: round 1 was retrained on a finer GMM (gmmhet refine --reference "
                         "network, the default); run bench_refine.py with --reference layered for this budget")
    meta = metadata.read_particles(star)
    truth = truth_rows(pd.read_csv(os.path.join(sim, "truth.csv")), meta)
    ctf = tm.config.get("ctf_mode")
    parts = Particles.from_star(star, ctf_mode=ctf, device="cpu")
    latents = particle_latents(tm, star, len(meta), 1, None, False, "cpu", meta=meta)
    decoded = refine.LatentModels(tm, latents)
    rot_true = euler_to_matrix(truth.rot.values, truth.tilt.values, truth.psi.values)
    org_true = truth[["origin_x_A", "origin_y_A"]].to_numpy()
    coords = truth[list(info["truth_coordinates"])].to_numpy()
    system = build_system(info["kind"], args.pdb, info.get("frame", "core"))
    crossover = float(tm.config["highres_A"])

    def errors(rotations, origins_A):
        a = angular_distance_deg(rot_true, np.asarray(rotations))
        s = np.linalg.norm(np.asarray(origins_A) - org_true, axis=1) / meta.apix
        return float(np.median(a)), float(np.percentile(a, 90)), float(np.median(s))

    cache = {}

    def fine(kind: str):
        if kind not in cache:
            if kind == "round1":
                cache[kind] = build_fine_reference(meta, tm.neutral, device="cpu", ctf_mode=ctf, label="round 1's poses")
            elif kind == "true_poses":
                m = meta.with_poses(np.stack([truth.rot.values, truth.tilt.values, truth.psi.values], 1), org_true)
                cache[kind] = build_fine_reference(m, tm.neutral, device="cpu", ctf_mode=ctf, label="the true poses")
            elif kind == "clean":
                vol, _ = read_map(os.path.join(sim, "consensus.mrc"))
                res = fine("round1").resolution_A
                cache[kind] = FineReference(build_gmm(np.asarray(vol, np.float32), meta.apix, res).gmm, res,
                                            "the noise-free consensus")
            elif kind.startswith("middle"):
                res = float(kind[len("middle"):] or (args.fine_res or fine("round1").resolution_A))
                middle = [st for st in info["states"] if all(abs(float(x) - 0.5) < 1e-6 for x in st["coords"])]
                vol, _ = read_map(os.path.join(sim, (middle[0] if middle else info["states"][len(info["states"]) // 2])["map"]))
                cache[kind] = FineReference(build_gmm(np.asarray(vol, np.float32), meta.apix, res).gmm, res,
                                            "the true middle state")
        return cache[kind]

    def layered_true(ref: FineReference, layered: bool = True):
        """``ref`` moved by the true motion through the neutral's Gaussians; layered: the moved neutral below the crossover."""
        motion = TrueMotionModels(tm, system, coords)
        return WarpedModels(motion, ref, crossover_A=crossover if layered else None)

    def smoothed():  # Euclidean in the true coordinates (a cyclic angle is not wrapped)
        d2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
        K = np.exp(-0.5 * d2 / LATENT_BANDWIDTH ** 2)
        return refine.LatentModels(tm, ((K @ latents) / K.sum(1, keepdims=True)).astype(np.float32))

    class MeanGauge(refine.LatentModels):
        def gaussians(self, rows, device):
            with torch.no_grad():
                c, a, s = self.model.decode(torch.as_tensor(self.latents[np.asarray(rows)]))
            c, a, s = c.float().to(device), a.float().to(device), s.float().to(device)
            n = self.model.neutral
            w = torch.as_tensor(np.asarray(n.amplitudes), dtype=torch.float32, device=device).abs()
            w = w / w.sum()
            c0 = torch.as_tensor(np.asarray(n.centers_A), dtype=torch.float32, device=device)
            return c - (w[None, :, None] * c).sum(1, keepdim=True) + (w[:, None] * c0).sum(0), a, s

    build = {
        "layered": lambda: WarpedModels(decoded, fine("round1"), crossover_A=crossover),
        "fine_true_poses": lambda: WarpedModels(decoded, fine("true_poses"), crossover_A=crossover),
        "fine_clean_consensus": lambda: WarpedModels(decoded, fine("clean"), crossover_A=crossover),
        "smoothed_latents": lambda: WarpedModels(smoothed(), fine("round1"), crossover_A=crossover),
        "true_motion": lambda: layered_true(fine("round1")),
        "middle_decoded": lambda: WarpedModels(decoded, fine("middle"), crossover_A=crossover),
        "middle_true_motion": lambda: layered_true(fine("middle")),
        "middle_true_motion_unlayered": lambda: layered_true(fine("middle"), layered=False),
        "middle_true_motion_unlayered_fine": lambda: layered_true(fine("middle3.2"), layered=False),
        "mean_gauge": lambda: WarpedModels(MeanGauge(tm, latents), fine("round1"), crossover_A=crossover),
        "truth": lambda: AtomicParticleModels(system, coords, truth.particle.to_numpy(), 0.0, int(info["seed"]),
                                              widened_sigma_A(float(info.get("thermal_A", 0.0)))),
    }
    start = errors(meta.rotation_matrices(), meta.origins_A())
    print(f"round 1's poses: median angle error {start[0]:.3f} deg", flush=True)
    rows = []
    for v in variants:
        t0 = time.time()
        models = build[v]()
        res = refine.refine_poses(parts, models, max_angle_deg=6.0, max_shift_A=2.0 * meta.apix,
                                  lowres_A=tm.config.get("lowres_A"), levels=3, score="wcc", prior=True,
                                  min_gain=refine.LATER_ROUNDS_MIN_GAIN_NATS)
        e = errors(res.rotations, res.origins_A)
        rows.append((v, *e, time.time() - t0))
        print(f"{v}: median {e[0]:.3f} deg, p90 {e[1]:.3f} deg, shift {e[2]:.3f} px ({time.time() - t0:.0f} s)", flush=True)
    lines = ["# Error budget of the second refinement (`benchmarks/bench_refine_budget.py`)", "",
             f"Work folder: {common.portable(args.work)}; simulation: {info['kind']}, {len(meta)} particles, "
             f"box {meta.box}, {meta.apix:g} A/px, SNR {info.get('snr')}, thermal {info.get('thermal_A', 0)} A, "
             f"frame {info.get('frame', 'core')}. Start: round 1's refined poses, median angle error {start[0]:.3f} deg "
             f"(p90 {start[1]:.3f}), shift {start[2]:.3f} px. Device: cpu, 1 thread. Command: "
             f"`python benchmarks/bench_refine_budget.py {' '.join(common.portable(a) for a in (argv or sys.argv[1:]))}`", "",
             "| reference | median angle error (deg) | p90 (deg) | median shift error (px) | time (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {v} | {a:.3f} | {p:.3f} | {s:.3f} | {t:.0f} |" for v, a, p, s, t in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        common._atomic_write(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
