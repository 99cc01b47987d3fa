"""Scipion <-> engine conventions (scipion_gmmhet.convert): golden values from the RELION
plugin's own tests, agreement with pwem's transformations and with scipion-em-relion's star
reader/writer, the Scipion -> canonical star -> Scipion identity, id keying, pose sources and
image-name matching.

    python -m scipion tests scipion_gmmhet.tests.test_convert
"""
import os
import pickle

import mrcfile
import numpy as np
from scipy.spatial.transform import Rotation

import pwem.convert.transformations as tfs
from pwem.constants import ALIGN_PROJ
from pwem.emlib.image import ImageHandler
from pwem.objects import CTFModel, Particle, SetOfParticles, Transform
from pyworkflow.tests import BaseTest, setupTestOutput

from scipion_gmmhet import convert
from scipion_gmmhet.constants import (GMMHET_AMPLITUDE_CORRECTED, GMMHET_PARTICLE_ID,
                                      GMMHET_PHASE_FLIPPED)
from scipion_gmmhet.engine import conventions
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.star import read_star, write_star

# The RELION plugin's golden case (relion/tests/test_convert.py, TestAlignment.test_isInverse):
# this Scipion ALIGN_PROJ matrix is rot=-20, tilt=0, psi=0, origin (-12.8558, 15.3210) px.
GOLDEN_MATRIX = np.array([[0.93969, 0.34202, 0.0, -6.8404],
                          [-0.34202, 0.93969, 0.0, 18.7939],
                          [0.0, 0.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0]])
GOLDEN_ANGLES = (-20.0, 0.0, 0.0)
GOLDEN_SHIFTS_PX = (-12.8558097352, 15.3209632479)


def relionPluginMatrix(rot, tilt, psi, sx, sy):
    """The Scipion matrix scipion-em-relion builds from a star row (convert31.Reader
    .__setParticleTransformProj), written independently of scipion_gmmhet.convert."""
    M = tfs.euler_matrix(*np.deg2rad([-rot, -tilt, -psi]), axes='szyz')
    M[:3, 3] = [-sx, -sy, 0.0]
    return np.linalg.inv(M)


def randomPoses(n, seed, maxShift=5.0):
    rng = np.random.default_rng(seed)
    A = Rotation.random(n, random_state=seed).as_matrix()
    rot, tilt, psi = conventions.matrix_to_euler(A)
    shifts = rng.uniform(-maxShift, maxShift, size=(n, 2))
    return np.stack([rot, tilt, psi], 1), shifts


