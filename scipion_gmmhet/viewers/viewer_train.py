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
"""Viewer of "gmmhet - train heterogeneity": the latent space (PCA or UMAP; scatter and hexbin
density; coloured by a latent coordinate, the defocus or any per-particle attribute) and the
training/validation loss curves.

Every view also renders headless to PNG through :mod:`.plots`; the module-level functions
(:func:`writeLatentPng`, :func:`writeLossPng`, :func:`writeTrainReport`) do it without a GUI,
for tests and the demo report.
"""
from __future__ import annotations

import os

import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter

from ..protocols.protocol_train import ProtGmmhetTrain
from . import plots
from .base import GmmhetViewer
from .latent_selection import LatentSelectionMixin

EMBEDDINGS = ['PCA', 'UMAP']
PLOT_TYPES = ['scatter', 'density (hexbin)', 'scatter and density']
COLOR_NONE, COLOR_LATENT, COLOR_DEFOCUS, COLOR_ATTRIBUTE = range(4)
COLOR_CHOICES = ['nothing', 'a latent coordinate', 'defocus', 'a particle attribute']


# ---------------------------------------------------------------------------- headless API
def particleValue(part, name: str):
    """A per-particle number to colour by: ``'defocus'`` (mean of U and V, Angstrom),
    ``'defocusU'``/``'defocusV'``/``'defocusAngle'``, ``'z<k>'`` (latent coordinate k,
    1-based) or an attribute path such as ``'_rlnRandomSubset'`` or ``'_ctfModel._defocusU'``.
    NaN when the particle lacks it."""
    try:
        if name == 'defocus':
            ctf = part.getCTF()
            return 0.5 * (ctf.getDefocusU() + ctf.getDefocusV())
        if name in ('defocusU', 'defocusV', 'defocusAngle'):
            return float(getattr(part.getCTF(), 'get' + name[0].upper() + name[1:])())
        if name.startswith('z') and name[1:].isdigit():
            return float(part.getZFlex()[int(name[1:]) - 1])
        obj = part
        for attr in name.split('.'):
            obj = getattr(obj, attr)
        value = obj.get() if hasattr(obj, 'get') else obj
        return float(value)
    except (AttributeError, IndexError, TypeError, ValueError):
        return float('nan')


def latentTable(partSet, colorBy: str | None = None):
    """Ids ``(N,)``, latents ``(N, K)`` and, with ``colorBy`` (see :func:`particleValue`),
    values ``(N,)`` read particle by particle from a SetOfParticlesFlex, so every row of the
    three arrays belongs to the same particle."""
    ids, zs, values = [], [], []
    for part in partSet.iterItems(orderBy='id'):
        ids.append(part.getObjId())
        zs.append(part.getZFlex())
        if colorBy:
            values.append(particleValue(part, colorBy))
    partSet.close()  # reopened on demand; a continued run replaces the set's file
    if not ids:
        raise ValueError('the output particles are empty')
    z = np.asarray(zs, dtype=np.float32)
    return (np.asarray(ids, dtype=np.int64), z,
            np.asarray(values, dtype=np.float64) if colorBy else None)


def colorLabel(colorBy: str | None) -> str:
    if not colorBy:
        return ''
    return {'defocus': 'defocus (A)', 'defocusU': 'defocus U (A)',
            'defocusV': 'defocus V (A)'}.get(colorBy, colorBy)


def writeLatentPng(prot, outPng: str, method: str = 'pca', colorBy: str | None = None,
                   kind: str = 'both', seed: int = 0) -> str:
    """PNG of the latent space of a finished training protocol: ``method`` 'pca' or 'umap',
    ``kind`` 'scatter', 'hexbin' or 'both' (side by side), coloured by ``colorBy``. Returns
    ``outPng``."""
    _, z, values = latentTable(prot.outputParticles, colorBy)
    xy, axes = plots.embed_latents(z, method, seed=seed)
    label = colorLabel(colorBy)
    title = '%s of the %d-D latent space' % (method.upper(), z.shape[1])
    if kind == 'scatter':
        return plots.plot_scatter(xy, outPng, values=values, value_label=label,
                                  axis_labels=axes, title=title)
    if kind == 'hexbin':
        return plots.plot_hexbin(xy, outPng, values=values, value_label=label,
                                 axis_labels=axes, title=title)
    return plots.plot_embedding(xy, outPng, values=values, value_label=label,
                                axis_labels=axes, title=title)


def writeLossPng(prot, outPng: str) -> str:
    """PNG of the training and validation loss per epoch (from the run's loss.csv)."""
    return plots.plot_loss_curves(prot.getLossFile(), outPng,
                                  title='Training and validation loss (%s)' % prot.getRunName())


def writeTrainReport(prot, outDir: str, methods=('pca',), colorBy: str | None = 'defocus'
                     ) -> dict[str, str]:
    """The viewer's figures as PNGs in ``outDir``: ``loss``, ``latent_<method>`` (density and
    scatter coloured by ``colorBy``). Returns {name: path}."""
    os.makedirs(outDir, exist_ok=True)
    out = {'loss': writeLossPng(prot, os.path.join(outDir, 'train_loss.png'))}
    for m in methods:
        out['latent_%s' % m] = writeLatentPng(prot, os.path.join(outDir, 'latent_%s.png' % m),
                                              method=m, colorBy=colorBy)
    return out


