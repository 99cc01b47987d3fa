"""Reconstruct a 3D map from particles by direct Fourier inversion with CTF correction.

Reconstructs all particles of a star file, or the subset listed in --indices (0-based star
rows, a .npy array or a text file with one row per line), with Wiener-style CTF correction
(regularised by a fraction of the mean CTF^2 weight per shell), trilinear insertion on a
2x padded grid and gridding correction. Writes MAP.mrc, the half maps MAP_half1.mrc and
MAP_half2.mrc (from rlnRandomSubset, or a seeded random split), and MAP_fsc.csv (half-map
FSC per shell, unmasked and under an automatic soft solvent mask MAP_mask.mrc with RELION's
phase-randomisation correction), and logs both FSC 0.143 resolutions.

Examples:

    gmmhet reconstruct --particles sim/particles.star --out recon/consensus.mrc
    gmmhet reconstruct --particles particles.star --indices analysis/cluster_00_rows.txt --out cl00.mrc
    gmmhet reconstruct --particles particles.star --device cuda --batch-size 512 --out map.mrc
    gmmhet reconstruct --particles phaseflipped.star --ctf-mode phase_flipped --out map.mrc

Motion-corrected consensus map (docs/motion_corrected.md): every particle is inserted with its
own deformation undone, the deformation decoded by a model trained on the particle's half set
(rlnRandomSubset), so the half maps stay independent and their FSC honest. With --train only,
two half models are trained first with that run's settings and neutral GMM (into
MAP_halves/half1 and half2, reused when finished); --train-half1/--train-half2 give models
already trained on the two half stars instead:

    gmmhet reconstruct --particles particles.star --train train/ --motion-corrected --out mc.mrc
    gmmhet reconstruct --particles particles.star --motion-corrected --train-half1 t1/ \
        --train-half2 t2/ --out mc.mrc
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from ..io.atomic import make_output_dir
from ..errors import InputError

log = logging.getLogger("gmmhet.reconstruct")


def add_args(parser: argparse.ArgumentParser) -> None:
    from ..analysis.reconstruct import DEFAULT_REG_FRAC
    from ..ctf_modes import CTF_CHOICES
    parser.add_argument("--particles", required=True, metavar="STAR", help="particle star file (or cryoSPARC .cs)")
    parser.add_argument("--indices", metavar="FILE",
                        help="0-based star rows to reconstruct (.npy, or text: one integer per line)")
    parser.add_argument("--out", required=True, metavar="MAP.mrc", help="output map (.mrc)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="particles per insertion batch (default: chosen from the box size)")
    parser.add_argument("--pad", type=int, default=2, help="oversampling of the 3D Fourier grid (default 2)")
    parser.add_argument("--reg-frac", type=float, default=DEFAULT_REG_FRAC,
                        help="Wiener regulariser as a fraction of the mean CTF^2 weight per shell "
                             f"(default {DEFAULT_REG_FRAC})")
    parser.add_argument("--ctf-mode", choices=CTF_CHOICES, default=None,
                        help="how the images carry the CTF (default: 'full', or 'premultiplied' per "
                             "optics group as flagged by rlnCtfDataAreCtfPremultiplied); particles without CTF need 'none'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half split (default 0)")
    parser.add_argument("--images-root", metavar="DIR", help="directory the image names are relative to")
    parser.add_argument("--no-mask", action="store_true", help="skip the automatic mask and the masked FSC")
    g = parser.add_argument_group("motion-corrected map")
    g.add_argument("--motion-corrected", action="store_true",
                   help="undo each particle's decoded deformation before inserting it (needs --train, or "
                        "--train-half1 and --train-half2)")
    g.add_argument("--train", metavar="DIR", help="'gmmhet train' folder whose settings and neutral GMM the "
                                                 "half models are trained with (when not given)")
    g.add_argument("--train-half1", metavar="DIR", help="model trained on the half-1 particles only")
    g.add_argument("--train-half2", metavar="DIR", help="model trained on the half-2 particles only")
    g.add_argument("--halves-dir", metavar="DIR", help="where the half models are trained (default MAP_halves/)")
    g.add_argument("--half-epochs", type=int, default=None, metavar="E", help="epochs of each half model (default: --train's)")
    g.add_argument("--formulation", choices=["hybrid", "real_space"], default="hybrid",
                   help="hybrid (default): plain Fourier inversion + real-space backprojection of what the "
                        "deformation changes (equals the plain map without motion); real_space: deformed "
                        "real-space backprojection alone")
    g.add_argument("--gate-z", type=float, default=3.0, metavar="Z",
                   help="significance gate: a half model whose moves do not improve the fit of the other half's "
                        "particles (encoded from half of the band's Fourier sectors, scored on the rest) by Z "
                        "standard errors gets zero displacement, so noise-fitted moves cannot inflate the FSC "
                        "(default 3; 0 turns the gate off)")
    g.add_argument("--field-sigma", type=float, default=None, metavar="A",
                   help="width of the Gaussian interpolation of the moves, Angstrom (default: the neutral "
                        "Gaussians' median width, at least 2 pixels)")


def main(args: argparse.Namespace) -> int:
    from ..ctf_modes import ctf_mode as ctf_mode_name
    from ..io.metadata import read_particles
    from ..analysis.reconstruct import read_indices, reconstruct_particles

    out = os.path.abspath(args.out)
    if not out.endswith(".mrc"):
        raise InputError(f"{args.out}: output must be a .mrc file")
    if os.path.abspath(args.particles) == out:
        raise InputError(f"{args.out}: same file as the input; write the map elsewhere")
    if args.pad < 1 or args.reg_frac < 0:
        raise InputError("--pad must be >= 1 and --reg-frac >= 0")
    if args.motion_corrected or args.train or args.train_half1 or args.train_half2:
        _check_motion_args(args)
    make_output_dir(os.path.dirname(out))
    meta = read_particles(args.particles, images_root=args.images_root)
    ctf_mode = None if args.ctf_mode is None else ctf_mode_name(args.ctf_mode, "--ctf-mode")
    ctf_mode = None if ctf_mode == "auto" else ctf_mode
    from ..io.validate import resolve_ctf_mode
    if not meta.has_ctf():  # ignoring the CTF is an explicit choice (--ctf-mode none)
        resolve_ctf_mode(False, ctf_mode, args.particles, option="--ctf-mode none")
    meta.validate(require_alignment=True, require_ctf=ctf_mode not in ("none",) and meta.has_ctf(),
                  check_images=True, allow_duplicates=True)
    from ..io.data import ParticleImages
    from ..io.validate import check_images_finite
    check_images_finite(ParticleImages(meta), sample=256, name=args.particles)
    rows = read_indices(args.indices, len(meta)) if args.indices else None
    n = len(meta) if rows is None else rows.size
    log.info("reconstructing %d of %d particles (box %d px, %.4g A/px) on %s%s", n, len(meta), meta.box,
             meta.apix, args.device, " with each particle's deformation undone" if args.motion_corrected else "")
    if args.motion_corrected:
        rec = _motion_corrected(args, meta, rows, ctf_mode, out)
    else:
        rec = reconstruct_particles(meta, rows, seed=args.seed, pad=args.pad, reg_frac=args.reg_frac,
                                    batch_size=args.batch_size, device=args.device, ctf_mode=ctf_mode,
                                    mask=not args.no_mask)
    paths = rec.write(out)
    summary = rec.summary()
    log.info("half maps: %d + %d particles; FSC 0.143 resolution %.2f A unmasked, %.2f A with the automatic "
             "solvent mask (phase-randomisation corrected); Nyquist %.2f A; %.1f s", rec.half_sizes[0],
             rec.half_sizes[1], rec.resolution_0143_A, rec.resolution_0143_masked_A, 2 * rec.apix, rec.seconds)
    for role, p in paths.items():
        log.info("wrote %s (%s)", p, role)
    log.debug(json.dumps(summary))
    return 0


def _check_motion_args(args) -> list:
    """The half-model folders given (both or none); InputError for an incomplete choice."""
    halves_given = [d for d in (args.train_half1, args.train_half2) if d]
    if len(halves_given) == 1:
        raise InputError("--train-half1 and --train-half2 go together: give both, or only --train")
    if not halves_given and not args.train:
        raise InputError("--motion-corrected needs --train DIR (half models are trained from it) or "
                         "--train-half1 DIR --train-half2 DIR")
    if not args.motion_corrected and (halves_given or args.train):
        raise InputError("--train/--train-half1/--train-half2 are for --motion-corrected; add it, or leave them out")
    return halves_given


def _motion_corrected(args, meta, rows, ctf_mode, out):
    from ..analysis import motion_corrected as mc
    from ..analysis.reconstruct import half_assignment
    halves_given = _check_motion_args(args)
    from ..device import resolve_device
    dev = resolve_device(args.device)
    halves = half_assignment(meta, args.seed)
    if halves_given:
        dirs = {1: args.train_half1, 2: args.train_half2}
    else:
        hdir = args.halves_dir or out[:-4] + "_halves"
        dirs = mc.train_half_models(meta, halves, args.train, hdir, device=dev, epochs=args.half_epochs)
    moves = mc.half_moves(meta, halves, dirs, device=dev, gate_z=args.gate_z)
    return mc.reconstruct_motion_corrected(meta, moves, rows, halves=halves, seed=args.seed, reg_frac=args.reg_frac,
                                           batch_size=args.batch_size, device=dev, ctf_mode=ctf_mode,
                                           field_sigma_A=args.field_sigma, formulation=args.formulation,
                                           mask=not args.no_mask)
