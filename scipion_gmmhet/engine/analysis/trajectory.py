"""1-D trajectories along the data manifold of the latent space (continuous motions).

A principal component is a straight line through the latent cloud; a continuous motion is
usually a curved path, and with more latent dimensions than the motion has, the leading
direction can mix the motion with noise. :func:`manifold_coordinate` orders the particles
along the data itself, as cryoDRGN's graph traversal and RECOVAR's paths do:

1. landmarks: at most ``max_landmarks`` particles drawn at random (seeded);
2. a symmetric k-nearest-neighbour graph of the landmarks (``n_neighbors``; default
   :func:`default_neighbors`: 1/30 of the landmarks, at least 15) in the latent
   space (the decoder's metric, no whitening: directions that carry no signal stay small),
   weighted by a self-tuning Gaussian kernel ``exp(-d_ij^2 / (s_i s_j))`` (``s_i``: distance to
   the i-th landmark's k-th neighbour);
3. the diffusion map with density normalisation (alpha = 1, Coifman & Lafon 2006) of the
   largest connected component: its first non-trivial eigenvector is the slowest direction of
   diffusion on the data, the long axis of the manifold even when the cloud is thick;
4. every particle gets the kernel-weighted mean of its nearest landmarks' values (Nystrom-like
   extension), oriented to increase with PC1 and scaled to [0, 1] between the 1st and 99th
   percentiles (clipped).

:func:`trajectory_points` gives ``n_steps`` latent points along the path: the mean latent of
the particles in each of ``n_steps`` equal-count bins of the coordinate, so maps along it are
maps of states that are in the data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """``coordinate`` ``(N,)`` in [0, 1] per particle; ``eigenvalues`` of the diffusion operator
    (first two non-trivial); ``n_landmarks``; ``component_fraction`` the landmarks in the largest
    connected component of the graph; ``spearman_pc1`` the coordinate's rank correlation with PC1."""

    coordinate: np.ndarray
    eigenvalues: tuple
    n_landmarks: int
    component_fraction: float
    spearman_pc1: float

    def summary(self) -> dict:
        return {"method": "diffusion map of the kNN graph (alpha 1), first non-trivial eigenvector",
                "eigenvalues": [round(float(v), 5) for v in self.eigenvalues], "n_landmarks": self.n_landmarks,
                "component_fraction": round(self.component_fraction, 4),
                "spearman_pc1": round(self.spearman_pc1, 4)}


def _kernel_graph(x: np.ndarray, k: int):
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors
    d, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    s = np.maximum(d[:, -1], 1e-12)
    rows = np.repeat(np.arange(len(x)), k)
    cols = idx[:, 1:].reshape(-1)
    w = np.exp(-d[:, 1:].reshape(-1) ** 2 / (s[rows] * s[cols]))
    W = sparse.csr_matrix((w, (rows, cols)), shape=(len(x), len(x)))
    return W.maximum(W.T), s


