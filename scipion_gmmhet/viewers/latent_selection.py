# **************************************************************************
# *
# * scipion-em-gmmhet: GMM-based heterogeneity analysis for Scipion
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# **************************************************************************
"""Interactive selection on the latent space of "gmmhet - train heterogeneity" (as cryoDRGN's
lasso tool): draw a lasso or a rectangle on the PCA/UMAP plot to make a new particle subset in
the project, or click a point to get the Gaussian model's map at that particle's latent vector.

Three layers, so everything but the mouse is tested headless:

- pure functions: :func:`select_in_polygon`, :func:`select_in_rectangle`, :func:`nearest_row`
  (numpy + matplotlib.path; no GUI);
- project functions: :func:`createSubsetFromIds` registers Scipion's own subset protocol
  (``pwem.protocols.ProtUserSubSet``, the one the metadata viewer launches: a text file of
  selected ids + the input set) so the subset appears in the project like any user subset;
  :func:`gmmMapAt` writes the decoded model's map at a latent point (the engine's
  ``load_trained(dir).gmm_at(z).render()``, i.e. ``gmmhet eval --train DIR --z ...``);
- Tk glue: :class:`LatentSelectionWindow` (a matplotlib figure in a Tk ``Toplevel`` with
  ``LassoSelector`` / ``RectangleSelector``) and the viewer :class:`GmmhetLatentSelectionViewer`
  ("interactive selection" among the training run's viewers).

Every selection is a set of particle ids: the plot's row i is the particle with ``ids[i]``,
all read from one pass over the set (:func:`.viewer_train.latentTable`).
"""
from __future__ import annotations

import os
import time

import numpy as np

import pyworkflow.protocol.params as params
import pyworkflow.viewer as pwviewer
from pwem.viewers import EmProtocolViewer

from ..protocols.labels import GmmhetLabel
from .. import convert
from ..engine.io.outputs import TrainFolder
from . import plots

EMBEDDINGS = ['PCA', 'UMAP']
MODES = ('lasso', 'rectangle', 'map at point')


# ---------------------------------------------------------------------------- pure functions
def _xy(xy) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError('xy: expected an (N, 2) array of plot coordinates; got shape %s'
                         % (xy.shape,))
    return xy


def select_in_polygon(xy, polygon) -> np.ndarray:
    """Boolean mask ``(N,)``: which points ``xy`` (N x 2) lie inside ``polygon`` (a sequence of
    >= 3 vertices (x, y), closed implicitly, as a lasso gives them). Points on the boundary
    count as inside. Vectorised (matplotlib.path); an empty or degenerate polygon selects
    nothing."""
    from matplotlib.path import Path
    xy = _xy(xy)
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(poly) < 3 or xy.shape[0] == 0:
        return np.zeros(xy.shape[0], dtype=bool)
    path = Path(np.concatenate([poly, poly[:1]]), closed=True)
    # a tiny positive/negative radius to count boundary points in whatever the orientation
    scale = max(np.ptp(poly, axis=0).max(), 1e-12)
    inside = path.contains_points(xy, radius=1e-9 * scale)
    inside |= path.contains_points(xy, radius=-1e-9 * scale)
    return inside


def select_in_rectangle(xy, corner1, corner2) -> np.ndarray:
    """Boolean mask ``(N,)``: points ``xy`` inside the axis-aligned rectangle spanned by two
    opposite corners (x, y), edges included, in either order."""
    xy = _xy(xy)
    (x0, y0), (x1, y1) = corner1, corner2
    xlo, xhi = sorted((float(x0), float(x1)))
    ylo, yhi = sorted((float(y0), float(y1)))
    return ((xy[:, 0] >= xlo) & (xy[:, 0] <= xhi) & (xy[:, 1] >= ylo) & (xy[:, 1] <= yhi))


