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
"""Protocol "gmmhet - refine orientations": refines every particle's orientation and shift
against the Gaussian model the trained network decodes for THAT particle.

Runs ``gmmhet refine`` on the canonical star of the input particles (written by
:func:`convert.writeSetOfParticles`, with ``rlnGmmhetParticleId``) and on their latent vectors
(``_zFlex``, or the training's ``latent.npy`` through the training star's ids). The refined
poses come back through :func:`convert.readPosesIntoSet`, keyed by particle id; CTF,
acquisition, latent vectors and every other attribute are kept.

Output: ``outputParticles`` (same set type as the input: a SetOfParticlesFlex stays one, so
"cluster and reconstruct" can follow) with the refined 3D alignment; each particle carries
``_gmmhetDeltaAngle`` (degrees) and ``_gmmhetDeltaShift`` (Angstrom), its pose change. With
"Refine one domain?", ``gmmhet refine-domain`` then runs on the refined particles and
``outputDomainVolume`` (a Volume with half maps) is that domain's map from the domain poses.
"""
from __future__ import annotations

import os
import shlex


import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pyworkflow.mapper.sqlite_db import SqliteDb
from pyworkflow.object import Float, String
from pwem.objects import SetOfParticles, SetOfParticlesFlex, Volume
from pwem.protocols import ProtAnalysis3D

from .. import Plugin, convert
from ..constants import TRAIN_DIR_ATTR
from ..engine.errors import InputError
from ..engine.io.outputs import (DomainFolder, RefineFolder, pose_change_summary, read_fsc_csv,
                                 reconstruction_paths)
from .trained_input import TrainedParticlesInput
from .gpu import cudaAvailable, gpuErrors, protocolGpus
from .validation import maskGridErrors
from .labels import GmmhetLabel


