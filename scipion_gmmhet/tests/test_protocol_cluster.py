"""Harness test of "gmmhet - cluster and reconstruct" and its viewer on a small simulated
compositional dataset:

- import the particles (pwem + scipion-em-relion star importer) and the consensus map, build a
  Gaussian model (the build protocol when installed, else a small gmm.npz made with the
  engine's API), train a few epochs with "gmmhet - train heterogeneity";
- cluster and reconstruct: the SetOfClasses3D holds every particle once, in the class given
  by labels.npy for its id (read independently through the star's rlnGmmhetParticleId), with
  the input's alignment, CTF and image; each class representative is its reconstruction
  (right box and sampling, half maps attached); the GMM cluster-centre maps and the PC
  trajectory maps are output as SetOfVolumes;
- a second run on a subset of the trained particles (Scipion subset of the training output)
  classifies only those;
- the viewer's headless PNGs (embedding by class, sizes, FSC) exist and are not blank, and the
  ChimeraX command file opens every map.

    python -m scipion tests scipion_gmmhet.tests.test_protocol_cluster
"""
import importlib.util
import os

import numpy as np

from pyworkflow.object import String
from pyworkflow.tests import BaseTest, setupTestProject
from pwem.objects import SetOfClasses3D, SetOfVolumes

from scipion_gmmhet.constants import GMMHET_PARTICLE_ID
from scipion_gmmhet.engine.io.mrc import read_map
from scipion_gmmhet.engine.io.star import read_star
from scipion_gmmhet.protocols.protocol_cluster import ProtGmmhetCluster
from scipion_gmmhet.protocols.protocol_train import GMM_FILE_ATTR, ProtGmmhetTrain
from scipion_gmmhet.tests.common import (assertPngNotBlank, runImportParticlesStar, runImportVolume,
                                         simulateDataset, writeRelionImportStar)

N = 240
BOX = 32
APIX = 4.0
ZDIM = 2
EPOCHS = 2
K = 2
STEPS = 3
N_GAUSS = 64


