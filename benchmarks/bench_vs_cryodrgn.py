"""Side-by-side against cryoDRGN ``train_vae``: same simulated particles, same machine, one run.

Plain Python; prints a table and writes ``benchmarks/results/vs_cryodrgn.md`` and ``.json``.

What it does, in order (everything under ``--workdir``, default ``benchmarks/.scratch/vs_cryodrgn``):

1. A separate virtual environment for cryoDRGN (``--venv``, default ``benchmarks/.cryodrgn-venv``,
   git-ignored), made once with ``python -m venv``; torch is installed FIRST from the same spec
   as ours (``torch==<our version>``; a cached CPU wheel where pip's find-links has one, which
   keeps pip from fetching several GB of CUDA packages), then ``cryodrgn==4.3.1`` (the newest
   release; needs Python >= 3.10, torch >= 2, numpy >= 1.25: it resolves with torch 2.13 and
   numpy 2.x inside its own venv).
2. ``gmmhet simulate --kind mixed`` (conformational + compositional truth in ``truth.csv``).
3. CTF sign check: cryoDRGN's ``ctf.compute_ctf`` and our ``conventions.ctf_2d`` evaluated at
   the same frequencies. cryoDRGN's CTF is the negative of RELION's (-w at zero frequency; ours
   is RELION's, +w), and ``train_vae`` inverts the images by default, so its default is right for
   RELION-convention images; the script checks this numerically and passes ``--uninvert-data``
   only if the two CTFs had the same sign.
4. cryoDRGN ``parse_pose_star`` / ``parse_ctf_star`` (``-D box --Apix apix``) on our star, then
   ``train_vae particles.mrcs --zdim K -n 1`` with its default architecture (encoder and decoder
   3 x 1024, resid encoder, Gaussian positional encoding, batch 16), ``--no-analysis
   --checkpoint 0`` (skips the post-training analysis and a second z evaluation). cryoDRGN is
   about 1 particle/s on two loaded cores, so by default it trains on the first
   ``--cryodrgn-particles`` (256) particles (``--ind``); its throughput is per particle, so the
   ratio is unaffected; 0 = all.
5. Ours: ``gmmhet build`` on ``consensus.mrc`` (reported separately: a one-time step cryoDRGN does
   not have) and ``gmmhet train --epochs 1`` on all particles and on the same subset as cryoDRGN.
   Our first-epoch throughput INCLUDES the encoder's gradient inputs: particles / (feature
   statistics + feature cache + epoch) seconds, from the run's log and ``loss.csv``.
6. Latent quality of both, on the particles each trained on and on the shared subset:
   |Spearman| between latent PC1 and the true conformation (and the best over all PCs), and the
   adjusted Rand index of k-means (k = 2) in the latent space against the true composition.
7. Optional ``--more-epochs E``: a fresh ``gmmhet train --epochs E`` on all particles, and
   cryoDRGN given at least the same wall time on its subset (as many whole epochs as fit, at least
   one), then the same quality metrics.

Wall times on a shared machine swing with the load: the table also gives CPU seconds (user +
system of each command, ``os.wait4``) and the load averages; both tools run in this one process
back to back so the ratio is as fair as the machine allows.

    python benchmarks/bench_vs_cryodrgn.py                          # 2000 particles, box 64 (~20 min on 2 loaded cores)
    python benchmarks/bench_vs_cryodrgn.py --n 1000 --cryodrgn-particles 128   # quicker
    python benchmarks/bench_vs_cryodrgn.py --more-epochs 10 --keep  # also an equal-wall-time comparison
    python benchmarks/bench_vs_cryodrgn.py --skip-cryodrgn          # ours only (no venv needed)
    python benchmarks/bench_vs_cryodrgn.py --threads 1 --name vs_cryodrgn_1thread  # both tools on 1 thread
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from scipion_gmmhet.engine.io.outputs import BuildFolder, TrainFolder  # noqa: E402
from scipion_gmmhet.engine.io.safe_pickle import load_array_pickle  # noqa: E402

CRYODRGN_VERSION = "4.3.1"
DEFAULT_VENV = os.path.join(common.HERE, ".cryodrgn-venv")
OUR = [sys.executable, "-m", "scipion_gmmhet.engine"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


THREAD_ENV = None  # set by --threads: OMP/MKL thread counts for BOTH tools' subprocesses


def _run(cmd, log_path, what, timeout_s=None, env=None):
    if env is None and THREAD_ENV is not None:
        env = THREAD_ENV
    load0 = load_now()
    r = common.run_timed(cmd, log_path, env=env, cwd=common.REPO, timeout_s=timeout_s)
    r["load_before"], r["load_after"] = load0, load_now()
    status = "TIMED OUT" if r["timed_out"] else f"rc {r['rc']}"
    log(f"{what}: {status}, {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, peak RSS "
        f"{r['peak_rss_mb']:.0f} MB (load {load0} -> {r['load_after']})")
    if r["rc"] != 0 and not r["timed_out"]:
        raise RuntimeError(f"{what} failed (rc {r['rc']}); last lines of {log_path}:\n{common.tail(log_path, 25)}")
    return r


# ----------------------------------------------------------------------------- cryoDRGN venv
def ensure_venv(venv: str, version: str, workdir: str) -> dict:
    py = os.path.join(venv, "bin", "python")
    import torch
    torch_spec = "torch==" + torch.__version__.split("+")[0]
    info = {"venv": venv, "torch_spec": torch_spec, "cryodrgn_spec": f"cryodrgn=={version}"}
    if not os.path.exists(py):
        log(f"making {venv} (python -m venv), then pip install {torch_spec} and cryodrgn=={version}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        for spec in (torch_spec, f"cryodrgn=={version}"):
            r = common.run_timed([py, "-m", "pip", "install", spec], os.path.join(workdir, "pip_install.log"))
            if r["rc"] != 0:
                raise RuntimeError(f"pip install {spec} failed; see {workdir}/pip_install.log:\n"
                                   f"{common.tail(os.path.join(workdir, 'pip_install.log'))}")
        info["install_seconds"] = round(time.perf_counter() - t0, 1)
    out = subprocess.run([py, "-c", "import cryodrgn, torch, numpy; print(cryodrgn.__version__, torch.__version__, "
                          "numpy.__version__, torch.get_num_threads())"], capture_output=True, text=True, check=True)
    v = out.stdout.split()
    info.update(cryodrgn=v[0], torch=v[1], numpy=v[2], torch_threads=int(v[3]))
    if info["cryodrgn"] != version:
        raise RuntimeError(f"{venv} holds cryodrgn {info['cryodrgn']}, not {version}; delete the venv to rebuild it")
    return info


def venv_python(venv: str, code: str, *args) -> str:
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", code, *map(str, args)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cryoDRGN venv python failed:\n{out.stderr[-3000:]}")
    return out.stdout


_CTF_CHECK = r"""
import json, sys, numpy as np, torch
from cryodrgn.ctf import compute_ctf
p = json.loads(sys.argv[1])
f = torch.tensor(p["freqs"], dtype=torch.float64)  # (n, 2): x, y in 1/A
c = compute_ctf(f, torch.tensor(p["du"]), torch.tensor(p["dv"]), torch.tensor(p["ang"]), torch.tensor(p["kv"]),
                torch.tensor(p["cs"]), torch.tensor(p["w"]))