def nearest_row(xy, point, scale=None) -> int:
    """Row of the point of ``xy`` nearest to ``point`` (x, y); ``scale`` (sx, sy) divides each
    axis first (the plot's axis ranges, so "nearest" is as the eye sees it)."""
    xy = _xy(xy)
    if xy.shape[0] == 0:
        raise ValueError('xy: no points to pick from')
    s = np.ones(2) if scale is None else np.maximum(np.asarray(scale, dtype=np.float64), 1e-12)
    d = ((xy - np.asarray(point, dtype=np.float64)) / s) ** 2
    return int(np.argmin(d.sum(1)))


def selectedIds(ids, mask) -> list[int]:
    """Particle ids of the selected rows (``ids[i]`` belongs to row i), sorted."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask, dtype=bool)
    if ids.shape != mask.shape:
        raise ValueError('ids and mask: %d ids but %d mask rows' % (ids.size, mask.size))
    return sorted(int(i) for i in ids[mask])


# ---------------------------------------------------------------------------- project functions
def writeSelectionFile(path: str, ids) -> str:
    """The selection file ``ProtUserSubSet`` reads in its metadata-viewer mode: one line of
    particle ids separated by spaces (written atomically). Returns ``path``."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError('selection: no particle selected; draw a region around some points')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(' '.join(str(i) for i in ids) + '\n')
    os.replace(tmp, path)
    return path


def createSubsetFromIds(project, inputProtocol, setName: str, ids, label: str | None = None,
                        wait: bool = False):
    """Register a subset of ``inputProtocol``'s output ``setName`` (e.g. ``'outputParticles'``)
    holding the particles with ``ids``, the way Scipion makes a user subset: a selection file in
    the project's ``Logs/`` and ``pwem.protocols.ProtUserSubSet`` launched with it (the protocol
    the metadata viewer sends to the project window). The subset keeps each particle's id,
    image, alignment, CTF and latent vector (for a SetOfParticlesFlex input its output is
    ``outputParticlesFlex``, a SetOfParticlesFlex, else ``outputParticles``).

    ``wait=True`` runs it to the end (tests, scripts); the GUI launches it in the background.
    Ids not in the set are refused (ValueError) rather than silently dropped. Returns the
    protocol."""
    from pwem.protocols import ProtUserSubSet
    inputSet = getattr(inputProtocol, setName, None)
    if inputSet is None:
        raise ValueError('%s has no output "%s"' % (inputProtocol.getRunName(), setName))
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise ValueError('selection: no particle selected; draw a region around some points')
    known = set(int(i) for i in inputSet.getIdSet())
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError('selection: %d id(s) are not in %s.%s (e.g. %d); select points of this '
                         'set' % (len(unknown), inputProtocol.getRunName(), setName, unknown[0]))
    stamp = time.strftime('%Y%m%d%H%M%S') + '%03d' % (int(time.time() * 1000) % 1000)
    rel = os.path.join('Logs', 'gmmhet_selection_%s.txt' % stamp)
    writeSelectionFile(os.path.join(project.getPath(), rel), ids)
    prot = project.newProtocol(ProtUserSubSet)
    prot.setObjLabel(label or 'gmmhet latent subset (%d particles)' % len(ids))
    prot.inputObject.set(inputProtocol)
    prot.inputObject.setExtended(setName)
    # "<file>," : a selection text file (not ShowJ's sqlite) and no table prefix
    prot.sqliteFile.set(rel + ',')
    prot.outputClassName.set(inputSet.getClassName())
    project.launchProtocol(prot, wait=wait)
    return prot


def subsetOutput(prot):
    """The particle set a finished :func:`createSubsetFromIds` protocol produced."""
    for name in ('outputParticlesFlex', 'outputParticles'):
        out = getattr(prot, name, None)
        if out is not None:
            return out
    raise ValueError('%s has no particle output' % prot.getRunName())


_TRAINED_CACHE: dict = {}


