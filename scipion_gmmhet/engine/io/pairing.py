"""Pair a star's particle rows with a training run's latent rows by particle identity.

``gmmhet train`` writes ``latent.npy`` (row ``i * n_ops + s`` = particle row ``i`` of the
training star, symmetry operator ``s``) and records each training particle's key
(:meth:`metadata.ParticleMetadata.particle_keys`: Scipion's ``rlnGmmhetParticleId``, else
the image) in the train folder (:meth:`outputs.TrainFolder.write_particle_keys`). A star given
later (``analyze``/``refine --particles``) may hold the same particles in another order
(sorted, grouped by micrograph, a Scipion export) or a subset: :func:`latent_rows_for` finds
each of its rows' training particle by key, never by row position. Runs that predate the keys
are paired by position when the counts agree, with a warning. No torch.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import InputError
from .outputs import TrainFolder

log = logging.getLogger("gmmhet.pairing")


def record_particle_keys(folder: TrainFolder, star_path: str | None, n_particles: int) -> None:
    """Record the keys of the particles of ``star_path`` (the training star, ``n_particles``
    rows) in ``folder``; without a star (training from arrays) remove any stale record."""
    keys = None
    if star_path:
        from .metadata import read_particles
        keys = read_particles(star_path).particle_keys()
        if len(keys) != int(n_particles):  # not the star the particles came from: record nothing
            log.warning("%s has %d particles, the training %d: particle keys not recorded", star_path,
                        len(keys), n_particles)
            keys = None
    folder.write_particle_keys(keys)


def _with_occurrence(keys: np.ndarray) -> pd.MultiIndex:
    """(key, how many times it came before): repeated keys pair in order of appearance."""
    s = pd.Series(np.asarray(keys, dtype=object))
    return pd.MultiIndex.from_arrays([s.to_numpy(), s.groupby(s, sort=False).cumcount().to_numpy()])


def latent_rows_for(star_meta, train_folder, n_ops: int = 1, n_latent_rows: int | None = None) -> np.ndarray | None:
    """The training particle row of each row of ``star_meta`` ``(len(star_meta),)`` int64: its
    latent rows are ``row * n_ops + s``. Matched by particle key: the same particles in the
    same order give ``arange``, in another order the permutation, a subset their rows; None
    when some star particle is not in the training (the caller encodes it or refuses). A run
    without recorded keys (older runs) is paired by position when the counts agree (warning),
    else None. ``n_latent_rows``: rows of the latents to pair with (default: ``latent.npy``'s)."""
    folder = train_folder if isinstance(train_folder, TrainFolder) else TrainFolder(train_folder)
    n_ops = max(1, int(n_ops))
    n = len(star_meta)
    if n_latent_rows is None:
        n_latent_rows = int(folder.read_latents(mmap=True).shape[0])
    train_keys = folder.read_particle_keys()
    if train_keys is None:
        if n * n_ops != n_latent_rows:
            return None
        log.warning("%s predates particle keys: the %d particles of %s are paired with the latents by row "
                    "position; give the star the model was trained on, in its order (or retrain)",
                    folder.folder, n, star_meta.source)
        return np.arange(n, dtype=np.int64)
    if len(train_keys) * n_ops != n_latent_rows:
        raise InputError(f"--train {folder.folder}: {len(train_keys)} recorded particle keys x {n_ops} symmetry "
                         f"operator(s) but {n_latent_rows} latent rows; the training folder is inconsistent, "
                         "retrain into a new folder")
    kind = "id" if train_keys.size and str(train_keys[0]).startswith("id:") else "image"
    if kind == "id" and "rlnGmmhetParticleId" not in star_meta.particles.columns:
        return None
    star_keys = star_meta.particle_keys(kind)
    if np.array_equal(star_keys, train_keys):
        return np.arange(n, dtype=np.int64)
    rows = _with_occurrence(train_keys).get_indexer(_with_occurrence(star_keys))
    if n == 0 or (rows < 0).any():
        return None
    rows = rows.astype(np.int64)
    what = ("the training's particles in another order" if n == len(train_keys)
            else f"{n} of the training's {len(train_keys)} particles")
    log.info("%s: %s; rows matched by particle identity (%s)", star_meta.source, what,
             "Scipion particle id" if kind == "id" else "image")
    return rows


def latents_for(z: np.ndarray, rows: np.ndarray, n_ops: int = 1) -> np.ndarray:
    """The latent rows of training particle rows ``rows`` (all ``n_ops`` operators each, in the
    order ``row * n_ops + s``) from ``z`` ``(n_particles * n_ops, K)``."""
    rows = np.asarray(rows, dtype=np.int64)
    n_ops = max(1, int(n_ops))
    if n_ops == 1 and np.array_equal(rows, np.arange(len(z))):
        return z
    return np.asarray(z).reshape(-1, n_ops, z.shape[-1])[rows].reshape(-1, z.shape[-1])
