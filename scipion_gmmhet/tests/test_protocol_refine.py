"""Harness test of "gmmhet - refine orientations" and its viewer on a small simulated set:

- simulate a homogeneous dataset, perturb its poses (3 deg RMS rotations, 1 px RMS shifts) and
  import the perturbed star (pwem + scipion-em-relion importer); attach the simulator's
  ground-truth GMM to the imported consensus map; train one epoch with "gmmhet - train
  heterogeneity";
- refine orientations: every particle comes back (same ids), its alignment is closer to the
  truth file (median angular and shift errors at least halved), CTF and image are unchanged,
  its ``_gmmhetDeltaAngle`` / ``_gmmhetDeltaShift`` are the real differences between the input
  and output poses (matched by id); the summary reports the medians; the before/after
  reconstructions exist;
- the viewer's headless PNGs exist and are not blank.

    python -m scipion tests scipion_gmmhet.tests.test_protocol_refine
"""
import glob
import math
import os

import numpy as np
import pandas as pd

from pyworkflow.object import String
from pyworkflow.tests import BaseTest, setupTestProject

from scipion_gmmhet.convert import alignProjToProjection, imageKey
from scipion_gmmhet.engine import conventions
from scipion_gmmhet.engine.io.star import read_star, write_star
from scipion_gmmhet.protocols.protocol_refine import ProtGmmhetRefine
from scipion_gmmhet.protocols.protocol_train import GMM_FILE_ATTR, ProtGmmhetTrain
from scipion_gmmhet.tests.common import (assertPngNotBlank, runImportParticlesStar, runImportVolume, simulateDataset,
                                         truthByImage, writeRelionImportStar)

N = 96
BOX = 32
APIX = 4.0


