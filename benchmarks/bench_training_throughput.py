"""Training throughput, GMM projection throughput and peak memory at box 64/128 x 1024/2048 Gaussians.

Plain Python; prints a table and writes ``benchmarks/results/training_throughput.md`` and ``.json``.

For each configuration (box, number of Gaussians) the script makes a synthetic GMM (Gaussians
spread through a sphere of 0.3 box edges, widths 1.5 px) and ``--n`` particles in memory
(``data.ArrayImages``: projections of that GMM at random poses with a RELION CTF, plus noise,
SNR ~0.1), then runs the engine's own training loop, ``train.train`` with default settings
(batch 64, zdim 4, 3 x 512 hidden layers, default band and Fourier crop) for ``--epochs`` epochs
with cached features, and reads its timings:

- gradient features/s: the encoder's inputs (one batched backward pass per batch), from the
  feature-cache build (``train`` logs it);
- epoch particles/s with the features cached (what every epoch after the first costs);
- first epoch including the gradient inputs: particles / (feature cache + epoch) seconds.
  The feature statistics (a seeded sample of up to 1000 particles, computed once per run) are
  reported on their own: on a real data set they are a fixed cost, here they would weigh as
  much as the epoch itself;
- peak host RSS of the run (and peak GPU memory allocated on CUDA).

The training loop is exactly the one ``gmmhet train`` runs, so a bounded number of particles
(``--n``, default 512 = 8 batches per epoch) gives the per-particle rate of a full data set;
say so when quoting it. Projection throughput: ``gmm.project`` forward on a batch of 256 poses
with CTF at the cropped training grid and at the full box, projections/s and the achieved GFLOP/s
of its complex batched matrix product (8 real FLOP per complex multiply-add, ``B x H x N x W``).

Training modes (``--modes``, comma list, default ``fp32``): for each configuration the real
training loop runs once per mode, one after the other in the same process on the same particles
and with the same seed (so the losses are comparable), with the ``TrainConfig`` fields of the
engine's GPU path (see the ``train`` module docstring):

- ``fp32``: ``amp="off"``, no compile (the defaults; always run, it is the reference and the
  row of the "Training" table);
- ``bf16``: ``amp="bf16"`` (autocast of the encoder/decoder MLPs; projection, FRC, loss float32);
- ``fp16``: ``amp="fp16"`` with loss scaling; CUDA only (on the CPU the row says "CUDA only");
- ``compile``: ``compile=True`` (``torch.compile`` of the MLPs), ``amp="off"``;
- ``compile+bf16``: both;
- ``noprefetch``: ``prefetch=False`` (batches read on the training thread).

Per mode: epoch particles/s with cached features (median over epochs 2.. when ``--epochs`` >= 2,
since epoch 1 of a compiled run also builds the graphs of the training/validation shapes; the
first epoch has its own column), its ratio to fp32 in the same run, the final train loss (mean
-FRC + latent regulariser of the last epoch) and ``|loss - fp32 loss|`` (how far the precision
moves the FRC loss after that many epochs: per-step rounding plus the drift of the optimisation
it causes; ``noprefetch`` must give 0, it is bit-identical), and whether ``torch.compile``
really happened: "yes" when ``train`` logged "--compile: encoder and decoder MLPs compiled",
"fallback" when it logged its warning and trained eagerly (captured by this script's log
handler; "compile s" is the time from the feature cache to that message, mostly the trial
compile; with a warm on-disk inductor cache, from an earlier run, it is much shorter). Each
compile mode starts from ``torch._dynamo.reset()``. With more than one mode an untimed fp32
warm-up (one epoch on up to 256 other particles) runs first: without it whichever mode ran
first was ~5-15% slower on the CPU (the process's first training). The modes run in sequence
on one machine: on a shared CPU, ratios within ~10% are noise (rerun, or raise ``--n`` so that
an epoch lasts seconds, to confirm).

On CUDA only (``--device cuda``) there is also a micro-benchmark of the projection + FRC alone:
bf16/fp16 autocast vs fp32 (time and the largest change of the per-particle FRC) and
``torch.compile`` on/off; on the CPU that section says "GPU only".

    python benchmarks/bench_training_throughput.py                  # 4 configurations, CPU (~10 min on 2 loaded cores)
    python benchmarks/bench_training_throughput.py --quick          # box 64 x 1024 Gaussians, 128 particles
    python benchmarks/bench_training_throughput.py --threads 1 --name training_throughput_1thread  # shared CPUs
    python benchmarks/bench_training_throughput.py --device cuda --n 20000 --epochs 2
    # precision / compile / prefetch modes of the training loop, side by side (CPU, shared cores):
    python benchmarks/bench_training_throughput.py --threads 1 --boxes 64 --gaussians 1024 --n 256 --epochs 2 \
        --modes fp32,bf16,compile,compile+bf16,noprefetch --name training_modes_cpu

GPU measurement of the modes (on a CUDA machine; writes ``results/training_modes_gpu.md``):

    python benchmarks/bench_training_throughput.py --device cuda --n 20000 --epochs 2 --boxes 128 \
        --gaussians 2048 --modes fp32,bf16,fp16,compile,compile+bf16 --name training_modes_gpu
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

from scipion_gmmhet.engine import device as dev_mod  # noqa: E402
from scipion_gmmhet.engine.training import config as C, train as T  # noqa: E402
from scipion_gmmhet.engine.conventions import ctf_2d, euler_to_matrix, fourier_to_image, fourier_grid  # noqa: E402
from scipion_gmmhet.engine.io.data import ArrayImages, Particles  # noqa: E402
from scipion_gmmhet.engine.model.fourier import RingBinner  # noqa: E402
from scipion_gmmhet.engine.model.gmm import GMM, project  # noqa: E402

PHYSICAL_BOX_A = 192.0  # box 64 at 3 A/px, box 128 at 1.5 A/px: same molecule, finer sampling


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []
        self.times = []

    def emit(self, record):
        self.lines.append(record.getMessage())
        self.times.append(record.created)


# --modes: name -> (TrainConfig fields, description); see the module docstring
MODES = {
    "fp32": ({"amp": "off", "compile": False, "prefetch": True}, "amp off, eager (defaults)"),
    "bf16": ({"amp": "bf16"}, "autocast bf16 MLPs"),
    "fp16": ({"amp": "fp16"}, "autocast fp16 MLPs + loss scaling"),
    "compile": ({"compile": True}, "torch.compile MLPs, amp off"),
    "compile+bf16": ({"compile": True, "amp": "bf16"}, "torch.compile + bf16"),
    "noprefetch": ({"prefetch": False}, "prefetch off"),
}
COMPILED_MSG = "--compile: encoder and decoder MLPs compiled"
COMPILE_FAILED_MSG = "--compile: torch.compile failed"


def parse_modes(text: str) -> list:
    """``--modes`` -> list of mode names (order kept, duplicates dropped); fp32 is added first
    when missing (it is the reference of the ratios and loss differences)."""
    modes = []
    for m in (x.strip().lower() for x in str(text or "fp32").split(",")):
        if not m:
            continue
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; give a comma list of {', '.join(MODES)}")
        if m not in modes:
            modes.append(m)
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    return modes


def synthetic_gmm(box: int, apix: float, n_gauss: int, seed: int = 0) -> GMM:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_gauss, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = u * 0.3 * box * apix * rng.uniform(0, 1, (n_gauss, 1)) ** (1 / 3)
    return GMM(c, rng.uniform(0.5, 1.5, n_gauss), np.full(n_gauss, 1.5 * apix), box, apix)


def synthetic_particles(neutral: GMM, n: int, device, seed: int = 0, snr: float = 0.1, chunk: int = 64):
    """Noisy CTF-modulated projections of ``neutral`` at random poses -> (Particles, params)."""
    rng = np.random.default_rng(seed + 1)
    box, apix = neutral.box, neutral.apix
    e = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)], 1)
    R = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2]).astype(np.float32)
    origins = rng.uniform(-2, 2, (n, 2)).astype(np.float32) * apix
    du = rng.uniform(8000, 25000, n)
    ctf = {"defocus_u_A": du, "defocus_v_A": du - rng.uniform(0, 400, n), "defocus_angle_deg": rng.uniform(0, 180, n),
           "voltage_kv": np.full(n, 300.0), "cs_mm": np.full(n, 2.7), "amplitude_contrast": np.full(n, 0.1),
           "phase_shift_deg": np.zeros(n), "bfactor": np.zeros(n), "scale": np.ones(n)}
    c, a, s = neutral.tensors()
    ky, kx = fourier_grid(box, apix, rfft=True)
    images = np.empty((n, box, box), np.float32)
    with torch.no_grad():
        for i in range(0, n, chunk):
            j = slice(i, min(n, i + chunk))
            C = ctf_2d(ky, kx, *(torch.as_tensor(ctf[k][j], dtype=torch.float32) for k in
                                 ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kv", "cs_mm",
                                  "amplitude_contrast")))
            F = project(c, a, s, torch.as_tensor(R[j]), box, apix, torch.as_tensor(origins[j]), C)
            images[j] = fourier_to_image(F, box).numpy()
    sig = float(images[: min(n, 256)].var())
    images += rng.normal(0, math.sqrt(sig / snr), images.shape).astype(np.float32)
    return Particles(ArrayImages(images), R, origins, box, apix, ctf=ctf, ctf_mode="full", device=device)


def _parse(lines):
    out = {}
    for line in lines:
        m = re.search(r"feature statistics from (\d+) particles in ([\d.]+) s", line)
        if m:
            out["stats_n"], out["stats_s"] = int(m.group(1)), float(m.group(2))
        m = re.search(r"gradient features of (\d+) items cached in \S+ \(([\d.]+) s", line)
        if m:
            out["cache_n"], out["cache_s"] = int(m.group(1)), float(m.group(2))
        m = re.search(r"Fourier crop (\d+) -> (\d+) px", line)
        if m:
            out["fbox"] = int(m.group(2))
        m = re.search(r"(\d+) features, band ([\d.]+)-([\d.]+) A", line)
        if m:
            out["n_features"], out["band_A"] = int(m.group(1)), f"{float(m.group(2)):.0f}-{float(m.group(3)):.1f}"
    return out


def _train_once(particles, neutral, cfg, device):
    """One run of ``train.train`` in a temporary directory, with the train logger captured:
    (summary, capture, wall seconds, PeakMemory)."""
    cap = _Capture()
    lg = logging.getLogger("scipion_gmmhet.engine.training.train")
    lg.addHandler(cap)
    old_level = lg.level
    lg.setLevel(logging.INFO)
    out_dir = tempfile.mkdtemp(prefix="gmmhet_tp_")
    try:
        with common.PeakMemory(device) as mem:
            t0 = time.perf_counter()
            summary = T.train(particles, neutral, cfg, out_dir)
            wall = time.perf_counter() - t0
    finally:
        lg.removeHandler(cap)
        lg.setLevel(old_level)
        shutil.rmtree(out_dir, ignore_errors=True)
    return summary, cap, wall, mem


def _compile_status(cap: _Capture, requested: bool):
    """("yes" | "fallback" | "not logged" | "-", message, seconds from the feature cache to the message)."""
    if not requested:
        return "-", None, None
    for i, line in enumerate(cap.lines):
        if line.startswith(COMPILED_MSG) or line.startswith(COMPILE_FAILED_MSG):
            prev = [j for j in range(i) if "gradient features of" in cap.lines[j] or "feature statistics" in
                    cap.lines[j]]
            dt = cap.times[i] - cap.times[prev[-1]] if prev else None
            return ("yes" if line.startswith(COMPILED_MSG) else "fallback"), line, dt
    return "not logged", None, None


def _mode_row(box, n_gauss, mode, summary, cap, wall, mem, n_train, cfg_fields) -> dict:
    hist = summary["history"]
    secs = [h["seconds"] for h in hist]
    steady = secs[1:] if len(secs) >= 2 else secs
    epoch_s = float(np.median(steady))
    compiled, msg, compile_s = _compile_status(cap, bool(cfg_fields.get("compile")))
    info = _parse(cap.lines)
    return {"box": box, "n_gauss": n_gauss, "mode": mode, "status": "ok", "settings": MODES[mode][1],
            "amp": summary["config"].get("amp"), "compile": bool(summary["config"].get("compile")),
            "prefetch": bool(summary["config"].get("prefetch", True)),
            "epoch_seconds": secs, "epoch_s": epoch_s, "epoch_rate": n_train / epoch_s,
            "first_epoch_rate": n_train / secs[0], "train_loss": hist[-1]["train_loss"],
            "val_loss": hist[-1]["val_loss"], "train_loss_history": [h["train_loss"] for h in hist],
            "compiled": compiled, "compiled_summary": summary.get("compiled"), "compile_message": msg,
            "compile_s": compile_s, "train_wall_s": wall, "cache_s": info.get("cache_s"),
            "peak_rss_mb": mem.peak_mb, "gpu_peak_mb": mem.gpu_peak_mb}


def bench_training(box, n_gauss, n, epochs, device, seed, highres, modes=("fp32",)):
    """Train once per mode (same particles, same seed). Returns (the fp32 run's row, the mode
    rows, particles, neutral)."""
    apix = PHYSICAL_BOX_A / box
    neutral = synthetic_gmm(box, apix, n_gauss, seed)
    t0 = time.perf_counter()
    particles = synthetic_particles(neutral, n, device, seed)
    t_data = time.perf_counter() - t0
    n_train = len(C.split_items(n, 1, C.TrainConfig().val_fraction, seed)[0])
    if len(modes) > 1:
        # untimed warm-up (one fp32 epoch on a few batches): otherwise whichever mode runs first also pays
        # for the process's first training (allocator growth, kernel selection, lazy initialisation)
        t0 = time.perf_counter()
        warm = synthetic_particles(neutral, min(n, 256), device, seed + 17)
        _train_once(warm, neutral, C.TrainConfig(epochs=1, seed=seed, highres_A=highres, features="cache"), device)
        del warm
        log(f"  warm-up training (untimed): {time.perf_counter() - t0:.1f} s")
    r, rows = None, []
    for mode in modes:
        fields = MODES[mode][0]
        if fields.get("amp") == "fp16" and device.type != "cuda":
            rows.append({"box": box, "n_gauss": n_gauss, "mode": mode, "status": "CUDA only",
                         "settings": MODES[mode][1]})
            log(f"  mode {mode}: CUDA only, skipped on {device}")
            continue
        cfg = C.TrainConfig(epochs=epochs, seed=seed, highres_A=highres, features="cache", **fields)
        if fields.get("compile"):
            torch._dynamo.reset()  # each compile mode builds its own graphs (and pays for them)
        try:
            summary, cap, wall, mem = _train_once(particles, neutral, cfg, device)
        except Exception as exc:  # noqa: BLE001 - one mode failing must not lose the others
            if mode == "fp32":
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            rows.append({"box": box, "n_gauss": n_gauss, "mode": mode, "status": f"error: {type(exc).__name__}: "
                         f"{first}", "settings": MODES[mode][1]})
            log(f"  mode {mode}: FAILED {type(exc).__name__}: {first}")
            continue
        row = _mode_row(box, n_gauss, mode, summary, cap, wall, mem, n_train, fields)
        rows.append(row)
        log(f"  mode {mode}: epoch {row['epoch_rate']:.1f} particles/s (epochs {', '.join(f'{x:.2f}' for x in row['epoch_seconds'])} s), "
            f"train loss {row['train_loss']:.6f}, compiled {row['compiled']}")
        if mode == "fp32":
            info = _parse(cap.lines)
            hist = summary["history"]
            epoch_s = float(np.median([h["seconds"] for h in hist]))
            r = {"box": box, "apix": apix, "n_gauss": n_gauss, "particles": n, "epochs": epochs, "data_s": t_data,
                 "train_wall_s": wall, "epoch_s": epoch_s, "epoch_rate": n_train / epoch_s,
                 "features_rate": info.get("cache_n", n) / info["cache_s"] if info.get("cache_s") else float("nan"),
                 "stats_s": info.get("stats_s"), "cache_s": info.get("cache_s"), "fbox": info.get("fbox", box),
                 "n_features": info.get("n_features"), "band_A": info.get("band_A"),
                 "peak_rss_mb": mem.peak_mb, "peak_anon_mb": mem.peak_anon_mb, "gpu_peak_mb": mem.gpu_peak_mb}
            if r["cache_s"]:
                r["first_epoch_rate"] = n / (r["cache_s"] + n / r["epoch_rate"])
    ref = next(x for x in rows if x["mode"] == "fp32")
    for x in rows:
        if x["status"] == "ok":
            x["ratio_vs_fp32"] = x["epoch_rate"] / ref["epoch_rate"]
            x["loss_diff_vs_fp32"] = abs(x["train_loss"] - ref["train_loss"])
            x["val_loss_diff_vs_fp32"] = abs(x["val_loss"] - ref["val_loss"])
    return r, rows, particles, neutral


def bench_projection(neutral: GMM, particles: Particles, device, B: int = 256, repeats: int = 3):
    """gmm.project forward, B poses with CTF, at the full box and at the training (cropped) grid."""
    rows = []
    c, a, s = neutral.tensors(device)
    idx = np.arange(min(B, len(particles)))
    if len(idx) < B:
        idx = np.resize(idx, B)
    full_box = particles.box
    for label, fbox in (("full box", full_box), ("training grid (cropped)", getattr(particles, "fbox", full_box))):
        apix = full_box * particles.apix / fbox
        ky, kx = fourier_grid(fbox, apix, rfft=True, device=device)
        rows_t = torch.as_tensor(idx, device=device)
        R = particles.rotations[rows_t]
        o = particles.origins_A[rows_t]
        p = {k: v[rows_t] for k, v in particles.ctf.items()} if particles.ctf else {}
        C = ctf_2d(ky, kx, **p) if p else None
        with torch.no_grad():
            t = common.median_time(lambda: project(c, a, s, R, fbox, apix, o, C), device, repeats=repeats,
                                   min_seconds=0.5)
        H, W, N = fbox, fbox // 2 + 1, len(neutral)
        gflop = 8.0 * B * H * N * W / 1e9
        rows.append({"box": full_box, "n_gauss": N, "grid": f"{label} {fbox} px", "batch": B, "seconds": t,
                     "proj_per_s": B / t, "bmm_gflops": gflop / t})
    return rows


def gpu_extras(particles: Particles, neutral: GMM, device, B: int = 256) -> dict:
    """CUDA only: autocast (bf16, fp16) vs fp32 FRC accuracy and time; torch.compile on/off."""
    out = {}
    box, apix = getattr(particles, "fbox", particles.box), getattr(particles, "fapix", particles.apix)
    lo, hi = C.default_band(neutral, particles.apix, particles.box, 100.0, None)
    binner = RingBinner(box, apix, lo, hi, device=device)
    b = particles.batch(np.resize(np.arange(len(particles)), B))
    c, a, s = neutral.tensors(device)

    def frc_fn():
        return binner.mean_frc(project(c, a, s, b.rotations, box, apix, b.origins_A, b.ctf), b.F_img)

    with torch.no_grad():
        ref = frc_fn()
        out["fp32_s"] = common.median_time(frc_fn, device, repeats=5, min_seconds=0.5)
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            try:
                def f():
                    with torch.autocast("cuda", dtype=dt):
                        return frc_fn()
                val = f().float()
                out[f"{name}_s"] = common.median_time(f, device, repeats=5, min_seconds=0.5)
                out[f"{name}_max_frc_diff"] = float((val - ref).abs().max())
            except Exception as exc:
                out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        try:
            cf = torch.compile(frc_fn)
            t0 = time.perf_counter()
            cf()
            common.sync(device)
            out["compile_first_call_s"] = time.perf_counter() - t0
            out["compiled_s"] = common.median_time(cf, device, repeats=5, min_seconds=0.5)
            out["compiled_max_frc_diff"] = float((cf() - ref).abs().max())
        except Exception as exc:
            out["compile_error"] = f"{type(exc).__name__}: {exc}"
    return out


def report(res) -> str:
    L = ["# Training and projection throughput\n", common.machine_line(res["machine"]) + f"; device {res['device']}.\n",
         f"Engine training loop (`train.train`, default settings, cached gradient features) on {res['n']} synthetic "
         f"particles per configuration ({res['epochs']} epoch(s); a bounded number of batches, the per-particle rate "
         f"is that of a full data set); physical box {PHYSICAL_BOX_A:.0f} A (box 64 at 3 A/px, box 128 at 1.5 A/px); "
         "the trainer crops images in Fourier space to its band (`fbox`).\n", "## Training\n"]
    L.append(common.markdown_table(res["training"], [
        ("box", "box"), ("n_gauss", "Gaussians"), ("fbox", "fbox"), ("n_features", "features"),
        ("features_rate", "gradient features/s"), ("epoch_rate", "epoch particles/s (features cached)"),
        ("first_epoch_rate", "1st epoch particles/s incl. gradient inputs"), ("stats_s", "feature stats s (once)"),
        ("peak_rss_mb", "peak RSS MB"), ("peak_anon_mb", "peak anon MB"), ("gpu_peak_mb", "peak GPU MB")]))
    L += ["", "## GMM projection (`gmm.project`, forward, with CTF and shifts)\n"]
    L.append(common.markdown_table(res["projection"], [("box", "box"), ("n_gauss", "Gaussians"), ("grid", "grid"),
                                                       ("batch", "batch"), ("proj_per_s", "projections/s"),
                                                       ("bmm_gflops", "complex bmm GFLOP/s")]))
    if res.get("modes"):
        L += ["", "## Training modes: precision, torch.compile, prefetch (same run, same seed)\n",
              f"Each mode trains the same {res['n']} particles from the same seed for {res['epochs']} epoch(s), "
              "one after the other in this process, after an untimed fp32 warm-up. epoch particles/s: features cached, median over epochs 2.. "
              "(epoch 1 when only one); x fp32: ratio to the fp32 row of the same configuration; |d loss|: "
              "|final train loss - fp32's| (FRC loss moved by the precision over the whole run); compiled: "
              "from the train log (yes = compiled, fallback = warning logged and trained eagerly); compile s: "
              "feature cache to the compile message (mostly the trial compile).\n"]
        rows = []
        for x in res["modes"]:
            y = dict(x)
            if x["status"] == "ok":
                y["train_loss"] = f"{x['train_loss']:.6f}"
                d = x["loss_diff_vs_fp32"]
                y["loss_diff_vs_fp32"] = "0" if d == 0 else f"{d:.1e}"
                y["ratio_vs_fp32"] = f"{x['ratio_vs_fp32']:.2f}"
            rows.append(y)
        L.append(common.markdown_table(rows, [
            ("box", "box"), ("n_gauss", "Gaussians"), ("mode", "mode"), ("settings", "settings"),
            ("status", "status"), ("epoch_rate", "epoch particles/s (features cached)"),
            ("ratio_vs_fp32", "x fp32"), ("first_epoch_rate", "1st epoch particles/s"),
            ("train_loss", "final train loss"), ("loss_diff_vs_fp32", "abs d loss vs fp32"),
            ("compiled", "compiled"), ("compile_s", "compile s"), ("gpu_peak_mb", "peak GPU MB")]))
        msgs = sorted({x["compile_message"] for x in res["modes"] if x.get("compile_message")})
        if msgs:
            L += ["", "Compile messages from the train log: " + "; ".join(f"`{m}`" for m in msgs)]
    L += ["", "## Mixed precision and torch.compile\n"]
    if res["device"].startswith("cuda"):
        rows = [dict(config=f"box {k}", **v) for k, v in res["gpu_extras"].items()]
        cols = sorted({c for r in rows for c in r if c != "config"})
        L.append(common.markdown_table(rows, [("config", "config")] + [(c, c) for c in cols]))
    elif res.get("modes"):
        L.append("GPU only: the projection + FRC micro-benchmark (bf16/fp16 autocast vs fp32 FRC accuracy and speed, "
                 "torch.compile on/off) runs with `--device cuda`; the training loop's modes on this CPU are in the "
                 "table above.")
    else:
        L.append("GPU only: bf16/fp16 autocast vs fp32 (FRC accuracy and speed) and torch.compile on/off are measured "
                 "with `--device cuda`; on this CPU run only fp32 eager numbers are reported.")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--quick", action="store_true", help="box 64 x 1024 Gaussians only, 128 particles")
    p.add_argument("--n", type=int, default=None, help="particles per configuration (default 512; quick 128)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--boxes", default="64,128")
    p.add_argument("--gaussians", default="1024,2048")
    p.add_argument("--highres", type=float, default=None, help="training band limit, A (default: the trainer's)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: torch's default, one per core); on an oversubscribed "
                        "machine 1 can be many times faster")
    p.add_argument("--modes", default="fp32",
                   help="comma list of training modes run side by side per configuration (same seed): "
                        + ", ".join(MODES) + " (default fp32: the plain benchmark; fp16 is CUDA only)")
    p.add_argument("--name", default="training_throughput", help="results file name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=common.RESULTS)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = dev_mod.resolve_device(args.device)
    n = args.n or (128 if args.quick else 512)
    configs = [(64, 1024)] if args.quick else [(int(b), int(g)) for b in args.boxes.split(",") for g in
                                                args.gaussians.split(",")]
    modes = parse_modes(args.modes)
    res = {"machine": common.machine_info(), "device": str(device), "n": n, "epochs": args.epochs,
           "training": [], "projection": [], "gpu_extras": {}}
    if modes != ["fp32"]:
        res["mode_list"], res["modes"] = modes, []
        res["command"] = "python benchmarks/bench_training_throughput.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
    for box, ng in configs:
        log(f"box {box}, {ng} Gaussians, {n} particles on {device}, modes {','.join(modes)} ...")
        r, rows, particles, neutral = bench_training(box, ng, n, args.epochs, device, args.seed, args.highres, modes)
        res["training"].append(r)
        if "modes" in res:
            res["modes"] += rows
        log(f"  features {r['features_rate']:.1f}/s, epoch {r['epoch_rate']:.1f} particles/s, first epoch incl. "
            f"features {r.get('first_epoch_rate', float('nan')):.1f}/s (fbox {r['fbox']}), peak RSS {r['peak_rss_mb']:.0f} MB")
        res["projection"] += bench_projection(neutral, particles, device)
        log("  projection: " + ", ".join(f"{x['grid']}: {x['proj_per_s']:,.0f}/s" for x in res["projection"][-2:]))
        if device.type == "cuda":
            res["gpu_extras"][f"{box}x{ng}"] = gpu_extras(particles, neutral, device)
        del particles
    md = report(res)
    print()
    print(md)
    common.write_results(args.name, md, res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
