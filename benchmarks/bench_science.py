"""Does the method find the real motion at default settings? Latent quality on hard systems.

Systems (simulated, SNR 0.1, CTF, exact poses, 64 px):

- ``hinge``: adenylate kinase (tests/data/1ake.pdb) at 1.5 A/px, LID and NMP opening together
  (one truth coordinate); metrics |Spearman(PC1, truth)|, |Spearman(trajectory coordinate,
  truth)| (the 1-D manifold coordinate of ``gmmhet analyze``, when the engine has it), and the
  kNN R2 (5-fold cross-validated k-nearest-neighbour regression, k = 15, of the truth on the
  latents: how well the latent space *determines* the motion, whatever its shape).
- ``two_motions``: LID and NMP independently; for each domain the latent direction that moves
  that domain's Gaussians most and the rest least (:func:`latent.domain_motion`, masks from the
  atoms), its |Spearman| with its own motion and with the other one.
- ``cyclic``: LID turning a full circle; circular agreement (mean cosine of the residual after the
  best rotation and reflection: :func:`circular_agreement`; the median residual in degrees) of the
  angle in the whitened plane of the first two latent PCs with the truth angle, |.|.
- ``trajectory``: the frames of a molecular-dynamics trajectory (``--trajectory``, a multi-model
  PDB; e.g. adenylate kinase opening, MDAnalysis' ``adk_dims.dcd`` converted by md_frames.py),
  each particle one frame; the hinge's metrics against the frame number.
- ``mixed`` / ``conformational``: the five-domain synthetic molecule (3 A/px); ARI of k-means
  k=2 on the whitened latents, |Spearman| within each composition, as bench_latent_quality.

Pipeline per system: simulate (kept in --workdir) -> ``build_gmm`` on the consensus at
--resolution (8 A) -> ``train`` (TrainConfig defaults, zdim 4, unless --set) -> metrics.
Training runs are keyed by their settings and reused with --reuse. Run with 1-2 threads here:

    nice -n 10 python benchmarks/bench_science.py --systems hinge --n 6000
    nice -n 10 python benchmarks/bench_science.py --systems hinge --n 6000 --set highres_A=8 --tag hr8
    nice -n 10 python benchmarks/bench_science.py --systems trajectory --trajectory adk_dims_frames.pdb --epochs 20
    python benchmarks/bench_science.py --systems hinge,two_motions,cyclic,mixed --device cuda --threads 8

Writes benchmarks/results/science[_TAG].md and .json (one row per system).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_predict, KFold
from sklearn.neighbors import KNeighborsRegressor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

from scipion_gmmhet.engine.io.mrc import read_map  # noqa: E402
from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402
from scipion_gmmhet.engine.model.build import build_gmm  # noqa: E402
from scipion_gmmhet.engine.model.gmm import GMM  # noqa: E402
from scipion_gmmhet.engine.simulation.atomic import SYSTEMS, domain_atoms_mask, simulate_atomic  # noqa: E402
from scipion_gmmhet.engine.simulation.simulate import simulate  # noqa: E402
from scipion_gmmhet.engine.io.data import Particles  # noqa: E402
from scipion_gmmhet.engine.training.config import TrainConfig  # noqa: E402
from scipion_gmmhet.engine.training.finer_model import train_model  # noqa: E402
from scipion_gmmhet.engine.training.trained import TrainedModel  # noqa: E402

log = logging.getLogger("bench_science")
PDB = os.path.join(common.REPO, "tests", "data", "1ake.pdb")
TARGETS = {"hinge": "|Spearman| >= 0.98, kNN R2 >= 0.95", "two_motions": "own >= 0.95, other <= 0.2",
           "cyclic": "circular corr >= 0.95", "mixed": "ARI >= 0.98, within-composition |Spearman| >= 0.95",
           "conformational": "|Spearman| >= 0.9 (bench_latent_quality)",
           "trajectory": "|Spearman| >= 0.97 (issue 13's held-back molecular-dynamics target)"}


# ----------------------------------------------------------------------------- metrics
def pc1(z: np.ndarray) -> np.ndarray:
    return PCA(1).fit_transform(z - z.mean(0))[:, 0]


def abs_spearman(a, b) -> float:
    return abs(float(spearmanr(a, b).correlation))


def knn_r2(z: np.ndarray, y: np.ndarray, k: int = 15, seed: int = 0) -> float:
    """5-fold cross-validated R2 of a k-NN regression of ``y`` on the (PCA-whitened) latents."""
    zw = PCA(whiten=True).fit_transform(z - z.mean(0))
    pred = cross_val_predict(KNeighborsRegressor(k), zw, y, cv=KFold(5, shuffle=True, random_state=seed))
    return float(1.0 - np.mean((pred - y) ** 2) / np.var(y))


def circular_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Jammalamadaka-SenGupta circular correlation of angles ``a``, ``b`` (radians). Centred on
    each sample's circular mean, which is undefined for angles spread evenly round the circle:
    there it swings between -1 and 1 for a perfect relation (kept for comparison only)."""
    def centred(x):
        return np.sin(x - np.angle(np.mean(np.exp(1j * x))))
    sa, sb = centred(a), centred(b)
    return float(np.sum(sa * sb) / np.sqrt(np.sum(sa * sa) * np.sum(sb * sb)))


