"""Mixed precision of the GMM projection: fp32 vs bf16 vs fp16 matrix product, accuracy and speed.

Plain Python; prints a table and writes ``benchmarks/results/<name>.md`` and ``.json``.

A batch of B particles of N Gaussians (a random compact GMM, RELION rotations, origin shifts, a
CTF per particle) is projected with :func:`gmm.project` at ``precision`` fp32 / bf16 / fp16
(positions, phases and envelopes in float32; the product's inputs scaled per particle and cast;
float32 accumulation, see gmm.py), the "images" being the fp32 projections plus white noise at
``--snr``. Per precision: forward + backward time of ``-mean FRC`` (the training loss), the
relative error of the projections, the largest and mean change of the per-particle FRC and of the
loss, the relative error of the gradient with respect to the centres, and the number of
non-finite FRC values (must be 0). The fp16 row uses amplitudes 1e6 x larger as well (unscaled,
the product would overflow float16's 65504 and the FRC would be NaN).

    python benchmarks/bench_precision.py --threads 1                       # CPU, box 128 cropped to 48, 2048 Gaussians
    python benchmarks/bench_precision.py --device cuda --batch 1024 --name precision_gpu
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from scipion_gmmhet.engine.conventions import ctf_2d, fourier_grid  # noqa: E402
from scipion_gmmhet.engine.model.fourier import RingBinner  # noqa: E402
from scipion_gmmhet.engine.model.gmm import project  # noqa: E402
from scipion_gmmhet.engine.simulation.simulate import random_rotations  # noqa: E402


def case(B, D, apix, N, device, snr, seed=0, amp_scale=1.0):
    rng = np.random.default_rng(seed)
    f32 = dict(dtype=torch.float32, device=device)
    c = torch.as_tensor(rng.normal(0, D * apix / 8, (N, 3)), **f32)
    a = torch.as_tensor(rng.uniform(0.5, 1.5, N) * amp_scale, **f32)
    s = torch.as_tensor(rng.uniform(1.5, 2.5, N) * apix, **f32)
    R = torch.as_tensor(random_rotations(B, rng), **f32)
    o = torch.as_tensor(rng.uniform(-2, 2, (B, 2)) * apix, **f32)
    ky, kx = fourier_grid(D, apix, device=device)
    du = torch.as_tensor(rng.uniform(8000, 25000, B), **f32)
    ctf = ctf_2d(ky, kx, du, du - 200, torch.zeros(B, **f32), 300.0, 2.7, 0.1)
    with torch.no_grad():
        F = project(c, a, s, R, D, apix, o, ctf)
        noise = torch.randn(F.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.complex64).to(device)
        img = F + noise * F.abs().pow(2).mean().sqrt() / np.sqrt(snr)
    return c, a, s, R, o, ctf, img


def run(B, D, apix, N, device, snr, repeats, amp_scale=1.0):
    c, a, s, R, o, ctf, img = case(B, D, apix, N, device, snr, amp_scale=amp_scale)
    binner = RingBinner(D, apix, 100.0, 2.2 * apix, device=device)
    out, ref = [], None
    for precision in ("fp32", "bf16", "fp16"):
        leaf = c.clone().requires_grad_(True)

        def step():
            leaf.grad = None
            F = project(leaf, a, s, R, D, apix, o, ctf, precision=precision)
            frc = binner.mean_frc(F, img)
            (-frc.mean()).backward()
            return F.detach(), frc.detach()

        F, frc = step()
        t = common.median_time(step, device, repeats=repeats)
        row = {"precision": precision, "amp_scale": amp_scale, "batch": B, "box": D, "n_gauss": N,
               "ms_per_batch": 1e3 * t, "particles_per_s": B / t,
               "nonfinite_frc": int((~torch.isfinite(frc)).sum())}
        if ref is None:
            ref = (F, frc, leaf.grad.clone())
        row["rel_err_proj"] = float((F - ref[0]).abs().norm() / ref[0].abs().norm())
        row["max_dfrc"] = float((frc - ref[1]).abs().max())
        row["mean_dfrc"] = float((frc - ref[1]).abs().mean())
        row["d_loss"] = float((frc.mean() - ref[1].mean()).abs())
        row["rel_err_grad"] = float((leaf.grad - ref[2]).norm() / ref[2].norm())
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--box", type=int, default=48, help="projection grid (the training's Fourier-cropped box; "
                   "box 128 at 1.5 A/px cropped to ~6.5 A is 48-64)")
    p.add_argument("--apix", type=float, default=4.0, help="pixel size of that grid, A (default 4: 128 x 1.5 / 48)")
    p.add_argument("--gaussians", type=int, default=2048)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.batch, args.box, args.apix, args.gaussians, args.device, args.snr, args.repeats)
    rows += [r for r in run(args.batch, args.box, args.apix, args.gaussians, args.device, args.snr, args.repeats,
                            amp_scale=1e6) if r["precision"] != "bf16"]
    res = {"machine": common.machine_info(), "args": vars(args), "rows": rows}
    md = ["# Projection precision: fp32 vs bf16 vs fp16 matrix product\n",
          common.machine_line(res["machine"]) + f"; device {args.device}.\n",
          f"Batch {args.batch}, grid {args.box} px at {args.apix} A/px, {args.gaussians} Gaussians, CTF, SNR "
          f"{args.snr}; forward + backward of -mean FRC (band 100 A to {2.2 * args.apix:.1f} A). Changes are against "
          "the fp32 row of the same amplitude scale.\n",
          common.markdown_table(rows, [
              ("precision", "precision"), ("amp_scale", "amplitude x"), ("ms_per_batch", "ms / batch"),
              ("particles_per_s", "particles/s"), ("rel_err_proj", "rel. error of projections"),
              ("max_dfrc", "max |d FRC|"), ("mean_dfrc", "mean |d FRC|"), ("d_loss", "|d loss|"),
              ("rel_err_grad", "rel. error of gradient"), ("nonfinite_frc", "non-finite FRC")])]
    text = "\n".join(md) + "\n"
    print(text)
    name = args.name or f"precision_{args.device.split(':')[0]}"
    print("wrote", *common.write_results(name, text, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
