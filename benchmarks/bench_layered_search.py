"""Pose-search speed with the layered reference: its low-passed copies filtered vs projected.

The layered reference of `gmmhet refine`'s later rounds (``--reference layered``,
``fine_reference.WarpedModels``) is one GMM of ``Nc`` decoded Gaussians (low-passed), ``Nf`` fine
Gaussians and the same ``Nf`` low-passed with negative amplitudes. The pose search's projector
(``pose_projector.PoseProjector(layers=...)``) applies those copies as a ``1 - L`` filter on the
fine layer's projection instead of projecting them (same result). This script times one batch of
the whole local search (``pose_search.search_batch``: coarse lattice, 3 levels, shift polish) on
random particles, both ways, alternately in one process, and checks that both give the same
poses. Sizes default to the MD-like hinge's (box 64, 1.5 A/px, 166 decoded and 687 fine
Gaussians, band to Nyquist, crossover 8 A).

    OMP_NUM_THREADS=1 python benchmarks/bench_layered_search.py            # -> results/layered_search.md
    python benchmarks/bench_layered_search.py --device cuda --batch 256     # on a GPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from scipion_gmmhet.engine.analysis import refine  # noqa: E402
from scipion_gmmhet.engine.analysis.fine_reference import low_passed, lowpass_width_A  # noqa: E402
from scipion_gmmhet.engine.analysis.pose_search import search_batch  # noqa: E402
from scipion_gmmhet.engine.model.gmm import project  # noqa: E402


def layered_batch(B: int, n_coarse: int, n_fine: int, box: int, apix: float, tau: float, device, seed: int = 0):
    """Random particles of a layered reference: its Gaussians ``(B, Nc + 2 Nf)`` in the view frame,
    noisy images at a small pose error, origins and CTF-like filters."""
    g = torch.Generator().manual_seed(seed)
    radius = 0.3 * box * apix
    coarse = (torch.randn(B, n_coarse, 3, generator=g) * radius / 2, torch.rand(B, n_coarse, generator=g) + 0.5,
              torch.full((B, n_coarse), 2.4))
    fine = (torch.randn(B, n_fine, 3, generator=g) * radius / 2, torch.rand(B, n_fine, generator=g) + 0.5,
            torch.full((B, n_fine), 1.4))
    c, a, s = (torch.cat(p, 1).to(device) for p in zip(low_passed(*coarse, tau), fine, low_passed(*fine, tau, -1.0)))
    ctf = (torch.cos(torch.rand(B, 1, 1, generator=g) * 3 + torch.linspace(0, 12, box // 2 + 1)[None, None, :]
                     * torch.ones(1, box, 1)) + 0.1).to(device)
    R = refine.rotvec_to_matrix(torch.randn(B, 3, generator=g) * 1.5).to(device)
    o0 = torch.zeros(B, 2, device=device)
    F = project(c, a, s, R, box, apix, o0 + torch.randn(B, 2, generator=g).to(device) * apix, ctf)
    noise = torch.randn(F.shape, generator=g, dtype=torch.complex64).to(device) * F.abs().mean() * 2.0
    return F + noise, c, a, s, o0, ctf


def run(args) -> dict:
    device = torch.device(args.device)
    tau = lowpass_width_A(args.crossover)
    Fimg, c, a, s, o0, ctf = layered_batch(args.batch, args.n_coarse, args.n_fine, args.box, args.apix, tau, device)
    scorer = refine._Scorer(args.box, args.apix, None, 2.0 * args.apix, 2.0 * args.apix, device)
    scorer_lo = refine._coarse_scorer(scorer, None, 2.0 * args.apix, None)
    kw = dict(max_angle=6.0, levels=3, polish_steps=0, max_elements=(1 << 27) if device.type == "cuda" else (1 << 21),
              prior_deg=2.0, prior_px=2.0 / 3, min_gain=0.0, rotvec_to_matrix=refine.rotvec_to_matrix,
              coarse_grid=refine.coarse_rotation_grid(6.0))
    layouts = {"all Gaussians projected (before)": None, "low-passed copies as a filter (now)":
               (args.n_coarse, args.n_fine, tau)}
    times = {k: [] for k in layouts}
    out = {}
    for rep in range(args.repeats + 1):  # the first pass warms up
        for name, layers in layouts.items():
            scorer.reset_ring_scale()
            scorer_lo.reset_ring_scale()
            common.sync(device)
            t0 = time.perf_counter()
            vec, sh, _, sa = search_batch(Fimg, c, a, s, o0, ctf, scorer, scorer_lo, layers=layers, **kw)
            common.sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
            out[name] = (vec.cpu().numpy(), sh.cpu().numpy(), sa.cpu().numpy())
    (v0, s0, a0), (v1, s1, a1) = out.values()
    return {"times": times, "max_rotvec_diff_deg": float(np.abs(v0 - v1).max()),
            "max_shift_diff_px": float(np.abs(s0 - s1).max()), "max_score_diff": float(np.abs(a0 - a1).max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64, help="particles in the batch (refine's default batch: 64)")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=1.5)
    p.add_argument("--n-coarse", type=int, default=166, help="decoded Gaussians (the 8 A neutral GMM)")
    p.add_argument("--n-fine", type=int, default=687, help="fine-reference Gaussians (4.8 A)")
    p.add_argument("--crossover", type=float, default=8.0, help="crossover resolution (A): the training band's top")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="layered_search")
    args = p.parse_args(argv)
    res = run(args)
    info = common.machine_info()
    rows = [{"projector": k, "batch s (median)": float(np.median(v)), "particles/s": args.batch / float(np.median(v))}
            for k, v in res["times"].items()]
    ratio = rows[0]["batch s (median)"] / rows[1]["batch s (median)"]
    md = "\n".join([
        "# Pose search with the layered reference (`benchmarks/bench_layered_search.py`)", "",
        common.machine_line(info), "",
        f"One batch of {args.batch} particles, box {args.box}, {args.apix} A/px, {args.n_coarse} decoded + "
        f"{args.n_fine} fine + {args.n_fine} low-passed copies (crossover {args.crossover:g} A), band to Nyquist, "
        f"the whole local search (coarse lattice, 3 levels, shift polish) on {args.device}; median of "
        f"{args.repeats} alternating runs after a warm-up. Command: `python benchmarks/bench_layered_search.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        common.markdown_table(rows, [(k, k) for k in ("projector", "batch s (median)", "particles/s")]), "",
        f"Speed-up: {ratio:.2f}x. Same poses: largest rotation-vector difference "
        f"{res['max_rotvec_diff_deg']:.2e} deg, shift {res['max_shift_diff_px']:.2e} px, score "
        f"{res['max_score_diff']:.2e}.", ""])
    print(md)
    common.write_results(args.name, md, {"args": vars(args), "machine": info, **res, "speedup": ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
