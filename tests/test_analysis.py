"""Tests of engine/analysis/latent.py and `gmmhet analyze`.

A small stand-in for training.trained.TrainedModel (same interface: ``neutral``, ``zdim``, ``decode``,
``gmm_at``, ``latents``) has a known linear decoder, so every analysis result has a known
answer. The end-to-end test runs `gmmhet analyze` on a simulated compositional dataset with
latents made from the truth plus noise (the clustering/reconstruction logic, independent of
training quality) and checks populations and that each class reconstruction matches its own
ground-truth state better than the other.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.analysis import latent as an
from scipion_gmmhet.engine.io import chimerax as cx
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.model.gmm import GMM


class StandInModel:
    """Decoder: centres = neutral + sum_k z_k * W_k (W ``(K, N, 3)`` Angstrom per unit latent);
    amplitudes of the Gaussians in ``amp_sel`` scaled by clip(z[amp_dim], 0, 1)."""

    def __init__(self, neutral: GMM, W: np.ndarray, amp_sel=None, amp_dim: int = 0, latents=None,
                 info=None):
        self.neutral, self.zdim = neutral, W.shape[0]
        self.W = torch.as_tensor(W, dtype=torch.float32)
        self.amp_sel = None if amp_sel is None else torch.as_tensor(amp_sel)
        self.amp_dim = amp_dim
        self._latents = latents
        self.info = info or {}

    def decode(self, z):
        z = torch.as_tensor(z, dtype=torch.float32).reshape(-1, self.zdim)
        c0, a0, s0 = self.neutral.tensors()
        c = c0[None] + torch.einsum("bk,knd->bnd", z, self.W)
        a = a0[None].repeat(z.shape[0], 1)
        if self.amp_sel is not None:
            scale = z[:, self.amp_dim:self.amp_dim + 1].clamp(0, 1)
            a = torch.where(self.amp_sel[None], a * scale, a)
        return c, a, s0[None].repeat(z.shape[0], 1)

    def gmm_at(self, z):
        c, a, s = self.decode(torch.as_tensor(np.asarray(z, np.float32)))
        return GMM(c[0].numpy(), a[0].numpy(), s[0].numpy(), self.neutral.box, self.neutral.apix)

    def latents(self):
        return self._latents


def _neutral(n=30, box=24, apix=4.0, seed=0):
    rng = np.random.default_rng(seed)
    return GMM(rng.normal(size=(n, 3)) * 10, np.ones(n), np.full(n, 4.0), box, apix)


def test_cluster_latents_sorted_by_size_with_nearest_rows():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 0.1, (60, 3)), rng.normal(2, 0.1, (140, 3))])
    for method in ("kmeans", "gmm"):
        cl = an.cluster_latents(z, 2, method, seed=0)
        assert cl.sizes.tolist() == [140, 60]
        assert (cl.labels[60:] == 0).all() and (cl.labels[:60] == 1).all()
        assert np.allclose(cl.centers[0], 2, atol=0.1)
        d = np.linalg.norm(z - cl.centers[0], axis=1)
        assert cl.nearest_rows[0] == int(np.argmin(d))
    with pytest.raises(InputError):
        an.cluster_latents(z, 0)
    with pytest.raises(InputError):
        an.cluster_latents(z, 2, "dbscan")
    with pytest.raises(InputError):
        an.cluster_latents(np.full((5, 2), np.nan), 2)


def test_pca_trajectory_and_inverse():
    rng = np.random.default_rng(1)
    axis = np.array([0.6, 0.8, 0.0])
    z = rng.normal(size=(500, 1)) * 2 * axis + rng.normal(0, 0.05, (500, 3)) + 1.0
    pca = an.fit_pca(z)
    assert abs(abs(pca.components_[0] @ axis) - 1) < 1e-2
    pts, t = an.pc_trajectory(pca, z, 1, 7)
    coord = pca.transform(z)[:, 0]
    assert pts.shape == (7, 3) and np.isclose(t[0], np.percentile(coord, 5)) and np.isclose(t[-1], np.percentile(coord, 95))
    # points lie on the PC1 line through the latent mean
    rel = pts - z.mean(0)
    assert np.allclose(np.cross(rel, pca.components_[0]), 0, atol=1e-4)
    assert np.allclose(pca.transform(pts)[:, 0], t, atol=1e-4)


def test_displacements_and_chimerax_files(tmp_path):
    g = _neutral()
    W = np.zeros((2, len(g), 3))
    W[0, :5, 0] = 3.0  # z0 moves the first five Gaussians along x
    m = StandInModel(g, W)
    c0, d, da = an.gaussian_displacements(m, [0, 0], [2, 0])
    assert np.allclose(c0, g.centers_A, atol=1e-5)
    assert np.allclose(d[:5], [6, 0, 0]) and np.allclose(d[5:], 0) and np.allclose(da, 0)
    cx.displacement_bild(c0, c0 + d, str(tmp_path / "m.bild"), g.box, g.apix, min_length_A=0.5)
    text = (tmp_path / "m.bild").read_text()
    assert text.count(".arrow") == 5
    first = [float(v) for v in text.splitlines()[1].split()[1:7]]
    assert np.allclose(first[:3], c0[0] + (g.box // 2) * g.apix, atol=1e-3)
    assert np.allclose(np.subtract(first[3:6], first[:3]), [6, 0, 0], atol=1e-3)
    cx.displacement_cmm(c0, c0 + d, str(tmp_path / "m.cmm"), g.box, g.apix)
    import xml.etree.ElementTree as ET
    root = ET.parse(tmp_path / "m.cmm").getroot()
    assert len(root.findall("marker")) == 2 * len(g) and len(root.findall("link")) == len(g)


def test_domain_motion_finds_the_domain_direction():
    g = _neutral(n=40)
    W = np.zeros((3, len(g), 3))
    dom = np.zeros(len(g), bool)
    dom[:10] = True
    W[0, :, :] = 1.0                     # z0: everything translates
    W[1, :10, 1] = 2.0                   # z1: only the domain moves
    W[2, :, 2] = 0.5                     # z2: everything, another axis
    W[2, :10, 2] = 0.8
    m = StandInModel(g, W)
    z = np.random.default_rng(2).normal(size=(300, 3))
    dm = an.domain_motion(m, z, dom, n_samples=64)
    assert abs(dm.direction[1]) > 0.99, dm.direction
    assert dm.rms_in_A > 10 * dm.rms_out_A
    # mask from a map: the same Gaussians
    mask = np.zeros((g.box,) * 3, np.float32)
    ijk = np.rint(g.centers_A[:10] / g.apix).astype(int) + g.box // 2
    ok = ((ijk >= 0) & (ijk < g.box)).all(1)
    mask[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]] = 1
    sel = an.gaussians_in_mask(g.centers_A, mask, g.apix)
    assert sel[:10][ok].all() and not sel[10:].any()
    with pytest.raises(InputError):
        an.domain_motion(m, z, np.zeros(len(g), bool))
    pts, t = an.direction_trajectory(z, dm.direction, 5)
    assert pts.shape == (5, 3) and np.allclose(np.cross(pts, dm.direction), 0, atol=1e-5)


def test_match_clusters_and_even_odd():
    g = _neutral(n=30)
    sub = np.zeros(len(g), bool)
    sub[:8] = True
    W = np.zeros((2, len(g), 3))
    W[1, 8:16, 0] = 6.0
    rng = np.random.default_rng(3)

    def latents(n, f):
        z = np.zeros((n, 2))
        z[: int(f * n), 0] = 1
        z[:, 1] = rng.integers(0, 2, n) * 1.0
        return z + rng.normal(0, 0.05, (n, 2))

    a = StandInModel(g, W, sub, 0)
    b = StandInModel(g, W, sub, 0)
    rep = an.even_odd_report(a, latents(400, 0.5), b, latents(400, 0.5), 4, "kmeans")
    assert len(rep["pairs"]) == 4 and rep["max_population_diff"] < 0.08
    assert rep["min_fsc_area"] > 0.9
    # a shuffled list of maps is matched back
    maps = an.render_at(a, [[0, 0], [1, 0], [0, 1], [1, 1]])
    m = an.match_clusters(maps, [maps[i] for i in (2, 0, 3, 1)], g.apix)
    assert m["pairs"] == [(0, 1), (1, 3), (2, 0), (3, 2)]


def test_population_errors():
    truth = np.array([0] * 50 + [1] * 50)
    labels = np.array([1] * 48 + [0] * 52)
    pe = an.population_errors(labels, truth)
    assert pe["max_abs_diff"] == pytest.approx(0.02) and pe["ari"] > 0.8


def test_plots_not_blank(tmp_path):
    rng = np.random.default_rng(4)
    xy = rng.normal(size=(200, 2))
    labels = (xy[:, 0] > 0).astype(int)
    p = an.plot_clusters_png(str(tmp_path / "e.png"), xy, labels, np.array([[1, 0], [-1, 0]]))
    from matplotlib.image import imread
    img = imread(p)
    assert img.shape[0] > 100 and img[..., :3].std() > 0.05
    t = {"freq_invA": np.linspace(0, 0.1, 17), "fsc": np.linspace(1, 0, 17)}
    img = imread(an.plot_fsc_png(str(tmp_path / "f.png"), {"a": t}))
    assert img[..., :3].std() > 0.02


@pytest.fixture(scope="module")
def compositional(tmp_path_factory):
    from scipion_gmmhet.engine.simulation.simulate import simulate
    out = tmp_path_factory.mktemp("sim_comp")
    res = simulate(str(out), "compositional", n=400, box=32, apix=6.0, snr=1.0, seed=5)
    return res


def test_analyze_cli_compositional(compositional, tmp_path, monkeypatch):
    """Latents = truth composition + noise: the classes, their reconstructions and the GMM maps."""
    from scipion_gmmhet.engine.training import trained as train_mod
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.model.fourier import fsc_table
    from scipion_gmmhet.engine.io.mrc import read_map
    truth = pd.read_csv(compositional["truth_csv"])
    comp = truth["composition"].to_numpy()
    rng = np.random.default_rng(6)
    z = np.stack([comp + rng.normal(0, 0.15, comp.size), rng.normal(0, 0.3, comp.size)], 1).astype(np.float32)
    with_sub = GMM.load(compositional["truth_gmm"]["with_subunit"])
    without = GMM.load(compositional["truth_gmm"]["without_subunit"])
    sub = np.zeros(len(with_sub), bool)
    sub[len(without):] = True
    model = StandInModel(with_sub, np.zeros((2, len(with_sub), 3)), sub, 0, latents=z)
    monkeypatch.setattr(train_mod, "load_trained", lambda d, device="cpu": model)
    out = tmp_path / "an"
    rc = main(["analyze", "--train", str(tmp_path), "--particles", compositional["star"], "--clusters", "2",
               "--traj-steps", "3", "--out", str(out)])
    assert rc == 0
    labels = np.load(out / "labels.npy")
    assert labels.shape == (comp.size,)
    pe = an.population_errors(labels, comp)
    assert pe["max_abs_diff"] <= 0.05 and pe["ari"] > 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert [c["size"] for c in summary["clusters"]] == np.bincount(labels).tolist()
    truth_maps = {s: read_map(compositional["truth_maps"][s])[0] for s in ("with_subunit", "without_subunit")}
    apix = 6.0
    for cl in pe["classes"]:
        own = "with_subunit" if cl["truth"] == 1 else "without_subunit"
        other = "without_subunit" if own == "with_subunit" else "with_subunit"
        rec = read_map(out / f"cluster_{cl['cluster']:02d}.mrc")[0]
        area_own = fsc_table(rec, truth_maps[own], apix)["fsc"][1:].mean()
        area_other = fsc_table(rec, truth_maps[other], apix)["fsc"][1:].mean()
        assert area_own > area_other, (cl, area_own, area_other)
        gmm_map = read_map(out / f"cluster_{cl['cluster']:02d}_gmm.mrc")[0]
        # the GMM map at the cluster centre shows the subunit iff the class has it
        diff = truth_maps["with_subunit"] - truth_maps["without_subunit"]
        where = diff > 0.5 * diff.max()
        sub_mass = (gmm_map[where] - truth_maps["without_subunit"][where]).mean() / diff[where].mean()
        assert (sub_mass > 0.5) == (cl["truth"] == 1), sub_mass
    for name in ("embedding_pca.npy", "centers.npy", "embedding_pca.png", "fsc.png", "pc1_00.mrc", "pc2_02.mrc",
                 "pc1_motion.bild", "pc1_motion.png", "cluster_00_half1.mrc", "cluster_00_mask.mrc", "cluster_01_fsc.csv", "chimerax_clusters.cxc"):
        assert (out / name).exists(), name
    assert np.load(out / "embedding_pca.npy").shape == (comp.size, 2)
    # a star with another number of particles is refused
    other = tmp_path / "other.star"
    from scipion_gmmhet.engine.io.metadata import read_particles, write_particles
    meta = read_particles(compositional["star"])
    write_particles(str(other), meta.subset(np.arange(10)))
    assert main(["analyze", "--train", str(tmp_path), "--particles", str(other), "--clusters", "2",
                 "--out", str(tmp_path / "an2")]) == 2


def test_analyze_cli_domain_motion_and_even_odd(tmp_path, monkeypatch):
    """No particles: clusters, GMM maps, PC trajectories, the domain motion from a mask and the
    even/odd report, all from the model and its latents."""
    from scipion_gmmhet.engine.training import trained as train_mod
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.io.mrc import read_map, write_map
    g = _neutral(n=40, box=24, apix=4.0)
    W = np.zeros((2, len(g), 3))
    W[0, :, 0] = 2.0            # z0 shifts everything
    W[1, :12, 1] = 3.0          # z1 moves the domain only
    rng = np.random.default_rng(8)
    z = np.concatenate([rng.normal([-1, 0], 0.2, (150, 2)), rng.normal([1, 0.5], 0.2, (250, 2))]).astype(np.float32)
    model = StandInModel(g, W, latents=z)
    monkeypatch.setattr(train_mod, "load_trained", lambda d, device="cpu": model)
    dom = np.zeros((g.box,) * 3, np.float32)
    ijk = np.clip(np.rint(g.centers_A[:12] / g.apix).astype(int) + g.box // 2, 0, g.box - 1)
    dom[ijk[:, 2], ijk[:, 1], ijk[:, 0]] = 1
    write_map(str(tmp_path / "dom.mrc"), dom, g.apix)
    out = tmp_path / "an"
    assert main(["analyze", "--train", str(tmp_path), "--clusters", "2", "--no-reconstruct", "--traj-steps", "4",
                 "--domain-mask", str(tmp_path / "dom.mrc"), "--even-odd", str(tmp_path), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [c["size"] for c in s["clusters"]] == [250, 150]
    assert np.allclose(np.load(out / "centers.npy")[0], [1, 0.5], atol=0.1)
    dm = s["domain_motion"]
    sel = an.gaussians_in_mask(g.centers_A, dom, g.apix)
    assert dm["n_gaussians_in_mask"] == int(sel.sum()) and abs(dm["direction"][1]) > 0.99
    assert len(dm["maps"]) == 4 and (out / "domain_motion.bild").exists()
    # PC1 is the x-shift direction mostly: its trajectory's end maps differ by a shift
    a, b = read_map(out / "pc1_00.mrc")[0], read_map(out / "pc1_03.mrc")[0]
    assert not np.allclose(a, b) and abs(a.sum() - b.sum()) < 0.05 * abs(a.sum())
    rep = json.loads((out / "reproducibility.json").read_text())
    assert rep["max_population_diff"] == 0 and rep["min_fsc_area"] > 0.999
    assert s["reproducibility"]["min_fsc_area"] > 0.999
    # bad input: one line, exit 2
    assert main(["analyze", "--train", str(tmp_path), "--clusters", "-1", "--out", str(out)]) == 2
    assert main(["analyze", "--train", str(tmp_path), "--clusters", "0", "--even-odd", str(tmp_path),
                 "--out", str(out)]) == 2
    assert main(["analyze", "--train", str(tmp_path), "--clusters", "2", "--latents", str(tmp_path / "no.npy"),
                 "--particles", "x.star", "--out", str(out)]) == 2


def test_whitened_clustering_separates_composition_from_a_wider_motion():
    """A wide motion (x) and a small compositional gap (y): raw k-means cuts the motion, whitened
    k-means finds the composition; centres stay in latent coordinates."""
    from sklearn.metrics import adjusted_rand_score

    from scipion_gmmhet.engine.analysis.latent import cluster_latents
    rng = np.random.default_rng(0)
    n = 1000
    comp = rng.integers(0, 2, n)
    z = np.stack([rng.uniform(-3, 3, n), comp * 1.0, rng.normal(0, 0.05, n)], 1) + rng.normal(0, 0.15, (n, 3))
    raw = cluster_latents(z, 2, "kmeans", 0)
    white = cluster_latents(z, 2, "kmeans", 0, whiten=True)
    assert adjusted_rand_score(comp, raw.labels) < 0.2
    assert adjusted_rand_score(comp, white.labels) > 0.95
    assert sorted(np.round(white.centers[:, 1]).tolist()) == [0.0, 1.0]


def test_analyze_clusters_whitened_latents_by_default_like_the_protocol():
    """`gmmhet analyze` whitens by default (the cluster protocol's default); --no-whiten turns it off."""
    from scipion_gmmhet.engine.cli import build_parser
    base = ["analyze", "--train", "t", "--clusters", "2", "--out", "a"]
    assert build_parser().parse_args(base).whiten is True
    assert build_parser().parse_args(base + ["--no-whiten"]).whiten is False
    assert build_parser().parse_args(base + ["--whiten"]).whiten is True
