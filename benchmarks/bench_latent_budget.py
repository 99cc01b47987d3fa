"""Where the latents' remaining error comes from: a finished hinge training scored next to
estimates in which one part at a time is replaced by the truth (issue 13's error budget).

Input: a ``bench_science.py`` training folder of the ``hinge`` system (``train_*`` inside its
data set folder, which holds ``simulation.json``, ``truth.csv``, ``particles.star`` and
``truth_maps``), trained with ``--finer-model auto`` (the default). Every row ranks the same
``--rows`` particles (every (N/rows)-th) and reports |Spearman| with the true hinge coordinate and
the kNN R2 (bench_science's metrics). The rows that score a model at ``--grid`` states of the
true coordinate (0..1) score each particle at its exact pose, CTF and centring-free shift by the
band correlation and report the maximum-likelihood state (``ml``, bench_science's Bayes ceiling)
and the posterior mean (``pm``: white-noise likelihood ``-(n/2) log(1 - rho^2)``, ``n`` the band's
degrees of freedom, flat prior: what the training's latent posterior does over its anchors).

Rows (``--variants``):

- ``latents``: the training's ``latent.npy``.
- ``truth_band`` / ``truth_image``: the true atomic model, in the training's band / to Nyquist.
- ``clean_map_gmm``: a GMM of the noise-free middle state's map (``truth_maps``, coordinate 0.5),
  built at the training GMM's resolution, moved by the true motion (below), the training's band.
- ``noisy_map_gmm``: the same map plus Gaussian noise shaped so that its FSC with the clean map is
  that of the motion-corrected reconstruction below (``sqrt(2 FSC / (1 + FSC))`` of its half maps).
- ``training_gmm``: the training's own GMM (``gmm.npz``: the finer GMM of the motion-corrected
  reconstruction at the input poses, the first network's motions undone) moved by the true motion.
- ``rebuilt_gmm``: a GMM of the motion-corrected reconstruction with the training's OWN decoded
  motions undone (the second network's latents are closer to the truth than the first's), at the
  same resolution, moved by the true motion.
- ``rebuilt_gmm_decoded``: that GMM moved by the network's decoded motions instead (each anchor's
  coarse moves carried to its Gaussians as :class:`fine_reference.WarpedModels` does), the
  posterior over the training's anchors: what rebuilding the reference after the training gives.

The true motion of a GMM: bench_refine_budget's :class:`TrueMotionModels` (each Gaussian moves
with the atoms within ~2 A of it, :func:`motion_corrected.move_weights`), from the grid state whose
atoms lie nearest the GMM's centres.

Run (one thread, ~15 min at 1,500 rows; the reconstruction ~3 min):

    OMP_NUM_THREADS=1 python benchmarks/bench_latent_budget.py \
        --run benchmarks/.scratch/science/hinge_n6000_box64_apix1.5_snr0.1_seed1/train_finerws_<key> \
        --name latent_budget_hinge
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_science as bs  # noqa: E402
from bench_refine_budget import TrueMotionModels  # noqa: E402
import common  # noqa: E402

from scipion_gmmhet.engine.analysis.fine_reference import WarpedModels  # noqa: E402
from scipion_gmmhet.engine.analysis.motion_corrected import ModelMoves, reconstruct_motion_corrected  # noqa: E402
from scipion_gmmhet.engine.analysis.reconstruct import half_assignment  # noqa: E402
from scipion_gmmhet.engine.io import metadata  # noqa: E402
from scipion_gmmhet.engine.io.data import Particles  # noqa: E402
from scipion_gmmhet.engine.io.mrc import read_map  # noqa: E402
from scipion_gmmhet.engine.io.outputs import TrainFolder  # noqa: E402
from scipion_gmmhet.engine.model.build import build_gmm  # noqa: E402
from scipion_gmmhet.engine.model.fourier import RingBinner, fsc  # noqa: E402
from scipion_gmmhet.engine.model.gmm import GMM  # noqa: E402
from scipion_gmmhet.engine.simulation.atomic import ATOM_SIGMA_A, build_system  # noqa: E402
from scipion_gmmhet.engine.training import latent_posterior as lp  # noqa: E402
from scipion_gmmhet.engine.training.trained import TrainedModel  # noqa: E402

log = logging.getLogger("bench_latent_budget")
VARIANTS = ("latents", "truth_band", "truth_image", "clean_map_gmm", "noisy_map_gmm", "training_gmm",
            "rebuilt_gmm", "rebuilt_gmm_decoded")


def own_state(gmm: GMM, atoms: np.ndarray) -> int:
    """The grid state whose atoms ``atoms[g]`` ``(G, A, 3)`` lie nearest ``gmm``'s centres (mean
    distance to the nearest atom): the state the GMM was built of, where its true motion starts."""
    c = torch.as_tensor(np.asarray(gmm.centers_A), dtype=torch.float64)
    return int(np.argmin([float(torch.cdist(c, torch.as_tensor(a)).min(1).values.mean()) for a in atoms]))


def grid_estimates(rho: np.ndarray, n_dof: float, axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood state and posterior mean of each row of band correlations over the grid
    ``axis``: the states as anchors with a flat prior, the training's likelihood and posterior
    (:func:`latent_posterior.band_log_likelihood`, :func:`latent_posterior.posterior_mean`)."""
    states = lp.LatentAnchors(axis[:, None].astype(np.float32), np.full(len(axis), -np.log(len(axis))))
    ll = lp.band_log_likelihood(torch.as_tensor(rho, dtype=torch.float64).clamp(-0.999999, 0.999999), n_dof)
    return axis[rho.argmax(1)], lp.posterior_mean(ll, states)[0][:, 0]