class _SystemCall:
    """Unpickled by the standard unpickler, this runs ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class TestConvertBase(BaseTest):
    APIX = 2.5
    BOX = 16

    @classmethod
    def setUpClass(cls):
        setupTestOutput(cls)
        cls.stack = cls.getOutputPath('stack.mrcs')
        data = np.random.default_rng(0).normal(size=(12, cls.BOX, cls.BOX)).astype(np.float32)
        with mrcfile.new(cls.stack, overwrite=True) as m:
            m.set_data(data)
            m.voxel_size = cls.APIX
        cls.stackData = data

    @classmethod
    def makeSet(cls, name, n=12, seed=1, ids=None, stack=None, phaseFlipped=False):
        """SetOfParticles (ALIGN_PROJ, CTF, acquisition) with known poses; non-contiguous ids."""
        fn = cls.getOutputPath(name + '.sqlite')
        if os.path.exists(fn):
            os.remove(fn)
        partSet = SetOfParticles(filename=fn)
        partSet.setSamplingRate(cls.APIX)
        acq = partSet.getAcquisition()
        acq.setVoltage(300.0)
        acq.setSphericalAberration(2.7)
        acq.setAmplitudeContrast(0.1)
        acq.setMagnification(50000)
        partSet.setHasCTF(True)
        partSet.setAlignmentProj()
        partSet.setIsPhaseFlipped(phaseFlipped)
        euler, shifts = randomPoses(n, seed)
        ids = ids if ids is not None else [5 + 3 * i for i in range(n)]
        truth = {}
        for i in range(n):
            p = Particle()
            p.setObjId(ids[i])
            p.setLocation(i + 1, stack or cls.stack)
            du = 10000.0 + 500.0 * i
            p.setCTF(CTFModel(defocusU=du, defocusV=du - 150.0, defocusAngle=10.0 * i,
                              phaseShift=0.0))
            M = relionPluginMatrix(*euler[i], *shifts[i])
            p.setTransform(Transform(M))
            partSet.append(p)
            truth[ids[i]] = dict(matrix=M, euler=euler[i], shifts=shifts[i], du=du,
                                 dv=du - 150.0, angle=10.0 * i)
        partSet.write()
        return partSet, truth


class TestTransforms(TestConvertBase):
    def test_goldenRelionMatrix(self):
        """The RELION plugin's golden case, in both directions and two pixel sizes."""
        for apix in (1.0, 1.7):
            euler, originsA = convert.alignProjToRelion(GOLDEN_MATRIX[None], apix)
            self.assertTrue(np.allclose(euler[0], GOLDEN_ANGLES, atol=2e-3), euler)
            self.assertTrue(np.allclose(originsA[0], np.array(GOLDEN_SHIFTS_PX) * apix,
                                        atol=1e-3 * apix), originsA)
            back = convert.relionToAlignProj(np.array([GOLDEN_ANGLES]),
                                             np.array([GOLDEN_SHIFTS_PX]) * apix, apix)[0]
            self.assertTrue(np.allclose(back, GOLDEN_MATRIX, atol=1e-4), back)

    def test_engineEulerIsPwemTransformations(self):
        """engine.conventions.euler_to_matrix(rot, tilt, psi) is pwem's
        euler_matrix(-rot, -tilt, -psi, 'szyz'), the RELION plugin's projection matrix."""
        euler, shifts = randomPoses(50, seed=3)
        A = conventions.euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2])
        for i in range(50):
            M = tfs.euler_matrix(*np.deg2rad(-euler[i]), axes='szyz')
            self.assertTrue(np.allclose(A[i], M[:3, :3], atol=1e-12))
        ours = convert.relionToAlignProj(euler, shifts * self.APIX, self.APIX)
        theirs = np.array([relionPluginMatrix(*euler[i], *shifts[i]) for i in range(50)])
        self.assertTrue(np.allclose(ours, theirs, atol=1e-10))

    def test_matrixRoundTrip(self):
        """Scipion matrix -> RELION angles/origins -> Scipion matrix is the identity, also at
        gimbal lock (tilt 0 and 180)."""
        euler, shifts = randomPoses(200, seed=4)
        euler[:3] = [[30.0, 0.0, 0.0], [-75.0, 180.0, 0.0], [10.0, 0.0, 40.0]]
        M = np.array([relionPluginMatrix(*e, *s) for e, s in zip(euler, shifts)])
        e2, oA = convert.alignProjToRelion(M, self.APIX)
        self.assertTrue(((e2[:, 1] >= 0) & (e2[:, 1] <= 180)).all())
        back = convert.relionToAlignProj(e2, oA, self.APIX)
        self.assertLess(np.abs(back - M).max(), 1e-9)
        A, s = convert.alignProjToProjection(M)
        self.assertTrue(np.allclose(s, shifts, atol=1e-10))
        self.assertTrue(np.allclose(convert.projectionToAlignProj(A, s), M, atol=1e-12))


