"""A/B of `gmmhet train` on the CPU: another checkout's code (``--base``, e.g. main) against this one's.

Plain Python; writes ``benchmarks/results/<name>.md`` and ``.json``. Trains the same star and GMM
with both code trees (``PYTHONPATH`` set to each), alternating and reversing the order every other
round to cancel drift in the machine's load, one thread each, fixed batch size; records the CPU
seconds of each command (``os.wait4``: the least load-sensitive figure on a shared machine), the
epoch wall seconds from ``loss.csv``, and whether the latents are bit-identical.

    git worktree add --detach /tmp/gpu-base main
    python benchmarks/bench_ab_cpu.py --base /tmp/gpu-base --star sim/particles.star --gmm build/gmm.npz
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the other checkout (its root)")
    p.add_argument("--star", required=True)
    p.add_argument("--gmm", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--name", default="cpu_ab_vs_main")
    p.add_argument("--workdir", default=os.path.join(common.SCRATCH, "ab"))
    args = p.parse_args(argv)
    trees = [("base", os.path.abspath(args.base)), ("this", common.REPO)]
    res = {"base": [], "this": []}
    os.makedirs(args.workdir, exist_ok=True)
    for r in range(args.rounds):
        for name, tree in (trees if r % 2 == 0 else trees[::-1]):
            out = os.path.join(args.workdir, name)
            shutil.rmtree(out, ignore_errors=True)
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "scipion_gmmhet.engine", "train", "--particles", args.star, "--gmm", args.gmm,
                   "--out", out, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", "cpu",
                   "--seed", "1"]
            run = common.run_timed(cmd, out + ".log", env=env)
            if run["rc"] != 0:
                raise SystemExit(common.tail(out + ".log"))
            ep = [float(h["seconds"]) for h in TrainFolder(out).read_loss()]
            res[name].append({"cpu_s": run["cpu_seconds"], "wall_s": run["seconds"], "best_epoch_s": min(ep),
                              "load": os.getloadavg()[0]})
            print(name, r, res[name][-1], flush=True)
    same = np.array_equal(TrainFolder(os.path.join(args.workdir, "base")).read_latents(),
                          TrainFolder(os.path.join(args.workdir, "this")).read_latents())
    rows = [{"code": n, "median_cpu_s": statistics.median(x["cpu_s"] for x in res[n]),
             "median_best_epoch_s": statistics.median(x["best_epoch_s"] for x in res[n]),
             "loads": f"{min(x['load'] for x in res[n]):.1f}-{max(x['load'] for x in res[n]):.1f}"} for n in res]
    md = ["# gmmhet train on the CPU: A/B against another checkout\n", common.machine_line(common.machine_info()) + ".\n",
          f"base = {args.base}; {args.rounds} alternating rounds; {args.epochs} epochs, batch {args.batch_size}, "
          f"1 thread; latents bit-identical: {same}.\n",
          common.markdown_table(rows, [("code", "code"), ("median_cpu_s", "median CPU s (whole command)"),
                                       ("median_best_epoch_s", "median best epoch s"), ("loads", "load (1 min)")])]
    print("\n".join(md))
    common.write_results(args.name, "\n".join(md) + "\n", {"runs": res, "latents_identical": same})
    return 0


if __name__ == "__main__":
    sys.exit(main())
