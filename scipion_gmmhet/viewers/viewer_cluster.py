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
"""Viewer of "gmmhet - cluster and reconstruct": the latent embedding coloured by class with
the class centres labelled, the class sizes, the per-class half-map FSC curves, and the maps
opened together in ChimeraX (a ``.cxc`` command file; ChimeraX is launched where installed).

It also plays a principal-component trajectory as a ChimeraX volume series
(:func:`writeTrajectoryChimerax`; Scipion's own volume viewer where ChimeraX is not installed)
and shows the Gaussian displacements between two class centres (:func:`writeDisplacementFiles`:
BILD arrows, CMM markers, a quiver plot and a ChimeraX file opening both GMM maps with the
arrows).

Headless: :func:`writeEmbeddingPng`, :func:`writeClassSizesPng`, :func:`writeFscPng`,
:func:`writeChimeraxScript`, :func:`writeTrajectoryChimerax`, :func:`writeDisplacementFiles`
and :func:`writeClusterReport` need no GUI (tests, demo report).
Every array is read from the analysis folder, whose files are all in the star's row order
(labels.npy, embedding_*.npy), so rows of one file belong to the same particle as rows of the
others.
"""
from __future__ import annotations

import os

import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter

from ..engine.errors import InputError
from ..engine.io.outputs import AnalysisFolder, read_fsc_csv
from ..protocols.protocol_cluster import ProtGmmhetCluster
from . import chimerax as cx
from .base import GmmhetViewer
from . import plots

EMBEDDINGS = ['PCA', 'UMAP']


# ---------------------------------------------------------------------------- headless API
def _clusterData(prot, embedding: str = 'pca'):
    """(xy (N, 2), labels (N,) 1-based, centres (k, 2) at each cluster's on-data point nearest
    its centre, axis labels, summary)."""
    s = prot.getSummary()
    emb = prot.getEmbedding(embedding)
    if emb is None:
        raise ValueError('no %s embedding in %s; choose another embedding or re-run with it'
                         % (embedding.upper(), prot.getAnalysisDir()))
    labels = np.load(AnalysisFolder(prot.getAnalysisDir()).labels) + 1
    if emb.shape[1] < 2:
        emb = np.concatenate([emb, np.zeros_like(emb)], axis=1)
    xy = emb[:, :2]
    centres = np.array([xy[c['nearest_row']] for c in s['clusters']])
    if embedding == 'pca':
        ev = s.get('pca_explained_variance_ratio', [])
        axes = tuple('PC%d%s' % (i + 1, ' (%.0f%%)' % (100 * ev[i]) if i < len(ev) else '')
                     for i in range(2))
    else:
        axes = ('UMAP1', 'UMAP2')
    return xy, labels, centres, axes, s


def drawEmbedding(ax, prot, embedding: str = 'pca'):
    xy, labels, centres, axes, s = _clusterData(prot, embedding)
    return plots.draw_scatter(ax, xy, labels=labels, value_label='class (size)', axis_labels=axes,
                              centers=centres,
                              title='%s, %d classes (%s)' % (embedding.upper(), len(s['clusters']),
                                                             s.get('method', '')))


def writeEmbeddingPng(prot, outPng: str, embedding: str = 'pca') -> str:
    """Embedding coloured by class, class centres labelled 1..k. Returns ``outPng``."""
    xy, labels, centres, axes, s = _clusterData(prot, embedding)
    return plots.plot_scatter(xy, outPng, labels=labels, value_label='class (size)', axis_labels=axes,
                              centers=centres,
                              title='%s, %d classes (%s)' % (embedding.upper(), len(s['clusters']),
                                                             s.get('method', '')))


