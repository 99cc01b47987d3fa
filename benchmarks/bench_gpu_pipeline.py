"""The whole GPU pipeline from disk, one command: simulate -> build -> train (3 epochs) -> table.

Plain Python; prints a table and writes ``benchmarks/results/<name>.md`` and ``.json``.

1. ``gmmhet simulate --kind conformational --n N --box 128 --apix 1.5 --device DEV`` writes the
   stack to disk (projected on the GPU when there; default N = 100,000: 6.6 GB at box 128).
2. ``gmmhet build --n-gauss 2048`` on the simulation's consensus map.
3. ``gmmhet train --epochs 3 --device DEV`` (through the CLI's ``main``, in a child process that
   also reports torch's peak GPU memory): particles/s of every epoch from ``loss.csv`` (training
   particles / epoch seconds, validation included in the seconds) and of the first epoch
   INCLUDING the gradient inputs (all particles / (feature statistics + feature cache + epoch 1)
   seconds, from the log). |Spearman| of latent PC1 against the true conformation.
4. Time breakdown per particle, measured in this process on the same stack, model and batch size
   (each stage synchronised on its own, so the parts do not add up to the overlapped epoch):
   ``read`` (:class:`io.loader.BatchLoader`, block-shuffled contiguous reads, reader threads;
   and the old random-order ``Particles.read`` for comparison), ``transfer`` (pinned host ->
   device copy; 0 on the CPU), ``features`` (gradient features of a batch, FFT + crop included),
   ``step`` (forward, backward and Adam step of the trained network on those features).

    python benchmarks/bench_gpu_pipeline.py                       # GPU: 100,000 particles, box 128, 2,048 Gaussians
    python benchmarks/bench_gpu_pipeline.py --n 2000 --device cpu # small CPU check (a few minutes on 2 cores)
    python benchmarks/bench_gpu_pipeline.py --batch-size 1024 --train-args "--amp bf16"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402
from bench_vs_cryodrgn import parse_our_log  # noqa: E402

OUR = [sys.executable, "-m", "scipion_gmmhet.engine"]
_TRAIN_CHILD = r"""
import json, sys, torch
from scipion_gmmhet.engine.cli import main
rc = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
print("GPU_PEAK_MB " + json.dumps(peak))
sys.exit(rc)
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, log_path, what) -> dict:
    log(what + ": " + " ".join(map(str, cmd[2:] if cmd[1] == "-m" else cmd[3:])))
    r = common.run_timed(cmd, log_path)
    if r["rc"] != 0:
        raise RuntimeError(f"{what} failed (rc {r['rc']}); log {log_path}:\n{common.tail(log_path)}")
    log(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    return r


def spearman_pc1(z: np.ndarray, truth: np.ndarray) -> float:
    from scipy.stats import spearmanr
    zc = z - z.mean(0)
    pc1 = zc @ np.linalg.svd(zc, full_matrices=False)[2][0]
    return abs(float(spearmanr(pc1, truth).correlation))


def breakdown(star: str, train_dir: str, device: str, batch_size: int, max_particles: int, threads: int) -> dict:
    """Per-particle seconds of read / transfer / features / step (module docstring, item 4)."""
    import torch
    from scipion_gmmhet.engine.io import loader
    from scipion_gmmhet.engine.model.fourier import RingBinner
    from scipion_gmmhet.engine.model.gmm import project
    from scipion_gmmhet.engine.io.data import Particles
    from scipion_gmmhet.engine.training.features import GradientFeatures, feature_param_types
    from scipion_gmmhet.engine.training.trained import load_trained

    dev = torch.device(device)
    tm = load_trained(train_dir, device=dev)
    cfg = tm.config
    particles = Particles.from_star(star, symmetry=cfg.get("symmetry"), ctf_mode=cfg.get("ctf_mode", "auto"),
                                    device=dev)
    particles.crop(cfg["highres_A"])
    binner = RingBinner(particles.fbox, particles.fapix, cfg["lowres_A"], cfg["highres_A"], device=dev)
    feats = GradientFeatures(tm.neutral, binner, torch.as_tensor(tm.mobile), feature_param_types(cfg["changes"]), dev,
                             stats=tm.payload["feature_stats"])
    n = min(len(particles), max_particles)
    order = loader.block_shuffled_order(np.arange(len(particles)), 64, [0, 99])[:n]
    batches = [np.sort(order[i:i + batch_size]) for i in range(0, n, batch_size)]
    rng = np.random.default_rng(1)
    old_batches = [np.sort(b) for b in np.array_split(rng.permutation(len(particles))[:n], len(batches))]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    t = {"read_s": 0.0, "read_old_s": 0.0, "transfer_s": 0.0, "features_s": 0.0, "step_s": 0.0}

    t0 = time.perf_counter()
    for b in old_batches:
        particles.read(b)
    t["read_old_s"] = time.perf_counter() - t0

    model = tm.model
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    xs = []
    t0 = time.perf_counter()
    with loader.BatchLoader(particles, batches, threads=threads, depth=2 * threads) as L:
        for host in L:
            t["read_s"] += time.perf_counter() - t0
            t1 = time.perf_counter()
            img = host.images.to(dev, non_blocking=True)
            sync()
            t["transfer_s"] += time.perf_counter() - t1 if dev.type == "cuda" else 0.0
            L._give_back(host)
            t1 = time.perf_counter()
            b = particles.geometry(torch.as_tensor(host.items, device=dev),
                                   particles.crop_fourier(torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)))))
            x = feats(b)
            sync()
            t["features_s"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            z, (c, a, s) = model(x, float(cfg["latent_noise"]), None)
            F = project(c, a, s, b.rotations, particles.fbox, particles.fapix, b.origins_A, b.ctf)
            loss = -binner.mean_frc(F, b.F_img).mean() + float(cfg["latent_reg"]) * (z * z).sum(1).mean()
            loss.backward()
            opt.step()
            sync()
            t["step_s"] += time.perf_counter() - t1
            xs.append(len(host))
            t0 = time.perf_counter()
    n_done = int(sum(xs))
    out = {"breakdown_particles": n_done, "reader_threads": threads, "fbox": particles.fbox,
           "reader_thread_s": L.read_seconds}
    out.update({k.replace("_s", "_us_per_particle"): 1e6 * v / max(n_done, 1) for k, v in t.items()})
    out["breakdown_gpu_peak_mb"] = common.gpu_peak_mb(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="particles to simulate (default 100000)")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--apix", type=float, default=1.5)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--gaussians", type=int, default=2048)
    p.add_argument("--resolution", type=float, default=6.0, help="gmmhet build target resolution, A (default 6)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=0, help="gmmhet train --batch-size (0: its default)")
    p.add_argument("--train-args", default="", help="extra gmmhet train arguments, quoted")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    p.add_argument("--threads", type=int, default=4, help="reader threads of the breakdown's loader")
    p.add_argument("--breakdown-particles", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(common.SCRATCH, "gpu_pipeline"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (default: deleted at the end)")
    p.add_argument("--name", default=None, help="results name (default gpu_pipeline_<device>_<n>)")
    args = p.parse_args(argv)
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = args.name or f"gpu_pipeline_{device.split(':')[0]}_{args.n}"
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    need_gb = args.n * args.box * args.box * 4 / 2 ** 30 * 1.1 + 0.5
    if common.disk_free_gb(work) < need_gb:
        raise SystemExit(f"--workdir {work}: needs about {need_gb:.1f} GB free for the stack")
    res = {"machine": common.machine_info(), "device": device, "args": vars(args)}
    sim, build, tr = (os.path.join(work, d) for d in ("sim", "build", "train"))
    res["simulate"] = run(OUR + ["simulate", "--kind", "conformational", "--n", str(args.n), "--box", str(args.box),
                                 "--apix", str(args.apix), "--snr", str(args.snr), "--seed", str(args.seed),
                                 "--device", device, "--out", sim], os.path.join(work, "simulate.log"), "simulate")
    res["build"] = run(OUR + ["build", "--map", os.path.join(sim, "consensus.mrc"), "--resolution",
                              str(args.resolution), "--n-gauss", str(args.gaussians), "--device", device, "--out",
                              build], os.path.join(work, "build.log"), "build")
    cmd = [sys.executable, "-c", _TRAIN_CHILD, "train", "--particles", os.path.join(sim, "particles.star"),
           "--gmm", build, "--out", tr, "--epochs", str(args.epochs), "--device", device, "--seed", str(args.seed)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    cmd += shlex.split(args.train_args)
    r = run(cmd, os.path.join(work, "train.log"), "train")
    r.update(parse_our_log(r["log"]))
    text = open(r["log"], errors="replace").read()
    r["gpu_peak_mb"] = json.loads(text.rsplit("GPU_PEAK_MB ", 1)[1].split()[0]) if "GPU_PEAK_MB " in text else None
    full = TrainFolder(tr).read_config()
    tcfg = dict(full.get("train", {}), n_items=full.get("n_items", args.n))
    loss = TrainFolder(tr).read_loss()
    n_items = int(tcfg.get("n_items", args.n))
    n_train = n_items - int(round(float(tcfg.get("val_fraction", 0.05)) * n_items))
    feat_s = r.get("stats_s", 0.0) + r.get("cache_s", 0.0)
    r["epochs"] = [{"epoch": int(e["epoch"]), "seconds": e["seconds"], "particles_per_s": n_train / e["seconds"],
                    "train_loss": e["train_loss"]} for e in loss]
    r["first_epoch_incl_features_per_s"] = n_items / (feat_s + loss[0]["seconds"])
    r["features_per_s"] = n_items / feat_s if feat_s else None
    r["batch_size"] = int(tcfg.get("batch_size", args.batch_size))
    truth = np.genfromtxt(os.path.join(sim, "truth.csv"), delimiter=",", names=True)
    r["spearman_pc1"] = spearman_pc1(TrainFolder(tr).read_latents(), truth["conformation"])
    res["train"] = r
    log("time breakdown (read, transfer, features, step)")
    res["breakdown"] = breakdown(os.path.join(sim, "particles.star"), tr, device, r["batch_size"],
                                 args.breakdown_particles, args.threads)
    md = report(res)
    print(md)
    paths = common.write_results(name, md, res)
    log("wrote " + ", ".join(paths))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(res: dict) -> str:
    a, tr, bd = res["args"], res["train"], res["breakdown"]
    L = [f"# GPU pipeline: simulate -> build -> train from disk ({a['n']} particles, box {a['box']}, "
         f"{a['gaussians']} Gaussians)\n", common.machine_line(res["machine"]) + f"; device {res['device']}.\n",
         f"simulate {res['simulate']['seconds']:.1f} s, build {res['build']['seconds']:.1f} s, train "
         f"{tr['seconds']:.1f} s (batch {tr['batch_size']}, Fourier crop to {tr.get('fbox', '?')} px, "
         f"{tr.get('n_features', '?')} features). |Spearman| latent PC1 vs truth: {tr['spearman_pc1']:.3f}.\n"]
    rows = [{"what": f"epoch {e['epoch']} (features cached)", "rate": e["particles_per_s"], "s": e["seconds"]}
            for e in tr["epochs"]]
    rows.insert(0, {"what": "first epoch incl. gradient inputs", "rate": tr["first_epoch_incl_features_per_s"],
                    "s": tr.get("stats_s", 0) + tr.get("cache_s", 0) + tr["epochs"][0]["seconds"]})
    rows.append({"what": "gradient features (stats + cache)", "rate": tr["features_per_s"],
                 "s": tr.get("stats_s", 0) + tr.get("cache_s", 0)})
    L.append(common.markdown_table(rows, [("what", "stage"), ("rate", "particles/s"), ("s", "seconds")]))
    gpu = tr["gpu_peak_mb"]
    L += ["", f"Peak GPU memory (train): {'n/a (CPU)' if gpu is None else f'{gpu:.0f} MB'}; peak host RSS (train): "
          f"{tr['peak_rss_mb']:.0f} MB.\n",
          f"## Time breakdown (us per particle, {bd['breakdown_particles']} particles, each stage synchronised)\n"]
    L.append(common.markdown_table([{
        "read": bd["read_us_per_particle"], "read_old": bd["read_old_us_per_particle"],
        "transfer": bd["transfer_us_per_particle"], "features": bd["features_us_per_particle"],
        "step": bd["step_us_per_particle"]}], [
        ("read", f"read (loader, {bd['reader_threads']} threads, wait)"), ("read_old", "read (old, random order)"),
        ("transfer", "transfer"), ("features", "features (FFT, crop, gradients)"), ("step", "step (fwd+bwd+Adam)")]))
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