def circular_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """How well angle ``b`` recovers angle ``a`` (radians) up to the latent's free rotation and
    reflection: ``(mean cos(residual), median |residual| deg)`` after the best offset ``c`` and
    sign ``s`` (``residual = b - s a - c``); the mean cosine is the mean resultant length of the
    differences: 1 for a perfect relation, ~0 (1/sqrt(n)) for independent angles. Unlike the
    Jammalamadaka-SenGupta coefficient it is defined for angles spread round the whole circle."""
    best = None
    for sign in (1.0, -1.0):
        r = np.mean(np.exp(1j * (b - sign * a)))
        if best is None or abs(r) > abs(best[0]):
            best = (r, sign)
    r, sign = best
    resid = np.angle(np.exp(1j * (b - sign * a - np.angle(r))))
    return float(abs(r)), float(np.degrees(np.median(np.abs(resid))))


def trajectory_coordinate(z: np.ndarray):
    """The engine's 1-D manifold coordinate, when it has one (``analysis.trajectory``)."""
    try:
        from scipion_gmmhet.engine.analysis.trajectory import manifold_coordinate
    except ImportError:
        return None
    return manifold_coordinate(z).coordinate


def metrics(system: str, z: np.ndarray, truth: pd.DataFrame, run_dir: str, sim_dir: str) -> dict:
    out = {"pc1_variance": float(PCA().fit(z - z.mean(0)).explained_variance_ratio_[0])}
    if system in ("hinge", "conformational", "trajectory"):
        y = truth["conformation"].to_numpy()
        out["spearman_pc1"] = abs_spearman(pc1(z), y)
        out["knn_r2"] = knn_r2(z, y)
        t = trajectory_coordinate(z)
        if t is not None:
            out["spearman_trajectory"] = abs_spearman(t, y)
    if system == "mixed":
        white = PCA(whiten=True).fit_transform(z - z.mean(0))
        out["ari"] = float(adjusted_rand_score(truth["composition"], KMeans(2, n_init=10, random_state=0).fit_predict(white)))
        out["ari_raw"] = float(adjusted_rand_score(truth["composition"], KMeans(2, n_init=10, random_state=0).fit_predict(z)))
        for comp in (0, 1):
            sel = (truth["composition"] == comp).to_numpy()
            out[f"spearman_comp{comp}"] = abs_spearman(pc1(z[sel]), truth["conformation"][sel])
    if system == "cyclic":
        xy = PCA(2, whiten=True).fit_transform(z - z.mean(0))
        latent_angle, true_angle = np.arctan2(xy[:, 1], xy[:, 0]), np.radians(truth["angle_deg"].to_numpy())
        out["circular_corr"], out["angle_error_deg"] = circular_agreement(true_angle, latent_angle)
        out["js_circular_corr"] = abs(circular_correlation(latent_angle, true_angle))
    if system == "two_motions":
        out.update(two_motion_metrics(z, truth, run_dir, sim_dir))
    return out


