"""Latent posterior with more anchors: the posterior latents of a finished training, recomputed.

``gmmhet train --latent-estimate posterior`` (the default) scores every particle against
``latent_posterior.MAX_ANCHORS`` (64) decoded latent states and takes the posterior mean. When
the likelihood is sharp against the anchors' spacing (summary.json's ``median_peak_weight``
0.3-0.7 on the finer model's two-motion, full-circle and MD-like seed-2 sets), the posterior
means snap towards the anchors. This script takes a finished `bench_science.py` training (a
``train_*`` folder inside its data set folder, which holds ``truth.csv`` and ``particles.star``, or
its ``first_model``),
encodes the particles with its encoder (``TrainedModel.encode_particles``), fits ``M`` k-means
anchors for each ``--anchors`` value, recomputes the posterior latents of the training's
particles (centred by its centering.csv) with its own degrees of freedom, and scores them with
bench_science's metrics, next to the encoder's latents and the saved ``latent.npy``.

    OMP_NUM_THREADS=1 python benchmarks/bench_latent_anchors.py --system hinge \
        --run benchmarks/.scratch/science/hinge_n6000_box64_apix1.5_snr0.1_seed2_thermal1_frameall/train_finerws_<key> \
        --anchors 64,256 --name latent_anchors_md_s2

The cost of the posterior grows with ``M`` (``N x M`` projections). ``--refit M`` adds the
training's own refit (``latent_posterior`` module doc, step 4: after the first ``--anchors``
value's pass, ``M`` finer anchors, each particle scored only against those near its likely
coarse ones); with ``M`` in ``--anchors`` too, next to scoring all ``M`` for every particle:

    OMP_NUM_THREADS=1 python benchmarks/bench_latent_anchors.py --system cyclic \
        --run benchmarks/.scratch/science/cyclic_n6000_box64_apix1.5_snr0.1_seed1/train_finerws_<key>/first_model \
        --anchors 64,240 --refit 240 --name latent_anchors_refit_cyclic
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_science as bs  # noqa: E402
import common  # noqa: E402

from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402
from scipion_gmmhet.engine.training import latent_posterior as lp  # noqa: E402
from scipion_gmmhet.engine.training.trained import TrainedModel  # noqa: E402


def _row(label, seconds, peak, m: dict) -> dict:
    return {"latents": label, "seconds": None if seconds is None else round(seconds, 1),
            "median_peak_weight": peak, **{k: round(v, 4) for k, v in m.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished bench_science training folder (train_*)")
    p.add_argument("--system", default="hinge", help="its system (bench_science metrics): hinge, cyclic, ...")
    p.add_argument("--anchors", default="64,256", help="comma list of anchor counts")
    p.add_argument("--refit", type=int, default=0,
                   help="finer anchors of the training's refit after the first --anchors pass (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="latent_anchors")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    sim_dir = os.path.dirname(os.path.abspath(args.run))
    if not os.path.exists(os.path.join(sim_dir, "truth.csv")):  # a finer model's first_model folder
        sim_dir = os.path.dirname(sim_dir)
    star = os.path.join(sim_dir, "particles.star")
    truth = pd.read_csv(os.path.join(sim_dir, "truth.csv"))
    tm = TrainedModel(args.run)
    saved_anchors, tm.anchors = tm.anchors, None  # encode_particles then runs the encoder
    rows = []
    t0 = time.time()
    z_enc = tm.encode_particles(star)
    rows.append(_row("encoder", time.time() - t0, None, bs.metrics(args.system, z_enc, truth, args.run, sim_dir)))
    rows.append(_row(f"saved latent.npy ({len(saved_anchors.anchors) if saved_anchors else 0} anchors)", None, None,
                     bs.metrics(args.system, TrainFolder(args.run).read_latents(), truth, args.run, sim_dir)))
    particles, binner = tm.band_particles(star, centering_from=TrainFolder(args.run))  # as the training centred them
    seed = int(tm.config.get("seed", 0))
    items, first = np.arange(len(particles)), None
    for m in (int(x) for x in args.anchors.split(",")):
        anchors = lp.fit_anchors(z_enc, seed, max_anchors=m, per_anchor=1)
        anchors.n_dof = saved_anchors.n_dof if saved_anchors is not None else None
        t0 = time.time()
        z, peak, largest = lp.posterior_rows(tm.model.decoder, particles, binner, items, anchors, 256, "cpu")
        rows.append(_row(f"posterior, {m} anchors", time.time() - t0, round(float(np.median(peak)), 4),
                         bs.metrics(args.system, z, truth, args.run, sim_dir)))
        logging.info("%s", rows[-1])
        first = first or (anchors, largest)
    if args.refit and first is not None:
        finer = lp.finer_anchors(first[0], z_enc, seed, args.refit)  # as the training's refit fits them
        candidates = lp.finer_candidates(finer.coarse, finer, first[1])
        per_particle = float(candidates(0, len(items)).sum()) / len(items)
        t0 = time.time()
        z, peak, _ = lp.posterior_rows(tm.model.decoder, particles, binner, items, finer, 256, "cpu", candidates)
        rows.append(_row(f"refit: {len(finer.anchors)} anchors, {per_particle:.1f} per particle (near its likely "
                         f"{len(first[0].anchors)})", time.time() - t0, round(float(np.median(peak)), 4),
                         bs.metrics(args.system, z, truth, args.run, sim_dir)))
        logging.info("%s", rows[-1])
    info = common.machine_info()
    cols = list(dict.fromkeys(k for r in rows for k in r))
    md = "\n".join([f"# Latent posterior with more anchors ({args.system})", "", common.machine_line(info), "",
                    f"Training: {os.path.relpath(os.path.abspath(args.run), common.REPO)}; the degrees of freedom "
                    f"of the training's own posterior. Command: `python benchmarks/bench_latent_anchors.py "
                    f"--system {args.system} --run <that folder> --anchors {args.anchors}"
                    f"{f' --refit {args.refit}' if args.refit else ''}`", "",
                    common.markdown_table(rows, [(c, c) for c in cols]), ""])
    print(md)
    common.write_results(args.name, md, {"machine": info, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
