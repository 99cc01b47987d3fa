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
"""Viewer of "gmmhet - build Gaussian model": the FSC between the model and the input map, and
the Gaussian centres over the map in ChimeraX (a ``.cmm`` marker file and a ``.cxc`` command
file; ChimeraX is launched where it is installed).

Module-level functions do the same headless, for tests and the demo report:
:func:`writeFscPng`, :func:`writeMarkerFile`, :func:`writeChimeraxScript`,
:func:`writeBuildReport`.
"""
from __future__ import annotations

import os

import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter

from ..protocols.protocol_build_gmm import ProtGmmhetBuildGmm
from . import plots
from .base import GmmhetViewer


# ---------------------------------------------------------------------------- headless API
def _fscTitle(prot) -> str:
    info = prot.getBuildSummary()
    if not info:
        return 'FSC between the Gaussian model and the map'
    return ('FSC(model, map): %d Gaussians, target %.3g A, 0.5 at %.3g A'
            % (info['n_gauss'], float(info['target_resolution_A']), float(info['fsc05_resolution_A'])))


def _drawFsc(ax, prot):
    fsc = prot.getFsc()
    if not fsc:
        raise ValueError('%s: no FSC yet; the build has not finished' % prot.getFscFile())
    freq = np.asarray(fsc['freq_invA'])[1:]
    plots.draw_fsc(ax, freq, {'model vs map': np.asarray(fsc['fsc'])[1:]}, thresholds=(0.5,),
                   title=_fscTitle(prot))
    target = prot.resolution.get()
    if target:
        ax.axvline(1.0 / target, color='red', ls=':', lw=1.0)
        ax.annotate('target %.3g A' % target, (1.0 / target, 0.05), xytext=(3, 0),
                    textcoords='offset points', fontsize='small', color='red')
    return ax


def writeFscPng(prot, outPng: str) -> str:
    """PNG of the FSC between the model and the map (fsc.csv of a finished build), with the
    0.5 line and the target resolution. Returns ``outPng``."""
    fig, (ax,) = plots._new_figure(width_in=6.5)
    _drawFsc(ax, prot)
    return plots._save(fig, outPng)


def writeMarkerFile(gmmFile: str, outCmm: str, color: str = '#ffb000', name: str = 'Gaussians') -> str:
    """Chimera/ChimeraX marker file (``.cmm``) of a gmm.npz: one marker per Gaussian at its
    centre, radius = its width sigma (Angstrom). Coordinates are those of a map of the model's
    box and pixel size whose first voxel is at the origin (ChimeraX's default for an MRC file
    with a zero origin, e.g. ``gmm_map.mrc``). Returns ``outCmm``."""
    with np.load(gmmFile) as z:
        centers = np.asarray(z['centers_A'], dtype=np.float64)
        sigmas = np.asarray(z['sigmas_A'], dtype=np.float64)
        box, apix = int(z['box']), float(z['apix'])
    xyz = centers + (box // 2) * apix
    rgb = [int(color[i:i + 2], 16) / 255.0 for i in (1, 3, 5)]
    lines = ['<marker_set name="%s">' % name]
    for i, ((x, y, zz), s) in enumerate(zip(xyz, sigmas), start=1):
        lines.append('<marker id="%d" x="%.3f" y="%.3f" z="%.3f" r="%.3f" g="%.3f" b="%.3f" '
                     'radius="%.3f"/>' % (i, x, y, zz, rgb[0], rgb[1], rgb[2], s))
    lines.append('</marker_set>')
    tmp = outCmm + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, outCmm)
    return outCmm


def writeChimeraxScript(prot, outCxc: str) -> str:
    """ChimeraX command file: the input map (transparent surface), the model map and the
    Gaussian centres (markers written next to ``outCxc``). Both maps are placed with their first
    voxel at the origin, the frame of the markers. Returns ``outCxc``."""
    outCmm = os.path.splitext(outCxc)[0] + '.cmm'
    writeMarkerFile(prot.getGmmFile(), outCmm)
    lines = ['# gmmhet build Gaussian model: input map, model map and Gaussian centres',
             'open "%s"' % os.path.abspath(prot.getInputMapFile()),
             'open "%s"' % os.path.abspath(prot.getGmmMapFile()),
             'open "%s"' % os.path.abspath(outCmm),
             'volume #1,2 originIndex 0,0,0',
             'volume #1 style surface transparency 0.6 color #b0b0b0',
             'volume #2 style mesh color #3070ff',
             'rename #1 "input map"', 'rename #2 "Gaussian model"', 'rename #3 "Gaussian centres"',
             'view']
    tmp = outCxc + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, outCxc)
    return outCxc


def writeBuildReport(prot, outDir: str) -> dict[str, str]:
    """The viewer's outputs in ``outDir``: ``fsc`` (PNG), ``chimerax`` (.cxc) and ``markers``
    (.cmm). Returns {name: path}."""
    os.makedirs(outDir, exist_ok=True)
    cxc = writeChimeraxScript(prot, os.path.join(outDir, 'gmm_model.cxc'))
    return {'fsc': writeFscPng(prot, os.path.join(outDir, 'gmm_fsc.png')),
            'chimerax': cxc, 'markers': os.path.splitext(cxc)[0] + '.cmm'}


# ---------------------------------------------------------------------------- viewer
class GmmhetBuildGmmViewer(GmmhetViewer):
    """FSC and Gaussian centres of "gmmhet - build Gaussian model"."""
    _label = 'viewer build Gaussian model'
    _targets = [ProtGmmhetBuildGmm]
    _fileTag = 'build'
    _notReady = ('The build has not finished: no FSC yet.', 'Gaussian model')
    _mapsWhat = 'the model'

    def _defineParams(self, form):
        form.addSection(label='Gaussian model')
        form.addParam('displayFsc', params.LabelParam,
                      label='FSC between the model and the map')
        form.addParam('displayChimera', params.LabelParam,
                      label='Gaussian centres over the map in ChimeraX')

    def _getVisualizeDict(self):
        return {'displayFsc': self._showFsc, 'displayChimera': self._showMaps}

    def _isReady(self) -> bool:
        return os.path.exists(self.protocol.getFscFile())

    def _writeMapsScript(self, outCxc: str) -> str:
        return writeChimeraxScript(self.protocol, outCxc)

    def _showFsc(self, paramName=None):
        err = self._ready()
        if err:
            return err
        plotter = EmPlotter(x=1, y=1, figsize=(7, 4.5), windowTitle='FSC model vs map')
        _drawFsc(plotter.createSubPlot('', '', ''), self.protocol)
        plotter.savefig(self._pngPath('fsc.png'))
        return [plotter]