print(json.dumps(c.numpy().tolist()))
"""


def ctf_sign_check(venv: str) -> dict:
    """Our CTF vs cryoDRGN's at the same (kx, ky): returns the correlation and the decision."""
    import torch
    from scipion_gmmhet.engine.conventions import ctf_2d
    rng = np.random.default_rng(0)
    freqs = np.concatenate([[[0.0, 0.0], [0.01, 0.0], [0.0, 0.01]], rng.uniform(-0.16, 0.16, size=(200, 2))])
    p = dict(freqs=freqs.tolist(), du=15000.0, dv=14600.0, ang=35.0, kv=300.0, cs=2.7, w=0.1)
    theirs = np.array(json.loads(venv_python(venv, _CTF_CHECK, json.dumps(p))))
    kx = torch.tensor(freqs[:, 0], dtype=torch.float64).reshape(1, -1)
    ky = torch.tensor(freqs[:, 1], dtype=torch.float64).reshape(1, -1)
    ours = ctf_2d(ky, kx, torch.tensor([p["du"]]), torch.tensor([p["dv"]]), torch.tensor([p["ang"]]),
                  torch.tensor([p["kv"]]), torch.tensor([p["cs"]]), torch.tensor([p["w"]])).reshape(-1).numpy()
    corr = float(np.corrcoef(ours, theirs)[0, 1])
    max_abs_sum = float(np.abs(ours + theirs).max())
    opposite = corr < -0.99
    return {"ours_at_0": float(ours[0]), "cryodrgn_at_0": float(theirs[0]), "correlation": corr,
            "max_abs(ours + cryodrgn)": max_abs_sum, "opposite_sign": opposite,
            "cryodrgn_flag": "(default: invert data)" if opposite else "--uninvert-data",
            "note": ("cryoDRGN's CTF = -RELION's; train_vae inverts images by default, so its default matches "
                     "RELION-convention images like ours" if opposite else
                     "same sign: images must not be inverted (--uninvert-data)")}


