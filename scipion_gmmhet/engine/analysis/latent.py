"""Latent-space analysis: embeddings, clustering, maps from the model, motions, reproducibility.

Everything is keyed by particle row: ``latents[i]`` is the latent vector of star row ``i``
(``train_dir/latent.npy``), ``labels[i]`` its cluster, ``embedding[i]`` its 2-D point.

The model is any object with the interface of :class:`training.trained.TrainedModel`: ``zdim``,
``neutral`` (:class:`gmm.GMM`), ``decode(z (B, K) tensor) -> (centers_A (B, N, 3),
amplitudes (B, N), sigmas_A (B, N))`` and ``gmm_at(z (K,)) -> GMM``.

- Embeddings: :func:`fit_pca` (sklearn PCA kept whole: ``inverse_transform`` maps a point or a
  principal direction back to latent space, hence to Gaussian motions through the decoder),
  :func:`embedding.umap_embedding` (optional; the package's one UMAP setting).
- Clustering in the latent space (not in an embedding): :func:`cluster_latents` with k-means
  or a Gaussian mixture; clusters are numbered by decreasing size; each has its centre and the
  on-data particle nearest to it.
- Trajectories: :func:`pc_trajectory` (cryoDRGN's pc traversal: evenly spaced points along one
  principal component between its 5th and 95th percentiles, the other components at 0, i.e. at
  the latent mean), :func:`direction_trajectory` for any direction through the origin.
- :func:`gaussian_displacements` between two latent points (written as ChimeraX markers or
  arrows by :mod:`io.chimerax`).
- :func:`domain_motion`: the unit latent direction ``v`` maximising the generalised Rayleigh
  quotient ``v' M_in v / v' (M_out + eps I) v`` with ``M = mean_z J(z)' J(z)`` the decoder's
  position Jacobian restricted to Gaussians inside (``M_in``) or outside (``M_out``) a domain
  mask, averaged over latent points drawn from the data (central finite differences, so it
  works for any decoder). The top generalised eigenvector is the motion of that domain that
  moves the rest least.
- :func:`match_clusters` / :func:`even_odd_report`: the paper's reproducibility test: clusters
  of two independent trainings (even/odd halves) matched by their maps (Hungarian assignment on
  the area under the FSC curve), with matched-cluster FSC and population agreement.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..io.atomic import atomic_path
from ..errors import InputError
from .embedding import check_latents
from ..model.fourier import fsc_table, resolution_at_threshold

log = logging.getLogger(__name__)

METHODS = ("kmeans", "gmm")


# ----------------------------------------------------------------------------- embeddings
def fit_pca(latents):
    """sklearn PCA with all ``K`` components fitted on the latents. ``pca.transform(z)`` gives
    the embedding (column j = PC j+1), ``pca.inverse_transform(p)`` maps PC coordinates back to
    latent points, ``pca.components_[j]`` is PC j+1 as a latent direction (unit norm)."""
    from sklearn.decomposition import PCA
    z = check_latents(latents)
    return PCA(n_components=z.shape[1], svd_solver="full").fit(z)


# ----------------------------------------------------------------------------- clustering
@dataclass
class Clustering:
    """``labels`` ``(N,)`` int (0..k-1, by decreasing cluster size), ``centers`` ``(k, K)``
    latent centres, ``nearest_rows`` ``(k,)`` the particle row nearest each centre, ``sizes``."""

    labels: np.ndarray
    centers: np.ndarray
    nearest_rows: np.ndarray
    sizes: np.ndarray
    method: str


def nearest_rows(latents, points) -> np.ndarray:
    """Row of the latent point nearest each of ``points`` ``(M, K)`` (chunked, O(N) memory)."""
    z = np.asarray(latents, dtype=np.float64)
    p = np.atleast_2d(np.asarray(points, dtype=np.float64))
    best = np.full(p.shape[0], np.inf)
    arg = np.zeros(p.shape[0], dtype=np.int64)
    step = max(1, 4_000_000 // max(1, p.shape[0] * p.shape[1]))
    for s in range(0, z.shape[0], step):
        d = ((z[s:s + step, None, :] - p[None]) ** 2).sum(-1)  # (n, M)
        i = d.argmin(0)
        v = d[i, np.arange(p.shape[0])]
        better = v < best
        best[better], arg[better] = v[better], i[better] + s
    return arg


WHITEN_MIN_VARIANCE = 0.05  #: principal components below this fraction of variance are dropped


def whitened_principal_components(latents) -> np.ndarray:
    """The latents' principal components that explain at least 5% of the variance, each scaled
    to unit variance. A wide conformational motion then no longer outweighs a small
    compositional gap along another direction (k-means would cut the motion in half), while
    noise-only directions are left out instead of being amplified."""
    from sklearn.decomposition import PCA
    z = check_latents(latents)
    pca = PCA(whiten=True).fit(z)
    keep = max(1, int(np.sum(pca.explained_variance_ratio_ >= WHITEN_MIN_VARIANCE)))
    return pca.transform(z)[:, :keep]


def cluster_latents(latents, k: int, method: str = "kmeans", seed: int = 0, whiten: bool = False) -> Clustering:
    """k-means (``method='kmeans'``) or full-covariance Gaussian-mixture (``'gmm'``) clustering
    of the latents into ``k`` clusters (sklearn, seeded, 10 restarts). With ``whiten`` the
    clustering runs on :func:`whitened_principal_components` and each centre is the mean latent
    of its cluster. Clusters are renumbered by decreasing size."""
    z = check_latents(latents)
    space = whitened_principal_components(z) if whiten else z
    if method not in METHODS:
        raise InputError(f"clustering method {method!r}: use one of {', '.join(METHODS)}")
    if not 1 <= int(k) <= z.shape[0]:
        raise InputError(f"number of clusters {k}: must be between 1 and the number of particles "
                         f"({z.shape[0]})")
    k = int(k)
    if method == "kmeans":
        from sklearn.cluster import KMeans
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(space)
        labels, centers = km.labels_, km.cluster_centers_
    else:
        from sklearn.mixture import GaussianMixture
        gm = GaussianMixture(n_components=k, covariance_type="full", n_init=5, random_state=seed,
                             reg_covar=1e-6 * max(1e-12, float(space.var(axis=0).mean()))).fit(space)
        labels, centers = gm.predict(space), gm.means_
    if whiten:
        centers = np.stack([z[labels == c].mean(axis=0) if np.any(labels == c) else z.mean(axis=0)
                            for c in range(k)])
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    labels = remap[labels]
    centers = np.asarray(centers)[order]
    sizes = sizes[order]
    return Clustering(labels.astype(np.int64), centers.astype(np.float32), nearest_rows(z, centers),
                      sizes.astype(np.int64), method)


# ----------------------------------------------------------------------------- trajectories
def pc_trajectory(pca, latents, pc: int, n_steps: int = 10, lo_pct: float = 5.0,
                  hi_pct: float = 95.0) -> tuple[np.ndarray, np.ndarray]:
    """Latent points ``(n_steps, K)`` along principal component ``pc`` (1-based) between the
    ``lo_pct`` and ``hi_pct`` percentiles of the data's PC coordinate, the other components at
    0 (cryoDRGN's pc traversal); also returns the PC coordinates ``(n_steps,)``."""
    z = check_latents(latents)
    if not 1 <= pc <= pca.n_components_:
        raise InputError(f"PC{pc}: the latent space has {pca.n_components_} principal components")
    coord = pca.transform(z)[:, pc - 1]
    t = np.linspace(np.percentile(coord, lo_pct), np.percentile(coord, hi_pct), int(n_steps))
    p = np.zeros((t.size, pca.n_components_))
    p[:, pc - 1] = t
    return pca.inverse_transform(p).astype(np.float32), t


def direction_trajectory(latents, direction, n_steps: int = 10, lo_pct: float = 5.0,
                         hi_pct: float = 95.0) -> tuple[np.ndarray, np.ndarray]:
    """Points ``t * v`` (a line through the latent origin, ``v`` the unit ``direction``) with
    ``t`` evenly spaced between percentiles of the data's projections ``z . v``."""
    z = check_latents(latents)
    v = np.asarray(direction, dtype=np.float64)
    v = v / np.linalg.norm(v)
    proj = z @ v
    t = np.linspace(np.percentile(proj, lo_pct), np.percentile(proj, hi_pct), int(n_steps))
    return (t[:, None] * v[None]).astype(np.float32), t


def render_at(model, points, box: int | None = None, apix: float | None = None) -> list[np.ndarray]:
    """Maps ``(D, D, D)`` of the decoded GMM at each latent point of ``points`` ``(M, K)``."""
    pts = np.atleast_2d(np.asarray(points, dtype=np.float32))
    box = box or model.neutral.box
    apix = apix or model.neutral.apix
    return [model.gmm_at(torch.as_tensor(p)).render(box, apix) for p in pts]


# ----------------------------------------------------------------------------- motions
def _decode_centers(model, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(z)[0].double()


def gaussian_displacements(model, z0, z1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-Gaussian motion from latent point ``z0`` to ``z1``: ``(centers_A at z0 (N, 3),
    displacement_A (N, 3), amplitude change (N,))``."""
    z = torch.as_tensor(np.stack([np.asarray(z0, np.float32), np.asarray(z1, np.float32)]))
    with torch.no_grad():
        c, a, _ = model.decode(z)
    c, a = c.double().cpu().numpy(), a.double().cpu().numpy()
    return c[0], c[1] - c[0], a[1] - a[0]


def gaussians_in_mask(centers_A: np.ndarray, mask: np.ndarray, apix: float, threshold: float = 0.5) -> np.ndarray:
    """``(N,)`` bool: Gaussians whose centre's nearest voxel of ``mask`` ``[z, y, x]`` is above
    ``threshold`` (centres in Angstrom from the centre voxel ``D//2``)."""
    D = mask.shape[0]
    ijk = np.rint(np.asarray(centers_A, np.float64) / apix).astype(np.int64) + D // 2
    inside = ((ijk >= 0) & (ijk < D)).all(axis=1)
    out = np.zeros(len(ijk), dtype=bool)
    i = ijk[inside]
    out[inside] = mask[i[:, 2], i[:, 1], i[:, 0]] > threshold
    return out


@dataclass
class DomainMotion:
    """The latent ``direction`` (unit, ``(K,)``) moving the masked domain most and the rest least;
    ``ratio`` its Rayleigh quotient (in-mask / out-of-mask mean squared motion per unit latent
    step); ``in_mask`` the Gaussians of the domain; ``rms_in_A``/``rms_out_A`` the RMS
    Gaussian motion in/out of the mask per unit step along ``direction``."""

    direction: np.ndarray
    ratio: float
    in_mask: np.ndarray
    rms_in_A: float
    rms_out_A: float


def domain_motion(model, latents, in_mask: np.ndarray, n_samples: int = 256, step: float | None = None,
                  eps: float = 1e-3, seed: int = 0, batch: int = 64) -> DomainMotion:
    """See the module docstring. ``in_mask`` ``(N,)`` bool over the model's Gaussians (see
    :func:`gaussians_in_mask`); latent points are ``n_samples`` rows drawn from ``latents``;
    ``step`` is the finite-difference step (default 1e-3 of the latents' RMS norm); ``eps``
    regularises ``M_out`` by ``eps * trace(M_out)/K``."""
    from scipy.linalg import eigh
    z = check_latents(latents)
    in_mask = np.asarray(in_mask, dtype=bool)
    if not in_mask.any():
        raise InputError("domain mask: selects no Gaussian; draw the mask over the domain of interest")
    if in_mask.all():
        raise InputError("domain mask: selects every Gaussian; a domain mask must leave some out")
    K = z.shape[1]
    rng = np.random.default_rng(seed)
    zs = z[rng.choice(z.shape[0], min(n_samples, z.shape[0]), replace=False)]
    h = step or 1e-3 * max(1e-6, float(np.sqrt((z ** 2).sum(1).mean())))
    sel_in = torch.as_tensor(in_mask)
    M_in = np.zeros((K, K))
    M_out = np.zeros((K, K))
    for s in range(0, zs.shape[0], batch):
        zb = torch.as_tensor(zs[s:s + batch], dtype=torch.float32)
        B = zb.shape[0]
        eye = torch.eye(K, dtype=torch.float32) * h
        zp = (zb[:, None, :] + eye[None]).reshape(-1, K)
        zm = (zb[:, None, :] - eye[None]).reshape(-1, K)
        J = (_decode_centers(model, zp) - _decode_centers(model, zm)) / (2 * h)  # (B*K, N, 3)
        J = J.reshape(B, K, -1, 3)
        Jin = J[:, :, sel_in].reshape(B, K, -1)
        Jout = J[:, :, ~sel_in].reshape(B, K, -1)
        M_in += torch.einsum("bkn,bln->kl", Jin, Jin).numpy()
        M_out += torch.einsum("bkn,bln->kl", Jout, Jout).numpy()
    n_in, n_out = int(in_mask.sum()), int((~in_mask).sum())
    M_in /= zs.shape[0] * n_in
    M_out /= zs.shape[0] * n_out
    reg = eps * max(1e-30, np.trace(M_out) / K)
    w, V = eigh(M_in, M_out + reg * np.eye(K))
    v = V[:, -1] / np.linalg.norm(V[:, -1])
    # sign: point along the data's larger spread (a convention, so runs are comparable)
    if np.mean(np.sign(z @ v) * np.abs(z @ v) ** 3) < 0:
        v = -v
    rms_in = float(np.sqrt(v @ M_in @ v))
    rms_out = float(np.sqrt(v @ M_out @ v))
    return DomainMotion(v.astype(np.float32), float(w[-1]), in_mask, rms_in, rms_out)


# ----------------------------------------------------------------------------- ChimeraX files
# ----------------------------------------------------------------------------- reproducibility
def fsc_area(map1: np.ndarray, map2: np.ndarray, apix: float) -> float:
    """Mean FSC over shells 1..Nyquist (the area under the curve, normalised to 1)."""
    return float(fsc_table(map1, map2, apix)["fsc"][1:].mean())


def match_clusters(maps_a: list, maps_b: list, apix: float) -> dict:
    """Match the clusters of two analyses by their maps: Hungarian assignment maximising the
    summed FSC area. Returns ``pairs`` [(i_a, i_b)], ``score`` (k_a x k_b FSC areas) and per
    pair the FSC 0.5 resolution."""
    from scipy.optimize import linear_sum_assignment
    if not maps_a or not maps_b:
        raise InputError("cluster maps: none to match")
    score = np.array([[fsc_area(a, b, apix) for b in maps_b] for a in maps_a])
    ia, ib = linear_sum_assignment(-score)
    res = []
    for i, j in zip(ia, ib):
        t = fsc_table(maps_a[i], maps_b[j], apix)
        res.append(resolution_at_threshold(t["freq_invA"], t["fsc"], 0.5))
    return {"pairs": [(int(i), int(j)) for i, j in zip(ia, ib)], "score": score,
            "fsc_area": [float(score[i, j]) for i, j in zip(ia, ib)], "resolution_05_A": res}


def even_odd_report(model_a, latents_a, model_b, latents_b, k: int, method: str = "kmeans", seed: int = 0,
                    box: int | None = None, apix: float | None = None) -> dict:
    """The paper's even/odd test: cluster each half's latents independently into ``k``, render
    each cluster centre's GMM, match clusters across halves (:func:`match_clusters`) and compare
    populations. Returns a JSON-ready dict: per matched pair the FSC area, the FSC 0.5
    resolution, both populations (fractions) and their difference; and the largest
    population difference."""
    box = box or model_a.neutral.box
    apix = apix or model_a.neutral.apix
    ca = cluster_latents(latents_a, k, method, seed)
    cb = cluster_latents(latents_b, k, method, seed)
    maps_a = render_at(model_a, ca.centers, box, apix)
    maps_b = render_at(model_b, cb.centers, box, apix)
    m = match_clusters(maps_a, maps_b, apix)
    fa = ca.sizes / ca.sizes.sum()
    fb = cb.sizes / cb.sizes.sum()
    pairs = []
    for (i, j), area, res in zip(m["pairs"], m["fsc_area"], m["resolution_05_A"]):
        pairs.append({"cluster_a": i, "cluster_b": j, "fsc_area": area, "fsc05_resolution_A": res,
                      "population_a": float(fa[i]), "population_b": float(fb[j]),
                      "population_diff": float(abs(fa[i] - fb[j]))})
    return {"k": int(k), "method": method, "pairs": pairs,
            "max_population_diff": float(max(p["population_diff"] for p in pairs)),
            "min_fsc_area": float(min(p["fsc_area"] for p in pairs)),
            "score_matrix": m["score"].round(4).tolist()}


# ----------------------------------------------------------------------------- label agreement
def population_errors(labels: np.ndarray, truth: np.ndarray) -> dict:
    """Match predicted clusters to truth classes (Hungarian on the contingency table) and
    return per truth class the true and predicted population (fractions) and their absolute
    difference, plus the adjusted Rand index. Rows of both arrays are the same particles."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score
    labels, truth = np.asarray(labels), np.asarray(truth)
    tl, ti = np.unique(truth, return_inverse=True)
    pl, pi = np.unique(labels, return_inverse=True)
    table = np.zeros((tl.size, pl.size), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    r, c = linear_sum_assignment(-table)
    n = labels.size
    out = {"ari": float(adjusted_rand_score(truth, labels)), "classes": []}
    for i, j in zip(r, c):
        out["classes"].append({"truth": tl[i].item(), "cluster": pl[j].item(),
                               "truth_fraction": float(table[i].sum() / n),
                               "cluster_fraction": float(table[:, j].sum() / n),
                               "abs_diff": float(abs(table[i].sum() - table[:, j].sum()) / n)})
    out["max_abs_diff"] = max(cl["abs_diff"] for cl in out["classes"])
    return out


# ----------------------------------------------------------------------------- plots (Agg)
def _figure(w=6.0, h=5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_clusters_png(path: str, xy: np.ndarray, labels: np.ndarray, centers_xy: np.ndarray | None = None,
                      axis_labels=("", ""), title: str = "", max_points: int = 50_000, seed: int = 0) -> str:
    """Embedding ``xy`` ``(N, 2)`` coloured by cluster ``labels`` with the centres labelled."""
    import matplotlib
    fig = _figure()
    ax = fig.add_subplot(111)
    n = len(xy)
    idx = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, False))
    uniq = np.unique(labels)
    cmap = matplotlib.colormaps["tab10" if uniq.size <= 10 else "tab20"]
    s = float(np.clip(2e4 / max(1, idx.size), 1, 20))
    for i, lab in enumerate(uniq):
        sel = idx[labels[idx] == lab]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=cmap(i % cmap.N), alpha=0.6, linewidths=0,
                   label=f"{int(lab) + 1} ({int((labels == lab).sum())})")
    if centers_xy is not None:
        for i, (cx, cy) in enumerate(np.atleast_2d(centers_xy)[:, :2]):
            ax.scatter([cx], [cy], marker="X", s=120, color="k", edgecolors="w")
            ax.annotate(str(i + 1), (cx, cy), xytext=(4, 4), textcoords="offset points", fontweight="bold")
    if uniq.size <= 20:
        ax.legend(title="cluster (size)", fontsize="small", markerscale=2)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title or f"{n} particles")
    return _save_png(fig, path)


def plot_fsc_png(path: str, tables: dict, title: str = "FSC") -> str:
    """FSC curves (``{label: fsc_table}``) against spatial frequency, with 0.143 and 0.5 lines."""
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot(111)
    for label, t in tables.items():
        ax.plot(t["freq_invA"], t["fsc"], lw=1.5, label=str(label))
    for thr in (0.143, 0.5):
        ax.axhline(thr, color="grey", ls="--", lw=0.8)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def plot_quiver_png(path: str, centers_A: np.ndarray, displacement_A: np.ndarray, title: str = "") -> str:
    """Per-Gaussian displacements as arrows, projected on the xy, xz and yz planes (Angstrom
    from the box centre), coloured by their length."""
    fig = _figure(15.0, 5.0)
    c = np.asarray(centers_A, np.float64)
    d = np.asarray(displacement_A, np.float64)
    length = np.linalg.norm(d, axis=1)
    for i, (a, b, name) in enumerate(((0, 1, "xy"), (0, 2, "xz"), (1, 2, "yz"))):
        ax = fig.add_subplot(1, 3, i + 1)
        q = ax.quiver(c[:, a], c[:, b], d[:, a], d[:, b], length, angles="xy", scale_units="xy", scale=1.0,
                      cmap="viridis", width=0.004)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{name[0]} (A)")
        ax.set_ylabel(f"{name[1]} (A)")
        ax.set_title(f"{title} ({name})" if title else name)
        if i == 2:
            fig.colorbar(q, ax=ax).set_label("displacement (A)")
    return _save_png(fig, path)


def safe_resolution(table: dict, threshold: float) -> float:
    r = resolution_at_threshold(table["freq_invA"], table["fsc"], threshold)
    return float(r) if math.isfinite(r) else float("nan")
