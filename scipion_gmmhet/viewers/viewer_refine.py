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
"""Viewer of "gmmhet - refine orientations": histograms of the per-particle pose changes
(angle, shift) and of the score gain, the half-map FSC of the reconstructions from the input
and from the refined poses, and both maps in ChimeraX (``.cxc`` command file) where installed.

Headless: :func:`writeChangesPng`, :func:`writeFscPng`, :func:`writeChimeraxScript` and
:func:`writeRefineReport` need no GUI (tests, demo report). Everything is read from the
protocol's ``pose_changes.csv`` (one row per particle, with its id) and reconstruction folder.
"""
from __future__ import annotations

import os

import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter

from ..protocols.protocol_refine import ProtGmmhetRefine
from . import plots
from .base import GmmhetViewer


# ---------------------------------------------------------------------------- headless API
def drawChanges(axes, prot):
    """Three histograms on ``axes``: angular change (deg), shift change (A), score gain."""
    c = prot.getPoseChanges()
    s = prot.getChangeSummary()
    specs = [(c['delta_angle_deg'], 'angular change (deg)',
              'median %.2f, p90 %.2f deg' % (s['angle_median_deg'], s['angle_p90_deg'])),
             (c['delta_shift_A'], 'shift change (A)',
              'median %.2f, p90 %.2f A' % (s['shift_median_A'], s['shift_p90_A'])),
             (c['score_after'] - c['score_before'], 'score gain',
              'mean score %.3f -> %.3f' % (s['score_before_mean'], s['score_after_mean']))]
    for ax, (values, xlabel, title) in zip(axes, specs):
        values = np.asarray(values, dtype=np.float64)
        ax.hist(values[np.isfinite(values)], bins=min(50, max(10, values.size // 20)), color='#4477aa')
        med = float(np.median(values))
        ax.axvline(med, color='#cc3311', lw=1.2, ls='--', label='median')
        ax.set_xlabel(xlabel)
        ax.set_ylabel('particles')
        ax.set_title(title, fontsize='medium')
        ax.legend(loc='best', fontsize='small')
    return axes


def writeChangesPng(prot, outPng: str) -> str:
    """Histograms of the pose changes and score gains. Returns ``outPng``."""
    fig, axes = plots._new_figure(ncols=3, width_in=4.2, height_in=3.8)
    drawChanges(axes, prot)
    title = 'Pose changes of %d particles' % len(prot.getPoseChanges()['row'])
    rounds = prot.getRounds()
    if rounds is not None:
        title += ' (%d refine-retrain round%s; median change per round %s deg)' % (
            len(rounds['round']), '' if len(rounds['round']) == 1 else 's',
            ', '.join('%.2f' % m for m in rounds['angle_median_deg']))
    return plots._save(fig, outPng, suptitle=title)


def fscCurves(prot) -> tuple[np.ndarray | None, dict]:
    """(frequencies 1/A, {'input poses (R A)': FSC, 'refined poses (R A)': FSC}) of the half
    maps (masked FSC when the reconstruction computed it)."""
    freq, curves = None, {}
    for which, name in (('before', 'input poses'), ('after', 'refined poses')):
        t = prot.getFsc(which)
        if t is None:
            continue
        freq = t['freq_invA']
        curve = t['fsc_masked'] if 'fsc_masked' in t else t['fsc']
        curves['%s (%.2f A)' % (name, prot.getResolution(which))] = curve
    for which, name in (('plain', 'domain mask, particle poses'), ('domain', 'domain mask, domain poses')):
        t = prot.getDomainFsc(which)
        if t is None or (freq is not None and len(t['freq_invA']) != len(freq)):
            continue
        freq = t['freq_invA']
        curves[name] = t['fsc_masked'] if 'fsc_masked' in t else t['fsc']
    return freq, curves


def writeFscPng(prot, outPng: str) -> str:
    freq, curves = fscCurves(prot)
    if not curves:
        raise ValueError('no reconstructions (the protocol ran without them)')
    poses = any(not k.startswith('domain mask') for k in curves)
    domain = any(k.startswith('domain mask') for k in curves)
    title = ' ; '.join(t for t, on in (('Half-map FSC before / after refinement', poses),
                                       ('domain maps (domain-masked FSC)', domain)) if on)
    return plots.plot_fsc_curves(freq, curves, outPng, title=title)


def writeChimeraxScript(prot, outCxc: str) -> str:
    """ChimeraX command file opening the reconstructions from the input and the refined poses (and,
    with "Refine one domain?", the domain maps from the particle and the domain poses)."""
    lines = ['# gmmhet refine orientations: reconstructions before / after']
    n = 0
    for which, color in (('before', '#bbbbbb'), ('after', '#4477aa')):
        fn = prot.getReconstruction(which)
        if os.path.exists(fn):
            n += 1
            lines += ['open "%s"' % os.path.abspath(fn), 'volume #%d color %s' % (n, color),
                      'rename #%d "%s"' % (n, 'input poses' if which == 'before' else 'refined poses')]
    for which, color in (('plain', '#bbbbbb'), ('domain', '#cc6677')):
        fn = prot.getDomainMap(which)
        if fn and os.path.exists(fn):
            n += 1
            lines += ['open "%s"' % os.path.abspath(fn), 'volume #%d color %s' % (n, color),
                      'rename #%d "%s"' % (n, 'domain: particle poses' if which == 'plain' else 'domain: domain poses')]
    lines += ['tile', 'view']
    tmp = outCxc + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, outCxc)
    return outCxc


def writeRefineReport(prot, outDir: str) -> dict[str, str]:
    """All the viewer's figures (PNG) and the ChimeraX file in ``outDir``; returns {name: path}."""
    os.makedirs(outDir, exist_ok=True)
    out = {'changes': writeChangesPng(prot, os.path.join(outDir, 'pose_changes.png')),
           'chimerax': writeChimeraxScript(prot, os.path.join(outDir, 'refine_maps.cxc'))}
    if fscCurves(prot)[1]:
        out['fsc'] = writeFscPng(prot, os.path.join(outDir, 'refine_fsc.png'))
    return out


# ---------------------------------------------------------------------------- viewer
class GmmhetRefineViewer(GmmhetViewer):
    """Pose changes and reconstructions of "gmmhet - refine orientations"."""
    _label = 'viewer refine orientations'
    _targets = [ProtGmmhetRefine]
    _fileTag = 'refine'
    _notReady = ('The refinement has not finished yet.', 'No results')
    _fscTitle = 'Half-map FSC before / after refinement'

    def _defineParams(self, form):
        form.addSection(label='Refinement')
        form.addParam('displayChanges', params.LabelParam, label='Show the pose-change histograms')
        form.addParam('displayFsc', params.LabelParam, label='Show the FSC before / after')
        form.addParam('displayMaps', params.LabelParam, label='Open the maps in ChimeraX')

    def _getVisualizeDict(self):
        return {'displayChanges': self._showChanges, 'displayFsc': self._showFsc,
                'displayMaps': self._showMaps}

    def _isReady(self) -> bool:
        return self.protocol.getChangeSummary() is not None

    def _fscCurves(self):
        return fscCurves(self.protocol)

    def _writeMapsScript(self, outCxc: str) -> str:
        return writeChimeraxScript(self.protocol, outCxc)

    def _showChanges(self, paramName=None):
        err = self._ready()
        if err:
            return err
        plotter = EmPlotter(x=1, y=3, figsize=(13, 4.2), windowTitle='Pose changes')
        axes = [plotter.createSubPlot('', '', '') for _ in range(3)]
        drawChanges(axes, self.protocol)
        return [plotter]
