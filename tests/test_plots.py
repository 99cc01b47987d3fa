"""Tests of scipion_gmmhet/viewers/plots.py (headless PNG plots shared by the viewers).

plots.py is loaded straight from its file, without the ``scipion_gmmhet`` package (whose
``__init__`` is Scipion's Plugin class), to prove it needs neither pyworkflow nor pwem.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

PLOTS_PY = os.path.join(os.path.dirname(__file__), os.pardir, "scipion_gmmhet", "viewers",
                        "plots.py")


def _load_plots():
    spec = importlib.util.spec_from_file_location("gmmhet_plots_standalone", PLOTS_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plots = _load_plots()


def _png_pixels(path):
    import matplotlib.image as mpimg
    return np.asarray(mpimg.imread(path), dtype=np.float64)


def assert_not_blank(path, min_colours=3):
    """The PNG exists, is a PNG, has varying pixels and more than a couple of colours."""
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(path + ".tmp")
    img = _png_pixels(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours
    # not all one colour: the most common colour (background) covers < 99% of the image
    flat = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    _, counts = np.unique(flat, axis=0, return_counts=True)
    assert counts.max() / counts.sum() < 0.99


def _two_blobs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(int)
    z = rng.normal(size=(n, 4)) * 0.3
    z[:, 0] += np.where(labels == 1, 2.0, -2.0)
    return z, labels


def test_plot_embedding_pca_scatter_hexbin(tmp_path):
    z, labels = _two_blobs()
    xy, axis_labels = plots.embed_latents(z, "pca")
    assert xy.shape == (len(z), 2) and xy.dtype == np.float32
    assert axis_labels[0].startswith("PC1")
    # the first PC separates the two blobs (they differ along latent 0 only)
    assert abs(np.corrcoef(xy[:, 0], z[:, 0])[0, 1]) > 0.95
    out = plots.plot_embedding(xy, str(tmp_path / "emb_labels.png"), labels=labels,
                               value_label="class", axis_labels=axis_labels,
                               title="PCA of latents", centers=[[-2, 0], [2, 0]])
    assert out == str(tmp_path / "emb_labels.png")
    assert_not_blank(out)
    out2 = plots.plot_embedding(xy, str(tmp_path / "emb_values.png"), values=z[:, 1],
                                value_label="z2", axis_labels=axis_labels)
    assert_not_blank(out2)


def test_scatter_and_hexbin_single_panels(tmp_path):
    rng = np.random.default_rng(1)
    xy = rng.normal(size=(300, 2))
    defocus = rng.uniform(8000, 25000, 300)
    defocus[5] = np.nan  # a missing value must not break the plot
    assert_not_blank(plots.plot_scatter(xy, str(tmp_path / "s.png"), values=defocus,
                                        value_label="defocus (A)", axis_labels=("x", "y")))
    assert_not_blank(plots.plot_scatter(xy, str(tmp_path / "s0.png")))
    assert_not_blank(plots.plot_hexbin(xy, str(tmp_path / "h.png")))
    assert_not_blank(plots.plot_hexbin(xy, str(tmp_path / "hv.png"), values=defocus,
                                       value_label="defocus"))


def test_scatter_subsamples_large_sets(tmp_path):
    rng = np.random.default_rng(2)
    xy = rng.normal(size=(plots.MAX_SCATTER_POINTS + 5000, 2)).astype(np.float32)
    assert_not_blank(plots.plot_scatter(xy, str(tmp_path / "big.png")))


def test_embed_latents_edge_cases():
    z1 = np.linspace(-1, 1, 50)[:, None]  # zdim 1: padded second axis
    xy, labels = plots.embed_latents(z1, "pca")
    assert xy.shape == (50, 2)
    assert np.allclose(xy[:, 1], 0)
    assert abs(np.corrcoef(xy[:, 0], z1[:, 0])[0, 1]) > 0.999
    with pytest.raises(ValueError):
        plots.embed_latents(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        plots.embed_latents(z1, "tsne")
    with pytest.raises(ValueError):
        plots.plot_scatter(np.zeros((10, 2)), "unused.png", values=np.zeros(9))


@pytest.mark.skipif(not os.environ.get("GMMHET_SLOW_TESTS"),
                    reason="UMAP's numba compilation takes 15-40 s; set GMMHET_SLOW_TESTS=1")
def test_embed_latents_umap_separates_blobs():
    z, labels = _two_blobs(200)
    xy, axis_labels = plots.embed_latents(z, "umap", seed=0)
    assert xy.shape == (200, 2) and axis_labels == ["UMAP1", "UMAP2"]
    # the two blobs are far apart in the embedding: nearest-centroid labels agree
    c0, c1 = xy[labels == 0].mean(0), xy[labels == 1].mean(0)
    pred = (np.linalg.norm(xy - c1, axis=1) < np.linalg.norm(xy - c0, axis=1)).astype(int)
    assert (pred == labels).mean() > 0.95


def test_loss_curves_from_csv(tmp_path):
    csv_path = tmp_path / "loss.csv"
    epochs = np.arange(1, 11)
    train = 1.0 / epochs + 0.1
    val = 1.1 / epochs + 0.12
    val[-1] = val[-2] + 0.01
    with open(csv_path, "w") as f:
        f.write("epoch,train_loss,val_loss,seconds\n")
        for e, t, v in zip(epochs, train, val):
            f.write("%d,%.6f,%.6f,%.2f\n" % (e, t, v, 1.5))
    cols = plots.read_loss_csv(str(csv_path))
    assert set(cols) == {"epoch", "train_loss", "val_loss", "seconds"}
    assert np.allclose(cols["train_loss"], train, atol=1e-6)
    out = plots.plot_loss_curves(str(csv_path), str(tmp_path / "loss.png"))
    assert_not_blank(out)
    # without a validation column
    out2 = plots.plot_loss_curves({"epoch": epochs, "train_loss": train},
                                  str(tmp_path / "loss2.png"))
    assert_not_blank(out2)
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,train_loss,val_loss,seconds\n")
    with pytest.raises(ValueError):
        plots.read_loss_csv(str(empty))


def test_fsc_curves(tmp_path):
    apix, box = 2.0, 64
    freq = np.arange(1, box // 2 + 1) / (box * apix)
    fsc_a = 1.0 / (1.0 + np.exp((freq - 0.12) * 80))
    fsc_b = 1.0 / (1.0 + np.exp((freq - 0.08) * 80))
    out = plots.plot_fsc_curves(freq, {"half maps": fsc_a, "class 1": fsc_b},
                                str(tmp_path / "sub" / "fsc.png"))
    assert_not_blank(out)
    with pytest.raises(ValueError):
        plots.plot_fsc_curves(freq, {"bad": fsc_a[:-1]}, str(tmp_path / "x.png"))


def test_plots_import_without_scipion():
    """plots.py imports in a fresh interpreter without pulling in pyworkflow or pwem."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('p', %r)\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('pyworkflow', 'pwem')]\n"
            "assert not bad, bad\n"
            % os.path.abspath(PLOTS_PY))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
