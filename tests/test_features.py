"""Encoder inputs (batched FRC gradients), focus masks, the feature cache and symmetry operators."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.conventions import euler_to_matrix
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.data import ArrayImages, Particles
from scipion_gmmhet.engine.training.features import FeatureCache, GradientFeatures, focus_mask_gaussians
from scipion_gmmhet.engine.model.fourier import RingBinner
from scipion_gmmhet.engine.model.gmm import GMM, project
from scipion_gmmhet.engine.io.mrc import write_map
from scipion_gmmhet.engine.model.symmetry import (expand_rotations, parse_symmetry, symmetrize_points,
                                            symmetry_operators)

BOX, APIX = 32, 4.0


def random_gmm(n=64, seed=0) -> GMM:
    rng = np.random.default_rng(seed)
    return GMM(rng.normal(scale=14.0, size=(n, 3)), rng.uniform(0.5, 1.5, n), rng.uniform(4.0, 7.0, n), BOX, APIX)


def random_poses(n, seed=1):
    rng = np.random.default_rng(seed)
    rot, tilt, psi = rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)
    return euler_to_matrix(rot, tilt, psi).astype(np.float32), rng.uniform(-4, 4, (n, 2)).astype(np.float32)


def ctf_dict(n, seed=2):
    rng = np.random.default_rng(seed)
    du = rng.uniform(8000, 25000, n)
    return {"defocus_u_A": du, "defocus_v_A": du - 200, "defocus_angle_deg": rng.uniform(0, 180, n),
            "voltage_kv": np.full(n, 300.0), "cs_mm": np.full(n, 2.7), "amplitude_contrast": np.full(n, 0.1),
            "phase_shift_deg": np.zeros(n), "bfactor": np.zeros(n), "scale": np.ones(n)}


def make_particles(g: GMM, n=12, ctf_mode="full", noise=0.5, seed=3, sym_ops=None):
    rots, origins = random_poses(n, seed)
    ctf = ctf_dict(n, seed)
    p0 = Particles(ArrayImages(np.zeros((n, BOX, BOX), np.float32)), rots, origins, BOX, APIX, ctf=ctf,
                   ctf_mode=ctf_mode)
    b = p0.geometry(torch.arange(n))
    # data from a perturbed model so gradients are not zero
    c, a, s = g.tensors()
    c = c + torch.as_tensor(np.random.default_rng(seed).normal(scale=3.0, size=c.shape), dtype=torch.float32)
    F = project(c, a, s, b.rotations, BOX, APIX, b.origins_A, b.ctf)
    img = torch.fft.fftshift(torch.fft.irfft2(F, s=(BOX, BOX)), dim=(-2, -1)).numpy()
    img = img + noise * img.std() * np.random.default_rng(seed).normal(size=img.shape).astype(np.float32)
    return Particles(ArrayImages(img.astype(np.float32)), rots, origins, BOX, APIX, ctf=ctf, ctf_mode=ctf_mode,
                     sym_ops=sym_ops)


@pytest.mark.parametrize("ctf_mode", ["full", "phase_flipped", "premultiplied", "none"])
def test_batched_gradient_equals_one_at_a_time(ctf_mode):
    g = random_gmm()
    p = make_particles(g, ctf_mode=ctf_mode)
    binner = RingBinner(BOX, APIX, 100.0, 10.0)
    mobile = torch.arange(0, len(g), 2)
    feats = GradientFeatures(g, binner, mobile, ("centers", "amplitudes", "sigmas"))
    items = np.arange(len(p))
    batched = feats.raw(p.batch(items)).double()
    assert batched.shape == (len(p), 5 * len(mobile))
    assert batched.abs().max() > 0
    for i in items:
        # reference: plain autograd on one particle with unexpanded (N,) parameters
        b = p.batch([i])
        c, a, s = (t.clone().double().requires_grad_(True) for t in g.tensors())
        F = project(c, a, s, b.rotations.double(), BOX, APIX, b.origins_A.double(),
                    None if b.ctf is None else b.ctf.double())
        loss = -binner.mean_frc(F, b.F_img.to(torch.complex128)).sum()
        gc, ga, gs = torch.autograd.grad(loss, [c, a, s])
        ref = torch.cat([gc[mobile].reshape(-1), ga[mobile], gs[mobile]])
        np.testing.assert_allclose(batched[i].numpy(), ref.numpy(), rtol=2e-3,
                                   atol=2e-3 * float(ref.abs().max()))


def test_normalisation_and_cache(tmp_path):
    g = random_gmm()
    p = make_particles(g, n=20)
    binner = RingBinner(BOX, APIX, 100.0, 10.0)
    feats = GradientFeatures(g, binner, torch.arange(len(g)), ("centers", "amplitudes"))
    stats = feats.estimate_stats(p, np.arange(20), batch_size=7)
    x = feats(p.batch(np.arange(20))).double()
    # after normalisation each type has zero mean per feature and unit RMS over the sample
    n3 = 3 * len(g)
    assert abs(float(x[:, :n3].pow(2).mean()) - 1.0) < 1e-3
    assert abs(float(x[:, n3:].pow(2).mean()) - 1.0) < 1e-3
    assert float(x.mean(0).abs().max()) < 1e-4
    assert set(stats["scale"]) == {"centers", "amplitudes"}
    cache = FeatureCache(str(tmp_path))
    fp = {"a": 1}
    cache.build(feats, p, 6, fp)
    shuffled = np.array([5, 1, 19, 0, 7])
    got = cache.get(shuffled, "cpu")
    np.testing.assert_allclose(got.numpy(), x[shuffled].float().numpy(), atol=1e-2, rtol=1e-2)
    assert FeatureCache(str(tmp_path)).load(fp)
    assert not FeatureCache(str(tmp_path)).load({"a": 2})  # other inputs -> rebuilt


def test_focus_mask_selects_by_nearest_voxel(tmp_path):
    g = random_gmm(n=64)
    mask = np.zeros((BOX, BOX, BOX), np.float32)
    mask[:, :, BOX // 2:] = 1.0  # x >= 0 half
    path = str(tmp_path / "mask.mrc")
    write_map(path, mask, APIX)
    idx = focus_mask_gaussians(g, path)
    ix = np.rint(g.centers_A[:, 0] / APIX).astype(int) + BOX // 2
    inbox = np.all(np.abs(np.rint(g.centers_A / APIX)) < BOX // 2, axis=1)
    expected = np.nonzero((ix >= BOX // 2) & inbox)[0]
    np.testing.assert_array_equal(idx, expected)
    assert 0 < len(idx) < len(g)
    write_map(path, np.zeros_like(mask), APIX)
    with pytest.raises(InputError, match="selects none"):
        focus_mask_gaussians(g, path)
    np.testing.assert_array_equal(focus_mask_gaussians(g, None), np.arange(len(g)))


def test_symmetry_operators_form_groups():
    for name, n in [("C1", 1), ("C3", 3), ("c7", 7), ("D2", 4), ("D5", 10)]:
        ops = symmetry_operators(name)
        assert ops.shape == (n, 3, 3)
        np.testing.assert_allclose(ops[0], np.eye(3))
        np.testing.assert_allclose(np.einsum("nij,nkj->nik", ops, ops), np.broadcast_to(np.eye(3), ops.shape), atol=1e-12)
        np.testing.assert_allclose(np.linalg.det(ops), 1.0)
        # closure: every product is in the group
        prods = np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 9)
        dist = np.abs(prods[:, None, :] - ops.reshape(1, -1, 9)).max(-1).min(1)
        assert dist.max() < 1e-9
    assert parse_symmetry(None) == ("C", 1)
    with pytest.raises(InputError):
        symmetry_operators("I3")
    with pytest.raises(InputError):
        symmetry_operators("C0")


@pytest.mark.parametrize("sym", ["C3", "D2"])
def test_expanded_pose_projects_symmetric_gmm_identically(sym):
    ops = symmetry_operators(sym)
    rng = np.random.default_rng(4)
    asu = rng.normal(scale=10.0, size=(12, 3)) + np.array([12.0, 3.0, 5.0])
    centers = symmetrize_points(asu, ops)
    n = len(centers)
    amps = np.tile(rng.uniform(0.5, 1.5, 12), len(ops))
    sig = np.tile(rng.uniform(3.0, 6.0, 12), len(ops))
    g = GMM(centers, amps, sig, BOX, APIX)
    rots, origins = random_poses(5)
    expanded = expand_rotations(rots, ops)
    assert expanded.shape == (5 * len(ops), 3, 3)
    np.testing.assert_allclose(expanded[len(ops) * 2 + 1], rots[2] @ ops[1].astype(np.float32), atol=1e-6)
    c, a, s = g.tensors()
    F_exp = project(c, a, s, torch.as_tensor(expanded), BOX, APIX)
    F_one = project(c, a, s, torch.as_tensor(np.repeat(rots, len(ops), axis=0)), BOX, APIX)
    err = (F_exp - F_one).abs().max() / F_one.abs().max()
    assert float(err) < 1e-4
    # ... while an asymmetric model does change with the operator
    g2 = GMM(centers + rng.normal(scale=5.0, size=(n, 3)), amps, sig, BOX, APIX)
    c2, _, _ = g2.tensors()
    F2e = project(c2, a, s, torch.as_tensor(expanded), BOX, APIX)
    F2o = project(c2, a, s, torch.as_tensor(np.repeat(rots, len(ops), axis=0)), BOX, APIX)
    assert float((F2e - F2o).abs().max() / F2o.abs().max()) > 0.05


def test_particles_symmetry_expansion_rows_particle_major():
    g = random_gmm()
    ops = symmetry_operators("C4")
    p = make_particles(g, n=5, sym_ops=ops)
    assert len(p) == 20 and p.n_ops == 4
    b = p.batch(np.array([0, 1, 2, 3, 9]))
    rots = p.rotations.numpy()
    np.testing.assert_allclose(b.rotations[3].numpy(), rots[0] @ ops[3].astype(np.float32), atol=1e-6)
    np.testing.assert_allclose(b.rotations[4].numpy(), rots[2] @ ops[1].astype(np.float32), atol=1e-6)
    # all copies of particle 0 carry the same image
    np.testing.assert_allclose(b.F_img[0].numpy(), b.F_img[3].numpy())
