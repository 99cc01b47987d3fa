"""2-D embeddings of latent vectors that need no torch: the one UMAP setting of the package.

:func:`umap_embedding` is what ``gmmhet analyze --embedding umap`` writes and what the viewers
draw (``scipion_gmmhet.viewers.plots.embed_latents``), so the cluster protocol and the training
viewer show the same UMAP of the same latents: ``n_neighbors`` :data:`UMAP_NEIGHBORS`,
``min_dist`` :data:`UMAP_MIN_DIST`, seeded (``random_state``), fitted on at most
:data:`UMAP_FIT_MAX` points (a seeded subset) and the rest transformed.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

UMAP_NEIGHBORS = 30
UMAP_MIN_DIST = 0.1
UMAP_FIT_MAX = 50_000


def check_latents(latents) -> np.ndarray:
    """``latents`` as a float64 ``(N, K)`` array (a vector is one column); InputError unless
    N >= 2 and every value is finite."""
    z = np.asarray(latents, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise InputError(f"latents: expected an (N, K) array with N >= 2, got shape {z.shape}; "
                         "give the latent.npy of a finished training")
    if not np.isfinite(z).all():
        raise InputError("latents: contain NaN or Inf values; the training diverged, retrain it")
    return z


def umap_embedding(latents, n_neighbors: int = UMAP_NEIGHBORS, min_dist: float = UMAP_MIN_DIST, seed: int = 0,
                   fit_max: int = UMAP_FIT_MAX, n_components: int = 2) -> np.ndarray:
    """``(N, n_components)`` float32 UMAP embedding (umap-learn, ``random_state=seed``). With
    more than ``fit_max`` points, UMAP is fitted on a seeded random subset and the rest
    transformed."""
    import umap  # slow import (numba): only when asked for
    z = check_latents(latents).astype(np.float32)
    n = z.shape[0]
    if n < 5:
        raise InputError(f"latents: {n} points; UMAP needs at least 5 (use --embedding pca)")
    reducer = umap.UMAP(n_components=n_components, n_neighbors=int(min(n_neighbors, n - 1)), min_dist=min_dist,
                        random_state=seed)
    if n <= fit_max:
        return np.asarray(reducer.fit_transform(z), dtype=np.float32)
    fit_rows = np.sort(np.random.default_rng(seed).choice(n, fit_max, replace=False))
    reducer.fit(z[fit_rows])
    out = np.empty((n, n_components), dtype=np.float32)
    out[fit_rows] = reducer.embedding_
    rest = np.setdiff1d(np.arange(n), fit_rows)
    for s in range(0, rest.size, 100_000):
        out[rest[s:s + 100_000]] = reducer.transform(z[rest[s:s + 100_000]])
    return out