def two_motion_metrics(z: np.ndarray, truth: pd.DataFrame, run_dir: str, sim_dir: str) -> dict:
    from scipion_gmmhet.engine.analysis.latent import domain_motion
    model = TrainedModel(run_dir)
    out = {}
    for dom, own, other in (("LID", "motion_lid", "motion_nmp"), ("NMP", "motion_nmp", "motion_lid")):
        mask = domain_atoms_mask(os.path.join(sim_dir, "simulation.json"), PDB, model.neutral.centers_A, dom)
        v = domain_motion(model, z, mask).direction
        proj = z @ v
        out[f"{dom.lower()}_own"] = abs_spearman(proj, truth[own])
        out[f"{dom.lower()}_other"] = abs_spearman(proj, truth[other])
    return out


def grid_correlations(particles, binner, rows: np.ndarray, n_points: int, centers_at, amplitudes, sigmas_A,
                      batch: int = 100) -> np.ndarray:
    """Band correlation ``(len(rows), n_points)`` of each particle of ``rows`` (at its exact pose,
    CTF and shift) with a model at each of ``n_points`` states: ``centers_at(g, B)`` gives the
    ``(B, N, 3)`` Angstrom centres of state ``g`` for a batch of ``B``; ``amplitudes``, ``sigmas_A``
    ``(N,)`` are shared by all states. ``binner``: the band (:class:`fourier.RingBinner`)."""
    from scipion_gmmhet.engine.model.gmm import project
    out = []
    with torch.no_grad():
        for i0 in range(0, len(rows), batch):
            b = particles.batch(rows[i0:i0 + batch])
            B = len(b.rotations)
            out.append(torch.stack([binner.band_corr(project(torch.as_tensor(centers_at(g, B), dtype=torch.float32),
                                                             amplitudes, sigmas_A, b.rotations, particles.fbox,
                                                             particles.fapix, b.origins_A, b.ctf), b.F_img)
                                    for g in range(n_points)], 1).double().cpu().numpy())
    return np.concatenate(out)


def bayes_ceiling(sim_dir: str, band_A: tuple | None, n: int = 1500, grid: int = 41,
                  system: str = "hinge", pdb: str = PDB) -> dict:
    """The best |Spearman| any per-particle estimate can reach on the ``hinge`` or ``two_motions``
    data: each of ``n`` particles (every (N/n)-th) is scored against the TRUE atomic model at every
    point of a grid of truth coordinates (``grid`` values for the hinge's one coordinate; ``grid``
    x ``grid`` for two_motions' two), at its exact pose and CTF, by the band correlation over
    ``band_A`` = (low, high) Angstrom (None: every ring to Nyquist, the whole image's white-noise
    likelihood), and ranked by the best-scoring point (maximum likelihood); ``trajectory``: every
    frame of ``pdb`` (``grid`` ignored). No model, network or
    training can rank the particles much better from the same images in that band (the
    posterior mean over the same states ranks 0.0004-0.0017 better: bench_latent_budget.py).
    Returns {truth column: ceiling}, and {truth column + "_knn_r2": kNN R2 of the truth on
    that best point} (:func:`knn_r2`, the latents' metric, on the ceiling's estimate)."""
    from scipion_gmmhet.engine.model.fourier import RingBinner
    from scipion_gmmhet.engine.simulation.atomic import ATOM_SIGMA_A, build_system
    with open(os.path.join(sim_dir, "simulation.json")) as f:
        sysm = build_system(system, pdb, json.load(f).get("frame", "core"))
    if sysm.frames_A is not None:
        grid = len(sysm.frames_A)
    particles = Particles.from_star(os.path.join(sim_dir, "particles.star"))
    lo, hi = band_A if band_A else (None, None)
    particles.crop(hi)
    binner = RingBinner(particles.fbox, particles.fapix, lo, hi, loss="corr")
    truth = pd.read_csv(os.path.join(sim_dir, "truth.csv"))[list(sysm.coords)].to_numpy()
    rows = np.linspace(0, len(truth) - 1, min(n, len(truth))).round().astype(int)
    axis = np.linspace(0.0, 1.0, grid)
    points = np.stack(np.meshgrid(*[axis] * len(sysm.coords), indexing="ij"), -1).reshape(-1, len(sysm.coords))
    electrons = torch.as_tensor(sysm.electrons, dtype=torch.float32)
    sigmas = torch.full((len(electrons),), ATOM_SIGMA_A)
    rho = grid_correlations(particles, binner, rows, len(points),
                            lambda g, B: sysm.centers(np.repeat(points[g][None], B, 0)), electrons, sigmas)
    best = points[rho.argmax(1)]
    out = {c: abs_spearman(best[:, i], truth[rows, i]) for i, c in enumerate(sysm.coords)}
    out.update({c + "_knn_r2": knn_r2(best, truth[rows, i]) for i, c in enumerate(sysm.coords)})
    return out