class TestStarRoundTrip(TestConvertBase):
    def test_writeThenReadIsIdentity(self):
        partSet, truth = self.makeSet('roundtrip')
        star = self.getOutputPath('roundtrip.star')
        self.assertEqual(convert.writeSetOfParticles(partSet, star, self.getOutputPath('conv')), 12)

        blocks = read_star(star)
        parts, optics = blocks['particles'], blocks['optics']
        self.assertEqual(list(parts[GMMHET_PARTICLE_ID]), sorted(truth))
        self.assertEqual(len(optics), 1)
        self.assertAlmostEqual(optics['rlnImagePixelSize'][0], self.APIX)
        self.assertEqual(optics['rlnImageSize'][0], self.BOX)
        self.assertAlmostEqual(optics['rlnVoltage'][0], 300.0)
        self.assertAlmostEqual(optics['rlnSphericalAberration'][0], 2.7)
        self.assertAlmostEqual(optics['rlnAmplitudeContrast'][0], 0.1)
        self.assertEqual(optics[GMMHET_PHASE_FLIPPED][0], 0)
        self.assertEqual(optics[GMMHET_AMPLITUDE_CORRECTED][0], 0)
        for _, row in parts.iterrows():
            t = truth[int(row[GMMHET_PARTICLE_ID])]
            self.assertAlmostEqual(row['rlnDefocusU'], t['du'])
            self.assertAlmostEqual(row['rlnDefocusV'], t['dv'])
            self.assertAlmostEqual(row['rlnDefocusAngle'], t['angle'])
            self.assertTrue(np.allclose([row['rlnOriginXAngst'], row['rlnOriginYAngst']],
                                        t['shifts'] * self.APIX, atol=1e-9))
            A = conventions.euler_to_matrix(row['rlnAngleRot'], row['rlnAngleTilt'], row['rlnAnglePsi'])
            self.assertTrue(np.allclose(A, np.linalg.inv(t['matrix'])[:3, :3], atol=1e-9))
        # stacks referenced in place (MRC), not copied
        self.assertFalse(os.path.exists(self.getOutputPath('conv')))
        self.assertTrue(parts['rlnImageName'][0].startswith('000001@'))

        outSet = SetOfParticles(filename=self.getOutputPath('roundtrip_out.sqlite'))
        n, missing = convert.readPosesIntoSet(partSet, star, outSet)
        self.assertEqual((n, missing), (12, []))
        self.assertEqual(outSet.getSize(), 12)
        self.assertTrue(outSet.hasAlignmentProj())
        self.assertTrue(outSet.hasCTF())
        for p in outSet:
            t = truth[p.getObjId()]
            self.assertLess(np.abs(p.getTransform().getMatrix() - t['matrix']).max(), 1e-9)
            self.assertAlmostEqual(p.getCTF().getDefocusU(), t['du'])
            self.assertEqual(p.getLocation()[1], self.stack)

    def test_readKeyedByIdNotPosition(self):
        """Rows shuffled and two rows removed: every particle still gets its own pose, the two
        without a row are reported and left out."""
        partSet, truth = self.makeSet('shuffled')
        star = self.getOutputPath('shuffled.star')
        convert.writeSetOfParticles(partSet, star)
        blocks = read_star(star)
        parts = blocks['particles'].sample(frac=1.0, random_state=1).reset_index(drop=True)
        dropped = [int(parts[GMMHET_PARTICLE_ID][0]), int(parts[GMMHET_PARTICLE_ID][5])]
        blocks['particles'] = parts.drop(index=[0, 5]).reset_index(drop=True)
        write_star(star, blocks)

        seen = []
        outSet = SetOfParticles(filename=self.getOutputPath('shuffled_out.sqlite'))
        n, missing = convert.readPosesIntoSet(
            partSet, star, outSet,
            extraCallback=lambda p, row: seen.append((p.getObjId(), row[GMMHET_PARTICLE_ID])))
        self.assertEqual(n, 10)
        self.assertEqual(sorted(missing), sorted(dropped))
        self.assertTrue(all(a == b for a, b in seen))
        for p in outSet:
            self.assertLess(np.abs(p.getTransform().getMatrix() - truth[p.getObjId()]['matrix']).max(), 1e-9)
        self.assertEqual(sorted(pid for pid, _ in convert.iterStarRowsById(star)),
                         sorted(set(truth) - set(dropped)))

    def test_duplicateOrMissingIdsRejected(self):
        partSet, _ = self.makeSet('dups', n=4)
        star = self.getOutputPath('dups.star')
        convert.writeSetOfParticles(partSet, star)
        blocks = read_star(star)
        blocks['particles'][GMMHET_PARTICLE_ID] = [1, 1, 2, 3]
        write_star(star, blocks)
        with self.assertRaisesRegex(InputError, 'repeated'):
            list(convert.iterStarRowsById(star))
        blocks['particles'] = blocks['particles'].drop(columns=[GMMHET_PARTICLE_ID])
        write_star(star, blocks)
        with self.assertRaisesRegex(InputError, GMMHET_PARTICLE_ID):
            convert.readPosesIntoSet(partSet, star, SetOfParticles(
                filename=self.getOutputPath('dups_out.sqlite')))

    def test_phaseFlippedAndNoAlignment(self):
        partSet, _ = self.makeSet('flipped', n=3, phaseFlipped=True)
        star = self.getOutputPath('flipped.star')
        convert.writeSetOfParticles(partSet, star, alignType='None')
        blocks = read_star(star)
        self.assertEqual(blocks['optics'][GMMHET_PHASE_FLIPPED][0], 1)
        self.assertNotIn('rlnAngleRot', blocks['particles'].columns)
        self.assertTrue((blocks['particles']['rlnOriginXAngst'] == 0).all())

    def test_noAlignmentRefused(self):
        partSet, _ = self.makeSet('noalign', n=3)
        partSet.setAlignment('None')
        with self.assertRaisesRegex(InputError, 'no 3D alignment'):
            convert.writeSetOfParticles(partSet, self.getOutputPath('noalign.star'))

    def test_nonMrcStackIsConverted(self):
        """A SPIDER stack is converted into outputDir with pwem's ImageHandler, same images."""
        stk = self.getOutputPath('stack.stk')
        ImageHandler().convertStack(self.stack, stk)
        partSet, _ = self.makeSet('spider', n=4, stack=stk)
        star = self.getOutputPath('spider.star')
        outDir = self.getOutputPath('spider_conv')
        convert.writeSetOfParticles(partSet, star, outDir)
        names = read_star(star)['particles']['rlnImageName']
        index, _, path = names[2].partition('@')
        path = os.path.join(os.path.dirname(star), path)  # relative to the star (inside its folder)
        self.assertTrue(os.path.abspath(path).startswith(os.path.abspath(outDir)), path)
        with mrcfile.open(path) as m:
            self.assertTrue(np.allclose(m.data[int(index) - 1], self.stackData[2], atol=1e-5))


