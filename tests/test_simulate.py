"""Tests of the simulator (scipion_gmmhet.engine.simulation.simulate and `gmmhet simulate`)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage, stats

from scipion_gmmhet.engine import cli
from scipion_gmmhet.engine.io import mrc, star
from scipion_gmmhet.engine.conventions import euler_to_matrix
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation.simulate import (DOMAIN_NAMES, build_molecule, draw_particles,
                                            simulate)

TRUTH_COLUMNS = ["particle", "conformation", "composition", "rot", "tilt", "psi", "origin_x_A", "origin_y_A",
                 "defocus_u_A", "defocus_v_A", "defocus_angle_deg", "image_name"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    return simulate(str(out), "mixed", n=200, box=32, apix=3.0, snr=0.1, seed=1, n_states_maps=3)


@pytest.fixture(scope="module")
def clean_pair(tmp_path_factory):
    """Same seed, noiseless and SNR 0.5."""
    a = simulate(str(tmp_path_factory.mktemp("clean")), "conformational", n=200, box=32, snr=math.inf, seed=2)
    b = simulate(str(tmp_path_factory.mktemp("noisy")), "conformational", n=200, box=32, snr=0.5, seed=2)
    return a, b


def _real_space_projection(vol: np.ndarray, apix: float, rot, tilt, psi, ox_A, oy_A) -> np.ndarray:
    """Image pixel r (A from the centre) + origin -> map point A.T @ (x, y, z), summed over z."""
    D = vol.shape[0]
    A = euler_to_matrix(rot, tilt, psi)
    g = (np.arange(D) - D // 2) * apix
    Y, X, Z = np.meshgrid(g, g, g, indexing="ij")
    P = np.stack([X + ox_A, Y + oy_A, Z], axis=-1) @ A  # rows: (A.T @ p).T
    idx = P / apix + D // 2
    return ndimage.map_coordinates(vol, [idx[..., 2], idx[..., 1], idx[..., 0]], order=1).sum(axis=-1)


def test_files_exist_and_parse(mixed):
    out = mixed["out_dir"]
    blocks = star.read_star(mixed["star"])
    optics, parts = blocks["optics"], blocks["particles"]
    assert len(parts) == 200
    o = optics.iloc[0]
    assert (o.rlnVoltage, o.rlnSphericalAberration, o.rlnAmplitudeContrast) == (300.0, 2.7, 0.1)
    assert (o.rlnImagePixelSize, o.rlnImageSize, o.rlnImageDimensionality) == (3.0, 32, 2)
    assert o.rlnCtfDataAreCtfPremultiplied == 0
    for col in ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
                "rlnOpticsGroup", "rlnRandomSubset", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"):
        assert col in parts.columns, col
    assert parts.rlnImageName.iloc[0] == "000001@particles.mrcs"
    assert parts.rlnImageName.iloc[-1] == "000200@particles.mrcs"
    assert list(parts.rlnRandomSubset[:4]) == [1, 2, 1, 2]
    stack = mrc.open_stack(mixed["stack"])
    assert stack.shape == (200, 32, 32) and stack.dtype == np.float32
    assert mrc.stack_apix(mixed["stack"]) == pytest.approx(3.0)
    assert np.isfinite(np.asarray(stack)).all() and np.asarray(stack).std() > 0
    vol, apix = mrc.read_map(mixed["consensus"])
    assert vol.shape == (32, 32, 32) and apix == pytest.approx(3.0)
    truth = pd.read_csv(mixed["truth_csv"])
    assert list(truth.columns) == TRUTH_COLUMNS
    assert list(truth.particle) == list(range(1, 201))
    names = sorted(os.listdir(os.path.join(out, "truth_maps")))
    assert names == sorted([f"conf_{i:03d}_{s}_subunit.mrc" for i in range(3) for s in ("with", "without")]
                           + ["neutral.mrc"])
    # the neutral truth: the middle conformation, with the subunit as most particles carry it
    sub = bool(pd.read_csv(mixed["truth_csv"]).composition.mean() > 0.5)
    mid = "conf_001_with_subunit" if sub else "conf_001_without_subunit"
    np.testing.assert_allclose(mrc.read_map(mixed["truth_maps"]["neutral"])[0],
                               mrc.read_map(mixed["truth_maps"][mid])[0], atol=1e-5)
    assert sorted(os.listdir(os.path.join(out, "truth_gmm"))) == [n[:-4] + ".npz" for n in names]
    info = json.load(open(mixed["json"]))
    assert info["kind"] == "mixed" and info["n"] == 200 and info["ctf_applied"] is True
    assert [s["conformation"] for s in info["states"][::2]] == [0.0, 0.5, 1.0]
    for s in info["states"]:
        g = GMM.load(os.path.join(out, s["gmm"]))
        assert g.box == 32 and g.apix == 3.0
        vol, _ = mrc.read_map(os.path.join(out, s["map"]))
        np.testing.assert_allclose(vol, g.render(), atol=1e-5 * vol.max())  # map and GMM are one state
        assert len(g) == (info["domains"]["subunit"][1] if s["composition"] else info["domains"]["subunit"][0])
    # no leftover temporary files
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]


def test_truth_matches_star(mixed):
    parts = star.read_star(mixed["star"])["particles"]
    truth = pd.read_csv(mixed["truth_csv"])
    pairs = {"rot": "rlnAngleRot", "tilt": "rlnAngleTilt", "psi": "rlnAnglePsi", "origin_x_A": "rlnOriginXAngst",
             "origin_y_A": "rlnOriginYAngst", "defocus_u_A": "rlnDefocusU", "defocus_v_A": "rlnDefocusV",
             "defocus_angle_deg": "rlnDefocusAngle"}
    for t, s in pairs.items():
        np.testing.assert_allclose(truth[t].to_numpy(), parts[s].to_numpy(), rtol=0, atol=1e-9, err_msg=t)
    assert list(truth.image_name) == list(parts.rlnImageName)
    assert (np.abs(truth[["origin_x_A", "origin_y_A"]].to_numpy()) <= 2.0 * 3.0).all()
    assert truth.defocus_u_A.between(8000, 25000).all()
    astig = truth.defocus_u_A - truth.defocus_v_A
    assert astig.between(0, 400).all() and astig.std() > 10
    assert truth.conformation.between(0, 1).all()
    assert set(truth.composition.unique()) == {0, 1}


def test_orientations_uniform_on_so3():
    t = draw_particles(20000, "homogeneous", np.random.default_rng(5), apix=3.0)
    A = euler_to_matrix(t.rot.to_numpy(), t.tilt.to_numpy(), t.psi.to_numpy())
    view = A[:, 2, :]  # the map direction each image integrates along
    assert np.linalg.norm(view.mean(axis=0)) < 0.03
    assert stats.kstest(np.cos(np.radians(t.tilt)), "uniform", args=(-1, 2)).pvalue > 1e-3
    assert stats.kstest(t.rot, "uniform", args=(-180, 360)).pvalue > 1e-3
    assert stats.kstest(t.psi, "uniform", args=(-180, 360)).pvalue > 1e-3
    # in-plane axes uniform too (would fail for e.g. psi fixed at 0)
    assert np.linalg.norm(A[:, 0, :].mean(axis=0)) < 0.03
    assert np.isnan(t.conformation).all() and (t.composition == 0).all()


def test_snr_matches_request(clean_pair):
    clean, noisy = clean_pair
    a = np.asarray(mrc.open_stack(clean["stack"]), np.float64)
    b = np.asarray(mrc.open_stack(noisy["stack"]), np.float64)
    noise = b - a
    signal_var = a.reshape(len(a), -1).var(axis=1).mean()
    assert signal_var > 0
    assert signal_var / noise.var() == pytest.approx(0.5, rel=0.03)
    assert abs(noise.mean()) < 0.02 * noise.std()
    # white: flat power spectrum (low vs high frequency power within 10 %)
    power = np.abs(np.fft.rfft2(noise)) ** 2
    assert power[:, 1:4, 1:4].mean() / power[:, 10:14, 10:14].mean() == pytest.approx(1.0, rel=0.15)
    assert noisy["summary"]["noise_sigma"] == pytest.approx(noise.std(), rel=0.01)
    assert clean["summary"]["noise_sigma"] == 0.0
    pd.testing.assert_frame_equal(pd.read_csv(clean["truth_csv"]), pd.read_csv(noisy["truth_csv"]))


def test_projection_matches_rendered_truth_map(tmp_path):
    """A noiseless, CTF-free particle is the real-space projection of the truth map at its pose."""
    r = simulate(str(tmp_path), "homogeneous", n=6, box=40, snr=math.inf, ctf=False, seed=3)
    vol, apix = mrc.read_map(r["truth_maps"]["state"])
    truth = pd.read_csv(r["truth_csv"])
    stack = mrc.open_stack(r["stack"])
    for i, row in truth.iterrows():
        ref = _real_space_projection(vol, apix, row.rot, row.tilt, row.psi, row.origin_x_A, row.origin_y_A)
        img = np.asarray(stack[i], np.float64)
        assert np.corrcoef(ref.ravel(), img.ravel())[0, 1] > 0.99
        assert img.sum() == pytest.approx(ref.sum(), rel=0.02)
    assert json.load(open(r["json"]))["ctf_applied"] is False


def test_conformational_particles_follow_their_state(clean_pair):
    """Each clean particle matches its own conformation better than the opposite end of the path."""
    clean = clean_pair[0]
    truth = pd.read_csv(clean["truth_csv"])
    mol = build_molecule(32, 3.0)
    from scipion_gmmhet.engine.simulation.simulate import project_particles
    sel = truth.iloc[np.argsort(np.abs(truth.conformation.to_numpy() - 0.5))[-6:]]  # near the ends
    own = project_particles(mol, sel, "conformational").numpy()
    other = project_particles(mol, sel.assign(conformation=1.0 - sel.conformation), "conformational").numpy()
    stack = np.asarray(mrc.open_stack(clean["stack"]))[sel.index.to_numpy()]
    np.testing.assert_allclose(stack, own, atol=1e-5 * np.abs(own).max())
    assert np.abs(stack - other).max() > 0.1 * np.abs(own).max()


def test_ctf_applied(clean_pair):
    """Images carry the CTF: the transform is the CTF-free projection times RELION's CTF."""
    from scipion_gmmhet.engine.conventions import ctf_2d, fourier_grid, image_to_fourier
    from scipion_gmmhet.engine.simulation.simulate import project_particles
    clean = clean_pair[0]
    truth = pd.read_csv(clean["truth_csv"]).iloc[:8]
    mol = build_molecule(32, 3.0)
    raw = image_to_fourier(project_particles(mol, truth, "conformational", ctf=False).double())
    ky, kx = fourier_grid(32, 3.0, dtype=torch.float64)
    ctf = ctf_2d(ky, kx, torch.tensor(truth.defocus_u_A.to_numpy()), torch.tensor(truth.defocus_v_A.to_numpy()),
                 torch.tensor(truth.defocus_angle_deg.to_numpy()), 300.0, 2.7, 0.1)
    got = image_to_fourier(torch.as_tensor(np.asarray(mrc.open_stack(clean["stack"])[:8], np.float64)))
    assert (got - raw * ctf).abs().max() < 1e-4 * raw.abs().max()
    assert (got - raw).abs().max() > 0.1 * raw.abs().max()


