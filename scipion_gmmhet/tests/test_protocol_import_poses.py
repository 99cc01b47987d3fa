"""Harness test of "gmmhet - import poses" on a simulated dataset, checked against the
simulator's truth (every rotation matrix, shift and defocus):

- the RELION star imported with poses through pwem's ProtImportParticles + scipion-em-relion
  (the reference path every Scipion user takes);
- the same particles imported without poses, then given poses by this protocol from the
  RELION star (by image name, some rows missing), a Scipion SetOfParticles (by id), a
  cryoSPARC .cs (by image name, UID-prefixed stack names, shuffled rows) and a cryoDRGN
  poses.pkl (by order).

    python -m scipion tests scipion_gmmhet.tests.test_protocol_import_poses
"""
import os
import pickle

import numpy as np
from scipy.spatial.transform import Rotation

from pyworkflow.tests import BaseTest, setupTestProject

from scipion_gmmhet.constants import (MATCH_BY_ID, MATCH_BY_NAME, MATCH_BY_ORDER,
                                      POSES_FROM_CRYODRGN, POSES_FROM_CS, POSES_FROM_SET,
                                      POSES_FROM_STAR)
from scipion_gmmhet.engine import conventions
from scipion_gmmhet.engine.io.star import read_star, write_star
from scipion_gmmhet.protocols import ProtGmmhetImportPoses
from scipion_gmmhet.protocols.protocol_import_poses import UNMATCHED_FILE
from scipion_gmmhet.tests.common import (POSE_COLUMNS, assertPosesMatchTruth,
                                         runImportParticlesStar, simulateDataset,
                                         writeRelionImportStar)

N = 40