class TestProtocolCluster(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='compositional',
                                   n=N, box=BOX, apix=APIX, snr=1.0)
        star = writeRelionImportStar(cls.data['star'],
                                     os.path.join(cls.dataDir, 'relion', 'particles.star'))
        cls.protParts = runImportParticlesStar(cls, star)
        protGmm, gmmExt = cls._buildGmm()
        prot = cls.newProtocol(ProtGmmhetTrain, objLabel='train', zDim=ZDIM,
                               numberOfEpochs=EPOCHS, batchSize=64, seed=1, useGpu=False,
                               numberOfThreads=2)
        prot.inputParticles.set(cls.protParts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(protGmm)
        prot.inputGmm.setExtended(gmmExt)
        cls.protTrain = cls.launchProtocol(prot)

        prot = cls.newProtocol(ProtGmmhetCluster, objLabel='cluster k=%d' % K,
                               numberOfClusters=K, trajectorySteps=STEPS, numberOfPcs=2,
                               useGpu=False, numberOfThreads=2)
        prot.inputParticles.set(cls.protTrain)
        prot.inputParticles.setExtended('outputParticles')
        errors = prot.validate()
        assert errors == [], errors
        cls.protCluster = cls.launchProtocol(prot)

    @classmethod
    def _buildGmm(cls):
        if importlib.util.find_spec('scipion_gmmhet.protocols.protocol_build_gmm') is not None:
            from scipion_gmmhet.protocols.protocol_build_gmm import ProtGmmhetBuildGmm
            protVol = runImportVolume(cls, cls.data['consensus'], APIX)
            prot = cls.newProtocol(ProtGmmhetBuildGmm, objLabel='build GMM', resolution=12.0,
                                   numberOfGaussians=N_GAUSS, useGpu=False, numberOfThreads=2)
            prot.inputVolume.set(protVol)
            prot.inputVolume.setExtended('outputVolume')
            cls.launchProtocol(prot)
            return prot, 'outputVolume'
        from scipion_gmmhet.engine.model.build import build_gmm
        gmmFn = os.path.join(cls.dataDir, 'gmm', 'gmm.npz')
        os.makedirs(os.path.dirname(gmmFn), exist_ok=True)
        vol, _ = read_map(cls.data['consensus'])
        build_gmm(vol, APIX, 12.0, n_gauss=N_GAUSS, steps=60, n_start=16).gmm.save(gmmFn)
        protVol = runImportVolume(cls, cls.data['consensus'], APIX, label='consensus + GMM')
        vol = protVol.outputVolume
        setattr(vol, GMM_FILE_ATTR, String(gmmFn))
        cls.proj.mapper.store(vol)
        cls.proj.mapper.commit()
        return cls.proj.getProtocol(protVol.getObjId()), 'outputVolume'

    # ------------------------------------------------------------------ helpers
    def _labelsById(self, prot):
        """{particle id: 1-based class} read independently: star ids + labels.npy."""
        ids = read_star(prot.getParticlesStar())['particles'][GMMHET_PARTICLE_ID].astype(int)
        labels = np.load(os.path.join(prot.getAnalysisDir(), 'labels.npy'))
        self.assertEqual(len(labels), len(ids))
        return {int(pid): int(lab) + 1 for pid, lab in zip(ids, labels)}

    def _checkClasses(self, prot, inputSet):
        classes = prot.outputClasses
        self.assertIsInstance(classes, SetOfClasses3D)
        expected = self._labelsById(prot)
        inputById = {p.getObjId(): p.clone() for p in inputSet.iterItems()}
        self.assertEqual(sorted(expected), sorted(inputById))
        seen = {}
        for cls in classes.iterItems():
            rep = cls.getRepresentative()
            vol, apix = read_map(rep.getFileName())
            self.assertEqual(vol.shape, (BOX, BOX, BOX))
            self.assertAlmostEqual(apix, APIX, places=3)
            self.assertAlmostEqual(rep.getSamplingRate(), APIX, places=4)
            self.assertTrue(np.isfinite(vol).all() and vol.std() > 0)
            halves = rep.getHalfMaps().split(',')
            self.assertEqual(len(halves), 2)
            for h in halves:
                self.assertTrue(os.path.exists(h), h)
            self.assertTrue(cls.hasAlignmentProj())
            for part in cls.iterItems():
                pid = part.getObjId()
                self.assertNotIn(pid, seen)
                seen[pid] = cls.getObjId()
                src = inputById[pid]
                np.testing.assert_allclose(part.getTransform().getMatrix(),
                                           src.getTransform().getMatrix(), atol=1e-12)
                self.assertAlmostEqual(part.getCTF().getDefocusU(), src.getCTF().getDefocusU())
                self.assertAlmostEqual(part.getCTF().getDefocusV(), src.getCTF().getDefocusV())
                self.assertEqual(part.getLocation(), src.getLocation())
        self.assertEqual(seen, expected)
        return classes

    # ------------------------------------------------------------------ tests
    def test_1_classesKeyedById(self):
        prot = self.protCluster
        classes = self._checkClasses(prot, self.protTrain.outputParticles)
        self.assertEqual(classes.getSize(), K)
        self.assertEqual(sum(c.getSize() for c in classes.iterItems()), N)
        summary = prot.getSummary()
        self.assertEqual([c['size'] for c in summary['clusters']],
                         sorted((c.getSize() for c in classes.iterItems()), reverse=True))
        text = '\n'.join(prot.summary())
        self.assertIn('Class 1:', text)
        self.assertIn('FSC 0.143 resolution', text)
        methods = '\n'.join(prot.methods())
        self.assertIn('on their whitened principal components', methods)  # the default
        self.assertIn('Each class was reconstructed', methods)

    def test_2_volumes(self):
        prot = self.protCluster
        gmm = prot.outputGmmVolumes
        self.assertIsInstance(gmm, SetOfVolumes)
        self.assertEqual(gmm.getSize(), K)
        classIds = sorted(c.getObjId() for c in prot.outputClasses.iterItems())
        self.assertEqual(sorted(v.getObjId() for v in gmm.iterItems()), classIds)
        for v in gmm.iterItems():
            vol, apix = read_map(v.getFileName())
            self.assertEqual(vol.shape, (BOX, BOX, BOX))
            self.assertGreater(vol.max(), 0)
        traj = prot.outputTrajectories
        # PC1, PC2 and (PC 0) the 1-D trajectory along the data manifold
        self.assertEqual(traj.getSize(), 3 * STEPS)
        pcs = sorted((v._gmmhetPc.get(), v._gmmhetStep.get()) for v in traj.iterItems())
        self.assertEqual(pcs, [(pc, s) for pc in (0, 1, 2) for s in range(1, STEPS + 1)])
        labels = [v.getObjLabel() for v in traj.iterItems() if v._gmmhetPc.get() == 0]
        self.assertEqual(sorted(labels), ['data trajectory step %d' % s for s in range(1, STEPS + 1)])
        for v in traj.iterItems():
            self.assertTrue(os.path.exists(v.getFileName()))

    def test_3_subsetAndValidation(self):
        """Clustering a subset of the trained particles (pwem's subset protocol: the training
        folder comes through the Flexibility Hub info) classifies exactly that subset."""
        bad = self.newProtocol(ProtGmmhetCluster, numberOfClusters=N + 1, useGpu=False)
        bad.inputParticles.set(self.protTrain)
        bad.inputParticles.setExtended('outputParticles')
        self.assertTrue(any('Number of clusters' in e for e in bad.validate()))

        from pwem.protocols import ProtSubSet
        protSplit = self.newProtocol(ProtSubSet, objLabel='subset of trained particles',
                                     chooseAtRandom=True, nElements=N // 2)
        protSplit.inputFullSet.set(self.protTrain)
        protSplit.inputFullSet.setExtended('outputParticles')
        protSplit = self.launchProtocol(protSplit)
        sub = protSplit.outputParticlesFlex
        protSub = self.newProtocol(ProtGmmhetCluster, objLabel='cluster subset', numberOfClusters=K,
                                   doTrajectories=False, doGmmMaps=False, useGpu=False)
        protSub.inputParticles.set(protSplit)
        protSub.inputParticles.setExtended('outputParticlesFlex')
        self.assertEqual(protSub.validate(), [])
        self.assertEqual(protSub.getTrainDir(), self.protTrain.getTrainDir())
        protSub = self.launchProtocol(protSub)
        classes = self._checkClasses(protSub, sub)
        self.assertEqual(sum(c.getSize() for c in classes.iterItems()), N // 2)
        self.assertFalse(protSub.hasAttribute('outputGmmVolumes'))
        self.assertFalse(protSub.hasAttribute('outputTrajectories'))

    def test_4_viewer(self):
        from scipion_gmmhet.viewers.viewer_cluster import writeClusterReport
        outDir = os.path.abspath(self.proj.getTmpPath('cluster_report'))
        files = writeClusterReport(self.protCluster, outDir)
        for name in ('embedding_pca', 'sizes', 'fsc'):
            assertPngNotBlank(self, files[name])
        cxc = open(files['chimerax']).read()
        self.assertEqual(cxc.count('open '), 2 * K)
        for line in cxc.splitlines():
            if line.startswith('open '):
                self.assertTrue(os.path.exists(line[5:].strip().strip('"')), line)
