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
"""Protocol "gmmhet - train heterogeneity": e2gmm's encoder-decoder trained on aligned
particles; every particle gets a point of a small latent space.

Output: ``outputParticles``, a Flexibility Hub ``SetOfParticlesFlex`` (program name
:data:`FLEX_PROG_NAME`). Each particle is a copy of the input particle (image, alignment, CTF,
acquisition and any other attribute) with its latent vector in ``_zFlex``
(``particle.getZFlex()``), matched by particle id through the canonical star's
``rlnGmmhetParticleId`` column, never by position. The set's ``FlexInfo`` names the trained
model (``modelPath``, ``trainDir``, ``zDim``, ``gmmFile``...), and so does
:meth:`ProtGmmhetTrain.getTrainDir` for the next protocols.

Continuing: Scipion's *Continue* on an interrupted (or finished, with more epochs) run calls
``gmmhet train --resume`` on the same folder, which restarts from the last complete epoch's
checkpoint; *Restart* trains from scratch. "Continue a previous run" (``doContinue``) trains a
finished run further in a new protocol: its state is copied (never written into the other
protocol's folder) and training resumes up to the new number of epochs.
"""
from __future__ import annotations

import os
import shlex
import shutil

import numpy as np

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pyworkflow.mapper.sqlite_db import SqliteDb
from pyworkflow.object import Integer, String
from pwem.objects import ParticleFlex, SetOfParticlesFlex, Transform
from pwem.objects.data_flexhub import FlexInfo
from pwem.protocols import ProtAnalysis3D

from .. import Plugin, convert
from ..constants import FLEX_PROG_NAME, GMM_FILE_ATTR, TRAIN_DIR_ATTR  # noqa: F401
from ..engine.errors import InputError
from ..engine.io import validate
from ..engine.io.outputs import TrainFolder
from .gpu import cudaAvailable, gpuErrors, protocolGpus
from .validation import CTF_CHOICES, CTF_LABELS, ctfErrors, maskGridErrors, volumeGrid
from .labels import GmmhetLabel
#: Engine names of what the decoder may change, in the order of the form's booleans.
CHANGE_NAMES = ('positions', 'amplitudes', 'widths')


def _joinWords(words) -> str:
    """['positions', 'amplitudes', 'widths'] -> 'positions, amplitudes and widths'."""
    words = list(words)
    return ' and '.join(filter(None, [', '.join(words[:-1]), words[-1]])) if words else ''


