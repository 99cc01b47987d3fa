"""Benchmark: motion-corrected consensus map vs the plain consensus reconstruction (issue 19).

Simulated domain-swing data (the simulator's ``conformational`` kind: the arm swings 60 deg
end to end), SNR 0.1, CTF. The neutral GMM is built from the simulator's ``truth_maps/neutral.mrc``
(the middle conformation, the frame the motion-corrected map is made in; a consensus map
blurs the arm, and a neutral frame must be one conformation). Two models are trained
independently with ``gmmhet train`` on the two half sets (rlnRandomSubset), then the commands a
user runs:

    gmmhet reconstruct --particles STAR --out plain.mrc
    gmmhet reconstruct --particles STAR --motion-corrected --train-half1 H1 --train-half2 H2 --out mc.mrc

Reported:

- FSC against the truth (``neutral.mrc``) inside a soft mask around the moving arm and one
  around the static core (the truth's Gaussians of that domain rendered, thresholded at 20 %,
  dilated 2 px, 4 px cosine edge, set to zero on the other domain's region; both maps times the
  mask; the phase-randomisation correction of :func:`reconstruct.masked_fsc` is unstable for
  masks this small). A sensitivity row uses an arm mask with a box/8-px edge that also covers
  the core next to the hinge (its static, sharp density then dominates the high shells).
  Resolution at FSC 0.5 for both maps, the arm's improvement (``1 - res_mc / res_plain``;
  issue 19 asks >= 30 %) and the core's change (<= 3 % worse);
- honesty: the half-map FSC of the motion-corrected map against ``sqrt(2 FSC_half / (1 +
  FSC_half))`` and the FSC of the full map against the truth (largest difference over shells
  1..Nyquist/2); pure-noise particles (the same star and CTFs, images of noise only, half
  models trained on them): the half-map FSC of every shell against the chance level
  ``3 / sqrt(voxels in the shell / 2)``, for the plain map and both formulations;
- homogeneous data (same settings, ``--n-control`` particles): FSC between the motion-corrected
  and the plain map, lowest value up to Nyquist/2 (issue: >= 0.99);
- speed: particles/s of both reconstructions (CPU here; ``--device cuda`` on a GPU).

Run: ``python benchmarks/bench_motion_corrected.py [--parts conformational --epochs 20 --device cpu]``;
writes ``benchmarks/results/motion_corrected.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
from scipion_gmmhet.engine.io.outputs import TrainFolder, read_fsc_csv, reconstruction_paths  # noqa: E402
from scipion_gmmhet.engine.cli import main as gmmhet  # noqa: E402
from scipion_gmmhet.engine.io.metadata import read_particles, write_particles  # noqa: E402
from scipion_gmmhet.engine.io.mrc import read_map  # noqa: E402
from scipion_gmmhet.engine.model.fourier import fsc_table, resolution_at_threshold, shell_index_3d  # noqa: E402
from scipion_gmmhet.engine.model.gmm import GMM  # noqa: E402

log = logging.getLogger("bench_motion_corrected")


def _region(g: GMM, rows: slice, box: int, apix: float, dilate_px: int = 2) -> np.ndarray:
    """Voxels of the Gaussians ``rows`` of ``g``: rendered, > 20 % of the maximum, dilated."""
    from scipy import ndimage
    part = GMM(g.centers_A[rows], g.amplitudes[rows], g.sigmas_A[rows], box, apix).render(box, apix)
    return ndimage.binary_dilation(part > 0.2 * part.max(), iterations=dilate_px)


def soft_mask_from_gmm(g: GMM, rows: slice, box: int, apix: float, exclude: slice | None = None,
                       dilate_px: int = 2, soft_px: int = 4) -> np.ndarray:
    """Soft mask around the Gaussians ``rows`` of ``g`` (:func:`_region`, cosine edge ``soft_px``),
    zero on the :func:`_region` of the Gaussians ``exclude`` (the other domain: a mask on the arm
    must not score the static core next to the hinge, and vice versa)."""
    from scipy import ndimage
    core = _region(g, rows, box, apix, dilate_px)
    dist = ndimage.distance_transform_edt(~core)
    out = core.astype(np.float32)
    edge = (dist > 0) & (dist < soft_px)
    out[edge] = 0.5 + 0.5 * np.cos(np.pi * dist[edge] / soft_px)
    if exclude is not None:
        out[_region(g, exclude, box, apix, dilate_px)] = 0.0
    return out


def res05(a, b, apix, mask=None):
    """Resolution (A) where the FSC of maps ``a`` and ``b`` drops below 0.5: unmasked, or under
    ``mask`` with the mask's own correlation removed by phase randomisation (reconstruct.masked_fsc)."""
    t = fsc_table(a, b, apix) if mask is None else fsc_table(a * mask, b * mask, apix)
    return float(resolution_at_threshold(t["freq_invA"], t["fsc"], 0.5)), t