class ProtGmmhetRefine(GmmhetLabel, TrainedParticlesInput, ProtAnalysis3D):
    """Refine particle orientations against each particle's own Gaussian model.

    A consensus refinement aligns every particle to one average map, which a moving domain
    blurs. Here each particle is aligned again, locally (within the angular and shift ranges
    you give, around its current pose), to the projection - with its CTF - of the Gaussian
    model that the trained network decodes at the particle's latent point. With a mask, only
    the Gaussians inside it are scored: the pose of that domain. The output particles keep
    everything but their alignment, which is replaced by the refined one.
    """
    _label = 'refine orientations'
    _possibleOutputs = {'outputParticles': SetOfParticles, 'outputDomainVolume': Volume}

    def __init__(self, **kwargs):
        ProtAnalysis3D.__init__(self, **kwargs)

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addHidden(params.USE_GPU, params.BooleanParam, default=cudaAvailable(),
                       label='Use GPU?',
                       help='Refine on a GPU (CUDA). No: on the CPU (fine for a few thousand '
                            'small particles).')
        form.addHidden(params.GPU_LIST, params.StringParam, default=Plugin.getDefaultGpu(),
                       label='Choose GPU IDs', help='GPU id to use (the first one listed).')

        form.addSection(label='Input')
        form.addParam('inputParticles', params.PointerParam,
                      pointerClass='SetOfParticlesFlex, SetOfParticles',
                      pointerCondition='hasAlignmentProj', important=True,
                      label='Particles from "train heterogeneity"',
                      help='The output particles of "gmmhet - train heterogeneity" (they carry '
                           'their latent vectors and name the trained model), or a subset of '
                           'them. Their current poses are the starting point.')
        form.addParam('maxAngle', params.FloatParam, default=6.0, validators=[params.GE(0)],
                      label='Angular search range (deg)',
                      help='Largest rotation away from the current pose in each refinement round, in '
                           'degrees (over several rounds a particle can move further). Poses from a '
                           'consensus refinement are usually within a few degrees; 0 refines '
                           'shifts only.')
        form.addParam('maxShift', params.FloatParam, default=-1.0,
                      label='Shift search range (A)',
                      help='Largest change of the particle origin, in Angstrom. -1 (default): '
                           'automatic, two pixels of the particles.')
        form.addParam('mask', params.PointerParam, pointerClass='VolumeMask, Volume', allowsNull=True,
                      label='Focus mask (optional)',
                      help='A mask on one region (same box and sampling as the particles): only '
                           'the Gaussians inside it are scored and the rest of the model is '
                           'subtracted from the particles, so the refined pose is that region\'s.')
        form.addParam('autoCore', params.BooleanParam, default=False,
                      condition='not mask', expertLevel=params.LEVEL_ADVANCED,
                      label='Focus on the automatic rigid core?',
                      help='Without a focus mask: score only the Gaussians that move least across the '
                           'trained network\'s models (the rest, decoded for each particle, is subtracted), '
                           'so a flexible part the network got wrong cannot pull the pose (gmmhet refine '
                           '--core auto: larger corrections on a big swinging domain, but it moves some exact '
                           'poses). No (default): score every Gaussian.')
        form.addParam('rounds', params.IntParam, default=0, validators=[params.GE(0)],
                      label='Refine-retrain rounds',
                      help='0 (default, automatic): e2gmm\'s iteration - refine, retrain the network on '
                           'the refined poses (same settings), refine again - until a round\'s median '
                           'angular change falls below the search\'s angular precision (the finest '
                           'rotation step, 0.375 deg at the defaults), at most "Most rounds" '
                           'refinements; particles already at their best poses stop after one round, '
                           'without retraining. N >= 1: exactly N '
                           'refinements. A network trained on '
                           'particles with pose errors explains part of them as motions, so each round '
                           'corrects more; the summary and the viewer give the median change per round.')
        form.addParam('fineReference', params.BooleanParam, default=True, condition='rounds != 1',
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Finer reference after the first round?',
                      help='Yes (default): from the second round on, when the reconstruction at the refined '
                           'poses is finer than the Gaussian model the network was trained on, each retraining '
                           'learns a finer Gaussian model of that reconstruction, in a band up to its resolution, and each '
                           'particle is aligned to the model this finer network decodes for it (gmmhet refine '
                           '--reference auto; 1AKE at SNR 1, 3,000 particles: the hinge 1.99 -> 0.63 deg, with '
                           '1 A of molecular-dynamics-like disorder 1.99 -> 1.09 deg; each retraining takes '
                           'about 3x longer). No: the decoded models of the network trained on the input '
                           'Gaussian model in every round.')
        form.addParam('maxRounds', params.IntParam, default=3, validators=[params.GE(1)], condition='rounds == 0',
                      label='Most rounds', help='Largest number of refinements in the automatic iteration.')
        form.addParam('retrainEpochs', params.IntParam, default=-1, condition='rounds != 1',
                      label='Epochs per retraining',
                      help='Epochs of each retraining. -1 (default): automatic, as many as the '
                           'trained run had.')
        form.addParam('doReconstruct', params.BooleanParam, default=True,
                      label='Reconstruct before and after?',
                      help='Reconstruct the particles with their input poses and with the refined '
                           'poses (direct Fourier inversion with CTF correction, half maps and '
                           'FSC), to see what the refinement gained.')
        self._defineDomainParams(form)

        form.addParam('highRes', params.FloatParam, default=-1.0, expertLevel=params.LEVEL_ADVANCED,
                      label='High-resolution limit (A)',
                      help='Finest detail compared. -1 (default): automatic, the Gaussian '
                           'model\'s own resolution '
                           '(where its median Gaussian fades to 1%, at least Nyquist).')
        form.addParam('lowRes', params.FloatParam, default=-1.0, expertLevel=params.LEVEL_ADVANCED,
                      label='Low-resolution limit (A)',
                      help='Coarsest detail compared. -1 (default): automatic, the low-'
                           'resolution limit the network was trained with.')
        form.addParam('score', params.EnumParam, choices=['whitened correlation', 'FRC'], default=0,
                      expertLevel=params.LEVEL_ADVANCED, display=params.EnumParam.DISPLAY_HLIST,
                      label='Score',
                      help='Whitened correlation: cross-correlation over the resolution band with '
                           'each ring whitened by the noise power and weighted by how well the model '
                           'holds it (measured at the refined poses of the particles before; the '
                           'maximum-likelihood score, much less sensitive to noise). FRC: plain mean '
                           'of the ring correlations (e2gmm\'s training loss).')
        form.addParam('minGain', params.FloatParam, default=-1, validators=[params.GE(-1)],
                      expertLevel=params.LEVEL_ADVANCED, label='Evidence to move (nats)',
                      help='How much better (log-likelihood, nats) a new pose must fit than the '
                           'input pose before the particle moves, in every round. -1 (default): '
                           'automatic, 5.5 in the first round (a 95% likelihood-ratio test for the 5 '
                           'pose parameters, so particles already at their best pose stay where they '
                           'are) and 0 in later rounds, once the gold-standard check has accepted a '
                           'round; 0: take any improvement. When the first round moves the median '
                           'particle by less than the search resolves (its angular precision and '
                           '0.25 px), every particle keeps its input pose.')
        form.addParam('levels', params.IntParam, default=3, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label='Finer rotation levels',
                      help='Local rotation lattices (step halved each time) after the coarse one.')
        form.addParam('polishSteps', params.IntParam, default=0, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label='Gradient polishing steps',
                      help='Adam steps on the exact score after the lattice search (0: none; the '
                           'search and its sub-pixel shift polish suffice).')
        form.addParam('batchSize', params.IntParam, default=64, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED, label='Particles per batch',
                      help='Particles scored together. Larger is faster on a GPU and needs more '
                           'memory; lower it if the run ends with "CUDA out of memory".')
        form.addParallelSection(threads=4, mpi=0)

    # -------------------------- INSERT steps functions -----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, self._inputKey())
        self._insertFunctionStep(self.refineStep, self._getRefineArgs())
        if self.doReconstruct:
            for which in ('before', 'after'):
                self._insertFunctionStep(self.reconstructStep, which)
        if self.doDomain:
            self._insertFunctionStep(self.refineDomainStep, self._getDomainArgs())
        self._insertFunctionStep(self.createOutputStep)

    # -------------------------- STEPS functions ------------------------------
    def refineStep(self, args):
        """``gmmhet refine``; with ``--resume`` when this run's folder holds an interrupted
        refinement (Scipion's Continue after a crash or kill): finished rounds are kept and a
        retraining goes on from its checkpoint (the engine starts over if the settings changed)."""
        if os.path.exists(os.path.join(self.getRefineDir(), 'refine_settings.json')):
            args += ' --resume'
            self.info('Resuming the refinement in %s' % self.getRefineDir())
        Plugin.runGmmhet(self, 'refine', args,
                         gpuList=protocolGpus(self, first=True))

    def reconstructStep(self, which):
        star = self.getParticlesStar() if which == 'before' else self.getOutputStar()
        os.makedirs(self.getReconstructionDir(), exist_ok=True)
        args = '--particles %s --out %s --device %s' % (
            shlex.quote(star), shlex.quote(self.getReconstruction(which)), 'cuda' if self.usesGpu() else 'cpu')
        Plugin.runGmmhet(self, 'reconstruct', args,
                         gpuList=protocolGpus(self, first=True))

    def createOutputStep(self):
        parts = self.inputParticles.get()
        changes = self.getPoseChanges()
        byId = {int(pid): (float(a), float(s)) for pid, a, s in
                zip(changes['particle_id'], changes['delta_angle_deg'], changes['delta_shift_A'])}

        def extra(item, _row):
            a, s = byId.get(item.getObjId(), (float('nan'), float('nan')))
            item._gmmhetDeltaAngle = Float(a)
            item._gmmhetDeltaShift = Float(s)

        outSet = self._createOutputSet(parts)
        n, missing = convert.readPosesIntoSet(parts, self.getOutputStar(), outSet, extraCallback=extra)
        if missing:
            self.warning('%d input particle(s) had no refined pose and were left out (e.g. id %d)'
                         % (len(missing), missing[0]))
        trainDir = self.getTrainDir()
        if trainDir:
            setattr(outSet, TRAIN_DIR_ATTR, String(trainDir))
        outputs = {'outputParticles': outSet}
        if self.doDomain:
            outputs['outputDomainVolume'] = self._domainVolume(parts.getSamplingRate())
        self._defineOutputs(**outputs)
        for out in outputs.values():
            self._defineSourceRelation(self.inputParticles, out)
        self.info('Refined poses of %d particles' % n)

    def _createOutputSet(self, parts):
        if isinstance(parts, SetOfParticlesFlex):
            fn = self._getPath('particles_refined.sqlite')
            SqliteDb.closeConnection(fn)
            pwutils.cleanPath(fn)
            out = SetOfParticlesFlex(filename=fn, progName=parts.getFlexInfo().getProgName())
            return out
        return self._createSetOfParticles('refined')

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
        if self.maxAngle.get() is None or self.maxAngle.get() < 0:
            errors.append('Angular search range: give 0 or more degrees.')
        shift = self.maxShift.get()
        if shift is not None and shift < 0 and shift != -1:
            errors.append('Shift search range: give 0 or more Angstrom (or -1 for two pixels).')
        mask = self.mask.get()
        if mask is not None:  # the check and text of gmmhet refine --mask
            errors += maskGridErrors('Focus mask', mask, self._modelGrid(), 'the Gaussian model')
        domainMask = self.domainMask.get() if self.doDomain else None
        if domainMask is not None:  # the check and text of gmmhet refine-domain --domain-mask
            errors += maskGridErrors('Domain mask', domainMask, self._modelGrid(), 'the Gaussian model')
        if self.doDomain and (self.domainMaxAngle.get() is None or self.domainMaxAngle.get() < 0):
            errors.append('Domain angular range: give 0 or more degrees.')
        return errors

    def _summary(self):
        summary = []
        parts = self.inputParticles.get()
        if parts is not None:
            shift = self.maxShift.get()
            summary.append('Input: %d particles; search within %.2f deg and %s'
                           % (parts.getSize(), self.maxAngle.get(),
                              '2 px' if shift is None or shift < 0 else '%.2f A' % shift))
        s = self.getChangeSummary()
        if s:
            summary.append('Angular change: median %.2f deg, 90th percentile %.2f deg'
                           % (s['angle_median_deg'], s['angle_p90_deg']))
            summary.append('Shift change: median %.2f A, 90th percentile %.2f A'
                           % (s['shift_median_A'], s['shift_p90_A']))
            summary.append('Mean score %.4f -> %.4f; %d of %d particles moved'
                           % (s['score_before_mean'], s['score_after_mean'], s['n_moved'], s['n']))
            rounds = self.getRounds()
            if rounds is not None:
                med = rounds['angle_median_deg']
                stop = str(rounds['stop'][-1]) if 'stop' in rounds else ''
                stop = {'converged': 'converged: last change below the angular precision'}.get(stop, stop)
                summary.append('Refine-retrain rounds: %d%s; median angular change per round: %s deg'
                               % (len(med), ' (%s)' % stop if stop and stop != 'nan' else '',
                                  ', '.join('%.2f' % m for m in med)))
                drift = [float(d) for d in rounds.get('frame_drift_deg', [])]
                if any(d > 0 for d in drift):
                    summary.append('Object-frame turn removed per round (a global rotation the data cannot '
                                   'see, brought back to the input frame): %s deg'
                                   % ', '.join('%.2f' % d for d in drift))
                refs = [str(r) for r in rounds.get('reference', [])]
                if any('Gaussians' in r for r in refs):
                    summary.append('Reference per round: %s' % '; '.join(refs))
                if 'below_precision' in rounds and str(rounds['below_precision'][0]) == 'True':
                    summary.append('Round 1 moved the median particle by less than the search can resolve: '
                                   'no pose correction found, only moves that fit the model\'s errors; every '
                                   'particle kept its input pose')
                if 'gate_kept_input' in rounds and str(rounds['gate_kept_input'][-1]) == 'True':
                    summary.append('Gold-standard check: the refined poses do not make the half maps agree '
                                   'significantly better (mean FSC %.4f with the input poses, %.4f with the '
                                   'refined ones); every particle kept its input pose'
                                   % (float(rounds['gate_fsc_input'][-1]), float(rounds['gate_fsc_refined'][-1])))
            res = {w: self.getResolution(w) for w in ('before', 'after')}
            if all(r is not None for r in res.values()):
                summary.append('Half-map FSC 0.143 resolution: %.2f A before, %.2f A after'
                               % (res['before'], res['after']))
            summary += self._domainSummary()
        elif not self.isFinished():
            summary.append('Outputs not ready yet.')
        return summary

    def _methods(self):
        s = self.getChangeSummary()
        if not s:
            return []
        return ['The orientations and shifts of %d particles were refined locally (within %.1f '
                'degrees) against the projection, with each particle\'s CTF, of the Gaussian model '
                'decoded at its latent point (scipion-em-gmmhet, e2gmm\'s method); median changes '
                '%.2f degrees and %.2f A.' % (s['n'], self.maxAngle.get(), s['angle_median_deg'],
                                               s['shift_median_A'])]

    def _citations(self):
        return ['Chen2021']

    # -------------------------- UTILS functions ------------------------------
    def getRefineDir(self) -> str:
        return self._getExtraPath('refine')

    def getOutputStar(self) -> str:
        return RefineFolder(self.getRefineDir()).particles

    def getPoseChangesFile(self) -> str:
        return RefineFolder(self.getRefineDir()).pose_changes

    def getReconstructionDir(self) -> str:
        return self._getExtraPath('reconstruction')

    def getReconstruction(self, which: str) -> str:
        """Map reconstructed with the input ('before') or refined ('after') poses."""
        return os.path.join(self.getReconstructionDir(), '%s.mrc' % which)

    def getFsc(self, which: str) -> dict | None:
        """Half-map FSC table of a reconstruction (None when not computed)."""
        fn = reconstruction_paths(self.getReconstruction(which))['fsc']
        if not os.path.exists(fn):
            return None
        return read_fsc_csv(fn)

    def getResolution(self, which: str) -> float | None:
        t = self.getFsc(which)
        if t is None:
            return None
        from ..engine.model.fourier import resolution_at_threshold
        curve = t['fsc_masked'] if 'fsc_masked' in t else t['fsc']
        return resolution_at_threshold(t['freq_invA'], curve, 0.143)

    def getPoseChanges(self) -> dict:
        """The engine's pose_changes.csv as ``{column: array}`` (per particle id)."""
        changes = RefineFolder(self.getRefineDir()).read_pose_changes()
        if changes is None:
            raise InputError('%s: missing; the refinement did not finish' % self.getPoseChangesFile())
        return changes

    def getRounds(self) -> dict | None:
        """The engine's rounds.csv as ``{column: array}`` (one row per refinement; None for a
        single fixed round)."""
        fn = RefineFolder(self.getRefineDir()).rounds
        if not os.path.exists(fn):
            return None
        import pandas as pd
        df = pd.read_csv(fn)
        return {c: df[c].to_numpy() for c in df.columns}

    def getChangeSummary(self) -> dict | None:
        """Median / 90th percentile of the pose changes (None before the run ends)."""
        if not os.path.exists(self.getPoseChangesFile()):
            return None
        c = self.getPoseChanges()
        s = pose_change_summary(c['delta_angle_deg'], c['delta_shift_A'], c['score_before'], c['score_after'])
        s['n'] = len(c['delta_angle_deg'])
        return s

    def _getRefineArgs(self) -> str:
        args = ['--train %s' % shlex.quote(self.getTrainDir() or ''),
                '--particles %s' % shlex.quote(self.getParticlesStar()),
                '--latents %s' % shlex.quote(self.getLatentsFile()),
                '--max-angle %g' % self.maxAngle.get(),
                '--score %s' % ('wcc' if self.score.get() == 0 else 'frc'),
                '--levels %d' % self.levels.get(),
                '--polish-steps %d' % self.polishSteps.get(),
                '--batch-size %d' % self.batchSize.get(),
                '--device %s' % ('cuda' if self.usesGpu() else 'cpu'),
                '--out %s' % shlex.quote(self.getRefineDir())]
        if self.minGain.get() is not None and self.minGain.get() >= 0:
            args.append('--min-gain %g' % self.minGain.get())
        if self.maxShift.get() is not None and self.maxShift.get() >= 0:
            args.append('--max-shift %g' % self.maxShift.get())
        if self.highRes.get() is not None and self.highRes.get() > 0:
            args.append('--highres %g' % self.highRes.get())
        if self.lowRes.get() is not None and self.lowRes.get() > 0:
            args.append('--lowres %g' % self.lowRes.get())
        mask = self.mask.get()
        if mask is not None:
            args.append('--mask %s' % shlex.quote(convert.cleanFileName(mask.getFileName())))
        elif self.autoCore.get():
            args.append('--core auto')
        rounds = self.rounds.get() or 0
        if rounds != 1 and not self.fineReference.get():
            args.append('--reference decoded')
        args.append('--rounds %s' % ('auto --max-rounds %d' % (self.maxRounds.get() or 3) if rounds == 0
                                     else '%d' % rounds))
        if rounds != 1 and self.retrainEpochs.get() is not None and self.retrainEpochs.get() > 0:
            args.append('--retrain-epochs %d' % self.retrainEpochs.get())
        return ' '.join(args)

    def _inputKey(self) -> str:
        parts = self.inputParticles.get()
        return 'particles %s:%s size %s' % (
            self.inputParticles.getObjValue().getObjId() if parts is not None else None,
            self.inputParticles.getExtended(), parts.getSize() if parts is not None else 0)

    # -------------------------- local refinement of a domain -----------------
    def _defineDomainParams(self, form):
        form.addParam('doDomain', params.BooleanParam, default=False,
                      label='Refine one domain?',
                      help='After the refinement, refine the orientation of one domain in every '
                           'particle (e2gmm\'s focused refinement: the domain\'s decoded motion, '
                           'then a local search against the neutral domain with the rest of the '
                           'model subtracted) and reconstruct the domain from the subtracted '
                           'particles with those domain poses: output "domain map" (with half '
                           'maps). The same particles with their particle poses are reconstructed '
                           'too; the summary compares the two under the domain mask.')
        form.addParam('domainMask', params.PointerParam, pointerClass='VolumeMask, Volume', allowsNull=True,
                      condition='doDomain', label='Domain mask (optional)',
                      help='A mask on the domain (same box and sampling as the particles). Empty: '
                           'the connected group of Gaussians the trained network moves most.')
        form.addParam('domainMaxAngle', params.FloatParam, default=6.0, condition='doDomain',
                      label='Domain angular search range (deg)',
                      help='Largest rotation of the domain, about its centre, away from its decoded '
                           'orientation.')

    def getDomainDir(self) -> str:
        return self._getExtraPath('domain')

    def _getDomainArgs(self) -> str:
        args = ['--train %s' % shlex.quote(self.getTrainDir() or ''),
                '--particles %s' % shlex.quote(self.getOutputStar()),
                '--latents %s' % shlex.quote(self.getLatentsFile()),
                '--max-angle %g' % self.domainMaxAngle.get(),
                '--batch-size %d' % self.batchSize.get(),
                '--device %s' % ('cuda' if self.usesGpu() else 'cpu'),
                '--out %s' % shlex.quote(self.getDomainDir())]
        mask = self.domainMask.get()
        if mask is not None:
            args.append('--domain-mask %s' % shlex.quote(convert.cleanFileName(mask.getFileName())))
        return ' '.join(args)

    def refineDomainStep(self, args):
        Plugin.runGmmhet(self, 'refine-domain', args,
                         gpuList=protocolGpus(self, first=True))

    def _domainVolume(self, apix):
        folder = DomainFolder(self.getDomainDir())
        paths = reconstruction_paths(folder.domain_map)
        vol = Volume(location=paths['map'])
        vol.setSamplingRate(apix)
        vol.setHalfMaps([paths['half1'], paths['half2']])
        vol.setObjLabel('domain map')
        vol._gmmhetPlainMap = String(folder.plain_map)
        vol._gmmhetDomainMask = String(paths['mask'])
        return vol

    def getDomainMap(self, which: str) -> str | None:
        """The domain step's map from the particle poses ('plain') or the domain poses ('domain')."""
        if not self.doDomain:
            return None
        folder = DomainFolder(self.getDomainDir())
        return folder.plain_map if which == 'plain' else folder.domain_map

    def getDomainFsc(self, which: str) -> dict | None:
        """Half-map FSC table (with the domain-masked FSC) of a domain-step map, None when absent."""
        fn = self.getDomainMap(which)
        fsc = reconstruction_paths(fn)['fsc'] if fn else None
        return read_fsc_csv(fsc) if fsc and os.path.exists(fsc) else None

    def getDomainSummary(self) -> dict | None:
        """The engine's domain_summary.json (None before the domain step ends)."""
        fn = DomainFolder(self.getDomainDir()).summary
        if not os.path.exists(fn):
            return None
        import json
        with open(fn) as f:
            return json.load(f)

    def _domainSummary(self) -> list:
        s = self.getDomainSummary() if self.doDomain else None
        if not s:
            return []

        def res(v):
            return 'n/a' if v is None else '%.2f A' % v
        return ['Domain: %d of %d Gaussians (%s); decoded domain rotation median %.2f deg; the local '
                'search moved %d of %d particles' % (s['n_domain_gaussians'], s['n_gaussians'],
                                                     'mask' if s['domain_from'] != 'decoder motion'
                                                     else 'from the decoder\'s motions',
                                                     s['decoded_angle_median_deg'], s['n_moved_by_search'],
                                                     s['n_particles']),
                'Domain-masked half-map FSC 0.143: %s with the particle poses, %s with the domain poses '
                '(mean FSC %.3f -> %.3f)' % (res(s['plain_resolution_0143_masked_A']),
                                             res(s['domain_resolution_0143_masked_A']),
                                             s['plain_fsc_masked_mean'], s['domain_fsc_masked_mean'])]
