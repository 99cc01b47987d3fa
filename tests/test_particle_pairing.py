"""Results pair with particles by particle identity, never by row position (io/pairing.py).

A training records its particles' keys (rlnGmmhetParticleId, else the image: index and real
stack path); `gmmhet analyze` and `gmmhet refine` match the rows of the star they are given
to the training's latent rows by those keys, so the same particles in another order (sorted,
grouped by micrograph, a Scipion export) or a subset get their own latents, a star with a
particle the training never saw is refused (analyze) or encoded (refine), and a run folder
from before the keys still works by position, with a warning.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.io.outputs import AnalysisFolder, TrainFolder
from scipion_gmmhet.engine.io.pairing import latent_rows_for, latents_for, record_particle_keys
from scipion_gmmhet.engine.model.gmm import GMM


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from scipion_gmmhet.engine.simulation.simulate import simulate
    out = tmp_path_factory.mktemp("pairing_sim")
    res = simulate(str(out), "compositional", n=120, box=24, apix=6.0, snr=1.0, seed=5)
    res["meta"] = metadata.read_particles(res["star"])
    res["composition"] = pd.read_csv(res["truth_csv"])["composition"].to_numpy()
    return res


class _StandIn:
    """What analyze needs of a trained model, with known latents (no decoding is asked)."""

    def __init__(self, neutral: GMM, latents: np.ndarray):
        self.neutral, self.zdim, self._latents, self.info = neutral, latents.shape[1], latents, {}

    def latents(self):
        return self._latents


def _run(sim, folder, monkeypatch, n_ops: int = 1, keys: bool = True):
    """A training folder whose latents are the composition (well separated) + noise, with
    ``n_ops`` rows per particle; ``keys``: the particle keys recorded as `gmmhet train` does."""
    from scipion_gmmhet.engine.training import trained
    rng = np.random.default_rng(1)
    comp = np.repeat(sim["composition"], n_ops)
    z = np.stack([4.0 * comp + rng.normal(0, 0.2, comp.size), rng.normal(0, 0.3, comp.size)], 1).astype(np.float32)
    tf = TrainFolder(str(folder))
    os.makedirs(tf.folder, exist_ok=True)
    tf.write_config({"n_ops": n_ops})
    tf.write_latents(z)
    if keys:
        record_particle_keys(tf, sim["star"], len(sim["meta"]))
    model = _StandIn(GMM.load(sim["truth_gmm"]["neutral"]), z)
    monkeypatch.setattr(trained, "load_trained", lambda d, device="cpu": model)
    return tf


def _analyze(train, star, out, *extra) -> int:
    from scipion_gmmhet.engine.cli import main
    return main(["analyze", "--train", str(train), "--particles", str(star), "--clusters", "2", "--no-gmm-maps",
                 "--traj-steps", "0", "--no-trajectory", "--out", str(out), *extra])


def _cluster_of_image(star, out) -> dict[str, int]:
    """{image (index@real stack path): cluster} from an analysis's cluster_XX_rows.txt and its star."""
    keys = metadata.read_particles(str(star)).particle_keys("image")
    folder, result = AnalysisFolder(str(out)), {}
    for c in range(2):
        for r in np.loadtxt(folder.cluster_rows(c), dtype=np.int64, ndmin=1):
            result[str(keys[r])] = c
    return result


def _write(meta, rows, path, by_defocus: bool = False) -> str:
    sub = meta.subset(np.asarray(rows))
    if by_defocus:
        sub = sub.subset(np.argsort(sub.particles["rlnDefocusU"].to_numpy(), kind="stable"))
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    metadata.write_particles(str(path), sub)
    return str(path)


def test_keys_name_the_image_whatever_the_spelling_or_the_id(tmp_path):
    (tmp_path / "x.mrcs").write_bytes(b"")
    os.symlink(tmp_path / "x.mrcs", tmp_path / "link.mrcs")
    os.makedirs(tmp_path / "sub")
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0]})
    names = ["1@x.mrcs", "000001@x.mrcs", f"1@{tmp_path / 'x.mrcs'}", "01@sub/../x.mrcs", "1@link.mrcs", "2@x.mrcs"]
    meta = metadata.ParticleMetadata(pd.DataFrame({"rlnImageName": names}), optics, str(tmp_path))
    keys = metadata.particle_keys(meta)
    assert len(set(keys[:5])) == 1 and keys[5] != keys[0]
    assert keys[0] == f"img:1@{os.path.realpath(tmp_path / 'x.mrcs')}"
    # Scipion's particle id wins when present; 12, 12.0 and 000012 are one id
    meta.particles["rlnGmmhetParticleId"] = ["12", "12.0", "000012", "7", "8", "9"]
    keys = meta.particle_keys()
    assert list(keys[:4]) == ["id:12", "id:12", "id:12", "id:7"]
    assert meta.particle_keys("image")[0] == f"img:1@{os.path.realpath(tmp_path / 'x.mrcs')}"