def dataset(workdir, kind, n, args, noise=False):
    from scipion_gmmhet.engine.simulation.simulate import simulate
    d = os.path.join(workdir, f"{kind}_n{n}_box{args.box}_snr{args.snr:g}_seed{args.seed}")
    if not os.path.exists(os.path.join(d, "simulation.json")):
        simulate(d, kind, n=n, box=args.box, apix=args.apix, snr=args.snr, seed=args.seed)
    if not noise:
        return d
    nd = d + "_noise"
    star = os.path.join(nd, "particles.star")
    if not os.path.exists(star):  # same star (poses, CTFs, halves), images of pure noise
        import mrcfile
        os.makedirs(nd, exist_ok=True)
        with mrcfile.mmap(os.path.join(d, "particles.mrcs"), permissive=True) as m:
            sd = float(np.asarray(m.data[:256]).std())
        rng = np.random.default_rng(args.seed + 99)
        stack = rng.normal(0, sd, (n, args.box, args.box)).astype(np.float32)
        with mrcfile.new(os.path.join(nd, "particles.mrcs"), overwrite=True) as m:
            m.set_data(stack)
            m.set_image_stack()
            m.voxel_size = args.apix
        meta = read_particles(os.path.join(d, "particles.star"))
        meta.particles["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
        meta.root = nd
        write_particles(star, meta)
    return nd


def neutral_gmm(d, args, truth_name):
    from scipion_gmmhet.engine.model.build import build_gmm
    path = os.path.join(d, f"gmm_{truth_name}_{args.resolution:g}A_n{args.n_gauss}.npz")
    if not os.path.exists(path):
        vol, apix = read_map(os.path.join(d, "truth_maps", truth_name + ".mrc"))
        build_gmm(vol, apix, args.resolution, n_gauss=args.n_gauss, device=args.device, seed=args.seed).gmm.save(path)
    return path


def train_halves(d, gmm_path, epochs, args, tag, extra=()):
    """One ``gmmhet train`` per half set (``rlnRandomSubset``) in ``d/TAG_halfH_eE`` (reused when
    finished); ``extra``: more ``gmmhet train`` arguments. Returns ``{half: folder}``."""
    meta = read_particles(os.path.join(d, "particles.star"))
    h = np.asarray(meta.particles["rlnRandomSubset"]).astype(int)
    dirs = {}
    for half in (1, 2):
        out = os.path.join(d, f"{tag}_half{half}_e{epochs}")
        dirs[half] = out
        if TrainFolder(out).is_finished():
            continue
        star = os.path.join(d, f"half{half}.star")
        write_particles(star, meta.subset(np.flatnonzero(h == half)))
        if gmmhet(["train", "--particles", star, "--gmm", gmm_path, "--zdim", str(args.zdim), "--epochs",
                   str(epochs), "--seed", str(args.seed + half), "--device", args.device, "--out", out,
                   *extra]):
            raise SystemExit(f"training half {half} of {d} failed")
    return dirs


def gates(d, dirs, args):
    """The significance gate (motion_gate) of both half models, each scored on the other half's
    particles as ``gmmhet reconstruct`` does: ``{half: {passed, z, gain, n}}``."""
    from scipion_gmmhet.engine.analysis.motion_gate import gate_model
    from scipion_gmmhet.engine.training.trained import load_trained
    meta = read_particles(os.path.join(d, "particles.star"))
    halves = np.asarray(meta.particles["rlnRandomSubset"]).astype(int)
    out = {}
    for h, tdir in dirs.items():
        g = gate_model(load_trained(tdir, args.device), meta, np.flatnonzero(halves != h), device=args.device)
        out[h] = {"passed": g.passed, "z": g.z, "gain": g.gain, "n": g.n, "reason": g.reason}
    return out


def gate_row(label, g):
    return {"check": f"{label}: significance gate of the half models (other half's particles, Fourier-sector "
                     "split of the band; standard errors, passes at >= 3)",
            "value": " / ".join(f"half {h}: {v['z']:+.1f} ({'kept' if v['passed'] else 'zeroed'})"
                                for h, v in sorted(g.items())), "target": "report", "pass": ""}


def reconstructions(d, dirs, args, tag, ungated=False):
    """Plain, motion-corrected (hybrid, real_space) maps; ``ungated``: also the hybrid map
    without the significance gate (``--gate-z 0``)."""
    star = os.path.join(d, "particles.star")
    out = {}
    mc = ["--motion-corrected", "--train-half1", dirs[1], "--train-half2", dirs[2]]
    variants = [("plain", []), ("mc", mc), ("mc_rs", mc + ["--formulation", "real_space"])]
    if ungated:
        variants.append(("mc_nogate", mc + ["--gate-z", "0"]))
    for name, extra in variants:
        path = os.path.join(d, f"{tag}_{name}.mrc")
        timing = path[:-4] + "_seconds.txt"
        if args.reuse and os.path.exists(timing):  # made by an earlier run with the same settings
            out[name] = (path, float(open(timing).read()))
            continue
        t0 = time.time()
        if gmmhet(["reconstruct", "--particles", star, "--device", args.device, "--out", path] + extra):
            raise SystemExit(f"reconstruct {name} failed")
        out[name] = (path, time.time() - t0)
        with open(timing, "w") as f:
            f.write(f"{out[name][1]:.3f}\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--n-control", type=int, default=2000, help="particles of the homogeneous and noise sets")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=3.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--epochs-control", type=int, default=8)
    p.add_argument("--zdim", type=int, default=4)
    p.add_argument("--resolution", type=float, default=12.0)
    p.add_argument("--n-gauss", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--parts", default="conformational,noise,homogeneous")
    p.add_argument("--workdir", default=os.path.join(HERE, ".scratch", "motion_corrected"))
    p.add_argument("--name", default="motion_corrected")
    p.add_argument("--reuse", action="store_true", help="reuse reconstructions of an earlier run (their timing too)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    res = {"settings": vars(args), "machine": common.machine_info()}
    rows = []
    if "conformational" in parts:
        d = dataset(args.workdir, "conformational", args.n, args)
        gmm_path = neutral_gmm(d, args, "neutral")
        t0 = time.time()
        dirs = train_halves(d, gmm_path, args.epochs, args, "train")
        t_train = time.time() - t0
        rec = reconstructions(d, dirs, args, "conf")
        gate = gates(d, dirs, args)
        truth, apix = read_map(os.path.join(d, "truth_maps", "neutral.mrc"))
        g = GMM.load(os.path.join(d, "truth_gmm", "neutral.npz"))
        dom = json.load(open(os.path.join(d, "simulation.json")))["domains"]
        arm_rows, core_rows = slice(*dom["arm"]), slice(0, dom["arm"][0])
        arm = soft_mask_from_gmm(g, arm_rows, args.box, apix, exclude=core_rows)
        static = soft_mask_from_gmm(g, core_rows, args.box, apix, exclude=arm_rows)
        wide = soft_mask_from_gmm(g, arm_rows, args.box, apix, soft_px=max(4, args.box // 8))
        maps = {k: read_map(v[0])[0] for k, v in rec.items()}
        r = {}
        for region, m in (("arm", arm), ("static", static)):
            for k in maps:
                r[f"{region}_{k}_A"], _ = res05(maps[k], truth, apix, m)
        for k in maps:  # sensitivity: a wide-edged arm mask that also covers the core near the hinge
            r[f"armwide_{k}_A"], _ = res05(maps[k], truth, apix, wide)
        r["arm_improvement"] = 1.0 - r["arm_mc_A"] / r["arm_plain_A"]
        r["static_change"] = r["static_mc_A"] / r["static_plain_A"] - 1.0
        r["arm_improvement_rs"] = 1.0 - r["arm_mc_rs_A"] / r["arm_plain_A"]
        r["static_change_rs"] = r["static_mc_rs_A"] / r["static_plain_A"] - 1.0
        counts = np.bincount(shell_index_3d(args.box).reshape(-1))
        for k in ("mc", "plain"):  # the plain map's relation is the yardstick (same particles, no moves)
            fh = np.clip(read_fsc_csv(reconstruction_paths(rec[k][0])["fsc"])["fsc"], 0, 1)
            pred_k = np.sqrt(2 * fh / (1 + fh))
            _, tt_k = res05(maps[k], truth, apix)
            upto = np.arange(len(fh)) <= len(fh) // 2
            upto[0] = False
            # above chance: sqrt(2F/(1+F)) turns a chance-level F_half of 0.02 into 0.2
            signal = upto & (fh > 3.0 / np.sqrt(np.maximum(1, counts[:len(fh)] / 2.0)))
            r[f"honesty_{k}_max_abs_diff_to_nyq2"] = float(np.abs(pred_k - tt_k["fsc"])[upto].max())
            r[f"honesty_{k}_max_abs_diff_above_chance"] = float(np.abs(pred_k - tt_k["fsc"])[signal].max())
            if k == "mc":
                fh_mc, pred, tt = fh, pred_k, tt_k
        fh = fh_mc
        r["honesty_max_abs_diff_to_nyq2"] = r["honesty_mc_max_abs_diff_to_nyq2"]
        r["honesty_curves"] = {"predicted": pred.tolist(), "truth": tt["fsc"].tolist()}
        n = args.n
        r.update(train_seconds=t_train, plain_particles_per_s=n / rec["plain"][1], mc_particles_per_s=n / rec["mc"][1],
                 mc_rs_particles_per_s=n / rec["mc_rs"][1])
        r["gate"] = gate
        res["conformational"] = r
        rows.append(gate_row("conformational", gate))
        rows.append({"check": "arm FSC0.5 vs truth (A): plain -> motion-corrected",
                     "value": f"{r['arm_plain_A']:.1f} -> {r['arm_mc_A']:.1f} "
                              f"({100 * r['arm_improvement']:.0f}% finer)",
                     "target": ">= 30% finer", "pass": r["arm_improvement"] >= 0.30})
        rows.append({"check": "static core FSC0.5 vs truth (A): plain -> motion-corrected",
                     "value": f"{r['static_plain_A']:.1f} -> {r['static_mc_A']:.1f} ({100 * r['static_change']:+.1f}%)",
                     "target": "<= +3%", "pass": r["static_change"] <= 0.03})
        rows.append({"check": "sensitivity: arm mask with a box/8 edge, core not excluded (A): "
                              "plain -> motion-corrected",
                     "value": f"{r['armwide_plain_A']:.1f} -> {r['armwide_mc_A']:.1f} "
                              f"({100 * (1 - r['armwide_mc_A'] / r['armwide_plain_A']):.0f}% finer)",
                     "target": "report", "pass": ""})
        rows.append({"check": "real_space formulation: arm / static FSC0.5 vs truth (A)",
                     "value": f"{r['arm_mc_rs_A']:.1f} ({100 * r['arm_improvement_rs']:.0f}% finer) / "
                              f"{r['static_mc_rs_A']:.1f} ({100 * r['static_change_rs']:+.1f}%)",
                     "target": "comparison", "pass": ""})
        rows.append({"check": "max |sqrt(2F_half/(1+F_half)) - FSC_truth|, shells 1..Nyquist/2 / only shells where "
                              "F_half is above 3-sigma chance: motion-corrected (plain map, same particles)",
                     "value": f"{r['honesty_mc_max_abs_diff_to_nyq2']:.3f} / {r['honesty_mc_max_abs_diff_above_chance']:.3f}"
                              f" ({r['honesty_plain_max_abs_diff_to_nyq2']:.3f} / "
                              f"{r['honesty_plain_max_abs_diff_above_chance']:.3f})",
                     "target": "small, as the plain map (report)", "pass": ""})
        shells = [k for k in (2, 4, 8, 12, 16, 20, 24) if k < len(fh)]
        rows.append({"check": "honesty by shell: sqrt(2F_half/(1+F_half)) / FSC_truth (full map) at shells "
                              + ", ".join(f"{k} ({args.box * apix / k:.0f} A)" for k in shells),
                     "value": "; ".join(f"{pred[k]:.2f} / {tt['fsc'][k]:.2f}" for k in shells),
                     "target": "agree (report)", "pass": ""})
        rows.append({"check": f"speed, particles/s ({args.device}): plain / motion-corrected",
                     "value": f"{r['plain_particles_per_s']:.0f} / {r['mc_particles_per_s']:.1f} (real_space "
                              f"{r['mc_rs_particles_per_s']:.1f})", "target": "report",
                     "pass": ""})
    if "noise" in parts:
        d = dataset(args.workdir, "conformational", args.n_control, args, noise=True)
        base = os.path.dirname(d + "/")[:-len("_noise")]
        gmm_path = neutral_gmm(base, args, "neutral")
        dirs = train_halves(d, gmm_path, args.epochs_control, args, "train")
        rec = reconstructions(d, dirs, args, "noise", ungated=True)
        counts = np.bincount(shell_index_3d(args.box).reshape(-1))
        res["noise"] = {"gate": gates(d, dirs, args)}
        rows.append(gate_row("pure noise", res["noise"]["gate"]))
        for name, label in (("plain", "plain"), ("mc", "motion-corrected"), ("mc_rs", "real_space"),
                            ("mc_nogate", "motion-corrected without the gate (--gate-z 0)")):
            fsc = read_fsc_csv(reconstruction_paths(rec[name][0])["fsc"])["fsc"]
            chance = 3.0 / np.sqrt(np.maximum(1, counts[:len(fsc)] / 2.0))
            within = np.abs(fsc) <= chance
            res["noise"][label] = {"fsc_half": fsc.tolist(), "chance_3sigma": chance.tolist(),
                                   "within_from_shell1": float(within[1:].mean()),
                                   "within_from_shell5": float(within[5:].mean())}
            first = " ".join(f"{v:.2f}" for v in fsc[1:5])
            rows.append({"check": f"pure noise, {label}: half-map FSC shells 1-4 (192-48 A); shells within "
                                  "3-sigma chance from shell 1 / from shell 5",
                         "value": f"{first}; {100 * within[1:].mean():.0f}% / {100 * within[5:].mean():.0f}%",
                         "target": "chance level" if name != "mc_nogate" else "report",
                         "pass": bool(within[1:].all()) if name != "mc_nogate" else ""})
    if "homogeneous" in parts:
        d = dataset(args.workdir, "homogeneous", args.n_control, args)
        gmm_path = neutral_gmm(d, args, "state")
        dirs = train_halves(d, gmm_path, args.epochs_control, args, "train")
        rec = reconstructions(d, dirs, args, "homog")
        a = read_map(rec["plain"][0])[0]
        res["homogeneous"] = {"gate": gates(d, dirs, args)}
        rows.append(gate_row("homogeneous", res["homogeneous"]["gate"]))
        for name, label in (("mc", "hybrid"), ("mc_rs", "real_space")):
            t = fsc_table(a, read_map(rec[name][0])[0], args.apix)
            upto = (np.arange(len(t["fsc"])) <= len(t["fsc"]) // 2)
            mn = float(t["fsc"][upto].min())
            res["homogeneous"][label] = {"fsc_mc_vs_plain": t["fsc"].tolist(), "min_to_nyq2": mn}
            rows.append({"check": f"homogeneous: FSC(motion-corrected {label}, plain), min to Nyquist/2",
                         "value": f"{mn:.4f}", "target": ">= 0.99", "pass": mn >= 0.99})
    md = (f"# Motion-corrected consensus map (issue 19)\n\nSettings: {json.dumps(vars(args))}\n\n"
          f"Machine: {json.dumps(res['machine'])}\n\n"
          + common.markdown_table(rows, [(k, k) for k in ("check", "value", "target", "pass")]) + "\n")
    common.write_results(args.name, md, res)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
