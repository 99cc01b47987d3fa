"""Tests of engine/analysis/refine.py and `gmmhet refine` (per-particle pose refinement)."""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.analysis import refine
from scipion_gmmhet.engine.simulation import simulate
from scipion_gmmhet.engine.conventions import angular_distance_deg, euler_to_matrix, matrix_to_euler
from scipion_gmmhet.engine.io.data import ParticleImages
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.data import ArrayImages, Particles
from scipion_gmmhet.engine.model.gmm import GMM, project

BOX, APIX = 32, 3.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("refine_sim"))
    simulate.simulate(d, "conformational", n=64, box=BOX, apix=APIX, snr=100.0, seed=3, n_gaussians=300)
    truth = pd.read_csv(os.path.join(d, "truth.csv"))
    meta = metadata.read_particles(os.path.join(d, "particles.star"))
    mol = simulate.build_molecule(BOX, APIX, 0, 300)
    rot = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
    org = truth[["origin_x_A", "origin_y_A"]].to_numpy()
    return dict(dir=d, truth=truth, meta=meta, mol=mol, rot=rot, org=org,
                models=mol.conformation_models(truth["conformation"].to_numpy()))


def perturb(rot, org, deg_rms=3.0, px_rms=1.0, seed=0):
    rng = np.random.default_rng(seed)
    n = len(rot)
    v = rng.normal(size=(n, 3)) * deg_rms / math.sqrt(3)
    return (refine.rotvec_to_matrix(torch.as_tensor(v)).numpy() @ rot,
            org + rng.normal(size=(n, 2)) * px_rms * APIX / math.sqrt(2))


def particles(meta, rot, org):
    return Particles(ParticleImages(meta), rot, org, BOX, APIX, ctf=meta.ctf_params(), ctf_mode="full")


FAST = dict(max_angle_deg=6.0, levels=2, polish_steps=4, batch_size=48)


# ----------------------------------------------------------------------------- geometry and scores
def test_rotvec_angle_is_angular_distance():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(20, 3)) * 4.0
    A = euler_to_matrix(*(rng.uniform(0, 180, 20) for _ in range(3)))
    B = refine.rotvec_to_matrix(torch.as_tensor(v)).numpy() @ A
    np.testing.assert_allclose(angular_distance_deg(B, A), np.linalg.norm(v, axis=1), atol=1e-5)
    g = refine.coarse_rotation_grid(6.0)
    assert len(g) == 33 and float(g.norm(dim=1).max()) <= 6.0 + 1e-5 and float(g[0].norm()) == 0.0


@pytest.mark.parametrize("score", refine.SCORES)
def test_shift_scores_equal_exact_scores_and_find_the_shift(score):
    """The one-FFT shift search gives the exact score at every integer shift and recovers a
    known sub-pixel shift of a noise-free image."""
    rng = np.random.default_rng(1)
    g = GMM(rng.normal(size=(40, 3)) * 12.0, np.ones(40), np.full(40, 4.0), BOX, APIX)
    B = 6
    A = torch.as_tensor(euler_to_matrix(*(rng.uniform(0, 180, B) for _ in range(3))), dtype=torch.float32)
    true_shift_px = torch.as_tensor(rng.uniform(-1.8, 1.8, size=(B, 2)), dtype=torch.float32)
    c, a, s = g.tensors()
    Fimg = project(c, a, s, A, BOX, APIX, true_shift_px * APIX)
    sc = refine._Scorer(BOX, APIX, None, 8.0, 2.5 * APIX, "cpu", score)
    Fmod = project(c, a, s, A, BOX, APIX, torch.zeros(B, 2))
    shift, best = sc.shift_scores(Fimg, sc.image_power(Fimg), Fmod)
    np.testing.assert_allclose(shift.numpy(), true_shift_px.numpy(), atol=0.25)
    d = torch.round(shift)
    exact = sc.frc(Fimg, project(c, a, s, A, BOX, APIX, d * APIX))
    F2 = project(c, a, s, A, BOX, APIX, torch.zeros(B, 2))
    # the FFT map's value at the integer peak is the exact score there
    b = sc.binner
    p2 = b.ring_sums(b.gather(F2).abs() ** 2)
    w = sc.ring_coeffs(sc.image_power(Fimg), p2)
    wp = torch.zeros(B, F2.shape[1] * F2.shape[2])
    wp[:, b.flat_index] = w[:, sc.ring_of_band]
    G = wp.reshape(F2.shape) * sc.col_weight * F2 * Fimg.conj()
    cc = torch.fft.irfft2(G, s=(BOX, BOX)) * (BOX * BOX / 2)
    at = cc[torch.arange(B), d[:, 1].long() % BOX, d[:, 0].long() % BOX]
    np.testing.assert_allclose(at.numpy(), exact.numpy(), rtol=1e-4, atol=1e-5)
    assert bool((best >= exact - 1e-5).all())


def test_ring_scale_comes_from_the_refined_poses_of_the_batches_before():
    """wcc's ring weights are a_r / noise_r, a_r the images' per-ring scale to the model summed
    over the batches refined so far (1 before the first); a ring where the model does not match
    gets next to no weight, and the score stays a correlation (1 for image = a_r model)."""
    sc = refine._Scorer(BOX, APIX, None, 8.0, 2.5 * APIX, "cpu", "wcc")
    R = sc.n_ring.numel()
    p_img, p_mod = torch.rand(4, R) + 1.0, torch.rand(4, R) + 1.0
    sc.set_noise(p_img, 0.5 * torch.sqrt(p_img * p_mod), p_mod)
    inv_nu = sc.inv_noise.clone()
    assert sc.ring_scale is None
    w = sc.ring_coeffs(p_img, p_mod)
    norm = torch.sqrt((p_img * inv_nu).sum(1, keepdim=True) * (p_mod * inv_nu).sum(1, keepdim=True))
    torch.testing.assert_close(w, inv_nu / norm)  # a_r = 1: the whitened correlation
    a1 = torch.linspace(1.0, 0.1, R)
    a1[-1] = -0.3  # a ring where the model does not match the images
    sc.add_ring_scale(a1 * p_mod[:2], p_mod[:2])
    sc.add_ring_scale(0.5 * a1 * p_mod[2:], p_mod[2:])
    expected = (a1 * p_mod[:2].sum(0) + 0.5 * a1 * p_mod[2:].sum(0)) / p_mod.sum(0)
    torch.testing.assert_close(sc.ring_scale[0, :-1], expected[:-1])
    assert float(sc.ring_scale[0, -1]) == pytest.approx(refine.RING_SCALE_FLOOR * float(expected.max()))
    a = sc.ring_scale
    cross = (a * p_mod)  # an image that is exactly a_r M: correlation 1 (its power a_r^2 p_mod)
    score = (sc.ring_coeffs(a * a * p_mod, p_mod) * cross).sum(1)
    torch.testing.assert_close(score, torch.ones(4))
    frc = refine._Scorer(BOX, APIX, None, 8.0, 2.5 * APIX, "cpu", "frc")
    frc.add_ring_scale(a1 * p_mod, p_mod)
    torch.testing.assert_close(frc.ring_coeffs(p_img, p_mod), 1.0 / (R * torch.sqrt(p_img * p_mod)))


