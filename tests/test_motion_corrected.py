"""Tests of engine/analysis/motion_corrected.py: deformed backprojection with per-particle moves.

Synthetic particles of a chiral GMM (as tests/test_reconstruct.py): zero moves must give the
plain direct Fourier inversion, and particles whose molecule was moved rigidly must come back
to the unmoved molecule when the moves are given (and stay moved in the plain map).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.analysis import motion_corrected as mc
from scipion_gmmhet.engine.analysis import reconstruct as rc
from scipion_gmmhet.engine.conventions import fourier_to_image
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.model.fourier import fsc_table
from scipion_gmmhet.engine.model.gmm import GMM, project

from test_reconstruct import APIX, BOX, _chiral_gmm, _ctf, _ctf_params, _peak_shift, _random_rotations

SHIFT_A = np.array([8.0, -4.0, 0.0], np.float32)  # 2 and 1 pixels


def _particles(n=400, seed=0, move_A=None):
    rng = np.random.default_rng(seed)
    g = _chiral_gmm(rng)
    R = _random_rotations(n, rng)
    origins = torch.tensor(rng.uniform(-6, 6, (n, 2)), dtype=torch.float32)
    params = _ctf_params(n, rng)
    c, a, s = g.tensors()
    if move_A is not None:
        c = c + torch.as_tensor(move_A)
    F = project(c, a, s, R, BOX, APIX, origins, _ctf(params))
    return g, fourier_to_image(F, BOX), R, origins, params


def _insert_all(bp, imgs, R, origins, params, shift=None, B=100):
    for s in range(0, len(imgs), B):
        F, ctf = rc.prepare_batch(imgs[s:s + B], origins[s:s + B], {k: v[s:s + B] for k, v in params.items()}, APIX)
        if shift is None:
            bp.insert(F, R[s:s + B], ctf, "full")
        else:
            bp.insert(F, R[s:s + B], ctf, "full", None, shift(R[s:s + B]))
    return bp.reconstruct()


def _field(g):
    return mc.DisplacementField(g.centers_A, g.amplitudes, BOX, APIX, sigma_A=6.0)


def test_zero_moves_reproduce_the_plain_reconstruction():
    g, imgs, R, origins, params = _particles()
    plain = _insert_all(rc.Backprojector(BOX, APIX, pad=2), imgs, R, origins, params)
    f = _field(g)
    zero = lambda Rb: f.projected_px(torch.zeros(len(Rb), len(g), 3), Rb)  # noqa: E731
    hybrid = _insert_all(mc.DeformedBackprojector(BOX, APIX), imgs, R, origins, params, zero)
    np.testing.assert_allclose(hybrid, plain, atol=1e-5 * np.abs(plain).max())
    real = _insert_all(mc.DeformedBackprojector(BOX, APIX, formulation="real_space"), imgs, R, origins, params, zero)
    t = fsc_table(real, plain, APIX)
    assert t["fsc"][:BOX // 4 + 1].min() >= 0.98, t["fsc"]
    assert np.all(_peak_shift(real, plain) == 0)


@pytest.mark.parametrize("formulation", mc.FORMULATIONS)
def test_known_rigid_displacement_is_undone(formulation):
    g, imgs, R, origins, params = _particles(move_A=SHIFT_A)
    truth = g.render()
    moved = GMM(g.centers_A + SHIFT_A, g.amplitudes, g.sigmas_A, BOX, APIX).render()
    plain = _insert_all(rc.Backprojector(BOX, APIX, pad=2), imgs, R, origins, params)
    f = _field(g)
    moves = lambda Rb: f.projected_px(torch.as_tensor(SHIFT_A).expand(len(Rb), len(g), 3), Rb)  # noqa: E731
    corr = _insert_all(mc.DeformedBackprojector(BOX, APIX, formulation=formulation), imgs, R, origins, params, moves)
    assert np.all(_peak_shift(plain, truth) == [0, -1, 2])  # z, y, x voxels: the data are moved
    assert np.all(_peak_shift(corr, truth) == 0)
    good, bad = fsc_table(corr, truth, APIX)["fsc"], fsc_table(plain, truth, APIX)["fsc"]
    assert good[1:BOX // 4 + 1].min() >= 0.9, good
    assert good[1:9].mean() > bad[1:9].mean() + 0.2
    assert fsc_table(plain, moved, APIX)["fsc"][1:9].min() > 0.95


def test_displacement_field_interpolates_moves_and_fades_in_solvent():
    rng = np.random.default_rng(1)
    g = _chiral_gmm(rng)
    f = _field(g)
    fld = f.field(torch.as_tensor(SHIFT_A).expand(1, len(g), 3))[0]  # (3, D, D, D) xyz
    dens = g.render()
    inside = dens > 0.5 * dens.max()
    for k in range(3):
        assert np.allclose(fld[k].numpy()[inside], SHIFT_A[k], atol=0.05 * np.abs(SHIFT_A).max() + 1e-3)
    assert float(fld[:, 0, 0, 0].abs().max()) < 1e-3  # a box corner, far from every Gaussian
    # per-Gaussian moves: the field near a Gaussian follows that Gaussian's move
    moves = torch.zeros(1, len(g), 3)
    moves[0, :, 0] = torch.as_tensor(g.centers_A[:, 0] > 0, dtype=torch.float32) * 4.0
    fx = f.field(moves)[0, 0].numpy()
    assert fx.max() <= 4.0 + 1e-4 and fx.min() >= -1e-4


def test_motion_corrected_needs_both_halves_and_rejects_wrong_half_models(tmp_path):
    from scipion_gmmhet.engine.cli import main
    (tmp_path / "p.star").write_text("")  # never read: the arguments are refused first
    for extra in (["--motion-corrected"], ["--motion-corrected", "--train-half1", str(tmp_path)],
                  ["--train", str(tmp_path)]):
        assert main(["reconstruct", "--particles", str(tmp_path / "p.star"), "--out", str(tmp_path / "m.mrc")]
                    + extra) != 0
    with pytest.raises(InputError, match="go together"):
        from scipion_gmmhet.engine.commands.reconstruct import _check_motion_args
        import argparse
        _check_motion_args(argparse.Namespace(train_half1="a", train_half2=None, train=None, motion_corrected=True))
    with pytest.raises(InputError, match="no finished training"):
        mc.latents_for_rows(None, str(tmp_path))


def _tiny_simulation(sim_dir, out, n: int, seed: int, keep_seed: int):
    """A conformational simulation (box 24, 8 A/px, SNR 1) in ``sim_dir`` and a small neutral GMM
    (48 of the truth's Gaussians, wider) in ``out/neutral.npz``: ``(simulate's result, gmm path)``."""
    from scipion_gmmhet.engine.simulation.simulate import simulate
    r = simulate(str(sim_dir), "conformational", n=n, box=24, apix=8.0, snr=1.0, seed=seed)
    sim = GMM.load(r["truth_gmm"]["neutral"])
    keep = np.random.default_rng(keep_seed).choice(len(sim), 48, replace=False)
    gmm_path = str(out / "neutral.npz")
    GMM(sim.centers_A[keep], sim.amplitudes[keep] * 4, sim.sigmas_A[keep] * 1.6, 24, 8.0).save(gmm_path)
    return r, gmm_path


def _train_half_models(star: str, gmm_path: str, out, epochs: int, *extra) -> dict:
    """A small network (zdim 2, one hidden layer of 32) trained on each half set
    (``rlnRandomSubset``) of ``star``: ``{half: training folder}``."""
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.io.metadata import read_particles, write_particles
    meta = read_particles(star)
    h = np.asarray(meta.particles["rlnRandomSubset"]).astype(int)
    dirs = {}
    for half in (1, 2):
        hstar = str(out / f"half{half}.star")
        write_particles(hstar, meta.subset(np.flatnonzero(h == half)))
        dirs[half] = str(out / f"t{half}")
        assert main(["train", "--particles", hstar, "--gmm", gmm_path, "--epochs", str(epochs), "--zdim", "2",
                     "--hidden", "32", "--layers", "1", "--device", "cpu", "--out", dirs[half], *extra]) == 0
    return dirs


@pytest.fixture(scope="module")
def trained_halves(tmp_path_factory):
    """200 simulated conformational particles, a small neutral GMM, two half models (20 epochs:
    enough to learn the arm swing, gate z +7 / +6.5)."""
    out = tmp_path_factory.mktemp("mc_sim")
    r, gmm_path = _tiny_simulation(out, out, n=200, seed=4, keep_seed=0)
    return r, _train_half_models(r["star"], gmm_path, out, 20)


def test_cli_motion_corrected_with_half_models(trained_halves, tmp_path):
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.io.metadata import read_particles
    from scipion_gmmhet.engine.io.mrc import read_map
    r, dirs = trained_halves
    out = str(tmp_path / "mc.mrc")
    assert main(["reconstruct", "--particles", r["star"], "--motion-corrected", "--train-half1", dirs[1],
                 "--train-half2", dirs[2], "--out", out]) == 0
    for suffix in ("", "_half1", "_half2", "_mask"):
        vol, apix = read_map(out[:-4] + suffix + ".mrc")
        assert vol.shape == (24, 24, 24) and apix == pytest.approx(8.0) and np.isfinite(vol).all()
    assert os.path.exists(out[:-4] + "_fsc.csv")
    # a half model given for the wrong half is refused (its particles would correlate the halves)
    meta = read_particles(r["star"])
    halves = rc.half_assignment(meta)
    with pytest.raises(InputError, match="half 1"):
        mc.half_moves(meta, halves, {1: dirs[2], 2: dirs[1]})
    lat, found = mc.latents_for_rows(meta, dirs[1])
    assert np.array_equal(found, halves == 1) and lat.shape == (len(meta), 2)


def test_cli_motion_corrected_trains_the_half_models(trained_halves, tmp_path):
    """--train only: the two half models are trained with that run's settings (here one epoch),
    each on its own half star, then reused by a second call."""
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.io.metadata import read_particles
    r, dirs = trained_halves
    out = str(tmp_path / "mc.mrc")
    args = ["reconstruct", "--particles", r["star"], "--motion-corrected", "--train", dirs[1], "--half-epochs", "1",
            "--no-mask", "--out", out]
    assert main(args) == 0
    halves = str(tmp_path / "mc_halves")
    meta = read_particles(r["star"])
    h = rc.half_assignment(meta)
    for half in (1, 2):
        lat, found = mc.latents_for_rows(meta, os.path.join(halves, f"half{half}"))
        assert np.array_equal(found, h == half)
    stamp = os.path.getmtime(os.path.join(halves, "half1", "model.pt"))
    assert main(args) == 0
    assert os.path.getmtime(os.path.join(halves, "half1", "model.pt")) == stamp  # reused, not retrained


@pytest.fixture(scope="module")
def noise_halves(tmp_path_factory):
    """The tiny conformational simulation's star with images of pure noise, and two half models
    trained on them (5 epochs): whatever they decode is fitted to noise."""
    import mrcfile
    from scipion_gmmhet.engine.io.metadata import read_particles, write_particles
    out = tmp_path_factory.mktemp("mc_noise")
    r, gmm_path = _tiny_simulation(out / "sim", out, n=300, seed=5, keep_seed=1)
    meta = read_particles(r["star"])
    with mrcfile.new(str(out / "noise.mrcs")) as m:
        m.set_data(np.random.default_rng(2).normal(0, 1, (len(meta), 24, 24)).astype(np.float32))
        m.set_image_stack()
        m.voxel_size = 8.0
    meta.particles["rlnImageName"] = [f"{i + 1:06d}@noise.mrcs" for i in range(len(meta))]
    meta.root = str(out)
    star = str(out / "noise.star")
    write_particles(star, meta)
    return star, _train_half_models(star, gmm_path, out, 5, "--highres", "32")


def test_gate_zeroes_noise_fitted_moves(noise_halves, tmp_path):
    """Pure noise: the models decode moves (fitted to each image's noise), the gate scores each
    model on the other half's particles (encoded from one set of Fourier sectors, scored on the
    other), finds no gain and zeroes the moves, so the half maps are the plain half maps (FSC at
    chance); with the gate off the moves reach the maps."""
    from scipion_gmmhet.engine.analysis.motion_gate import gate_model
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.io.metadata import read_particles
    from scipion_gmmhet.engine.io.mrc import read_map
    from scipion_gmmhet.engine.training.trained import load_trained
    star, dirs = noise_halves
    meta = read_particles(star)
    halves = rc.half_assignment(meta)
    for half in (1, 2):
        model = load_trained(dirs[half])
        z = torch.as_tensor(mc.latents_for_rows(meta, dirs[half])[0][:20])
        moved = (model.decode(z)[0] - model.neutral.tensors()[0]).norm(dim=-1)
        assert float(moved.max()) > 0.0  # the network does decode moves
        g = gate_model(model, meta, np.flatnonzero(halves != half))
        assert g.n == int((halves != half).sum()) and not g.passed and g.z < 3.0, g.reason
    paths = {}
    for name, extra in (("plain", []), ("gated", ["--motion-corrected"]),
                        ("ungated", ["--motion-corrected", "--gate-z", "0"])):
        mcargs = ["--train-half1", dirs[1], "--train-half2", dirs[2]] if extra else []
        paths[name] = str(tmp_path / f"{name}.mrc")
        assert main(["reconstruct", "--particles", star, "--no-mask", "--out", paths[name]] + extra + mcargs) == 0
    for suffix in ("_half1", "_half2"):
        plain = read_map(paths["plain"][:-4] + suffix + ".mrc")[0]
        gated = read_map(paths["gated"][:-4] + suffix + ".mrc")[0]
        ungated = read_map(paths["ungated"][:-4] + suffix + ".mrc")[0]
        np.testing.assert_allclose(gated, plain, atol=1e-5 * np.abs(plain).max())
        assert np.abs(ungated - plain).max() > 1e-3 * np.abs(plain).max()


def test_sector_split_is_hermitian_and_halves_the_band():
    """The two sides of the Fourier split: disjoint, each about half of every ring, and a
    coefficient and its Hermitian mirror (kx = 0 and Nyquist columns) on the same side."""
    from scipion_gmmhet.engine.analysis.motion_gate import restricted_binner, sector_split
    from scipion_gmmhet.engine.model.fourier import RingBinner, shell_index_2d
    box = 32
    a = sector_split(box)
    assert a.shape == (box, box // 2 + 1) and not bool(a[0, 0])
    for col in (0, box // 2):  # columns holding both members of a Hermitian pair
        ky = np.arange(1, box // 2)
        assert np.array_equal(a[ky, col].numpy(), a[box - ky, col].numpy())
    rings = shell_index_2d(box).numpy()
    for k in (4, 8, 15):
        on = a.numpy()[rings == k]
        assert 0.35 < on.mean() < 0.65, (k, on.mean())
    band = RingBinner(box, 4.0, 100.0, 10.0)
    sa, sb = restricted_binner(band, a), restricted_binner(band, ~a)
    assert sa.flat_index.numel() + sb.flat_index.numel() == band.flat_index.numel()
    assert not set(sa.flat_index.tolist()) & set(sb.flat_index.tolist())
    # the restricted correlation is the correlation over those coefficients only
    g = torch.Generator().manual_seed(0)
    F1 = torch.randn(2, box, box // 2 + 1, dtype=torch.complex64, generator=g)
    F2 = F1.clone()
    F2[:, ~a] = torch.randn(int((~a).sum()), dtype=torch.complex64, generator=g)
    assert torch.allclose(sa.band_corr(F1, F2), torch.ones(2), atol=1e-5)
    assert float(sb.band_corr(F1, F2).abs().max()) < 0.2


def test_gate_keeps_moves_that_predict_the_images(trained_halves):
    """Real motion (the arm swing, SNR 1): each half model, encoded from one set of Fourier
    sectors of the other half's particles, predicts the other sectors better than the neutral
    model by many standard errors (kept); the same gains less their mean do not pass."""
    from scipion_gmmhet.engine.analysis.motion_gate import gate_from_gains, gate_model, split_gains
    from scipion_gmmhet.engine.io.metadata import read_particles
    from scipion_gmmhet.engine.training.trained import load_trained
    r, dirs = trained_halves
    meta = read_particles(r["star"])
    halves = rc.half_assignment(meta)
    for half in (1, 2):
        model = load_trained(dirs[half])
        rows = np.flatnonzero(halves != half)
        g = gate_model(model, meta, rows)
        assert g.passed and g.gain > 0 and g.n == rows.size, g.reason
        gains = split_gains(model, meta, rows)
        assert gains.shape == (rows.size,)
        assert gate_from_gains(gains).z == pytest.approx(g.z, rel=1e-4)  # seeded: the same verdict
        assert not gate_from_gains(gains - gains.mean()).passed  # a zero-mean gain never passes