# ----------------------------------------------------------------------------- parsing logs
def parse_our_log(path: str) -> dict:
    text = open(path, errors="replace").read()
    out = {}
    m = re.search(r"feature statistics from (\d+) particles in ([\d.]+) s", text)
    if m:
        out["stats_particles"], out["stats_s"] = int(m.group(1)), float(m.group(2))
    m = re.search(r"gradient features of (\d+) items cached in \S+ \(([\d.]+) s", text)
    if m:
        out["cache_items"], out["cache_s"] = int(m.group(1)), float(m.group(2))
    latent_name = re.escape(os.path.basename(TrainFolder("").latent))
    m = re.search(r"wrote \S+" + latent_name + r" \((\d+) x (\d+)\) in ([\d.]+) s", text)
    if m:
        out["latent_s"] = float(m.group(3))
    m = re.search(r"(\d+) Gaussians \((\d+) may change", text)
    if m:
        out["n_gauss"] = int(m.group(1))
    m = re.search(r"(\d+) features, band ([\d.]+)-([\d.]+) A", text)
    if m:
        out["n_features"], out["band_A"] = int(m.group(1)), [float(m.group(2)), float(m.group(3))]
    m = re.search(r"Fourier crop (\d+) -> (\d+) px", text)
    if m:
        out["fbox"] = int(m.group(2))
    return out


def _td_seconds(s: str) -> float:
    h, m, sec = s.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def parse_cryodrgn_log(path: str) -> dict:
    text = open(path, errors="replace").read()
    epochs = [_td_seconds(m.group(2)) for m in re.finditer(r"Epoch: (\d+) Average gen loss.*?Finished in ([\d:.]+)", text)]
    out = {"epoch_s": epochs}
    m = re.search(r"(\d+) parameters in model", text)
    if m:
        out["parameters"] = int(m.group(1))
    m = re.search(r"Finished in ([\d:.]+) \(", text)
    if m:
        out["train_total_s"] = _td_seconds(m.group(1))
    return out