def drawClassSizes(ax, prot):
    s = prot.getSummary()
    sizes = [c['size'] for c in s['clusters']]
    x = np.arange(1, len(sizes) + 1)
    bars = ax.bar(x, sizes, color='tab:blue')
    for b, c in zip(bars, s['clusters']):
        ax.annotate('%.1f%%' % (100 * c['fraction']), (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha='center', va='bottom', fontsize='small')
    ax.set_xticks(x)
    ax.set_xlabel('class')
    ax.set_ylabel('particles')
    ax.set_title('Class sizes (%d particles)' % sum(sizes))
    return ax


def writeClassSizesPng(prot, outPng: str) -> str:
    fig, (ax,) = plots._new_figure()
    drawClassSizes(ax, prot)
    return plots._save(fig, outPng)


def fscCurves(prot) -> tuple[np.ndarray, dict]:
    """(frequencies in 1/A, {'class k (R A)': half-map FSC}) of the class reconstructions."""
    s = prot.getSummary()
    freq, curves = None, {}
    for c in s['clusters']:
        if not c.get('fsc_csv'):
            continue
        t = read_fsc_csv(os.path.join(prot.getAnalysisDir(), c['fsc_csv']))
        freq = t['freq_invA']
        curves['class %d (%.1f A)' % (c['label'] + 1, c.get('resolution_0143_A', float('nan')))] = t['fsc']
    return freq, curves


def writeFscPng(prot, outPng: str) -> str:
    freq, curves = fscCurves(prot)
    if not curves:
        raise ValueError('no class reconstructions (the protocol ran without them)')
    return plots.plot_fsc_curves(freq, curves, outPng, title='Half-map FSC of the class reconstructions')


def classMaps(prot) -> list[tuple[str, str]]:
    """[(label, absolute map path)]: each class's reconstruction, then its GMM map."""
    s = prot.getSummary()
    out = []
    for c in s['clusters']:
        for key, what in (('map', 'reconstruction'), ('gmm_map', 'GMM')):
            if c.get(key):
                out.append(('class %d %s' % (c['label'] + 1, what),
                            os.path.abspath(os.path.join(prot.getAnalysisDir(), c[key]))))
    return out


def writeChimeraxScript(prot, outCxc: str) -> str:
    """ChimeraX command file opening every class map (reconstructions, then GMM maps) side by
    side with the same colour per class. Returns ``outCxc``."""
    import matplotlib
    cmap = matplotlib.colormaps['tab10']
    s = prot.getSummary()
    lines = ['# gmmhet cluster and reconstruct: %d classes' % len(s['clusters'])]
    n = 0
    for c in s['clusters']:
        color = matplotlib.colors.to_hex(cmap(c['label'] % 10))
        for key in ('map', 'gmm_map'):
            if c.get(key):
                n += 1
                path = os.path.abspath(os.path.join(prot.getAnalysisDir(), c[key]))
                lines.append('open "%s"' % path)
                lines.append('volume #%d color %s' % (n, color))
                lines.append('rename #%d "class %d %s"' % (n, c['label'] + 1,
                                                           'GMM' if key == 'gmm_map' else 'map'))
    lines += ['tile', 'view']
    tmp = outCxc + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, outCxc)
    return outCxc


def trajectoryMaps(prot, pc: int) -> list[str]:
    """Absolute paths of the maps along principal component ``pc`` (1-based), in step order
    (summary.json 'trajectories' -> 'pc<pc>' -> 'maps', written in step order by the analysis);
    ``pc`` 0: the 1-D trajectory along the data manifold ('manifold_trajectory')."""
    summary = prot.getSummary()
    if int(pc) == 0:
        maps = (summary.get('manifold_trajectory') or {}).get('maps') or []
        if not maps:
            raise ValueError('no trajectory along the data in %s; re-run the protocol with '
                             'trajectories' % prot.getAnalysisDir())
        return [os.path.abspath(os.path.join(prot.getAnalysisDir(), m)) for m in maps]
    traj = summary.get('trajectories') or {}
    key = 'pc%d' % int(pc)
    if key not in traj:
        have = ', '.join(sorted(traj)) or 'none'
        raise ValueError('PC%d: no trajectory in %s (trajectories: %s); choose another PC or re-run '
                         'the protocol with trajectories' % (int(pc), prot.getAnalysisDir(), have))
    return [os.path.abspath(os.path.join(prot.getAnalysisDir(), m)) for m in traj[key]['maps']]


def writeTrajectoryChimerax(prot, pc: int, outDir: str) -> str:
    """ChimeraX command file playing the maps along principal component ``pc`` (1-based) as one
    volume series, back and forth. Returns the ``.cxc`` path (``outDir``/pc<pc>_trajectory.cxc)."""
    maps = trajectoryMaps(prot, pc)
    os.makedirs(outDir, exist_ok=True)
    return cx.volume_series_cxc(maps, os.path.join(outDir, 'pc%d_trajectory.cxc' % int(pc)),
                                name='PC%d trajectory' % int(pc),
                                comment='gmmhet: PC%d trajectory, %d maps' % (int(pc), len(maps)))