def _trained(trainDir: str):
    """``load_trained(trainDir)`` on the CPU, kept while its model.pt is unchanged (a window
    decodes many points)."""
    from ..engine.training.trained import load_trained
    model = TrainFolder(trainDir).model
    key = (os.path.abspath(trainDir), os.path.getmtime(model) if os.path.exists(model) else None)
    if key not in _TRAINED_CACHE:
        _TRAINED_CACHE.clear()
        _TRAINED_CACHE[key] = load_trained(trainDir, device='cpu')
    return _TRAINED_CACHE[key]


def gmmMapAt(trainDir: str, z, outMrc: str, box: int | None = None,
             apix: float | None = None, chimerax: bool = False) -> str:
    """Write the trained model's Gaussian-model map at latent point ``z`` (K,) to ``outMrc``
    (atomically), at the model's box and pixel size unless given: what
    ``gmmhet eval --train DIR --z z1,...,zK --out MAP.mrc`` does. With ``chimerax``, also
    ``<stem>.cmm`` (the decoded Gaussians' centres) and ``<stem>.cxc`` (opens both; see
    :mod:`.chimerax`). Returns ``outMrc``."""
    from ..engine.io.mrc import write_map
    gmm = _trained(trainDir).gmm_at(np.asarray(z, dtype=np.float32).reshape(-1))
    box = int(box or gmm.box)
    apix = float(apix or gmm.apix)
    os.makedirs(os.path.dirname(os.path.abspath(outMrc)), exist_ok=True)
    write_map(outMrc, gmm.render(box, apix), apix)
    if chimerax:
        from . import chimerax as cx
        stem = os.path.splitext(outMrc)[0]
        if box == gmm.box and abs(apix - gmm.apix) < 1e-6 * apix:
            extra = [cx.gmm_markers_cmm(gmm, stem + '.cmm', name='Gaussians at z')]
        else:  # other sampling: the markers would not sit on the map
            extra = []
        cx.maps_cxc([outMrc], stem + '.cxc', names=['GMM at z = %s' % gmm.info.get('latent', '')],
                    extra_files=extra, comment='gmmhet: Gaussian model at a latent point')
    return outMrc


def centralSections(vol: np.ndarray) -> np.ndarray:
    """The three central sections (z, y, x) of a cubic map side by side: ``(D, 3 D)``."""
    d = vol.shape[0] // 2
    return np.concatenate([vol[d], vol[:, d], vol[:, :, d]], axis=1)