def with_noise(clean: np.ndarray, fsc_half: np.ndarray, seed: int) -> np.ndarray:
    """``clean`` plus Gaussian noise whose power per shell makes the FSC of the result with
    ``clean`` equal ``sqrt(2 f / (1 + f))`` of the half maps' FSC ``f`` (a full map's)."""
    f = np.clip(fsc_half, 1e-3, 0.999)
    full = 2 * f / (1 + f)
    D = clean.shape[0]
    k = np.fft.fftfreq(D) * D
    kz, ky, kx = np.meshgrid(k, k, np.fft.rfftfreq(D) * D, indexing="ij")
    shell = np.minimum(np.round(np.sqrt(kz ** 2 + ky ** 2 + kx ** 2)).astype(int), len(f) - 1)
    F = np.fft.rfftn(clean)
    power = np.bincount(shell.ravel(), (np.abs(F) ** 2).ravel()) / np.maximum(np.bincount(shell.ravel()), 1)
    noise = np.fft.rfftn(np.random.default_rng(seed).standard_normal(clean.shape))
    noise /= np.sqrt((np.abs(noise) ** 2).mean())
    return np.fft.irfftn(F + noise * np.sqrt(power * (1 - full) / full)[shell], s=clean.shape).astype(np.float32)


class Budget:
    """The data, the truth and the training of one run; each variant one method."""

    def __init__(self, run: str, n_rows: int, grid: int, seed: int):
        self.run, self.sim = run, os.path.dirname(os.path.abspath(run))
        with open(os.path.join(self.sim, "simulation.json")) as f:
            self.simulation = json.load(f)
        if self.simulation.get("system") != "hinge":
            raise SystemExit(f"{run}: a hinge training is needed (its data set is {self.simulation.get('system')})")
        self.sysm = build_system("hinge", bs.PDB, self.simulation.get("frame", "core"))
        truth = pd.read_csv(os.path.join(self.sim, "truth.csv"))["conformation"].to_numpy()
        self.rows = np.linspace(0, len(truth) - 1, min(n_rows, len(truth))).round().astype(int)
        self.truth = truth[self.rows]
        self.axis = np.linspace(0.0, 1.0, grid)
        self.atoms = self.sysm.centers(self.axis[:, None]).double().numpy()
        self.folder = TrainFolder(run)
        band = self.folder.read_config()["train"]
        self.band = (float(band["lowres_A"]), float(band["highres_A"]))
        self.gmm = GMM.load(self.folder.gmm)
        self.resolution_A = float(self.gmm.info.get("target_resolution_A", self.band[1]))
        self.seed = seed
        self._mc = None

    def metrics(self, estimate: np.ndarray) -> dict:
        z = estimate.reshape(len(estimate), -1)
        pc1 = z[:, 0] if z.shape[1] == 1 else bs.PCA(1).fit_transform(z - z.mean(0))[:, 0]
        return {"spearman": bs.abs_spearman(pc1, self.truth), "knn_r2": bs.knn_r2(z, self.truth)}

    def particles(self, hi_A):
        p = Particles.from_star(os.path.join(self.sim, "particles.star"))
        p.crop(hi_A)
        lo = self.band[0] if hi_A else None
        return p, RingBinner(p.fbox, p.fapix, lo, hi_A, loss="corr")

    def on_grid(self, centers: np.ndarray, amplitudes, sigmas_A, hi_A) -> dict:
        """Rows ml / pm of a model whose centres at each grid state are ``centers`` ``(G, N, 3)``."""
        particles, binner = self.particles(hi_A)
        c = torch.as_tensor(centers, dtype=torch.float32)
        rho = bs.grid_correlations(particles, binner, self.rows, len(self.axis), lambda g, B: c[g][None].expand(B, -1, -1),
                                   torch.as_tensor(amplitudes, dtype=torch.float32),
                                   torch.as_tensor(sigmas_A, dtype=torch.float32))
        ml, pm = grid_estimates(rho, binner.band_dof(), self.axis)
        return {"ml": self.metrics(ml), "pm": self.metrics(pm)}

    def moved(self, gmm: GMM) -> dict:
        """``gmm`` moved by the true motion (bench_refine_budget's :class:`TrueMotionModels`, from
        the state it was built of) and scored at every grid state."""
        grid = self.axis[:, None]
        motion = TrueMotionModels(None, self.sysm, grid, gmm=gmm, reference=grid[own_state(gmm, self.atoms)])
        centers = motion.gaussians(np.arange(len(grid)), "cpu")[0]
        return self.on_grid(centers, gmm.amplitudes, gmm.sigmas_A, self.band[1])

    def build(self, vol: np.ndarray) -> GMM:
        return build_gmm(vol, float(self.simulation["apix"]), self.resolution_A, seed=self.seed).gmm

    def motion_corrected(self):
        """The reconstruction with the training's own decoded motions undone (both halves the same
        moves, as the finer model's is), computed once."""
        if self._mc is None:
            meta = metadata.read_particles(os.path.join(self.sim, "particles.star"))
            tm = TrainedModel(self.run, "cpu")
            moves = ModelMoves(tm, tm.latents())
            self._mc = reconstruct_motion_corrected(meta, {1: moves, 2: moves}, halves=half_assignment(meta, self.seed),
                                                    seed=self.seed, device="cpu", progress=False)
        return self._mc

    def clean_map(self) -> np.ndarray:
        state = min(self.simulation["states"], key=lambda s: abs(s["coords"][0] - 0.5))
        return read_map(os.path.join(self.sim, state["map"]))[0]

    # ------------------------------------------------------------------ variants
    def latents(self) -> dict:
        return {"pm": self.metrics(self.folder.read_latents()[self.rows])}

    def truth_band(self) -> dict:
        return self._truth(self.band[1])

    def truth_image(self) -> dict:
        return self._truth(None)

    def _truth(self, hi_A) -> dict:
        n = len(self.sysm.electrons)
        return self.on_grid(self.atoms, self.sysm.electrons, np.full(n, ATOM_SIGMA_A), hi_A)

    def clean_map_gmm(self) -> dict:
        return self.moved(self.build(self.clean_map()))

    def noisy_map_gmm(self) -> dict:
        mc = self.motion_corrected()
        return self.moved(self.build(with_noise(self.clean_map(), fsc(mc.half1, mc.half2), self.seed)))

    def training_gmm(self) -> dict:
        return self.moved(self.gmm)

    def _rebuilt(self) -> GMM:
        if getattr(self, "_rebuilt_gmm", None) is None:
            self._rebuilt_gmm = self.build(np.asarray(self.motion_corrected().volume, np.float32))
        return self._rebuilt_gmm

    def rebuilt_gmm(self) -> dict:
        return self.moved(self._rebuilt())

    def rebuilt_gmm_decoded(self) -> dict:
        tm = TrainedModel(self.run, "cpu")
        warped = WarpedModels(_Decoded(tm), self._rebuilt())
        particles, binner = tm.band_particles(os.path.join(self.sim, "particles.star"), centering_from=self.folder)
        anchors = tm.anchors

        def decoder(z):
            return warped.gaussians(z, "cpu")
        z_mean = torch.as_tensor(np.exp(anchors.log_prior) @ anchors.anchors, dtype=torch.float32)
        with torch.no_grad():
            mean_model = tuple(t[0].float() for t in decoder(z_mean[None]))
        anchors.n_dof = lp.effective_dof(particles, binner, self.rows, mean_model)
        z, _ = lp.posterior_latents(decoder, particles, binner, self.rows, anchors, 256, "cpu")
        return {"pm": self.metrics(z)}