def test_arm_moves(tmp_path):
    r = simulate(str(tmp_path), "conformational", n=10, box=48, seed=0, n_states_maps=5)
    info = json.load(open(r["json"]))
    a0, a1 = info["domains"]["arm"]
    g0 = GMM.load(r["truth_gmm"]["conf_000"])
    g1 = GMM.load(r["truth_gmm"]["conf_004"])
    np.testing.assert_array_equal(g0.centers_A[:a0], g1.centers_A[:a0])  # core fixed
    arm0, arm1 = g0.centers_A[a0:a1], g1.centers_A[a0:a1]
    radius = np.sqrt(((arm0 - arm0.mean(0)) ** 2).sum(1).mean())
    assert np.linalg.norm(arm1.mean(0) - arm0.mean(0)) > 1.5 * radius
    assert (a1 - a0) > 0.08 * len(g0)  # the arm is a real domain
    # the maps differ mostly where the arm is at either end of its path
    v0, _ = mrc.read_map(r["truth_maps"]["conf_000"])
    v1, _ = mrc.read_map(r["truth_maps"]["conf_004"])
    D, apix = 48, 3.0
    near = np.zeros_like(v0, bool)
    g = (np.arange(D) - D // 2) * apix
    Z, Y, X = np.meshgrid(g, g, g, indexing="ij")
    for p in np.concatenate([arm0, arm1]):
        near |= (X - p[0]) ** 2 + (Y - p[1]) ** 2 + (Z - p[2]) ** 2 < (3 * g0.sigmas_A[0]) ** 2
    diff = np.abs(v1 - v0)
    assert diff[near].sum() / diff.sum() > 0.95
    assert diff.sum() > 0.1 * np.abs(v0).sum()
    # states in between move monotonically along the path
    coms = [GMM.load(r["truth_gmm"][f"conf_{i:03d}"]).centers_A[a0:a1].mean(0) for i in range(5)]
    steps = [np.linalg.norm(coms[i] - coms[0]) for i in range(5)]
    assert all(np.diff(steps) > 0)


def test_compositional_fraction_and_consensus(tmp_path):
    r = simulate(str(tmp_path), "compositional", n=400, box=32, seed=4, snr=1.0)
    truth = pd.read_csv(r["truth_csv"])
    f = truth.composition.mean()
    assert abs(f - 0.5) < 4 * math.sqrt(0.25 / 400)
    assert np.isnan(truth.conformation).all()
    w, _ = mrc.read_map(r["truth_maps"]["with_subunit"])
    wo, _ = mrc.read_map(r["truth_maps"]["without_subunit"])
    mass = (w.sum() - wo.sum()) / w.sum()
    assert 0.08 < mass < 0.2  # the subunit is ~10-15 % of the mass
    cons, _ = mrc.read_map(r["consensus"])
    np.testing.assert_allclose(cons, f * w + (1 - f) * wo, atol=1e-4 * w.max())
    t = draw_particles(20000, "compositional", np.random.default_rng(0), 3.0, subunit_fraction=0.2)
    assert t.composition.mean() == pytest.approx(0.2, abs=0.015)


def test_consensus_is_population_mean(mixed):
    """Mixed consensus ~ the mean of the state maps weighted by the particles' (c, label)."""
    truth = pd.read_csv(mixed["truth_csv"])
    info = json.load(open(mixed["json"]))
    cons, _ = mrc.read_map(mixed["consensus"])
    mol = build_molecule(32, 3.0)
    f = truth.composition.mean()
    a0, a1 = info["domains"]["arm"]
    s0, s1 = info["domains"]["subunit"]
    # direct average over the particles: every particle's arm at 1/n weight, subunit at weight f
    arms = mol.arm_centers(torch.tensor(truth.conformation.to_numpy())).numpy().reshape(-1, 3)
    parts = [(mol.centers_A[:a0], 1.0), (arms, 1.0 / len(truth)), (mol.centers_A[s0:s1], f)]
    centers = np.concatenate([p for p, _ in parts])
    amps = np.concatenate([np.full(len(p), mol.amplitude * wt) for p, wt in parts])
    ref = GMM(centers, amps, np.full(len(centers), mol.sigma_A), 32, 3.0).render()
    assert np.abs(cons - ref).max() < 0.03 * ref.max()


def test_reproducible_with_seed(tmp_path):
    kw = dict(n=40, box=32, snr=0.2)
    a = simulate(str(tmp_path / "a"), "mixed", seed=7, **kw)
    b = simulate(str(tmp_path / "b"), "mixed", seed=7, **kw)
    c = simulate(str(tmp_path / "c"), "mixed", seed=8, **kw)
    for key in ("truth_csv", "star"):
        assert open(a[key], "rb").read() == open(b[key], "rb").read(), key
    # MRC headers hold a creation time stamp: compare the data
    np.testing.assert_array_equal(np.asarray(mrc.open_stack(a["stack"])), np.asarray(mrc.open_stack(b["stack"])))
    np.testing.assert_array_equal(mrc.read_map(a["consensus"])[0], mrc.read_map(b["consensus"])[0])
    assert not np.array_equal(np.asarray(mrc.open_stack(a["stack"])), np.asarray(mrc.open_stack(c["stack"])))
    assert not pd.read_csv(a["truth_csv"]).equals(pd.read_csv(c["truth_csv"]))


def test_batches_do_not_change_the_data(tmp_path):
    a = simulate(str(tmp_path / "a"), "mixed", n=50, box=32, snr=math.inf, seed=9)
    b = simulate(str(tmp_path / "b"), "mixed", n=50, box=32, snr=math.inf, seed=9, batch_size=7)
    np.testing.assert_allclose(np.asarray(mrc.open_stack(a["stack"])), np.asarray(mrc.open_stack(b["stack"])),
                               atol=1e-5)


def test_molecule_is_multidomain_and_fits_the_box():
    for box in (32, 64):
        mol = build_molecule(box, 3.0)
        counts = np.bincount(mol.domain, minlength=len(DOMAIN_NAMES))
        assert (counts > 20).all() and 300 <= len(mol.centers_A) <= 2000
        assert mol.sigma_A >= 1.2 * 3.0
        L = box * 3.0
        for c in (0.0, 1.0):
            r = np.linalg.norm(mol.state_centers(c, True), axis=1).max()
            assert 0.25 * L < r < 0.42 * L
        sub = counts[DOMAIN_NAMES.index("subunit")] / counts.sum()
        assert 0.1 <= sub <= 0.15
    # asymmetric: the inertia tensor has three distinct eigenvalues
    x = mol.state_centers(0.5, True).astype(np.float64)
    x -= x.mean(0)
    ev = np.linalg.eigvalsh(x.T @ x / len(x))
    assert np.min(np.diff(ev)) > 0.05 * ev.max()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["simulate", "--out", str(out), "--kind", "compositional", "--n", "30", "--box", "32",
                   "--subunit-fraction", "0.3", "--snr", "inf", "--seed", "5"])
    assert rc == 0
    assert "30 compositional particles" in capsys.readouterr().out
    info = json.load(open(out / "simulation.json"))
    assert info["subunit_fraction"] == 0.3 and info["snr"] == "inf" and info["seed"] == 5
    assert len(star.read_star(str(out / "particles.star"))["particles"]) == 30
    assert cli.main(["simulate", "--out", str(tmp_path / "bad"), "--kind", "mixed", "--box", "31"]) == 2
    assert "box 31" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, word", [
    (dict(kind="blob"), "kind"), (dict(n=0), "n 0"), (dict(box=30 + 1), "box"), (dict(apix=0.0), "apix"),
    (dict(snr=0.0), "snr"), (dict(subunit_fraction=1.5), "subunit_fraction"), (dict(max_shift_px=-1), "max_shift"),
])
def test_bad_input(tmp_path, kwargs, word):
    args = dict(kind="mixed", n=10, box=32)
    args.update(kwargs)
    with pytest.raises(InputError, match=word):
        simulate(str(tmp_path), **args)
    assert not os.path.exists(tmp_path / "particles.star")
