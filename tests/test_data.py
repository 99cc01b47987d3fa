"""ParticleImages: batched memory-mapped reads across stacks, in row order."""
from __future__ import annotations

import pickle

import mrcfile
import numpy as np
import pandas as pd
import pytest

from scipion_gmmhet.engine.io.data import ParticleImages
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.metadata import ParticleMetadata, read_particles
from scipion_gmmhet.engine.io.mrc import write_stack


def _meta(tmp_path, names, box=8):
    n = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": np.ones(n, np.int64),
                              "rlnOriginXAngst": np.zeros(n), "rlnOriginYAngst": np.zeros(n)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g"], "rlnImagePixelSize": [1.0],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    return ParticleMetadata(particles, optics, str(tmp_path), "test.star")


def test_get_across_stacks_in_row_order(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 8, 8)).astype(np.float32)
    b = rng.normal(size=(3, 8, 8)).astype(np.float32)
    write_stack(str(tmp_path / "a.mrcs"), a, 1.0)
    write_stack(str(tmp_path / "b.mrcs"), b, 1.0)
    names = ["3@a.mrcs", "1@b.mrcs", "1@a.mrcs", "3@b.mrcs", "5@a.mrcs", "2@b.mrcs"]
    expected = np.stack([a[2], b[0], a[0], b[2], a[4], b[1]])
    images = ParticleImages(_meta(tmp_path, names))
    assert len(images) == 6 and images.box == 8
    rows = np.array([5, 0, 3, 3, 2])
    got = images.get(rows)
    assert got.dtype == np.float32 and got.shape == (5, 8, 8)
    np.testing.assert_array_equal(got, expected[rows])
    got[:] = 0  # copies, not views of the read-only maps
    np.testing.assert_array_equal(images.get([0]), expected[[0]])
    assert images.get(np.array([], dtype=int)).shape == (0, 8, 8)
    clone = pickle.loads(pickle.dumps(images))
    assert clone._maps == {}
    np.testing.assert_array_equal(clone.get(rows), expected[rows])


def test_errors(tmp_path):
    write_stack(str(tmp_path / "a.mrcs"), np.zeros((2, 8, 8), np.float32), 1.0)
    write_stack(str(tmp_path / "c.mrcs"), np.zeros((2, 6, 6), np.float32), 1.0)
    images = ParticleImages(_meta(tmp_path, ["1@a.mrcs", "3@a.mrcs", "1@c.mrcs", "1@gone.mrcs"]))
    with pytest.raises(InputError, match="outside the stack"):
        images.get([1])
    with pytest.raises(InputError, match="6 px but other stacks"):
        images.get([0, 2])
    with pytest.raises(InputError, match="no such file"):
        images.get([3])
    with pytest.raises(IndexError):
        images.get([4])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile on RELION's header
def test_real_relion31_images(real_metadata_dir):
    meta = read_particles(real_metadata_dir / "relion31.star")
    got = ParticleImages(meta).get(np.array([4, 0]))
    with mrcfile.open(str(real_metadata_dir / "relion31.mrcs"), permissive=True) as m:
        np.testing.assert_array_equal(got, m.data[[4, 0]])
    assert got.shape == (2, 256, 256)