class ProtGmmhetTrain(GmmhetLabel, ProtAnalysis3D):
    """Map every particle to a point of a small latent space whose decoded Gaussian model
    explains it (e2gmm's method, Chen & Ludtke, Nat Methods 2021).

    For each particle, the gradient of the FRC between the particle and the neutral Gaussian
    model's projection (at the particle's pose, with its CTF) is encoded into a latent vector;
    the decoder turns that vector into changes of the Gaussians' positions, amplitudes and/or
    widths, and both networks are trained so that the changed model's projection matches the
    particle. Particles need a 3D alignment (projection poses) and CTF (or be phase-flipped).

    The output particles (a Flexibility Hub SetOfParticlesFlex) carry their latent vectors;
    cluster, reconstruct and refine them with the other gmmhet protocols or Flexibility Hub
    tools.
    """
    _label = 'train heterogeneity'
    _possibleOutputs = {'outputParticles': SetOfParticlesFlex}

    def __init__(self, **kwargs):
        ProtAnalysis3D.__init__(self, **kwargs)
        self.nParticles = Integer()
        self.nOutput = Integer()

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addHidden(params.USE_GPU, params.BooleanParam, default=cudaAvailable(),
                       label='Use GPU?',
                       help='Train on a GPU (CUDA). Set to No to train on the CPU (slow, '
                            'fine for small tests).')
        form.addHidden(params.GPU_LIST, params.StringParam, default=Plugin.getDefaultGpu(),
                       label='Choose GPU IDs',
                       help='GPU ids to use, as in other Scipion plugins (e.g. "0" or "0 1"). '
                            'One training process runs per GPU listed (data parallel: each '
                            'GPU takes its share of every batch), so two GPUs take about half '
                            'the time per epoch.')

        form.addSection(label='Input')
        form.addParam('doContinue', params.BooleanParam, default=False,
                      label='Continue a previous run?',
                      help='*Yes*: train a finished "gmmhet - train heterogeneity" run for more '
                           'epochs. Its particles, model and settings are used; only the total '
                           'number of epochs is taken from this form. Its folder is only read.\n'
                           'To resume an interrupted run, use *Continue* on that run instead.')
        form.addParam('continueRun', params.PointerParam, pointerClass='ProtGmmhetTrain',
                      condition='doContinue', allowsNull=True,
                      label='Previous run',
                      help='A finished training run to train further.')
        form.addParam('inputParticles', params.PointerParam, pointerClass='SetOfParticles',
                      pointerCondition='hasAlignmentProj', condition='not doContinue',
                      allowsNull=True, important=True,
                      label='Input particles',
                      help='Particles with 3D alignment (projection poses, e.g. from a '
                           'consensus 3D refinement or "gmmhet - import poses") and CTF, at '
                           'the box size and pixel size of the Gaussian model.')
        form.addParam('ctfChoice', params.EnumParam, choices=CTF_LABELS, default=0,
                      condition='not doContinue', display=params.EnumParam.DISPLAY_COMBO,
                      label='CTF',
                      help='Use the particles\' CTF (raw, phase-flipped or CTF-premultiplied '
                           'images, as the particles say), or None for images that carry no CTF '
                           'parameters (phase-flipped or CTF-free): the CTF is then ignored. '
                           'Particles without CTF are refused unless None is chosen.')
        form.addParam('inputGmm', params.PointerParam, pointerClass='Volume',
                      condition='not doContinue', allowsNull=True, important=True,
                      label='Gaussian model',
                      help='Output volume of "gmmhet - build Gaussian model" (it carries the '
                           'model file). Build it from the consensus map of these particles.')
        # checked in _validate (one clear line; Scipion's GE validator would add a second,
        # vaguer one: "Value should be greater or equal than the threshold")
        form.addParam('zDim', params.IntParam, default=4, condition='not doContinue',
                      label='Latent dimension',
                      help='Dimension of the latent space. 4 (e2gmm\'s default) holds several '
                           'independent motions or compositions; use 2 for a quick look, or '
                           'more for very heterogeneous data.')
        group = form.addGroup('What may change', condition='not doContinue')
        group.addParam('changePositions', params.BooleanParam, default=True,
                       label='Positions',
                       help='The decoder may move the Gaussians (conformational changes).')
        group.addParam('changeAmplitudes', params.BooleanParam, default=True,
                       label='Amplitudes',
                       help='The decoder may change the Gaussians\' amplitudes (compositional '
                            'changes, occupancy, flexible parts fading out).')
        group.addParam('changeWidths', params.BooleanParam, default=False,
                       label='Widths',
                       help='The decoder may change the Gaussians\' widths (local resolution '
                            'changes). Rarely needed; e2gmm\'s "pas" option.')
        group.addParam('focusMask', params.PointerParam, pointerClass='VolumeMask, Volume',
                       allowsNull=True,
                       label='Focus mask (optional)',
                       help='Only Gaussians whose centre lies inside the mask (> 0.5) may '
                            'change; the others stay as in the neutral model. Same box and '
                            'pixel size as the particles.')
        group.addParam('symmetry', params.StringParam, default='C1',
                       expertLevel=params.LEVEL_ADVANCED,
                       label='Symmetry expansion',
                       help='C or D point group (RELION\'s axes), e.g. C3. With a focus mask on '
                            'one asymmetric unit, each particle is used once per symmetry '
                            'operator (pose composed with it) and gives one latent point per '
                            'subunit: the output then has one particle per copy, with new ids '
                            '(attributes _gmmhetSourceId and _gmmhetSymOp name the original '
                            'particle and operator). C1: no expansion.')

        form.addParam('centerParticles', params.BooleanParam, default=True,
                      condition='not doContinue', expertLevel=params.LEVEL_ADVANCED,
                      label='Centre particles first?',
                      help='Yes: before training, each particle\'s shift is checked against the '
                           'projection of the neutral Gaussian model (a shift-only search up to 3 '
                           'px; a shift changes only when the image says so, and the corrections '
                           'are kept only when the half maps agree better with them) and the '
                           'network trains with the corrected shifts. Shift errors of about a pixel '
                           'otherwise become the latent space (simulated 1AKE hinge: |Spearman| '
                           '0.32 instead of 0.93). The input poses are not changed; refine '
                           'orientations refines them. No: the input shifts as they are.')

        form.addParam('posteriorLatents', params.BooleanParam, default=True,
                      condition='not doContinue', expertLevel=params.LEVEL_ADVANCED,
                      label='Latents from the likelihood?',
                      help='Yes: after training, each particle\'s latent vector is the mean over a few '
                           'dozen decoded states of the latent space, weighted by how well each '
                           'explains its image (the posterior). It ranks the particles closer to '
                           'what the images allow than the encoder\'s single pass (simulated 1AKE '
                           'hinge, SNR 0.1: |Spearman| 0.958 -> 0.962, kNN R2 0.904 -> 0.920). '
                           'No: the encoder\'s latent vectors.')

        form.addParam('finerModel', params.BooleanParam, default=True,
                      condition='not doContinue', expertLevel=params.LEVEL_ADVANCED,
                      label='Finer Gaussian model from the data?',
                      help='Yes (default): when the particles\' reconstruction at their poses is finer than the '
                           'Gaussian model\'s build resolution, the network is trained first on the input '
                           'model, then on a finer Gaussian model of the motion-corrected reconstruction '
                           '(each particle\'s decoded motion undone), in a band to its resolution, the '
                           'second network started from the first (gmmhet train --finer-model auto; 3-5x '
                           'the training time). Simulated 1AKE hinge with molecular-dynamics-like disorder, '
                           'SNR 0.1, model built at 8 A: |Spearman| 0.944 -> 0.957, kNN R2 0.884 -> 0.911; '
                           'two independent motions 0.952 / 0.807 -> 0.961 / 0.842. The summary warns when the finer network has fewer '
                           'latent directions than the first; the first model (train/first_model) is kept to '
                           'compare; otherwise the network trains once. 1AKE hinge with rigid domains: 0.962 -> '
                           '0.973. No: train once on the input model (the faster choice; refinement from the '
                           'finer network also takes 3-4x longer).')

        form.addSection(label='Training')
        form.addParam('numberOfEpochs', params.IntParam, default=30, validators=[params.GE(1)],
                      label='Epochs',
                      help='Passes over the particles. The validation loss of a few thousand '
                           'particles usually flattens after 20-30 epochs; check the loss '
                           'curves in the viewer. When continuing, this is the total: training '
                           'goes on from the last epoch done up to this number.')
        form.addParam('batchSize', params.IntParam, default=64, condition='not doContinue',
                      validators=[params.GE(1)], expertLevel=params.LEVEL_ADVANCED,
                      label='Batch size (particles)',
                      help='Particles per training step. 64 gives many steps per epoch on '
                           'small sets; on a large GPU, 256 or more is faster per epoch.')

        form.addParam('learningRate', params.FloatParam, default=1e-4,
                      condition='not doContinue', validators=[params.GT(0)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Learning rate',
                      help='Adam learning rate. 1e-4 (e2gmm\'s) converges in a few tens of '
                           'epochs without oscillating on noisy data.')
        form.addParam('seed', params.IntParam, default=0, condition='not doContinue',
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Random seed',
                      help='Fixes the initial weights, the particle order, the validation '
                           'subset and the latent noise: the same seed gives the same result on '
                           'the CPU.')
        form.addParam('mixedPrecision', params.EnumParam, choices=['off', 'bf16', 'fp16'], default=0,
                      expertLevel=params.LEVEL_ADVANCED, display=params.EnumParam.DISPLAY_HLIST,
                      label='Mixed precision (GPU)',
                      help='Run the encoder and decoder networks in bfloat16 or float16 (the GMM '
                           'projection and the FRC stay in float32). bf16 needs no loss scaling; '
                           'fp16 (with loss scaling) needs a CUDA GPU. off: float32 throughout.')
        form.addParam('compileModel', params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Compile the networks (torch.compile)?',
                      help='Compile the encoder and decoder with torch.compile (faster epochs after '
                           'a one-off compilation); falls back to plain PyTorch, with a warning in '
                           'the log, where compilation is not available.')
        form.addParallelSection(threads=4, mpi=0)

    # -------------------------- INSERT steps functions -----------------------
    def _insertAllSteps(self):
        trainArgs = self._getTrainArgs()
        self._insertFunctionStep(self.convertInputStep, self._inputKey())
        self._insertFunctionStep(self.trainStep, trainArgs)
        # same argument as the training: on Continue, pyworkflow re-runs a finished step only
        # when its arguments change, and the output must follow a re-run training
        self._insertFunctionStep(self.createOutputStep, trainArgs)

    # -------------------------- STEPS functions ------------------------------
    def convertInputStep(self, inputKey):
        """Write the canonical star (and an MRC copy of a non-MRC mask) into extra/; when
        continuing a previous run, copy its training state into this run's folder."""
        trainDir = self.getTrainDir()
        os.makedirs(trainDir, exist_ok=True)
        if self.doContinue:
            prev = self.continueRun.get()
            self._copyPreviousState(prev.getTrainDir(), trainDir)
            self.nParticles.set(prev.nParticles.get())
            self._store(self.nParticles)
            return
        parts = self.inputParticles.get()
        n = convert.writeSetOfParticles(parts, self.getParticlesStar(),
                                        outputDir=self._getExtraPath('images'))
        self.nParticles.set(n)
        self._store(self.nParticles)
        mask = self.focusMask.get()
        if mask is not None:
            src = convert.cleanFileName(mask.getFileName())
            if os.path.splitext(src)[1].lower() not in ('.mrc', '.map'):
                from pwem.emlib.image import ImageHandler
                ImageHandler().convert(mask, self._getExtraPath('focus_mask.mrc'))

    def trainStep(self, args):
        """``gmmhet train``; with ``--resume`` when this run's folder already holds a
        checkpoint (Scipion's Continue, or a copied previous run)."""
        trainDir = self.getTrainDir()
        ckpts = TrainFolder(trainDir).checkpoints()
        if ckpts:
            self._checkResumable(trainDir)
            args += ' --resume'
            self.info('Resuming training from %s' % ckpts[-1])
        gpus = protocolGpus(self)
        # One DistributedDataParallel process per listed GPU ("0 1 2 3" -> 4 processes).
        Plugin.runGmmhet(self, 'train', args, gpuList=gpus, nprocs=max(1, len(gpus)))

    def createOutputStep(self, trainArgs=None):
        """SetOfParticlesFlex: the input particles, each with its latent vector (by id)."""
        trainDir = self.getTrainDir()
        folder = TrainFolder(trainDir)
        latent = folder.read_latents(mmap=True)
        info = folder.read_config()
        nOps = int(info.get('n_ops', 1))
        symmetry = info.get('train', {}).get('symmetry') or 'C1'
        rowOf = latentRowsById(self.getParticlesStar(), latent.shape[0], nOps)
        inputSet = self._getInputParticles()

        outSet = self._createSetOfParticlesFlex()
        outSet.copyInfo(inputSet)
        outSet.setFlexInfo(FlexInfo(FLEX_PROG_NAME))  # not another program's, if the input had one
        outSet.setHasCTF(inputSet.hasCTF())
        outSet.setAlignmentProj()
        ops = None
        if nOps > 1:
            from ..engine.model.symmetry import symmetry_operators
            ops = symmetry_operators(symmetry)
            if len(ops) != nOps:
                raise InputError('%s: %d symmetry operators for %s in config.json, expected %d'
                                 % (trainDir, nOps, symmetry, len(ops)))
        missing = 0
        for part in inputSet.iterItems(orderBy='id'):
            pid = part.getObjId()
            row = rowOf.get(pid)
            if row is None:
                missing += 1
                continue
            for s in range(nOps):
                out = ParticleFlex(progName=FLEX_PROG_NAME)
                out.copyInfo(part)
                # an input from another Flexibility Hub program: drop its metadata
                out.setFlexInfo(FlexInfo(FLEX_PROG_NAME))
                out.setZRed([])
                out.setZFlex(np.asarray(latent[row + s], dtype=np.float64).tolist())
                if ops is None:
                    out.setObjId(pid)
                else:
                    out.setObjId((pid - 1) * nOps + s + 1)
                    out._gmmhetSourceId = Integer(pid)
                    out._gmmhetSymOp = Integer(s)
                    out.setTransform(Transform(_composeSymmetry(
                        part.getTransform().getMatrix(), ops[s])))
                outSet.append(out)
        if missing:
            self.warning('%d input particle(s) have no row in %s; they are not in the output'
                         % (missing, self.getParticlesStar()))
        self._fillFlexInfo(outSet, info)
        self.nOutput.set(outSet.getSize())
        self._store(self.nOutput)
        self._defineOutputs(outputParticles=outSet)
        self._defineSourceRelation(self._getInputPointer(), outSet)
        if not self.doContinue:
            self._defineSourceRelation(self.inputGmm, outSet)

    # -------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = gpuErrors(self, 'GPU IDs: give at least one GPU id (e.g. 0), or set Use GPU '
                                 'to No.')
        if self.doContinue:
            prev = self.continueRun.get()
            if prev is None:
                return errors + ['Previous run: select the finished training run to continue.']
            if not prev.isFinished() and not TrainFolder(prev.getTrainDir()).checkpoints():
                errors.append('Previous run: it has no checkpoint yet; let it finish (or use '
                              'Continue on it).')
            prevEpochs = prev.getEpochs()
            if self.numberOfEpochs.get() <= prevEpochs:
                errors.append('Epochs: %d is not more than the %d of the previous run; give the '
                              'new total number of epochs.' % (self.numberOfEpochs.get(),
                                                               prevEpochs))
            return errors

        parts = self.inputParticles.get()
        if parts is None:
            return errors + ['Input particles: select a set of particles with 3D alignment.']
        if not parts.hasAlignmentProj():
            errors.append('Input particles: no 3D alignment (projection poses); run a 3D '
                          'refinement or "gmmhet - import poses" first.')
        errors += ctfErrors('Input particles', parts.hasCTF(), self._ctfMode())
        if self.zDim.get() is None or self.zDim.get() < 1:
            errors.append('Latent dimension: must be at least 1.')
        if not self._changes():
            errors.append('What may change: choose at least one of positions, amplitudes, '
                          'widths.')
        try:
            from ..engine.model.symmetry import parse_symmetry
            parse_symmetry(self.symmetry.get())
        except InputError as exc:
            errors.append(str(exc).replace('--symmetry', 'Symmetry'))
        if self.mixedPrecision.get() == 2 and not self.usesGpu():
            errors.append('Mixed precision: fp16 needs a GPU; use bf16 or off, or set Use GPU.')

        box, apix = parts.getXDim(), parts.getSamplingRate()
        vol = self.inputGmm.get()
        if vol is None:
            errors.append('Gaussian model: select the output of "gmmhet - build Gaussian '
                          'model".')
        else:
            gmmFile = getGmmFile(vol)
            if not gmmFile:
                errors.append('Gaussian model: this volume carries no Gaussian model file; '
                              'select the output of "gmmhet - build Gaussian model".')
            elif not os.path.exists(gmmFile):
                errors.append('Gaussian model: its file %s is missing; re-run the build '
                              'protocol.' % gmmFile)
            errors += _samplingErrors('Gaussian model', vol, box, apix)
        mask = self.focusMask.get()
        if mask is not None:  # on the Gaussian model's grid (gmm.npz; else the volume's), as `gmmhet train`
            grid = validate.model_grid(getGmmFile(vol)) if vol is not None and getGmmFile(vol) else None
            errors += maskGridErrors('Focus mask', mask, grid or volumeGrid(vol) or (box, apix),
                                     'the Gaussian model')
        return errors

    def _warnings(self):
        warnings = []
        if not self.doContinue and self.inputParticles.get() is not None:
            if self._ctfMode() == 'none':
                warnings.append('CTF: None - the CTF is ignored in training (images taken as '
                                'phase-flipped or CTF-free).')
            if (self.symmetry.get() or 'C1').strip().upper() != 'C1' and \
                    self.focusMask.get() is None:
                warnings.append('Symmetry expansion without a focus mask: every copy sees the '
                                'whole particle; give a mask on one asymmetric unit.')
        return warnings

    def _summary(self):
        summary = []
        if self.doContinue and self.continueRun.get() is not None:
            summary.append('Continues: %s' % self.continueRun.get().getRunName())
        n = self.nParticles.get()
        if n:
            summary.append('Particles: %d' % n)
        try:
            e = self._engineInputs()
        except Exception:  # a pointer not set yet (form being edited)
            e = None
        if e is not None:
            summary.append('Latent dimension: %d; may change: %s%s'
                           % (e['zdim'], ', '.join(e['changes']) or '-',
                              '; focus mask' if e['mask'] else ''))
            if e['symmetry'] != 'C1':
                summary.append('Symmetry expansion: %s' % e['symmetry'])
        loss = self.getLoss()
        if loss:
            last = loss[-1]
            summary.append('Epochs done: %d of %d; final loss: training %.4f, validation %s'
                           % (int(last['epoch']), self.numberOfEpochs.get(),
                              last['train_loss'], _fmt(last.get('val_loss'))))
        elif not self.isFinished():
            summary.append('Training has not finished an epoch yet.')
        summary.extend(self._engineSummaryLines())
        if self.hasAttribute('outputParticles'):
            summary.append('Output: %d particles with latent vectors (SetOfParticlesFlex).'
                           % self.outputParticles.getSize())
        return summary

    def _engineSummaryLines(self):
        """Kept epoch (early stopping), effective latent dimension and band from the engine's
        train/summary.json (none before the training ends)."""
        folder = TrainFolder(self.getTrainDir())
        s = folder.read_summary()
        if not s:
            return []
        try:
            return self._centeringLines(folder.read_config()) + self._finerModelLines(s) + self._posteriorLines(s) + [
                    'Model kept from epoch %d (lowest validation loss)' % s['best_epoch'],
                    'Effective latent dimension: %d of %d (directions carrying signal)'
                    % (s['effective_dim'], s.get('zdim', len(s['latent_pc_variance']))),
                    'Band %.0f-%.1f A: %s' % (s['band_A'][0], s['band_A'][1], s.get('band_reason') or '')]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return []

    @staticmethod
    def _centeringLines(config: dict) -> list:
        """The centring's line of the summary (``config.json``'s ``centering``; none when off)."""
        c = config.get('centering')
        if not c:
            return []
        return ['Centring: %d of %d particles\' shifts corrected before training (median %.2f A)'
                % (c['n_moved'], c['n_particles'], c['median_correction_A'])]

    @staticmethod
    def _finerModelLines(summary: dict) -> list:
        """The finer model's line (``summary.json``'s ``finer_model``; none when not made)."""
        f = summary.get('finer_model')
        if not f:
            return []
        lines = ['Finer model: trained again on %d Gaussians at %.2f A of %s (first model on the input %d: '
                 'train/%s)' % (f['gaussians'], f['resolution_A'], f['source'], f['neutral_gaussians'],
                                f['first_model'])]
        if f.get('fewer_directions'):
            lines.append('WARNING: the finer model\'s latent space has %s direction(s) carrying signal, the first '
                         'model\'s %s: a weaker motion may be lost; compare with train/%s'
                         % (f['effective_dim'], f['first_effective_dim'], f['first_model']))
        return lines

    @staticmethod
    def _posteriorLines(summary: dict) -> list:
        """The latent posterior's line (``summary.json``'s ``latent_posterior``; none when off)."""
        p = summary.get('latent_posterior')
        if not p:
            return []
        line = ('Latents: posterior mean over %d decoded states of the latent space, weighted '
                'by each image\'s likelihood' % p['anchors'])
        coarse = p.get('coarse_pass')
        if coarse:
            line += (' (the first %d states were too far apart for these images: median largest '
                     'weight %.2f)' % (coarse['anchors'], coarse['median_peak_weight']))
        return [line]

    def _methods(self):
        if not self.hasAttribute('outputParticles'):
            return []
        loss = self.getLoss()
        e = self._engineInputs()
        epochs = int(loss[-1]['epoch']) if loss else self.numberOfEpochs.get()
        nParts = self.nParticles.get() or self.outputParticles.getSize()
        sym = ''
        if e['symmetry'] != 'C1':
            sym = (' Particles were symmetry-expanded (%s, %d latent points in all)%s.'
                   % (e['symmetry'], self.outputParticles.getSize(),
                      ' with a focus mask' if e['mask'] else ''))
        text = ('We analysed the heterogeneity of %d particles with a Gaussian-mixture-model '
                'neural network (e2gmm\'s method [Chen2021], scipion-em-gmmhet): from the '
                'gradient of %s between each particle and the projection of the neutral '
                'Gaussian model, an encoder gave a %d-dimensional latent vector, decoded into '
                'changes of the Gaussians\' %s; the networks were trained for %d epoch%s to '
                'maximise that similarity.%s%s'
                % (nParts, self._lossMethodsText(), e['zdim'],
                   _joinWords(e['changes']) or 'parameters', epochs,
                   '' if epochs == 1 else 's', sym, self._centeringMethodsText()))
        summary = TrainFolder(self.getTrainDir()).read_summary() or {}
        finer = summary.get('finer_model')
        if finer:
            text += (' The network was then trained again on a finer Gaussian model (%d Gaussians at '
                     '%.2f A) of %s%s.' % (finer['gaussians'], finer['resolution_A'], finer['source'],
                                           ', each particle\'s decoded motion undone'
                                           if 'motion-corrected' in finer['source'] else ''))
        if summary.get('latent_posterior'):
            text += (' Each particle\'s latent vector was then the posterior mean over decoded '
                     'states of the latent space (k-means centres of the encoder\'s latents), '
                     'weighted by the white-noise likelihood of its image.')
        return [text]

    def _centeringMethodsText(self) -> str:
        c = TrainFolder(self.getTrainDir()).read_config().get('centering')
        if not c:
            return ''
        return (' Before training, each particle\'s shift was checked against the projection of '
                'the neutral model (a shift-only local search); %d of %d particles were re-centred '
                '(median %.2f A) for training, their input poses left unchanged.'
                % (c['n_moved'], c['n_particles'], c['median_correction_A']))

    def _citations(self):
        return ['Chen2021']

    def _lossMethodsText(self) -> str:
        """The similarity this run trained with, in words for the methods text (with its
        resolution band when the run recorded it)."""
        folder = TrainFolder(self.getTrainDir())
        band = folder.read_summary().get('band_A')
        if not band:
            cfg = folder.read_config().get('train', {})
            band = [cfg.get('lowres_A'), cfg.get('highres_A')]
        try:
            band = '%.0f-%.1f A ' % (float(band[0]), float(band[1]))
        except (TypeError, ValueError, IndexError):
            band = ''
        if self.getLossName() == 'frc':
            return ('the Fourier ring correlation averaged over the rings of the %sresolution '
                    'band (e2gmm\'s similarity)' % band)
        return 'one correlation over all Fourier coefficients of the %sresolution band' % band

    # -------------------------- UTILS functions ------------------------------
    def getLossName(self) -> str:
        """The similarity the training maximised, as recorded by the run (``gmmhet train
        --loss``): 'corr' (one correlation over the whole Fourier band, the engine's default,
        which this protocol runs) or 'frc' (e2gmm's ring-averaged FRC; also runs recorded before
        the setting existed)."""
        cfg = TrainFolder(self.getTrainDir()).read_config().get('train')
        if not cfg:
            return 'corr'
        return cfg.get('loss') or 'frc'

    def getTrainDir(self) -> str:
        """Folder of ``gmmhet train``'s output (latent.npy, model.pt, loss.csv, config.json,
        gmm.npz, checkpoints/): what ``gmmhet eval/analyze --train`` takes."""
        return self._getExtraPath('train')

    def getParticlesStar(self) -> str:
        """The canonical star the engine trained on (row i = latent row i, with ids)."""
        if self.doContinue and self.continueRun.get() is not None:
            return self.continueRun.get().getParticlesStar()
        return self._getExtraPath('input_particles.star')

    def getLatentFile(self) -> str:
        return TrainFolder(self.getTrainDir()).latent

    def getModelFile(self) -> str:
        return TrainFolder(self.getTrainDir()).model

    def getLossFile(self) -> str:
        return TrainFolder(self.getTrainDir()).loss

    def getGmmFile(self) -> str:
        """The neutral Gaussian model the training started from (copied into the train
        folder by the engine)."""
        return TrainFolder(self.getTrainDir()).gmm

    def getZDim(self) -> int:
        if self.doContinue and self.continueRun.get() is not None:
            return self.continueRun.get().getZDim()
        return int(self.zDim.get())

    def getEpochs(self) -> int:
        """Epochs done (from loss.csv), else the epochs asked for."""
        loss = self.getLoss()
        return int(loss[-1]['epoch']) if loss else int(self.numberOfEpochs.get())

    def getLoss(self) -> list[dict]:
        """Rows of loss.csv as dicts of floats ([] before the first epoch ends)."""
        return TrainFolder(self.getTrainDir()).read_loss()

    def getFlexSettings(self) -> dict:
        """The engine inputs and settings (see :meth:`_engineInputs`)."""
        return self._engineInputs()

    def _getInputParticles(self):
        if self.doContinue and self.continueRun.get() is not None:
            return self.continueRun.get()._getInputParticles()
        return self.inputParticles.get()

    def _getInputPointer(self):
        if self.doContinue and self.continueRun.get() is not None:
            return self.continueRun.get()._getInputPointer()
        return self.inputParticles

    def _changes(self) -> list[str]:
        flags = (self.changePositions.get(), self.changeAmplitudes.get(),
                 self.changeWidths.get())
        return [name for name, on in zip(CHANGE_NAMES, flags) if on]

    def _maskFile(self) -> str | None:
        mask = self.focusMask.get()
        if mask is None:
            return None
        src = convert.cleanFileName(mask.getFileName())
        if os.path.splitext(src)[1].lower() in ('.mrc', '.map'):
            return src
        return self._getExtraPath('focus_mask.mrc')

    def _ctfMode(self) -> str:
        """The engine's ``--ctf`` for the form's CTF choice ('auto' or 'none')."""
        return CTF_CHOICES[self.ctfChoice.get() or 0]

    def _engineInputs(self) -> dict:
        """What the engine trains on, from this form or, when continuing, from the previous
        run (``gmmhet train --resume`` needs the same inputs and settings)."""
        if self.doContinue and self.continueRun.get() is not None:
            previous = self.continueRun.get()
            return dict(previous._engineInputs(), center=previous._recordedCenterMode(),
                        latent_estimate=previous._recordedSetting('latent_estimate', 'encoder',
                                                                  previous._latentEstimate()),
                        finer_model=previous._recordedSetting('finer_model', 'off', previous._finerModel()))
        return {'particles': self.getParticlesStar(), 'gmm': getGmmFile(self.inputGmm.get()),
                'zdim': int(self.zDim.get()), 'changes': self._changes(),
                'mask': self._maskFile(),
                'symmetry': (self.symmetry.get() or 'C1').strip().upper(),
                'ctf': self._ctfMode(),
                'batch_size': int(self.batchSize.get()), 'lr': float(self.learningRate.get()),
                'seed': int(self.seed.get()),
                'center': 'auto' if self.centerParticles.get() else 'off',
                'latent_estimate': self._latentEstimate(), 'finer_model': self._finerModel()}

    def _latentEstimate(self) -> str:
        return 'posterior' if self.posteriorLatents.get() else 'encoder'

    def _finerModel(self) -> str:
        return 'auto' if self.finerModel.get() else 'off'

    def _recordedCenterMode(self) -> str:
        """``gmmhet train --center`` as this run recorded it (a run continues with its own
        setting; runs made before the option did not centre), else the form's choice."""
        return self._recordedSetting('center', 'off', 'auto' if self.centerParticles.get() else 'off')

    def _recordedSetting(self, key: str, before: str, form: str) -> str:
        """A ``gmmhet train`` setting as this run recorded it in config.json (``before``: runs
        made before the option existed), else ``form`` (the form's choice)."""
        recorded = TrainFolder(self.getTrainDir()).read_config().get('train')
        if recorded:
            return recorded.get(key, before)
        return form

    def _getTrainArgs(self) -> str:
        e = self._engineInputs()
        args = ['--particles %s' % shlex.quote(e['particles']), '--gmm %s' % shlex.quote(e['gmm']),
                '--zdim %d' % e['zdim'], '--epochs %d' % self.numberOfEpochs.get(),
                '--batch-size %d' % e['batch_size'], '--lr %g' % e['lr'],
                '--changes %s' % ','.join(e['changes']), '--symmetry %s' % e['symmetry'],
                '--seed %d' % e['seed'],
                '--device %s' % ('cuda' if self.usesGpu() else 'cpu'),
                '--out %s' % shlex.quote(self.getTrainDir())]
        if e['mask']:
            args.append('--mask %s' % shlex.quote(e['mask']))
        if e.get('ctf', 'auto') != 'auto':
            args.append('--ctf %s' % e['ctf'])
        args.append('--center %s' % e.get('center', 'auto'))
        args.append('--latent-estimate %s' % e.get('latent_estimate', 'posterior'))
        args.append('--finer-model %s' % e.get('finer_model', 'off'))
        amp = ['off', 'bf16', 'fp16'][self.mixedPrecision.get() or 0]
        if amp != 'off':
            args.append('--amp %s' % amp)
        if self.compileModel.get():
            args.append('--compile')
        return ' '.join(args)

    def _inputKey(self) -> str:
        """Step argument of the conversion: changes when the inputs change (so Continue
        re-converts them), equal otherwise (so Continue skips it)."""
        if self.doContinue and self.continueRun.get() is not None:
            return 'continue %s' % self.continueRun.get().getObjId()
        parts = self.inputParticles.get()
        mask = self.focusMask.get()
        return 'particles %s:%s size %s mask %s' % (
            self.inputParticles.getObjValue().getObjId() if parts is not None else None,
            self.inputParticles.getExtended(), parts.getSize() if parts is not None else 0,
            mask.getFileName() if mask is not None else None)

    def _checkResumable(self, trainDir: str):
        """Refuse to resume a folder trained with other settings (clear message instead of
        the engine's)."""
        e = self._engineInputs()
        diff = TrainFolder(trainDir).changed_settings(
            {k: e[k] for k in ('zdim', 'batch_size', 'lr', 'changes', 'symmetry', 'seed')})
        if diff:
            raise InputError('this run was trained with other settings (%s); use Restart to '
                             'train from scratch, or set them back to continue'
                             % '; '.join(diff))

    def _copyPreviousState(self, srcDir: str, dstDir: str):
        """Copy a previous run's training state (last checkpoint, config, statistics) into
        ``dstDir``; hard-link its feature cache when possible (the engine only reads it, and
        replaces it atomically if it rebuilds it)."""
        src, dst = TrainFolder(srcDir), TrainFolder(dstDir)
        ckpts = src.checkpoints()
        if not ckpts:
            raise InputError('previous run %s: no checkpoint in %s; it cannot be continued'
                             % (self.continueRun.get().getRunName(), srcDir))
        os.makedirs(dst.checkpoint_dir, exist_ok=True)
        for name in TrainFolder.STATE_FILES:
            if os.path.exists(src.path(name)):
                shutil.copy2(src.path(name), dst.path(name))
        shutil.copy2(ckpts[-1], os.path.join(dst.checkpoint_dir, os.path.basename(ckpts[-1])))
        for name in TrainFolder.CACHE_FILES:
            if os.path.exists(src.path(name)) and not os.path.exists(dst.path(name)):
                try:
                    os.link(src.path(name), dst.path(name))
                except OSError:
                    pass  # other file system: the engine rebuilds the cache
        self.info('Copied the state of %s (epoch %s) into %s'
                  % (srcDir, os.path.basename(ckpts[-1]), dstDir))

    def _createSetOfParticlesFlex(self, suffix: str = '') -> SetOfParticlesFlex:
        fn = self._getPath('flexparticles%s.sqlite' % suffix)
        SqliteDb.closeConnection(fn)
        pwutils.cleanPath(fn)
        return SetOfParticlesFlex(filename=fn, progName=FLEX_PROG_NAME)

    def _fillFlexInfo(self, outSet: SetOfParticlesFlex, info: dict):
        """Flexibility Hub metadata: program, latent dimension, model files, settings."""
        trainDir = self.getTrainDir()
        e = self._engineInputs()
        flex = outSet.getFlexInfo()
        flex.setProgName(FLEX_PROG_NAME)
        flex.setAttr('zDim', int(info.get('train', {}).get('zdim', e['zdim'])))
        flex.setAttr('modelPath', self.getModelFile())
        flex.setAttr('trainDir', trainDir)
        flex.setAttr('gmmFile', self.getGmmFile())
        flex.setAttr('latentFile', self.getLatentFile())
        flex.setAttr('configFile', TrainFolder(trainDir).config)
        flex.setAttr('particlesStar', self.getParticlesStar())
        flex.setAttr('changes', ','.join(e['changes']))
        flex.setAttr('symmetry', e['symmetry'])
        flex.setAttr('nSymOps', int(info.get('n_ops', 1)))
        if e['mask']:
            flex.setAttr('refMask', e['mask'])
        setattr(outSet, TRAIN_DIR_ATTR, String(trainDir))


