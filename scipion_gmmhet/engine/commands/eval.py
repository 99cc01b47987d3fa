"""Render the trained model's GMM at latent points (decoder only) as MRC maps.

One point: --z Z1,...,ZK -> OUT (a .mrc). Many points: --z-file FILE (one point per row,
K numbers separated by spaces or commas) -> OUT_000.mrc, OUT_001.mrc, ... Maps have the
GMM's box and pixel size unless --box/--apix say otherwise.

Examples:
  gmmhet eval --train train/ --z 0,0,0,0 --out neutral.mrc
  gmmhet eval --train train/ --z 1.5,-0.2,0,0.3 --out state.mrc --box 128 --apix 1.5
  gmmhet eval --train train/ --z-file pc1_points.txt --out pc1.mrc
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from ..io.atomic import make_output_dir
from ..errors import InputError

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="output folder of 'gmmhet train'")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--z", help="one latent point, K comma-separated numbers")
    g.add_argument("--z-file", help="text file with one latent point per row")
    p.add_argument("--out", required=True, help="output map (.mrc); with --z-file, the stem of OUT_NNN.mrc")
    p.add_argument("--box", type=int, default=None, help="output box in pixels (default: the GMM's)")
    p.add_argument("--apix", type=float, default=None, help="output pixel size in A (default: the GMM's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def _points(args, zdim: int) -> np.ndarray:
    if args.z is not None:
        try:
            z = np.array([float(v) for v in args.z.replace(" ", "").split(",") if v != ""], dtype=np.float32)[None]
        except ValueError:
            raise InputError(f"--z {args.z!r}: give {zdim} comma-separated numbers") from None
    else:
        if not os.path.exists(args.z_file):
            raise InputError(f"--z-file {args.z_file}: no such file")
        try:
            with open(args.z_file) as f:
                rows = [line.replace(",", " ").split() for line in f if line.strip() and not line.startswith("#")]
            z = np.array([[float(v) for v in r] for r in rows], dtype=np.float32)
        except ValueError:
            raise InputError(f"--z-file {args.z_file}: rows must hold {zdim} numbers each") from None
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] != zdim or not np.isfinite(z).all():
        raise InputError(f"latent point(s) of shape {z.shape}: this model's latent space has {zdim} dimensions; "
                         f"give {zdim} finite numbers per point")
    return z


def main(args) -> int:
    from ..io.mrc import write_map
    from ..training.trained import load_trained
    if args.box is not None and args.box < 2 or args.apix is not None and args.apix <= 0:
        raise InputError("--box must be >= 2 and --apix > 0")
    tm = load_trained(args.train, device=args.device)
    z = _points(args, tm.zdim)
    box = args.box or tm.neutral.box
    apix = args.apix or tm.neutral.apix
    if args.z is not None:
        outs = [args.out]
    else:
        stem = args.out[:-4] if args.out.lower().endswith(".mrc") else args.out
        outs = [f"{stem}_{i:03d}.mrc" for i in range(len(z))]
    for point, path in zip(z, outs):
        d = os.path.dirname(os.path.abspath(path))
        make_output_dir(d)
        write_map(path, tm.gmm_at(point).render(box, apix), apix)
        log.info("z = [%s] -> %s (box %d, %.4g A/px)", ", ".join(f"{v:.4g}" for v in point), path, box, apix)
    return 0
