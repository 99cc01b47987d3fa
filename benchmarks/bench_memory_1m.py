"""Memory and throughput at 1,000,000 particles: metadata + a memory-mapped stack at a small box.

Plain Python; prints a table and writes ``benchmarks/results/memory_1m.md`` and ``.json``.

1. Writes, under ``--workdir`` (default ``benchmarks/.scratch/memory_1m``, git-ignored; deleted
   at the end unless ``--keep``), a RELION 3.1 star of ``--n`` particles (random poses on SO(3),
   origins, CTF; one optics group) and ONE image stack ``particles.mrcs`` of ``n x box x box``
   float32 (1M x 24 x 24 x 4 B = 2.3 GB), written in chunks through a memory map (white noise
   plus a blob: the content does not matter for the I/O and memory measured here). Free disk
   space is checked first (``shutil.disk_usage``): ``--n`` is scaled down, with a message, when
   the stack, the star and a 1 GB margin do not fit.
2. ``metadata.read_particles`` on the star (wall s, rows/s, peak RSS of that step) and
   ``validate`` (each stack's header read once).
3. ``data.ParticleImages``: one shuffled pass (as a training epoch reads: random batches, each
   sorted) over the first 10k, 100k and all particles, batch ``--batch``: images/s and MB/s per
   subset and per tenth of the full pass (the rate must not fall with dataset size or position),
   and the peak memory: total RSS (includes pages of the memory-mapped stack, which are page
   cache the kernel reclaims at will) and anonymous RSS (the program's own arrays).
4. The training data path (``data.Particles.from_star`` on the whole star, Fourier crop,
   ``GradientFeatures`` on the fly, one ``HetModel`` step as ``train.py`` takes it: forward,
   FRC loss, backward, Adam) for ``--train-batches`` batches at the start, the middle and the end
   of the set (round robin, median batch time, so load swings on a shared machine hit all
   positions alike), on a synthetic GMM (``--n-gauss`` Gaussians) at the stack's box:
   particles/s per position and the peak memory. A bounded number of batches: a full 1M epoch takes hours on a
   CPU; this shows the per-batch cost does not depend on where in a 1M set the batch is.

Pass/fail lines: peak RSS < 4 GB (total, and anonymous), and the slowest subset/segment rate
within a factor ``--tolerance`` (default 0.5) of the fastest.

    python benchmarks/bench_memory_1m.py                       # 1M particles at box 24 (~2.4 GB scratch)
    python benchmarks/bench_memory_1m.py --n 200000 --box 16   # smaller
    python benchmarks/bench_memory_1m.py --keep --skip-train   # keep the files, I/O only
    python benchmarks/bench_memory_1m.py --threads 1           # shared, oversubscribed CPUs
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- writing the data
def random_rotations_euler(n: int, rng) -> np.ndarray:
    from scipion_gmmhet.engine.conventions import matrix_to_euler
    from scipion_gmmhet.engine.simulation.simulate import random_rotations
    return np.stack(matrix_to_euler(random_rotations(n, rng)), axis=1)


def write_star_fast(path: str, n: int, box: int, apix: float, stack_name: str, seed: int = 0,
                    chunk: int = 200_000) -> None:
    """RELION 3.1 star (optics + particles) written in chunks with pandas (the engine's
    ``star.write_star`` formats every value in Python: fine for real sets, slow at 1M rows)."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    tmp = path + ".tmp"
    cols = ["rlnImageName", "rlnMicrographName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
            "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
            "rlnCtfScalefactor", "rlnOpticsGroup", "rlnRandomSubset", "rlnClassNumber", "rlnCoordinateX",
            "rlnCoordinateY", "rlnGroupNumber", "rlnLogLikeliContribution"]
    with open(tmp, "w") as f:
        f.write("\n# version 30001\n\ndata_optics\n\nloop_\n")
        for i, c in enumerate(["rlnOpticsGroup", "rlnOpticsGroupName", "rlnAmplitudeContrast", "rlnSphericalAberration",
                               "rlnVoltage", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"], 1):
            f.write(f"_{c} #{i}\n")
        f.write(f"1 opticsGroup1 0.1 2.7 300.0 {apix} {box} 2\n\n\n# version 30001\n\ndata_particles\n\nloop_\n")
        for i, c in enumerate(cols, 1):
            f.write(f"_{c} #{i}\n")
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            idx = np.arange(start + 1, start + m + 1)
            e = random_rotations_euler(m, rng)
            du = rng.uniform(8000, 25000, m)
            df = pd.DataFrame({
                "rlnImageName": [f"{i:07d}@{stack_name}" for i in idx],
                "rlnMicrographName": [f"mics/mic_{i // 200:05d}.mrc" for i in idx],
                "rlnAngleRot": e[:, 0].round(4), "rlnAngleTilt": e[:, 1].round(4), "rlnAnglePsi": e[:, 2].round(4),
                "rlnOriginXAngst": rng.uniform(-2, 2, m).round(3) * apix,
                "rlnOriginYAngst": rng.uniform(-2, 2, m).round(3) * apix,
                "rlnDefocusU": du.round(2), "rlnDefocusV": (du - rng.uniform(0, 400, m)).round(2),
                "rlnDefocusAngle": rng.uniform(0, 180, m).round(3), "rlnPhaseShift": np.zeros(m),
                "rlnCtfBfactor": np.zeros(m), "rlnCtfScalefactor": np.ones(m), "rlnOpticsGroup": np.ones(m, np.int64),
                "rlnRandomSubset": 1 + (idx % 2), "rlnClassNumber": np.ones(m, np.int64),
                "rlnCoordinateX": rng.uniform(0, 4096, m).round(1), "rlnCoordinateY": rng.uniform(0, 4096, m).round(1),
                "rlnGroupNumber": 1 + idx // 20000, "rlnLogLikeliContribution": rng.normal(1e5, 1e3, m).round(3),
            }, columns=cols)
            df.to_csv(f, sep=" ", header=False, index=False, float_format="%.6g")
        f.write("\n")
    os.replace(tmp, path)


def write_stack_chunked(path: str, n: int, box: int, apix: float, seed: int = 0, chunk: int = 50_000) -> None:
    """float32 MRC stack written through a memory map, ``chunk`` images at a time."""
    import mrcfile
    tmp = path + ".tmp"
    rng = np.random.default_rng(seed + 1)
    yy, xx = np.mgrid[:box, :box] - box // 2
    blob = np.exp(-(xx ** 2 + yy ** 2) / (2 * (box / 6) ** 2)).astype(np.float32)
    with mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            m.data[start:start + k] = rng.standard_normal((k, box, box), dtype=np.float32) + blob
        m.set_image_stack()
        m.voxel_size = apix
        m.header.dmin, m.header.dmax, m.header.dmean, m.header.rms = -5.0, 6.0, float(blob.mean()), 1.0
        m.flush()
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- measurements
def read_pass(images, rows: np.ndarray, batch: int, seed: int, segments: int = 1) -> dict:
    """One shuffled pass over ``rows`` in batches (each batch sorted, as the trainer reads)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows)
    nb = math.ceil(len(order) / batch)
    seg_bounds = np.linspace(0, nb, segments + 1).round().astype(int)
    seg_rates, checksum = [], 0.0
    box = images.box
    t_all = time.perf_counter()
    with common.PeakMemory() as mem:
        for s in range(segments):
            t0 = time.perf_counter()
            count = 0
            for bi in range(seg_bounds[s], seg_bounds[s + 1]):
                sel = np.sort(order[bi * batch:(bi + 1) * batch])
                imgs = images.get(sel)
                checksum += float(imgs[:, box // 2, box // 2].sum())
                count += len(sel)
            seg_rates.append(count / max(time.perf_counter() - t0, 1e-9))
    seconds = time.perf_counter() - t_all
    mb = len(order) * box * box * 4 / 2 ** 20
    return {"n": int(len(order)), "seconds": seconds, "images_per_s": len(order) / seconds, "MB_per_s": mb / seconds,
            "segment_images_per_s": seg_rates, "peak_rss_mb": mem.peak_mb, "peak_anon_mb": mem.peak_anon_mb,
            "checksum": checksum}


def synthetic_gmm(box: int, apix: float, n_gauss: int, seed: int = 0):
    from scipion_gmmhet.engine.model.gmm import GMM
    rng = np.random.default_rng(seed)
    r = 0.3 * box * apix
    u = rng.normal(size=(n_gauss, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = u * r * rng.uniform(0, 1, (n_gauss, 1)) ** (1 / 3)
    return GMM(c, np.full(n_gauss, 1.0), np.full(n_gauss, max(1.5 * apix, 2.0)), box, apix,
               {"resolution_A": str(max(3 * apix, 8.0))})


def train_path(star: str, n_gauss: int, batch: int, n_batches: int, positions: list, seed: int = 0) -> dict:
    """The training data path (on-the-fly features + one optimiser step per batch, as train.py)
    for ``n_batches`` batches at each of ``positions`` (fractions of the set)."""
    import torch
    from scipion_gmmhet.engine.io.data import Particles
    from scipion_gmmhet.engine.training import config as C, train as T
    from scipion_gmmhet.engine.training.features import GradientFeatures, feature_param_types
    from scipion_gmmhet.engine.model.fourier import RingBinner
    from scipion_gmmhet.engine.model.networks import HetModel

    out = {"n_gauss": n_gauss, "batch": batch, "batches_per_position": n_batches}
    with common.PeakMemory() as mem:
        t0 = time.perf_counter()
        particles = Particles.from_star(star, device="cpu")
        out["from_star_s"] = time.perf_counter() - t0
    out["from_star_peak_rss_mb"], out["from_star_peak_anon_mb"] = mem.peak_mb, mem.peak_anon_mb
    neutral = synthetic_gmm(particles.box, particles.apix, n_gauss, seed)
    cfg = C.TrainConfig()
    lo, hi = C.default_band(neutral, particles.apix, particles.box, cfg.lowres_A, None)
    if hasattr(particles, "crop"):
        particles.crop(hi)
    fbox, fapix = getattr(particles, "fbox", particles.box), getattr(particles, "fapix", particles.apix)
    out.update(band_A=[lo, hi], fbox=fbox)
    binner = RingBinner(fbox, fapix, lo, hi)
    mobile = torch.arange(len(neutral))
    feats = GradientFeatures(neutral, binner, mobile, feature_param_types(cfg.changes), "cpu")
    n = len(particles)
    rng = np.random.default_rng(seed)
    feats.estimate_stats(particles, np.sort(rng.choice(n, size=min(256, n), replace=False)), batch)
    torch.manual_seed(seed)
    c0, a0, s0 = neutral.tensors("cpu")
    model = HetModel(feats.n_features, cfg.zdim, c0, a0, s0, mobile, cfg.changes, 0.1 * neutral.box * neutral.apix,
                     cfg.hidden, cfg.layers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    def step(items):
        ta = time.perf_counter()
        b = particles.batch(items)
        tb = time.perf_counter()
        x = feats(b)
        tc = time.perf_counter()
        loss, _, _ = T._frc_loss(model, binner, x, b, fbox, fapix, cfg.latent_noise, gen, cfg.latent_reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return tb - ta, tc - tb, time.perf_counter() - tc

    step(np.arange(min(n, batch)))  # warm-up (allocator, first-call overheads), not timed
    starts = [min(int(frac * n), max(0, n - n_batches * batch)) for frac in positions]
    times = {i: [] for i in range(len(positions))}
    with common.PeakMemory() as mem:
        # round robin over the positions, so load swings on a shared machine hit all of them alike
        for k in range(n_batches):
            for i, start in enumerate(starts):
                times[i].append(step(np.arange(start + k * batch, min(n, start + (k + 1) * batch))))
    rows = []
    for i, (frac, start) in enumerate(zip(positions, starts)):
        t = np.array(times[i])  # (n_batches, 3): load, features, step
        per_batch = t.sum(1)
        m = n_batches * batch
        rows.append({"position": f"{frac:.0%} (rows {start}-{start + m - 1})", "particles": m,
                     "particles_per_s": batch / float(np.median(per_batch)),
                     "load_s": float(t[:, 0].sum()), "features_s": float(t[:, 1].sum()),
                     "step_s": float(t[:, 2].sum()), "batch_seconds": per_batch.tolist()})
        r = rows[-1]
        log(f"train path at {frac:.0%}: {r['particles_per_s']:.1f} particles/s (median batch; load "
            f"{r['load_s']:.2f} s, features {r['features_s']:.2f} s, step {r['step_s']:.2f} s)")
    out["positions"] = rows
    out["peak_rss_mb"], out["peak_anon_mb"] = mem.peak_mb, mem.peak_anon_mb
    out["n_features"] = feats.n_features
    return out


# ----------------------------------------------------------------------------- report
def report(res: dict) -> str:
    a = res["args"]
    L = ["# Memory and throughput at scale (memory-mapped stack)\n", common.machine_line(res["machine"]) + ".\n",
         f"{res['n']:,} particles, box {a['box']} px ({res['stack_gb']:.2f} GB float32 stack, one file), "
         f"star {res['star_mb']:.0f} MB with {res['star_columns']} particle columns; batch {a['batch']}. "
         + (res.get("scaled_note") or ""), "",
         "Peak memory: `total` = resident set including pages of the memory-mapped stack that were read (page "
         "cache, reclaimable); `anon` = the program's own memory (arrays, tensors, Python objects).\n",
         "## Steps\n"]
    rows = [dict(step="write star (pandas, chunked)", seconds=res["write_star_s"]),
            dict(step="write stack (memmap, chunked)", seconds=res["write_stack_s"])]
    rp = res["read_particles"]
    rows.append(dict(step="metadata.read_particles", seconds=rp["seconds"], rate=rp["rows_per_s"], unit="rows/s",
                     peak=rp["peak_rss_mb"], anon=rp["peak_anon_mb"]))
    rows.append(dict(step="ParticleMetadata.validate", seconds=res["validate"]["seconds"], peak=res["validate"]["peak_rss_mb"],
                     anon=res["validate"]["peak_anon_mb"]))
    rows.append(dict(step="DataFrame held (particles table)", seconds=None, peak=None, anon=res["dataframe_mb"]))
    for r in res["passes"]:
        rows.append(dict(step=f"ParticleImages shuffled pass, {r['n']:,} particles", seconds=r["seconds"],
                         rate=r["images_per_s"], unit=f"images/s ({r['MB_per_s']:.0f} MB/s)", peak=r["peak_rss_mb"],
                         anon=r["peak_anon_mb"]))
    tp = res.get("train_path")
    if tp:
        rows.append(dict(step="data.Particles.from_star (all)", seconds=tp["from_star_s"],
                         peak=tp["from_star_peak_rss_mb"], anon=tp["from_star_peak_anon_mb"]))
        for r in tp["positions"]:
            rows.append(dict(step=f"train path at {r['position']}", seconds=r["load_s"] + r["features_s"] + r["step_s"],
                             rate=r["particles_per_s"], unit=f"particles/s, median batch (load {r['load_s']:.2f} s, features "
                                                              f"{r['features_s']:.2f} s, step {r['step_s']:.2f} s)"))
        rows.append(dict(step="train path, all positions", peak=tp["peak_rss_mb"], anon=tp["peak_anon_mb"]))
    L.append(common.markdown_table(rows, [("step", "step"), ("seconds", "wall s"), ("rate", "rate"), ("unit", "unit"),
                                          ("peak", "peak RSS total MB"), ("anon", "peak RSS anon MB")]))
    full = res["passes"][-1]
    L += ["", "Full shuffled pass, images/s per tenth of the pass: "
          + ", ".join(f"{x:,.0f}" for x in full["segment_images_per_s"]) + ".", ""]
    if tp:
        L.append(f"Train path: synthetic GMM of {tp['n_gauss']} Gaussians ({tp['n_features']} features), Fourier crop "
                 f"to {tp['fbox']} px, band {tp['band_A'][0]:.0f}-{tp['band_A'][1]:.0f} A, "
                 f"{tp['batches_per_position']} batches of {tp['batch']} per position.\n")
    L.append("## Checks\n")
    for c in res["checks"]:
        L.append(f"- {'PASS' if c['ok'] else 'FAIL'}: {c['what']}")
    L += ["", f"Largest peak over the measured steps (writing the files excluded): {res['peak_total_mb']:,.0f} MB total, "
          f"{res['peak_anon_mb']:,.0f} MB anonymous."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--box", type=int, default=24)
    p.add_argument("--apix", type=float, default=6.0)
    p.add_argument("--batch", type=int, default=1024, help="images per read batch (default 1024)")
    p.add_argument("--subsets", default="10000,100000", help="smaller subsets read before the whole set")
    p.add_argument("--train-batches", type=int, default=7,
                   help="training-path batches per position, taken round robin (default 7)")
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--n-gauss", type=int, default=256, help="Gaussians of the synthetic GMM for the train path")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--tolerance", type=float, default=0.5, help="slowest rate must be >= this x the fastest")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for the train path (default 0: torch's default; 1 is much faster on an "
                        "oversubscribed machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(common.SCRATCH, "memory_1m"))
    p.add_argument("--keep", action="store_true", help="keep the scratch files (default: deleted)")
    p.add_argument("--reuse", action="store_true", help="reuse star + stack in --workdir if they match")
    p.add_argument("--out", default=common.RESULTS)
    args = p.parse_args(argv)

    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    res = {"args": vars(args), "machine": common.machine_info(), "checks": []}
    n = args.n
    star_bytes_per_row = 260
    need_gb = lambda k: (k * args.box * args.box * 4 + k * star_bytes_per_row) / 2 ** 30 + 1.0  # noqa: E731
    free = common.disk_free_gb(work)
    stack_path, star_path = os.path.join(work, "particles.mrcs"), os.path.join(work, "particles.star")
    existing = 0.0
    if args.reuse and os.path.exists(stack_path):
        existing = (os.path.getsize(stack_path) + (os.path.getsize(star_path) if os.path.exists(star_path) else 0)) / 2 ** 30
    if need_gb(n) > free + existing:
        n_fit = int((free + existing - 1.0) * 2 ** 30 / (args.box * args.box * 4 + star_bytes_per_row))
        n_new = max(10_000, (n_fit // 10_000) * 10_000)
        res["scaled_note"] = (f"SCALED DOWN: {free:.1f} GB free in {work}, {need_gb(n):.1f} GB needed for {n:,} "
                              f"particles; using {n_new:,}.")
        log(res["scaled_note"])
        n = n_new
    res["n"] = n
    res["disk_free_gb"] = free

    reuse = False
    if args.reuse and os.path.exists(stack_path) and os.path.exists(star_path):
        from scipion_gmmhet.engine.io.mrc import open_stack
        s = open_stack(stack_path)
        reuse = s.shape == (n, args.box, args.box)
        del s
    if reuse:
        log(f"reusing {stack_path} and {star_path}")
        res["write_star_s"] = res["write_stack_s"] = float("nan")
    else:
        log(f"writing {n:,}-particle star and {n * args.box * args.box * 4 / 2 ** 30:.2f} GB stack in {work}")
        t0 = time.perf_counter()
        write_star_fast(star_path, n, args.box, args.apix, "particles.mrcs", args.seed)
        res["write_star_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_stack_chunked(stack_path, n, args.box, args.apix, args.seed)
        res["write_stack_s"] = time.perf_counter() - t0
        log(f"wrote the star in {res['write_star_s']:.1f} s and the stack in {res['write_stack_s']:.1f} s")
    res["stack_gb"] = os.path.getsize(stack_path) / 2 ** 30
    res["star_mb"] = os.path.getsize(star_path) / 2 ** 20

    from scipion_gmmhet.engine.io import data, metadata
    gc.collect()
    with common.PeakMemory() as mem:
        t0 = time.perf_counter()
        meta = metadata.read_particles(star_path)
        dt = time.perf_counter() - t0
    res["read_particles"] = {"seconds": dt, "rows_per_s": len(meta) / dt, "peak_rss_mb": mem.peak_mb,
                             "peak_anon_mb": mem.peak_anon_mb}
    res["star_columns"] = len(meta.particles.columns)
    res["dataframe_mb"] = float(meta.particles.memory_usage(deep=True).sum() / 2 ** 20)
    log(f"read_particles: {dt:.1f} s ({len(meta) / dt:,.0f} rows/s), peak RSS {mem.peak_mb:.0f} MB "
        f"(anon {mem.peak_anon_mb:.0f} MB); DataFrame {res['dataframe_mb']:.0f} MB")
    with common.PeakMemory() as mem:
        t0 = time.perf_counter()
        meta.validate(require_alignment=True, require_ctf=True, check_images=True)
        dt = time.perf_counter() - t0
    res["validate"] = {"seconds": dt, "peak_rss_mb": mem.peak_mb, "peak_anon_mb": mem.peak_anon_mb}
    log(f"validate: {dt:.1f} s, peak RSS {mem.peak_mb:.0f} MB")

    images = data.ParticleImages(meta)
    passes = []
    for k in [int(s) for s in args.subsets.split(",") if s.strip()] + [n]:
        if k > n or (passes and k == passes[-1]["n"]):
            continue
        r = read_pass(images, np.arange(k), args.batch, args.seed, segments=10 if k == n else 1)
        passes.append(r)
        log(f"shuffled pass over {k:,}: {r['images_per_s']:,.0f} images/s ({r['MB_per_s']:.0f} MB/s), peak RSS "
            f"{r['peak_rss_mb']:.0f} MB (anon {r['peak_anon_mb']:.0f} MB)")
    res["passes"] = passes
    del images
    gc.collect()

    if not args.skip_train:
        try:
            res["train_path"] = train_path(star_path, args.n_gauss, args.train_batch_size, args.train_batches,
                                           [0.0, 0.5, 1.0], args.seed)
        except Exception as exc:  # engine API moved: report it, keep the I/O results
            import traceback
            res["train_path_error"] = traceback.format_exc()
            log(f"train path failed: {type(exc).__name__}: {exc}")

    # checks
    peak_total = max([res["read_particles"]["peak_rss_mb"], res["validate"]["peak_rss_mb"]]
                     + [r["peak_rss_mb"] for r in passes]
                     + ([res["train_path"]["peak_rss_mb"], res["train_path"]["from_star_peak_rss_mb"]]
                        if "train_path" in res else []))
    peak_anon = max([res["read_particles"]["peak_anon_mb"], res["validate"]["peak_anon_mb"]]
                    + [r["peak_anon_mb"] for r in passes]
                    + ([res["train_path"]["peak_anon_mb"], res["train_path"]["from_star_peak_anon_mb"]]
                       if "train_path" in res else []))
    res["peak_total_mb"], res["peak_anon_mb"] = peak_total, peak_anon
    res["checks"].append({"what": f"peak RSS (total, incl. stack page cache) {peak_total:,.0f} MB < 4096 MB",
                          "ok": peak_total < 4096})
    res["checks"].append({"what": f"peak RSS (anonymous) {peak_anon:,.0f} MB < 4096 MB", "ok": peak_anon < 4096})
    rates = [r["images_per_s"] for r in passes]
    res["checks"].append({"what": "read rate does not fall with dataset size: "
                          + " / ".join(f"{r['n']:,}: {r['images_per_s']:,.0f}" for r in passes) + " images/s",
                          "ok": min(rates[-1:]) >= args.tolerance * max(rates)})
    seg = passes[-1]["segment_images_per_s"]
    res["checks"].append({"what": f"read rate does not fall along the full pass: last tenth {seg[-1]:,.0f} vs first "
                          f"tenth {seg[0]:,.0f} images/s (slowest {min(seg):,.0f}, fastest {max(seg):,.0f}; early "
                          "batches pay the first-touch page faults of the memory map)",
                          "ok": seg[-1] >= args.tolerance * seg[0]})
    if "train_path" in res:
        tr = [r["particles_per_s"] for r in res["train_path"]["positions"]]
        res["checks"].append({"what": "train path rate at start / middle / end: "
                              + " / ".join(f"{x:.1f}" for x in tr) + " particles/s",
                              "ok": min(tr) >= args.tolerance * max(tr)})
    elif "train_path_error" in res:
        res["checks"].append({"what": "train path: " + res["train_path_error"].strip().splitlines()[-1], "ok": False})

    md = report(res)
    print()
    print(md)
    common.write_results("memory_1m", md, res, args.out)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        log(f"deleted {work}")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
