"""Refine one domain's orientation per particle and reconstruct it (e2gmm's focused refinement).

A flexible domain is blurred in the consensus map. For every particle of STAR (at its refined
particle pose), the domain's pose is found: the rigid motion of the domain in the GMM the
trained network decodes for the particle, composed with the particle pose, then a local search
(rotations within --max-angle degrees about the domain's centre, shifts within --max-shift
Angstrom) of the neutral domain's projection against the particle with the decoded rest
subtracted (see scipion_gmmhet.engine.analysis.domain_refine). The domain is the Gaussians inside
--domain-mask (> 0.5), or, without a mask, the Gaussians the decoder moves (the complement of the
automatic rigid core).

The domain is then reconstructed from the signal-subtracted particles (the decoded rest's
projection removed) with the domain poses, and, for comparison, from the same particles with
their particle poses; both with half maps and the FSC under the domain mask.

Writes OUT/domain_particles.star (the input star with the domain poses), OUT/domain_poses.csv,
OUT/domain.mrc (+ _half1, _half2, _mask, _fsc.csv), OUT/plain.mrc (the same for the particle
poses) and OUT/domain_summary.json (masked FSC 0.143 resolutions, median changes).

Examples:
  gmmhet refine-domain --train train/ --particles refine/particles.star --out domain/
  gmmhet refine-domain --train train/ --particles refine/particles.star --domain-mask arm.mrc \\
      --max-angle 10 --device cuda --out domain_arm/
"""
from __future__ import annotations

import argparse
import logging
import math

import numpy as np

from ..ctf_modes import CTF_CHOICES, ctf_mode as ctf_mode_name
from ..errors import InputError
from ..io.atomic import make_output_dir
from ..io.outputs import DomainFolder, n_moved, write_csv, write_json

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="DIR", help="output folder of 'gmmhet train'")
    p.add_argument("--particles", required=True, metavar="STAR",
                   help="particle star file with the particle poses (e.g. 'gmmhet refine' OUT/particles.star)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--domain-mask", default=None, metavar="MASK.mrc",
                   help="the domain: Gaussians whose centre is inside the mask (> 0.5); default: the Gaussians "
                        "the decoder moves across the latent space (complement of the automatic rigid core)")
    p.add_argument("--max-angle", type=float, default=6.0, metavar="DEG",
                   help="largest rotation of the domain about its centre away from its decoded orientation, "
                        "degrees (default 6)")
    p.add_argument("--max-shift", type=float, default=None, metavar="A",
                   help="largest shift of the domain, Angstrom (default 2 pixels)")
    p.add_argument("--lowres", type=float, default=None, metavar="A",
                   help="score band low-resolution limit, Angstrom (default: the training band's)")
    p.add_argument("--highres", type=float, default=None, metavar="A",
                   help="score band high-resolution limit, Angstrom (default: 2.07 x the median Gaussian width)")
    p.add_argument("--score", choices=["wcc", "frc"], default="wcc", help="score as 'gmmhet refine' (default wcc)")
    p.add_argument("--levels", type=int, default=3, help="finer rotation lattices after the coarse one (default 3)")
    p.add_argument("--min-gain", type=float, default=None, metavar="NATS",
                   help="evidence a new domain pose needs over the decoded one, nats (default 5.5)")
    p.add_argument("--latents", default=None, metavar="Z.npy",
                   help="latent vectors (row i = particle row i of STAR); default as 'gmmhet refine'")
    p.add_argument("--encode", action="store_true", help="encode the particles instead of using the training latents")
    p.add_argument("--ctf", dest="ctf_mode", choices=CTF_CHOICES, default=None,
                   help="how the images carry the CTF (default: the training run's)")
    p.add_argument("--batch-size", type=int, default=64, help="particles per batch (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")


