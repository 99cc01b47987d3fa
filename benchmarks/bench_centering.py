"""Latent quality when the input poses carry errors, with and without centring (``gmmhet train --center``).

Real particles come with the poses of a consensus refinement, never exact ones. This benchmark
takes a simulated set with known truth (``bench_science.py`` or ``bench_refine.py`` make them,
e.g. the 1AKE hinge with MD-like disorder), writes copies of its star whose poses are off by
RELION-like errors (isotropic rotation errors of ``--perturb-deg`` RMS, shift errors of
``--perturb-px`` RMS; the images are the same), and trains ``gmmhet train`` with its defaults
(``--zdim 4 --epochs 20``, the held-back command) on each, with ``--center auto`` (the default)
and ``--center off``. Reported: |Spearman(latent PC1, true conformation)|, kNN R2, the
effective latent dimension, the median pose error of the star, the median shift error after
centring, and the seconds of the centring and of the training (one thread each, same run).

    python benchmarks/bench_centering.py --sim SIM --gmm SIM/gmm_8A.npz --name centering_hinge_md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_refine import perturb, pose_errors  # noqa: E402
from bench_science import abs_spearman, knn_r2, pc1  # noqa: E402

from scipion_gmmhet.engine import cli  # noqa: E402
from scipion_gmmhet.engine.conventions import euler_to_matrix, matrix_to_euler  # noqa: E402
from scipion_gmmhet.engine.io import metadata  # noqa: E402
from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402

STARTS = {"exact": (0.0, 0.0), "rotations off": (1.0, 0.0), "shifts off": (0.0, 1.0), "both off": (1.0, 1.0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", required=True, help="simulated set: particles.star, particles.mrcs, truth.csv")
    p.add_argument("--gmm", required=True, help="its neutral GMM (gmm.npz or a gmmhet build folder)")
    p.add_argument("--perturb-deg", type=float, default=2.2, help="RMS rotation error (default 2.2: median ~1.9 deg)")
    p.add_argument("--perturb-px", type=float, default=1.39, help="RMS shift error, px (default 1.39: median ~1.15 px)")
    p.add_argument("--starts", default=",".join(STARTS), help=f"comma-separated subset of: {', '.join(STARTS)}")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=7, help="seed of the pose errors")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="work folder (default SIM/centering)")
    p.add_argument("--name", default="centering")
    args = p.parse_args(argv)
    work = args.work or os.path.join(args.sim, "centering")
    os.makedirs(work, exist_ok=True)
    info = common.machine_info()
    meta = metadata.read_particles(os.path.join(args.sim, "particles.star"))
    truth = pd.read_csv(os.path.join(args.sim, "truth.csv"))
    y = truth["conformation"].to_numpy(dtype=np.float64)
    rot_t = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
    org_t = truth[["origin_x_A", "origin_y_A"]].to_numpy()
    rows = []
    for start in [s.strip() for s in args.starts.split(",") if s.strip()]:
        fd, fp = STARTS[start]
        rot, org = perturb(rot_t, org_t, meta.apix, fd * args.perturb_deg, fp * args.perturb_px, args.seed)
        star = os.path.join(work, start.replace(" ", "_") + ".star")
        metadata.write_particles(star, meta.with_poses(np.stack(matrix_to_euler(rot), axis=1), org))
        e0 = pose_errors(rot, org, rot_t, org_t, meta.apix)
        for center in ("off", "auto"):
            out = os.path.join(work, f"train_{start.replace(' ', '_')}_{center}")
            t0 = time.time()
            rc = cli.main(["train", "--particles", star, "--gmm", args.gmm, "--out", out, "--zdim", "4",
                           "--epochs", str(args.epochs), "--center", center, "--threads", str(args.threads),
                           "--device", "cpu"])
            if rc:
                raise SystemExit(f"gmmhet train failed ({start}, --center {center})")
            wall = time.time() - t0
            folder = TrainFolder(out)
            z = folder.read_latents()
            summary = folder.read_summary()
            cfg = folder.read_config()
            row = {"start": start, "center": center, "angle_err_deg": round(e0["ang_med"], 3),
                   "shift_err_px": round(e0["sh_med_px"], 3),
                   "spearman_pc1": round(abs_spearman(pc1(np.asarray(z, np.float64)), y), 4),
                   "knn_r2": round(knn_r2(np.asarray(z, np.float64), y), 4),
                   "effective_dim": summary.get("effective_dim"), "wall_s": round(wall, 1)}
            shifts = folder.read_centering()
            if shifts is not None:
                e1 = pose_errors(rot, org + shifts, rot_t, org_t, meta.apix)
                c = cfg.get("centering") or {}
                row.update(shift_err_after_px=round(e1["sh_med_px"], 3), n_moved=c.get("n_moved"),
                           n_found=c.get("n_found", c.get("n_moved")), gate_t=c.get("gate_t"),
                           center_s=c.get("seconds"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = [("start", "input poses"), ("angle_err_deg", "median angle error (deg)"),
            ("shift_err_px", "median shift error (px)"), ("center", "--center"),
            ("n_found", "moved by the search"), ("gate_t", "half-map check t (needs 1.70)"),
            ("shift_err_after_px", "shift error after centring (px)"), ("n_moved", "particles re-centred"),
            ("spearman_pc1", "\\|Spearman\\| PC1"), ("knn_r2", "kNN R2"), ("effective_dim", "effective dim."),
            ("center_s", "centring s"), ("wall_s", "train wall s")]
    md = [f"# Latent quality with pose errors, centring on and off (`benchmarks/bench_centering.py`)", "",
          f"Data: `{args.sim}` ({len(meta)} particles, box {meta.box}, {meta.apix:g} A/px; "
          f"{json.dumps(json.load(open(os.path.join(args.sim, 'simulation.json'))).get('kind', '?'))}); neutral GMM "
          f"`{args.gmm}`. Pose errors: rotations {args.perturb_deg:g} deg RMS, shifts {args.perturb_px:g} px RMS "
          f"(seed {args.seed}), the images unchanged. `gmmhet train --zdim 4 --epochs {args.epochs} --center off|auto` "
          f"(defaults otherwise), one thread.", "",
          f"Machine: {common.machine_line(info)}", "",
          f"Command: `python benchmarks/bench_centering.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          common.markdown_table(rows, cols), ""]
    md_path, _ = common.write_results(args.name, "\n".join(md), {"rows": rows, "machine": info, "args": vars(args)})
    print("wrote", md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