@pytest.mark.parametrize("score", refine.SCORES)
def test_search_batch_measures_the_ring_scale_at_the_poses_it_returns(score):
    """wcc: after a batch both scorers (full band and coarse) hold a ring scale, measured at the
    poses the search returns (noise-free images of the model at a small pose error: ~1 in the
    inner rings); the next batch is scored with it; frc keeps none."""
    from scipion_gmmhet.engine.analysis.pose_search import search_batch
    g = torch.Generator().manual_seed(5)
    B, N = 8, 60
    c, a, s = torch.randn(B, N, 3, generator=g) * 12, torch.rand(B, N, generator=g) + 0.5, torch.full((B, N), 4.0)
    R = refine.rotvec_to_matrix(torch.randn(B, 3, generator=g) * 1.0)
    o0 = torch.zeros(B, 2)
    Fimg = project(c, a, s, R, BOX, APIX, o0)
    sc = refine._Scorer(BOX, APIX, None, 8.0, 2.0 * APIX, "cpu", score)
    lo = refine._coarse_scorer(sc, None, 2.0 * APIX, None)
    kw = dict(max_angle=4.0, levels=2, polish_steps=0, max_elements=1 << 21, prior_deg=4.0 / 3, prior_px=2.0 / 3,
              min_gain=0.0, rotvec_to_matrix=refine.rotvec_to_matrix, coarse_grid=refine.coarse_rotation_grid(4.0))
    search_batch(Fimg, c, a, s, o0, None, sc, lo, **kw)
    if score == "frc":
        assert sc.ring_scale is None and lo.ring_scale is None
        return
    assert sc.ring_scale.shape == (1, sc.n_ring.numel()) and lo.ring_scale.shape == (1, lo.n_ring.numel())
    assert float(sc.ring_scale[0, :4].min()) > 0.8 and float(sc.ring_scale.max()) < 1.2
    first = sc.ring_scale.clone()
    search_batch(Fimg, c, a, s, o0, None, sc, lo, **kw)  # a second batch adds to the sums
    assert sc._scale_sums is not None and sc.ring_scale.shape == first.shape
    sc.reset_ring_scale()
    assert sc.ring_scale is None and sc._scale_sums is None


def test_ring_scale_without_any_positive_ring_is_no_weighting():
    sc = refine._Scorer(BOX, APIX, None, 8.0, 2.5 * APIX, "cpu", "wcc")
    R = sc.n_ring.numel()
    sc.add_ring_scale(-torch.ones(3, R), torch.ones(3, R))  # inverted contrast: no ring matches
    torch.testing.assert_close(sc.ring_scale, torch.ones(1, R))


def test_remove_rigid_motion_keeps_only_the_deformation():
    """A rigidly moved model with one domain deformed comes back onto the neutral model except
    for the deformation (robust fit: the moving domain does not drag it)."""
    rng = np.random.default_rng(2)
    c0 = torch.as_tensor(rng.normal(size=(200, 3)) * 15.0, dtype=torch.float32)
    R = refine.rotvec_to_matrix(torch.as_tensor(rng.normal(size=(4, 3)) * 3.0, dtype=torch.float32))
    c = torch.einsum("bij,nj->bni", R, c0) + torch.as_tensor(rng.normal(size=(4, 1, 3)) * 3.0, dtype=torch.float32)
    bump = torch.as_tensor(rng.normal(size=(4, 30, 3)) * 6.0, dtype=torch.float32)
    c[:, :30] += torch.einsum("bij,bnj->bni", R, bump)
    out = refine.remove_rigid_motion(c, c0, torch.ones(200))
    assert float((out[:, 30:] - c0[30:]).norm(dim=-1).max()) < 0.02
    np.testing.assert_allclose(out[:, :30].numpy(), (c0[:30] + bump).numpy(), atol=0.02)


def test_latent_models_remove_rigid_motion_only_for_models_trained_without_a_mask():
    """Decoded models of a run where every Gaussian was free are rigid-fitted back onto the
    neutral model; a focus-mask run's fixed Gaussians hold the frame, so its models are kept."""
    from scipion_gmmhet.engine.model.gmm import GMM
    rng = np.random.default_rng(4)
    c0 = rng.normal(size=(50, 3)) * 15.0
    neutral = GMM(c0, np.ones(50), np.full(50, 3.0), 32, 3.0, {})
    shift = torch.tensor([2.0, -1.0, 0.5])

    class Shifted:  # decodes every latent to the neutral model translated by `shift`
        def __init__(self, mobile):
            self.neutral, self.mobile = neutral, mobile

        def decode(self, z):
            B = z.shape[0]
            c = torch.as_tensor(c0, dtype=torch.float32).expand(B, -1, -1) + shift
            return c, torch.ones(B, 50), torch.full((B, 50), 3.0)

    free = refine.LatentModels(Shifted(np.arange(50)), np.zeros((2, 2)))
    masked = refine.LatentModels(Shifted(np.arange(10)), np.zeros((2, 2)))
    assert free.rigid_gauge and not masked.rigid_gauge
    c_free = free.gaussians(np.arange(2), "cpu")[0]
    c_masked = masked.gaussians(np.arange(2), "cpu")[0]
    np.testing.assert_allclose(c_free[0].numpy(), c0, atol=1e-3)
    np.testing.assert_allclose(c_masked[0].numpy(), c0 + shift.numpy(), atol=1e-4)


