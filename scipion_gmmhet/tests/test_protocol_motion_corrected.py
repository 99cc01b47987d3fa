"""Harness test of the motion-corrected consensus map of "gmmhet - cluster and reconstruct"
on a small simulated conformational dataset (the arm swings 60 degrees):

- import the particles (scipion-em-relion star importer), a Gaussian model of the simulator's
  neutral conformation (``truth_maps/neutral.mrc``), train with "gmmhet - train heterogeneity";
- cluster and reconstruct with "Motion-corrected consensus map? = Yes": the protocol trains one
  model per half set and outputs ``outputMotionCorrected`` (a Volume with its half maps, source
  relation to the particles) next to the plain consensus reconstruction of the same particles;
- inside a soft mask around the moving arm the motion-corrected map agrees better with the
  truth than the plain consensus (mean FSC over shells 1..10 of 16), and the static core is not
  worse;
- the viewer's report plots both FSC curves and writes a ChimeraX file opening both maps.

    python -m scipion tests scipion_gmmhet.tests.test_protocol_motion_corrected
"""
import json
import os

import numpy as np

from pyworkflow.object import String
from pyworkflow.tests import BaseTest, setupTestProject
from pwem.objects import Volume

from scipion_gmmhet.engine.io.mrc import read_map
from scipion_gmmhet.engine.model.fourier import fsc_table
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.protocols.protocol_cluster import ProtGmmhetCluster
from scipion_gmmhet.protocols.protocol_train import GMM_FILE_ATTR, ProtGmmhetTrain
from scipion_gmmhet.tests.common import (assertPngNotBlank, runImportParticlesStar, runImportVolume,
                                         simulateDataset, writeRelionImportStar)

N = 600
BOX = 32
APIX = 4.0
EPOCHS = 10
N_GAUSS = 128
SHELLS = slice(1, 11)


def domainMask(gmm: GMM, rows: slice) -> np.ndarray:
    """Soft mask around the Gaussians ``rows`` (rendered, > 20 % of the maximum, dilated 2 px,
    4 px cosine edge)."""
    from scipy import ndimage
    part = GMM(gmm.centers_A[rows], gmm.amplitudes[rows], gmm.sigmas_A[rows], BOX, APIX).render()
    core = ndimage.binary_dilation(part > 0.2 * part.max(), iterations=2)
    dist = ndimage.distance_transform_edt(~core)
    mask = core.astype(np.float32)
    edge = (dist > 0) & (dist < 4)
    mask[edge] = 0.5 + 0.5 * np.cos(np.pi * dist[edge] / 4)
    return mask