# ---------------------------------------------------------------------------- helpers
def getGmmFile(volume) -> str | None:
    """The GMM file carried by a "build Gaussian model" output volume (None if none)."""
    if volume is None:
        return None
    attr = getattr(volume, GMM_FILE_ATTR, None)
    value = attr.get() if attr is not None else None
    return value or None


def latentRowsById(starFn: str, nLatentRows: int, nOps: int = 1,
                   trainDir: str | None = None) -> dict[int, int]:
    """{particle id: first latent.npy row} (row ``i * nOps + s`` belongs to training particle
    ``i`` and symmetry operator ``s``). The ids are the training run's recorded particle keys
    (``trainDir``'s particle_keys.txt, ``id:<rlnGmmhetParticleId>``) when it has them, so a
    star rewritten after the training cannot pair ids with other particles' rows; else (runs
    without them) the canonical star's ``rlnGmmhetParticleId``. Checks that the latent file
    has one row per particle and operator."""
    ids = _recordedIds(trainDir) if trainDir else None
    if ids is not None:
        if len(ids) * nOps != nLatentRows:
            raise InputError('latent.npy: %d rows for %d recorded particles x %d symmetry operators '
                             'in %s; the training folder is inconsistent; re-run the training'
                             % (nLatentRows, len(ids), nOps, trainDir))
        return {pid: i * nOps for i, pid in enumerate(ids)}
    ids = convert.readParticleIds(starFn)
    if len(ids) * nOps != nLatentRows:
        raise InputError('latent.npy: %d rows for %d particles x %d symmetry operators in %s; '
                         'the training output does not belong to this star; re-run the training'
                         % (nLatentRows, len(ids), nOps, starFn))
    return {int(pid): i * nOps for i, pid in enumerate(ids.tolist())}


