"""Tests of engine/analysis/trajectory.py (1-D coordinate along the latent data manifold) and
its outputs in `gmmhet analyze`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.decomposition import PCA

from scipion_gmmhet.engine.analysis.trajectory import manifold_coordinate, trajectory_points
from scipion_gmmhet.engine.errors import InputError
from test_analysis import StandInModel, _neutral


def _horseshoe(n=3000, bend=4.5, noise_dims=2, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    z = np.stack([np.cos(bend * t), np.sin(bend * t)] + [0.1 * rng.normal(size=n)] * noise_dims, 1)
    return t, z + 0.05 * rng.normal(size=z.shape)


def test_orders_a_curved_motion_better_than_pc1():
    t, z = _horseshoe()
    tr = manifold_coordinate(z, seed=1)
    rho = spearmanr(tr.coordinate, t).correlation
    rho_pc1 = abs(spearmanr(PCA(1).fit_transform(z)[:, 0], t).correlation)
    assert abs(rho) > 0.99 and abs(rho) > rho_pc1 + 0.02, (rho, rho_pc1)
    assert tr.coordinate.min() == 0.0 and tr.coordinate.max() == 1.0 and tr.coordinate.dtype == np.float32
    assert tr.component_fraction == 1.0 and tr.spearman_pc1 > 0  # oriented along PC1
    s = tr.summary()
    assert s["n_landmarks"] == 3000 and len(s["eigenvalues"]) == 2


def test_landmarks_extend_to_all_particles_and_seed_reproducible():
    t, z = _horseshoe(n=5000, bend=2.0, noise_dims=3)
    a = manifold_coordinate(z, max_landmarks=800, seed=2)
    b = manifold_coordinate(z, max_landmarks=800, seed=2)
    np.testing.assert_array_equal(a.coordinate, b.coordinate)
    assert a.n_landmarks == 800 and a.coordinate.shape == (5000,)
    assert abs(spearmanr(a.coordinate, t).correlation) > 0.98


def test_trajectory_points_are_bin_means():
    t, z = _horseshoe(n=1000)
    pts, tt = trajectory_points(z, t, 5)
    order = np.argsort(t)
    np.testing.assert_allclose(pts[0], z[order[:200]].mean(0), rtol=1e-5, atol=1e-6)
    assert pts.shape == (5, z.shape[1]) and np.all(np.diff(tt) > 0)
    with pytest.raises(InputError, match="traj-steps"):
        trajectory_points(z, t, 1)
    with pytest.raises(InputError, match="latents"):
        manifold_coordinate(np.full((5, 2), np.nan))


def test_analyze_writes_the_trajectory(tmp_path, monkeypatch):
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.io.mrc import read_map
    from scipion_gmmhet.engine.training import trained as train_mod
    g = _neutral(n=40, box=24, apix=4.0)
    W = np.zeros((3, len(g), 3))
    W[0, :12, 0] = 3.0
    W[1, :12, 1] = 3.0
    t, z = _horseshoe(n=600, noise_dims=1)
    model = StandInModel(g, W, latents=z.astype(np.float32))
    monkeypatch.setattr(train_mod, "load_trained", lambda d, device="cpu": model)
    out = tmp_path / "an"
    assert main(["analyze", "--train", str(tmp_path), "--clusters", "2", "--no-reconstruct", "--traj-steps", "4",
                 "--out", str(out)]) == 0
    coord = np.load(out / "trajectory.npy")
    assert coord.shape == (600,) and abs(spearmanr(coord, t).correlation) > 0.98
    s = json.loads((out / "summary.json").read_text())["manifold_trajectory"]
    assert s["maps"] == [f"traj_{i:02d}.mrc" for i in range(4)] and s["max_displacement_A"] > 1.0
    a, b = read_map(out / "traj_00.mrc")[0], read_map(out / "traj_03.mrc")[0]
    assert not np.allclose(a, b)
    for name in ("embedding_pca_trajectory.png", "traj_motion.bild", "trajectory_points.npy"):
        assert (out / name).exists(), name
    out2 = tmp_path / "an2"
    assert main(["analyze", "--train", str(tmp_path), "--clusters", "2", "--no-reconstruct", "--no-trajectory",
                 "--out", str(out2)]) == 0
    assert not (out2 / "trajectory.npy").exists()


def test_demo_report_scores_the_trajectory_coordinate_within_each_composition():
    """The demo report's latent metrics: on an arc (a swing embedded as a horseshoe) PC1 folds
    the ends together, the trajectory coordinate does not."""
    import pandas as pd

    from scipion_gmmhet.report import latent_metrics

    rng = np.random.default_rng(0)
    n = 600
    conf = rng.uniform(0, 1, n)
    comp = (np.arange(n) % 2).astype(int)
    angle = np.pi * 1.4 * conf  # an arc of 250 degrees
    z = np.stack([np.cos(angle), np.sin(angle), 3.0 * comp, np.zeros(n)], 1) + rng.normal(0, 0.05, (n, 4))
    m = latent_metrics(z, pd.DataFrame({"conformation": conf, "composition": comp}))
    traj = m["spearman_trajectory_conformation_within_composition"]
    pc1 = m["spearman_pc1_conformation_within_composition"]
    assert len(traj) == 2 and min(traj) > 0.97 and min(traj) > max(pc1)
    single = latent_metrics(z[comp == 0], pd.DataFrame({"conformation": conf[comp == 0]}))
    assert single["spearman_trajectory_conformation"] > 0.97
