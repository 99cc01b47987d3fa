"""Benchmark of the local refinement of a domain (``gmmhet refine-domain``) against the truth.

Simulates a dataset whose domain moves continuously (``--kind conformational``: the
simulator's hinged arm; ``--kind hinge``: adenylate kinase, LID and NMP opening, tests/data/1ake.pdb),
trains the network on the particles at their true poses (every Gaussian free, no mask; neutral
GMM: the simulator's middle state, or for the hinge ``gmmhet build`` of the consensus), runs
``gmmhet refine-domain`` at its defaults (domain found automatically from the decoder's motions;
``--domain-mask truth``: a mask around the true moving domain), and compares, under the domain's
mask, the map from the domain poses with the map from the particle poses (both from the same
signal-subtracted particles):

- masked FSC against the true domain's map alone at the middle state (the arm; for the hinge,
  LID), mean over shells to Nyquist and FSC=0.5;
- the half maps' masked FSC (0.143 resolution, mean), what a user sees without a truth;
- (the hinge's neutral GMM is built from the consensus, so its domain frame is the population
  mean's, near but not exactly the middle state the truth is rendered at)
- conformational only: the median projected RMS error (Angstrom) of the arm's Gaussians under the
  particle pose and under the domain pose, against the arm's true pose (the arm at the particle's
  conformation relative to the middle state).

Run: ``nice -n 10 python benchmarks/bench_refine_domain.py --kind conformational --n 1000 --snr 1``
(GPU: add ``--device cuda``). Writes ``benchmarks/results/refine_domain_<kind>.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from scipion_gmmhet.engine import cli  # noqa: E402
from scipion_gmmhet.engine.conventions import euler_to_matrix  # noqa: E402
from scipion_gmmhet.engine.io import metadata  # noqa: E402
from scipion_gmmhet.engine.io.mrc import read_map, write_map  # noqa: E402
from scipion_gmmhet.engine.io.outputs import DomainFolder, TrainFolder  # noqa: E402
from scipion_gmmhet.engine.model.fourier import fsc_table, resolution_at_threshold  # noqa: E402
from scipion_gmmhet.engine.simulation import simulate  # noqa: E402

PDB = os.path.join(common.REPO, "tests", "data", "1ake.pdb")


def dataset(args) -> tuple[str, str, object]:
    """(simulation folder, neutral GMM path, the simulator's molecule or None)."""
    d = os.path.join(args.work, f"{args.kind}_{args.box}_{args.apix:g}_{args.n}_{args.snr:g}_s{args.seed}")
    if not os.path.exists(os.path.join(d, "truth.csv")):
        if args.kind == "hinge":
            from scipion_gmmhet.engine.simulation.atomic import simulate_atomic
            simulate_atomic(d, "hinge", PDB, n=args.n, box=args.box, apix=args.apix, snr=args.snr, seed=args.seed)
        else:
            simulate.simulate(d, "conformational", n=args.n, box=args.box, apix=args.apix, snr=args.snr,
                              seed=args.seed, n_gaussians=args.n_gaussians)
    if args.kind == "hinge":
        from scipion_gmmhet.engine.model.build import build_gmm
        gmm = os.path.join(d, f"gmm_{args.resolution:g}A.npz")
        if not os.path.exists(gmm):
            vol, apix = read_map(os.path.join(d, "consensus.mrc"))
            build_gmm(vol, apix, args.resolution, device=args.device, seed=0).gmm.save(gmm)
        return d, gmm, None
    info = json.load(open(os.path.join(d, "simulation.json")))
    mol = simulate.build_molecule(args.box, args.apix, int(info.get("molecule_seed", 0)), args.n_gaussians)
    middle = next(st for st in info["states"] if abs(st["conformation"] - 0.5) < 1e-6)  # the frame of the truth
    return d, os.path.join(d, middle["gmm"]), mol


def truth_domain(args, mol) -> tuple[np.ndarray, np.ndarray]:
    """The true moving domain at the middle state: its atom/Gaussian centres (A) and its map
    alone (the arm; for the hinge, LID), the target of a map from signal-subtracted particles."""
    from scipion_gmmhet.engine.model.gmm import render_map
    if mol is not None:
        pts = mol.state_centers(0.5, False)[mol.arm_slice()].astype(np.float64)
        amp, sig = np.full(len(pts), float(mol.amplitude)), np.full(len(pts), float(mol.sigma_A))
    else:
        from scipion_gmmhet.engine.simulation.atomic import ATOM_SIGMA_A, build_system
        sysm = build_system("hinge", PDB)
        sel = sysm.domain == "LID"
        pts = sysm.centers(np.full((1, len(sysm.coords)), 0.5))[0].numpy()[sel]
        amp, sig = np.asarray(sysm.electrons, dtype=np.float64)[sel], np.full(len(pts), ATOM_SIGMA_A)
    vol = render_map(*(torch.as_tensor(v, dtype=torch.float32) for v in (pts, amp, sig)), args.box, args.apix)
    return pts, vol.numpy()


def truth_domain_mask(args, d: str, pts: np.ndarray) -> str:
    """A binary mask of the voxels within 2 px of the true domain's centres ``pts``."""
    from scipy.spatial import cKDTree
    g = (np.arange(args.box) - args.box // 2) * args.apix
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    dist, _ = cKDTree(pts).query(np.stack([xx, yy, zz], -1).reshape(-1, 3))
    path = os.path.join(d, "truth_domain_mask.mrc")
    write_map(path, (dist <= 2 * args.apix).reshape((args.box,) * 3).astype(np.float32), args.apix)
    return path


def arm_projected_error_A(mol, truth: pd.DataFrame, R_est: np.ndarray, o_est: np.ndarray) -> float:
    """Median over particles of the RMS distance (A) between the arm's middle-state Gaussians
    projected with the pose (R_est, o_est) and the arm's true projection (the arm at the
    particle's conformation, :meth:`simulate.Molecule.arm_centers`, under the particle's pose)."""
    A = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
    o = truth[["origin_x_A", "origin_y_A"]].to_numpy()
    arm_c = mol.arm_centers(torch.as_tensor(truth["conformation"].to_numpy())).double().numpy()  # (n, n_arm, 3)
    true_pos = np.einsum("bij,bnj->bni", A, arm_c)
    est_pos = np.einsum("bij,nj->bni", R_est, mol.centers_A[mol.arm_slice()].astype(np.float64))
    err = (est_pos[..., :2] - o_est[:, None]) - (true_pos[..., :2] - o[:, None])
    return float(np.median(np.sqrt((err ** 2).sum(-1).mean(1))))


def masked_vs_truth(vol: np.ndarray, truth: np.ndarray, mask: np.ndarray, apix: float) -> tuple[float, float]:
    t = fsc_table(vol * mask, truth * mask, apix)
    return float(np.mean(t["fsc"][1:])), resolution_at_threshold(t["freq_invA"], t["fsc"], 0.5)


def _num(v: float, digits: int) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="conformational", choices=("conformational", "hinge"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=None, help="A/px (default 3 conformational, 1.5 hinge)")
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--n-gaussians", type=int, default=1600)
    ap.add_argument("--resolution", type=float, default=8.0, help="hinge: gmmhet build resolution (A)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--domain-mask", default="auto", choices=("auto", "truth"))
    ap.add_argument("--max-angle", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=os.path.join(common.SCRATCH, "refine_domain"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.apix = args.apix or (1.5 if args.kind == "hinge" else 3.0)
    out_md = args.out or os.path.join(common.RESULTS, f"refine_domain_{args.kind}.md")
    os.makedirs(args.work, exist_ok=True)
    times = {}
    t0 = time.time()
    d, gmm, mol = dataset(args)
    times["data_s"] = time.time() - t0
    star = os.path.join(d, "particles.star")
    train = os.path.join(args.work, f"train_{os.path.basename(d)}_e{args.epochs}_{os.path.basename(gmm)[:-4]}")
    t0 = time.time()
    if not TrainFolder(train).is_finished():
        if cli.main(["train", "--particles", star, "--gmm", gmm, "--zdim", "4", "--epochs", str(args.epochs),
                     "--device", args.device, "--out", train]):
            raise SystemExit("training failed")
    times["train_s"] = time.time() - t0
    out = os.path.join(args.work, f"domain_{os.path.basename(d)}_{args.domain_mask}_a{args.max_angle:g}")
    cmd = ["refine-domain", "--train", train, "--particles", star, "--max-angle", str(args.max_angle),
           "--device", args.device, "--out", out]
    if args.domain_mask == "truth":
        cmd += ["--domain-mask", truth_domain_mask(args, d, truth_domain(args, mol)[0])]
    t0 = time.time()
    if cli.main(cmd):
        raise SystemExit("refine-domain failed")
    times["refine_domain_s"] = time.time() - t0
    folder = DomainFolder(out)
    s = json.load(open(folder.summary))
    truth_map = truth_domain(args, mol)[1]
    mask, _ = read_map(folder.domain_map[:-4] + "_mask.mrc")
    rows = {}
    for key, path in (("particle poses", folder.plain_map), ("domain poses", folder.domain_map)):
        vol, _ = read_map(path)
        # the domain map is in the neutral GMM's frame: the simulator's neutral is the middle state;
        # the hinge's is built from the consensus, whose LID is the population mean (near the middle)
        rows[key] = masked_vs_truth(vol, truth_map, mask, args.apix)
    truth = pd.read_csv(os.path.join(d, "truth.csv"))
    err = {}
    if mol is not None:
        m0 = metadata.read_particles(star)
        md = metadata.read_particles(folder.particles)
        err["particle poses"] = arm_projected_error_A(mol, truth, m0.rotation_matrices(), m0.origins_A())
        err["domain poses"] = arm_projected_error_A(mol, truth, md.rotation_matrices(), md.origins_A())
    lines = [
        "# Local refinement of a domain (`benchmarks/bench_refine_domain.py`)", "",
        f"Data: simulated {args.kind} set, {args.n} particles, box {args.box}, {args.apix:g} A/px, SNR {args.snr:g}, "
        f"CTF, true particle poses. Network: `gmmhet train --zdim 4 --epochs {args.epochs}` (no mask). "
        f"`gmmhet refine-domain` defaults (max angle {args.max_angle:g} deg), domain: "
        f"{'found from the decoder motions' if args.domain_mask == 'auto' else 'mask around the true moving domain'} "
        f"({s['n_domain_gaussians']} of {s['n_gaussians']} Gaussians). Device: {args.device} "
        f"({common.machine_line(common.machine_info())}). Command: `python benchmarks/bench_refine_domain.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        "| poses | domain-masked FSC vs true domain (mean) | FSC=0.5 vs truth (A) | half-map masked FSC 0.143 (A) "
        "| half-map masked FSC (mean) | arm projected error (A) |", "|---|---|---|---|---|---|"]
    for key, tag in (("particle poses", "plain"), ("domain poses", "domain")):
        res_h = s.get(f"{tag}_resolution_0143_masked_A")
        lines.append(f"| {key} | {_num(rows[key][0], 4)} | {_num(rows[key][1], 2)} | "
                     f"{'n/a' if res_h is None else f'{res_h:.2f}'} | {s[f'{tag}_fsc_masked_mean']:.4f} | "
                     f"{f'{err[key]:.2f}' if key in err else 'n/a'} |")
    lines += ["", f"Decoded domain rotation (median over particles): {s['decoded_angle_median_deg']:.2f} deg; the "
              f"local search then moved {s['n_moved_by_search']} of {s['n_particles']} particles (median change "
              f"{s['search_angle_median_deg']:.2f} deg, {s['search_shift_median_A']:.2f} A).",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    os.makedirs(os.path.dirname(out_md), exist_ok=True)
    common._atomic_write(out_md, common.portable("\n".join(lines)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.exit(main())