# ----------------------------------------------------------------------------- latent quality
def latent_quality(z: np.ndarray, conformation: np.ndarray, composition: np.ndarray, seed: int = 0) -> dict:
    """|Spearman| of PC1 (and the best PC) with the conformation; k-means (k=2) ARI with the composition."""
    from scipy.stats import spearmanr
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score
    z = np.asarray(z, dtype=np.float64)
    out = {"n": int(len(z))}
    if not np.isfinite(z).all() or np.allclose(z.std(0), 0):
        return dict(out, spearman_pc1=float("nan"), spearman_best_pc=float("nan"), best_pc=None, ari_kmeans2=float("nan"),
                    composition_auc_best_pc=float("nan"))
    pcs = PCA(random_state=seed).fit_transform(z)
    rho = [abs(spearmanr(pcs[:, k], conformation).correlation) for k in range(pcs.shape[1])]
    labels = KMeans(2, n_init=10, random_state=seed).fit_predict(z)
    two = len(np.unique(composition)) == 2  # one composition (conformational, hinge): no ARI
    out.update(spearman_pc1=float(rho[0]), spearman_best_pc=float(np.nanmax(rho)), best_pc=int(np.nanargmax(rho)) + 1,
               ari_kmeans2=float(adjusted_rand_score(composition, labels)) if two else float("nan"))
    if len(np.unique(composition)) == 2:  # how well the best single PC separates the compositions
        from sklearn.metrics import roc_auc_score
        auc = [roc_auc_score(composition, pcs[:, k]) for k in range(pcs.shape[1])]
        out["composition_auc_best_pc"] = float(max(max(a, 1 - a) for a in auc))
    return out


# ----------------------------------------------------------------------------- steps
def simulate(args, work: str) -> dict:
    sim = os.path.join(work, "sim")
    want = dict(kind=args.kind, n=args.n, box=args.box, apix=args.apix, seed=args.seed)
    js = os.path.join(sim, "simulation.json")
    if os.path.exists(js):
        with open(js) as f:
            have = json.load(f)
        if all(have.get(k) == v for k, v in want.items()) and float(have.get("snr")) == args.snr:
            log(f"reusing the simulated dataset in {sim}")
            return {"dir": sim, "reused": True}
    pdb = ["--pdb", os.path.join(common.REPO, "tests", "data", "1ake.pdb")] if args.kind == "hinge" else []
    r = _run(OUR + ["simulate", "--out", sim, "--kind", args.kind, "--n", str(args.n), "--box", str(args.box),
                    "--apix", str(args.apix), "--snr", str(args.snr), "--seed", str(args.seed)] + pdb,
             os.path.join(work, "simulate.log"), "gmmhet simulate")
    return {"dir": sim, "reused": False, **r}


def write_subset_star(star: str, rows: np.ndarray, out: str) -> None:
    from scipion_gmmhet.engine.io import metadata
    meta = metadata.read_particles(star)
    metadata.write_particles(out, meta.subset(rows))


def our_train(args, work, star, build_dir, name, epochs=1, resume=False) -> dict:
    out = os.path.join(work, name)
    r = _run(OUR + ["train", "--particles", star, "--gmm", build_dir, "--out", out, "--epochs", str(epochs),
                    "--zdim", str(args.zdim), "--seed", str(args.seed), "--device", "cpu"] + (["--resume"] if resume else []),
             os.path.join(work, name + (f"_e{epochs}" if resume else "") + ".log"), f"gmmhet train {name} ({epochs} epoch(s))")
    r.update(parse_our_log(r["log"]))
    folder = TrainFolder(out)
    r["loss"] = folder.read_loss()
    r["latent"] = folder.latent
    cfg = folder.read_config()
    r["n_items"] = cfg["n_items"]
    return r


def our_rates(r: dict, n_val_fraction: float = 0.05) -> dict:
    n = r["n_items"]
    ep = r["loss"][0]
    n_train = n - int(round(n_val_fraction * n)) if n > 1 else n
    feat_s = r.get("stats_s", 0.0) + r.get("cache_s", 0.0)
    return {"particles": n, "epoch_s": ep["seconds"], "features_s": feat_s,
            "first_epoch_s": feat_s + ep["seconds"],
            "rate_first_epoch": n / (feat_s + ep["seconds"]),          # incl. gradient inputs
            "rate_epoch_cached": n_train / ep["seconds"],              # later epochs (features cached)
            "rate_command": n / r["seconds"], "cpu_s_per_particle": r["cpu_seconds"] / n,
            "wall_s": r["seconds"], "cpu_s": r["cpu_seconds"], "peak_rss_mb": r["peak_rss_mb"]}


