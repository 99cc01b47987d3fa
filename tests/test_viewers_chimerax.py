"""Plain-pytest tests of the viewers' pure helpers: ChimeraX files
(:mod:`scipion_gmmhet.viewers.chimerax`) and the latent-selection geometry
(:mod:`scipion_gmmhet.viewers.latent_selection`'s pure functions)."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("pyworkflow")  # importing scipion_gmmhet.viewers imports pyworkflow

from scipion_gmmhet.engine.model.gmm import GMM  # noqa: E402
from scipion_gmmhet.viewers import chimerax as cx  # noqa: E402


def _gmm(n=5, box=32, apix=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return GMM(rng.normal(size=(n, 3)) * 8.0, rng.uniform(0.5, 1.0, n), rng.uniform(2, 4, n),
               box, apix)


def test_marker_frame_matches_rendered_map(tmp_path):
    """A single Gaussian's marker sits on the density maximum of the rendered map, in the
    frame of a map whose first voxel is at the origin (x, y, z = column, row, section)."""
    g = GMM(np.array([[6.0, -4.0, 10.0]]), np.array([1.0]), np.array([2.5]), 32, 2.0)
    vol = g.render()
    zi, yi, xi = np.unravel_index(np.argmax(vol), vol.shape)
    fn = cx.gmm_markers_cmm(g, str(tmp_path / "m.cmm"))
    m = ET.parse(fn).getroot().find("marker")
    xyz = np.array([float(m.get(k)) for k in "xyz"])
    assert np.allclose(xyz, np.array([xi, yi, zi]) * 2.0, atol=1e-6)
    assert float(m.get("radius")) == pytest.approx(2.5)


def test_markers_cmm_from_npz_and_colors(tmp_path):
    g = _gmm()
    npz = str(tmp_path / "gmm.npz")
    g.save(npz)
    a = cx.gmm_markers_cmm(npz, str(tmp_path / "a.cmm"))
    b = cx.gmm_markers_cmm(g, str(tmp_path / "b.cmm"))
    assert open(a).read() == open(b).read()
    root = ET.parse(a).getroot()
    assert root.tag == "marker_set" and len(root.findall("marker")) == len(g)
    cols = ["#ff0000"] * 4 + ["#0000ff"]
    root = ET.parse(cx.markers_cmm(np.zeros((5, 3)), 1.0, str(tmp_path / "c.cmm"),
                                   colors=cols)).getroot()
    last = root.findall("marker")[-1]
    assert (float(last.get("r")), float(last.get("b"))) == (0.0, 1.0)
    with pytest.raises(ValueError):
        cx.markers_cmm(np.zeros((5, 3)), 1.0, str(tmp_path / "d.cmm"), colors=cols[:2])


def test_displacement_bild(tmp_path):
    a = _gmm(n=4)
    b = a.centers_A.copy()
    b[0] += [3.0, 0, 0]
    b[2] += [0, 0, -0.1]          # below min_length: left out
    fn = cx.displacement_bild(a.centers_A, b, str(tmp_path / "d.bild"), a.box, a.apix,
                              min_length_A=0.5, exaggerate=2.0)
    arrows = [l.split()[1:] for l in open(fn) if l.startswith(".arrow")]
    assert len(arrows) == 1
    v = np.array(arrows[0][:6], dtype=float)
    start = cx.centers_to_chimerax_A(a.centers_A[0], a.box, a.apix)[0]
    assert np.allclose(v[:3], start, atol=1e-3)
    assert np.allclose(v[3:] - v[:3], [6.0, 0, 0], atol=1e-3)
    with pytest.raises(ValueError):
        cx.displacement_bild(a.centers_A, b[:2], str(tmp_path / "e.bild"), a.box, a.apix)


def test_volume_series_and_maps_cxc(tmp_path):
    maps = [str(tmp_path / ("pc1_%03d.mrc" % i)) for i in range(4)]
    fn = cx.volume_series_cxc(maps, str(tmp_path / "pc1.cxc"), name="PC1",
                              extra_files=[str(tmp_path / "m.cmm")])
    text = open(fn).read().splitlines()
    assert text[0].startswith("open ") and text[0].endswith("vseries true")
    assert re.findall(r'"([^"]+)"', text[0]) == maps          # in order, absolute
    assert any(l.startswith("vseries play #1") for l in text)
    assert any("originIndex 0,0,0" in l for l in text)
    fn = cx.maps_cxc(maps[:2], str(tmp_path / "two.cxc"), names=["a", "b"])
    text = open(fn).read()
    assert text.count("open ") == 2 and "tile #1-2" in text and 'rename #2 "b"' in text
    with pytest.raises(ValueError):
        cx.maps_cxc([], str(tmp_path / "none.cxc"))


def test_chimerax_views_without_chimerax(monkeypatch, tmp_path):
    monkeypatch.setattr(cx, "chimerax_program", lambda: None)
    out = cx.chimeraxViews(str(tmp_path / "x.cxc"))
    assert len(out) == 1 and "chimerax " in out[0]


def test_selection_geometry():
    from scipion_gmmhet.viewers.latent_selection import (nearest_row, select_in_polygon,
                                                         select_in_rectangle, selectedIds)
    rng = np.random.default_rng(1)
    xy = rng.uniform(-1, 1, size=(2000, 2))
    square = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    inside = (np.abs(xy) <= 0.5).all(1)
    assert np.array_equal(select_in_polygon(xy, square), inside)
    assert np.array_equal(select_in_polygon(xy, square[::-1]), inside)  # orientation-free
    assert np.array_equal(select_in_rectangle(xy, (0.5, 0.5), (-0.5, -0.5)), inside)
    tri = [(0, 0), (1, 0), (0, 1)]
    assert np.array_equal(select_in_polygon(xy, tri),
                          (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy.sum(1) <= 1))
    assert not select_in_polygon(xy, tri[:2]).any()      # degenerate lasso: nothing
    ids = np.arange(len(xy)) * 2 + 5
    assert selectedIds(ids, inside) == sorted(ids[inside].tolist())
    assert nearest_row(xy, xy[17] + 1e-6) == 17
    with pytest.raises(ValueError):
        select_in_polygon(np.zeros((3, 3)), square)


def test_chimerax_views_with_chimerax_on_path(monkeypatch, tmp_path):
    """A ChimeraX found on the PATH (not scipion-em-chimera's) is launched by a CommandView on
    the command file; nothing is run here."""
    exe = tmp_path / "chimerax"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    from pwem.viewers.viewer_chimera import Chimera
    monkeypatch.setattr(Chimera, "getProgram", classmethod(lambda cls, *a: "/nonexistent/ChimeraX"))
    assert cx.chimerax_program() == str(exe)
    (view,) = cx.chimeraxViews(str(tmp_path / "maps.cxc"))
    assert type(view).__name__ == "CommandView"
    assert str(exe) in view._cmd and "maps.cxc" in view._cmd