def _clusterByClass(summary: dict, classId: int) -> dict:
    for c in summary['clusters']:
        if int(c['label']) + 1 == int(classId):
            return c
    raise ValueError('class %d: no such class (classes 1..%d); choose one of them'
                     % (int(classId), len(summary['clusters'])))


def writeDisplacementFiles(prot, classA: int, classB: int, outDir: str, model=None,
                           exaggerate: float = 1.0, minLength_A: float = 0.5) -> dict[str, str]:
    """Gaussian displacements from the decoded GMM at class ``classA``'s latent centre to the one
    at class ``classB``'s (1-based class ids as shown by the viewer; centres from summary.json
    'clusters'[i]['center']). ``model``: anything with ``gmm_at(z) -> GMM`` (default: the trained
    model of ``prot.getTrainDir()``). Writes in ``outDir``: the two GMM maps (MRC), arrows
    (``.bild``, one per Gaussian moving more than ``minLength_A``, drawn ``exaggerate`` times
    longer), markers at class A's centres (``.cmm``), a quiver plot (PNG) and a ``.cxc`` opening
    the two maps with the arrows and markers. Returns {'map_a', 'map_b', 'bild', 'cmm', 'png',
    'cxc': path}."""
    from ..engine.analysis.latent import plot_quiver_png
    from ..engine.io.mrc import write_map
    if int(classA) == int(classB):
        raise ValueError('classes %d and %d: choose two different classes' % (classA, classB))
    s = prot.getSummary()
    ca, cb = _clusterByClass(s, classA), _clusterByClass(s, classB)
    if model is None:
        from ..engine.training.trained import load_trained
        trainDir = prot.getTrainDir()
        if not trainDir:
            raise ValueError('no training folder for the input particles; the displacements need '
                             'the trained model')
        model = load_trained(trainDir)
    ga = model.gmm_at(np.asarray(ca['center'], dtype=np.float32))
    gb = model.gmm_at(np.asarray(cb['center'], dtype=np.float32))
    os.makedirs(outDir, exist_ok=True)
    stem = os.path.join(outDir, 'class%d_to_class%d' % (int(classA), int(classB)))
    out = {}
    for key, g, cid in (('map_a', ga, classA), ('map_b', gb, classB)):
        out[key] = stem + '_gmm%d.mrc' % int(cid)
        write_map(out[key], g.render(), g.apix)
    disp = np.asarray(gb.centers_A, np.float64) - np.asarray(ga.centers_A, np.float64)
    out['bild'] = cx.displacement_bild(ga.centers_A, gb.centers_A, stem + '.bild', ga.box, ga.apix,
                                       min_length_A=minLength_A, exaggerate=exaggerate)
    out['cmm'] = cx.gmm_markers_cmm(ga, stem + '.cmm', name='class %d Gaussians' % int(classA))
    out['png'] = plot_quiver_png(stem + '.png', ga.centers_A, disp,
                                 'class %d -> class %d' % (int(classA), int(classB)))
    out['cxc'] = cx.maps_cxc([out['map_a'], out['map_b']], stem + '.cxc',
                             names=['class %d GMM' % int(classA), 'class %d GMM' % int(classB)],
                             extra_files=[out['bild'], out['cmm']], tile=False,
                             comment='gmmhet: Gaussian displacements, class %d -> class %d '
                                     '(max %.1f A)' % (int(classA), int(classB),
                                                       float(np.linalg.norm(disp, axis=1).max())
                                                       if len(disp) else 0.0))
    return out


def motionCorrectedFsc(prot) -> tuple[np.ndarray, dict]:
    """(frequencies in 1/A, {label: FSC}) of the motion-corrected map and of the plain consensus
    reconstruction of the same particles: half-map FSC, and masked (phase-randomisation
    corrected) where computed. Empty when the protocol ran without the motion-corrected map."""
    if not hasattr(prot, 'getMotionMaps'):
        return None, {}
    paths = prot.getMotionMaps()
    freq, curves = None, {}
    for key, name in (('fsc', 'motion-corrected'), ('plain_fsc', 'plain consensus')):
        if not os.path.exists(paths[key]):
            return None, {}
        t = read_fsc_csv(paths[key])
        freq = t['freq_invA']
        curves['%s (%.1f A)' % (name, _res0143(freq, t['fsc']))] = t['fsc']
        if 'fsc_masked' in t:
            curves['%s, masked (%.1f A)' % (name, _res0143(freq, t['fsc_masked']))] = t['fsc_masked']
    return freq, curves


