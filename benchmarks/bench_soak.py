"""Soak run: does the training process's memory stay flat over many epochs?

Trains (``train.train``, in this process) for many epochs on a small simulated set and samples
the resident set size after every epoch (a logging handler on the engine's per-epoch line:
total RSS, and the anonymous part -- heap, arrays, tensors -- which is what a leak grows; the
file-backed part is page cache of the memory-mapped stack and feature cache). On CUDA also
the allocated GPU memory. Reports the least-squares slope of RSS against the epoch over the
epochs after a warm-up (the first ``--warmup`` epochs: allocator pools, page cache), the
growth from the first to the last measured epoch, and PASS when the fitted growth over the
whole run stays under ``--max-growth-mb``.

Usage (repository root, project environment)::

    python benchmarks/bench_soak.py                       # 500 particles, box 32, 300 epochs (~2-4 min)
    python benchmarks/bench_soak.py --epochs 60 --n 200   # quick
    python benchmarks/bench_soak.py --features onthefly --device cuda --epochs 1000

Writes ``benchmarks/results/soak.md`` and ``soak.json`` (``soak_onthefly.*`` with
``--features onthefly``).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class _EpochSampler(logging.Handler):
    def __init__(self, device):
        super().__init__(logging.INFO)
        self.device, self.rows, self.t0 = device, [], time.time()

    def emit(self, record):
        msg = record.getMessage()
        if not msg.startswith("epoch "):
            return
        import gc
        gc.collect()
        br = common.rss_breakdown_mb()
        row = {"epoch": int(msg.split()[1].split("/")[0]), "rss_mb": common.rss_mb(), "anon_mb": br["anon"],
               "file_mb": br["file"], "seconds": time.time() - self.t0}
        if str(self.device).startswith("cuda"):
            import torch
            row["gpu_alloc_mb"] = torch.cuda.memory_allocated() / 2 ** 20
        self.rows.append(row)


def _slope(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="particles (default 500)")
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10, help="epochs left out of the fit (default 10)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--features", choices=["cache", "onthefly"], default="cache")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-growth-mb", type=float, default=20.0,
                    help="PASS when slope x epochs (anonymous RSS) stays under this (default 20 MiB)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)

    import torch
    from scipion_gmmhet.engine.io.data import Particles
    from scipion_gmmhet.engine.model.gmm import GMM
    from scipion_gmmhet.engine.simulation.simulate import simulate
    from scipion_gmmhet.engine.training.config import TrainConfig
    from scipion_gmmhet.engine.training.train import train

    torch.set_num_threads(args.threads)
    os.makedirs(common.SCRATCH, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="soak_", dir=common.SCRATCH)
    try:
        r = simulate(os.path.join(scratch, "data"), "conformational", n=args.n, box=args.box, apix=5.0, snr=1.0,
                     seed=3, n_gaussians=128)
        confs = sorted(v for k, v in r["truth_gmm"].items() if k.startswith("conf_"))
        gmm = r["truth_gmm"].get("neutral") or confs[len(confs) // 2]  # the arm at c = 0.5
        logging.basicConfig(level=logging.WARNING)
        eng = logging.getLogger("scipion_gmmhet")
        eng.setLevel(logging.INFO)
        sampler = _EpochSampler(args.device)
        eng.addHandler(sampler)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, hidden=128, layers=3, zdim=4, lr=1e-4,
                          features=args.features, n_stats=min(500, args.n), seed=0)
        t0 = time.time()
        p = Particles.from_star(r["star"], device=args.device)
        train(p, GMM.load(gmm), cfg, os.path.join(scratch, "train"), star_path=r["star"])
        wall = time.time() - t0
        eng.removeHandler(sampler)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    rows = sampler.rows
    fit = [row for row in rows if row["epoch"] > args.warmup]
    ep = [row["epoch"] for row in fit]
    res = {"n": args.n, "box": args.box, "epochs": args.epochs, "features": args.features, "device": args.device,
           "wall_s": wall, "warmup": args.warmup}
    for key in ("rss_mb", "anon_mb", "file_mb", "gpu_alloc_mb"):
        if fit and key in fit[0]:
            vals = [row[key] for row in fit]
            res[f"{key}_first"] = vals[0]
            res[f"{key}_last"] = vals[-1]
            res[f"{key}_max"] = max(vals)
            res[f"{key}_slope_per_epoch"] = _slope(ep, vals)
    fitted_growth = res.get("anon_mb_slope_per_epoch", float("nan")) * max(1, len(fit))
    res["anon_fitted_growth_mb"] = fitted_growth
    res["pass"] = bool(abs(fitted_growth) < args.max_growth_mb)

    info = common.machine_info()
    table_rows = [{"quantity": k, "first": res.get(f"{k}_first"), "last": res.get(f"{k}_last"),
                   "max": res.get(f"{k}_max"), "slope MiB/epoch": res.get(f"{k}_slope_per_epoch")}
                  for k in ("rss_mb", "anon_mb", "file_mb", "gpu_alloc_mb") if f"{k}_first" in res]
    md = (f"# Soak run: memory over {args.epochs} epochs\n\n{common.machine_line(info)}\n\n"
          f"{args.n} particles, box {args.box}, features {args.features}, device {args.device}, "
          f"batch {args.batch_size}; {wall:.0f} s; fit over epochs {args.warmup + 1}-{args.epochs}.\n\n"
          + common.markdown_table(table_rows, [(c, c) for c in ("quantity", "first", "last", "max",
                                                                  "slope MiB/epoch")])
          + f"\n\nFitted growth of anonymous RSS over the run: {fitted_growth:+.2f} MiB "
            f"(limit {args.max_growth_mb:g}): **{'PASS' if res['pass'] else 'FAIL'}**\n")
    print(md)
    common.write_results("soak" if args.features == "cache" else f"soak_{args.features}", md,
                         {"result": res, "per_epoch": rows, "machine": info})
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