class TestRelionPluginAgreement(TestConvertBase):
    """Stars written here are read right by scipion-em-relion, and vice versa."""

    def test_relionPluginReadsOurStar(self):
        from relion.convert import readSetOfParticles
        partSet, truth = self.makeSet('ours')
        star = self.getOutputPath('ours.star')
        convert.writeSetOfParticles(partSet, star)
        relSet = SetOfParticles(filename=self.getOutputPath('ours_relion.sqlite'))
        readSetOfParticles(star, relSet, alignType=ALIGN_PROJ)
        self.assertEqual(relSet.getSize(), 12)
        for p in relSet:
            t = truth[p.getObjId()]
            self.assertLess(np.abs(p.getTransform().getMatrix() - t['matrix']).max(), 1e-6)
            self.assertAlmostEqual(p.getCTF().getDefocusU(), t['du'], places=3)

    def test_ourReaderReadsRelionPluginStar(self):
        from relion.convert import writeSetOfParticles
        partSet, truth = self.makeSet('theirs')
        star = self.getOutputPath('theirs.star')
        os.makedirs(self.getOutputPath('theirs_dir'), exist_ok=True)
        writeSetOfParticles(partSet, star, outputDir=self.getOutputPath('theirs_dir'),
                            alignType=ALIGN_PROJ)
        table = convert.readStarOrCsPoses(star, self.APIX)
        self.assertEqual(sorted(table.ids.tolist()), sorted(truth))
        for pid, M in zip(table.ids, table.matrices):
            self.assertLess(np.abs(M - truth[int(pid)]['matrix']).max(), 1e-5)


