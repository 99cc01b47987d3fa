"""Tests of engine/analysis/fine_reference.py and `gmmhet refine --reference` (from the second
refinement round on: the network retrained on the finer GMM (auto = network), or that GMM
deformed by the decoded motion (layered, fine))."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.analysis import refine
from scipion_gmmhet.engine.analysis.fine_reference import (FineReference, WarpedModels, build_fine_reference,
                                                           neutral_resolution_A)
from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation import simulate

BOX, APIX = 32, 3.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fine_sim"))
    simulate.simulate(d, "conformational", n=64, box=BOX, apix=APIX, snr=100.0, seed=3, n_gaussians=300)
    return d


def _neutral_with_resolution(sim_dir: str, resolution_A, path: str) -> str:
    """The simulator's middle-state GMM, recorded as built at ``resolution_A`` (as gmmhet build does)."""
    g = GMM.load(os.path.join(sim_dir, "truth_gmm", sorted(os.listdir(os.path.join(sim_dir, "truth_gmm")))[2]))
    info = dict(g.info)
    if resolution_A is not None:
        info["target_resolution_A"] = str(resolution_A)
    GMM(g.centers_A, g.amplitudes, g.sigmas_A, g.box, g.apix, info).save(path)
    return path


class _DomainMove:
    """A decoder (masked run: no rigid gauge) that moves the coarse Gaussians with x > 0 by
    ``shift`` and doubles their amplitudes; the rest stay at the neutral model."""

    def __init__(self, neutral: GMM, shift):
        self.neutral, self.mobile = neutral, np.arange(5)
        self.shift = torch.as_tensor(shift, dtype=torch.float32)
        self.domain = torch.as_tensor(neutral.centers_A[:, 0] > 0)

    def decode(self, z):
        B, n = z.shape[0], len(self.neutral)
        c = torch.as_tensor(self.neutral.centers_A, dtype=torch.float32).expand(B, -1, -1).clone()
        a = torch.as_tensor(self.neutral.amplitudes, dtype=torch.float32).expand(B, -1).clone()
        c[:, self.domain] += self.shift
        a[:, self.domain] *= 2.0
        return c, a, torch.full((B, n), 3.0)


def test_warped_models_carry_the_decoded_motion_onto_the_fine_gaussians():
    """Fine Gaussians deep inside the moving domain move with it (and take its amplitude change);
    those far from it stay; widths are the fine model's."""
    rng = np.random.default_rng(0)
    coarse = GMM(rng.uniform(-30, 30, size=(300, 3)), np.ones(300), np.full(300, 3.0), 32, 3.0, {})
    fine_c = rng.uniform(-25, 25, size=(900, 3))
    fine = GMM(fine_c, np.full(900, 0.5), np.full(900, 1.5), 32, 3.0, {})
    shift = np.array([2.0, -1.0, 0.5])
    decoded = refine.LatentModels(_DomainMove(coarse, shift), np.zeros((3, 2)))
    assert not decoded.rigid_gauge
    warped = WarpedModels(decoded, FineReference(fine, 4.8, "test"))
    assert warped.sigma_A == pytest.approx(6.0)
    c, a, s = warped.gaussians(np.arange(3), "cpu")
    assert c.shape == (3, 900, 3) and a.shape == (3, 900) and s.shape == (3, 900)
    # the field's width here is max(median coarse width 3 A, 2 px = 6 A): 3 sigma = 18 A, so fine Gaussians at
    # |x| > 20 A see only coarse ones of their own side; moves are scaled by 1 - ~0.1% (move_weights' floor)
    inside, outside = fine_c[:, 0] > 20.0, fine_c[:, 0] < -20.0
    assert inside.sum() > 20 and outside.sum() > 20
    np.testing.assert_allclose(c[0, inside].numpy() - fine_c[inside], np.broadcast_to(shift, (inside.sum(), 3)),
                               rtol=0.01, atol=0.02)
    np.testing.assert_allclose(c[1, outside].numpy(), fine_c[outside], atol=1e-3)
    np.testing.assert_allclose(a[2, inside].numpy(), 1.0, rtol=0.01)
    np.testing.assert_allclose(a[2, outside].numpy(), 0.5, rtol=0.01)
    np.testing.assert_allclose(s.numpy(), 1.5)
    np.testing.assert_allclose(warped.neutral_centers_A, fine_c, atol=1e-5)
    assert warped.median_sigma_A == pytest.approx(1.5)
    assert warped.nearest_coarse().shape == (900,)