def test_latent_models_gauge_undoes_the_translation_and_optionally_the_rotation():
    """Default gauge: the decoded model's robust translation is undone, its rotation kept (the
    rotation mixes pose error with the hinge motion); ``gauge_rotation=True`` undoes both."""
    from scipion_gmmhet.engine.model.gmm import GMM
    rng = np.random.default_rng(5)
    c0 = rng.normal(size=(60, 3)) * 15.0
    neutral = GMM(c0, np.ones(60), np.full(60, 3.0), 32, 3.0, {})
    R = refine.rotvec_to_matrix(torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64)).float()
    shift = torch.tensor([1.5, -2.0, 1.0])
    moved = torch.as_tensor(c0, dtype=torch.float32) @ R.T + shift

    class Moved:
        def __init__(self):
            self.neutral, self.mobile = neutral, np.arange(60)

        def decode(self, z):
            B = z.shape[0]
            return moved.expand(B, -1, -1), torch.ones(B, 60), torch.full((B, 60), 3.0)

    c_t = refine.LatentModels(Moved(), np.zeros((1, 2))).gaussians(np.arange(1), "cpu")[0][0].numpy()
    c_r = refine.LatentModels(Moved(), np.zeros((1, 2)), gauge_rotation=True).gaussians(np.arange(1), "cpu")[0][0].numpy()
    np.testing.assert_allclose(c_r, c0, atol=1e-3)
    np.testing.assert_allclose(c_t.mean(0), c0.mean(0), atol=1e-3)  # translation undone
    expect = (moved - moved.mean(0)).numpy() + c0.mean(0)  # rotation kept
    np.testing.assert_allclose(c_t, expect, atol=1e-3)


# ----------------------------------------------------------------------------- refinement
def test_refinement_recovers_perturbed_poses(sim):
    rot_p, org_p = perturb(sim["rot"], sim["org"], seed=11)
    res = refine.refine_poses(particles(sim["meta"], rot_p, org_p), sim["models"], **FAST)
    ang0 = np.median(angular_distance_deg(rot_p, sim["rot"]))
    ang1 = np.median(angular_distance_deg(res.rotations, sim["rot"]))
    sh0 = np.median(np.linalg.norm(org_p - sim["org"], axis=1))
    sh1 = np.median(np.linalg.norm(res.origins_A - sim["org"], axis=1))
    print(f"angle {ang0:.2f} -> {ang1:.2f} deg, shift {sh0 / APIX:.3f} -> {sh1 / APIX:.3f} px")
    assert ang1 <= 0.5 * ang0
    assert sh1 <= 0.5 * sh0
    assert np.all(res.score_after >= res.score_before)
    assert np.all(res.delta_angle_deg <= FAST["max_angle_deg"] + 1e-4)
    assert np.all(res.delta_shift_A <= 2 * APIX + 1e-4)
    # the reported changes are the real ones
    np.testing.assert_allclose(res.delta_angle_deg, angular_distance_deg(res.rotations, rot_p), atol=0.01)
    np.testing.assert_allclose(res.delta_shift_A, np.linalg.norm(res.origins_A - org_p, axis=1), atol=1e-6)


def test_refinement_does_no_harm_at_the_true_poses(sim):
    res = refine.refine_poses(particles(sim["meta"], sim["rot"], sim["org"]), sim["models"], **FAST)
    change = np.median(res.delta_angle_deg)
    sh = np.median(res.delta_shift_A) / APIX
    print(f"no harm: median change {change:.2f} deg, {sh:.3f} px")
    assert change < 0.5  # below the angular precision of these particles (~0.5 deg from a perturbed start)
    assert sh < 0.25


def test_ranges_are_respected_and_zero_range_keeps_poses(sim):
    rot_p, org_p = perturb(sim["rot"][:24], sim["org"][:24], deg_rms=5.0, px_rms=2.0, seed=4)
    meta = sim["meta"].subset(np.arange(24))
    res = refine.refine_poses(particles(meta, rot_p, org_p), sim["models"], max_angle_deg=1.5, max_shift_A=2.0,
                              levels=1, polish_steps=3)
    assert np.all(res.delta_angle_deg <= 1.5 + 1e-4) and np.all(res.delta_shift_A <= 2.0 + 1e-4)
    res0 = refine.refine_poses(particles(meta, rot_p, org_p), sim["models"], max_angle_deg=0.0, max_shift_A=0.0,
                               polish_steps=3)
    np.testing.assert_allclose(res0.rotations, rot_p, atol=1e-6)
    np.testing.assert_allclose(res0.origins_A, org_p, atol=1e-6)


def test_focus_mask_refines_the_masked_domain(sim):
    """Particles whose arm alone is rotated: with a focus mask on the arm, the search finds
    the arm's rotation (the pose of the domain), without the mask it stays near the body's."""
    mol = sim["mol"]
    n = 24
    arm = np.zeros(mol.n_without_subunit(), bool)
    arm[mol.arm_slice()] = True
    rng = np.random.default_rng(7)
    v = rng.normal(size=(n, 3))
    v = 3.0 * v / np.linalg.norm(v, axis=1, keepdims=True)
    rot = sim["rot"][:n]
    models = mol.conformation_models(np.full(n, 0.5))
    cen, amp, sig = models.gaussians(np.arange(n), "cpu")
    A = torch.as_tensor(rot, dtype=torch.float32)
    A_arm = refine.rotvec_to_matrix(torch.as_tensor(v, dtype=torch.float32)) @ A
    F = (project(cen[:, ~arm], amp[:, ~arm], sig[:, ~arm], A, BOX, APIX)
         + project(cen[:, arm], amp[:, arm], sig[:, arm], A_arm, BOX, APIX))
    from scipion_gmmhet.engine.conventions import fourier_to_image
    imgs = fourier_to_image(F, BOX).numpy()
    parts = Particles(ArrayImages(imgs), rot, np.zeros((n, 2)), BOX, APIX, ctf=None, ctf_mode="none")
    res = refine.refine_poses(parts, models, focus=arm, max_angle_deg=5.0, max_shift_A=0.0, levels=2,
                              polish_steps=4)
    err_masked = np.median(angular_distance_deg(res.rotations, A_arm.double().numpy()))
    assert err_masked < 1.0, err_masked
    with pytest.raises(InputError, match="selects no Gaussian"):
        refine.refine_poses(parts, models, focus=np.zeros_like(arm))


