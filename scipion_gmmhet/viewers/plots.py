"""Headless plots shared by the gmmhet viewers: latent-space embeddings (scatter and hexbin
density, coloured by a per-particle value or by labels), training/validation loss curves and
FSC curves.

Two layers, so the same drawing serves a PNG report and Scipion's interactive windows:

- ``draw_*(ax, ...)`` draw on a given matplotlib ``Axes`` (e.g. one from
  ``pyworkflow.gui.plotter.Plotter.createSubPlot``) and return it;
- ``plot_*(..., out_png)`` build their own ``matplotlib.figure.Figure`` with an Agg canvas
  (never ``pyplot``, so the process-wide backend, Tk in the Scipion GUI, is left alone), save
  the PNG atomically (``out_png + '.tmp'`` then ``os.replace``) and return ``out_png``.

Nothing here imports pyworkflow or pwem: this module is tested by plain pytest
(``tests/test_plots.py``). Inputs are keyed by row: ``xy[i]``, ``values[i]`` and ``labels[i]``
belong to the same particle; callers build them from one table, never by pairing lists.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scipion_gmmhet.engine.io.outputs import read_loss_csv  # absolute: plots.py also loads standalone

__all__ = [
    "embed_latents", "read_loss_csv",
    "draw_scatter", "draw_hexbin", "draw_loss", "draw_fsc",
    "plot_scatter", "plot_hexbin", "plot_embedding", "plot_loss_curves", "plot_fsc_curves",
]

#: Above this many points a scatter plot is drawn from a random subset (the hexbin panel
#: always uses every point), so a million-particle plot renders in seconds.
MAX_SCATTER_POINTS = 100_000
DEFAULT_DPI = 100


# --------------------------------------------------------------------------- data helpers
def embed_latents(z: np.ndarray, method: str = "pca", n_components: int = 2,
                  seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """2-D (or ``n_components``-D) embedding of latent vectors ``z`` (N x K) for display.

    ``method``: ``'pca'`` (centred, principal axes sorted by variance; axis labels give the
    explained variance) or ``'umap'`` (:func:`scipion_gmmhet.engine.analysis.embedding.umap_embedding`,
    the same setting as ``gmmhet analyze``, seeded). A latent space with
    fewer than ``n_components`` dimensions is padded with zeros. Returns ``(xy, axis_labels)``
    with ``xy`` float32 of shape (N, n_components), row i = row i of ``z``.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError("latents: expected an (N, K) array with N >= 1; got shape %s"
                         % (z.shape,))
    n, k = z.shape
    method = method.lower()
    if method == "pca":
        zc = z - z.mean(axis=0)
        # SVD of the centred data: rows of vt are the principal axes, by decreasing variance
        _, s, vt = np.linalg.svd(zc, full_matrices=False)
        var = s ** 2
        frac = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
        m = min(n_components, vt.shape[0])
        xy = np.zeros((n, n_components))
        xy[:, :m] = zc @ vt[:m].T
        labels = ["PC%d (%.0f%%)" % (i + 1, 100 * frac[i]) if i < m else "PC%d" % (i + 1)
                  for i in range(n_components)]
        return xy.astype(np.float32), labels
    if method == "umap":
        if k < 2 or n < 5:
            # UMAP needs a few points and at least 2 input dimensions; show PCA instead
            return embed_latents(z, "pca", n_components, seed)
        # the engine's one UMAP setting: the same picture as "gmmhet analyze --embedding umap"
        from scipion_gmmhet.engine.analysis.embedding import umap_embedding
        xy = umap_embedding(z, seed=seed, n_components=n_components)
        return np.asarray(xy, dtype=np.float32), ["UMAP%d" % (i + 1)
                                                  for i in range(n_components)]
    raise ValueError("method: unknown embedding %r; use 'pca' or 'umap'" % method)


def _xy(xy) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] == 0:
        raise ValueError("xy: expected an (N, 2) array with N >= 1; got shape %s" % (xy.shape,))
    return xy[:, :2]


def _check_rows(name: str, arr, n: int) -> np.ndarray | None:
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.shape[0] != n:
        raise ValueError("%s: %d rows for %d points; give one value per point"
                         % (name, arr.shape[0], n))
    return arr


