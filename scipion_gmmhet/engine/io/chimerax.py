"""ChimeraX files: ``.cxc`` command files (maps side by side, a volume series to play),
``.cmm`` marker files (Gaussian centres, optionally linked to displaced copies) and ``.bild``
arrow files (Gaussian displacements between two latent points). The one writer of each, used
by ``gmmhet analyze`` and by the viewers (``scipion_gmmhet.viewers.chimerax`` adds opening
ChimeraX). No torch, no Scipion; every file is written atomically (:mod:`atomic`).

One frame for everything: a map of the model's ``box`` and ``apix`` whose first voxel sits at
the origin (each ``.cxc`` sets ``volume ... originIndex 0,0,0`` on the maps it opens, which is
also ChimeraX's default for an MRC without an origin). A Gaussian centre ``c`` (Angstrom from
the box centre voxel ``box // 2``, the engine's :class:`~..model.gmm.GMM` convention) is at
``c + (box // 2) * apix`` there.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .atomic import write_text

DEFAULT_COLORS = ("#3070ff", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, text)
    return path


def _cxc_path(path: str) -> str:
    """A file name in a ChimeraX command: absolute, in double quotes (ChimeraX's own quoting,
    not a shell's)."""
    return '"%s"' % os.path.abspath(path)


def _rgb(color: str) -> tuple[float, float, float]:
    c = color.lstrip("#")
    if len(c) != 6:
        raise ValueError("color %r: give #rrggbb" % color)
    return tuple(int(c[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def centers_to_chimerax_A(centers_A, box: int, apix: float) -> np.ndarray:
    """Engine GMM centres ``(N, 3)`` (xyz Angstrom from voxel ``box // 2``) -> ChimeraX
    scene coordinates of a map with its first voxel at the origin."""
    c = np.asarray(centers_A, dtype=np.float64).reshape(-1, 3)
    return c + (int(box) // 2) * float(apix)


def write_cxc(out_cxc: str, lines: Sequence[str], comment: str = "") -> str:
    """A ChimeraX command file of ``lines`` (one command each). Returns ``out_cxc``."""
    head = ["# %s" % comment] if comment else []
    return _write(out_cxc, "\n".join(head + list(lines)) + "\n")


def maps_cxc(map_files: Sequence[str], out_cxc: str, names: Sequence[str] | None = None,
             colors: Sequence[str] | None = None, level: float | None = None,
             extra_files: Sequence[str] = (), tile: bool = True, comment: str = "") -> str:
    """Open maps (models #1..#n, each renamed and coloured, first voxel at the origin), then
    ``extra_files`` (.cmm markers, .bild arrows, in the same frame); ``tile`` lays the maps
    side by side. Returns ``out_cxc``."""
    if not map_files:
        raise ValueError("map_files: no map to open")
    colors = list(colors or DEFAULT_COLORS)
    lines = []
    for i, fn in enumerate(map_files, start=1):
        lines.append("open %s" % _cxc_path(fn))
        lines.append("volume #%d originIndex 0,0,0 color %s%s"
                     % (i, colors[(i - 1) % len(colors)],
                        "" if level is None else " level %g" % level))
        if names:
            lines.append('rename #%d "%s"' % (i, names[i - 1]))
    for fn in extra_files:
        lines.append("open %s" % _cxc_path(fn))
    if tile and len(map_files) > 1:
        lines.append("tile #1-%d" % len(map_files))
    lines.append("view")
    return write_cxc(out_cxc, lines, comment)


def volume_series_cxc(map_files: Sequence[str], out_cxc: str, name: str = "series",
                      color: str = "#3070ff", level: float | None = None,
                      oscillate: bool = True, extra_files: Sequence[str] = (),
                      comment: str = "") -> str:
    """Open ``map_files`` (in order: e.g. the maps along a principal component) as ONE volume
    series (model #1) and play it (back and forth when ``oscillate``). Returns ``out_cxc``."""
    if len(map_files) < 1:
        raise ValueError("map_files: no map in the series")
    lines = ["open %s vseries true" % " ".join(_cxc_path(f) for f in map_files),
             "volume #1 originIndex 0,0,0 color %s%s"
             % (color, "" if level is None else " level %g" % level),
             'rename #1 "%s"' % name]
    for fn in extra_files:
        lines.append("open %s" % _cxc_path(fn))
    lines.append("view")
    if len(map_files) > 1:
        lines.append("vseries play #1 loop true%s"
                     % (" direction oscillate" if oscillate else ""))
    return write_cxc(out_cxc, lines, comment)


def markers_cmm(xyz_A, radii_A, out_cmm: str, color: str = "#ffb000",
                name: str = "Gaussians", colors: Sequence[str] | None = None,
                links: Sequence[tuple[int, int]] = (), link_color: str = "#ffff00",
                link_radius_A: float | None = None) -> str:
    """Chimera/ChimeraX marker file: one marker per row of ``xyz_A`` (scene Angstrom) with
    radius ``radii_A`` (scalar or per marker), one colour or one per marker; ``links`` joins
    pairs of markers (0-based rows). Returns ``out_cmm``."""
    xyz = np.asarray(xyz_A, dtype=np.float64).reshape(-1, 3)
    r = np.broadcast_to(np.asarray(radii_A, dtype=np.float64), (len(xyz),))
    if colors is not None and len(colors) != len(xyz):
        raise ValueError("colors: %d colours for %d markers" % (len(colors), len(xyz)))
    lines = ['<marker_set name="%s">' % name]
    for i in range(len(xyz)):
        cr, cg, cb = _rgb(colors[i] if colors is not None else color)
        lines.append('<marker id="%d" x="%.3f" y="%.3f" z="%.3f" r="%.3f" g="%.3f" b="%.3f" '
                     'radius="%.3f"/>' % (i + 1, xyz[i, 0], xyz[i, 1], xyz[i, 2], cr, cg, cb,
                                          r[i]))
    lr, lg, lb = _rgb(link_color)
    lrad = float(link_radius_A) if link_radius_A else float(np.min(r)) / 3 if len(r) else 0.1
    for a, b in links:
        lines.append('<link id1="%d" id2="%d" r="%.3f" g="%.3f" b="%.3f" radius="%.3f"/>'
                     % (a + 1, b + 1, lr, lg, lb, lrad))
    lines.append("</marker_set>")
    return _write(out_cmm, "\n".join(lines) + "\n")


def gmm_markers_cmm(gmm, out_cmm: str, color: str = "#ffb000", name: str = "Gaussians",
                    radius_scale: float = 1.0) -> str:
    """Markers at a GMM's centres (radius = ``radius_scale`` x width sigma). ``gmm``: an
    engine :class:`GMM` or the path of a saved one (``GMM.save``)."""
    if isinstance(gmm, (str, os.PathLike)):
        with np.load(gmm) as z:
            centers, sigmas = np.asarray(z["centers_A"]), np.asarray(z["sigmas_A"])
            box, apix = int(z["box"]), float(z["apix"])
    else:
        centers, sigmas, box, apix = gmm.centers_A, gmm.sigmas_A, gmm.box, gmm.apix
    return markers_cmm(centers_to_chimerax_A(centers, box, apix),
                       radius_scale * np.asarray(sigmas, dtype=np.float64), out_cmm,
                       color=color, name=name)


def displacement_cmm(centers_from_A, centers_to_A, out_cmm: str, box: int, apix: float,
                     radius_A: float | None = None, name: str = "gmm") -> str:
    """Markers at each Gaussian's centre at one latent point (blue) and at another (red),
    linked pairwise (rows are the same Gaussian; engine centres, Angstrom). Returns ``out_cmm``."""
    a = centers_to_chimerax_A(centers_from_A, box, apix)
    b = centers_to_chimerax_A(centers_to_A, box, apix)
    if a.shape != b.shape:
        raise ValueError("centers: %d Gaussians at one point, %d at the other; give the same "
                         "model's centres at two latent points" % (len(a), len(b)))
    n = len(a)
    r = float(radius_A) if radius_A else 0.6 * float(apix)
    return markers_cmm(np.concatenate([a, b]), r, out_cmm, name=name,
                       colors=["#3380ff"] * n + ["#ff4d33"] * n, links=[(i, n + i) for i in range(n)],
                       link_radius_A=r / 3)


def displacement_bild(centers_from_A, centers_to_A, out_bild: str, box: int, apix: float,
                      color: str = "#d62728", min_length_A: float = 0.0,
                      exaggerate: float = 1.0, radius_A: float | None = None) -> str:
    """BILD arrows from each Gaussian's centre at one latent point to the same Gaussian at
    another (rows are the same Gaussian; engine centres, Angstrom), ``exaggerate`` times the
    real displacement; arrows not longer than ``min_length_A`` (real length; 0: all that
    move) are left out. Returns ``out_bild`` (ChimeraX opens .bild files as shapes)."""
    a = np.asarray(centers_from_A, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(centers_to_A, dtype=np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError("centers: %d Gaussians at one point, %d at the other; give the same "
                         "model's centres at two latent points" % (len(a), len(b)))
    d = b - a
    length = np.linalg.norm(d, axis=1)
    keep = length > max(float(min_length_A), 0.0)
    p0 = centers_to_chimerax_A(a[keep], box, apix)
    p1 = p0 + float(exaggerate) * d[keep]
    r = float(radius_A) if radius_A else max(0.25 * float(apix), 0.3)
    lines = [".color %.3f %.3f %.3f" % _rgb(color)]
    for (x0, y0, z0), (x1, y1, z1) in zip(p0, p1):
        lines.append(".arrow %.3f %.3f %.3f %.3f %.3f %.3f %.3f %.3f 0.75"
                     % (x0, y0, z0, x1, y1, z1, r, 2.5 * r))
    return _write(out_bild, "\n".join(lines) + "\n")