class _Decoded:
    """The network's decoded Gaussians at given latents, as :class:`WarpedModels` reads them
    (``gaussians(z, device)``; ``model.neutral``: the training's GMM)."""

    def __init__(self, tm: TrainedModel):
        self.model, self._decoder = tm, tm.model.decoder

    def gaussians(self, z, device):
        with torch.no_grad():
            return tuple(t.float() for t in self._decoder(torch.as_tensor(z, dtype=torch.float32)))


def render(rows: list, info: dict, args: dict, gaussians: int, resolution_A: float, band: tuple, n_rows: int) -> str:
    """The results' markdown (4 decimals: the rows differ in the third)."""
    run_rel = os.path.relpath(os.path.abspath(args["run"]), common.REPO)
    table = [{**r, "spearman": f"{r['spearman']:.4f}", "knn_r2": f"{r['knn_r2']:.4f}"} for r in rows]
    return "\n".join([
        "# Error budget of the latents (`benchmarks/bench_latent_budget.py`)", "", common.machine_line(info), "",
        f"Training: `{run_rel}` ({gaussians} Gaussians at {resolution_A:g} A, band {band[0]:g}-{band[1]:g} A); "
        f"{n_rows} particles, {args['grid']} states of the true coordinate. Command: "
        f"`OMP_NUM_THREADS=1 python benchmarks/bench_latent_budget.py --run {run_rel} --name {args['name']}`", "",
        "`ml`: the best-scoring state; `pm`: the posterior mean (flat prior). Rows: module docstring.", "",
        common.markdown_table(table, [(c, c) for c in ("variant", "estimate", "spearman", "knn_r2", "seconds")]), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished bench_science hinge training folder (train_*)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--rows", type=int, default=1500, help="particles scored (every (N/rows)-th)")
    p.add_argument("--grid", type=int, default=41, help="states of the true coordinate for the grid rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="latent_budget_hinge")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}")
    budget = Budget(args.run, args.rows, args.grid, args.seed)
    rows = []
    for v in variants:
        t0 = time.time()
        out = getattr(budget, v)()
        for est, m in out.items():
            rows.append({"variant": v, "estimate": est, "spearman": round(m["spearman"], 4),
                         "knn_r2": round(m["knn_r2"], 4), "seconds": round(time.time() - t0)})
            log.info("%s", rows[-1])
    info = common.machine_info()
    md = render(rows, info, vars(args), len(budget.gmm), budget.resolution_A, budget.band, len(budget.rows))
    common.write_results(args.name, md, {"machine": info, "args": vars(args), "rows": rows,
                                         "gaussians": len(budget.gmm), "resolution_A": budget.resolution_A,
                                         "band_A": list(budget.band), "n_rows": int(len(budget.rows))})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
