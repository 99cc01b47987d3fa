"""Live 3D latent explorer (e2gmm's most used view): move the pointer over the latent plot and
the decoded Gaussian model follows in a 3D view, each Gaussian coloured by how far it moved from
the neutral model (Angstrom).

Two layers, so the pointer path is measured headless:

- :class:`LatentExplorer` (numpy + the trained decoder on the CPU, no GUI): plot point ->
  latent vector (the exact inverse of the PCA plot; for UMAP, the nearest particle's latent),
  latent vector -> Gaussian centres (Angstrom, box centre at 0) and displacements from the
  neutral model; the map at the current point through :func:`.latent_selection.gmmMapAt`.
- :class:`Explorer3DPanel`: a matplotlib 3D scatter in its own Tk canvas (only that canvas is
  redrawn per pointer event, and pointer events are coalesced to the latest one, so a fast
  pointer never queues stale frames), with "Save map here" and "Open in ChimeraX" buttons.
"""
from __future__ import annotations

import os
import time

import numpy as np


class LatentExplorer:
    """Plot coordinates -> latent -> decoded Gaussians, for one training run.

    ``decode(z)`` returns the Gaussian centres ``(G, 3)`` in Angstrom at latent ``z`` (K,);
    ``neutral`` the neutral model's centres ``(G, 3)``; ``z`` the particles' latents (N, K)
    and ``xy`` their plot coordinates (N, 2) (row i = particle i); ``method`` 'pca' or 'umap'.
    """

    def __init__(self, decode, neutral, z, xy, method: str = 'pca', saveMap=None):
        self.decode = decode
        self.neutral = np.asarray(neutral, dtype=np.float32)
        self.z = np.asarray(z, dtype=np.float32)
        self.xy = np.asarray(xy, dtype=np.float64)
        self.method = method.lower()
        self.saveMap = saveMap
        zc = self.z.astype(np.float64)
        self.mean = zc.mean(axis=0)
        # the same principal axes as plots.embed_latents (same SVD of the same centred data)
        _, _, vt = np.linalg.svd(zc - self.mean, full_matrices=False)
        self.axes = np.zeros((2, self.z.shape[1]))
        self.axes[:min(2, vt.shape[0])] = vt[:2]
        self.span = np.maximum(np.ptp(self.xy, axis=0), 1e-12) if len(self.xy) > 1 else np.ones(2)
        self.current = self.mean.astype(np.float32)

    @classmethod
    def fromTrainDir(cls, trainDir: str, z, xy, method: str = 'pca', saveMapDir: str | None = None):
        """The explorer of a ``gmmhet train`` folder, decoding on the CPU."""
        import torch

        from .latent_selection import _trained, gmmMapAt
        tm = _trained(trainDir)

        def decode(zz):
            with torch.no_grad():
                c, _, _ = tm.decode(torch.as_tensor(np.asarray(zz, dtype=np.float32).reshape(1, -1)))
            return c[0].cpu().numpy()

        def saveMap(zz, name):
            folder = saveMapDir or trainDir
            return gmmMapAt(trainDir, zz, os.path.join(folder, name), chimerax=True)

        return cls(decode, tm.neutral.centers_A, z, xy, method, saveMap=saveMap)

    def latentAt(self, x: float, y: float) -> np.ndarray:
        """Latent vector (K,) under plot point (x, y): PCA plots invert exactly (the other PCs at
        the mean); UMAP has no inverse, so the nearest particle's latent."""
        if self.method == 'pca':
            return (self.mean + x * self.axes[0] + y * self.axes[1]).astype(np.float32)
        from .latent_selection import nearest_row
        return self.z[nearest_row(self.xy, (x, y), self.span)]

    def centersAt(self, z) -> tuple[np.ndarray, np.ndarray]:
        """Decoded centres (G, 3) A and each Gaussian's displacement from neutral (G,) A."""
        c = np.asarray(self.decode(z), dtype=np.float32)
        return c, np.linalg.norm(c - self.neutral, axis=1)

    def displacementScale(self, samples: int = 24, seed: int = 0) -> float:
        """Colour-scale top (A): the 95th percentile of the largest Gaussian displacement over a
        few particles' latents (at least 1 A), so colours mean the same at every point."""
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(self.z), size=min(samples, len(self.z)), replace=False)
        top = [float(self.centersAt(self.z[r])[1].max()) for r in rows]
        return max(1.0, float(np.percentile(top, 95)))


