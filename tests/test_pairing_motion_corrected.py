"""motion_corrected.latents_for_rows pairs a star's rows with a half model's latents by particle
identity (io/pairing.py: the run's recorded keys), never by row position.

A fake finished training folder (config, latent.npy with a distinct latent per particle, the
keys `gmmhet train` records) on the half-1 particles of a small simulated star: the full star
in any order gets each half-1 particle its own latent and marks the half-2 particles not found,
the recorded training star rewritten afterwards changes nothing, Scipion ids pair when the
training had them, and a run from before the keys is paired through its training star.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from scipion_gmmhet.engine.analysis import motion_corrected as mc
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.io.outputs import TrainFolder
from scipion_gmmhet.engine.io.pairing import record_particle_keys


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from scipion_gmmhet.engine.simulation.simulate import simulate
    out = tmp_path_factory.mktemp("mc_pairing")
    res = simulate(str(out), "conformational", n=40, box=24, apix=8.0, snr=1.0, seed=1)
    meta = metadata.read_particles(res["star"])
    meta.particles["rlnGmmhetParticleId"] = np.arange(len(meta)) * 7 + 100  # Scipion-like ids
    return out, meta


def _write(meta, rows, path) -> str:
    metadata.write_particles(str(path), meta.subset(np.asarray(rows)))
    return str(path)


def _half_run(meta, folder, with_ids: bool, keys: bool = True):
    """A finished training folder on the half-1 particles (latent: 1000 + training row), and
    its training star."""
    m = metadata.ParticleMetadata(meta.particles.copy(), meta.optics, meta.root, meta.source)
    if not with_ids:
        m.particles = m.particles.drop(columns=["rlnGmmhetParticleId"])
    half1 = np.flatnonzero(m.particles["rlnRandomSubset"].to_numpy() == 1)
    tf = TrainFolder(str(folder))
    os.makedirs(tf.folder, exist_ok=True)
    star = _write(m, half1, tf.path("half1.star"))
    z = np.stack([1000.0 + np.arange(half1.size), -np.arange(half1.size)], 1).astype(np.float32)
    tf.write_latents(z)
    tf.write_config({"n_ops": 1, "particles": star})
    open(tf.model, "wb").close()  # finished
    if keys:
        record_particle_keys(tf, star, half1.size)
    return tf, star, m


def _by_particle(meta, lat, found, kind="image") -> dict:
    keys = meta.particle_keys(kind)
    return {str(k): tuple(lat[i]) for i, k in enumerate(keys) if found[i]}


@pytest.mark.parametrize("with_ids", [False, True])
def test_reordered_star_gives_the_same_latents_per_particle(sim, tmp_path, with_ids):
    out, meta = sim
    tf, star, m = _half_run(meta, tmp_path / "t1", with_ids)
    kind = "id" if with_ids else "image"
    assert str(tf.read_particle_keys()[0]).startswith(kind[:2])
    full = metadata.read_particles(_write(m, np.arange(len(m)), tmp_path / "full.star"))
    lat0, found0 = mc.latents_for_rows(full, tf.folder)
    half = full.particles["rlnRandomSubset"].to_numpy()
    np.testing.assert_array_equal(found0, half == 1)
    np.testing.assert_array_equal(lat0[found0, 0], 1000 + np.arange(found0.sum()))  # training order
    ref = _by_particle(full, lat0, found0, kind)
    perm = np.random.default_rng(3).permutation(len(m))
    shuffled = metadata.read_particles(_write(m, perm, tmp_path / "shuffled.star"))
    lat1, found1 = mc.latents_for_rows(shuffled, tf.folder)
    np.testing.assert_array_equal(found1, half[perm] == 1)
    assert _by_particle(shuffled, lat1, found1, kind) == ref
    assert not np.array_equal(lat1[found1], lat0[found0])  # really another row order
    # the recorded training star rewritten after the training: the recorded keys still decide
    _write(m, np.flatnonzero(half == 1)[::-1], star)
    lat2, found2 = mc.latents_for_rows(shuffled, tf.folder)
    np.testing.assert_array_equal(lat2, lat1)
    np.testing.assert_array_equal(found2, found1)


def test_ids_pair_even_when_the_images_moved(sim, tmp_path):
    out, meta = sim
    tf, star, m = _half_run(meta, tmp_path / "t1", with_ids=True)
    full = metadata.read_particles(_write(m, np.arange(len(m)), tmp_path / "full.star"))
    lat0, found0 = mc.latents_for_rows(full, tf.folder)
    moved = metadata.read_particles(_write(m, np.arange(len(m))[::-1], tmp_path / "moved.star"))
    moved.particles["rlnImageName"] = [f"{i + 1}@elsewhere.mrcs" for i in range(len(moved))]
    lat1, found1 = mc.latents_for_rows(moved, tf.folder)
    np.testing.assert_array_equal(found1, found0[::-1])
    np.testing.assert_array_equal(lat1, lat0[::-1])
    no_ids = metadata.ParticleMetadata(full.particles.drop(columns=["rlnGmmhetParticleId"]), full.optics,
                                       full.root, full.source)
    with pytest.raises(InputError, match="rlnGmmhetParticleId") as e:
        mc.latents_for_rows(no_ids, tf.folder)
    assert "\n" not in str(e.value)


def test_repeated_particle_is_refused(sim, tmp_path):
    out, meta = sim
    tf, star, m = _half_run(meta, tmp_path / "t1", with_ids=False)
    first = int(np.flatnonzero(m.particles["rlnRandomSubset"].to_numpy() == 1)[0])
    twice = metadata.read_particles(_write(m, [first, first, 1, 2], tmp_path / "twice.star"))
    with pytest.raises(InputError, match="more often"):
        mc.latents_for_rows(twice, tf.folder)


def test_run_without_keys_pairs_through_its_training_star(sim, tmp_path, caplog):
    out, meta = sim
    tf, star, m = _half_run(meta, tmp_path / "t1", with_ids=False, keys=False)
    assert tf.read_particle_keys() is None
    keyed, _, _ = _half_run(meta, tmp_path / "t2", with_ids=False)
    perm = np.random.default_rng(4).permutation(len(m))
    shuffled = metadata.read_particles(_write(m, perm, tmp_path / "shuffled.star"))
    with caplog.at_level(logging.WARNING):
        lat, found = mc.latents_for_rows(shuffled, tf.folder)
    assert "predates recorded particle keys" in caplog.text
    ref_lat, ref_found = mc.latents_for_rows(shuffled, keyed.folder)
    np.testing.assert_array_equal(found, ref_found)
    np.testing.assert_array_equal(lat, ref_lat)
    os.remove(star)
    with pytest.raises(InputError, match="is gone"):
        mc.latents_for_rows(shuffled, tf.folder)
    _write(m, np.arange(3), star)  # not the star it was trained on (count differs)
    with pytest.raises(InputError, match="restore the star"):
        mc.latents_for_rows(shuffled, tf.folder)
