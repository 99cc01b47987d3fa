"""Simulate a cryo-EM particle dataset with known conformational/compositional heterogeneity.

Writes DIR/particles.star (RELION 3.1) + particles.mrcs, consensus.mrc (population-weighted
mean map), truth.csv (per particle: conformation c, composition label, pose, shift, defocus),
truth_maps/*.mrc and truth_gmm/*.npz (the ground-truth states) and simulation.json. The
molecule is a five-domain pseudo-atomic model (three core domains, a hinged arm, a subunit of
~13 % of the mass) scaled to fill ~60-70 % of the box. See scipion_gmmhet.engine.simulation.simulate.

examples:
  gmmhet simulate --out sim --kind conformational
  gmmhet simulate --out sim_mixed --kind mixed --n 20000 --box 96 --apix 2.0 --snr 0.05 --seed 3
  gmmhet simulate --out sim_comp --kind compositional --subunit-fraction 0.3 --n 2000 --box 48
  gmmhet simulate --out clean --kind homogeneous --n 100 --snr inf
  gmmhet simulate --out hinge --kind hinge --pdb tests/data/1ake.pdb --n 6000 --apix 1.5
  gmmhet simulate --out hinge_md --kind hinge --pdb tests/data/1ake.pdb --n 6000 --thermal 1.0 --frame all
  gmmhet simulate --out md --kind trajectory --pdb frames.pdb --n 6000 --apix 1.5

kinds hinge, two_motions and cyclic move the domains of a real structure (--pdb, adenylate
kinase numbering as PDB 1AKE: LID 122-159, NMP 30-59) rigidly about their hinges; see
scipion_gmmhet.engine.simulation.atomic; --thermal adds molecular-dynamics-like fluctuations of
every atom (RMS in Angstrom, different in each particle); --frame all superposes every
conformation on the middle one by all atoms, as molecular-dynamics frames usually are (the true
poses are then those of that frame; default core: the core never moves). Kind trajectory takes
any protein's molecular-dynamics frames, the MODELs of one PDB file in order (MDAnalysis, mdtraj
and gmx trjconv write them), superposes them on the middle frame by all atoms, and makes each
particle one frame drawn uniformly (truth.csv: frame, and conformation = frame / (frames - 1)).
"""
from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    from ..simulation.atomic import SYSTEMS
    from ..simulation.simulate import KINDS

    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--kind", required=True, choices=KINDS + SYSTEMS,
                        help="kind of heterogeneity (synthetic molecule), or a motion of a real structure: "
                             "hinge (LID and NMP open together), two_motions (independently), cyclic (LID "
                             "turns a full circle), trajectory (the MODELs of --pdb are the frames of a "
                             "molecular-dynamics trajectory); those need --pdb")
    parser.add_argument("--pdb", default=None, metavar="FILE",
                        help="atomic structure for hinge/two_motions/cyclic (adenylate kinase: 1AKE from the PDB, "
                             "or tests/data/1ake.pdb in a clone of the source); for trajectory a multi-model PDB, "
                             "one MODEL per frame")
    parser.add_argument("--thermal", type=float, default=0.0, metavar="A",
                        help="hinge/two_motions/cyclic: RMS thermal fluctuation of every atom in each particle, "
                             "Angstrom, like a molecular-dynamics ensemble (default 0: rigid domains)")
    parser.add_argument("--frame", choices=["core", "all"], default=None,
                        help="hinge/two_motions/cyclic: frame of the true poses: core (default; the core never "
                             "moves) or all (each conformation superposed on the middle one by all atoms, as "
                             "molecular-dynamics frames usually are; trajectory frames always are)")
    parser.add_argument("--n", type=int, default=5000, help="number of particles (default 5000)")
    parser.add_argument("--box", type=int, default=64, help="box size in pixels, even (default 64)")
    parser.add_argument("--apix", type=float, default=None,
                        help="pixel size in Angstrom (default 3.0; 1.5 for the real-structure kinds)")
    parser.add_argument("--snr", type=float, default=0.1,
                        help="signal-to-noise ratio: mean variance of the noiseless CTF-applied images / "
                             "noise variance; 'inf' for no noise (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of poses, CTF, states and noise (default 0)")
    parser.add_argument("--molecule-seed", type=int, default=0, help="seed of the molecule's shape (default 0)")
    parser.add_argument("--subunit-fraction", type=float, default=0.5,
                        help="fraction of particles with the subunit, compositional/mixed (default 0.5)")
    parser.add_argument("--states", type=int, default=5, dest="n_states_maps",
                        help="number of ground-truth conformation maps, evenly spaced in c (default 5)")
    parser.add_argument("--max-shift-px", type=float, default=2.0,
                        help="origin shifts uniform within +- this many pixels (default 2)")
    parser.add_argument("--no-ctf", action="store_true",
                        help="do not apply the CTF to the images (tests; the star still lists defoci)")
    parser.add_argument("--device", default="auto", help="torch device projecting the images (default auto)")


def main(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..errors import InputError
    from ..io.atomic import make_output_dir
    from ..simulation.atomic import SYSTEMS, simulate_atomic
    from ..simulation.simulate import simulate

    if args.kind in SYSTEMS and not args.pdb:
        raise InputError(f"--kind {args.kind}: needs an atomic structure; pass --pdb FILE "
                         "(e.g. 1AKE from the PDB, or tests/data/1ake.pdb in a clone of the source)")
    if args.thermal and args.kind not in SYSTEMS:
        raise InputError(f"--thermal {args.thermal:g}: only for the real-structure kinds "
                         f"({', '.join(SYSTEMS)}); drop it for --kind {args.kind}")
    if args.frame and args.kind not in SYSTEMS:
        raise InputError(f"--frame {args.frame}: only for the real-structure kinds "
                         f"({', '.join(SYSTEMS)}); drop it for --kind {args.kind}")
    args.device = str(resolve_device(args.device))  # a one-line error for cuda without a GPU
    make_output_dir(args.out)
    if args.kind in SYSTEMS:  # small atomic models: projected on the CPU
        result = simulate_atomic(args.out, args.kind, args.pdb, n=args.n, box=args.box, apix=args.apix or 1.5,
                                 snr=args.snr, seed=args.seed, max_shift_px=args.max_shift_px, ctf=not args.no_ctf,
                                 thermal_A=args.thermal, frame=args.frame or "core")
    else:
        result = simulate(args.out, args.kind, n=args.n, box=args.box, apix=args.apix or 3.0, snr=args.snr,
                          seed=args.seed, n_states_maps=args.n_states_maps, subunit_fraction=args.subunit_fraction,
                          molecule_seed=args.molecule_seed, max_shift_px=args.max_shift_px, ctf=not args.no_ctf,
                          device=args.device)
    s = result["summary"]
    print(f"wrote {s['n']} {s['kind']} particles ({s['box']} px, {s['apix']:g} A/px, SNR {s['snr']}) in "
          f"{s['seconds_total']:.1f} s: {result['star']}")
    return 0
