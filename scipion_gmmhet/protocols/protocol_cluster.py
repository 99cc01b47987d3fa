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
"""Protocol "gmmhet - cluster and reconstruct": clusters the latent space of "train
heterogeneity", renders the Gaussian model at each cluster centre and along the principal
components, and reconstructs each cluster from its particles.

Runs ``gmmhet analyze`` on the canonical star of the input particles (written by
:func:`convert.writeSetOfParticles`, with ``rlnGmmhetParticleId``) and on the latent vectors of
those particles (from their ``_zFlex``, or from the training's ``latent.npy`` through the
training star's ids), so any subset of the trained particles can be analysed. Labels come
back by particle id, never by position.

Outputs
    ``outputClasses`` (SetOfClasses3D): one class per cluster with its particles (alignment and
    CTF kept: each class can go straight into a RELION or cryoSPARC refinement); the
    representative is the cluster's reconstruction (half maps attached), or its GMM map when
    reconstructions are off. ``outputGmmVolumes`` (SetOfVolumes): the decoded Gaussian model at
    each cluster centre (volume id = class id). ``outputTrajectories`` (SetOfVolumes): maps
    along PC1, PC2... (attributes ``_gmmhetPc``, ``_gmmhetStep``).
"""
from __future__ import annotations

import os
import shlex

import numpy as np

import pyworkflow.protocol.params as params
from pyworkflow.object import Float, Integer, String
from pwem.objects import SetOfClasses3D, SetOfVolumes, Volume
from pwem.protocols import ProtAnalysis3D

from .. import Plugin, convert
from ..engine.errors import InputError
from ..engine.io.outputs import AnalysisFolder, reconstruction_paths
from .trained_input import TrainedParticlesInput
from .gpu import cudaAvailable, gpuErrors, protocolGpus
from .validation import maskGridErrors
from .labels import GmmhetLabel

METHOD_KMEANS, METHOD_GMM = 0, 1
METHOD_CHOICES = ['k-means', 'Gaussian mixture']
METHOD_NAMES = ['kmeans', 'gmm']
EMB_PCA, EMB_UMAP, EMB_BOTH = 0, 1, 2
EMB_CHOICES = ['PCA', 'UMAP', 'PCA and UMAP']
EMB_NAMES = ['pca', 'umap', 'both']