# ----------------------------------------------------------------------------- pipeline
def structure(system: str, args) -> str:
    """The PDB file of an atomic system: ``--trajectory``'s frames, or 1AKE."""
    if system != "trajectory":
        return PDB
    if not args.trajectory:
        sys.exit("--systems trajectory needs --trajectory FRAMES.pdb (a multi-model PDB; see md_frames.py)")
    return os.path.abspath(args.trajectory)


def dataset(system: str, args) -> str:
    apix = args.apix if system in SYSTEMS else 3.0
    thermal = f"_thermal{args.thermal:g}" if args.thermal and system in SYSTEMS else ""
    thermal += "_frameall" if args.frame == "all" and system in SYSTEMS else ""
    if system == "trajectory":
        thermal += "_" + os.path.splitext(os.path.basename(structure(system, args)))[0]
    d = os.path.join(args.workdir, f"{system}_n{args.n}_box{args.box}_apix{apix:g}_snr{args.snr:g}_seed{args.seed}{thermal}")
    if not os.path.exists(os.path.join(d, "simulation.json")):
        if system in SYSTEMS:
            simulate_atomic(d, system, structure(system, args), n=args.n, box=args.box, apix=apix, snr=args.snr, seed=args.seed,
                            thermal_A=args.thermal, frame=args.frame)
        else:
            simulate(d, system, n=args.n, box=args.box, apix=apix, snr=args.snr, seed=args.seed)
    return d


def neutral_gmm(d: str, args) -> str:
    path = os.path.join(d, f"gmm_{args.resolution:g}A.npz")
    if not os.path.exists(path):
        vol, apix = read_map(os.path.join(d, "consensus.mrc"))
        build_gmm(vol, apix, args.resolution, device=args.device, seed=args.seed).gmm.save(path)
    return path


def cfg_used_band(run_dir: str) -> tuple:
    train_cfg = TrainFolder(run_dir).read_config().get("train", {})
    return float(train_cfg["lowres_A"]), float(train_cfg["highres_A"])