def test_layered_reference_is_the_decoded_model_below_the_crossover_and_the_fine_one_above():
    """--reference layered: the layered GMM's projection is L D + (1 - L) F with the Gaussian
    low-pass L = exp(-2 pi^2 tau^2 k^2), 1/2 at 1 / crossover; focus rows follow its layout."""
    from scipion_gmmhet.engine.analysis.fine_reference import lowpass_width_A
    from scipion_gmmhet.engine.model.gmm import project
    rng = np.random.default_rng(1)
    coarse = GMM(rng.uniform(-20, 20, size=(60, 3)), np.ones(60), np.full(60, 3.0), BOX, APIX, {})
    fine = GMM(rng.uniform(-18, 18, size=(150, 3)), np.full(150, 0.5), np.full(150, 1.5), BOX, APIX, {})
    decoded = refine.LatentModels(_DomainMove(coarse, [2.0, -1.0, 0.5]), np.zeros((2, 2)))
    plain = WarpedModels(decoded, FineReference(fine, 4.8, "test"))
    layered = WarpedModels(decoded, FineReference(fine, 4.8, "test"), crossover_A=12.0)
    assert layered.layered and not plain.layered
    assert lowpass_width_A(8.0) == pytest.approx(1.4985, abs=1e-3)
    rows = np.arange(2)
    c, a, s = layered.gaussians(rows, "cpu")
    assert c.shape == (2, 60 + 2 * 150, 3) and len(layered.neutral_centers_A) == 60 + 2 * 150
    assert layered.median_sigma_A == pytest.approx(1.5)  # the search band follows the fine model
    R = torch.eye(3).expand(2, 3, 3)

    def proj(g):
        return project(*(t.float() for t in g), R, BOX, APIX)

    P_layer, P_fine, P_dec = proj((c, a, s)), proj(plain.gaussians(rows, "cpu")), proj(decoded.gaussians(rows, "cpu"))
    ky = torch.fft.fftfreq(BOX, d=APIX)[:, None]
    kx = torch.fft.rfftfreq(BOX, d=APIX)[None, :]
    L = torch.exp(-2 * np.pi ** 2 * lowpass_width_A(12.0) ** 2 * (kx ** 2 + ky ** 2))
    expected = L * P_dec + (1 - L) * P_fine
    assert torch.allclose(P_layer, expected, atol=1e-4 * float(P_layer.abs().max()))
    k = torch.sqrt(kx ** 2 + ky ** 2)
    near = (k - 1 / 12.0).abs() < 0.004
    assert torch.allclose(L[near], torch.full_like(L[near], 0.5), atol=0.05)
    fine_sel = np.asarray(fine.centers_A)[:, 0] > 0
    coarse_sel = np.asarray(coarse.centers_A)[:, 0] > 0
    f = layered.focus(coarse_sel, fine_sel)
    assert f.shape == (360,) and (f[:60] == coarse_sel).all()
    assert (f[60:210] == fine_sel).all() and (f[210:] == fine_sel).all()
    assert (plain.focus(coarse_sel, fine_sel) == fine_sel).all()
    # the pose search's layout of the rows (its projector filters the fine layer instead of
    # projecting the low-passed copies), with a focus keeping each fine Gaussian and its copy
    assert layered.layers() == (60, 150, pytest.approx(lowpass_width_A(12.0))) and plain.layers() is None
    assert refine.projection_layers(layered, None) == layered.layers()
    assert refine.projection_layers(layered, torch.as_tensor(f))[:2] == (int(coarse_sel.sum()), int(fine_sel.sum()))
    unpaired = f.copy()
    unpaired[-1] = not unpaired[-1]
    assert refine.projection_layers(layered, torch.as_tensor(unpaired)) is None
    assert refine.projection_layers(plain, None) is None


def test_fine_reference_only_when_the_reconstruction_is_finer_than_the_neutral_model(sim, tmp_path):
    meta = metadata.read_particles(os.path.join(sim, "particles.star"))
    none = GMM.load(_neutral_with_resolution(sim, None, str(tmp_path / "none.npz")))
    assert neutral_resolution_A(none) is None
    assert build_fine_reference(meta, none) is None  # no recorded build resolution: decoded models
    sharp = GMM.load(_neutral_with_resolution(sim, 7.0, str(tmp_path / "sharp.npz")))
    assert build_fine_reference(meta, sharp) is None  # 64 particles cannot beat 0.8 x 7 A
    coarse = GMM.load(_neutral_with_resolution(sim, 40.0, str(tmp_path / "coarse.npz")))
    ref = build_fine_reference(meta, coarse)
    assert ref is not None and len(ref.gmm) > 0
    assert 0.6 * 40.0 - 1e-6 <= ref.resolution_A < 0.8 * 40.0  # no finer than 0.6 x the neutral's
    assert ref.gmm.box == BOX and ref.gmm.apix == pytest.approx(APIX)
    assert "Gaussians at" in ref.describe()