# ---------------------------------------------------------------------------- Tk glue
class LatentSelectionWindow:
    """A Tk ``Toplevel`` with the latent plot and three modes: *lasso* and *rectangle* select
    particles (count shown; "Create subset" calls ``onCreateSubset(ids, label)``), *map at
    point* picks the nearest particle and calls ``onPointMap(row)`` -> an MRC path whose central
    sections are shown next to the plot.

    Rows: ``xy[i]``, ``ids[i]`` belong to the same particle. The selection callbacks
    (:meth:`applyPolygon`, :meth:`applyRectangle`, :meth:`pickPoint`) are plain methods, so
    tests drive the window without a mouse.
    """

    def __init__(self, master, ids, xy, axisLabels=('x', 'y'), title='Latent space',
                 onCreateSubset=None, onPointMap=None, values=None, valueLabel='',
                 explorer=None):
        import tkinter as tk
        from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg
        from matplotlib.figure import Figure

        self.ids = np.asarray(ids, dtype=np.int64)
        self.xy = _xy(xy)
        if self.ids.shape[0] != self.xy.shape[0]:
            raise ValueError('ids and xy: %d ids for %d points' % (len(self.ids), len(self.xy)))
        self.mask = np.zeros(len(self.ids), dtype=bool)
        self.onCreateSubset, self.onPointMap = onCreateSubset, onPointMap
        self.lastMap = None
        self.root = tk.Toplevel(master) if master is not None else tk.Tk()
        self.root.title(title)

        bar = tk.Frame(self.root)
        bar.pack(side=tk.TOP, fill=tk.X)
        self.mode = tk.StringVar(self.root, value=MODES[0])
        for m in MODES:
            tk.Radiobutton(bar, text=m, value=m, variable=self.mode,
                           command=self._setMode).pack(side=tk.LEFT)
        tk.Label(bar, text='  Subset name:').pack(side=tk.LEFT)
        self.nameVar = tk.StringVar(self.root, value='latent selection')
        tk.Entry(bar, textvariable=self.nameVar, width=22).pack(side=tk.LEFT)
        self.createButton = tk.Button(bar, text='Create subset', command=self.createSubset,
                                      state=tk.DISABLED)
        self.createButton.pack(side=tk.LEFT, padx=4)
        tk.Button(bar, text='Clear', command=self.clear).pack(side=tk.LEFT)
        self.status = tk.StringVar(self.root, value='Draw a lasso around particles.')
        tk.Label(self.root, textvariable=self.status, anchor='w').pack(side=tk.BOTTOM, fill=tk.X)

        # beside the 3D explorer the latent plot and the map sections share a narrower figure
        self.figure = Figure(figsize=(7.6 if explorer is not None else 9.5, 4.8), dpi=90)
        self.ax = self.figure.add_subplot(1, 2, 1)
        self.mapAx = self.figure.add_subplot(1, 2, 2)
        plots.draw_scatter(self.ax, self.xy, values=values, value_label=valueLabel,
                           axis_labels=axisLabels, title='%d particles' % len(self.xy))
        self.highlight = self.ax.scatter([], [], s=14, facecolors='none', edgecolors='red',
                                         linewidths=0.8)
        self.marker, = self.ax.plot([], [], marker='x', color='black', ms=10, ls='none')
        self.mapAx.set_axis_off()
        self.mapAx.set_title('map at point: click a particle', fontsize='small')
        body = tk.Frame(self.root)
        body.pack(side=tk.TOP, fill=tk.BOTH, expand=True)
        self.canvas = FigureCanvasTkAgg(self.figure, master=body)
        self.canvas.get_tk_widget().pack(side=tk.LEFT, fill=tk.BOTH, expand=True)
        self.explorer3d = None
        if explorer is not None:  # live 3D view of the decoded Gaussians under the pointer
            from .explorer3d import Explorer3DPanel
            self.explorer3d = Explorer3DPanel(body, explorer, status=self.status.set)
            self.explorer3d.frame.pack(side=tk.LEFT, fill=tk.BOTH, expand=True)
            self.canvas.mpl_connect('motion_notify_event', self._onMotion)
        self._selector = None
        self._clickId = None
        self._setMode()
        self.canvas.draw()
        self.root.bind('<Destroy>', self._onDestroy, '+')

    def _onDestroy(self, event):
        """Closing the window cancels its queued redraws (else a later Tk event loop runs
        them on deleted widgets: "invalid command name ...idle_draw")."""
        if event.widget is not self.root:
            return   # a child's <Destroy>, seen through the toplevel's bindings
        from .explorer3d import cancelIdleDraw
        cancelIdleDraw(self.canvas)
        if self.explorer3d is not None:
            self.explorer3d.cancelPending()

    # -- modes
    def _setMode(self):
        from matplotlib.widgets import LassoSelector, RectangleSelector
        if self._selector is not None:
            self._selector.set_active(False)
            self._selector = None
        if self._clickId is not None:
            self.canvas.mpl_disconnect(self._clickId)
            self._clickId = None
        mode = self.mode.get()
        if mode == 'lasso':
            self._selector = LassoSelector(self.ax, onselect=self.applyPolygon)
            self.status.set('Lasso: draw around particles with the left button.')
        elif mode == 'rectangle':
            self._selector = RectangleSelector(
                self.ax, lambda e0, e1: self.applyRectangle((e0.xdata, e0.ydata),
                                                            (e1.xdata, e1.ydata)),
                useblit=False, button=[1], interactive=False)
            self.status.set('Rectangle: drag a box around particles.')
        else:
            self._clickId = self.canvas.mpl_connect('button_press_event', self._onClick)
            self.status.set('Click a particle: its latent vector is decoded into a map.')

    def _onMotion(self, event):
        if event.inaxes is self.ax and event.xdata is not None:
            self.explorer3d.request(event.xdata, event.ydata)

    def _onClick(self, event):
        if event.inaxes is self.ax and event.xdata is not None:
            self.pickPoint(event.xdata, event.ydata)

    # -- actions (callable without a mouse)
    def _showSelection(self):
        sel = self.xy[self.mask]
        self.highlight.set_offsets(sel if len(sel) else np.empty((0, 2)))
        n = int(self.mask.sum())
        self.status.set('%d of %d particles selected.' % (n, len(self.mask)))
        self.createButton.configure(state='normal' if n else 'disabled')
        self.canvas.draw_idle()

    def applyPolygon(self, vertices):
        self.mask = select_in_polygon(self.xy, vertices)
        self._showSelection()
        return self.mask

    def applyRectangle(self, corner1, corner2):
        if None in tuple(corner1) + tuple(corner2):
            return self.mask
        self.mask = select_in_rectangle(self.xy, corner1, corner2)
        self._showSelection()
        return self.mask

    def clear(self):
        self.mask = np.zeros(len(self.ids), dtype=bool)
        self._showSelection()

    def selectedIds(self) -> list[int]:
        return selectedIds(self.ids, self.mask)

    def createSubset(self):
        ids = self.selectedIds()
        if not ids or self.onCreateSubset is None:
            return None
        try:
            result = self.onCreateSubset(ids, self.nameVar.get().strip() or None)
        except Exception as exc:  # show it in the window; the user can retry
            self.status.set('Subset not created: %s' % exc)
            return None
        self.status.set('Subset of %d particles sent to the project (%s).'
                        % (len(ids), self.nameVar.get()))
        return result

    def pickPoint(self, x, y):
        """Pick the particle nearest to plot point (x, y); with ``onPointMap``, show its map.
        Returns the row."""
        span = np.ptp(self.xy, axis=0) if len(self.xy) > 1 else None
        row = nearest_row(self.xy, (x, y), span)
        self.marker.set_data([self.xy[row, 0]], [self.xy[row, 1]])
        if self.onPointMap is not None:
            try:
                self.lastMap = self.onPointMap(row)
                from ..engine.io.mrc import read_map
                vol, _ = read_map(self.lastMap)
                self.mapAx.clear()
                self.mapAx.imshow(centralSections(np.asarray(vol)), cmap='gray',
                                  origin='lower')
                self.mapAx.set_axis_off()
                self.mapAx.set_title('particle %d: central sections\n%s'
                                     % (self.ids[row], os.path.basename(self.lastMap)),
                                     fontsize='small')
                self.status.set('Map of particle %d\'s latent point: %s'
                                % (self.ids[row], self.lastMap))
            except Exception as exc:
                self.status.set('No map: %s' % exc)
        self.canvas.draw_idle()
        return row

    def show(self, block=True):
        if block:
            self.root.wait_window() if self.root.master is not None else self.root.mainloop()


