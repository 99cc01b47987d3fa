"""io/loader.py: block-shuffled order, contiguous-run reads and the threaded batch loader (issue 14).

The loader must visit every item of an epoch exactly once and hand the trainer the very images
(and device batches) of the old path (:meth:`features.Particles.read` / ``batch``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io import loader
from scipion_gmmhet.engine.io.data import ParticleImages
from scipion_gmmhet.engine.io.metadata import ParticleMetadata
from scipion_gmmhet.engine.io.mrc import write_stack
from scipion_gmmhet.engine.io.data import Particles


def _two_stack_particles(tmp_path, n_a=37, n_b=29, box=16, n_ops=1, dtype=np.float32):
    """Particles over two stacks whose star rows interleave the stacks and run backwards in places."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n_a, box, box)).astype(dtype)
    b = rng.normal(size=(n_b, box, box)).astype(dtype)
    write_stack(str(tmp_path / "a.mrcs"), a, 2.0)
    write_stack(str(tmp_path / "b.mrcs"), b, 2.0)
    names = [f"{i + 1}@a.mrcs" for i in range(n_a)][:20] + [f"{i + 1}@b.mrcs" for i in range(n_b)][::-1] \
        + [f"{i + 1}@a.mrcs" for i in range(20, n_a)]
    n = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": np.ones(n, np.int64),
                              "rlnOriginXAngst": np.zeros(n), "rlnOriginYAngst": np.zeros(n)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g"], "rlnImagePixelSize": [2.0],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    images = ParticleImages(ParticleMetadata(particles, optics, str(tmp_path), "test.star"))
    rots = np.repeat(np.eye(3, dtype=np.float32)[None], n, axis=0)
    ops = None if n_ops == 1 else np.stack([np.eye(3)] * n_ops)
    return Particles(images, rots, np.zeros((n, 2)), box, 2.0, ctf_mode="none", sym_ops=ops)


def test_block_shuffled_order_visits_every_item_once_in_blocks():
    items = np.arange(0, 3000, 3)  # sorted, not contiguous
    order = loader.block_shuffled_order(items, 64, [0, 1, 2])
    assert np.array_equal(np.sort(order), items)
    blocks = [order[i:i + 64] for i in range(0, len(order), 64)]
    assert sum(np.all(np.diff(b) == 3) for b in blocks) >= len(blocks) - 1  # blocks stay consecutive
    assert not np.array_equal(order, items)  # shuffled
    assert np.array_equal(order, loader.block_shuffled_order(items, 64, [0, 1, 2]))  # seeded
    assert not np.array_equal(order, loader.block_shuffled_order(items, 64, [0, 1, 3]))
    plain = loader.block_shuffled_order(items, 1, 5)
    assert np.array_equal(np.sort(plain), items)


def test_contiguous_runs():
    assert loader.contiguous_runs(np.array([2, 3, 4, 9, 11, 12])) == [(0, 2, 3), (3, 9, 1), (4, 11, 2)]
    assert loader.contiguous_runs(np.array([], dtype=np.int64)) == []


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_read_rows_equals_particle_images_get(tmp_path, dtype):
    p = _two_stack_particles(tmp_path, dtype=dtype)
    rng = np.random.default_rng(0)
    for rows in (np.arange(len(p.images)), np.sort(rng.choice(len(p.images), 30, replace=False)),
                 rng.permutation(len(p.images))[:25], np.array([5, 5, 6, 40, 39])):
        want = p.images.get(rows)
        np.testing.assert_array_equal(loader.read_rows(p.images, rows), want)
        buf = np.full((len(rows) + 3, p.box, p.box), np.nan, np.float32)
        np.testing.assert_array_equal(loader.read_rows(p.images, rows, buf), want)
    with pytest.raises(IndexError):
        loader.read_rows(p.images, np.array([len(p.images)]))


@pytest.mark.parametrize("n_ops,threads", [(1, 1), (1, 3), (2, 2)])
def test_loader_epoch_visits_every_item_once_with_old_path_images(tmp_path, n_ops, threads):
    p = _two_stack_particles(tmp_path, n_ops=n_ops)
    order = loader.block_shuffled_order(np.arange(len(p)), 8, [4, 0])
    batches = [np.sort(order[i:i + 24]) for i in range(0, len(order), 24)]
    seen = []
    with loader.BatchLoader(p, batches, threads=threads, depth=3) as L:
        for items, host in zip(batches, L):
            old = p.read(items)
            assert np.array_equal(host.items, items)
            assert torch.equal(host.images, old.images)
            b_new, b_old = L.to_device(host), p.to_device(old)
            assert torch.equal(b_new.F_img, b_old.F_img) and torch.equal(b_new.rotations, b_old.rotations)
            seen.append(host.items)
    seen = np.concatenate(seen)
    assert len(seen) == len(p) and np.array_equal(np.sort(seen), np.arange(len(p)))
    assert L.read_seconds > 0


def test_loader_raises_a_nan_image_at_its_turn(tmp_path):
    p = _two_stack_particles(tmp_path)
    bad = p.images.get(np.arange(len(p.images)))
    bad[30, 3, 3] = np.nan
    from scipion_gmmhet.engine.io.data import ArrayImages
    p.images = ArrayImages(bad)
    batches = [np.arange(0, 20), np.arange(20, 40), np.arange(40, 60)]
    got = []
    with pytest.raises(InputError, match="NaN or Inf"):
        for host in loader.BatchLoader(p, batches, threads=2):
            got.append(host)
    assert len(got) == 1


def test_loader_stops_cleanly_when_the_consumer_leaves_early(tmp_path):
    p = _two_stack_particles(tmp_path)
    batches = [np.arange(i, i + 4) for i in range(0, 60, 4)]
    with loader.BatchLoader(p, batches, threads=2, depth=2) as L:
        for k, host in enumerate(L):
            if k == 2:
                break
    assert L._pool is None