def default_neighbors(n_landmarks: int) -> int:
    """The graph's neighbours: 1/30 of the landmarks (100 of 3,000), at least 15. A thick
    curved cloud (a swinging arm bent into a half circle by the KL prior) has two nearly equal
    slow diffusion modes, along and across, at 15 neighbours, and the first eigenvector then
    mixes them; a wider kernel separates them. |Spearman| with the truth on the simulator's
    arm (4 trained networks), 15 -> 100 neighbours: 0.849 -> 0.972, 0.974 -> 0.965, 0.977 ->
    0.978, 0.975 -> 0.978; 1AKE hinge and the mixed set's compositions unchanged or +0.002
    (benchmarks/results/science3_init_width.md)."""
    return max(15, int(n_landmarks) // 30)


def manifold_coordinate(latents, n_neighbors: int | None = None, max_landmarks: int = 3000,
                        seed: int = 0) -> Trajectory:
    """See the module docstring. ``latents`` ``(N, K)``; returns a :class:`Trajectory`."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import eigsh
    from scipy.stats import spearmanr
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(latents, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] < 10 or not np.isfinite(z).all():
        raise InputError(f"latents: need an (N, K) finite array with N >= 10 for a trajectory, got {z.shape}")
    z = z - z.mean(0)
    scale = float(np.sqrt((z ** 2).sum(1).mean())) or 1.0
    z = z / scale
    rng = np.random.default_rng(seed)
    n = z.shape[0]
    lm = np.sort(rng.choice(n, min(n, int(max_landmarks)), replace=False))
    x = z[lm]
    if n_neighbors is None:
        n_neighbors = default_neighbors(len(x))
    k = int(min(max(2, n_neighbors), len(x) - 2))
    W, _ = _kernel_graph(x, k)
    n_comp, comp = connected_components(W, directed=False)
    main = np.flatnonzero(comp == np.bincount(comp).argmax())
    Wm = W[main][:, main]
    q = np.asarray(Wm.sum(1)).ravel()
    Wa = sparse.diags(1.0 / q) @ Wm @ sparse.diags(1.0 / q)  # alpha = 1: remove the density
    dgr = np.asarray(Wa.sum(1)).ravel()
    Dm = sparse.diags(1.0 / np.sqrt(dgr))
    M = Dm @ Wa @ Dm
    n_eig = min(3, len(main) - 1)
    vals, vecs = eigsh(M, k=n_eig, which="LA", v0=np.sqrt(dgr) / np.linalg.norm(np.sqrt(dgr)))
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    psi = vecs[:, 1] / np.sqrt(dgr)  # first non-trivial right eigenvector
    # extend to every particle through the kernel weights to its nearest main-component landmarks
    nn = NearestNeighbors(n_neighbors=min(k, len(main))).fit(x[main])
    d, idx = nn.kneighbors(z)
    w = np.exp(-(d / np.maximum(d[:, -1:], 1e-12)) ** 2)
    coord = (w * psi[idx]).sum(1) / w.sum(1)
    pc1 = z @ np.linalg.svd(z[lm], full_matrices=False)[2][0]
    rho = float(spearmanr(coord, pc1).correlation)
    if rho < 0:
        coord, rho = -coord, -rho
    lo, hi = np.percentile(coord, [1, 99])
    coord = np.clip((coord - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return Trajectory(coord.astype(np.float32), tuple(float(v) for v in vals[1:3]), int(len(lm)),
                      float(len(main) / len(lm)), rho)


def trajectory_points(latents, coordinate, n_steps: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(points (n_steps, K), t (n_steps,))``: the mean latent of the particles in each of
    ``n_steps`` equal-count bins of ``coordinate`` and the bins' median coordinate."""
    z = np.asarray(latents, dtype=np.float64)
    c = np.asarray(coordinate, dtype=np.float64)
    if n_steps < 2 or len(c) < n_steps:
        raise InputError(f"--traj-steps {n_steps}: need at least 2 steps and as many particles")
    order = np.argsort(c, kind="stable")
    bins = np.array_split(order, n_steps)
    pts = np.stack([z[b].mean(0) for b in bins])
    return pts.astype(np.float32), np.array([np.median(c[b]) for b in bins])


def plot_coordinate_png(path: str, xy: np.ndarray, coordinate: np.ndarray, path_xy: np.ndarray | None = None,
                        axis_labels=("", ""), title: str = "", max_points: int = 50_000, seed: int = 0) -> str:
    """Embedding ``xy`` ``(N, 2)`` coloured by the trajectory ``coordinate`` (0-1), with the
    trajectory's points ``path_xy`` joined in order."""
    from .latent import _figure, _save_png
    fig = _figure()
    ax = fig.add_subplot(111)
    n = len(xy)
    idx = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, False))
    sc = ax.scatter(xy[idx, 0], xy[idx, 1], c=np.asarray(coordinate)[idx], cmap="viridis", vmin=0, vmax=1,
                    s=float(np.clip(2e4 / max(1, idx.size), 1, 20)), alpha=0.7, linewidths=0)
    fig.colorbar(sc, ax=ax, label="trajectory coordinate")
    if path_xy is not None:
        ax.plot(path_xy[:, 0], path_xy[:, 1], "-o", color="k", ms=4, lw=1.5)
        ax.annotate("start", path_xy[0, :2], xytext=(4, 4), textcoords="offset points", fontweight="bold")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title or f"{n} particles along the trajectory")
    return _save_png(fig, path)