def _subset(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


# --------------------------------------------------------------------------- draw on axes
def draw_scatter(ax, xy, values=None, labels=None, value_label: str = "",
                 axis_labels: Sequence[str] = ("", ""), title: str = "",
                 centers=None, cmap: str = "viridis", point_size: float | None = None,
                 max_points: int = MAX_SCATTER_POINTS):
    """Scatter of ``xy`` (N x 2) on ``ax``: coloured by ``values`` (N floats, colour bar) or by
    ``labels`` (N integers/strings, one colour per label with a legend), else one colour.
    ``centers`` (C x 2) are drawn as labelled crosses (cluster centres). Returns ``ax``."""
    xy = _xy(xy)
    n = len(xy)
    values = _check_rows("values", values, n)
    labels = _check_rows("labels", labels, n)
    idx = _subset(n, max_points)
    s = point_size if point_size is not None else float(np.clip(2e4 / len(idx), 1, 20))
    if labels is not None:
        uniq = np.unique(labels[idx])
        cm = _colormap("tab10" if len(uniq) <= 10 else "tab20")
        for i, lab in enumerate(uniq):
            sel = idx[labels[idx] == lab]
            ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=cm(i % cm.N), alpha=0.7,
                       linewidths=0, label="%s (%d)" % (lab, int(np.sum(labels == lab))))
        if len(uniq) <= 20:
            ax.legend(title=value_label or None, fontsize="small", markerscale=2,
                      loc="best", framealpha=0.7)
    elif values is not None:
        v = np.asarray(values, dtype=np.float64)[idx]
        finite = np.isfinite(v)
        order = np.argsort(v[finite])  # high values on top
        sel = idx[finite][order]
        sc = ax.scatter(xy[sel, 0], xy[sel, 1], c=v[finite][order], s=s, cmap=cmap,
                        alpha=0.8, linewidths=0)
        cb = ax.figure.colorbar(sc, ax=ax)
        cb.set_label(value_label)
    else:
        ax.scatter(xy[idx, 0], xy[idx, 1], s=s, color="tab:blue", alpha=0.5, linewidths=0)
    if centers is not None:
        c = np.atleast_2d(np.asarray(centers, dtype=np.float64))[:, :2]
        ax.scatter(c[:, 0], c[:, 1], marker="X", s=120, color="k", edgecolors="w")
        for i, (cx, cy) in enumerate(c):
            ax.annotate(str(i + 1), (cx, cy), xytext=(4, 4), textcoords="offset points",
                        fontweight="bold")
    _decorate(ax, axis_labels, title or ("%d particles" % n))
    return ax


def draw_hexbin(ax, xy, values=None, value_label: str = "",
                axis_labels: Sequence[str] = ("", ""), title: str = "",
                gridsize: int | None = None, cmap: str | None = None):
    """Hexagonal-bin density of ``xy`` (N x 2) on ``ax`` (log counts), or, with ``values``, the
    mean value per bin. Uses every point. Returns ``ax``."""
    xy = _xy(xy)
    n = len(xy)
    values = _check_rows("values", values, n)
    if gridsize is None:
        gridsize = int(np.clip(np.sqrt(n) / 2, 10, 60))
    if values is None:
        hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=gridsize, bins="log", mincnt=1,
                       cmap=cmap or "magma_r")
        label = "particles per bin (log)"
    else:
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        hb = ax.hexbin(xy[ok, 0], xy[ok, 1], C=v[ok], reduce_C_function=np.mean,
                       gridsize=gridsize, mincnt=1, cmap=cmap or "viridis")
        label = "mean %s per bin" % (value_label or "value")
    cb = ax.figure.colorbar(hb, ax=ax)
    cb.set_label(label)
    _decorate(ax, axis_labels, title or "density")
    return ax


def draw_loss(ax, loss: Mapping[str, np.ndarray] | str, title: str = "Training",
              log_y: bool | None = None):
    """Training and validation loss per epoch on ``ax``; ``loss`` is a loss.csv path or a
    mapping with ``epoch``, ``train_loss`` and optionally ``val_loss``. Marks the epoch of
    the lowest validation loss. Returns ``ax``."""
    if isinstance(loss, (str, os.PathLike)):
        loss = read_loss_csv(str(loss))
    if "train_loss" not in loss:
        raise ValueError("loss: no 'train_loss' column; got %s" % sorted(loss))
    train = np.asarray(loss["train_loss"], dtype=np.float64)
    epoch = np.asarray(loss.get("epoch", np.arange(1, len(train) + 1)), dtype=np.float64)
    ax.plot(epoch, train, "o-", ms=3, label="training", color="tab:blue")
    val = loss.get("val_loss")
    if val is not None and np.isfinite(np.asarray(val, dtype=np.float64)).any():
        val = np.asarray(val, dtype=np.float64)
        ax.plot(epoch, val, "s-", ms=3, label="validation", color="tab:orange")
        kept = np.asarray(loss.get("best", []), dtype=np.float64)
        best = int(np.nanargmax(kept)) if kept.size == val.size and np.nansum(kept) > 0 else int(np.nanargmin(val))
        ax.axvline(epoch[best], color="tab:orange", ls=":", lw=1)
        ax.annotate("best val. %.4g\n(epoch %g, model kept)" % (val[best], epoch[best]),
                    (epoch[best], val[best]), xytext=(6, 12), textcoords="offset points",
                    fontsize="small")
    allv = np.concatenate([train, val if val is not None else []]).astype(np.float64)
    allv = allv[np.isfinite(allv)]
    if log_y is None:
        log_y = allv.size > 0 and np.all(allv > 0) and allv.max() / allv.min() > 20
    if log_y:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    _decorate(ax, ("epoch", "loss"), title)
    return ax