class TestPoseSources(TestConvertBase):
    def test_imageKeys(self):
        self.assertEqual(convert.imageKey('/a/b/stack.mrcs', 3), ('stack', 3))
        self.assertEqual(convert.imageKey('Runs/x/extra/stack.mrc:mrcs', 3), ('stack', 3))
        self.assertEqual(convert.imageKey('>J1/imported/000090334788266266069_stack.mrc', 1, True),
                         ('stack', 1))
        self.assertEqual(convert.imageKey('single.mrc', 0), ('single', 1))

    def test_matchByNameIdOrder(self):
        M = np.tile(np.eye(4), (4, 1, 1))
        table = convert.PoseTable(M, np.array(['J2/000012345678_a.mrcs'] * 2 + ['J2/000012345678_b.mrcs'] * 2,
                                              dtype=object),
                                  np.array([1, 2, 1, 2]), np.array([7, 8, 9, 10]), 'test')
        rows = convert.matchByName(['x/b.mrcs', 'x/a.mrc', 'x/a.mrcs', 'x/c.mrcs'], [2, 2, 1, 1], table)
        self.assertEqual(rows.tolist(), [3, 1, 0, -1])
        self.assertEqual(convert.matchById([10, 7, 99], table).tolist(), [3, 0, -1])
        self.assertEqual(convert.matchByOrder(5, table).tolist(), [0, 1, 2, 3, -1])
        dup = convert.PoseTable(M, np.array(['a.mrcs'] * 4, dtype=object), np.array([1, 1, 2, 3]),
                                None, 'dup')
        with self.assertRaisesRegex(InputError, 'more than once'):
            convert.matchByName(['a.mrcs'], [1], dup)
        with self.assertRaisesRegex(InputError, 'no particle ids'):
            convert.matchById([1], dup)

    def test_cryoDrgnPickle(self):
        """cryoDRGN poses.pkl: rot = RELION A, trans = origin_px / D."""
        euler, shifts = randomPoses(6, seed=7)
        A = conventions.euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2])
        pkl = self.getOutputPath('poses.pkl')
        with open(pkl, 'wb') as f:
            pickle.dump((A.astype(np.float32), shifts / self.BOX), f)
        table = convert.readCryoDrgnPoses(pkl, self.BOX, self.APIX)
        self.assertIsNone(table.paths)
        for i in range(6):
            self.assertLess(np.abs(table.matrices[i] - relionPluginMatrix(*euler[i], *shifts[i])).max(), 1e-5)
        with open(pkl, 'wb') as f:
            pickle.dump((np.ones((3, 3, 3)), np.zeros((3, 2))), f)
        with self.assertRaisesRegex(InputError, 'orthonormal'):
            convert.readCryoDrgnPoses(pkl, self.BOX)
        with open(pkl, 'wb') as f:
            f.write(b'not a pickle')
        with self.assertRaisesRegex(InputError, 'not a readable pickle.*cryoDRGN poses'):
            convert.readCryoDrgnPoses(pkl, self.BOX)

    def test_cryoDrgnPickleRunsNoCode(self):
        """A poses.pkl whose __reduce__ calls os.system: nothing runs, one-line InputError."""
        marker = self.getOutputPath('marker')
        pkl = self.getOutputPath('evil.pkl')
        with open(pkl, 'wb') as f:
            pickle.dump(_SystemCall('touch %s' % marker), f)
        with self.assertRaisesRegex(InputError, 'refused') as ctx:
            convert.readCryoDrgnPoses(pkl, self.BOX)
        self.assertNotIn('\n', str(ctx.exception))
        self.assertIn(pkl, str(ctx.exception))
        self.assertFalse(os.path.exists(marker))

    def test_poseTableFromSetRescalesShifts(self):
        partSet, truth = self.makeSet('posesource', n=5)
        table = convert.poseTableFromSet(partSet, self.APIX / 2)  # target pixels are half as big
        for pid, M in zip(table.ids, table.matrices):
            A, s = convert.alignProjToProjection(M)
            self.assertTrue(np.allclose(s, truth[int(pid)]['shifts'] * 2, atol=1e-9))
            self.assertTrue(np.allclose(A, np.linalg.inv(truth[int(pid)]['matrix'])[:3, :3]))