def _recordedIds(trainDir: str) -> list[int] | None:
    """The Scipion particle ids of a training's recorded particle keys, in training order; None
    when it has none (older runs) or they name images (a star without rlnGmmhetParticleId)."""
    keys = TrainFolder(trainDir).read_particle_keys()
    if keys is None or not all(str(k).startswith('id:') for k in keys):
        return None
    try:
        return [int(str(k)[3:]) for k in keys]
    except ValueError:
        return None


def _composeSymmetry(matrix, op) -> np.ndarray:
    """Scipion ALIGN_PROJ matrix of the expanded pose ``A @ S`` (RELION's symmetry expansion,
    shifts unchanged)."""
    A, s = convert.alignProjToProjection(np.asarray(matrix, dtype=np.float64))
    return convert.projectionToAlignProj(A @ np.asarray(op, dtype=np.float64), s)


def _samplingErrors(name: str, vol, box: int, apix: float) -> list[str]:
    errors = []
    dims = vol.getDim()
    if dims is not None and tuple(dims) != (box, box, box):
        errors.append('%s: box %s but the particles are %d px; resample one of them.'
                      % (name, 'x'.join(str(d) for d in dims), box))
    vApix = vol.getSamplingRate()
    if vApix and apix and abs(vApix - apix) > 1e-3 * apix:
        errors.append('%s: %.4f A/px but the particles are %.4f A/px; resample one of them.'
                      % (name, vApix, apix))
    return errors


def _fmt(v) -> str:
    return '-' if v is None or v != v else '%.4f' % v