def parse_set(items) -> dict:
    """``key=value`` TrainConfig overrides (values parsed as JSON where possible)."""
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run_system(system: str, args) -> dict:
    d = dataset(system, args)
    gmm_path = neutral_gmm(d, args)
    kw = {"zdim": args.zdim, "seed": args.seed, **parse_set(args.set)}
    if args.epochs:
        kw["epochs"] = args.epochs
    cfg = TrainConfig(**kw)
    keyed = cfg.to_dict() if args.finest is None else {**cfg.to_dict(), "finest": args.finest}
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    run_dir = os.path.join(d, f"train_{args.tag or 'default'}_{key}")
    t0 = time.time()
    if args.reuse and TrainFolder(run_dir).is_finished():
        latent = TrainFolder(run_dir).read_latents()
        summary = {}
    else:
        star = os.path.join(d, "particles.star")
        summary = train_model(lambda: Particles.from_star(star, device=args.device), GMM.load(gmm_path), cfg, run_dir,
                              star_path=star, device=args.device)  # gmmhet train's path (--set finer_model=auto)
        latent = summary["latent"]
    t_train = time.time() - t0
    info = TrainFolder(run_dir).read_config()
    truth = pd.read_csv(os.path.join(d, "truth.csv"))
    m = metrics(system, latent, truth, run_dir, d)
    if system in ("hinge", "trajectory") and args.ceiling:
        for where, band in (("band", tuple(cfg_used_band(run_dir))), ("image", None)):
            c = bayes_ceiling(d, band, n=1500 if system == "hinge" else 1000, system=system,
                              pdb=structure(system, args))
            m[f"ceiling_{where}"], m[f"ceiling_{where}_knn_r2"] = c["conformation"], c["conformation_knn_r2"]
    if system == "two_motions" and args.ceiling:   # 15 x 15 grid of (LID, NMP) openings
        for where, band in (("band", tuple(cfg_used_band(run_dir))), ("image", None)):
            c = bayes_ceiling(d, band, n=1000, grid=15, system=system)
            m[f"lid_ceiling_{where}"], m[f"nmp_ceiling_{where}"] = c["motion_lid"], c["motion_nmp"]
    cfg_used = info.get("train", {})
    tsum = TrainFolder(run_dir).read_summary()
    row = {"system": system, "tag": args.tag or "default", "n": args.n, "zdim": args.zdim,
           "n_gauss": len(GMM.load(TrainFolder(run_dir).gmm)), "highres_A": cfg_used.get("highres_A"),
           "epochs": cfg.epochs, "best_epoch": tsum.get("best_epoch"), "effective_dim": tsum.get("effective_dim"),
           "loss": cfg_used.get("loss", "frc"), "prior": cfg_used.get("prior", "l2"),
           **{k: round(v, 4) for k, v in m.items()},
           "seconds_train": round(t_train, 1), "run_dir": os.path.relpath(run_dir, common.REPO)}
    log.info("%s", row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", default="hinge", help="comma list of hinge,two_motions,cyclic,trajectory,mixed,conformational")
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=1.5, help="pixel size of the atomic systems (default 1.5 A)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--frame", choices=["core", "all"], default="core",
                   help="atomic systems: frame of the true poses (gmmhet simulate --frame): core (default) or all "
                        "(each conformation superposed on the middle one by all atoms, as MD frames usually are)")
    p.add_argument("--thermal", type=float, default=0.0, metavar="A",
                   help="atomic systems: RMS thermal fluctuation of every atom per particle, Angstrom, like a "
                        "molecular-dynamics ensemble (default 0: rigid domains)")
    p.add_argument("--trajectory", default=None, metavar="PDB",
                   help="system trajectory: the frames of a molecular-dynamics trajectory as one multi-model PDB "
                        "(benchmarks/md_frames.py writes it from DCD + PSF)")
    p.add_argument("--zdim", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    p.add_argument("--resolution", type=float, default=8.0, help="neutral GMM build resolution, A (default 8)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="TrainConfig override (repeatable)")
    p.add_argument("--tag", default="", help="name of this setting in the results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse finished training runs (metrics only)")
    p.add_argument("--ceiling", action="store_true",
                   help="hinge, trajectory and two_motions: also the Bayes ceiling (ranking by the true atomic model at exact "
                        "poses, in the training band and over the whole image; about 3 CPU minutes for the hinge, "
                        "10 for two_motions)")
    p.add_argument("--finest", type=float, default=None, metavar="F",
                   help="experiment: the finer model's GMM no finer than F x the neutral's resolution "
                        "(fine_reference.FINEST, default 0.6; also limits refinement's fine reference)")
    p.add_argument("--workdir", default=os.path.join(common.SCRATCH, "science"))
    p.add_argument("--name", default=None, help="results file name (default science[_TAG])")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    if args.finest is not None:
        from scipion_gmmhet.engine.analysis import fine_reference
        fine_reference.FINEST = args.finest
    os.makedirs(args.workdir, exist_ok=True)
    rows = [run_system(s.strip(), args) for s in args.systems.split(",") if s.strip()]
    info = common.machine_info()
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "run_dir"))
    md = "\n".join([f"# Science benchmark ({args.tag or 'default'})", "", common.machine_line(info), "",
                    f"SNR {args.snr}, CTF, exact poses, box {args.box}"
                    + (f", thermal fluctuation {args.thermal:g} A RMS per atom (atomic systems)" if args.thermal else "")
                    + (", every conformation superposed on the middle one by all atoms (--frame all)"
                       if args.frame == "all" else "")
                    + (f"; trajectory: the frames of {common.portable(args.trajectory)}, one per particle"
                       if args.trajectory else "")
                    + f"; GMM built at {args.resolution} A; targets: "
                    + "; ".join(f"{s}: {TARGETS[s]}" for s in dict.fromkeys(r['system'] for r in rows)), "",
                    common.markdown_table(rows, [(c, c) for c in cols]), ""])
    print(md)
    name = args.name or "science" + (f"_{args.tag}" if args.tag else "")
    common.write_results(name, md, {"machine": info, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
