"""cryoDRGN ``train_vae`` run to convergence on a subset of a science set, against gmmhet's defaults.

Issue 13 asks for cryoDRGN's latents on the same real-structure data "given the same wall time
and also run to convergence on a subset". ``bench_vs_cryodrgn.py`` gives the same-wall-time side;
this script gives the convergence side on a data set made by ``bench_science.py`` (e.g. the
adenylate-kinase hinge with MD-like disorder, ``--systems hinge --thermal 1 --frame all``):

1. cryoDRGN's ``parse_pose_star`` / ``parse_ctf_star`` on the set's ``particles.star``;
2. ``cryodrgn train_vae`` with its default architecture and ``--zdim`` (default 4, as ours) on the
   first ``--subset`` particles for ``--epochs`` epochs, a latent checkpoint every epoch
   (``--checkpoint 1``): |Spearman| of latent PC1 with the true conformation and the 5-fold kNN
   R2 (``bench_science`` metrics) after every epoch, so the curve shows where it converges;
3. gmmhet with the defaults (``gmmhet train --zdim 4 --epochs 20`` on the set's neutral GMM) on
   the same subset alone, and, with ``--ours-full DIR``, the latents of a default run on all
   particles restricted to the subset.

Everything runs on the CPU of this machine, one process after the other; the table gives wall
and CPU seconds. Writes ``--out``/NAME.md and .json.

    python benchmarks/bench_vs_cryodrgn_convergence.py --sim SIM --gmm SIM/gmm_8A.npz \\
        --ours-full SIM/train_default_XXXX --subset 1000 --epochs 30 --threads 1
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
import bench_vs_cryodrgn as vs  # noqa: E402
from bench_science import abs_spearman, knn_r2, pc1  # noqa: E402

from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402
from scipion_gmmhet.engine.io.safe_pickle import load_array_pickle  # noqa: E402


def quality(z: np.ndarray, y: np.ndarray) -> dict:
    z = np.asarray(z, np.float64)
    return {"spearman_pc1": round(abs_spearman(pc1(z), y), 4), "knn_r2": round(knn_r2(z, y), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", required=True, help="a simulated set (particles.star, particles.mrcs, truth.csv, "
                                                "simulation.json), e.g. made by bench_science.py")
    p.add_argument("--gmm", required=True, help="the neutral GMM (gmm.npz or a gmmhet build folder) for ours")
    p.add_argument("--ours-full", default=None, help="a default gmmhet train folder on ALL particles of --sim")
    p.add_argument("--subset", type=int, default=1000, help="the first M particles (default 1000)")
    p.add_argument("--epochs", type=int, default=30, help="cryoDRGN epochs (default 30)")
    p.add_argument("--our-epochs", type=int, default=20, help="gmmhet epochs (default 20, the held-back command)")
    p.add_argument("--zdim", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cryodrgn-timeout", type=float, default=6 * 3600.0)
    p.add_argument("--venv", default=vs.DEFAULT_VENV)
    p.add_argument("--work", required=True)
    p.add_argument("--name", default="vs_cryodrgn_convergence")
    p.add_argument("--out", default=common.RESULTS)
    p.add_argument("--rescore", action="store_true",
                   help="only rescore WORK/cryodrgn's z.E.pkl for E <= --epochs (e.g. after continuing cryoDRGN "
                        "there with `cryodrgn train_vae ... -o WORK/cryodrgn --load latest -n E`) and rewrite the "
                        "results from the earlier run's OUT/NAME.json")
    args = p.parse_args(argv)
    if args.rescore:
        return rescore(args)

    vs.THREAD_ENV = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    sim = os.path.abspath(args.sim)
    with open(os.path.join(sim, "simulation.json")) as f:
        simjs = json.load(f)
    box, apix = int(simjs["box"]), float(simjs["apix"])
    truth = pd.read_csv(os.path.join(sim, "truth.csv"))
    n = len(truth)
    m = min(args.subset, n)
    y = truth["conformation"].to_numpy()[:m]
    star = os.path.join(sim, "particles.star")
    res = {"args": vars(args), "machine": common.machine_info(), "simulation": simjs, "subset": m, "n": n}
    res["machine"]["torch_threads"] = args.threads
    res["cryodrgn"] = vs.ensure_venv(args.venv, vs.CRYODRGN_VERSION, work)
    res["ctf_check"] = vs.ctf_sign_check(args.venv)
    exe = os.path.join(args.venv, "bin", "cryodrgn")
    for what, cmd in (("pose", "parse_pose_star"), ("ctf", "parse_ctf_star")):
        vs._run([exe, cmd, star, "-o", os.path.join(work, what + ".pkl"), "-D", str(box), "--Apix", str(apix)],
                os.path.join(work, f"parse_{what}.log"), f"cryodrgn {cmd}")
    ind = os.path.join(work, "ind.pkl")
    vs.venv_python(args.venv, "import pickle, sys, numpy as np; pickle.dump(np.arange(int(sys.argv[1])), "
                   "open(sys.argv[2], 'wb'))", m, ind)

    # ours on the subset alone (defaults), and the full run restricted to the subset
    sub_star = os.path.join(work, "subset", "particles.star")
    os.makedirs(os.path.dirname(sub_star), exist_ok=True)
    vs.write_subset_star(star, np.arange(m), sub_star)
    out_sub = os.path.join(work, "ours_subset")
    r = vs._run(vs.OUR + ["train", "--particles", sub_star, "--gmm", os.path.abspath(args.gmm), "--out", out_sub,
                          "--epochs", str(args.our_epochs), "--zdim", str(args.zdim), "--seed", str(args.seed),
                          "--device", "cpu"], os.path.join(work, "ours_subset.log"), "gmmhet train (subset)")
    res["ours_subset"] = {"wall_s": r["seconds"], "cpu_s": r["cpu_seconds"],
                          **quality(np.load(TrainFolder(out_sub).latent), y)}
    vs.log(f"ours on the subset: {res['ours_subset']}")
    if args.ours_full:
        z = np.load(TrainFolder(args.ours_full).latent)
        res["ours_full"] = {"folder": os.path.abspath(args.ours_full), "subset": quality(z[:m], y),
                            "all": quality(z, truth["conformation"].to_numpy())}
        vs.log(f"ours on all particles: {res['ours_full']}")

    # cryoDRGN: every epoch's latents
    flag = None if res["ctf_check"]["opposite_sign"] else "--uninvert-data"
    out = os.path.join(work, "cryodrgn")
    cmd = [exe, "train_vae", os.path.join(sim, "particles.mrcs"), "--poses", os.path.join(work, "pose.pkl"),
           "--ctf", os.path.join(work, "ctf.pkl"), "--zdim", str(args.zdim), "-n", str(args.epochs), "-o", out,
           "--no-analysis", "--checkpoint", "1", "--seed", str(args.seed), "--ind", ind] + ([flag] if flag else [])
    t0 = time.time()
    c = vs._run(cmd, os.path.join(work, "cryodrgn.log"), f"cryodrgn train_vae ({args.epochs} epochs, {m} particles)",
                timeout_s=args.cryodrgn_timeout)
    c.update(vs.parse_cryodrgn_log(c["log"]))
    res["cryodrgn_train"] = {"wall_s": c["seconds"], "cpu_s": c["cpu_seconds"], "rc": c["rc"],
                             "epoch_s": c.get("epoch_s"), "parameters": c.get("parameters"),
                             "curve": cryodrgn_curve(out, args.epochs, y), "started": t0}
    vs.log(f"cryoDRGN curve: {res['cryodrgn_train']['curve']}")
    write(res, args)
    return 0


def cryodrgn_curve(out: str, epochs: int, y: np.ndarray) -> list:
    """Latent quality after every epoch E <= ``epochs`` whose ``z.E.pkl`` (1-based) is in ``out``."""
    curve = []
    for e in range(1, epochs + 1):
        pk = os.path.join(out, f"z.{e}.pkl")
        if os.path.exists(pk):
            z = load_array_pickle(pk, "cryoDRGN's z.E.pkl, an (N, zdim) numpy array")  # runs no code
            curve.append({"epoch": e, **quality(z, y)})
    return curve


def write(res: dict, args) -> None:
    common._atomic_write(os.path.join(args.out, args.name + ".json"), json.dumps(res, indent=1, default=str))
    common._atomic_write(os.path.join(args.out, args.name + ".md"), report(res))
    print(common.portable(report(res)))


def rescore(args) -> int:
    with open(os.path.join(args.out, args.name + ".json")) as f:
        res = json.load(f)
    out = os.path.join(os.path.abspath(args.work), "cryodrgn")
    truth = pd.read_csv(os.path.join(os.path.abspath(args.sim), "truth.csv"))
    y = truth["conformation"].to_numpy()[:int(res["subset"])]
    c = res["cryodrgn_train"]
    c["curve"] = cryodrgn_curve(out, args.epochs, y)
    c.update({k: v for k, v in vs.parse_cryodrgn_log(os.path.join(out, "run.log")).items() if k == "epoch_s"})
    c["continued_to"] = args.epochs
    write(res, args)
    return 0


def report(res: dict) -> str:
    a, s, c = res["args"], res["simulation"], res["cryodrgn_train"]
    L = ["# cryoDRGN run to convergence on a subset, against gmmhet's defaults\n",
         common.machine_line(res["machine"]) + ".\n",
         f"Data: `{s.get('kind')}` set, {res['n']} particles, box {s.get('box')}, {s.get('apix')} A/px, SNR "
         f"{s.get('snr')}, thermal {s.get('thermal_A', 0)} A, frame {s.get('frame', 'core')}, seed {s.get('seed')}; "
         f"the first {res['subset']} particles are the subset. cryoDRGN {res['cryodrgn']['cryodrgn']} `train_vae` "
         f"default architecture ({c.get('parameters')} parameters), zdim {a['zdim']}, {a['threads']} thread(s). "
         f"Metrics on the subset: |Spearman| of latent PC1 with the true conformation; 5-fold kNN R2. "
         f"$SIM: the data folder `bench_science.py --systems hinge --thermal 1 --frame all --epochs 20` writes "
         f"(hinge_n6000_box64_apix1.5_snr0.1_seed1_thermal1_frameall), with its neutral GMM gmm_8A.npz and its "
         f"default training train_default_*.\n",
         "| run | epochs | wall s | CPU s | \\|Spearman\\| PC1 | kNN R2 |", "|---|---|---|---|---|---|"]
    o = res["ours_subset"]
    L.append(f"| gmmhet defaults, trained on the subset alone | {a['our_epochs']} | {o['wall_s']:.0f} | "
             f"{o['cpu_s']:.0f} | {o['spearman_pc1']:.3f} | {o['knn_r2']:.3f} |")
    if "ours_full" in res:
        f = res["ours_full"]
        L.append(f"| gmmhet defaults, trained on all {res['n']} (subset rows; all rows: "
                 f"{f['all']['spearman_pc1']:.3f} / {f['all']['knn_r2']:.3f}) | {a['our_epochs']} | | | "
                 f"{f['subset']['spearman_pc1']:.3f} | {f['subset']['knn_r2']:.3f} |")
    ep = c.get("epoch_s") or []
    for row in c["curve"]:
        e = row["epoch"]
        wall = sum(ep[:e]) if len(ep) >= e else float("nan")
        L.append(f"| cryoDRGN train_vae, subset | {e} | {wall:.0f} | | {row['spearman_pc1']:.3f} | {row['knn_r2']:.3f} |")
    if c.get("continued_to"):
        L.append(f"\ncryoDRGN continued to epoch {c['continued_to']} in the same folder (`cryodrgn train_vae ... "
                 f"--load latest -n {c['continued_to']}`, then this script with `--rescore --epochs "
                 f"{c['continued_to']}`).")
    L.append(f"\ncryoDRGN first run: {c['wall_s']:.0f} s wall, {c['cpu_s']:.0f} CPU s (rc {c['rc']}); wall per epoch "
             "from its log (cumulative in the table). Command: `python benchmarks/bench_vs_cryodrgn_convergence.py " +
             " ".join(f"--{k.replace('_', '-')} {str(v).replace(a['sim'], '$SIM')}" for k, v in a.items()
                      if v is not None and k not in ("out", "venv", "work")) + " --work $WORK`\n")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