def _perturbedStar(starFn, outFn, seed=0):
    """Copy of ``starFn`` with every pose perturbed: ``R(v) @ A`` (|v| 3 deg RMS) and the origin
    plus 1 px RMS."""
    blocks = read_star(starFn)
    p = blocks['particles'].copy()
    n = len(p)
    rng = np.random.default_rng(seed)
    A = conventions.euler_to_matrix(p['rlnAngleRot'].astype(float).to_numpy(),
                                    p['rlnAngleTilt'].astype(float).to_numpy(),
                                    p['rlnAnglePsi'].astype(float).to_numpy())
    v = np.radians(rng.normal(size=(n, 3)) * 3.0 / math.sqrt(3))
    th = np.linalg.norm(v, axis=1)[:, None, None]
    K = np.zeros((n, 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    K = K - K.transpose(0, 2, 1)
    Kn = K / np.maximum(th, 1e-12)
    R = np.eye(3) + np.sin(th) * Kn + (1 - np.cos(th)) * (Kn @ Kn)
    rot, tilt, psi = conventions.matrix_to_euler(R @ A)
    p['rlnAngleRot'], p['rlnAngleTilt'], p['rlnAnglePsi'] = rot, tilt, psi
    d = rng.normal(size=(n, 2)) * APIX / math.sqrt(2)
    p['rlnOriginXAngst'] = p['rlnOriginXAngst'].astype(float) + d[:, 0]
    p['rlnOriginYAngst'] = p['rlnOriginYAngst'].astype(float) + d[:, 1]
    blocks['particles'] = p
    os.makedirs(os.path.dirname(outFn), exist_ok=True)
    write_star(outFn, blocks)
    return outFn


class TestProtocolRefine(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='homogeneous', n=N, box=BOX,
                                   apix=APIX, snr=30.0, nGaussians=300)
        pert = _perturbedStar(cls.data['star'], os.path.join(cls.dataDir, 'sim', 'perturbed.star'))
        star = writeRelionImportStar(pert, os.path.join(cls.dataDir, 'relion', 'particles.star'))
        cls.protParts = runImportParticlesStar(cls, star)
        gmmDir = os.path.join(cls.data['out_dir'], 'truth_gmm')
        cls.protTrain = cls._trainOn(os.path.join(gmmDir, sorted(os.listdir(gmmDir))[0]), 'GMM', 'train')

        prot = cls.newProtocol(ProtGmmhetRefine, objLabel='refine orientations', maxAngle=6.0,
                               levels=2, maxRounds=2, useGpu=False, numberOfThreads=2)
        prot.inputParticles.set(cls.protTrain)
        prot.inputParticles.setExtended('outputParticles')
        errors = prot.validate()
        assert errors == [], errors
        cls.protRefine = cls.launchProtocol(prot)

    @classmethod
    def _trainOn(cls, gmmFn, gmmLabel, label):
        """Import the consensus map with ``gmmFn`` attached as its Gaussian model and train one
        epoch on the perturbed particles; returns the train protocol."""
        protVol = runImportVolume(cls, cls.data['consensus'], APIX, label='consensus + %s' % gmmLabel)
        vol = protVol.outputVolume
        setattr(vol, GMM_FILE_ATTR, String(gmmFn))
        cls.proj.mapper.store(vol)
        cls.proj.mapper.commit()
        protVol = cls.proj.getProtocol(protVol.getObjId())
        prot = cls.newProtocol(ProtGmmhetTrain, objLabel=label, zDim=2, numberOfEpochs=1, batchSize=32,
                               seed=1, useGpu=False, numberOfThreads=2)
        prot.inputParticles.set(cls.protParts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(protVol)
        prot.inputGmm.setExtended('outputVolume')
        return cls.launchProtocol(prot)

    def _errors(self, partSet):
        """{id: (angle error deg, shift error px)} against the truth file, matched by image."""
        byImage = truthByImage(self.data['truth'])
        out = {}
        for part in partSet.iterItems(orderBy='id'):
            index, fn = part.getLocation()
            row = byImage[imageKey(fn, index)]
            A, s = alignProjToProjection(np.array([part.getTransform().getMatrix()]))
            At = conventions.euler_to_matrix(row['rot'], row['tilt'], row['psi'])
            st = np.array([row['origin_x_A'], row['origin_y_A']]) / APIX
            out[part.getObjId()] = (float(conventions.angular_distance_deg(A[0], At)),
                                    float(np.linalg.norm(s[0][:2] - st)))
        return out

    def test_output_alignment_against_truth(self):
        inp = self.protTrain.outputParticles
        out = self.protRefine.outputParticles
        self.assertEqual(out.getSize(), inp.getSize())
        self.assertTrue(out.hasAlignmentProj())
        before, after = self._errors(inp), self._errors(out)
        self.assertEqual(sorted(before), sorted(after))
        ang0 = np.median([v[0] for v in before.values()])
        ang1 = np.median([v[0] for v in after.values()])
        sh0 = np.median([v[1] for v in before.values()])
        sh1 = np.median([v[1] for v in after.values()])
        print('median angle error %.2f -> %.2f deg, shift error %.3f -> %.3f px' % (ang0, ang1, sh0, sh1))
        self.assertLess(ang1, 0.5 * ang0)
        self.assertLess(sh1, 0.5 * sh0)

    def test_everything_else_is_kept_and_changes_are_real(self):
        inpById = {p.getObjId(): p.clone() for p in self.protTrain.outputParticles.iterItems()}
        rounds = sorted(glob.glob(os.path.join(self.protRefine.getRefineDir(), 'round_*', 'pose_changes.csv')))
        nRounds = max(1, len(rounds))
        for fn in rounds:  # the search range holds in every round
            self.assertLessEqual(pd.read_csv(fn)['delta_angle_deg'].max(), 6.0 + 0.02)
        for part in self.protRefine.outputParticles.iterItems():
            src = inpById[part.getObjId()]
            self.assertEqual(part.getLocation(), src.getLocation())
            self.assertAlmostEqual(part.getCTF().getDefocusU(), src.getCTF().getDefocusU(), places=2)
            self.assertAlmostEqual(part.getCTF().getDefocusV(), src.getCTF().getDefocusV(), places=2)
            self.assertAlmostEqual(part.getCTF().getDefocusAngle(), src.getCTF().getDefocusAngle(), places=2)
            A1, s1 = alignProjToProjection(np.array([part.getTransform().getMatrix()]))
            A0, s0 = alignProjToProjection(np.array([src.getTransform().getMatrix()]))
            self.assertAlmostEqual(float(conventions.angular_distance_deg(A1[0], A0[0])),
                                   part._gmmhetDeltaAngle.get(), delta=0.02)
            self.assertAlmostEqual(float(np.linalg.norm(s1[0][:2] - s0[0][:2]) * APIX),
                                   part._gmmhetDeltaShift.get(), delta=0.01)
            # each round searches within 6 deg of its own start; the rounds add up
            self.assertLessEqual(part._gmmhetDeltaAngle.get(), nRounds * 6.0 + 0.02)
            if hasattr(src, 'getZFlex') and hasattr(part, 'getZFlex'):
                np.testing.assert_allclose(part.getZFlex(), src.getZFlex())

    def test_summary_reconstructions_and_viewer(self):
        text = '\n'.join(self.protRefine.summary())
        self.assertIn('Angular change: median', text)
        self.assertIn('Refine-retrain rounds: ', text)  # the default: automatic rounds
        self.assertIn('Shift change: median', text)
        for which in ('before', 'after'):
            self.assertTrue(os.path.exists(self.protRefine.getReconstruction(which)))
            self.assertIsNotNone(self.protRefine.getResolution(which))
        from scipion_gmmhet.viewers.viewer_refine import writeRefineReport
        out = writeRefineReport(self.protRefine, self.proj.getPath('refine_report'))
        assertPngNotBlank(self, out['changes'])
        assertPngNotBlank(self, out['fsc'])
        with open(out['chimerax']) as f:
            self.assertEqual(f.read().count('open '), 2)

    def test_refine_retrain_rounds(self):
        """Rounds = 2: refine, retrain on the refined poses, refine again, through the protocol;
        the output poses are still closer to the truth and the summary lists each round."""
        prot = self.newProtocol(ProtGmmhetRefine, objLabel='refine orientations x2', maxAngle=6.0,
                                levels=2, rounds=2, retrainEpochs=1,
                                doReconstruct=False, useGpu=False, numberOfThreads=2)
        prot.inputParticles.set(self.protTrain)
        prot.inputParticles.setExtended('outputParticles')
        self.assertEqual(prot.validate(), [])
        # "Evidence to move" -1 (default): the engine's per-round rule; a value sets every round
        self.assertNotIn('--min-gain', prot._getRefineArgs())
        prot.minGain.set(3.0)
        self.assertIn('--min-gain 3', prot._getRefineArgs())
        prot.minGain.set(-1)
        prot = self.launchProtocol(prot)
        before, after = self._errors(self.protTrain.outputParticles), self._errors(prot.outputParticles)
        self.assertEqual(sorted(before), sorted(after))
        self.assertLess(np.median([v[0] for v in after.values()]), 0.5 * np.median([v[0] for v in before.values()]))
        self.assertTrue(os.path.exists(os.path.join(prot.getRefineDir(), 'round_2', 'particles.star')))
        self.assertIn('Refine-retrain rounds: 2', '\n'.join(prot.summary()))

    def test_refine_fine_reference_from_the_second_round(self):
        """A neutral GMM that records its build resolution (as "build Gaussian model" writes it, here
        a coarse 40 A): from the second round on the particles are aligned to the models of a network
        retrained on a finer GMM of their reconstruction; the summary names it per round. Advanced
        "Finer reference" = No passes --reference decoded."""
        from scipion_gmmhet.engine.model.gmm import GMM
        gmmDir = os.path.join(self.data['out_dir'], 'truth_gmm')
        g = GMM.load(os.path.join(gmmDir, sorted(os.listdir(gmmDir))[0]))
        coarseFn = os.path.join(self.dataDir, 'neutral_40A.npz')
        GMM(g.centers_A, g.amplitudes, g.sigmas_A, g.box, g.apix, {**g.info, 'target_resolution_A': '40'}).save(coarseFn)
        protTrain = self._trainOn(coarseFn, '40 A GMM', 'train (40 A GMM)')
        for fine in (True, False):
            prot = self.newProtocol(ProtGmmhetRefine, objLabel='refine, finer reference %s' % fine, maxAngle=6.0,
                                    levels=2, rounds=2, retrainEpochs=1, fineReference=fine,
                                    doReconstruct=False, useGpu=False, numberOfThreads=2)
            prot.inputParticles.set(protTrain)
            prot.inputParticles.setExtended('outputParticles')
            self.assertEqual('--reference decoded' in prot._getRefineArgs(), not fine)
            prot = self.launchProtocol(prot)
            refs = [str(r) for r in prot.getRounds()['reference']]
            self.assertEqual(refs[0], 'decoded models')
            self.assertEqual('Gaussians at' in refs[1], fine)
            self.assertEqual('Reference per round' in '\n'.join(prot.summary()), fine)
            self.assertEqual(prot.outputParticles.getSize(), N)

    def test_refine_domain_output_volume(self):
        """"Refine one domain?" with a mask on the molecule's arm: the refined particles plus a
        "domain map" Volume with half maps; the summary compares the domain-masked half-map FSC
        of the particle poses and of the domain poses."""
        from scipion_gmmhet.engine.io.mrc import write_map
        from scipion_gmmhet.engine.simulation.simulate import build_molecule
        mol = build_molecule(BOX, APIX, 0, 300)
        arm = mol.centers_A[mol.arm_slice()]
        g = (np.arange(BOX) - BOX // 2) * APIX
        zz, yy, xx = np.meshgrid(g, g, g, indexing='ij')
        pts = np.stack([xx, yy, zz], -1).reshape(-1, 3)
        near = np.min(np.linalg.norm(pts[:, None] - arm[None], axis=-1), axis=1) < 2 * APIX
        maskFn = os.path.join(self.dataDir, 'arm_mask.mrc')
        write_map(maskFn, near.reshape((BOX,) * 3).astype(np.float32), APIX)
        protMask = runImportVolume(self, maskFn, APIX, label='arm mask')
        prot = self.newProtocol(ProtGmmhetRefine, objLabel='refine + domain', maxAngle=4.0, levels=1, rounds=1,
                                doReconstruct=False, doDomain=True, domainMaxAngle=4.0, useGpu=False,
                                numberOfThreads=2)
        prot.inputParticles.set(self.protTrain)
        prot.inputParticles.setExtended('outputParticles')
        prot.domainMask.set(protMask)
        prot.domainMask.setExtended('outputVolume')
        self.assertEqual(prot.validate(), [])
        prot = self.launchProtocol(prot)
        self.assertEqual(prot.outputParticles.getSize(), self.protTrain.outputParticles.getSize())
        vol = prot.outputDomainVolume
        self.assertTrue(os.path.exists(vol.getFileName()))
        self.assertAlmostEqual(vol.getSamplingRate(), APIX, places=3)
        self.assertTrue(vol.hasHalfMaps())
        for fn in vol.getHalfMaps(asList=True):
            self.assertTrue(os.path.exists(fn), fn)
        self.assertTrue(os.path.exists(vol._gmmhetPlainMap.get()))
        text = '\n'.join(prot.summary())
        self.assertIn('Domain-masked half-map FSC 0.143', text)
        self.assertIn('(mask)', text)
        from scipion_gmmhet.viewers.viewer_refine import writeRefineReport
        out = writeRefineReport(prot, self.proj.getPath('refine_domain_report'))
        assertPngNotBlank(self, out['fsc'])  # the two domain-masked FSC curves
        with open(out['chimerax']) as f:
            self.assertEqual(f.read().count('open '), 2)  # domain maps from particle and domain poses
