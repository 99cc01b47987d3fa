"""Convert RELION (3.0-5) or cryoSPARC particle metadata to the engine's canonical RELION 3.1 star.

Reads a RELION star file of any version (optics groups, origins in pixels or Angstrom,
phase shift, rlnCtfDataAreCtfPremultiplied) or a cryoSPARC particle export (.cs with 3D
alignments and CTF) and writes one RELION 3.1 star (data_optics + data_particles) with the
same poses, shifts and CTF, image names pointing at the same stacks.

Examples:

    gmmhet convert Refine3D/job012/run_data.star --out particles.star
    gmmhet convert old_relion30.star --apix 1.06 --out particles.star
    gmmhet convert P3_J42_particles_exported.cs --images-root /data/cryosparc/P3 --out particles.star
    gmmhet convert poses_only.star --skip-image-check --out canonical.star
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from ..io.atomic import make_output_dir
from ..errors import InputError
from ..io.metadata import read_particles, write_particles

log = logging.getLogger("gmmhet.convert")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="RELION .star (3.0, 3.1, 4, 5) or cryoSPARC .cs particle file")
    parser.add_argument("--out", required=True, metavar="OUT.star", help="canonical RELION 3.1 star to write")
    parser.add_argument("--images-root", metavar="DIR",
                        help="directory the image names are relative to (default: the input's "
                             "directory or the first parent directory holding the stacks)")
    parser.add_argument("--apix", type=float, metavar="A",
                        help="pixel size in Angstrom (required for RELION 3.0 stars without one; "
                             "overrides the file's pixel size)")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="do not open the image stacks (convert poses/CTF only)")


def main(args: argparse.Namespace) -> int:
    src, out = os.path.abspath(args.input), os.path.abspath(args.out)
    if src == out:
        raise InputError(f"{args.out}: same file as the input; write the canonical star elsewhere")
    if not out.endswith(".star"):
        raise InputError(f"{args.out}: output must be a .star file")
    make_output_dir(os.path.dirname(out))
    meta = read_particles(args.input, images_root=args.images_root, apix=args.apix)
    meta.validate(require_alignment=False, require_ctf=False,
                  check_images=not args.skip_image_check, allow_duplicates=True)
    paths, idx = meta.image_locations()
    n_dup = int(len(meta) - len(set(zip(paths.tolist(), idx.tolist()))))
    optics = meta.optics
    px = ", ".join(f"{name} {apix:g} A/px" for name, apix in
                   zip(optics["rlnOpticsGroupName"], optics["rlnImagePixelSize"]))
    box = (", ".join(str(v) for v in sorted(set(optics["rlnImageSize"].tolist())))
           if "rlnImageSize" in optics.columns else "unknown")
    log.info("%s: %d particles in %d stack(s), %d optics group(s)", args.input, len(meta),
             len(set(paths.tolist())), len(optics))
    log.info("pixel size: %s; box: %s px", px, box)
    log.info("3D alignment: %s; CTF: %s; CTF-premultiplied: %s", "yes" if meta.has_alignment_3d() else "NO",
             "yes" if meta.has_ctf() else "NO", bool(np.any(meta.ctf_premultiplied())) if len(meta) else False)
    if n_dup:
        log.warning("%d particle(s) repeat an image already listed (symmetry-expanded star?)", n_dup)
    if len(set(optics["rlnImagePixelSize"].round(6).tolist())) > 1:
        log.warning("optics groups have different pixel sizes: the engine's other commands need one")
    write_particles(args.out, meta)
    log.info("wrote %s", args.out)
    return 0