def test_reordered_star_gets_each_particle_its_own_latent(sim, tmp_path, monkeypatch):
    train = _run(sim, tmp_path / "train", monkeypatch)
    assert _analyze(train.folder, sim["star"], tmp_path / "a0") == 0
    ref = _cluster_of_image(sim["star"], tmp_path / "a0")
    comp = dict(zip(metadata.particle_keys(sim["meta"], "image"), sim["composition"]))
    assert all((c == ref[next(iter(ref))]) == (comp[k] == comp[next(iter(ref))]) for k, c in ref.items())
    n = len(sim["meta"])
    for name, star in (("reversed", _write(sim["meta"], np.arange(n)[::-1], tmp_path / "rev.star")),
                       ("defocus", _write(sim["meta"], np.arange(n), tmp_path / "dfs" / "sorted.star", True))):
        out = tmp_path / name
        assert _analyze(train.folder, star, out) == 0
        assert _cluster_of_image(star, out) == ref, name
        labels = np.load(AnalysisFolder(str(out)).labels)  # labels.npy follows the star's rows
        keys = metadata.read_particles(star).particle_keys("image")
        assert [ref[k] for k in keys] == labels.tolist()


def test_reordered_star_of_a_symmetry_expanded_training(sim, tmp_path, monkeypatch):
    train = _run(sim, tmp_path / "train", monkeypatch, n_ops=2)
    assert _analyze(train.folder, sim["star"], tmp_path / "a0", "--no-reconstruct") == 0
    ref = _cluster_of_image(sim["star"], tmp_path / "a0")
    star = _write(sim["meta"], np.arange(len(sim["meta"]))[::-1], tmp_path / "rev.star")
    assert _analyze(train.folder, star, tmp_path / "a1", "--no-reconstruct") == 0
    assert _cluster_of_image(star, tmp_path / "a1") == ref
    # latent row i * n_ops + s: each star row gets both of its particle's rows
    z = train.read_latents()
    rows = latent_rows_for(metadata.read_particles(star), train, 2)
    np.testing.assert_array_equal(rows, np.arange(len(sim["meta"]))[::-1])
    np.testing.assert_array_equal(latents_for(z, rows, 2), z.reshape(-1, 2, 2)[::-1].reshape(-1, 2))


def test_subset_star_gets_its_particles_latents(sim, tmp_path, monkeypatch):
    train = _run(sim, tmp_path / "train", monkeypatch)
    assert _analyze(train.folder, sim["star"], tmp_path / "a0", "--no-reconstruct") == 0
    ref = _cluster_of_image(sim["star"], tmp_path / "a0")
    rows = np.random.default_rng(2).permutation(len(sim["meta"]))[:70]
    star = _write(sim["meta"], rows, tmp_path / "subset.star")
    np.testing.assert_array_equal(latent_rows_for(metadata.read_particles(star), train), rows)
    assert _analyze(train.folder, star, tmp_path / "a1", "--no-reconstruct") == 0
    got = _cluster_of_image(star, tmp_path / "a1")
    assert len(got) == 70
    pairs = {(ref[k], c) for k, c in got.items()}  # the same partition (cluster numbers may swap)
    assert len(pairs) == 2 and len({a for a, _ in pairs}) == 2


def test_foreign_particle_is_refused_by_analyze(sim, tmp_path, monkeypatch, capsys):
    train = _run(sim, tmp_path / "train", monkeypatch)
    n = len(sim["meta"])
    extra = metadata.read_particles(sim["star"])
    extra.particles.loc[n - 1, "rlnImageName"] = "000001@other.mrcs"  # an image the training never saw
    star = tmp_path / "foreign.star"
    metadata.write_particles(str(star), extra)
    assert latent_rows_for(metadata.read_particles(str(star)), train) is None
    capsys.readouterr()
    assert _analyze(train.folder, star, tmp_path / "a1", "--no-reconstruct") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--particles" in err and "--latents" in err, err