class _TrueMoves:
    """Each particle's true arm motion in the simulated set, as a :class:`motion_corrected.ModelMoves`
    (moves ``(B, N, 3)`` Angstrom from the middle state, c = 0.5)."""

    def __init__(self, sim_dir: str):
        mol = simulate.build_molecule(BOX, APIX, 0, 300)
        self.truth = mol.conformation_models(pd.read_csv(os.path.join(sim_dir, "truth.csv"))["conformation"])
        n = self.truth.n
        self.centers_A = torch.as_tensor(mol.centers_A[:n], dtype=torch.float32)
        self.amplitudes = torch.full((n,), float(mol.amplitude))
        self.sigmas_A = torch.full((n,), float(mol.sigma_A))
        self.middle = mol.state_gmm(0.5, False).render()
        self.zero = False

    def __call__(self, rows):
        return self.truth.gaussians(rows, "cpu")[0] - self.centers_A[None]


@pytest.fixture(scope="module")
def sim800(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fine_sim800"))
    simulate.simulate(d, "conformational", n=800, box=BOX, apix=APIX, snr=100.0, seed=3, n_gaussians=300)
    return d


def test_fine_reference_of_the_motion_corrected_map_is_sharper_where_the_particles_move(sim800, tmp_path):
    """With each particle's moves, the finer GMM is built of the motion-corrected reconstruction:
    closer to the middle state than the GMM of the plain map (where the arm is smeared over its
    swing), at the same resolution (the plain map's half-map FSC), and it says so."""
    meta = metadata.read_particles(os.path.join(sim800, "particles.star"))
    coarse = GMM.load(_neutral_with_resolution(sim800, 40.0, str(tmp_path / "coarse.npz")))
    moves = _TrueMoves(sim800)
    plain = build_fine_reference(meta, coarse)
    corrected = build_fine_reference(meta, coarse, moves=moves)
    assert corrected.resolution_A == pytest.approx(plain.resolution_A)
    assert "motion-corrected reconstruction" in corrected.describe()
    assert corrected.gmm.info["source"] == corrected.source
    assert "motion-corrected" not in plain.describe()

    def corr(g):
        a, b = g.render().ravel(), moves.middle.ravel()
        return float(np.corrcoef(a, b)[0, 1])
    assert corr(corrected.gmm) > corr(plain.gmm), (corr(corrected.gmm), corr(plain.gmm))


def test_fine_reference_keeps_the_plain_map_when_the_motion_corrected_half_maps_disagree(sim, tmp_path):
    """64 particles are too few for the deformed backprojection: its half maps do not reach the
    GMM's resolution, so the GMM is the plain map's, identical to one built without moves."""
    meta = metadata.read_particles(os.path.join(sim, "particles.star"))
    coarse = GMM.load(_neutral_with_resolution(sim, 40.0, str(tmp_path / "coarse.npz")))
    plain = build_fine_reference(meta, coarse)
    kept = build_fine_reference(meta, coarse, moves=_TrueMoves(sim))
    assert kept.source == plain.source == "the reconstruction of the particles"
    np.testing.assert_array_equal(np.asarray(kept.gmm.centers_A), np.asarray(plain.gmm.centers_A))


def _perturbed_training(sim, tmp_path, seed: int):
    """The simulated particles with perturbed poses (star), a neutral GMM recorded as built at 40 A,
    and a tiny network trained on them, on that GMM (``--finer-model off``: refinement's own finer
    GMM is what these tests check): (metadata, star, neutral GMM path, train folder)."""
    from scipion_gmmhet.engine import cli
    from test_refine import perturb
    from scipion_gmmhet.engine.conventions import euler_to_matrix, matrix_to_euler
    truth = pd.read_csv(os.path.join(sim, "truth.csv"))
    meta = metadata.read_particles(os.path.join(sim, "particles.star"))
    rot = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
    rot_p, org_p = perturb(rot, truth[["origin_x_A", "origin_y_A"]].to_numpy(), seed=seed)
    star = str(tmp_path / "perturbed.star")
    metadata.write_particles(star, meta.with_poses(np.stack(matrix_to_euler(rot_p), 1), org_p))
    gmm = _neutral_with_resolution(sim, 40.0, str(tmp_path / "neutral.npz"))
    train_dir = str(tmp_path / "train")
    assert cli.main(["train", "--particles", star, "--gmm", gmm, "--zdim", "2", "--epochs", "1", "--hidden", "32",
                     "--layers", "1", "--device", "cpu", "--finer-model", "off", "--out", train_dir]) == 0
    return meta, star, gmm, train_dir


@pytest.mark.parametrize("reference,focus", [("auto", None), ("layered", None), ("fine", None), ("decoded", None),
                                             ("auto", "mask"), ("auto", "core"), ("layered", "core")])
def test_cli_refine_second_round_uses_the_fine_reference(sim, tmp_path, reference, focus):
    """With a neutral GMM recorded as built at a coarse resolution, round 2 aligns to the GMMs
    of a network retrained on the finer GMM (auto = network), or to the deformed fine reference
    (layered, fine); rounds.csv says which; --reference decoded keeps the decoded models."""
    from scipion_gmmhet.engine import cli
    meta, star, gmm, train_dir = _perturbed_training(sim, tmp_path, seed=11)
    out = str(tmp_path / f"refine_{reference}")
    extra = []
    if focus == "mask":  # the fine Gaussians inside the mask are scored, the rest subtracted
        from test_refine import _arm_mask
        mol = simulate.build_molecule(BOX, APIX, 0, 300)
        extra = ["--mask", _arm_mask(mol, str(tmp_path / "arm.mrc"))]
    elif focus == "core":  # the automatic core carried to the fine Gaussians
        extra = ["--core", "auto"]
    assert cli.main(["refine", "--train", train_dir, "--particles", star, "--max-angle", "4", "--levels", "1",
                     "--rounds", "2", "--retrain-epochs", "1", "--reference", reference, "--device", "cpu",
                     "--out", out] + extra) == 0
    rounds = pd.read_csv(os.path.join(out, "rounds.csv"))
    assert rounds["reference"].iloc[0] == "decoded models"
    retrained = GMM.load(os.path.join(out, "round_1", "train", "gmm.npz"))  # the retraining's model
    neutral = GMM.load(gmm)
    if reference in ("auto", "layered", "fine"):
        assert "Gaussians at" in rounds["reference"].iloc[1] and "round 1" in rounds["reference"].iloc[1]
        assert rounds["reference"].iloc[1].startswith("decoded models to ") == (reference == "layered")
        assert rounds["reference"].iloc[1].startswith("decoded models of the network retrained on ") == (
            reference == "auto")
    else:
        assert rounds["reference"].iloc[1] == "decoded models"
    if reference == "auto":  # the network of round 2 deforms the finer GMM, trained to its resolution
        assert len(retrained) != len(neutral)
        finer = float(retrained.info["target_resolution_A"])
        assert 0.6 * 40.0 - 1e-6 <= finer < 0.8 * 40.0
        with open(os.path.join(out, "round_1", "train", "config.json")) as f:
            assert json.load(f)["train"]["highres_A"] == pytest.approx(finer, rel=0.05)
    else:  # retrained on the neutral GMM, as in round 1
        assert len(retrained) == len(neutral)
        np.testing.assert_allclose(np.asarray(retrained.centers_A), np.asarray(neutral.centers_A), atol=1e-4)
    assert len(metadata.read_particles(os.path.join(out, "particles.star"))) == len(meta)


def test_cli_refine_network_resume_keeps_the_finer_gmm_its_retraining_started_from(sim, tmp_path, monkeypatch):
    """--resume after an interrupted retraining on the finer GMM goes on from that retraining's own
    GMM (not a rebuilt one, which need not be identical) and keeps the finished rounds; --core
    auto is carried to the finer Gaussians; rounds.csv names the same references."""
    from scipion_gmmhet.engine import cli
    _, star, gmm, train_dir = _perturbed_training(sim, tmp_path, seed=12)
    out = str(tmp_path / "refine")
    args = ["refine", "--train", train_dir, "--particles", star, "--max-angle", "4", "--levels", "1", "--rounds", "3",
            "--retrain-epochs", "1", "--core", "auto", "--device", "cpu", "--out", out]
    assert cli.main(args) == 0
    first = pd.read_csv(os.path.join(out, "rounds.csv"))
    assert first["reference"].iloc[1].startswith("decoded models of the network retrained on ")
    r2 = os.path.join(out, "round_2")
    kept_gmm = GMM.load(os.path.join(r2, "train", "gmm.npz"))
    kept_model = os.path.getmtime(os.path.join(out, "round_1", "train", "model.pt"))
    # interrupted during round 2's retraining: round 3 and the finished network are gone
    os.remove(os.path.join(r2, "train", "model.pt"))
    os.remove(os.path.join(out, "round_3", "refine_result.npz"))
    from scipion_gmmhet.engine.analysis import fine_reference

    def no_rebuild(*a, **k):
        raise AssertionError("a resumed run rebuilt the finer GMM")
    monkeypatch.setattr(fine_reference, "build_fine_reference", no_rebuild)
    assert cli.main(args + ["--resume"]) == 0
    again = GMM.load(os.path.join(r2, "train", "gmm.npz"))
    np.testing.assert_array_equal(np.asarray(again.centers_A), np.asarray(kept_gmm.centers_A))
    assert os.path.getmtime(os.path.join(out, "round_1", "train", "model.pt")) == kept_model  # not retrained
    assert list(pd.read_csv(os.path.join(out, "rounds.csv"))["reference"]) == list(first["reference"])