class TestImportPoses(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), n=N, box=32, apix=4.0)
        cls.truth, cls.apix, cls.box = cls.data['truth'], cls.data['apix'], cls.data['box']
        withPoses = writeRelionImportStar(cls.data['star'], os.path.join(cls.dataDir, 'aligned', 'particles.star'))
        noPoses = writeRelionImportStar(cls.data['star'], os.path.join(cls.dataDir, 'unaligned', 'particles.star'),
                                        dropColumns=POSE_COLUMNS)
        cls.protAligned = runImportParticlesStar(cls, withPoses, label='particles with poses')
        cls.protUnaligned = runImportParticlesStar(cls, noPoses, label='particles without poses')

    def _importPoses(self, label, **kwargs):
        inputPoses = kwargs.pop('inputPoses', None)
        prot = self.newProtocol(ProtGmmhetImportPoses, objLabel=label, **kwargs)
        prot.inputParticles.set(self.protUnaligned)
        prot.inputParticles.setExtended('outputParticles')
        if inputPoses is not None:
            prot.inputPoses.set(inputPoses)
            prot.inputPoses.setExtended('outputParticles')
        self.assertEqual(prot.validate(), [])
        return self.launchProtocol(prot)

    def _checkOutput(self, prot, n):
        out = prot.outputParticles
        self.assertTrue(out.hasAlignmentProj())
        self.assertTrue(out.hasCTF())
        self.assertAlmostEqual(out.getSamplingRate(), self.apix)
        self.assertEqual(out.getSize(), n)
        return assertPosesMatchTruth(self, out, self.truth, self.apix, n=n)

    def test_relionPluginImportMatchesTruth(self):
        """Reference: the RELION plugin's importer gives the true poses (same convention)."""
        parts = self.protAligned.outputParticles
        self.assertTrue(parts.hasAlignmentProj())
        self.assertEqual(parts.getSize(), N)
        assertPosesMatchTruth(self, parts, self.truth, self.apix, n=N)
        unaligned = self.protUnaligned.outputParticles
        self.assertFalse(unaligned.hasAlignment())
        self.assertTrue(unaligned.hasCTF())

    def test_canonicalStarOfImportedParticles(self):
        """Scipion -> canonical star (convert.writeSetOfParticles) on the imported particles:
        the engine reads back the true poses, origins and defoci, keyed by particle id, and
        every image resolves to its stack."""
        from scipion_gmmhet.convert import imageKey, writeSetOfParticles
        from scipion_gmmhet.engine.io.metadata import read_particles
        from scipion_gmmhet.tests.common import standardDefocus, truthByImage
        parts = self.protAligned.outputParticles
        star = os.path.join(self.dataDir, 'canonical', 'particles.star')
        os.makedirs(os.path.dirname(star), exist_ok=True)
        self.assertEqual(writeSetOfParticles(parts, star, os.path.dirname(star)), N)
        meta = read_particles(star)
        meta.validate(require_alignment=True, require_ctf=True, check_images=True)
        self.assertAlmostEqual(meta.apix, self.apix)
        self.assertEqual(meta.box, self.box)
        locations = {p.getObjId(): p.getLocation() for p in parts}
        byImage = truthByImage(self.truth)
        A = meta.rotation_matrices()
        origins = meta.origins_A()
        ctf = meta.ctf_params()
        for i, pid in enumerate(meta.particles['rlnGmmhetParticleId']):
            index, fn = locations[int(pid)]
            row = byImage[imageKey(fn, index)]
            trueA = conventions.euler_to_matrix(row['rot'], row['tilt'], row['psi'])
            self.assertLess(np.abs(A[i] - trueA).max(), 1e-6)
            self.assertTrue(np.allclose(origins[i], [row['origin_x_A'], row['origin_y_A']], atol=1e-6))
            u, v, ang = standardDefocus(row['defocus_u_A'], row['defocus_v_A'], row['defocus_angle_deg'])
            self.assertAlmostEqual(ctf['defocus_u_A'][i], u, places=3)
            self.assertAlmostEqual(ctf['defocus_v_A'][i], v, places=3)
            self.assertAlmostEqual(ctf['voltage_kv'][i], 300.0)

    def test_fromRelionStarByNameWithMissingRows(self):
        blocks = read_star(self.data['star'])
        parts = blocks['particles']
        dropped = parts['rlnImageName'].iloc[[3, 17, 30]].tolist()
        blocks['particles'] = parts.drop(index=[3, 17, 30]).sample(frac=1.0, random_state=0)
        star = os.path.join(self.data['out_dir'], 'partial.star')  # names relative to the star
        write_star(star, blocks)
        prot = self._importPoses('poses from RELION star', poseSource=POSES_FROM_STAR,
                                 posesFile=star, matchBy=MATCH_BY_NAME)
        self._checkOutput(prot, N - 3)
        summary = '\n'.join(prot.summary())
        self.assertIn('Matched %d of %d' % (N - 3, N), summary)
        self.assertIn('3 particles without a pose', summary)
        with open(prot._getExtraPath(UNMATCHED_FILE)) as f:
            listed = [line.split()[1] for line in f if not line.startswith('#')]
        self.assertEqual(sorted(n.split('@')[0] for n in listed), sorted(n.split('@')[0] for n in dropped))

    def test_fromScipionSetById(self):
        prot = self._importPoses('poses from Scipion particles', poseSource=POSES_FROM_SET,
                                 inputPoses=self.protAligned, matchBy=MATCH_BY_ID)
        self._checkOutput(prot, N)
        self.assertIn('Matched %d of %d' % (N, N), '\n'.join(prot.summary()))

    def test_fromCryosparcCsByName(self):
        """A cryoSPARC export: rotation vectors, shifts in pixels, UID-prefixed stack names,
        0-based indices, rows in another order."""
        t = self.truth.sample(frac=1.0, random_state=2).reset_index(drop=True)
        A = conventions.euler_to_matrix(t['rot'].to_numpy(), t['tilt'].to_numpy(), t['psi'].to_numpy())
        n = len(t)
        cs = np.zeros(n, dtype=[('uid', '<u8'), ('blob/path', 'S64'), ('blob/idx', '<u4'),
                                ('blob/shape', '<u4', (2,)), ('blob/psize_A', '<f4'),
                                ('ctf/accel_kv', '<f4'), ('ctf/cs_mm', '<f4'),
                                ('ctf/amp_contrast', '<f4'), ('ctf/df1_A', '<f4'),
                                ('ctf/df2_A', '<f4'), ('ctf/df_angle_rad', '<f4'),
                                ('alignments3D/pose', '<f4', (3,)), ('alignments3D/shift', '<f4', (2,)),
                                ('alignments3D/psize_A', '<f4')])
        cs['uid'] = np.arange(n) + 10 ** 12
        cs['blob/path'] = b'>J7/imported/012345678901234_particles.mrcs'
        cs['blob/idx'] = [int(s.split('@')[0]) - 1 for s in t['image_name']]
        cs['blob/shape'] = self.box
        cs['blob/psize_A'] = cs['alignments3D/psize_A'] = self.apix
        cs['ctf/accel_kv'], cs['ctf/cs_mm'], cs['ctf/amp_contrast'] = 300.0, 2.7, 0.1
        cs['ctf/df1_A'], cs['ctf/df2_A'] = t['defocus_u_A'], t['defocus_v_A']
        cs['ctf/df_angle_rad'] = np.radians(t['defocus_angle_deg'])
        cs['alignments3D/pose'] = Rotation.from_matrix(np.transpose(A, (0, 2, 1))).as_rotvec()
        cs['alignments3D/shift'] = np.stack([t['origin_x_A'], t['origin_y_A']], 1) / self.apix
        fn = os.path.join(self.dataDir, 'cryosparc_particles.cs')
        with open(fn, 'wb') as f:
            np.save(f, cs)
        prot = self._importPoses('poses from cryoSPARC', poseSource=POSES_FROM_CS, posesFile=fn,
                                 matchBy=MATCH_BY_NAME)
        # the .cs stores float32: poses agree to float32 precision
        err = assertPosesMatchTruth(self, prot.outputParticles, self.truth, self.apix, n=N,
                                    rotTol=1e-5, shiftTol=1e-4)
        self.assertLess(err['angle_deg'], 1e-3)

    def test_fromCryoDrgnPickleByOrder(self):
        t = self.truth
        A = conventions.euler_to_matrix(t['rot'].to_numpy(), t['tilt'].to_numpy(), t['psi'].to_numpy())
        trans = np.stack([t['origin_x_A'], t['origin_y_A']], 1) / self.apix / self.box
        fn = os.path.join(self.dataDir, 'poses.pkl')
        with open(fn, 'wb') as f:
            pickle.dump((A.astype(np.float32), trans.astype(np.float32)), f)
        prot = self.newProtocol(ProtGmmhetImportPoses, poseSource=POSES_FROM_CRYODRGN,
                                posesFile=fn, matchBy=MATCH_BY_NAME)
        prot.inputParticles.set(self.protUnaligned)
        prot.inputParticles.setExtended('outputParticles')
        errors = prot.validate()
        self.assertTrue(any('cryoDRGN' in e and 'order' in e for e in errors), errors)
        prot = self._importPoses('poses from cryoDRGN', poseSource=POSES_FROM_CRYODRGN,
                                 posesFile=fn, matchBy=MATCH_BY_ORDER)
        assertPosesMatchTruth(self, prot.outputParticles, self.truth, self.apix, n=N,
                              rotTol=1e-5, shiftTol=1e-4)

    def test_validation(self):
        prot = self.newProtocol(ProtGmmhetImportPoses, poseSource=POSES_FROM_STAR,
                                posesFile=os.path.join(self.dataDir, 'missing.star'))
        prot.inputParticles.set(self.protUnaligned)
        prot.inputParticles.setExtended('outputParticles')
        self.assertTrue(any('does not exist' in e for e in prot.validate()))
        prot = self.newProtocol(ProtGmmhetImportPoses, poseSource=POSES_FROM_SET)
        prot.inputParticles.set(self.protUnaligned)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputPoses.set(self.protUnaligned)
        prot.inputPoses.setExtended('outputParticles')
        self.assertTrue(any('no 3D (projection) alignment' in e for e in prot.validate()))
