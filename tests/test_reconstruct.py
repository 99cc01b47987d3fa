"""Tests of engine/analysis/reconstruct.py: direct Fourier inversion with CTF correction.

The reconstruction is compared with the ground-truth map itself (not only half-map
self-consistency) and with its mirror image, and its cross-correlation peak is checked to sit
at zero shift: a handedness flip or a shift of the origin convention would fail these.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.analysis import reconstruct as rc
from scipion_gmmhet.engine.conventions import ctf_2d, fourier_grid, fourier_to_image
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.outputs import read_fsc_csv, reconstruction_paths
from scipion_gmmhet.engine.model.fourier import fsc_table
from scipion_gmmhet.engine.model.gmm import GMM, project

BOX, APIX = 32, 4.0


def _random_rotations(n, rng):
    from scipy.spatial.transform import Rotation
    q = rng.normal(size=(n, 4))
    return torch.tensor(Rotation.from_quat(q / np.linalg.norm(q, axis=1, keepdims=True)).as_matrix(),
                        dtype=torch.float32)


def _chiral_gmm(rng):
    n = 40
    c = rng.normal(size=(n, 3)) * np.array([14.0, 9.0, 6.0])
    c[:8] += [10.0, 6.0, 0.0]  # an off-axis lobe: the molecule is chiral
    return GMM(c, rng.uniform(0.5, 1.5, n), np.full(n, 4.0), BOX, APIX)


def _ctf_params(n, rng):
    du = rng.uniform(8000, 25000, n)
    return dict(defocus_u_A=du, defocus_v_A=du - rng.uniform(0, 400, n), defocus_angle_deg=rng.uniform(0, 180, n),
                voltage_kv=np.full(n, 300.0), cs_mm=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1))


def _ctf(params):
    ky, kx = fourier_grid(BOX, APIX)
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()}
    return ctf_2d(ky, kx, t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"], t["voltage_kv"],
                  t["cs_mm"], t["amplitude_contrast"])


def _peak_shift(a, b):
    cc = np.fft.irfftn(np.fft.rfftn(a) * np.conj(np.fft.rfftn(b)), s=a.shape, axes=(-3, -2, -1))
    idx = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    return np.where(idx > a.shape[0] // 2, idx - a.shape[0], idx)


def _synthetic(n=300, seed=0, premultiply=False):
    rng = np.random.default_rng(seed)
    g = _chiral_gmm(rng)
    R = _random_rotations(n, rng)
    origins = torch.tensor(rng.uniform(-6, 6, (n, 2)), dtype=torch.float32)
    params = _ctf_params(n, rng)
    ctf = _ctf(params)
    c, a, s = g.tensors()
    F = project(c, a, s, R, BOX, APIX, origins, ctf * ctf if premultiply else ctf)
    return g.render(), fourier_to_image(F, BOX), R, origins, params


@pytest.mark.parametrize("mode", ["full", "premultiplied"])
def test_backprojector_recovers_truth(mode):
    truth, imgs, R, origins, params = _synthetic(premultiply=(mode == "premultiplied"))
    bp = rc.Backprojector(BOX, APIX, pad=2)
    for s in range(0, len(imgs), 64):  # batched insertion
        F, ctf = rc.prepare_batch(imgs[s:s + 64], origins[s:s + 64], {k: v[s:s + 64] for k, v in params.items()}, APIX)
        bp.insert(F, R[s:s + 64], ctf, mode)
    vol = bp.reconstruct()
    t = fsc_table(vol, truth, APIX)
    mirror = fsc_table(vol, truth[::-1].copy(), APIX)
    assert rc.nyquist_fraction_at(t, 0.9) >= 0.8, t["fsc"]
    assert t["fsc"][1:9].mean() > mirror["fsc"][1:9].mean() + 0.2  # the right hand wins clearly
    assert np.all(_peak_shift(vol, truth) == 0)
    # the scale is kept (sum over voxels = the integral the projections carry)
    assert abs(float((vol * truth).sum() / (truth * truth).sum()) - 1.0) < 0.05


def test_gridding_correction_keeps_scale_and_phase_flipped_mode():
    truth, imgs, R, origins, params = _synthetic(n=200, seed=1)
    F, ctf = rc.prepare_batch(imgs, origins, params, APIX)
    flipped = F * torch.sign(ctf)  # phase-flipped images
    bp = rc.Backprojector(BOX, APIX)
    bp.insert(flipped, R, ctf, "phase_flipped")
    vol = bp.reconstruct()
    assert rc.nyquist_fraction_at(fsc_table(vol, truth, APIX), 0.9) >= 0.7
    bp2 = rc.Backprojector(BOX, APIX)
    bp2.insert(F, R, ctf, "full")
    on, off = bp2.reconstruct(gridding_correction=True), bp2.reconstruct(gridding_correction=False)
    # without the correction the map is damped towards the box edge
    shell = np.linalg.norm(np.indices(truth.shape) - BOX // 2, axis=0)
    edge = (shell > 9) & (truth > 0.1 * truth.max())
    err_on = np.abs(on[edge] - truth[edge]).mean()
    err_off = np.abs(off[edge] - truth[edge]).mean()
    assert err_on < err_off


def test_regulariser_damps_unsampled_directions():
    truth, imgs, R, origins, params = _synthetic(n=60, seed=2)
    F, ctf = rc.prepare_batch(imgs, origins, params, APIX)
    bp = rc.Backprojector(BOX, APIX)
    bp.insert(F, R, ctf, "full")
    weak, strong = bp.reconstruct(reg_frac=0.0), bp.reconstruct(reg_frac=10.0)
    assert np.isfinite(weak).all() and np.isfinite(strong).all()
    assert np.abs(strong).sum() < np.abs(weak).sum()  # lambda only ever shrinks the map


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    from scipion_gmmhet.engine.simulation.simulate import simulate
    out = tmp_path_factory.mktemp("sim_homog")
    simulate(str(out), "homogeneous", n=400, box=BOX, apix=6.0, snr=10.0, seed=3)
    return str(out)


def test_simulated_dataset_reconstructs_to_truth(sim_dir):
    from scipion_gmmhet.engine.io.metadata import read_particles
    from scipion_gmmhet.engine.io.mrc import read_map
    meta = read_particles(os.path.join(sim_dir, "particles.star"))
    rec = rc.reconstruct_particles(meta, batch_size=128, progress=False)
    truth, _ = read_map(os.path.join(sim_dir, "truth_maps", "state.mrc"))
    t = fsc_table(rec.volume, truth, meta.apix)
    mirror = fsc_table(rec.volume, truth[::-1].copy(), meta.apix)
    assert rc.nyquist_fraction_at(t, 0.5) >= 0.6, t["fsc"]
    assert t["fsc"][1:12].mean() > mirror["fsc"][1:12].mean() + 0.2
    assert np.all(_peak_shift(rec.volume, truth) == 0)
    assert rec.half_sizes == (200, 200)
    assert 2 * meta.apix <= rec.resolution_0143_A < 6 * meta.apix


def test_cli_subset_writes_maps_and_fsc(sim_dir, tmp_path):
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.io.mrc import read_map
    idx = tmp_path / "rows.txt"
    idx.write_text("# first 150 rows\n" + "\n".join(str(i) for i in range(150)) + "\n")
    out = tmp_path / "sub.mrc"
    assert main(["reconstruct", "--particles", os.path.join(sim_dir, "particles.star"), "--indices", str(idx),
                 "--out", str(out)]) == 0
    for suffix in (".mrc", "_half1.mrc", "_half2.mrc", "_fsc.csv"):
        assert os.path.exists(str(out)[:-4] + suffix)
    vol, apix = read_map(str(out))
    assert vol.shape == (BOX, BOX, BOX) and abs(apix - 6.0) < 1e-4
    table = read_fsc_csv(reconstruction_paths(str(out))["fsc"])
    assert table["fsc"].size == BOX // 2 + 1 and table["fsc"][1] > 0.9
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path))
    # bad indices: one-line error, exit status 2
    bad = tmp_path / "bad.txt"
    bad.write_text("0\n1\n100000\n")
    assert main(["reconstruct", "--particles", os.path.join(sim_dir, "particles.star"), "--indices", str(bad),
                 "--out", str(tmp_path / "x.mrc")]) == 2


def test_half_assignment_uses_random_subset(sim_dir):
    from scipion_gmmhet.engine.io.metadata import read_particles
    meta = read_particles(os.path.join(sim_dir, "particles.star"))
    h = rc.half_assignment(meta, seed=0)
    assert set(np.unique(h)) == {1, 2} and abs((h == 1).sum() - (h == 2).sum()) <= 1
    meta.particles["rlnRandomSubset"] = np.where(np.arange(len(meta)) < 100, 1, 2)
    h2 = rc.half_assignment(meta)
    assert (h2[:100] == 1).all() and (h2[100:] == 2).all()


def test_read_indices(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.array([3, 1, 2]))
    assert rc.read_indices(str(p), 10).tolist() == [3, 1, 2]
    t = tmp_path / "a.txt"
    t.write_text("1, 2\n5 # comment\n")
    assert rc.read_indices(str(t), 10).tolist() == [1, 2, 5]
    for text in ("1\n1\n", "-1\n", "1.5\n", "x\n", "10\n"):
        t.write_text(text)
        with pytest.raises(InputError):
            rc.read_indices(str(t), 10)
    with pytest.raises(InputError):
        rc.read_indices(str(tmp_path / "missing.txt"))


def test_masked_fsc_removes_mask_correlation():
    rng = np.random.default_rng(7)
    truth = _chiral_gmm(rng).render()
    mask = rc.auto_mask(truth, APIX, lowpass_A=12.0)
    assert 0.02 < mask.mean() < 0.6 and mask.max() == 1.0 and mask.min() == 0.0
    a = truth + rng.normal(0, truth.std(), truth.shape)
    b = truth + rng.normal(0, truth.std(), truth.shape)
    plain = fsc_table(a, b, APIX)["fsc"]
    t = rc.masked_fsc(a, b, mask, APIX)
    # masking removes solvent noise: the corrected masked FSC is higher than the plain one ...
    assert t["fsc"][4:12].mean() > plain[4:12].mean()
    # ... a map against itself stays at 1, and two pure-noise maps stay near 0 after the correction
    assert np.allclose(rc.masked_fsc(a, a, mask, APIX)["fsc"], 1.0, atol=1e-6)
    n1, n2 = rng.normal(size=truth.shape), rng.normal(size=truth.shape)
    tn = rc.masked_fsc(n1, n2, mask, APIX, randomise_from_shell=2)
    assert np.abs(tn["fsc"][3:]).mean() < 0.2


def test_random_subset_message_prints_plain_numbers():
    """rlnRandomSubset that is not whole numbers: the message shows the value as written, not
    numpy 2's scalar repr (np.float64(1.5))."""
    from scipion_gmmhet.engine.analysis.reconstruct import _random_subset_problem
    halves, problem = _random_subset_problem(np.array([1.0, 2.0, 1.5]))
    assert halves is None
    assert "(e.g. 1.5)" in problem and "np." not in problem
    halves, problem = _random_subset_problem(np.array([1.0, np.nan, 2.0]))
    assert "(e.g. nan)" in problem