class TestProtocolMotionCorrected(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='conformational',
                                   n=N, box=BOX, apix=APIX, snr=1.0, seed=1)
        star = writeRelionImportStar(cls.data['star'],
                                     os.path.join(cls.dataDir, 'relion', 'particles.star'))
        cls.protParts = runImportParticlesStar(cls, star)
        # the neutral model: a GMM of the middle conformation (the frame the map is made in)
        from scipion_gmmhet.engine.model.build import build_gmm
        neutral = os.path.join(cls.data['out_dir'], 'truth_maps', 'neutral.mrc')
        gmmFn = os.path.join(cls.dataDir, 'gmm', 'gmm.npz')
        os.makedirs(os.path.dirname(gmmFn), exist_ok=True)
        build_gmm(read_map(neutral)[0], APIX, 12.0, n_gauss=N_GAUSS, steps=60, n_start=16).gmm.save(gmmFn)
        protVol = runImportVolume(cls, neutral, APIX, label='neutral map + GMM')
        vol = protVol.outputVolume
        setattr(vol, GMM_FILE_ATTR, String(gmmFn))
        cls.proj.mapper.store(vol)
        cls.proj.mapper.commit()
        protVol = cls.proj.getProtocol(protVol.getObjId())

        prot = cls.newProtocol(ProtGmmhetTrain, objLabel='train', zDim=4, numberOfEpochs=EPOCHS,
                               batchSize=64, seed=1, useGpu=False, numberOfThreads=2)
        prot.inputParticles.set(cls.protParts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(protVol)
        prot.inputGmm.setExtended('outputVolume')
        cls.protTrain = cls.launchProtocol(prot)

        prot = cls.newProtocol(ProtGmmhetCluster, objLabel='cluster + motion-corrected map',
                               numberOfClusters=2, doReconstruct=False, doGmmMaps=False,
                               doTrajectories=False, doMotionCorrected=True, useGpu=False,
                               numberOfThreads=2)
        prot.inputParticles.set(cls.protTrain)
        prot.inputParticles.setExtended('outputParticles')
        errors = prot.validate()
        assert errors == [], errors
        cls.protCluster = cls.launchProtocol(prot)

    def test_1_output(self):
        prot = self.protCluster
        vol = prot.outputMotionCorrected
        self.assertIsInstance(vol, Volume)
        self.assertAlmostEqual(vol.getSamplingRate(), APIX, places=4)
        data, apix = read_map(vol.getFileName())
        self.assertEqual(data.shape, (BOX, BOX, BOX))
        self.assertTrue(np.isfinite(data).all() and data.std() > 0)
        halves = vol.getHalfMaps().split(',')
        self.assertEqual(len(halves), 2)
        for h in halves:
            self.assertEqual(read_map(h)[0].shape, (BOX, BOX, BOX))
        # the half models: trained on the two disjoint half sets
        hdir = os.path.join(prot.getMotionDir(), 'motion_corrected_halves')
        stars = []
        for h in (1, 2):
            with open(os.path.join(hdir, 'half%d' % h, 'config.json')) as f:
                stars.append(json.load(f)['particles'])
        from scipion_gmmhet.engine.io.metadata import read_particles
        names = [set(read_particles(s).particles['rlnImageName']) for s in stars]
        self.assertFalse(names[0] & names[1])
        self.assertEqual(len(names[0]) + len(names[1]), N)
        # source relation: the particles -> the map
        parents = [p.getObjId() for p in self.proj.getSourceParents(prot.outputMotionCorrected) or []]
        self.assertTrue({self.protTrain.getObjId(), self.protTrain.outputParticles.getObjId()} & set(parents),
                        parents)

    def test_2_maskedFscImproves(self):
        prot = self.protCluster
        paths = prot.getMotionMaps()
        sim = self.data['out_dir']  # the simulator's files (reused runs return only the main paths)
        truth, _ = read_map(os.path.join(sim, 'truth_maps', 'neutral.mrc'))
        gmm = GMM.load(os.path.join(sim, 'truth_gmm', 'neutral.npz'))
        with open(os.path.join(sim, 'simulation.json')) as f:
            arm = json.load(f)['domains']['arm']
        masks = {'arm': domainMask(gmm, slice(*arm)), 'static': domainMask(gmm, slice(0, arm[0]))}
        score = {}
        for name in ('map', 'plain'):
            vol, _ = read_map(paths[name])
            for region, m in masks.items():
                score[name, region] = float(fsc_table(vol * m, truth * m, APIX)['fsc'][SHELLS].mean())
        print('mean masked FSC with the truth, shells 1-10:', score)
        self.assertGreater(score['map', 'arm'], score['plain', 'arm'] + 0.01)
        self.assertGreater(score['map', 'static'], score['plain', 'static'] - 0.01)

    def test_3_viewer(self):
        from scipion_gmmhet.viewers.viewer_cluster import writeClusterReport
        outDir = os.path.abspath(self.proj.getTmpPath('motion_report'))
        files = writeClusterReport(self.protCluster, outDir)
        assertPngNotBlank(self, files['motion_fsc'])
        cxc = open(files['motion_chimerax']).read()
        opened = [line[5:].strip().strip('"') for line in cxc.splitlines() if line.startswith('open ')]
        self.assertEqual(len(opened), 2)
        for fn in opened:
            self.assertTrue(os.path.exists(fn), fn)
        self.assertIn('motion-corrected', cxc)
