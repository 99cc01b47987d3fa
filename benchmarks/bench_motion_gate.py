"""Benchmark: which significance test for the motion-corrected map's half models (issue 19).

Three tests of whether a half model's decoded moves are real, on half models trained with the
current training defaults (``--loss corr``, band to the neutral GMM's resolution, ``--prior kl``,
early stopping) by ``bench_motion_corrected.py`` (its data sets and models are reused from its
work folder, trained here when missing):

- ``outside band``: gmmhet's first gate: the model's own particles, FRC gain of the decoded over
  the neutral model on the 2 Fourier rings just finer than the training band;
- ``other half, full band``: the other half's particles (never trained on), encoded from the
  whole band and scored (band correlation gain) on the whole band: the encoder reads the noise
  it is scored on;
- ``other half, sector split`` (the gate, :mod:`motion_gate`): the other half's particles,
  encoded from alternate angular sectors of the band and scored on the others, both ways.

Data: the arm swing (SNR 0.1, box 64) at 500, 1,000 and 5,000 particles (real motion: a test must
pass), homogeneous data and pure-noise particles (2,000; nothing moves: a test must not pass),
and ``--null-seeds`` more pure-noise sets of ``--null-n`` particles (the spread of ``z`` when
nothing moves), and pure noise with half models trained on a band forced as wide as the arm
swing's (17.5 A, 20 epochs: more coefficients to fit noise with). z = mean gain / standard
error; a test passes at z >= 3.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_motion_gate.py``; writes
``benchmarks/results/motion_gate.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_motion_corrected as bmc  # noqa: E402
import common  # noqa: E402
from scipion_gmmhet.engine.analysis import motion_gate  # noqa: E402
from scipion_gmmhet.engine.io.metadata import read_particles  # noqa: E402
from scipion_gmmhet.engine.training.trained import load_trained  # noqa: E402


def z_of(gains) -> float:
    g = np.asarray(gains, np.float64)
    return float(g.mean() / (g.std(ddof=1) / math.sqrt(g.size)))


def outside_band_gains(model, meta, own_rows, device="cpu", batch_size=64, n_rings=2):
    """gmmhet's first gate: FRC gain on the ``n_rings`` rings just finer than the training band,
    own training particles with their training latents."""
    from scipion_gmmhet.engine.io.data import ParticleImages
    from scipion_gmmhet.engine.io.outputs import TrainFolder
    from scipion_gmmhet.engine.model.fourier import RingBinner, shell_for_resolution
    from scipion_gmmhet.engine.model.gmm import project
    from scipion_gmmhet.engine.analysis.reconstruct import prepare_batch
    box, apix = int(meta.box), float(meta.apix)
    hi = min(box // 2, shell_for_resolution(box, apix, float(model.config["highres_A"])))
    first, last = hi + 1, min(box // 2, hi + n_rings)
    if first > last:
        return None
    lat = TrainFolder(model.train_dir).read_latents()  # rows of the half star = own_rows in order
    binner = RingBinner(box, apix, device=device)
    sel = slice(first - binner.lo, last - binner.lo + 1)
    rot = np.asarray(meta.rotation_matrices(), np.float32)
    org = np.asarray(meta.origins_A(), np.float32)
    ctf_all = meta.ctf_params()
    images = ParticleImages(meta)
    c0, a0, s0 = model.neutral.tensors(device)
    out = []
    for s in range(0, len(own_rows), batch_size):
        r = own_rows[s:s + batch_size]
        imgs = torch.as_tensor(np.asarray(images.get(r), np.float32))
        Fimg, ctf = prepare_batch(imgs, torch.as_tensor(org[r]), {k: np.asarray(v)[r] for k, v in ctf_all.items()},
                                  apix)
        R = torch.as_tensor(rot[r])
        with torch.no_grad():
            c, a, sg = model.decode(torch.as_tensor(lat[s:s + batch_size]))
            Fd = project(c, a, sg, R, box, apix, None, ctf)
            Fn = project(c0, a0, s0, R, box, apix, None, ctf)
            out.append((binner.frc(Fd, Fimg)[:, sel] - binner.frc(Fn, Fimg)[:, sel]).mean(1).numpy())
    return np.concatenate(out)


def full_band_gains(model, meta, rows, device="cpu", batch_size=64):
    """Other half's particles encoded from the whole band (the model's own feature statistics),
    scored on the whole band: band correlation gain of the decoded over the neutral model."""
    from scipion_gmmhet.engine.model.fourier import RingBinner
    from scipion_gmmhet.engine.model.gmm import project
    from scipion_gmmhet.engine.training.features import GradientFeatures, feature_param_types
    cfg = model.config
    parts = motion_gate._particles_of(model, meta.subset(rows), device)
    band = RingBinner(parts.fbox, parts.fapix, cfg["lowres_A"], cfg["highres_A"], device=device, loss="corr")
    feats = GradientFeatures(model.neutral, band, torch.as_tensor(model.mobile), feature_param_types(cfg["changes"]),
                             device, stats=model.feature_stats)
    c0, a0, s0 = model.neutral.tensors(device)
    out = []
    for i0 in range(0, len(rows), batch_size):
        b = parts.batch(np.arange(i0, min(len(rows), i0 + batch_size)))
        with torch.no_grad():
            c, a, s = model.model.decoder(model.model.encode(feats(b)))
            Fd = project(c, a, s, b.rotations, parts.fbox, parts.fapix, b.origins_A, b.ctf)
            Fn = project(c0, a0, s0, b.rotations, parts.fbox, parts.fapix, b.origins_A, b.ctf)
            out.append((band.band_corr(Fd, b.F_img) - band.band_corr(Fn, b.F_img)).numpy())
    return np.concatenate(out)


def score_set(label, d, dirs, kind):
    meta = read_particles(os.path.join(d, "particles.star"))
    halves = np.asarray(meta.particles["rlnRandomSubset"]).astype(int)
    out = {"label": label, "kind": kind, "n": len(meta)}
    for h, tdir in dirs.items():
        m = load_trained(tdir)
        own, other = np.flatnonzero(halves == h), np.flatnonzero(halves != h)
        ob = outside_band_gains(m, meta, own)
        out[f"half{h}"] = {"band_A": [m.config["lowres_A"], m.config["highres_A"]],
                           "outside_band_z": None if ob is None else z_of(ob),
                           "full_band_z": z_of(full_band_gains(m, meta, other)),
                           "split_z": z_of(motion_gate.split_gains(m, meta, other))}
        logging.info("%s half %d: %s", label, h, out[f"half{h}"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join(HERE, ".scratch", "motion_corrected"))
    p.add_argument("--null-seeds", default="2,3,4,5")
    p.add_argument("--null-n", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    base = dict(box=64, apix=3.0, snr=0.1, seed=1, zdim=4, resolution=12.0, n_gauss=512, device="cpu")
    sets = [("arm swing, 500", "conformational", 500, False, 20, 1, "motion"),
            ("arm swing, 1,000", "conformational", 1000, False, 20, 1, "motion"),
            ("arm swing, 5,000", "conformational", 5000, False, 20, 1, "motion"),
            ("homogeneous, 2,000", "homogeneous", 2000, False, 8, 1, "none"),
            ("pure noise, 2,000", "conformational", 2000, True, 8, 1, "none")]
    sets += [(f"pure noise, {args.null_n:,}, seed {s}", "conformational", args.null_n, True, 8, int(s), "none")
             for s in args.null_seeds.split(",") if s.strip()]
    sets.append(("pure noise, 2,000, band forced to 17.5 A, 20 epochs", "conformational", 2000, True, 20, 1,
                 "none", 17.5))
    results = []
    for label, kind, n, noise, epochs, seed, truth, *wide in sets:
        a = types.SimpleNamespace(n=n, **{**base, "seed": seed})
        d = bmc.dataset(args.workdir, kind, n, a, noise=noise)
        src = d[:-len("_noise")] if noise else d
        gmm = bmc.neutral_gmm(src, a, "state" if kind == "homogeneous" else "neutral")
        dirs = (bmc.train_halves(d, gmm, epochs, a, f"wide{wide[0]:g}", ["--highres", f"{wide[0]:g}"]) if wide
                else bmc.train_halves(d, gmm, epochs, a, "train"))
        results.append(score_set(label, d, dirs, truth))
    rows = []
    for r in results:
        def fmt(key):
            vals = [r[f"half{h}"][key] for h in (1, 2)]
            return " / ".join("n/a" if v is None else f"{v:+.1f}" for v in vals)
        ok = lambda key: all((r[f"half{h}"][key] or 0) >= 3 for h in (1, 2)) == (r["kind"] == "motion")  # noqa: E731
        band = r["half1"]["band_A"]
        rows.append({"data": r["label"], "band (A)": f"{band[0]:g}-{band[1]:.1f}",
                     "outside band": fmt("outside_band_z") + (" ok" if ok("outside_band_z") else " WRONG"),
                     "other half, full band": fmt("full_band_z") + (" ok" if ok("full_band_z") else " WRONG"),
                     "other half, sector split (gate)": fmt("split_z") + (" ok" if ok("split_z") else " WRONG")})
    cols = [(k, k) for k in ("data", "band (A)", "outside band", "other half, full band",
                             "other half, sector split (gate)")]
    md = ("# Motion-corrected map: significance tests of the half models' moves (issue 19)\n\n"
          "z (half 1 / half 2) of the mean per-particle gain of the decoded over the neutral model; a test "
          "passes at z >= 3. 'ok': kept where the particles move, rejected where they do not.\n\n"
          f"Machine: {json.dumps(common.machine_info())}\n\n" + common.markdown_table(rows, cols) + "\n")
    common.write_results("motion_gate", md, {"results": results})
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
