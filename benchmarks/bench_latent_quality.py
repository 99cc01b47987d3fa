"""Latent-space quality of the heterogeneity network on simulated data with known truth.

For each kind (conformational, compositional, mixed): simulate particles (SNR 0.1, CTF) ->
build the neutral GMM from the consensus map (``build.build_gmm``, as ``gmmhet build`` does)
-> train (``gmmhet train``'s engine) -> metrics against ``truth.csv``:

- conformational: |Spearman| between PC1 of the latents and the true conformation;
- compositional: adjusted Rand index of k-means (k=2) on the latents vs the composition labels;
- mixed: both; the Spearman is computed within each true composition group (PC1 of that
  group's latents), and also for PC1 of all latents.

ARI is reported for k-means on the raw latents (the first issue's metric) and on PCA-whitened
latents (each principal direction scaled to unit variance): when a wide continuous motion and
a discrete change share the latent space, raw k-means with k=2 cuts the widest direction (the
motion) in two; whitened k-means cuts the most bimodal one. ``pass`` uses the whitened ARI,
the clustering the cluster protocol and ``gmmhet analyze`` run by default (``pass_raw``: raw).

Prints a table and writes benchmarks/results/latent_quality.md and .json. Plain Python:

    python benchmarks/bench_latent_quality.py                       # 5000 particles, box 64
    python benchmarks/bench_latent_quality.py --n 1000 --epochs 10 --kinds conformational
    python benchmarks/bench_latent_quality.py --device cuda --threads 8

Datasets, GMMs and training runs are kept in --workdir (default benchmarks/results/work) and
reused when their parameters match, so a rerun with other training settings skips the
simulation and the build.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import common  # noqa: E402

from scipion_gmmhet.engine.model.build import build_gmm  # noqa: E402
from scipion_gmmhet.engine.io.data import Particles  # noqa: E402
from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402
from scipion_gmmhet.engine.model.gmm import GMM  # noqa: E402
from scipion_gmmhet.engine.io.mrc import read_map  # noqa: E402
from scipion_gmmhet.engine.simulation.simulate import simulate  # noqa: E402
from scipion_gmmhet.engine.training.config import TrainConfig  # noqa: E402
from scipion_gmmhet.engine.training.train import train  # noqa: E402

log = logging.getLogger("bench_latent_quality")


def pc1(z: np.ndarray) -> np.ndarray:
    return PCA(1).fit_transform(z - z.mean(0))[:, 0]


def metrics(z: np.ndarray, truth: pd.DataFrame, kind: str) -> dict:
    out = {}
    if kind in ("conformational", "mixed"):
        out["spearman_pc1"] = abs(float(spearmanr(pc1(z), truth["conformation"]).correlation))
    if kind in ("compositional", "mixed"):
        labels = KMeans(2, n_init=10, random_state=0).fit_predict(z)
        out["ari_kmeans2"] = float(adjusted_rand_score(truth["composition"], labels))
        # the same after PCA-whitening the latents (each principal direction scaled to unit variance):
        # k-means then splits the most bimodal direction rather than the widest one
        white = PCA(whiten=True).fit_transform(z - z.mean(0))
        labels = KMeans(2, n_init=10, random_state=0).fit_predict(white)
        out["ari_kmeans2_whitened"] = float(adjusted_rand_score(truth["composition"], labels))
    if kind == "mixed":
        for comp in (0, 1):
            sel = (truth["composition"] == comp).to_numpy()
            out[f"spearman_pc1_composition{comp}"] = abs(float(
                spearmanr(pc1(z[sel]), truth["conformation"][sel]).correlation))
    return out


def passes(kind: str, m: dict, key: str = "ari_kmeans2") -> bool:
    if kind == "conformational":
        return m["spearman_pc1"] >= 0.9
    if kind == "compositional":
        return m[key] >= 0.9
    if kind == "mixed":
        return m[key] >= 0.9 and min(m["spearman_pc1_composition0"], m["spearman_pc1_composition1"]) >= 0.8
    return True


def dataset(workdir: str, kind: str, args) -> tuple[str, float]:
    d = os.path.join(workdir, f"{kind}_n{args.n}_box{args.box}_snr{args.snr:g}_seed{args.seed}")
    js = os.path.join(d, "simulation.json")
    if os.path.exists(js):  # reused: report the time it took when it was made
        with open(js) as f:
            return d, float(json.load(f).get("summary", {}).get("seconds_total", float("nan")))
    t0 = time.time()
    simulate(d, kind, n=args.n, box=args.box, apix=args.apix, snr=args.snr, seed=args.seed)
    return d, time.time() - t0


def neutral_gmm(d: str, args) -> tuple[str, float]:
    tag = f"gmm_{args.resolution:g}A_n{args.n_gauss or 'auto'}.npz"
    path = os.path.join(d, tag)
    if os.path.exists(path):  # reused (build time not recorded)
        return path, float("nan")
    t0 = time.time()
    vol, apix = read_map(os.path.join(d, "consensus.mrc"))
    res = build_gmm(vol, apix, args.resolution, n_gauss=args.n_gauss, device=args.device, seed=args.seed)
    res.gmm.save(path)
    return path, time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="particles per dataset (default 5000)")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=3.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kinds", default="conformational,compositional,mixed")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: TrainConfig's)")
    p.add_argument("--zdim", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--resolution", type=float, default=12.0, help="GMM build resolution, A (default 12)")
    p.add_argument("--n-gauss", type=int, default=512, help="Gaussians in the neutral GMM (0: build chooses)")
    p.add_argument("--changes", default="positions,amplitudes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    p.add_argument("--workdir", default=os.path.join(HERE, "results", "work"))
    p.add_argument("--reuse", action="store_true", help="reuse finished training runs in --workdir (metrics only)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "latent_quality"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        d, t_sim = dataset(args.workdir, kind, args)
        gmm_path, t_build = neutral_gmm(d, args)
        kw = {"zdim": args.zdim, "changes": tuple(args.changes.split(",")), "seed": args.seed}
        for k in ("epochs", "batch_size", "lr"):
            if getattr(args, k) is not None:
                kw[k] = getattr(args, k)
        cfg = TrainConfig(**kw)
        run_dir = os.path.join(d, f"train_z{args.zdim}_e{cfg.epochs}_b{cfg.batch_size}_lr{cfg.lr:g}")
        star = os.path.join(d, "particles.star")
        particles = Particles.from_star(star, device=args.device)
        t0 = time.time()
        if args.reuse and TrainFolder(run_dir).is_finished():
            latent = TrainFolder(run_dir).read_latents()
            hist = TrainFolder(run_dir).read_loss()
            t_train = float(sum(h["seconds"] for h in hist))
        else:
            res = train(particles, GMM.load(gmm_path), cfg, run_dir, star_path=star)
            latent, hist = res["latent"], res["history"]
            t_train = time.time() - t0
        epoch_s = float(np.median([h["seconds"] for h in hist]))
        truth = pd.read_csv(os.path.join(d, "truth.csv"))
        m = metrics(latent, truth, kind)
        row = {"kind": kind, "n": args.n, "box": args.box, "snr": args.snr, "n_gauss": len(GMM.load(gmm_path)),
               "zdim": args.zdim, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
               **{k: round(v, 4) for k, v in m.items()}, "pass": passes(kind, m, "ari_kmeans2_whitened"),
               "pass_raw": passes(kind, m),
               "final_val_loss": round(hist[-1]["val_loss"], 5),
               "train_particles_per_s": round(args.n * (1 - cfg.val_fraction) / epoch_s, 1),
               "seconds_simulate": round(t_sim, 1), "seconds_build": round(t_build, 1),
               "seconds_train_total": round(t_train, 1)}
        rows.append(row)
        log.info("%s", row)
    write_results(rows, args)
    return 0


def write_results(rows: list, args) -> None:
    df = pd.DataFrame(rows)
    hw = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, device {args.device}, "
          f"{args.threads} CPU thread(s) (machine shared with other jobs)" if args.device == "cpu" else
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else args.device}, torch {torch.__version__}")
    cols = [c for c in ["kind", "n", "n_gauss", "zdim", "epochs", "spearman_pc1", "ari_kmeans2", "ari_kmeans2_whitened",
                        "spearman_pc1_composition0", "spearman_pc1_composition1", "pass", "pass_raw",
                        "train_particles_per_s",
                        "seconds_train_total", "seconds_build", "seconds_simulate"] if c in df.columns]
    table = df[cols].to_string(index=False)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    md = ["# Latent quality on simulated data", "", f"Hardware: {hw}", "",
          f"SNR {args.snr}, CTF, box {args.box}, {args.apix} A/px; GMM built at {args.resolution} A; "
          "thresholds: conformational |Spearman(PC1)| >= 0.9; compositional ARI >= 0.9; mixed ARI >= 0.9 and "
          "|Spearman| >= 0.8 within each composition.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        md.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in r.tolist()) + " |")
    for path, text in ((args.out + ".md", "\n".join(md) + "\n"),
                       (args.out + ".json", json.dumps({"hardware": hw, "rows": rows}, indent=1, default=str))):
        common._atomic_write(path, text)
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