def _res0143(freq, fsc) -> float:
    from ..engine.model.fourier import resolution_at_threshold
    return float(resolution_at_threshold(freq, fsc, 0.143))


def writeMotionCorrectedFscPng(prot, outPng: str) -> str:
    freq, curves = motionCorrectedFsc(prot)
    if not curves:
        raise ValueError('no motion-corrected map (the protocol ran without it)')
    return plots.plot_fsc_curves(freq, curves, outPng,
                                 title='Half-map FSC: motion-corrected vs plain consensus')


def writeMotionCorrectedChimerax(prot, outCxc: str) -> str:
    """ChimeraX command file showing the plain consensus and the motion-corrected map side by side."""
    paths = prot.getMotionMaps()
    return cx.maps_cxc([os.path.abspath(paths['plain']), os.path.abspath(paths['map'])], outCxc,
                       names=['plain consensus', 'motion-corrected'], colors=['#a0a0a0', '#3070ff'],
                       comment='gmmhet: plain consensus vs motion-corrected consensus of the same particles')


def writeClusterReport(prot, outDir: str) -> dict[str, str]:
    """All the viewer's figures (PNG) and ChimeraX files (class maps; one volume series per PC
    trajectory, 'trajectory_pc<i>') in ``outDir``; returns {name: path}."""
    os.makedirs(outDir, exist_ok=True)
    out = {'embedding_pca': writeEmbeddingPng(prot, os.path.join(outDir, 'classes_pca.png'), 'pca'),
           'sizes': writeClassSizesPng(prot, os.path.join(outDir, 'class_sizes.png')),
           'chimerax': writeChimeraxScript(prot, os.path.join(outDir, 'classes.cxc'))}
    if prot.getEmbedding('umap') is not None:
        out['embedding_umap'] = writeEmbeddingPng(prot, os.path.join(outDir, 'classes_umap.png'), 'umap')
    if fscCurves(prot)[1]:
        out['fsc'] = writeFscPng(prot, os.path.join(outDir, 'class_fsc.png'))
    for name in sorted(prot.getSummary().get('trajectories') or {}):
        out['trajectory_%s' % name] = writeTrajectoryChimerax(prot, int(name[2:]), outDir)
    if motionCorrectedFsc(prot)[1]:
        out['motion_fsc'] = writeMotionCorrectedFscPng(prot, os.path.join(outDir, 'motion_corrected_fsc.png'))
        out['motion_chimerax'] = writeMotionCorrectedChimerax(prot, os.path.join(outDir, 'motion_corrected.cxc'))
    return out


