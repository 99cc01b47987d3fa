"""Tests of engine/training/finer_model.py: `gmmhet train --finer-model auto` trains first on the
given GMM, then on a GMM of the motion-corrected reconstruction when that map is finer."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from scipion_gmmhet.engine import cli
from scipion_gmmhet.engine.io.outputs import TrainFolder
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation import simulate

BOX, APIX = 32, 3.0
TINY = ["--zdim", "2", "--epochs", "1", "--hidden", "32", "--layers", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("finer_sim"))
    simulate.simulate(d, "conformational", n=64, box=BOX, apix=APIX, snr=100.0, seed=3, n_gaussians=300)
    return d


def _neutral(sim_dir: str, resolution_A: float, path: str) -> str:
    """The simulator's middle-state GMM, recorded as built at ``resolution_A`` (as gmmhet build does)."""
    g = GMM.load(os.path.join(sim_dir, "truth_gmm", "conf_002.npz"))
    GMM(g.centers_A, g.amplitudes, g.sigmas_A, g.box, g.apix,
        {**g.info, "target_resolution_A": str(resolution_A)}).save(path)
    return path


def test_finer_model_trains_again_on_the_gmm_of_the_finer_reconstruction(sim, tmp_path):
    gmm = _neutral(sim, 40.0, str(tmp_path / "neutral.npz"))
    out = str(tmp_path / "train")
    assert cli.main(["train", "--particles", os.path.join(sim, "particles.star"), "--gmm", gmm, "--finer-model", "auto",
                     "--out", out] + TINY) == 0
    folder, neutral = TrainFolder(out), GMM.load(gmm)
    assert folder.first_model.is_finished() and folder.is_finished()
    first = GMM.load(folder.first_model.gmm)
    np.testing.assert_allclose(np.asarray(first.centers_A), np.asarray(neutral.centers_A), atol=1e-5)
    finer = GMM.load(folder.gmm)
    res = float(finer.info["target_resolution_A"])
    assert len(finer) != len(neutral) and 0.6 * 40.0 - 1e-6 <= res < 0.8 * 40.0
    record = folder.read_summary()["finer_model"]
    assert record["first_model"] == "first_model" and record["gaussians"] == len(finer)
    assert record["neutral_gaussians"] == len(neutral) and record["resolution_A"] == pytest.approx(res)
    assert "reconstruction of the particles at their input poses" in record["source"]
    # the latent directions of both trainings, and the warning flag when the second has fewer
    assert record["first_effective_dim"] == folder.first_model.read_summary()["effective_dim"]
    assert record["effective_dim"] == folder.read_summary()["effective_dim"]
    assert record["fewer_directions"] == (record["effective_dim"] < record["first_effective_dim"])
    # the second network started from the first one (training/warm_start.py), recorded
    warm = record["warm_start"]
    assert warm == folder.read_config()["warm_start"] and warm["steps"] == 1000
    assert np.isfinite(warm["encoder_r2"]) and 0 <= warm["decoder_rel_mse"] < 0.5
    cfg = folder.read_config()["train"]
    assert cfg["finer_model"] == "auto" and cfg["highres_A"] == pytest.approx(res, rel=0.05)  # band up to the GMM
    # the KL weight per Fourier pixel of the first band: scaled by the bands' areas
    b1 = folder.first_model.read_config()["train"]
    area = lambda lo, hi: 1 / hi ** 2 - 1 / lo ** 2  # noqa: E731
    expected = b1["kl_weight"] * area(b1["lowres_A"], b1["highres_A"]) / area(b1["lowres_A"], res)
    assert record["kl_weight"] == pytest.approx(expected) and cfg["kl_weight"] == pytest.approx(expected)
    assert expected < b1["kl_weight"]
    assert folder.read_latents().shape == (64, 2)
    # OUT is an ordinary training folder: gmmhet analyze reads the finer network from it
    an = tmp_path / "analyze"
    assert cli.main(["analyze", "--train", out, "--clusters", "2", "--no-reconstruct", "--traj-steps", "3",
                     "--out", str(an)]) == 0
    assert (an / "pc1_00.mrc").exists() and len(json.loads((an / "summary.json").read_text())["clusters"]) == 2


