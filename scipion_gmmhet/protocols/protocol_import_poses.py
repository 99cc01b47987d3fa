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
"""Protocol "gmmhet - import poses": give a SetOfParticles the 3D poses (projection
alignment) found by any program, matched particle by particle."""
from __future__ import annotations

import os

import numpy as np

import pyworkflow.protocol.params as params
from pyworkflow.object import Integer, String
from pwem.constants import NO_INDEX
from pwem.objects import SetOfParticles, Transform
from pwem.protocols import ProtParticles

from .. import convert
from ..constants import (MATCH_BY_ID, MATCH_BY_NAME, MATCH_BY_ORDER, MATCH_CHOICES,
                         POSES_FROM_CHOICES, POSES_FROM_CRYODRGN, POSES_FROM_CS, POSES_FROM_SET,
                         POSES_FROM_STAR)
from ..engine.errors import InputError
from .labels import GmmhetLabel

UNMATCHED_FILE = 'unmatched_particles.txt'
_FILE_EXTENSIONS = {POSES_FROM_STAR: ('.star',), POSES_FROM_CS: ('.cs',),
                    POSES_FROM_CRYODRGN: ('.pkl', '.pickle')}


class ProtGmmhetImportPoses(GmmhetLabel, ProtParticles):
    """Import 3D poses (Euler angles and shifts) for a set of particles.

    The poses can come from another SetOfParticles with 3D alignment (any Scipion protocol),
    a RELION star file (3.0 to 5), a cryoSPARC .cs file, or a cryoDRGN poses.pkl. Each
    particle gets the pose of the same image, matched by image name (stack file name and
    index, ignoring folders, extensions .mrc/.mrcs and cryoSPARC's UID prefixes), by Scipion
    particle id, or by order. The output keeps everything else of the input particles (CTF,
    acquisition, coordinates) and has projection alignment (ALIGN_PROJ).

    Particles without a pose are not in the output: they are counted in the summary and
    listed in extra/unmatched_particles.txt.
    """
    _label = 'import poses'
    _possibleOutputs = {'outputParticles': SetOfParticles}

    def __init__(self, **kwargs):
        ProtParticles.__init__(self, **kwargs)
        self.inputSize = Integer()
        self.matchedSize = Integer()
        self.unusedPoses = Integer()
        self.poseSourceName = String()

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputParticles', params.PointerParam, pointerClass='SetOfParticles',
                      important=True, label='Input particles',
                      help='Particles to give poses to (usually with CTF, for the '
                           'heterogeneity analysis). Their images, CTF and other attributes '
                           'are kept.')
        form.addParam('poseSource', params.EnumParam, choices=POSES_FROM_CHOICES,
                      default=POSES_FROM_STAR, display=params.EnumParam.DISPLAY_COMBO,
                      label='Poses from',
                      help='Where the poses are:\n'
                           '*Scipion particles*: a SetOfParticles with 3D alignment from any '
                           'protocol (RELION, cryoSPARC, Xmipp...).\n'
                           '*RELION star*: a particle star file (RELION 3.0-5, e.g. '
                           'run_data.star of a 3D refinement).\n'
                           '*cryoSPARC .cs*: particles exported from a cryoSPARC 3D refinement '
                           '(2D-only alignments are refused).\n'
                           '*cryoDRGN poses .pkl*: poses.pkl of cryodrgn parse_pose_star / '
                           'parse_pose_csparc or train_vae; it has no image names, so it is '
                           'matched by order.')
        form.addParam('inputPoses', params.PointerParam, pointerClass='SetOfParticles',
                      condition='poseSource == %d' % POSES_FROM_SET, allowsNull=True,
                      label='Particles with poses',
                      help='A SetOfParticles with 3D (projection) alignment. Shifts are '
                           'rescaled when its sampling rate differs from the input particles\'.')
        form.addParam('posesFile', params.FileParam,
                      condition='poseSource != %d' % POSES_FROM_SET,
                      label='Pose file',
                      help='RELION .star, cryoSPARC .cs or cryoDRGN .pkl, as chosen above.')
        form.addParam('matchBy', params.EnumParam, choices=MATCH_CHOICES,
                      default=MATCH_BY_NAME, display=params.EnumParam.DISPLAY_HLIST,
                      label='Match particles by',
                      help='*image name*: the same stack file name (folders, .mrc/.mrcs '
                           'extension and cryoSPARC UID prefixes ignored) and image index.\n'
                           '*particle id*: the same Scipion particle id (Scipion particles, '
                           'or stars with rlnGmmhetParticleId / rlnImageId).\n'
                           '*order*: the i-th input particle (by id) gets the i-th pose. '
                           'Only safe when both lists hold the same particles in the same '
                           'order; required for cryoDRGN poses.')
        form.addParam('requireAll', params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Fail if a particle has no pose?',
                      help='By default particles without a pose are left out of the output '
                           '(and listed in extra/%s). Choose Yes to stop instead.'
                           % UNMATCHED_FILE)

    # -------------------------- INSERT steps functions -----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # -------------------------- STEPS functions ------------------------------
    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        table = self._readPoseTable(inputSet)

        ids, paths, indices = [], [], []
        for part in inputSet.iterItems(orderBy='id', direction='ASC'):
            index, fn = part.getLocation()
            ids.append(part.getObjId())
            paths.append(fn)
            indices.append(index if index != NO_INDEX else 1)
        rows = self._match(table, ids, paths, indices)
        rowOf = dict(zip(ids, rows.tolist()))
        unmatched = [i for i, (pid, r) in enumerate(zip(ids, rows)) if r < 0]
        self._writeUnmatched(table, [(ids[i], indices[i], paths[i]) for i in unmatched])
        if unmatched and self.requireAll.get():
            raise InputError('%d of %d input particles have no pose in %s (listed in %s); match '
                             'them otherwise or set "Fail if a particle has no pose?" to No'
                             % (len(unmatched), len(ids), table.source, self._getExtraPath(UNMATCHED_FILE)))
        if len(unmatched) == len(ids):
            raise InputError('no input particle matched a pose of %s by %s; check that both refer '
                             'to the same images or choose another matching'
                             % (table.source, MATCH_CHOICES[self.matchBy.get()]))

        def _setPose(item, _row):
            r = rowOf[item.getObjId()]
            if r < 0:
                item._appendItem = False
            else:
                item.setTransform(Transform(table.matrices[r]))

        outSet = self._createSetOfParticles()
        outSet.copyInfo(inputSet)
        outSet.setAlignmentProj()
        outSet.copyItems(inputSet, updateItemCallback=_setPose)

        used = np.unique(rows[rows >= 0])
        self.inputSize.set(len(ids))
        self.matchedSize.set(len(ids) - len(unmatched))
        self.unusedPoses.set(len(table) - len(used))
        self.poseSourceName.set(table.source)
        self._store(self.inputSize, self.matchedSize, self.unusedPoses, self.poseSourceName)

        self._defineOutputs(outputParticles=outSet)
        self._defineSourceRelation(self.inputParticles, outSet)
        if self.poseSource.get() == POSES_FROM_SET:
            self._defineSourceRelation(self.inputPoses, outSet)
        self.info('Matched %d of %d particles; %d poses of the source unused.'
                  % (self.matchedSize.get(), len(ids), self.unusedPoses.get()))

    # -------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = []
        inputSet = self.inputParticles.get()
        if inputSet is None:
            return ['Input particles: none selected; choose a SetOfParticles.']
        if inputSet.getSize() == 0:
            errors.append('Input particles: the set is empty; choose a set with particles.')
        if not inputSet.getSamplingRate():
            errors.append('Input particles: no sampling rate; set it when importing them.')
        source = self.poseSource.get()
        match = self.matchBy.get()
        if source == POSES_FROM_SET:
            poses = self.inputPoses.get()
            if poses is None:
                errors.append('Particles with poses: none selected; choose a SetOfParticles with '
                              '3D alignment.')
            elif not poses.hasAlignmentProj():
                errors.append('Particles with poses: %s has no 3D (projection) alignment (it has '
                              '"%s"); choose particles from a 3D refinement.'
                              % (self._poseSetName(), poses.getAlignment()))
        else:
            fn = self.posesFile.get('') or ''
            kind = POSES_FROM_CHOICES[source]
            if not fn.strip():
                errors.append('Pose file: none given; choose the %s file.' % kind)
            elif not os.path.isfile(fn):
                errors.append('Pose file: %s does not exist; check the path.' % fn)
            elif not fn.lower().endswith(_FILE_EXTENSIONS[source]):
                errors.append('Pose file: %s is not a %s file (expected %s); choose the right '
                              '"Poses from" option or file.'
                              % (fn, kind, ' or '.join(_FILE_EXTENSIONS[source])))
            if source == POSES_FROM_CRYODRGN and match != MATCH_BY_ORDER:
                errors.append('Match particles by: a cryoDRGN poses.pkl has no image names or '
                              'ids; choose "order" (the pkl rows follow the particle stack '
                              'cryoDRGN was given).')
            if source == POSES_FROM_CS and match == MATCH_BY_ID:
                errors.append('Match particles by: a cryoSPARC .cs has no Scipion particle ids; '
                              'choose "image name" or "order".')
        return errors

    def _warnings(self):
        warnings = []
        inputSet = self.inputParticles.get()
        if inputSet is not None and not inputSet.hasCTF() and not inputSet.isPhaseFlipped():
            warnings.append('Input particles have no CTF: the heterogeneity analysis needs it '
                            '(or phase-flipped images). Assign CTF first if you can.')
        if self.matchBy.get() == MATCH_BY_ORDER and self.poseSource.get() != POSES_FROM_CRYODRGN:
            warnings.append('Matching by order assumes both lists hold the same particles in '
                            'the same order; matching by image name is safer.')
        return warnings

    def _summary(self):
        if not self.hasAttribute('outputParticles'):
            return ['Output particles not ready yet.']
        n, m = self.inputSize.get(), self.matchedSize.get()
        lines = ['Poses from %s, matched by %s.' % (self.poseSourceName.get(),
                                                     MATCH_CHOICES[self.matchBy.get()]),
                 'Matched %d of %d input particles.' % (m, n)]
        if n - m:
            lines.append('%d particles without a pose are not in the output; they are listed in '
                         '%s.' % (n - m, self._getExtraPath(UNMATCHED_FILE)))
        if self.unusedPoses.get():
            lines.append('%d poses of the source matched no input particle.'
                         % self.unusedPoses.get())
        return lines

    def _methods(self):
        if not self.hasAttribute('outputParticles'):
            return []
        return ['Poses (3D projection alignment) for %d of %d particles were imported from %s.'
                % (self.matchedSize.get(), self.inputSize.get(), self.poseSourceName.get())]

    def _citations(self):
        return []

    # -------------------------- UTILS functions ------------------------------
    def _readPoseTable(self, inputSet) -> convert.PoseTable:
        pixelSize = inputSet.getSamplingRate()
        source = self.poseSource.get()
        if source == POSES_FROM_SET:
            return convert.poseTableFromSet(self.inputPoses.get(), pixelSize,
                                            source=self._poseSetName())
        fn = self.posesFile.get()
        if source == POSES_FROM_CRYODRGN:
            return convert.readCryoDrgnPoses(fn, inputSet.getXDim(), pixelSize)
        return convert.readStarOrCsPoses(fn, pixelSize)

    def _poseSetName(self) -> str:
        """'<producing run>.<output>' for the pose SetOfParticles (for messages)."""
        owner = self.inputPoses.getObjValue()
        name = owner.getRunName() if hasattr(owner, 'getRunName') else (
            owner.getObjLabel() or owner.getName() or 'particles with poses')
        ext = self.inputPoses.getExtended()
        return '%s.%s' % (name, ext) if ext else name

    def _match(self, table, ids, paths, indices) -> np.ndarray:
        match = self.matchBy.get()
        if match == MATCH_BY_NAME:
            return convert.matchByName(paths, indices, table)
        if match == MATCH_BY_ID:
            return convert.matchById(ids, table)
        return convert.matchByOrder(len(ids), table)

    def _writeUnmatched(self, table, unmatched):
        """List unmatched particles (id, index@file) in the extra folder, atomically."""
        fn = self._getExtraPath(UNMATCHED_FILE)
        with open(fn + '.tmp', 'w') as f:
            f.write('# %d input particles without a pose in %s (matching by %s)\n'
                    % (len(unmatched), table.source, MATCH_CHOICES[self.matchBy.get()]))
            f.write('# particle_id image\n')
            for pid, index, path in unmatched:
                f.write('%d %06d@%s\n' % (pid, index, path))
        os.replace(fn + '.tmp', fn)
