"""Benchmark: is the clustering right? (issue 5) `gmmhet analyze` on trained latents of the
simulator's compositional and mixed data, checked against the truth.

For each kind it takes the training run of ``bench_latent_quality.py`` in ``--workdir`` (the
same dataset, neutral GMM and settings; trained here when missing), runs the command a user runs,
``gmmhet analyze --train RUN --particles STAR --clusters 2 --whiten --out DIR`` (PCA embedding,
k-means on whitened latents as the cluster protocol does by default, one particle reconstruction
per class with half maps), and reports:

- class populations against the true compositions (Hungarian matching of classes to truth
  classes; the largest difference in percentage points) and the adjusted Rand index;
- for each class, the FSC area (mean FSC over shells 1..Nyquist) of its particle reconstruction
  with the ground-truth map of its own composition and with the other one (own must be higher).
  For mixed data the truth maps are those of the middle conformation: a class averages the arm's
  whole swing, the composition is what it must get right.

Run: ``python benchmarks/bench_clustering.py [--kinds compositional,mixed --epochs 20]``.
Writes ``benchmarks/results/clustering.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
from bench_latent_quality import dataset, neutral_gmm  # noqa: E402
from scipion_gmmhet.engine.analysis import latent as an  # noqa: E402
from scipion_gmmhet.engine.cli import main as gmmhet  # noqa: E402
from scipion_gmmhet.engine.model.fourier import fsc_table  # noqa: E402
from scipion_gmmhet.engine.io.mrc import read_map  # noqa: E402
from scipion_gmmhet.engine.io.outputs import AnalysisFolder, TrainFolder  # noqa: E402


def truth_maps(d: str, kind: str) -> dict[int, str]:
    """Ground-truth map path per composition (1: with the subunit, 0: without)."""
    pre = "" if kind == "compositional" else "conf_002_"
    return {1: os.path.join(d, "truth_maps", pre + "with_subunit.mrc"),
            0: os.path.join(d, "truth_maps", pre + "without_subunit.mrc")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="compositional,mixed")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=3.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--zdim", type=int, default=4)
    p.add_argument("--resolution", type=float, default=12.0)
    p.add_argument("--n-gauss", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=os.path.join(HERE, "results", "work"))
    p.add_argument("--name", default="clustering")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rows, data = [], {"settings": vars(args), "machine": common.machine_info(), "kinds": {}}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        d, _ = dataset(args.workdir, kind, args)
        gmm_path, _ = neutral_gmm(d, args)
        star = os.path.join(d, "particles.star")
        run = os.path.join(d, f"train_z{args.zdim}_e{args.epochs}_b64_lr0.0001")
        if not TrainFolder(run).is_finished():
            if gmmhet(["train", "--particles", star, "--gmm", gmm_path, "--zdim", str(args.zdim), "--epochs",
                       str(args.epochs), "--seed", str(args.seed), "--device", args.device, "--out", run]):
                raise SystemExit(f"training {kind} failed")
        out = os.path.join(d, "analyze_k2")
        t0 = time.time()
        if gmmhet(["analyze", "--train", run, "--particles", star, "--clusters", "2", "--whiten", "--device",
                   args.device, "--out", out]):
            raise SystemExit(f"gmmhet analyze on {kind} failed")
        seconds = time.time() - t0
        truth = pd.read_csv(os.path.join(d, "truth.csv"))
        labels = np.load(AnalysisFolder(out).labels)
        pe = an.population_errors(labels, truth["composition"].to_numpy())
        maps = {c: read_map(path)[0] for c, path in truth_maps(d, kind).items()}
        for cl in pe["classes"]:
            rec, apix = read_map(os.path.join(out, f"cluster_{cl['cluster']:02d}.mrc"))
            own = fsc_table(rec, maps[cl["truth"]], apix)["fsc"][1:].mean()
            other = fsc_table(rec, maps[1 - cl["truth"]], apix)["fsc"][1:].mean()
            rows.append({"kind": kind, "class": cl["cluster"],
                         "truth": "with subunit" if cl["truth"] == 1 else "without subunit",
                         "true %": round(100 * cl["truth_fraction"], 1),
                         "class %": round(100 * cl["cluster_fraction"], 1),
                         "diff (points)": round(100 * cl["abs_diff"], 1), "ARI": round(pe["ari"], 3),
                         "FSC area own": round(float(own), 4), "FSC area other": round(float(other), 4),
                         "own > other": bool(own > other), "analyze s": round(seconds, 1)})
        data["kinds"][kind] = {"population_errors": pe, "analyze_seconds": seconds}
    cols = ["kind", "class", "truth", "true %", "class %", "diff (points)", "ARI", "FSC area own",
            "FSC area other", "own > other", "analyze s"]
    md = "\n".join([
        "# Clustering against the truth (`benchmarks/bench_clustering.py`)", "",
        f"`gmmhet analyze --clusters 2 --whiten` on networks trained for {args.epochs} epochs (zdim {args.zdim}) on "
        f"{args.n} simulated particles per kind, box {args.box}, SNR {args.snr:g}, CTF. "
        f"Machine: {common.machine_line(data['machine'])}.", "",
        common.markdown_table(rows, [(c, c) for c in cols]), ""])
    data["rows"] = rows
    common.write_results(args.name, md, data)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