# ---------------------------------------------------------------------------- viewer
class GmmhetTrainViewer(LatentSelectionMixin, GmmhetViewer):
    """Latent space, training curves, interactive selection and the live 3D explorer of
    "gmmhet - train heterogeneity" (the one viewer "Analyze results" opens)."""
    _label = 'viewer train heterogeneity'
    _targets = [ProtGmmhetTrain]
    _fileTag = 'train'

    def _defineParams(self, form):
        form.addSection(label='Latent space')
        form.addParam('embedding', params.EnumParam, choices=EMBEDDINGS, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label='Embedding',
                      help='PCA: linear, axes ordered by variance (fast). UMAP: non-linear, '
                           'separates clusters better (slower on large sets).')
        form.addParam('plotType', params.EnumParam, choices=PLOT_TYPES, default=2,
                      display=params.EnumParam.DISPLAY_COMBO, label='Plot',
                      help='Scatter of the particles and/or hexagonal-bin density (log '
                           'counts, or the mean colour value per bin).')
        form.addParam('colorBy', params.EnumParam, choices=COLOR_CHOICES, default=COLOR_NONE,
                      display=params.EnumParam.DISPLAY_COMBO, label='Colour by',
                      help='Colour the particles by a latent coordinate, their defocus or any '
                           'numeric particle attribute (e.g. _rlnRandomSubset).')
        form.addParam('latentIndex', params.IntParam, default=1, condition='colorBy == 1',
                      validators=[params.GE(1)], label='Latent coordinate (1..K)')
        form.addParam('attributeName', params.StringParam, default='_rlnRandomSubset',
                      condition='colorBy == 3', label='Attribute',
                      help='Attribute path on the particle, e.g. _rlnRandomSubset or '
                           '_ctfModel._defocusU.')
        form.addParam('displayLatent', params.LabelParam, label='Show the latent space')
        form.addParam('displayLoss', params.LabelParam,
                      label='Show training and validation loss',
                      help='Loss per epoch on the training and the validation particles: look '
                           'at it first; a validation loss that rises while the training loss '
                           'falls means over-fitting (fewer epochs).')
        form.addSection(label='Interactive')
        self._defineSelectionParams(form, embedding=False)

    def _getVisualizeDict(self):
        return {'displayLatent': self._showLatent, 'displayLoss': self._showLoss,
                'displaySelection': self._showSelection}

    def _selectionColorBy(self):
        return self._colorBy()

    def _colorBy(self) -> str | None:
        choice = self.colorBy.get()
        if choice == COLOR_LATENT:
            return 'z%d' % self.latentIndex.get()
        if choice == COLOR_DEFOCUS:
            return 'defocus'
        if choice == COLOR_ATTRIBUTE:
            return (self.attributeName.get() or '').strip() or None
        return None

    def _showLatent(self, paramName=None):
        prot = self.protocol
        if not prot.hasAttribute('outputParticles'):
            return [self.errorMessage('The training has no output particles yet.',
                                      title='No latent space')]
        method = EMBEDDINGS[self.embedding.get()].lower()
        colorBy = self._colorBy()
        kind = ('scatter', 'hexbin', 'both')[self.plotType.get()]
        _, z, values = latentTable(prot.outputParticles, colorBy)
        if colorBy and values is not None and not np.isfinite(values).any():
            return [self.errorMessage('No particle has a value for "%s".' % colorBy,
                                      title='Colour by')]
        xy, axes = plots.embed_latents(z, method)
        label = colorLabel(colorBy)
        title = '%s of the %d-D latent space' % (method.upper(), z.shape[1])
        ncols = 2 if kind == 'both' else 1
        plotter = EmPlotter(x=1, y=ncols, figsize=(5.5 * ncols, 4.5), windowTitle=title)
        if kind in ('scatter', 'both'):
            plots.draw_scatter(plotter.createSubPlot('', axes[0], axes[1]), xy, values=values,
                               value_label=label, axis_labels=axes,
                               title='%d particles' % len(xy))
        if kind in ('hexbin', 'both'):
            plots.draw_hexbin(plotter.createSubPlot('', axes[0], axes[1]), xy,
                              values=values if kind == 'hexbin' else None,
                              value_label=label, axis_labels=axes)
        plotter.savefig(self._pngPath('latent_%s.png' % method))
        return [plotter]

    def _showLoss(self, paramName=None):
        prot = self.protocol
        if not os.path.exists(prot.getLossFile()):
            return [self.errorMessage('No loss.csv yet: the training has not finished an '
                                      'epoch.', title='No training curves')]
        plotter = EmPlotter(x=1, y=1, figsize=(6.5, 4.5), windowTitle='Training curves')
        plots.draw_loss(plotter.createSubPlot('', 'epoch', 'loss'), prot.getLossFile(),
                        title='Training and validation loss')
        plotter.savefig(self._pngPath('loss.png'))
        return [plotter]
