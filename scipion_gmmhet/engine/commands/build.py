"""Build a Gaussian mixture model that matches a map at a target resolution.

Progressive, as in e2gmm: a few Gaussians fitted at low resolution, then the number is doubled
(new Gaussians seeded next to existing ones) and the resolution raised, stage by stage, up to
the target. The fit is to the map's 3D Fourier transform with an FSC loss over the shells up to
the current resolution (see scipion_gmmhet/engine/model/build.py for why, and for the rule that picks
the number of Gaussians when --n-gauss is not given). With --mask, the map is fitted inside the
mask and Gaussians whose centre falls outside it are dropped.

Writes to --out:
  gmm.npz       the model (centers_A: Angstrom xyz from the centre voxel D//2; sigmas_A: Angstrom;
                amplitudes: peak density in map units; box, apix; info: target_resolution_A,
                fsc05_resolution_A, n_gauss)
  gmm_map.mrc   the model rendered at the input map's box and pixel size
  fsc.csv       shell, freq_invA, resolution_A, fsc: FSC between gmm_map.mrc and the input map
                (times the mask when one is given)
  summary.json  N, resolutions, time and the per-stage log
The log reports N and the resolution where that FSC drops below 0.5.

Examples:

    gmmhet build --map consensus.mrc --resolution 8 --out gmm/
    gmmhet build --map consensus.mrc --resolution 12 --mask mask.mrc --out gmm_masked/
    gmmhet build --map consensus.mrc --resolution 6 --n-gauss 4096 --device cuda --seed 1 --out gmm_4k/
"""
from __future__ import annotations

import argparse
import logging
import os

from ..io.atomic import make_output_dir
from ..errors import InputError

log = logging.getLogger("gmmhet.build")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", required=True, metavar="MAP.mrc", help="the map to model (cubic MRC)")
    parser.add_argument("--resolution", required=True, type=float, metavar="R",
                        help="target resolution in Angstrom (e.g. 8)")
    parser.add_argument("--mask", metavar="MASK.mrc", help="optional 0-1 mask on the map's grid")
    parser.add_argument("--n-gauss", type=int, default=0, metavar="N",
                        help="number of Gaussians (default 0: chosen from the map and the resolution)")
    parser.add_argument("--apix", type=float, metavar="A",
                        help="pixel size in Angstrom, overriding the headers of the map and the mask")
    parser.add_argument("--steps", type=int, default=300, metavar="S",
                        help="Adam steps per stage (the last stage runs twice as many; default 300)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def main(args) -> int:
    from ..io import validate
    from ..io.outputs import BuildFolder, write_fsc_csv, write_json
    from ..model.build import build_gmm
    from ..io.mrc import read_map, write_map

    if args.n_gauss < 0:
        raise InputError(f"--n-gauss {args.n_gauss}: must be 0 (automatic) or positive")
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be at least 1")
    vol, apix = read_map(args.map, apix=args.apix)
    validate.check_map(vol, apix, args.map)
    mask = None
    if args.mask:
        mask, mask_apix = read_map(args.mask, apix=args.apix)
        validate.check_mask_matches(mask.shape, mask_apix, vol.shape, apix, args.mask)
    make_output_dir(args.out)
    res = build_gmm(vol, apix, args.resolution, mask=mask, n_gauss=args.n_gauss or None, device=args.device,
                    seed=args.seed, steps=args.steps)
    gmm = res.gmm
    gmm.info.update(source_map=os.path.abspath(args.map))
    folder = BuildFolder(args.out)
    gmm.save(folder.gmm)
    write_map(folder.gmm_map, gmm.render(), apix)
    write_fsc_csv(folder.fsc, res.fsc)
    summary = dict(n_gauss=len(gmm), target_resolution_A=args.resolution,
                   fsc05_resolution_A=res.fsc05_resolution_A, box=gmm.box, apix=gmm.apix,
                   seconds=round(res.seconds, 2), map=os.path.abspath(args.map),
                   mask=os.path.abspath(args.mask) if args.mask else None, stages=res.history)
    write_json(folder.summary, summary)
    log.info("N = %d Gaussians; FSC(model, map) < 0.5 at %.3g A (target %.3g A); wrote %s",
             len(gmm), res.fsc05_resolution_A, args.resolution, args.out)
    return 0