class LatentSelectionView(pwviewer.View):
    """pyworkflow View opening a :class:`LatentSelectionWindow` (what the viewer returns)."""

    def __init__(self, master, **kwargs):
        self._master, self._kwargs = master, kwargs
        self.window = None

    def show(self):
        self.window = LatentSelectionWindow(self._master, **self._kwargs)
        self.window.show(block=self._master is None)


# ---------------------------------------------------------------------------- viewer
class LatentSelectionMixin:
    """The interactive selection and live 3D explorer of a training run, for a protocol viewer
    (the train viewer's "Interactive" tab): :meth:`_defineSelectionParams` adds the form
    entries, :meth:`_showSelection` opens the window."""

    def _defineSelectionParams(self, form, embedding: bool = True):
        if embedding:
            form.addParam('embedding', params.EnumParam, choices=EMBEDDINGS, default=0,
                          display=params.EnumParam.DISPLAY_HLIST, label='Embedding',
                          help='Plot on which you draw: PCA (linear, fast) or UMAP (separates '
                               'clusters better). Selection works on either; the map at a '
                               'clicked point uses that particle\'s own latent vector.')
            form.addParam('colorByDefocus', params.BooleanParam, default=False,
                          label='Colour by defocus?',
                          help='Colour the points by their mean defocus (A), to check that a '
                               'region is not a defocus artefact.')
        form.addParam('live3d', params.BooleanParam, default=True,
                      label='Live 3D view under the pointer?',
                      help='Moving the pointer over the latent plot decodes the latent point '
                           'under it and shows the Gaussians in 3D, coloured by how far each '
                           'moved from the neutral model (A). On a PCA plot the point is the '
                           'exact latent vector there; on UMAP, the nearest particle\'s. Buttons '
                           'save the map at the current point and open it in ChimeraX.')
        form.addParam('openChimerax', params.BooleanParam, default=True,
                      label='Open maps at clicked points in ChimeraX?',
                      help='Where ChimeraX is installed, each map at a clicked point opens there '
                           'with the Gaussian centres as markers (a .cxc file next to the map). '
                           'The map\'s central sections are always shown in the window.')
        form.addParam('displaySelection', params.LabelParam,
                      label='Open the interactive selection and 3D explorer')

    def _selectionColorBy(self):
        return 'defocus' if self.colorByDefocus.get() else None

    def _selectionOutPath(self, name: str) -> str:
        folder = os.path.abspath(self._getPath())
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name)

    def _showSelection(self, paramName=None):
        from .viewer_train import colorLabel, latentTable
        prot = self.protocol
        if not prot.hasAttribute('outputParticles'):
            return [self.errorMessage('The training has no output particles yet.',
                                      title='No latent space')]
        colorBy = self._selectionColorBy()
        ids, z, values = latentTable(prot.outputParticles, colorBy)
        method = EMBEDDINGS[self.embedding.get()].lower()
        xy, axes = plots.embed_latents(z, method)
        trainDir = convert.trainDirOf(prot.outputParticles) or prot.getTrainDir()
        project = self.getProject()

        def onCreateSubset(sel, label):
            return createSubsetFromIds(project, prot, 'outputParticles', sel, label=label)

        openChimerax = bool(self.openChimerax.get())

        def onPointMap(row):
            from . import chimerax as cx
            out = gmmMapAt(trainDir, z[row],
                           self._selectionOutPath('gmmhet_z_particle%d.mrc' % ids[row]), chimerax=True)
            program = cx.chimerax_program() if openChimerax else None
            if program:
                import subprocess
                subprocess.Popen([program, os.path.splitext(out)[0] + '.cxc'])
            return out

        explorer = None
        if self.live3d.get():
            from .explorer3d import LatentExplorer
            explorer = LatentExplorer.fromTrainDir(trainDir, z, xy, method,
                                                   saveMapDir=self._selectionOutPath(''))
        return [LatentSelectionView(self.getTkRoot(), ids=ids, xy=xy, axisLabels=axes,
                                    title='%s of the latent space: %s'
                                    % (method.upper(), prot.getRunName()),
                                    onCreateSubset=onCreateSubset, onPointMap=onPointMap,
                                    values=values, valueLabel=colorLabel(colorBy),
                                    explorer=explorer)]


class GmmhetLatentSelectionViewer(GmmhetLabel, LatentSelectionMixin, EmProtocolViewer):
    """The selection window alone (for scripts): in the GUI it is the "Interactive" tab of the
    training run's viewer, :class:`.viewer_train.GmmhetTrainViewer` (one viewer per protocol,
    so "Analyze results" opens the plots and the selection together)."""
    _label = 'interactive latent selection'
    _targets = []
    _environments = [pwviewer.DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label='Selection')
        self._defineSelectionParams(form)

    def _getVisualizeDict(self):
        return {'displaySelection': self._showSelection}