def test_bad_ranges_are_input_errors(sim):
    p = particles(sim["meta"], sim["rot"], sim["org"])
    with pytest.raises(InputError, match="--max-angle"):
        refine.refine_poses(p, sim["models"], max_angle_deg=-1)
    with pytest.raises(InputError, match="--max-shift"):
        refine.refine_poses(p, sim["models"], max_shift_A=-1)
    with pytest.raises(InputError, match="--score"):
        refine.refine_poses(p, sim["models"], score="bogus")


# ----------------------------------------------------------------------------- the command
def _perturbed_star_and_tiny_model(sim, tmp_path, seed: int, id_step: int, deg_rms: float = 3.0,
                                   px_rms: float = 1.0, epochs: int = 1) -> tuple[str, str]:
    """A star of the simulated particles with perturbed poses (particle ids ``id_step * (1..n)``)
    and a network trained on it for ``epochs``: (star path, training folder)."""
    from scipion_gmmhet.engine import cli
    d = sim["dir"]
    rot_p, org_p = perturb(sim["rot"], sim["org"], deg_rms=deg_rms, px_rms=px_rms, seed=seed)
    meta_p = sim["meta"].with_poses(np.stack(matrix_to_euler(rot_p), 1), org_p)
    meta_p.particles["rlnGmmhetParticleId"] = np.arange(1, len(meta_p) + 1) * id_step
    star = str(tmp_path / "perturbed.star")
    metadata.write_particles(star, meta_p)
    gmm = os.path.join(d, "truth_gmm", sorted(os.listdir(os.path.join(d, "truth_gmm")))[2])
    train_dir = str(tmp_path / "train")
    assert cli.main(["train", "--particles", star, "--gmm", gmm, "--zdim", "2", "--epochs", str(epochs), "--hidden", "32",
                     "--layers", "1", "--device", "cpu", "--out", train_dir]) == 0
    return star, train_dir


def test_cli_refine_writes_star_and_changes(sim, tmp_path):
    from scipion_gmmhet.engine import cli
    star, train_dir = _perturbed_star_and_tiny_model(sim, tmp_path, seed=5, id_step=10)
    out = str(tmp_path / "refine")
    assert cli.main(["refine", "--train", train_dir, "--particles", star, "--max-angle", "4", "--levels", "1",
                     "--polish-steps", "2", "--rounds", "1", "--device", "cpu", "--out", out]) == 0
    assert not os.path.exists(os.path.join(out, "rounds.csv"))  # one round: written straight into OUT
    new = metadata.read_particles(os.path.join(out, "particles.star"))
    old = metadata.read_particles(star)
    assert len(new) == len(old)
    pose_cols = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"}
    for col in old.particles.columns:
        if col not in pose_cols:
            assert (new.particles[col].astype(str) == old.particles[col].astype(str)).all(), col
    table = pd.read_csv(os.path.join(out, "pose_changes.csv"))
    assert list(table["row"]) == list(range(len(old)))
    assert list(table["particle_id"]) == list(old.particles["rlnGmmhetParticleId"])
    np.testing.assert_allclose(table["delta_angle_deg"],
                               angular_distance_deg(new.rotation_matrices(), old.rotation_matrices()), atol=0.01)
    np.testing.assert_allclose(table["delta_shift_A"], np.linalg.norm(new.origins_A() - old.origins_A(), axis=1),
                               atol=1e-3)
    assert (table["score_after"] >= table["score_before"] - 1e-6).all()
    assert table["delta_angle_deg"].max() <= 4.0 + 0.01
    # bad input: one line, exit status 2
    empty = str(tmp_path / "empty.mrc")
    from scipion_gmmhet.engine.io.mrc import write_map
    write_map(empty, np.zeros((BOX, BOX, BOX), np.float32), APIX)
    assert cli.main(["refine", "--train", train_dir, "--particles", star, "--mask", empty, "--out",
                     str(tmp_path / "r2")]) == 2
    assert cli.main(["refine", "--train", str(tmp_path), "--particles", star, "--out", str(tmp_path / "r3")]) == 2