def draw_fsc(ax, freq_inv_A, curves: Mapping[str, np.ndarray],
             thresholds: Sequence[float] = (0.143, 0.5), title: str = "FSC"):
    """FSC curves against spatial frequency ``freq_inv_A`` (1/Angstrom) on ``ax``; ``curves``
    maps a legend label to an FSC array of the same length. Horizontal lines at
    ``thresholds``; the top axis reads resolution in Angstrom. Returns ``ax``."""
    f = np.asarray(freq_inv_A, dtype=np.float64)
    if not curves:
        raise ValueError("curves: no FSC curve to plot")
    for label, fsc in curves.items():
        fsc = np.asarray(fsc, dtype=np.float64)
        if fsc.shape != f.shape:
            raise ValueError("FSC %r: %d values for %d frequencies" % (label, fsc.size, f.size))
        ax.plot(f, fsc, lw=1.5, label=str(label))
    for t in thresholds:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.annotate("%g" % t, (f.max() if f.size else 0, t), xytext=(-20, 2),
                    textcoords="offset points", fontsize="small", color="grey")
    ax.set_ylim(min(-0.05, float(np.nanmin([np.nanmin(c) for c in curves.values()]))), 1.05)
    ax.legend(loc="best", fontsize="small")
    _decorate(ax, ("spatial frequency (1/A)", "FSC"), title)

    # resolution in Angstrom on a top axis, at the bottom axis' tick positions
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    ticks = [t for t in ax.get_xticks() if t > 0 and ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    top.set_xticks(ticks)
    top.set_xticklabels(["%.1f" % (1.0 / t) for t in ticks])
    top.set_xlabel("resolution (A)")
    return ax


def _decorate(ax, axis_labels, title):
    ax.set_xlabel(axis_labels[0] if axis_labels else "")
    ax.set_ylabel(axis_labels[1] if axis_labels and len(axis_labels) > 1 else "")
    if title:
        ax.set_title(title)


def _colormap(name: str):
    import matplotlib
    return matplotlib.colormaps[name]


# --------------------------------------------------------------------------- PNG writers
def _new_figure(ncols: int = 1, width_in: float = 5.5, height_in: float = 4.5):
    fig = Figure(figsize=(width_in * ncols, height_in), dpi=DEFAULT_DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, out_png: str, suptitle: str = "") -> str:
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    tmp = out_png + ".tmp"
    fig.savefig(tmp, format="png", dpi=DEFAULT_DPI)
    os.replace(tmp, out_png)
    return out_png


def plot_scatter(xy, out_png: str, values=None, labels=None, value_label: str = "",
                 axis_labels: Sequence[str] = ("", ""), title: str = "", centers=None) -> str:
    """PNG of :func:`draw_scatter`. Returns ``out_png``."""
    fig, (ax,) = _new_figure()
    draw_scatter(ax, xy, values=values, labels=labels, value_label=value_label,
                 axis_labels=axis_labels, title=title, centers=centers)
    return _save(fig, out_png)


def plot_hexbin(xy, out_png: str, values=None, value_label: str = "",
                axis_labels: Sequence[str] = ("", ""), title: str = "") -> str:
    """PNG of :func:`draw_hexbin`. Returns ``out_png``."""
    fig, (ax,) = _new_figure()
    draw_hexbin(ax, xy, values=values, value_label=value_label, axis_labels=axis_labels,
                title=title)
    return _save(fig, out_png)


def plot_embedding(xy, out_png: str, values=None, labels=None, value_label: str = "",
                   axis_labels: Sequence[str] = ("", ""), title: str = "",
                   centers=None) -> str:
    """Two panels side by side: the scatter (coloured by ``values`` or ``labels``) and the
    hexbin density of the same 2-D embedding. Returns ``out_png``."""
    fig, (a1, a2) = _new_figure(ncols=2)
    colour = (" coloured by %s" % value_label) if value_label else ""
    draw_scatter(a1, xy, values=values, labels=labels, value_label=value_label,
                 axis_labels=axis_labels, title="%d particles%s" % (len(xy), colour),
                 centers=centers)
    draw_hexbin(a2, xy, axis_labels=axis_labels, title="density")
    if centers is not None:
        c = np.atleast_2d(np.asarray(centers, dtype=np.float64))
        a2.scatter(c[:, 0], c[:, 1], marker="X", s=100, color="c", edgecolors="k")
    return _save(fig, out_png, suptitle=title)


def plot_loss_curves(loss: Mapping[str, np.ndarray] | str, out_png: str,
                     title: str = "Training and validation loss") -> str:
    """PNG of :func:`draw_loss` (``loss``: a loss.csv path or its columns). Returns
    ``out_png``."""
    fig, (ax,) = _new_figure(width_in=6.5)
    draw_loss(ax, loss, title=title)
    return _save(fig, out_png)


def plot_fsc_curves(freq_inv_A, curves: Mapping[str, np.ndarray], out_png: str,
                    thresholds: Sequence[float] = (0.143, 0.5), title: str = "FSC") -> str:
    """PNG of :func:`draw_fsc`. Returns ``out_png``."""
    fig, (ax,) = _new_figure(width_in=6.5)
    draw_fsc(ax, freq_inv_A, curves, thresholds=thresholds, title=title)
    return _save(fig, out_png)