def main(args) -> int:
    from ..analysis import domain_refine, refine
    from ..analysis.reconstruct import masked_fsc, reconstruct_particles
    from ..conventions import matrix_to_euler
    from ..device import resolve_device
    from ..io import metadata
    from ..io.data import Particles
    from ..model.fourier import resolution_at_threshold
    from ..training.features import focus_mask_gaussians
    from ..training.trained import load_trained
    from .refine import particle_latents

    for name, v in (("--max-angle", args.max_angle), ("--max-shift", args.max_shift)):
        if v is not None and not v >= 0:
            raise InputError(f"{name} {v}: must be >= 0")
    device = resolve_device(args.device)
    tm = load_trained(args.train, device)
    cfg = tm.config
    if cfg.get("symmetry") and str(cfg["symmetry"]).upper() not in ("C1", "NONE"):
        raise InputError(f"--train {args.train}: trained with symmetry {cfg['symmetry']}; refine-domain needs a C1 "
                         "training (a domain's motion breaks the symmetry)")
    ctf_mode = ctf_mode_name(args.ctf_mode, "--ctf") if args.ctf_mode else cfg.get("ctf_mode", "auto")
    parts = Particles.from_star(args.particles, ctf_mode=ctf_mode, device=device)
    meta = metadata.read_particles(args.particles)
    if parts.box != tm.neutral.box or abs(parts.apix - tm.neutral.apix) > 1e-3 * tm.neutral.apix:
        raise InputError(f"--particles {args.particles}: box {parts.box} at {parts.apix:.4f} A/px but the model is "
                         f"box {tm.neutral.box} at {tm.neutral.apix:.4f} A/px; use the particles it was trained on")
    make_output_dir(args.out)
    latents = particle_latents(tm, args.particles, len(meta), 1, args.latents, args.encode, device)
    models = refine.LatentModels(tm, latents)
    if args.domain_mask:
        domain = np.isin(np.arange(len(tm.neutral)), focus_mask_gaussians(tm.neutral, args.domain_mask, "--domain-mask"))
    else:
        domain = domain_refine.domain_from_motion(models, device=device)
    res = domain_refine.refine_domain(
        parts, models, domain, max_angle_deg=args.max_angle, max_shift_A=args.max_shift,
        lowres_A=args.lowres if args.lowres is not None else cfg.get("lowres_A"), highres_A=args.highres,
        levels=args.levels, score=args.score, batch_size=args.batch_size,
        min_gain=refine.MIN_GAIN_NATS if args.min_gain is None else args.min_gain)
    folder = DomainFolder(args.out)
    dmeta = meta.with_poses(np.stack(matrix_to_euler(res.rotations), axis=1), res.origins_A)
    metadata.write_particles(folder.particles, dmeta)
    _write_table(folder, meta, res)
    mask = _domain_mask(args, tm, models, domain)
    images = domain_refine.DomainSignalImages(parts, models, domain)
    summary = {"n_particles": len(meta), "n_domain_gaussians": int(domain.sum()), "n_gaussians": len(domain),
               "domain_from": args.domain_mask or "decoder motion",
               "decoded_angle_median_deg": float(np.median(res.decoded_angle_deg)),
               "search_angle_median_deg": float(np.median(res.delta_angle_deg)),
               "search_shift_median_A": float(np.median(res.delta_shift_A)),
               "n_moved_by_search": n_moved(res.delta_angle_deg, res.delta_shift_A)}
    for key, m, path in (("plain", meta, folder.plain_map), ("domain", dmeta, folder.domain_map)):
        rec = reconstruct_particles(m, images=images, device=str(device), ctf_mode=parts.ctf_mode, mask=False)
        rec.mask = mask
        rec.fsc_masked = masked_fsc(rec.half1, rec.half2, mask, rec.apix)
        rec.resolution_0143_masked_A = resolution_at_threshold(rec.fsc_masked["freq_invA"], rec.fsc_masked["fsc"],
                                                               0.143)
        rec.write(path)
        summary[f"{key}_resolution_0143_masked_A"] = _finite(rec.resolution_0143_masked_A)
        summary[f"{key}_fsc_masked_mean"] = float(np.mean(rec.fsc_masked["fsc"][1:]))
    write_json(folder.summary, summary)
    log.info("refine-domain: %d of %d Gaussians; decoded domain rotation median %.2f deg, search change median "
             "%.2f deg / %.2f A (%d of %d particles moved); domain-masked FSC 0.143: particle poses %s A, domain "
             "poses %s A; wrote %s", summary["n_domain_gaussians"], len(domain), summary["decoded_angle_median_deg"],
             summary["search_angle_median_deg"], summary["search_shift_median_A"], summary["n_moved_by_search"],
             len(meta), _fmt_A(summary["plain_resolution_0143_masked_A"]),
             _fmt_A(summary["domain_resolution_0143_masked_A"]),
             args.out)
    return 0


def _finite(x: float):
    return float(x) if math.isfinite(x) else None


def _fmt_A(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _domain_mask(args, tm, models, domain) -> np.ndarray:
    """The user's --domain-mask map, else the soft mask of the domain's neutral Gaussians."""
    from ..analysis.domain_refine import domain_mask_map
    if args.domain_mask:
        from ..io.mrc import read_map
        vol, _ = read_map(args.domain_mask)
        return np.clip(np.asarray(vol, dtype=np.float32), 0.0, 1.0)
    return domain_mask_map(models, domain, tm.neutral.box, tm.neutral.apix)


def _write_table(folder: DomainFolder, meta, res) -> None:
    import pandas as pd
    from ..conventions import matrix_to_euler
    t = pd.DataFrame({"row": np.arange(len(meta))})
    if "rlnGmmhetParticleId" in meta.particles.columns:
        t["particle_id"] = meta.particles["rlnGmmhetParticleId"].to_numpy()
    t["decoded_angle_deg"] = res.decoded_angle_deg
    t["search_angle_deg"], t["search_shift_A"] = res.delta_angle_deg, res.delta_shift_A
    t["score_before"], t["score_after"] = res.score_before, res.score_after
    e = np.stack(matrix_to_euler(res.rotations), axis=1)
    t["rot"], t["tilt"], t["psi"] = e[:, 0], e[:, 1], e[:, 2]
    t["origin_x_A"], t["origin_y_A"] = res.origins_A[:, 0], res.origins_A[:, 1]
    write_csv(folder.domain_poses, t)