def cancelIdleDraw(canvas):
    """Cancel a matplotlib Tk canvas's pending ``draw_idle`` (matplotlib's own figure manager
    does this when it closes a window; an embedded canvas must do it itself)."""
    idleId = getattr(canvas, '_idle_draw_id', None)
    if idleId:
        canvas.get_tk_widget().after_cancel(idleId)
        canvas._idle_draw_id = None


class Explorer3DPanel:
    """Tk frame: a 3D scatter of the decoded Gaussians, coloured by displacement from neutral,
    that :meth:`moveTo` updates; buttons save the map at the current point and open it in
    ChimeraX (where installed). ``status`` is a callable showing one line to the user."""

    def __init__(self, master, explorer: LatentExplorer, status=None, outDir: str | None = None):
        import tkinter as tk
        from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg
        from matplotlib.figure import Figure

        self.explorer = explorer
        self.status = status or (lambda msg: None)
        self.outDir = outDir
        self.frame = tk.Frame(master)
        self.updates = 0
        self.seconds = 0.0
        self._pending = None
        self._scheduled = False
        self._flushId = None
        self.lastMap = None

        bar = tk.Frame(self.frame)
        bar.pack(side=tk.TOP, fill=tk.X)
        self.follow = tk.BooleanVar(self.frame, value=True)
        tk.Checkbutton(bar, text='Follow pointer', variable=self.follow).pack(side=tk.LEFT)
        tk.Button(bar, text='Save map here', command=self.saveMap).pack(side=tk.LEFT, padx=3)
        from .chimerax import chimerax_program
        self.chimerax = chimerax_program()
        self.chimeraButton = tk.Button(bar, text='Open in ChimeraX', command=self.openInChimerax)
        self.chimeraButton.pack(side=tk.LEFT)

        neutral = explorer.neutral
        self.vmax = explorer.displacementScale()
        self.figure = Figure(figsize=(5.0, 4.6), dpi=90)
        ax = self.figure.add_subplot(1, 1, 1, projection='3d')
        self.ax = ax
        lo, hi = neutral.min(0) - 5, neutral.max(0) + 5
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_zlim(lo[2], hi[2])
        ax.set_xlabel('x (A)')
        ax.set_ylabel('y (A)')
        ax.set_zlabel('z (A)')
        c, d = explorer.centersAt(explorer.current)
        # One marker line per colour band (Agg stamps one cached marker per band: ~10x faster
        # than a per-point-coloured scatter at 2,048 Gaussians). animated: full redraws (resize,
        # rotation with the mouse) leave them out and _onDraw keeps that background; a pointer
        # update then blits only the Gaussians and the label.
        import matplotlib
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        cmap = matplotlib.colormaps['viridis']
        norm = Normalize(0.0, self.vmax)
        size = max(1.5, min(6.0, 120.0 / np.sqrt(len(c))))
        self.bands = [ax.plot([], [], [], ls='none', marker='o', ms=size, mew=0, animated=True,
                              color=cmap((b + 0.5) / self.NBANDS))[0] for b in range(self.NBANDS)]
        self._setCentres(c, d)
        self.figure.colorbar(ScalarMappable(norm, cmap), ax=ax, shrink=0.6,
                             label='displacement from neutral (A)')
        ax.set_title('%d Gaussians under the pointer' % len(c), fontsize='small')
        self.label = ax.text2D(0.02, 0.98, 'neutral model', transform=ax.transAxes, fontsize='small',
                               va='top', animated=True)
        self._background = None
        self.canvas = FigureCanvasTkAgg(self.figure, master=self.frame)
        self.canvas.get_tk_widget().pack(side=tk.TOP, fill=tk.BOTH, expand=True)
        self.canvas.mpl_connect('draw_event', self._onDraw)
        self.canvas.draw()

    NBANDS = 16

    def _setCentres(self, c, d):
        """Put Gaussian i (centre c[i], displacement d[i] A) in its colour band."""
        band = np.minimum((d / self.vmax * self.NBANDS).astype(np.int64), self.NBANDS - 1)
        order = np.argsort(band, kind='stable')
        edges = np.searchsorted(band[order], np.arange(self.NBANDS + 1))
        for b, line in enumerate(self.bands):
            idx = order[edges[b]:edges[b + 1]]
            line.set_data_3d(c[idx, 0], c[idx, 1], c[idx, 2])
        self.centres, self.displacements = c, d

    def _onDraw(self, event=None):
        """After a full redraw: keep the static background, draw the Gaussians on it."""
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._blit()

    def _blit(self):
        if self._background is None:
            self.canvas.draw()
            return
        self.canvas.restore_region(self._background)
        for line in self.bands:
            self.ax.draw_artist(line)
        self.ax.draw_artist(self.label)
        self.canvas.blit(self.figure.bbox)

    # -- pointer path
    def request(self, x: float, y: float):
        """A pointer event at plot point (x, y): keep only the latest, update when Tk is idle."""
        if not self.follow.get():
            return
        self._pending = (x, y)
        if not self._scheduled:
            self._scheduled = True
            self._flushId = self.frame.after_idle(self._flush)

    def _flush(self):
        self._scheduled, self._flushId = False, None
        if self._pending is not None:
            x, y = self._pending
            self._pending = None
            self.moveTo(x, y)

    def moveTo(self, x: float, y: float):
        """Decode the latent under (x, y) and redraw the 3D view now. Returns the latent."""
        t0 = time.perf_counter()
        z = self.explorer.latentAt(x, y)
        self.explorer.current = z
        c, d = self.explorer.centersAt(z)
        self._setCentres(c, d)
        self.label.set_text('z = [%s]\nlargest move %.1f A' % (', '.join('%.2f' % v for v in z), d.max()))
        self._blit()
        self.seconds += time.perf_counter() - t0
        self.updates += 1
        return z

    def cancelPending(self):
        """Drop the queued pointer update and redraw (the window is closing: their Tk commands
        go with it, and Tk would report "invalid command name" from a later event loop)."""
        if self._flushId is not None:
            self.frame.after_cancel(self._flushId)
        self._pending, self._scheduled, self._flushId = None, False, None
        cancelIdleDraw(self.canvas)

    def updatesPerSecond(self) -> float:
        return self.updates / self.seconds if self.seconds > 0 else 0.0

    # -- buttons
    def saveMap(self):
        z = self.explorer.current
        if self.explorer.saveMap is None:
            self.status('No map: this explorer has no trained model to render.')
            return None
        name = 'gmmhet_z_%s.mrc' % '_'.join('%.2f' % v for v in z)
        try:
            self.lastMap = os.path.abspath(self.explorer.saveMap(z, name))
        except Exception as exc:
            self.status('No map: %s' % exc)
            return None
        self.status('Map at z = [%s]: %s' % (', '.join('%.3g' % v for v in z), self.lastMap))
        return self.lastMap

    def openInChimerax(self):
        path = self.lastMap or self.saveMap()
        if path is None:
            return None
        cxc = os.path.splitext(path)[0] + '.cxc'
        if not self.chimerax:
            self.status('ChimeraX is not installed (scipion-em-chimera). Open the map with:  '
                        'chimerax %s' % cxc)
            return None
        import subprocess
        subprocess.Popen([self.chimerax, cxc])
        self.status('Opened in ChimeraX: %s' % cxc)
        return cxc