# ---------------------------------------------------------------------------- viewer
class GmmhetClusterViewer(GmmhetViewer):
    """Classes of "gmmhet - cluster and reconstruct": embedding, sizes, FSC, maps."""
    _label = 'viewer cluster and reconstruct'
    _targets = [ProtGmmhetCluster]
    _fileTag = 'cluster'
    _notReady = ('The analysis has not finished yet.', 'No classes')
    _fscTitle = 'Half-map FSC of the class reconstructions'
    _fscMissing = 'The protocol ran without class reconstructions.'
    _mapsWhat = 'the class maps'

    def _defineParams(self, form):
        form.addSection(label='Classes')
        form.addParam('embedding', params.EnumParam, choices=EMBEDDINGS, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label='Embedding',
                      help='UMAP is available when the protocol computed it.')
        form.addParam('displayEmbedding', params.LabelParam,
                      label='Show the latent space coloured by class')
        form.addParam('displaySizes', params.LabelParam, label='Show the class sizes')
        form.addParam('displayFsc', params.LabelParam, label='Show the FSC curves')
        form.addParam('displayMaps', params.LabelParam, label='Open the class maps in ChimeraX')
        form.addParam('displayMotionCorrected', params.LabelParam,
                      label='Motion-corrected consensus vs plain consensus',
                      help='Their half-map FSC curves (unmasked and masked), and both maps in '
                           'ChimeraX. Needs the protocol\'s "Motion-corrected consensus map".')
        form.addSection(label='Motions')
        form.addParam('pc', params.IntParam, default=1, validators=[params.GE(0)],
                      label='Principal component (0: along the data)',
                      help='1-based; the protocol computed trajectories for its first PCs. 0: the '
                           '1-D trajectory along the data manifold (a diffusion-map ordering of '
                           'the particles, for a continuous motion).')
        form.addParam('displayTrajectory', params.LabelParam, label='Play PC trajectory',
                      help='The maps along this PC as a ChimeraX volume series (Scipion\'s '
                           'volume viewer where ChimeraX is not installed).')
        form.addParam('classA', params.IntParam, default=1, validators=[params.GE(1)],
                      label='From class')
        form.addParam('classB', params.IntParam, default=2, validators=[params.GE(1)],
                      label='To class')
        form.addParam('displayDisplacements', params.LabelParam,
                      label='Gaussian displacements between two classes',
                      help='Arrows from each Gaussian at the first class centre to the same '
                           'Gaussian at the second (quiver plot, and ChimeraX with both GMM maps).')

    def _getVisualizeDict(self):
        return {'displayEmbedding': self._showEmbedding, 'displaySizes': self._showSizes,
                'displayFsc': self._showFsc, 'displayMaps': self._showMaps,
                'displayTrajectory': self._showTrajectory,
                'displayDisplacements': self._showDisplacements,
                'displayMotionCorrected': self._showMotionCorrected}

    def _isReady(self) -> bool:
        return self.protocol.getSummary(missingOk=True) is not None

    def _fscCurves(self):
        return fscCurves(self.protocol)

    def _writeMapsScript(self, outCxc: str) -> str:
        return writeChimeraxScript(self.protocol, outCxc)

    def _showEmbedding(self, paramName=None):
        err = self._ready()
        if err:
            return err
        name = EMBEDDINGS[self.embedding.get()].lower()
        if self.protocol.getEmbedding(name) is None:
            return [self.errorMessage('The protocol did not compute a %s embedding.' % name.upper(),
                                      title='Embedding')]
        plotter = EmPlotter(x=1, y=1, figsize=(6.5, 5.5), windowTitle='Classes (%s)' % name.upper())
        drawEmbedding(plotter.createSubPlot('', '', ''), self.protocol, name)
        plotter.savefig(self._pngPath('embedding_%s.png' % name))
        return [plotter]

    def _showSizes(self, paramName=None):
        err = self._ready()
        if err:
            return err
        plotter = EmPlotter(x=1, y=1, figsize=(6, 4.5), windowTitle='Class sizes')
        drawClassSizes(plotter.createSubPlot('', '', ''), self.protocol)
        return [plotter]

    def _showTrajectory(self, paramName=None):
        err = self._ready()
        if err:
            return err
        pc = self.pc.get()
        try:
            cxc = writeTrajectoryChimerax(self.protocol, pc, self._pngPath('trajectories'))
        except ValueError as e:
            return [self.errorMessage(str(e), title='PC trajectory')]
        # without ChimeraX: the same message as the class maps, naming the command file
        return cx.chimeraxViews(os.path.abspath(cxc), self, what='the PC%d trajectory' % pc)

    def _showDisplacements(self, paramName=None):
        err = self._ready()
        if err:
            return err
        a, b = self.classA.get(), self.classB.get()
        try:
            files = writeDisplacementFiles(self.protocol, a, b, self._pngPath('displacements'))
        except (ValueError, InputError) as e:
            return [self.errorMessage(str(e), title='Gaussian displacements')]
        import matplotlib.image
        plotter = EmPlotter(x=1, y=1, figsize=(15, 5),
                            windowTitle='Gaussian displacements, class %d -> class %d' % (a, b))
        ax = plotter.createSubPlot('', '', '')
        ax.imshow(matplotlib.image.imread(files['png']))
        ax.set_axis_off()
        return [plotter] + cx.chimeraxViews(files['cxc'], self, what='the displacements')

    def _showMotionCorrected(self, paramName=None):
        freq, curves = motionCorrectedFsc(self.protocol)
        if not curves:
            return [self.errorMessage('The protocol ran without the motion-corrected consensus map '
                                      '(Maps tab: Motion-corrected consensus map? = Yes).',
                                      title='Motion-corrected map')]
        plotter = EmPlotter(x=1, y=1, figsize=(7, 4.5), windowTitle='Motion-corrected vs plain consensus')
        plots.draw_fsc(plotter.createSubPlot('', '', ''), freq, curves,
                       title='Half-map FSC: motion-corrected vs plain consensus')
        cxc = writeMotionCorrectedChimerax(self.protocol, self._pngPath('motion_corrected.cxc'))
        return [plotter] + cx.chimeraxViews(cxc, self, what='the consensus maps')