def test_cli_refine_rounds_alternate_with_retraining(sim, tmp_path):
    """--rounds 2: refine, retrain on the refined poses, refine again; per-round folders, the
    overall changes measured from the INPUT poses, the median change per round in rounds.csv."""
    from scipion_gmmhet.engine import cli
    star, train_dir = _perturbed_star_and_tiny_model(sim, tmp_path, seed=6, id_step=7)
    out = str(tmp_path / "iter")
    assert cli.main(["refine", "--train", train_dir, "--particles", star, "--max-angle", "4", "--levels", "1",
                     "--polish-steps", "2", "--rounds", "2", "--retrain-epochs", "1", "--device", "cpu",
                     "--out", out]) == 0
    for r in (1, 2):
        assert os.path.exists(os.path.join(out, f"round_{r}", "particles.star"))
        assert os.path.exists(os.path.join(out, f"round_{r}", "pose_changes.csv"))
    assert os.path.exists(os.path.join(out, "round_1", "train", "model.pt"))  # the retrained network
    assert not os.path.exists(os.path.join(out, "round_2", "train"))  # no training after the last round
    rounds = pd.read_csv(os.path.join(out, "rounds.csv"))
    assert list(rounds["round"]) == [1, 2]
    for r in (1, 2):
        per = pd.read_csv(os.path.join(out, f"round_{r}", "pose_changes.csv"))
        assert rounds["angle_median_deg"][r - 1] == pytest.approx(np.median(per["delta_angle_deg"]), abs=1e-4)
    old = metadata.read_particles(star)
    new = metadata.read_particles(os.path.join(out, "particles.star"))
    last = metadata.read_particles(os.path.join(out, "round_2", "particles.star"))
    np.testing.assert_allclose(new.euler_deg(), last.euler_deg())
    for col in old.particles.columns:
        if col not in {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"}:
            assert (new.particles[col].astype(str) == old.particles[col].astype(str)).all(), col
    table = pd.read_csv(os.path.join(out, "pose_changes.csv"))
    assert list(table["particle_id"]) == list(old.particles["rlnGmmhetParticleId"])
    np.testing.assert_allclose(table["delta_angle_deg"],
                               angular_distance_deg(new.rotation_matrices(), old.rotation_matrices()), atol=0.01)
    assert cli.main(["refine", "--train", train_dir, "--particles", star, "--rounds", "0",
                     "--out", str(tmp_path / "bad")]) == 2
    assert cli.main(["refine", "--train", train_dir, "--particles", star, "--rounds", "many",
                     "--out", str(tmp_path / "bad2")]) == 2


def test_round_min_gain_default_and_override():
    from scipion_gmmhet.engine.analysis.refine import LATER_ROUNDS_MIN_GAIN_NATS, MIN_GAIN_NATS
    from scipion_gmmhet.engine.commands.refine import round_min_gain
    assert round_min_gain(None, 1) == MIN_GAIN_NATS == 5.5
    assert round_min_gain(None, 2) == round_min_gain(None, 5) == LATER_ROUNDS_MIN_GAIN_NATS == 0.0
    assert round_min_gain(3.0, 1) == round_min_gain(3.0, 4) == 3.0   # --min-gain: every round
    assert round_min_gain(0, 1) == 0.0


def test_rounds_argument_and_angular_precision():
    from scipion_gmmhet.engine.commands.refine import _parse_rounds, angular_precision
    assert _parse_rounds("auto", 3) == (True, 3) and _parse_rounds("AUTO", 1) == (True, 1)
    assert _parse_rounds("2", 3) == (False, 2)
    for bad in ("0", "-1", "many"):
        with pytest.raises(InputError, match="--rounds"):
            _parse_rounds(bad, 3)
    with pytest.raises(InputError, match="--max-rounds"):
        _parse_rounds("auto", 0)
    assert angular_precision(6.0, 3) == pytest.approx(0.375) and angular_precision(4.0, 1) == 1.0


def _arm_mask(mol, path: str) -> str:
    """A binary mask of the voxels within 1.5 px of the simulated arm's Gaussians."""
    from scipion_gmmhet.engine.io.mrc import write_map
    arm = mol.centers_A[mol.arm_slice()] / APIX + BOX // 2
    g = np.arange(BOX)
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((BOX, BOX, BOX), np.float32)
    for x, y, z in arm:
        vol[(xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2 <= 1.5 ** 2] = 1.0
    write_map(path, vol, APIX)
    return path


def test_pose_change_summary_counts_only_real_moves():
    """Float noise from writing a kept pose and reading it back (1e-6 deg) is not a move."""
    from scipion_gmmhet.engine.io.outputs import pose_change_summary
    s = pose_change_summary([0.0, 1.7e-6, 0.5, 0.0], [0.0, 0.0, 0.0, 2e-3], [0.1] * 4, [0.2] * 4)
    assert s["n_moved"] == 2


def _expected_stop(rounds, below, max_rounds: int) -> str:
    """rounds.csv's stop reason: converged (median change below the precision), else the round limit."""
    return "converged" if below.iloc[-1] else "round limit"


def test_cli_refine_auto_rounds_stop_rule(sim, tmp_path):
    """Default --rounds auto. A network trained without a focus mask iterates too (its decoded
    models in the translation gauge). One trained with a mask on the moving arm iterates: refine,
    retrain, refine... until a round's median change is below the angular precision or
    --max-rounds is reached; rounds.csv says which, and a retraining follows every round but the last."""
    from scipion_gmmhet.engine import cli
    from scipion_gmmhet.engine.commands.refine import angular_precision
    star, train_dir = _perturbed_star_and_tiny_model(sim, tmp_path, seed=8, id_step=1)
    out = str(tmp_path / "auto_free")
    assert cli.main(["refine", "--train", train_dir, "--particles", star, "--max-angle", "4", "--levels", "1",
                     "--max-rounds", "2", "--retrain-epochs", "1", "--device", "cpu", "--out", out]) == 0
    rounds = pd.read_csv(os.path.join(out, "rounds.csv"))
    below = rounds["angle_median_deg"] < angular_precision(4.0, 1)
    assert 1 <= len(rounds) <= 2 and not below[:-1].any()
    assert rounds["stop"].iloc[-1] == _expected_stop(rounds, below, 2)
    assert os.path.exists(os.path.join(out, "round_1", "particles.star")) and os.path.exists(os.path.join(out, "particles.star"))

    masked = str(tmp_path / "train_arm")
    gmm = os.path.join(sim["dir"], "truth_gmm", sorted(os.listdir(os.path.join(sim["dir"], "truth_gmm")))[2])
    assert cli.main(["train", "--particles", star, "--gmm", gmm, "--zdim", "2", "--epochs", "1", "--hidden", "32",
                     "--layers", "1", "--mask", _arm_mask(sim["mol"], str(tmp_path / "arm.mrc")), "--device", "cpu",
                     "--out", masked]) == 0
    out = str(tmp_path / "auto")
    assert cli.main(["refine", "--train", masked, "--particles", star, "--max-angle", "4", "--levels", "1",
                     "--max-rounds", "2", "--retrain-epochs", "1", "--device", "cpu", "--out", out]) == 0
    rounds = pd.read_csv(os.path.join(out, "rounds.csv"))
    n = len(rounds)
    assert 1 <= n <= 2 and list(rounds["round"]) == list(range(1, n + 1))
    below = rounds["angle_median_deg"] < angular_precision(4.0, 1)
    assert list(rounds["converged"]) == list(below)
    assert not below[:-1].any()  # it stopped at the first round below the precision (or at the cap)
    assert rounds["stop"].iloc[-1] == _expected_stop(rounds, below, 2)
    assert n == 2 or bool(below.iloc[-1])
    # evidence to move: 5.5 nats in the first round, 0 after it (the gate guards every round)
    assert list(rounds["min_gain_nats"]) == [5.5, 0.0][:n]
    for r in range(1, n + 1):
        assert os.path.exists(os.path.join(out, f"round_{r}", "train", "model.pt")) == (r < n)
    assert os.path.exists(os.path.join(out, "particles.star")) and os.path.exists(os.path.join(out, "pose_changes.csv"))


def test_pose_projector_equals_gmm_project():
    """The batched candidate projector gives gmm.project's transforms (full layout, and the band
    coefficients with max_ring), for per-particle Gaussians, shifts and CTFs."""
    from scipion_gmmhet.engine.analysis.pose_projector import PoseProjector
    from scipion_gmmhet.engine.model.fourier import RingBinner
    g = torch.Generator().manual_seed(0)
    B, C, N = 3, 4, 50
    y = torch.randn(B, N, 3, generator=g) * 15
    amp, sig = torch.rand(B, N, generator=g), 3 + torch.rand(B, N, generator=g)
    org, ctf = torch.randn(B, 2, generator=g), torch.randn(B, BOX, BOX // 2 + 1, generator=g)
    R = refine.rotvec_to_matrix(torch.randn(B, C, 3, generator=g) * 2)
    sh = torch.randn(B, C, 2, generator=g)
    j = torch.arange(B).repeat_interleave(C)
    ref = project(y[j], amp[j], sig[j], R.reshape(-1, 3, 3), BOX, APIX, org[j] + sh.reshape(-1, 2) * APIX, ctf[j])
    F = PoseProjector(y, amp, sig, BOX, APIX, org, ctf).project(0, B, R, sh)
    torch.testing.assert_close(F, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    band = RingBinner(BOX, APIX, None, 12.0)
    Fb = PoseProjector(y, amp, sig, BOX, APIX, org, ctf, max_ring=band.hi, band_index=band.flat_index).project(1, B, R[1:], sh[1:])
    torch.testing.assert_close(Fb, band.gather(ref[C:]), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_pose_projector_layers_equal_the_projection_of_every_gaussian():
    """A layered reference ([low-passed, fine, fine low-passed with negative amplitudes], as
    fine_reference.WarpedModels builds it) projected with ``layers`` (the copies applied as a
    1 - L filter, not projected) equals the projection of all its Gaussians, with and without
    a low layer and with no fine Gaussian left (a focus outside them), at every band pixel."""
    from scipion_gmmhet.engine.analysis.fine_reference import low_passed
    from scipion_gmmhet.engine.analysis.pose_projector import PoseProjector
    from scipion_gmmhet.engine.model.fourier import RingBinner
    g = torch.Generator().manual_seed(3)
    B, C, tau = 2, 5, 1.5
    band = RingBinner(BOX, APIX, None, 2.5 * APIX)
    org, ctf = torch.randn(B, 2, generator=g), torch.randn(B, BOX, BOX // 2 + 1, generator=g)
    R = refine.rotvec_to_matrix(torch.randn(B, C, 3, generator=g) * 2)
    sh = torch.randn(B, C, 2, generator=g)
    for n_low, n_fine in ((30, 70), (0, 70), (30, 0)):
        low = low_passed(torch.randn(B, n_low, 3, generator=g) * 15, torch.rand(B, n_low, generator=g),
                         3 + torch.rand(B, n_low, generator=g), tau)
        fine = (torch.randn(B, n_fine, 3, generator=g) * 15, torch.rand(B, n_fine, generator=g),
                1.5 + torch.rand(B, n_fine, generator=g))
        c, a, s = (torch.cat(p, 1) for p in zip(low, fine, low_passed(*fine, tau, sign=-1.0)))
        args = (BOX, APIX, org, ctf, band.hi, band.flat_index)
        ref = PoseProjector(c, a, s, *args).project(0, B, R, sh)
        layered = PoseProjector(c, a, s, *args, layers=(n_low, n_fine, tau))
        assert layered.N == n_low + n_fine
        torch.testing.assert_close(layered.project(0, B, R, sh), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="do not add up"):
        PoseProjector(c, a, s, *args, layers=(1, 70, tau))


def test_rigid_core_finds_the_moving_domain(sim):
    """Decoded models whose arm moves across the latent space (and whose whole body is
    rotated/sheared at random, as a network mimicking pose errors): the automatic core is the
    body, and the anchored models hold the core at the neutral positions."""
    from scipion_gmmhet.engine.analysis.rigid_core import AnchoredCoreModels, rigid_core
    mol = sim["mol"]
    c0 = mol.centers_A[: mol.n_without_subunit()].astype(np.float32)
    arm = np.zeros(len(c0), bool)
    arm[mol.arm_slice()] = True
    rng = np.random.default_rng(0)

    class Models:
        neutral_centers_A, median_sigma_A, latents = c0, 4.0, np.zeros((64, 1))

        def gaussians(self, rows, device):
            rows = np.asarray(rows)
            c = np.repeat(c0[None], len(rows), 0)
            c[:, arm] += rng.normal(size=(len(rows), 1, 3)) * 6.0  # the arm moves
            A = np.eye(3) + rng.normal(size=(len(rows), 3, 3)) * 0.02  # global linear "pose" bends
            c = np.einsum("bij,bnj->bni", A, c)
            n = torch.as_tensor(c, dtype=torch.float32)
            return n, torch.ones(n.shape[:2]), torch.full(n.shape[:2], 4.0)

    core = rigid_core(Models())
    assert not (core & arm).any() and core[~arm].mean() > 0.9
    anchored = AnchoredCoreModels(Models(), core)
    c, _, _ = anchored.gaussians(np.arange(5), "cpu")
    np.testing.assert_allclose(c[:, core].numpy(), np.repeat(c0[None, core], 5, 0))


# ----------------------------------------------------------------------------- gold-standard check
def test_gold_standard_gate_keeps_right_poses_and_takes_corrections(sim):
    """The half maps agree better with the true poses than with perturbed ones: a 'refinement'
    that moves right poses away is rejected, one that corrects wrong poses is kept."""
    from scipion_gmmhet.engine.analysis.refine_gate import gold_standard_gate
    rot_p, org_p = perturb(sim["rot"], sim["org"], deg_rms=4.0, px_rms=1.0, seed=21)
    true_meta = sim["meta"].with_poses(np.stack(matrix_to_euler(sim["rot"]), 1), sim["org"])
    pert_meta = sim["meta"].with_poses(np.stack(matrix_to_euler(rot_p), 1), org_p)
    g = gold_standard_gate(true_meta, pert_meta)
    print(f"true -> perturbed: half-map FSC {g.fsc_input:.4f} -> {g.fsc_refined:.4f}")
    assert not g.accepted and g.fsc_refined < g.fsc_input
    g2 = gold_standard_gate(pert_meta, true_meta)
    assert g2.accepted and g2.t > g2.t_min
    assert g2.fsc_input == pytest.approx(g.fsc_refined) and g2.fsc_refined == pytest.approx(g.fsc_input)


def test_gate_needs_a_significant_shell_wise_gain():
    """A tiny mean gain that is not consistent over the shells is rejected; a consistent one is kept."""
    from scipion_gmmhet.engine.analysis.refine_gate import compare_shells
    rng = np.random.default_rng(0)
    f_in = np.linspace(0.95, 0.05, 30)
    noise = rng.normal(0, 0.01, 30)
    noisy = compare_shells(f_in, f_in + 0.0008 + noise - noise.mean())
    assert noisy.fsc_refined > noisy.fsc_input and not noisy.accepted and noisy.t < noisy.t_min
    consistent = compare_shells(f_in, f_in + 0.003 + rng.normal(0, 0.002, 30))
    assert consistent.accepted and consistent.t_min == pytest.approx(1.699, abs=1e-3)
    assert not compare_shells(f_in, f_in - 0.01).accepted
    same = compare_shells(f_in, f_in.copy())  # no change at all: t is 0, not NaN, and rejected
    assert same.t == 0.0 and not same.accepted
    assert compare_shells(f_in, f_in + 0.01).accepted  # the same gain in every shell


def test_unchanged_result_restores_the_input_poses(sim):
    rot_p, org_p = perturb(sim["rot"][:8], sim["org"][:8], seed=2)
    res = refine.RefineResult(rot_p, org_p, np.ones((8, 3)), np.full(8, 1.7), np.full(8, 0.5), np.full(8, 0.3),
                              np.full(8, 0.4))

    class Gate:
        fsc_input, fsc_refined = 0.5, 0.4
    back = refine.unchanged_result(res, sim["rot"][:8], sim["org"][:8], Gate())
    np.testing.assert_allclose(back.rotations, sim["rot"][:8])
    np.testing.assert_allclose(back.origins_A, sim["org"][:8])
    assert not back.delta_rotvec_deg.any() and not back.delta_angle_deg.any() and not back.delta_shift_A.any()
    np.testing.assert_allclose(back.score_after, back.score_before)
    assert back.gate_kept_input and (back.gate_fsc_input, back.gate_fsc_refined) == (0.5, 0.4)


def test_cli_refine_gold_standard_check_decides_between_input_and_refined_poses(sim, tmp_path):
    """The gated run writes either the --no-gate run's poses (the half maps agree better with
    them) or every input pose unchanged (they do not); rounds.csv records both half-map FSCs
    and the decision."""
    from scipion_gmmhet.engine import cli
    star, train_dir = _perturbed_star_and_tiny_model(sim, tmp_path, seed=9, id_step=1, deg_rms=1.5, px_rms=0.5)
    args = ["refine", "--train", train_dir, "--particles", star, "--max-angle", "4", "--levels", "1", "--device", "cpu",
            "--max-rounds", "1"]  # one refinement each, so the two runs' rounds cannot diverge
    free = str(tmp_path / "nogate")
    assert cli.main(args + ["--no-gate", "--out", free]) == 0
    assert (pd.read_csv(os.path.join(free, "pose_changes.csv"))["delta_angle_deg"] > 0).any()
    out = str(tmp_path / "gate")
    assert cli.main(args + ["--out", out]) == 0
    rounds = pd.read_csv(os.path.join(out, "rounds.csv"))
    f_in, f_ref, kept = rounds["gate_fsc_input"].iloc[0], rounds["gate_fsc_refined"].iloc[0], rounds["gate_kept_input"].iloc[0]
    t, t_min = rounds["gate_t"].iloc[0], rounds["gate_t_min"].iloc[0]
    assert 0 < f_in < 1 and 0 < f_ref < 1 and bool(kept) == (not (f_ref > f_in and t >= t_min))
    assert 1.5 < t_min < 2.0  # one-sided 5% over the shells of a box-32 map
    old = metadata.read_particles(star)
    new = metadata.read_particles(os.path.join(out, "particles.star"))
    ref = old if kept else metadata.read_particles(os.path.join(free, "particles.star"))
    np.testing.assert_array_equal(new.euler_deg(), ref.euler_deg())
    np.testing.assert_array_equal(new.origins_A(), ref.origins_A())
    table = pd.read_csv(os.path.join(out, "pose_changes.csv"))
    assert (table["delta_angle_deg"].any() or table["delta_shift_A"].any()) == (not kept)


def test_cli_refine_keeps_input_poses_when_round_one_stays_below_the_precision(sim, tmp_path, monkeypatch):
    """A first round that moves most particles by less than the search can resolve (here a search
    whose result is 0.2 deg turns of 60% of the particles, as a model's errors move exact poses;
    the precision is 1 deg with --max-angle 4 --levels 1, and 0.25 px), passed by the gold-standard
    check (as on a real trajectory's exact poses): every particle keeps its input pose, rounds.csv
    says why; --no-gate writes the moves."""
    from scipy.spatial.transform import Rotation

    from scipion_gmmhet.engine import cli
    from scipion_gmmhet.engine.commands.refine import below_precision
    star, train_dir = _perturbed_star_and_tiny_model(sim, tmp_path, seed=13, id_step=1, deg_rms=0.3, px_rms=0.05)

    def small_moves(particles, models, **kw):   # the search's result: 0.2 deg turns, 0.1 px shifts
        A = particles.rotations.detach().cpu().double().numpy()
        org = particles.origins_A.detach().cpu().double().numpy()
        n = len(A)
        rng = np.random.default_rng(0)
        axis = rng.normal(size=(n, 3))
        vec = 0.2 * axis / np.linalg.norm(axis, axis=1, keepdims=True) * (np.arange(n) % 5 < 3)[:, None]
        d_org = 0.1 * APIX * (np.arange(n) % 5 < 3)[:, None] * np.array([[1.0, 0.0]])
        R = Rotation.from_rotvec(np.radians(vec)).as_matrix()
        score = np.full(n, 0.5)
        return refine.RefineResult(R @ A, org + d_org, vec, np.linalg.norm(vec, axis=1),
                                   np.linalg.norm(d_org, axis=1), score, score + 0.01)
    monkeypatch.setattr(refine, "refine_poses", small_moves)
    from scipion_gmmhet.engine.analysis import refine_gate   # the half maps fooled, as on the real trajectory
    monkeypatch.setattr(refine_gate, "gold_standard_gate",
                        lambda *a, **k: refine_gate.GateResult(0.6218, 0.6240, 2.62, 1.70))
    args = ["refine", "--train", train_dir, "--particles", star, "--max-angle", "4", "--levels", "1", "--device", "cpu",
            "--max-rounds", "1"]
    free = str(tmp_path / "nogate")
    assert cli.main(args + ["--no-gate", "--out", free]) == 0
    moved = pd.read_csv(os.path.join(free, "pose_changes.csv"))
    assert (moved["delta_angle_deg"] > 0.1).mean() == pytest.approx(0.6, abs=0.05)
    out = str(tmp_path / "gate")
    assert cli.main(args + ["--out", out]) == 0
    rounds = pd.read_csv(os.path.join(out, "rounds.csv"))
    assert bool(rounds["below_precision"].iloc[0]) and not bool(rounds["gate_kept_input"].iloc[0])
    assert rounds["gate_fsc_refined"].iloc[0] == pytest.approx(0.6240)   # the check's verdict kept on record
    kept = pd.read_csv(os.path.join(out, "pose_changes.csv"))
    assert not kept["delta_angle_deg"].any() and not kept["delta_shift_A"].any()
    old, new = metadata.read_particles(star), metadata.read_particles(os.path.join(out, "particles.star"))
    np.testing.assert_array_equal(new.euler_deg(), old.euler_deg())
    np.testing.assert_array_equal(new.origins_A(), old.origins_A())
    # the rule itself: both medians below the precision, and something moved
    res = refine.RefineResult(np.repeat(np.eye(3)[None], 9, 0), np.zeros((9, 2)), np.zeros((9, 3)),
                              np.r_[np.zeros(4), np.full(5, 0.5)], np.zeros(9), np.zeros(9), np.zeros(9))
    assert below_precision(res, 1.0, 0.3) and not below_precision(res, 0.4, 0.3)
    res.delta_shift_A = np.full(9, 0.5)
    assert not below_precision(res, 1.0, 0.3)             # shifts beyond the precision: a real correction
    res.delta_angle_deg, res.delta_shift_A = np.zeros(9), np.zeros(9)
    assert not below_precision(res, 1.0, 0.3)             # nothing moved: nothing to keep


def test_refinement_core_is_the_part_that_does_not_move(sim):
    """The refinement's default focus (``gmmhet refine --core auto``): decoded models whose arm
    swings with the latent while the body stays put -> the focus is the body, not the arm, and a
    model whose Gaussians all stay put keeps every Gaussian."""
    from scipion_gmmhet.engine.analysis.rigid_core import core_from_motion, refinement_core
    mol = sim["mol"]
    c0 = torch.as_tensor(mol.centers_A[: mol.n_without_subunit()], dtype=torch.float32)
    arm = np.zeros(len(c0), bool)
    arm[mol.arm_slice()] = True
    arm_t = torch.as_tensor(arm)

    class Trained:
        def decode(self, z):
            c = c0.expand(len(z), -1, -1).clone()
            c[:, arm_t] += z[:, :1, None] * torch.tensor([8.0, -3.0, 2.0])  # the arm follows z[0]
            c += 0.05 * z[:, 1:2, None]  # a slight common drift from z[1]
            return c, torch.ones(c.shape[:2]), torch.full(c.shape[:2], 4.0)

    z = np.random.default_rng(1).normal(size=(500, 2)).astype(np.float32)
    focus = refinement_core(Trained(), z)
    assert focus.dtype == np.int64 and not arm[focus].any()
    assert len(focus) >= 0.5 * (~arm).sum()
    assert core_from_motion(np.zeros(40), 1.0).all()  # nothing moves: every Gaussian is the core


def test_refined_poses_keep_the_input_object_frame():
    """A common object-frame rotation of the moved particles (a reference in a turned frame) is
    removed; each particle's own correction and the unmoved particles are kept exactly."""
    from scipy.spatial.transform import Rotation

    from scipion_gmmhet.engine.analysis.refine import RefineResult, keep_input_frame

    rng = np.random.default_rng(4)
    n = 400
    A_in = Rotation.random(n, random_state=1).as_matrix()
    own = Rotation.from_rotvec(rng.normal(0, 1.0, (n, 3)), degrees=True).as_matrix()  # per-particle corrections
    drift = Rotation.from_rotvec([0.0, 0.0, 1.0], degrees=True).as_matrix()         # a 1-degree frame turn
    moved = np.arange(n) % 4 != 0
    A_new = A_in.copy()
    A_new[moved] = own[moved] @ A_in[moved] @ drift
    delta = Rotation.from_matrix(A_new @ np.transpose(A_in, (0, 2, 1))).as_rotvec(degrees=True)
    res = RefineResult(A_new, np.zeros((n, 2)), delta, np.linalg.norm(delta, axis=1), np.zeros(n),
                       np.zeros(n), np.zeros(n))
    fixed, removed = keep_input_frame(res, A_in)
    assert abs(removed - 1.0) < 0.15
    assert np.array_equal(fixed.rotations[~moved], A_in[~moved]) and np.all(fixed.delta_angle_deg[~moved] == 0)
    err = Rotation.from_matrix(np.einsum("nij,nkj->nik", fixed.rotations[moved], own[moved] @ A_in[moved]))
    assert np.median(err.magnitude()) * 180 / np.pi < 0.15  # the turn is gone, the corrections stay
    expected = Rotation.from_matrix(fixed.rotations @ np.transpose(A_in, (0, 2, 1))).magnitude() * 180 / np.pi
    assert np.allclose(fixed.delta_angle_deg, expected, atol=1e-6)
    few = RefineResult(A_new[:20], np.zeros((20, 2)), delta[:20], np.linalg.norm(delta[:20], axis=1),
                       np.zeros(20), np.zeros(20), np.zeros(20))
    assert keep_input_frame(few, A_in[:20])[1] == 0.0  # too few moved particles to estimate a drift
    plain = A_in.copy()
    plain[moved] = own[moved] @ A_in[moved]  # corrections only, no common turn
    dp = Rotation.from_matrix(plain @ np.transpose(A_in, (0, 2, 1))).as_rotvec(degrees=True)
    res0 = RefineResult(plain, np.zeros((n, 2)), dp, np.linalg.norm(dp, axis=1), np.zeros(n), np.zeros(n), np.zeros(n))
    kept, removed0 = keep_input_frame(res0, A_in)
    assert removed0 == 0.0 and kept is res0  # no significant drift: the poses are left as found
