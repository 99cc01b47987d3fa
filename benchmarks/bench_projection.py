"""GMM projection throughput (separable vs naive) and the time to build a GMM from a map.

Plain Python; prints a table and writes it to benchmarks/results/projection.md and .json.

Projections: B poses (random rotations, sub-pixel origin shifts, a CTF per particle) of N
Gaussians at box D, forward pass (the complex rfft images that the FRC loss takes), for
B in {64, 256}, D in {64, 128}, N in {1024, 4096}, on CPU and on CUDA when available.

* separable = ``gmm.project`` (each Gaussian's term factors into a ky and a kx vector; the batch
  is one batched complex matrix product ``(B, D, N) @ (B, N, D/2+1)``);
* naive = ``gmm.project_naive`` (every Gaussian evaluated on the full 2D frequency grid and
  summed). Its cost is exactly linear in N (a loop over the Gaussians with identical work per
  Gaussian), so by default it is timed on the first ``--naive-gauss`` (64) Gaussians and scaled
  by N / 64; ``--naive-full`` times it on all N Gaussians (slow on CPU). The table says which.

Build: ``build.build_gmm`` of a 128-px, 2 A/px synthetic multi-domain map (pseudo-atoms) with
2048 Gaussians to 8 A; reports seconds, stages and the FSC(model, map) 0.5 resolution.

    python benchmarks/bench_projection.py                 # default grid, CPU (+CUDA), ~5 min on 2 cores
    python benchmarks/bench_projection.py --quick         # one configuration per device, no build
    python benchmarks/bench_projection.py --naive-full --repeats 3   # naive timed on all N
    python benchmarks/bench_projection.py --threads 1     # one thread: faster on a shared, loaded machine

Also writes the build-fidelity table (FSC at 12 and 8 A on the maps of tests/test_build.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scipion_gmmhet.engine.model import build, fourier, gmm  # noqa: E402
from scipion_gmmhet.engine import conventions  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _inputs(B, D, N, device, apix=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = D * apix / 2
    centers = ((torch.rand(N, 3, generator=g) - 0.5) * half).to(device)
    amps = torch.rand(N, generator=g).to(device) + 0.5
    sigmas = (torch.rand(N, generator=g) * 2 + 2).to(device)
    q = torch.randn(B, 4, generator=g)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.T
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                     2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                     2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], 1).reshape(B, 3, 3)
    origins = (torch.rand(B, 2, generator=g) - 0.5) * 4 * apix
    ky, kx = conventions.fourier_grid(D, apix, device=device)
    du = torch.rand(B, generator=g) * 15000 + 8000
    ctf = conventions.ctf_2d(ky, kx, du.to(device), (du - 500).to(device), torch.full((B,), 30.0, device=device),
                             300.0, 2.7, 0.1)
    return centers, amps, sigmas, R.to(device), origins.to(device), ctf, apix


def _time(fn, device, repeats, min_seconds=0.5):
    fn()  # warm-up
    _sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_projection(B, D, N, device, repeats, naive_gauss, naive_full):
    c, a, s, R, o, ctf, apix = _inputs(B, D, N, device)
    with torch.no_grad():
        t_sep = _time(lambda: gmm.project(c, a, s, R, D, apix, origins_A=o, ctf=ctf), device, repeats)
        n_naive = N if naive_full else min(N, naive_gauss)
        t_naive = _time(lambda: gmm.project_naive(c[:n_naive], a[:n_naive], s[:n_naive], R, D, apix,
                                                  origins_A=o, ctf=ctf), device,
                        1 if naive_full or B * D * (D // 2 + 1) * n_naive > 5e7 else repeats,
                        min_seconds=0.0 if naive_full else 0.5) * (N / n_naive)
        # agreement on the timed subset (sanity: the two paths compute the same thing)
        k = min(N, 64)
        F1 = gmm.project(c[:k], a[:k], s[:k], R[:8], D, apix, origins_A=o[:8], ctf=ctf[:8])
        F2 = gmm.project_naive(c[:k], a[:k], s[:k], R[:8], D, apix, origins_A=o[:8], ctf=ctf[:8])
        rel_err = float((F1 - F2).abs().max() / F2.abs().max())
    return dict(device=device, batch=B, box=D, n_gauss=N, separable_s=t_sep, separable_per_s=B / t_sep,
                naive_s=t_naive, naive_per_s=B / t_naive, speedup=t_naive / t_sep,
                naive_timed_on=n_naive, max_rel_diff=rel_err)


def synthetic_map(box=128, apix=2.0, n_atoms=30000, seed=0):
    """Multi-domain pseudo-atom map: six ellipsoidal domains, atoms binned to voxels and
    blurred with a Gaussian of 1.5 A (fast at box 128, unlike rendering 30k Gaussians)."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(6):
        centre = rng.uniform(-50, 50, 3)
        radii = rng.uniform(12, 28, 3)
        u = rng.normal(size=(n_atoms // 6, 3))
        u /= np.linalg.norm(u, axis=1)[:, None]
        u *= rng.uniform(0, 1, (n_atoms // 6, 1)) ** (1 / 3)
        pts.append(centre + u * radii)
    pts = np.concatenate(pts)
    edges = (np.arange(box + 1) - box // 2 - 0.5) * apix
    hist, _ = np.histogramdd(pts[:, ::-1], bins=[edges] * 3)  # z, y, x
    return ndimage.gaussian_filter(hist, 1.5 / apix).astype(np.float32)


def bench_build(device, n_gauss=2048, box=128, apix=2.0, resolution_A=8.0):
    vol = synthetic_map(box, apix)
    t0 = time.perf_counter()
    res = build.build_gmm(vol, apix, resolution_A, n_gauss=n_gauss, device=device, seed=0)
    seconds = time.perf_counter() - t0
    s = fourier.shell_for_resolution(box, apix, resolution_A)
    fsc_lp = fourier.fsc(res.gmm.render(), fourier.lowpass_map(vol, apix, resolution_A))
    return dict(device=device, box=box, apix=apix, resolution_A=resolution_A, n_gauss=len(res.gmm),
                seconds=seconds, fsc05_resolution_A=res.fsc05_resolution_A,
                min_fsc_lowpass_to_target=float(fsc_lp[1:s + 1].min()),
                stages=[(h["n"], round(h["resolution_A"], 2), h["steps"], round(h["seconds"], 1))
                        for h in res.history])


def fidelity_table():
    """FSC between the built model and the input map low-pass filtered to the target, at 12 and
    8 A, on the simulator's consensus map and the test maps of tests/test_build.py (synthetic
    multi-domain; adenylate kinase 1AKE rendered from its atoms). ``ceiling`` is the FSC of the input map itself against its
    low-passed copy at the target shell (the filter's edge runs through that shell)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import test_build as tb
    import tempfile
    from scipion_gmmhet.engine.io.mrc import read_map
    from scipion_gmmhet.engine.simulation.simulate import simulate
    with tempfile.TemporaryDirectory() as tmp:
        sim = read_map(simulate(tmp, "conformational", n=16, box=64, apix=2.0, snr=1.0, seed=0)["consensus"])
    maps = {"simulator consensus, conformational (box 64, 2 A/px)": sim,
            "synthetic 3-domain (box 40, 2.5 A/px)": (tb.synthetic_map(), 2.5),
            "1AKE atoms (box 40, 2 A/px)": (tb.structure_map(), 2.0)}
    out = []
    for name, (vol, apix) in maps.items():
        for r in (12.0, 8.0):
            t0 = time.perf_counter()
            res = build.build_gmm(vol, apix, r, seed=0)
            sec = time.perf_counter() - t0
            s = fourier.shell_for_resolution(vol.shape[0], apix, r)
            lp = fourier.lowpass_map(vol, apix, r)
            f_lp = fourier.fsc(res.gmm.render(), lp)
            out.append(dict(map=name, target_A=r, n_gauss=len(res.gmm), seconds=sec,
                            min_fsc_below_target=float(f_lp[1:s].min()), fsc_at_target=float(f_lp[s]),
                            ceiling_at_target=float(fourier.fsc(vol, lp)[s]),
                            fsc_raw_at_target=float(fourier.fsc(res.gmm.render(), vol)[s]),
                            fsc05_A=res.fsc05_resolution_A))
            print("fidelity %s %g A: N %d, FSC vs low-passed at target %.3f (ceiling %.3f), min below %.3f"
                  % (name, r, len(res.gmm), f_lp[s], out[-1]["ceiling_at_target"], f_lp[1:s].min()), flush=True)
    return out


def to_markdown(rows, builds, meta, fidelity=()):
    out = ["# GMM projection benchmark\n", f"{meta['when']} - {meta['cpu']} ({meta['threads']} torch threads, "
           f"load average {meta['load']}), torch {meta['torch']}; GPU: {meta['gpu']}.\n",
           "Forward projections (complex rfft images with CTF and shifts). Naive = "
           "`gmm.project_naive`; when `timed on` < N it was timed on that many Gaussians and scaled "
           "by N / timed (its cost is exactly linear in N).\n",
           "| device | batch | box | N | separable proj/s | naive proj/s | naive timed on | speed-up | max rel diff |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['device']} | {r['batch']} | {r['box']} | {r['n_gauss']} | {r['separable_per_s']:,.0f} | "
                   f"{r['naive_per_s']:,.1f} | {r['naive_timed_on']} | {r['speedup']:,.0f}x | {r['max_rel_diff']:.1e} |")
    if builds:
        out += ["", "Build (`build.build_gmm`, synthetic multi-domain map, stages = (N, resolution A, Adam steps, s)):", "",
                "| device | box | apix | target | N | seconds | FSC-0.5 (A) | min FSC vs low-passed map to target | stages |",
                "|---|---|---|---|---|---|---|---|---|"]
        for b in builds:
            out.append(f"| {b['device']} | {b['box']} | {b['apix']} | {b['resolution_A']} A | {b['n_gauss']} | "
                       f"{b['seconds']:.1f} | {b['fsc05_resolution_A']:.2f} | {b['min_fsc_lowpass_to_target']:.3f} | "
                       f"{b['stages']} |")
    if fidelity:
        out += ["", "Build fidelity (FSC between the model map and the input map low-pass filtered to the target; "
                "`ceiling` = FSC of the input map itself vs its low-passed copy at the target shell):", "",
                "| map | target | N | s | min FSC below target | FSC at target shell | ceiling | FSC vs unfiltered map at target | FSC-0.5 (A) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for f in fidelity:
            out.append(f"| {f['map']} | {f['target_A']:g} A | {f['n_gauss']} | {f['seconds']:.1f} | "
                       f"{f['min_fsc_below_target']:.3f} | {f['fsc_at_target']:.3f} | {f['ceiling_at_target']:.3f} | "
                       f"{f['fsc_raw_at_target']:.3f} | {f['fsc05_A']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one configuration per device, no build")
    p.add_argument("--naive-full", action="store_true", help="time the naive path on all N Gaussians")
    p.add_argument("--naive-gauss", type=int, default=64, help="Gaussians the naive path is timed on (default 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--devices", default="auto", help="comma list (default: cpu, and cuda when available)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the build-fidelity table")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a loaded machine)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")
    grid = [(64, 64, 1024)] if args.quick else [(B, D, N) for D in (64, 128) for N in (1024, 4096) for B in (64, 256)]
    rows = []
    for device in devices:
        for B, D, N in grid:
            r = bench_projection(B, D, N, device, args.repeats, args.naive_gauss, args.naive_full)
            rows.append(r)
            print(f"{device:5s} B={B:4d} D={D:4d} N={N:5d}: separable {r['separable_per_s']:10,.0f} proj/s, "
                  f"naive {r['naive_per_s']:8,.1f} proj/s (timed on {r['naive_timed_on']}), "
                  f"x{r['speedup']:,.0f}", flush=True)
    builds = []
    if not (args.quick or args.no_build):
        for device in devices:
            b = bench_build(device)
            builds.append(b)
            print(f"build {device}: {b['n_gauss']} Gaussians, 128 px to 8 A in {b['seconds']:.1f} s, "
                  f"FSC-0.5 {b['fsc05_resolution_A']:.2f} A, min FSC vs low-passed {b['min_fsc_lowpass_to_target']:.3f}",
                  flush=True)
    fidelity = [] if (args.quick or args.no_fidelity) else fidelity_table()
    meta = dict(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), load=" ".join(f"{x:.1f}" for x in os.getloadavg()),
                torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            meta["cpu"] = f"{names[0]} x{os.cpu_count()}"
    except OSError:
        pass
    md = to_markdown(rows, builds, meta, fidelity)
    print()
    print(md)
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("projection.md", md), ("projection.json", json.dumps(dict(meta=meta, projection=rows,
                                                                                   build=builds, fidelity=fidelity), indent=1))):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