def test_run_without_keys_pairs_by_position_with_a_warning(sim, tmp_path, monkeypatch, caplog):
    train = _run(sim, tmp_path / "train", monkeypatch, keys=False)
    assert train.read_particle_keys() is None
    with caplog.at_level(logging.WARNING):
        assert _analyze(train.folder, sim["star"], tmp_path / "a0", "--no-reconstruct") == 0
    assert "predates particle keys" in caplog.text
    assert np.load(AnalysisFolder(str(tmp_path / "a0")).labels).shape == (len(sim["meta"]),)
    subset = _write(sim["meta"], np.arange(10), tmp_path / "subset.star")
    assert latent_rows_for(metadata.read_particles(subset), train) is None  # counts differ: cannot pair
    # a run on arrays (no star) in a folder that held one removes the stale keys
    keyed = TrainFolder(str(tmp_path))
    keyed.write_particle_keys(["img:1@a"])
    record_particle_keys(keyed, None, 1)
    assert keyed.read_particle_keys() is None


@pytest.fixture(scope="module")
def trained_run(sim, tmp_path_factory):
    """A tiny network trained by `gmmhet train` on the first 100 particles (1 epoch)."""
    from scipion_gmmhet.engine import cli
    d = tmp_path_factory.mktemp("pairing_train")
    star = _write(sim["meta"], np.arange(100), d / "first100.star")
    out = str(d / "train")
    assert cli.main(["train", "--particles", star, "--zdim", "2", "--epochs", "1", "--hidden", "32", "--layers",
                     "1", "--gmm", sim["truth_gmm"]["neutral"], "--device", "cpu", "--out", out]) == 0
    return star, out


def test_train_records_keys_and_refine_pairs_or_encodes(sim, trained_run, tmp_path, monkeypatch, caplog):
    from scipion_gmmhet.engine.commands.refine import particle_latents
    from scipion_gmmhet.engine.training.trained import load_trained
    star, out = trained_run
    np.testing.assert_array_equal(TrainFolder(out).read_particle_keys(),
                                  metadata.read_particles(star).particle_keys())
    tm = load_trained(out)
    z = tm.latents()
    encoded = []
    monkeypatch.setattr(tm, "encode_particles", lambda s, device=None: encoded.append(s) or
                        np.zeros((len(metadata.read_particles(s)), tm.zdim), np.float32))
    perm = np.random.default_rng(3).permutation(100)[:60]
    shuffled = _write(sim["meta"], perm, tmp_path / "shuffled.star")
    with caplog.at_level(logging.INFO):
        lat = particle_latents(tm, shuffled, 60, 1, None, False, torch.device("cpu"))
    np.testing.assert_array_equal(lat, z[perm])
    assert not encoded and "matched by particle identity" in caplog.text
    # the whole simulated set holds 20 particles the network was not trained on: encoded
    lat = particle_latents(tm, sim["star"], len(sim["meta"]), 1, None, False, torch.device("cpu"))
    assert encoded == [sim["star"]] and lat.shape == (len(sim["meta"]), tm.zdim)
    # an older run (no keys) with the same count: paired by position, with a warning
    os.remove(TrainFolder(out).particle_keys)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            lat = particle_latents(tm, star, 100, 1, None, False, torch.device("cpu"))
        np.testing.assert_array_equal(lat, z)
        assert "predates particle keys" in caplog.text
    finally:
        record_particle_keys(TrainFolder(out), star, 100)


def test_analyze_says_at_once_when_the_images_are_not_found(sim, tmp_path, monkeypatch, capsys):
    """A star whose image names resolve nowhere: one line before any clustering, and
    --images-root points analyze to the stacks' folder."""
    train = _run(sim, tmp_path / "train", monkeypatch)
    names = metadata.read_particles(sim["star"]).particles["rlnImageName"].astype(str)
    elsewhere = tmp_path / "elsewhere"
    os.makedirs(elsewhere)
    star = elsewhere / "moved.star"
    with open(sim["star"]) as f:  # the same table, written by hand with bare stack names
        text = f.read()
    for n in set(names):
        text = text.replace(n, n.split("@")[0] + "@" + os.path.basename(n.split("@")[1]))
    star.write_text(text)
    capsys.readouterr()
    assert _analyze(train.folder, star, tmp_path / "a_missing") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "moved.star" in err, err
    assert not os.path.exists(AnalysisFolder(str(tmp_path / "a_missing")).cluster_rows(0))
    stack = names.iloc[0].split("@")[1]
    stacks = os.path.dirname(os.path.join(os.path.dirname(sim["star"]), stack))  # as the star names it
    assert _analyze(train.folder, star, tmp_path / "a_root", "--images-root", stacks) == 0