def cryodrgn_train(args, venv, work, sim, ind_pkl, n_sub, name, epochs, invert_flag) -> dict:
    exe = os.path.join(venv, "bin", "cryodrgn")
    out = os.path.join(work, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [exe, "train_vae", os.path.join(sim, "particles.mrcs"), "--poses", os.path.join(work, "pose.pkl"),
           "--ctf", os.path.join(work, "ctf.pkl"), "--zdim", str(args.zdim), "-n", str(epochs), "-o", out,
           "--no-analysis", "--checkpoint", "0", "--seed", str(args.seed)]
    if ind_pkl:
        cmd += ["--ind", ind_pkl]
    if invert_flag:
        cmd += [invert_flag]
    r = _run(cmd, os.path.join(work, name + ".log"), f"cryodrgn train_vae {name} ({epochs} epoch(s), {n_sub} particles)",
             timeout_s=args.cryodrgn_timeout)
    r.update(parse_cryodrgn_log(r["log"]))
    z_pkl = os.path.join(out, "z.pkl")
    if os.path.exists(z_pkl):
        npy = os.path.join(out, "z.npy")
        z = load_array_pickle(z_pkl, "cryoDRGN's z.pkl, an (N, zdim) numpy array")  # runs no code
        np.save(npy, np.asarray(z, dtype=np.float32))
        r["latent"] = npy
    r["particles"] = n_sub
    if r.get("epoch_s"):
        e = r["epoch_s"][0]
        r.update(rate_epoch=n_sub / e, rate_command=n_sub * epochs / r["seconds"],
                 cpu_s_per_particle=r["cpu_seconds"] / (n_sub * epochs))
    return r


# ----------------------------------------------------------------------------- report
def report(res: dict) -> str:
    m = res["machine"]
    L = [f"# Side-by-side: gmmhet vs cryoDRGN train_vae (CPU)\n", common.machine_line(m) + ".\n",
         f"Dataset: `gmmhet simulate --kind {res['args']['kind']}`, {res['args']['n']} particles, box "
         f"{res['args']['box']} px, {res['args']['apix']} A/px, SNR {res['args']['snr']}, seed {res['args']['seed']}; "
         f"latent dimension {res['args']['zdim']} for both.",
         f"cryoDRGN {res.get('cryodrgn', {}).get('cryodrgn', '-')} in its own venv (torch "
         f"{res.get('cryodrgn', {}).get('torch', '-')}, numpy {res.get('cryodrgn', {}).get('numpy', '-')}), "
         f"`train_vae` default architecture ({res.get('cryodrgn_train', {}).get('parameters', '?')} parameters), "
         f"data sign: {res.get('ctf_check', {}).get('cryodrgn_flag', '-')}.",
         f"Ours: `gmmhet build` ({res.get('build', {}).get('n_gauss', '?')} Gaussians, "
         f"{res.get('build', {}).get('seconds', float('nan')):.0f} s wall{' (reused)' if res.get('build', {}).get('reused') else ''}, "
         "one-time, not in the rates) + "
         "`gmmhet train --epochs 1`; our first-epoch rate includes the gradient features (statistics sample + "
         "cache) the encoder takes. Training band "
         f"{'-'.join('%.0f' % x for x in res.get('ours_full', {}).get('band_A', [])) or '?'} A, images Fourier-cropped to "
         f"{res.get('ours_full', {}).get('fbox', '?')} px (the trainer's defaults).\n",
         "## Throughput (one epoch)\n"]
    rows = []
    for key, label in (("ours_full", "gmmhet, all particles"), ("ours_sub", "gmmhet, cryoDRGN's subset")):
        if key in res:
            o = res[key]["rates"]
            rows.append(dict(run=label, n=o["particles"], epoch="%.0f s (+%.0f s features)" % (o["epoch_s"], o["features_s"]),
                             rate1=o["rate_first_epoch"], rate2=o["rate_epoch_cached"], rate3=o["rate_command"],
                             cpu=o["cpu_s_per_particle"], rss=o["peak_rss_mb"]))
    c = res.get("cryodrgn_train")
    if c and c.get("rate_epoch"):
        rows.append(dict(run="cryoDRGN train_vae", n=c["particles"], epoch="%.0f s" % c["epoch_s"][0],
                         rate1=c["rate_epoch"], rate2=c["rate_epoch"], rate3=c["rate_command"],
                         cpu=c["cpu_s_per_particle"], rss=c["peak_rss_mb"]))
    L.append(common.markdown_table(rows, [("run", "run"), ("n", "particles"), ("epoch", "epoch wall"),
                                          ("rate1", "particles/s, 1st epoch (incl. features)"),
                                          ("rate2", "particles/s, later epochs"),
                                          ("rate3", "particles/s, whole command"),
                                          ("cpu", "CPU s / particle"), ("rss", "peak RSS MB")]))
    if "ratios" in res:
        r = res["ratios"]
        L += ["", "**Throughput ratio, gmmhet / cryoDRGN** (all particles vs cryoDRGN's epoch): "
              f"first epoch incl. gradient features **{r['first_epoch']:.1f}x**; later epochs {r['later_epochs']:.1f}x; "
              f"whole command (startup, loading, latents) {r['command']:.1f}x; CPU seconds per particle "
              f"{r['cpu']:.1f}x. Same subset: first epoch {r.get('first_epoch_same_subset', float('nan')):.1f}x. "
              f"Target (issue 7): >= 20x."]
    L += ["", "## Latent quality\n",
          "abs Spearman = |Spearman correlation| of latent PC1 (and of the best PC) with the true conformation; "
          "ARI = adjusted Rand index of k-means (k = 2) in the latent space; composition AUC = how well the best "
          "single PC separates particles with and without the subunit (0.5 = not at all, 1 = perfectly); "
          "ARI and AUC against the true composition. `subset` = the particles cryoDRGN trained on.\n"]
    L.append(common.markdown_table(res.get("quality", []), [("run", "run"), ("epochs", "epochs"), ("wall_s", "train wall s"),
                                                           ("on", "evaluated on"), ("n", "n"),
                                                           ("spearman_pc1", "abs Spearman PC1"),
                                                           ("spearman_best_pc", "abs Spearman best PC"), ("best_pc", "best PC"),
                                                           ("ari_kmeans2", "ARI k-means 2"),
                                                           ("composition_auc_best_pc", "composition AUC best PC")]))
    if "ctf_check" in res:
        cc = res["ctf_check"]
        L += ["", f"CTF sign check: ours {cc['ours_at_0']:+.3f} at zero frequency, cryoDRGN {cc['cryodrgn_at_0']:+.3f}; "
              f"correlation over 203 frequencies {cc['correlation']:+.4f}; {cc['note']}."]
    L += ["", f"Load average during the runs (1 min): {res.get('load_range', '-')}. Machine shared by several users: "
          "absolute rates are pessimistic; the CPU-seconds ratio is the least load-sensitive figure."]
    if res.get("notes"):
        L += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="particles to simulate (default 2000)")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=3.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--kind", default="mixed", choices=["mixed", "conformational", "compositional", "hinge"],
                   help="simulated data (default mixed); hinge: adenylate kinase's LID and NMP opening (issue 13's "
                        "real-structure data; use --apix 1.5 --resolution 8)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--zdim", type=int, default=4, help="latent dimension of both (default 4, our default)")
    p.add_argument("--resolution", type=float, default=10.0, help="gmmhet build target resolution, A (default 10)")
    p.add_argument("--cryodrgn-particles", type=int, default=256,
                   help="cryoDRGN trains on the first M particles (default 256; 0 = all)")
    p.add_argument("--cryodrgn-timeout", type=float, default=3600.0, help="kill cryoDRGN after this many s")
    p.add_argument("--more-epochs", type=int, default=0,
                   help="also continue ours to E epochs and give cryoDRGN about the same wall time")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS / MKL_NUM_THREADS for both tools (default 0: torch's default, one per core). "
                        "On an oversubscribed machine 1 thread can be much faster for both")
    p.add_argument("--reuse-build", action="store_true", help="reuse WORKDIR/build if it is there")
    p.add_argument("--name", default="vs_cryodrgn", help="results file name (default vs_cryodrgn)")
    p.add_argument("--skip-cryodrgn", action="store_true")
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--cryodrgn-version", default=CRYODRGN_VERSION)
    p.add_argument("--workdir", default=os.path.join(common.SCRATCH, "vs_cryodrgn"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (default: deleted at the end)")
    p.add_argument("--out", default=common.RESULTS)
    args = p.parse_args(argv)

    global THREAD_ENV
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    res = {"args": vars(args), "machine": common.machine_info(), "notes": []}
    if args.threads > 0:
        THREAD_ENV = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        res["machine"]["torch_threads"] = args.threads
    loads = [load_now()]
    if not args.skip_cryodrgn:
        res["cryodrgn"] = ensure_venv(args.venv, args.cryodrgn_version, work)
        log(f"cryoDRGN {res['cryodrgn']['cryodrgn']} (torch {res['cryodrgn']['torch']}, numpy {res['cryodrgn']['numpy']})")
        res["ctf_check"] = ctf_sign_check(args.venv)
        log(f"CTF check: {res['ctf_check']['note']} (correlation {res['ctf_check']['correlation']:+.4f})")

    res["simulate"] = simulate(args, work)
    sim = res["simulate"]["dir"]
    star = os.path.join(sim, "particles.star")
    import pandas as pd
    truth = pd.read_csv(os.path.join(sim, "truth.csv"))
    names = truth["image_name"].astype(str).tolist()
    assert names == [f"{i + 1:06d}@particles.mrcs" for i in range(len(names))], "star rows must be the stack order"
    n = len(truth)
    m = n if args.cryodrgn_particles <= 0 else min(args.cryodrgn_particles, n)
    sub_rows = np.arange(m)

    # ours: build once, then train (all particles; the subset)
    build_dir = os.path.join(work, "build")
    if args.reuse_build and os.path.exists(BuildFolder(build_dir).summary):
        sm = BuildFolder(build_dir).read_summary()
        b = {"seconds": float(sm["seconds"]), "reused": True, "rc": 0}
        log(f"reusing {build_dir} ({sm['n_gauss']} Gaussians, built in {sm['seconds']} s)")
    else:
        b = None
    b = b or _run(OUR + ["build", "--map", os.path.join(sim, "consensus.mrc"), "--resolution", str(args.resolution),
                    "--out", build_dir, "--seed", str(args.seed)], os.path.join(work, "build.log"), "gmmhet build")
    b["n_gauss"] = BuildFolder(build_dir).read_summary()["n_gauss"]
    res["build"] = b
    loads.append(load_now())
    full = our_train(args, work, star, build_dir, "ours_full")
    full["rates"] = our_rates(full)
    res["ours_full"] = full
    loads.append(load_now())

    if not args.skip_cryodrgn:
        exe = os.path.join(args.venv, "bin", "cryodrgn")
        res["cryodrgn_parse_pose"] = _run([exe, "parse_pose_star", star, "-o", os.path.join(work, "pose.pkl"), "-D",
                                           str(args.box), "--Apix", str(args.apix)], os.path.join(work, "parse_pose.log"),
                                          "cryodrgn parse_pose_star")
        res["cryodrgn_parse_ctf"] = _run([exe, "parse_ctf_star", star, "-o", os.path.join(work, "ctf.pkl"), "-D",
                                          str(args.box), "--Apix", str(args.apix)], os.path.join(work, "parse_ctf.log"),
                                         "cryodrgn parse_ctf_star")
        ind = None
        if m < n:
            ind = os.path.join(work, "ind.pkl")
            venv_python(args.venv, "import pickle, sys, numpy as np; pickle.dump(np.arange(int(sys.argv[1])), "
                        "open(sys.argv[2], 'wb'))", m, ind)
        flag = None if res["ctf_check"]["opposite_sign"] else "--uninvert-data"
        c = cryodrgn_train(args, args.venv, work, sim, ind, m, "cryodrgn_1", 1, flag)
        res["cryodrgn_train"] = c
        loads.append(load_now())

    if m < n:
        sub_star = os.path.join(work, "subset", "particles.star")
        os.makedirs(os.path.dirname(sub_star), exist_ok=True)
        write_subset_star(star, sub_rows, sub_star)
        sub = our_train(args, work, sub_star, build_dir, "ours_sub")
        sub["rates"] = our_rates(sub)
        res["ours_sub"] = sub
        loads.append(load_now())

    # ratios
    c = res.get("cryodrgn_train")
    if c and c.get("rate_epoch"):
        o = full["rates"]
        res["ratios"] = {"first_epoch": o["rate_first_epoch"] / c["rate_epoch"],
                         "later_epochs": o["rate_epoch_cached"] / c["rate_epoch"],
                         "command": o["rate_command"] / c["rate_command"],
                         "cpu": c["cpu_s_per_particle"] / o["cpu_s_per_particle"]}
        if "ours_sub" in res:
            res["ratios"]["first_epoch_same_subset"] = res["ours_sub"]["rates"]["rate_first_epoch"] / c["rate_epoch"]

    # latent quality
    conf = truth["conformation"].to_numpy()
    comp = truth["composition"].to_numpy()
    q = []

    def add(run, epochs, wall, z, rows, on):
        d = latent_quality(z, conf[rows], comp[rows])
        q.append(dict(run=run, epochs=epochs, wall_s=wall, on=on, **d))

    z = np.load(full["latent"])
    add("gmmhet (all particles)", 1, full["seconds"], z, np.arange(n), "all")
    add("gmmhet (all particles)", 1, full["seconds"], z[:m], sub_rows, "subset")
    if "ours_sub" in res:
        add("gmmhet (subset only)", 1, res["ours_sub"]["seconds"], np.load(res["ours_sub"]["latent"]), sub_rows, "subset")
    if c and c.get("latent"):
        add("cryoDRGN (subset)", 1, c["seconds"], np.load(c["latent"]), sub_rows, "subset")

    def finish(final):
        res["quality"] = q
        end_state = common.engine_state()
        if end_state.get("engine_sha1") != res["machine"].get("engine_sha1") and not any(
                n.startswith("The engine's sources changed") for n in res["notes"]):
            res["notes"].append(f"The engine's sources changed during this run (digest {res['machine'].get('engine_sha1')} "
                                f"at the start, {end_state.get('engine_sha1')} at the end): later steps may have run "
                                "other code.")
        res["load_range"] = f"{min(loads)} - {max(loads)} (samples {loads})"
        md = report(res)
        if final:
            print()
            print(md)
        common.write_results(args.name, md, res, args.out)

    finish(args.more_epochs <= 1)
    if args.more_epochs > 1:
        log("1-epoch results written; continuing with --more-epochs")
        more = our_train(args, work, star, build_dir, f"ours_full_e{args.more_epochs}", epochs=args.more_epochs)
        wall = more["seconds"]
        res["ours_more"] = {k: more[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "loss")}
        z = np.load(more["latent"])
        add("gmmhet (all particles)", args.more_epochs, wall, z, np.arange(n), "all")
        add("gmmhet (all particles)", args.more_epochs, wall, z[:m], sub_rows, "subset")
        if c and c.get("epoch_s"):
            k = max(1, int(wall // max(c["seconds"], 1e-9)))
            c2 = cryodrgn_train(args, args.venv, work, sim, ind, m, "cryodrgn_more", k,
                                None if res["ctf_check"]["opposite_sign"] else "--uninvert-data")
            res["cryodrgn_more"] = c2
            if c2.get("latent"):
                add("cryoDRGN (subset)", k, c2["seconds"], np.load(c2["latent"]), sub_rows, "subset")
        loads.append(load_now())
        loads.append(load_now())
        finish(True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