def test_finer_model_trains_once_when_the_reconstruction_is_not_finer(sim, tmp_path):
    gmm = _neutral(sim, 7.0, str(tmp_path / "sharp.npz"))  # 64 particles cannot beat 0.8 x 7 A
    out = str(tmp_path / "train")
    assert cli.main(["train", "--particles", os.path.join(sim, "particles.star"), "--gmm", gmm, "--finer-model", "auto",
                     "--out", out] + TINY) == 0
    folder = TrainFolder(out)
    assert folder.is_finished() and not os.path.exists(folder.first_model.folder)
    assert "finer_model" not in folder.read_summary()
    np.testing.assert_array_equal(np.asarray(GMM.load(folder.gmm).centers_A), np.asarray(GMM.load(gmm).centers_A))


def test_finer_model_resume_keeps_the_first_model_and_the_finer_gmm(sim, tmp_path, monkeypatch):
    """Interrupted in the second training: --resume keeps the first model and goes on from the
    finer GMM that training started from (never rebuilt)."""
    gmm = _neutral(sim, 40.0, str(tmp_path / "neutral.npz"))
    out = str(tmp_path / "train")
    args = ["train", "--particles", os.path.join(sim, "particles.star"), "--gmm", gmm, "--finer-model", "auto",
            "--out", out] + TINY
    assert cli.main(args) == 0
    folder = TrainFolder(out)
    kept = GMM.load(folder.gmm)
    warm = folder.read_summary()["finer_model"]["warm_start"]
    first_mtime = os.path.getmtime(folder.first_model.model)
    os.remove(folder.model)
    from scipion_gmmhet.engine.analysis import fine_reference

    def no_rebuild(*a, **k):
        raise AssertionError("a resumed run rebuilt the finer GMM")
    monkeypatch.setattr(fine_reference, "build_fine_reference", no_rebuild)
    assert cli.main(args + ["--resume"]) == 0
    assert folder.is_finished() and os.path.getmtime(folder.first_model.model) == first_mtime
    np.testing.assert_array_equal(np.asarray(GMM.load(folder.gmm).centers_A), np.asarray(kept.centers_A))
    with open(folder.summary) as f:
        record = json.load(f)["finer_model"]
    assert record["gaussians"] == len(kept) and record["warm_start"] == warm  # the resumed run's start, kept


def test_finer_model_centres_once_against_the_given_gmm(sim, tmp_path, monkeypatch):
    """The centring is decided once, by the first training against the given GMM: the second
    training uses its corrections (no search against the finer GMM), and encoding particles with
    the finer network later centres them against the given GMM too."""
    from scipion_gmmhet.engine.training import centering
    from scipion_gmmhet.engine.training.trained import load_trained
    searched = []
    real = centering.center_particles

    def counted(particles, neutral, *a, **k):
        searched.append(len(neutral))
        return real(particles, neutral, *a, **k)
    monkeypatch.setattr(centering, "center_particles", counted)
    gmm = _neutral(sim, 40.0, str(tmp_path / "neutral.npz"))
    out = str(tmp_path / "train")
    star = os.path.join(sim, "particles.star")
    assert cli.main(["train", "--particles", star, "--gmm", gmm, "--finer-model", "auto", "--center", "auto",
                     "--out", out] + TINY) == 0
    folder, n_given = TrainFolder(out), len(GMM.load(gmm))
    assert len(GMM.load(folder.gmm)) != n_given and searched == [n_given]
    first = folder.first_model.read_centering()
    assert first is not None and first.shape == (64, 2)
    np.testing.assert_array_equal(folder.read_centering(), first)
    tm = load_trained(out)
    assert len(tm.centering_reference()) == n_given
    assert tm.encode_particles(star).shape == (64, 2) and searched == [n_given, n_given]


def test_finer_model_refuses_an_unknown_mode(sim, tmp_path):
    from scipion_gmmhet.engine.errors import InputError
    from scipion_gmmhet.engine.training.config import TrainConfig
    from scipion_gmmhet.engine.training.finer_model import train_model
    with pytest.raises(InputError, match="--finer-model sometimes"):
        train_model(lambda: None, GMM.load(_neutral(sim, 40.0, str(tmp_path / "n.npz"))),
                    TrainConfig(finer_model="sometimes"), str(tmp_path / "out"),
                    star_path=os.path.join(sim, "particles.star"))