class ProtGmmhetCluster(GmmhetLabel, TrainedParticlesInput, ProtAnalysis3D):
    """Cluster the latent space of a trained Gaussian-mixture model and reconstruct each
    cluster from its particles.

    The latent vectors are clustered (k-means or a Gaussian mixture, with the number of
    clusters you choose); the decoded Gaussian model is rendered at each cluster centre and
    along the principal components of the latent space (how the molecule moves); each
    cluster's particles are reconstructed by direct Fourier inversion with CTF correction, with
    half maps and their FSC, to check that each state is in the data and not only in the
    network. The classes keep their particles' alignment and CTF, ready for refinement.
    """
    _label = 'cluster and reconstruct'
    _possibleOutputs = {'outputClasses': SetOfClasses3D, 'outputGmmVolumes': SetOfVolumes,
                        'outputTrajectories': SetOfVolumes, 'outputMotionCorrected': Volume}

    def __init__(self, **kwargs):
        ProtAnalysis3D.__init__(self, **kwargs)

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addHidden(params.USE_GPU, params.BooleanParam, default=cudaAvailable(),
                       label='Use GPU?',
                       help='Decode and reconstruct on a GPU (CUDA). No: on the CPU (fine for '
                            'small sets; reconstructions of 100k+ particles are faster on a GPU).')
        form.addHidden(params.GPU_LIST, params.StringParam, default=Plugin.getDefaultGpu(),
                       label='Choose GPU IDs', help='GPU id to use (the first one listed).')

        form.addSection(label='Input')
        form.addParam('inputParticles', params.PointerParam,
                      pointerClass='SetOfParticlesFlex, SetOfParticles',
                      pointerCondition='hasAlignmentProj', important=True,
                      label='Particles from "train heterogeneity"',
                      help='The output particles of "gmmhet - train heterogeneity" (they carry '
                           'their latent vectors and the trained model), or a subset of them.')
        form.addParam('numberOfClusters', params.IntParam, default=4, validators=[params.GE(1)],
                      label='Number of clusters',
                      help='How many states to separate. Look at the latent space in the '
                           'training viewer first; over-clustering (a few more clusters than '
                           'visible states) is harmless: similar clusters give similar maps.')
        form.addParam('clusterMethod', params.EnumParam, choices=METHOD_CHOICES,
                      default=METHOD_KMEANS, display=params.EnumParam.DISPLAY_HLIST,
                      label='Clustering method',
                      help='k-means: compact, equal-variance clusters (robust default). Gaussian '
                           'mixture: clusters of different shapes and spreads (full covariances).')
        form.addParam('whiten', params.BooleanParam, default=True,
                      label='Cluster on whitened latents?',
                      help='Cluster on the principal components of the latent space that carry at '
                           'least 5% of the variance, each scaled to unit variance. Keeps a wide '
                           'conformational motion from outweighing a compositional difference '
                           '(plain k-means then cuts the motion in half). Set No to cluster the raw '
                           'latent vectors.')
        form.addParam('embedding', params.EnumParam, choices=EMB_CHOICES, default=EMB_PCA,
                      display=params.EnumParam.DISPLAY_HLIST, label='Embedding for plots',
                      help='2-D views of the latent space for the plots (clustering always uses '
                           'the full latent space). UMAP is slower on large sets.')

        form.addSection(label='Maps')
        form.addParam('doReconstruct', params.BooleanParam, default=True,
                      label='Reconstruct each cluster from its particles?',
                      help='Direct Fourier inversion with CTF correction of each cluster\'s '
                           'particles, with half maps and FSC: the check that a state exists in '
                           'the data. The class representatives are these maps.')
        form.addParam('doGmmMaps', params.BooleanParam, default=True,
                      label='Gaussian-model map at each cluster centre?',
                      help='The decoded Gaussian model rendered at each cluster centre in the '
                           'latent space (noise-free, at the model\'s resolution).')
        form.addParam('doTrajectories', params.BooleanParam, default=True,
                      label='Trajectories along the principal components?',
                      help='Maps at evenly spaced points along each principal component of the '
                           'latent space, between its 5th and 95th percentiles (cryoDRGN\'s '
                           'PC traversal): how the molecule moves. Also maps along the 1-D '
                           'trajectory that follows the data (diffusion-map ordering of the '
                           'particles; "PC 0" in the viewer), best for one continuous motion.')
        form.addParam('trajectorySteps', params.IntParam, default=10, condition='doTrajectories',
                      validators=[params.GE(2)], label='Maps per trajectory',
                      help='Number of maps rendered along each principal component, evenly '
                           'spaced from its 5th to its 95th percentile (10: a smooth movie).')
        form.addParam('numberOfPcs', params.IntParam, default=2, condition='doTrajectories',
                      validators=[params.GE(1)], label='Principal components to traverse',
                      help='PC1, PC2, ... (at most the latent dimension).')
        form.addParam('domainMask', params.PointerParam, pointerClass='VolumeMask, Volume',
                      allowsNull=True, expertLevel=params.LEVEL_ADVANCED,
                      label='Domain mask (optional)',
                      help='A mask on one domain: finds the latent direction along which that '
                           'domain moves most while the rest moves least, and renders maps '
                           'along it (domain_XX.mrc in the extra folder).')
        self._defineMotionCorrectedParams(form)
        form.addParam('seed', params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label='Random seed', help='Seed of the clustering, UMAP and half-map split.')
        form.addParallelSection(threads=4, mpi=0)

    # -------------------------- INSERT steps functions -----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, self._inputKey())
        self._insertFunctionStep(self.analyzeStep, self._getAnalyzeArgs())
        if self.doMotionCorrected:
            self._insertFunctionStep(self.motionCorrectedStep, self._getMotionCorrectedArgs())
        self._insertFunctionStep(self.createOutputStep)

    # -------------------------- STEPS functions ------------------------------
    def analyzeStep(self, args):
        Plugin.runGmmhet(self, 'analyze', args,
                         gpuList=protocolGpus(self, first=True))

    def createOutputStep(self):
        parts = self.inputParticles.get()
        apix = parts.getSamplingRate()
        summary = self.getSummary()
        labelById = self.getLabelsById()
        clusters = {c['label']: c for c in summary['clusters']}
        outDir = self.getAnalysisDir()

        def updateParticle(item, _row):
            label = labelById.get(item.getObjId())
            if label is None:
                item._appendItem = False
            else:
                item.setClassId(label + 1)

        def updateClass(cls):
            info = clusters.get(cls.getObjId() - 1, {})
            rep = cls.getRepresentative()
            mapName = info.get('map') or info.get('gmm_map')
            if mapName:
                rep.setFileName(os.path.join(outDir, mapName))
                rep.setSamplingRate(apix)
                if info.get('half1'):
                    rep.setHalfMaps([os.path.join(outDir, info['half1']),
                                     os.path.join(outDir, info['half2'])])
            if info.get('gmm_map'):
                cls._gmmhetGmmMap = String(os.path.join(outDir, info['gmm_map']))
            if info.get('resolution_0143_A') is not None:
                cls._gmmhetResolution = Float(info['resolution_0143_A'])
            cls._gmmhetLatentCenter = String(','.join('%.6g' % v for v in info.get('center', [])))

        classes = self._createSetOfClasses3D(parts)
        classes.classifyItems(updateItemCallback=updateParticle, updateClassCallback=updateClass,
                              iterParams={'orderBy': 'id'})
        outputs = {'outputClasses': classes}

        if any('gmm_map' in c for c in clusters.values()):
            gmmVols = self._createSetOfVolumes('_gmm')
            gmmVols.setSamplingRate(apix)
            for label in sorted(clusters):
                c = clusters[label]
                if 'gmm_map' not in c:
                    continue
                vol = Volume(location=os.path.join(outDir, c['gmm_map']))
                vol.setSamplingRate(apix)
                vol.setObjId(label + 1)
                vol.setObjLabel('cluster %d GMM' % (label + 1))
                vol._gmmhetClusterSize = Integer(c['size'])
                gmmVols.append(vol)
            outputs['outputGmmVolumes'] = gmmVols

        traj = {int(k[2:]): v['maps'] for k, v in (summary.get('trajectories') or {}).items()}
        manifold = (summary.get('manifold_trajectory') or {}).get('maps') or []
        if manifold:
            traj[0] = manifold  # PC 0: the 1-D trajectory along the data manifold
        if traj:
            trajVols = self._createSetOfVolumes('_traj')
            trajVols.setSamplingRate(apix)
            for pc in sorted(traj):
                for step, mapName in enumerate(traj[pc]):
                    vol = Volume(location=os.path.join(outDir, mapName))
                    vol.setSamplingRate(apix)
                    vol.setObjLabel(('PC%d step %d' % (pc, step + 1)) if pc else
                                    'data trajectory step %d' % (step + 1))
                    vol._gmmhetPc = Integer(pc)
                    vol._gmmhetStep = Integer(step + 1)
                    trajVols.append(vol)
            outputs['outputTrajectories'] = trajVols

        if self.doMotionCorrected:
            outputs['outputMotionCorrected'] = self._motionCorrectedVolume(apix)

        self._defineOutputs(**outputs)
        for out in outputs.values():
            self._defineSourceRelation(self.inputParticles, out)

    # -------------------------- motion-corrected map ------------------------
    def _defineMotionCorrectedParams(self, form):
        form.addParam('doMotionCorrected', params.BooleanParam, default=False,
                      label='Motion-corrected consensus map?',
                      help='One map from all the input particles, each inserted with its own '
                           'deformation (decoded Gaussian moves) undone, so moving domains '
                           'sharpen. Two models are trained first, one per half set, with the '
                           'training\'s settings (the half maps stay independent, their FSC '
                           'honest): about the training\'s time again. The plain consensus '
                           'reconstruction of the same particles is made too, for comparison.')
        form.addParam('motionHalfEpochs', params.IntParam, default=0, condition='doMotionCorrected',
                      validators=[params.GE(0)], expertLevel=params.LEVEL_ADVANCED,
                      label='Epochs of each half model',
                      help='0: as many as the training had.')

    def getMotionDir(self) -> str:
        return self._getExtraPath('motion_corrected')

    def getMotionMaps(self) -> dict:
        """Paths of the motion-corrected map (``map``, ``half1``, ``half2``, ``fsc``) and of the
        plain consensus reconstruction of the same particles (``plain``, ``plain_fsc``)."""
        d = self.getMotionDir()
        paths = reconstruction_paths(os.path.join(d, 'motion_corrected.mrc'), mask=False)
        plain = reconstruction_paths(os.path.join(d, 'consensus.mrc'), mask=False)
        paths.update(plain=plain['map'], plain_fsc=plain['fsc'])
        return paths

    def _getMotionCorrectedArgs(self) -> list:
        common = ['--particles %s' % shlex.quote(self.getParticlesStar()), '--seed %d' % self.seed.get(),
                  '--device %s' % ('cuda' if self.usesGpu() else 'cpu')]
        paths = self.getMotionMaps()
        mc = common + ['--motion-corrected', '--train %s' % shlex.quote(self.getTrainDir() or ''),
                       '--out %s' % shlex.quote(paths['map'])]
        if self.motionHalfEpochs.get():
            mc.append('--half-epochs %d' % self.motionHalfEpochs.get())
        return [' '.join(common + ['--out %s' % shlex.quote(paths['plain'])]), ' '.join(mc)]

    def motionCorrectedStep(self, args):
        os.makedirs(self.getMotionDir(), exist_ok=True)
        gpus = protocolGpus(self, first=True)
        for a in args:  # the plain consensus, then the motion-corrected map
            Plugin.runGmmhet(self, 'reconstruct', a, gpuList=gpus)

    def _motionCorrectedVolume(self, apix):
        paths = self.getMotionMaps()
        vol = Volume(location=paths['map'])
        vol.setSamplingRate(apix)
        vol.setHalfMaps([paths['half1'], paths['half2']])
        vol.setObjLabel('motion-corrected consensus')
        vol._gmmhetPlainConsensus = String(paths['plain'])
        return vol

    # -------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = gpuErrors(self, 'GPU IDs: give a GPU id (e.g. 0), or set Use GPU to No.')
        parts = self.inputParticles.get()
        if parts is None:
            return errors + ['Input particles: select the output of "gmmhet - train heterogeneity".']
        if not parts.hasAlignmentProj():
            errors.append('Input particles: no 3D alignment; give the output of "gmmhet - train '
                          'heterogeneity".')
        errors += self._trainDirErrors()
        k = self.numberOfClusters.get()
        if k is None or k < 1:
            errors.append('Number of clusters: give at least 1.')
        elif parts.getSize() and k > parts.getSize():
            errors.append('Number of clusters: %d is more than the %d particles.'
                          % (k, parts.getSize()))
        mask = self.domainMask.get()
        if mask is not None:  # the check and text of gmmhet analyze --domain-mask
            errors += maskGridErrors('Domain mask', mask, self._modelGrid(), 'the Gaussian model')
        return errors

    def _summary(self):
        summary = []
        parts = self.inputParticles.get()
        if parts is not None:
            summary.append('Input: %d particles; %d clusters (%s)'
                           % (parts.getSize(), self.numberOfClusters.get(),
                              METHOD_CHOICES[self.clusterMethod.get()]))
        s = self.getSummary(missingOk=True)
        for c in (s or {}).get('clusters', []):
            line = 'Class %d: %d particles (%.1f%%)' % (c['label'] + 1, c['size'], 100 * c['fraction'])
            if c.get('resolution_0143_A') is not None:
                line += ', FSC 0.143 resolution %.1f A' % c['resolution_0143_A']
            summary.append(line)
        if not s and not self.isFinished():
            summary.append('Outputs not ready yet.')
        return summary

    def _methods(self):
        if not self.hasAttribute('outputClasses'):
            return []
        s = self.getSummary(missingOk=True) or {}
        space = ('their whitened principal components (those carrying at least 5% of the '
                 'variance, each scaled to unit variance)' if self.whiten.get()
                 else 'the raw latent vectors')
        text = ('The latent vectors of %d particles were clustered into %d classes with %s '
                '(scikit-learn) on %s.'
                % (s.get('n_latents', 0), self.numberOfClusters.get(),
                   METHOD_CHOICES[self.clusterMethod.get()], space))
        if self.doReconstruct.get():
            text += (' Each class was reconstructed by direct Fourier inversion with '
                     'Wiener-style CTF correction from two random halves (scipion-em-gmmhet).')
        if self.doGmmMaps.get():
            text += ' The Gaussian model was rendered at each cluster centre.'
        return [text]

    def _citations(self):
        return ['Chen2021']

    # -------------------------- UTILS functions ------------------------------
    def getAnalysisDir(self) -> str:
        return self._getExtraPath('analysis')

    def getSummary(self, missingOk: bool = False) -> dict | None:
        folder = AnalysisFolder(self.getAnalysisDir())
        if not os.path.exists(folder.summary):
            if missingOk:
                return None
            raise InputError('%s: missing; the analysis did not finish' % folder.summary)
        return folder.read_summary()

    def getLabelsById(self) -> dict[int, int]:
        """{particle id: 0-based cluster label} from labels.npy and the star's ids."""
        ids = self._starIds(self.getParticlesStar())
        labels = np.load(AnalysisFolder(self.getAnalysisDir()).labels)
        if len(labels) != len(ids):
            raise InputError('labels.npy: %d labels for %d particles in %s; re-run the protocol'
                             % (len(labels), len(ids), self.getParticlesStar()))
        return {int(pid): int(lab) for pid, lab in zip(ids.tolist(), labels.tolist())}

    def getEmbedding(self, name: str = 'pca') -> np.ndarray | None:
        fn = AnalysisFolder(self.getAnalysisDir()).embedding(name)
        return np.load(fn) if os.path.exists(fn) else None

    def _getAnalyzeArgs(self) -> str:
        args = ['--train %s' % shlex.quote(self.getTrainDir() or ''),
                '--particles %s' % shlex.quote(self.getParticlesStar()),
                '--latents %s' % shlex.quote(self.getLatentsFile()),
                '--clusters %d' % self.numberOfClusters.get(),
                '--method %s' % METHOD_NAMES[self.clusterMethod.get()],
                '--embedding %s' % EMB_NAMES[self.embedding.get()],
                '--seed %d' % self.seed.get(),
                '--device %s' % ('cuda' if self.usesGpu() else 'cpu'),
                '--out %s' % shlex.quote(self.getAnalysisDir())]
        args.append('--whiten' if self.whiten else '--no-whiten')
        if not self.doReconstruct:
            args.append('--no-reconstruct')
        if not self.doGmmMaps:
            args.append('--no-gmm-maps')
        if self.doTrajectories:
            args += ['--traj-steps %d' % self.trajectorySteps.get(), '--pcs %d' % self.numberOfPcs.get()]
        else:
            args.append('--traj-steps 0')
        mask = self.domainMask.get()
        if mask is not None:
            args.append('--domain-mask %s' % shlex.quote(convert.cleanFileName(mask.getFileName())))
        return ' '.join(args)

    def _inputKey(self) -> str:
        parts = self.inputParticles.get()
        return 'particles %s:%s size %s' % (
            self.inputParticles.getObjValue().getObjId() if parts is not None else None,
            self.inputParticles.getExtended(), parts.getSize() if parts is not None else 0)


