"""Harness test of "gmmhet - train heterogeneity" and its viewer on a small simulated
conformational dataset:

- import the particles (pwem + scipion-em-relion star importer) and the consensus map, build a
  Gaussian model ("gmmhet - build Gaussian model" when it is installed, else a small gmm.npz
  made with the engine's API and attached to the imported map);
- train a few epochs through the protocol; the output is a SetOfParticlesFlex with the input's
  ids, alignment and CTF, and each particle's latent vector equals latent.npy's row for that
  particle id (found through the star's rlnGmmhetParticleId, not by position);
- Scipion's Continue with more epochs resumes from the checkpoint (the first epochs' losses are
  unchanged), and "continue a previous run" trains further in a new protocol without writing
  into the previous one;
- the viewer's headless PNGs (latent space, loss curves) exist and are not blank.

    python -m scipion tests scipion_gmmhet.tests.test_protocol_train
"""
import glob
import hashlib
import importlib.util
import os

import numpy as np

from pyworkflow.object import String
from pyworkflow.protocol.constants import MODE_RESUME
from pyworkflow.tests import BaseTest, setupTestProject
from pwem.objects import SetOfParticlesFlex

from scipion_gmmhet.constants import GMMHET_PARTICLE_ID
from scipion_gmmhet.engine.io.star import read_star, write_star
from scipion_gmmhet.protocols import ProtGmmhetTrain
from scipion_gmmhet.protocols.protocol_train import (FLEX_PROG_NAME, GMM_FILE_ATTR,
                                                     latentRowsById)
from scipion_gmmhet.tests.common import (assertPngNotBlank, runImportParticlesStar, runImportVolume,
                                         simulateDataset, writeRelionImportStar)

N = 300
BOX = 32
APIX = 4.0
ZDIM = 2
EPOCHS = 1
GMM_RESOLUTION_A = 12.0
N_GAUSS = 64


def _hasBuildProtocol():
    return importlib.util.find_spec('scipion_gmmhet.protocols.protocol_build_gmm') is not None


def _md5(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


class TestProtocolTrain(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='conformational',
                                   n=N, box=BOX, apix=APIX, snr=1.0)
        star = writeRelionImportStar(cls.data['star'],
                                     os.path.join(cls.dataDir, 'relion', 'particles.star'))
        cls.protParts = runImportParticlesStar(cls, star)
        cls.protGmm, cls.gmmExtended = cls._buildGmm()

        prot = cls.newProtocol(ProtGmmhetTrain, objLabel='train %d epochs' % EPOCHS,
                               zDim=ZDIM, numberOfEpochs=EPOCHS, batchSize=64, seed=3,
                               useGpu=False, numberOfThreads=2)
        prot.inputParticles.set(cls.protParts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(cls.protGmm)
        prot.inputGmm.setExtended(cls.gmmExtended)
        errors = prot.validate()
        assert errors == [], errors
        cls.protTrain = cls.launchProtocol(prot)

    @classmethod
    def _buildGmm(cls):
        """(protocol, output name) of a volume carrying a Gaussian model of the consensus."""
        if _hasBuildProtocol():
            from scipion_gmmhet.protocols.protocol_build_gmm import ProtGmmhetBuildGmm
            protVol = runImportVolume(cls, cls.data['consensus'], APIX)
            prot = cls.newProtocol(ProtGmmhetBuildGmm, objLabel='build GMM',
                                   resolution=GMM_RESOLUTION_A, numberOfGaussians=N_GAUSS,
                                   steps=60, useGpu=False, numberOfThreads=2)
            prot.inputVolume.set(protVol)
            prot.inputVolume.setExtended('outputVolume')
            cls.launchProtocol(prot)
            return prot, 'outputVolume'
        # fallback: a pre-made gmm.npz attached to the imported consensus map
        import mrcfile
        from scipion_gmmhet.engine.model.build import build_gmm
        gmmFn = os.path.join(cls.dataDir, 'gmm', 'gmm.npz')
        if not os.path.exists(gmmFn):
            os.makedirs(os.path.dirname(gmmFn), exist_ok=True)
            with mrcfile.open(cls.data['consensus'], permissive=True) as m:
                vol = np.asarray(m.data, dtype=np.float32)
            res = build_gmm(vol, APIX, GMM_RESOLUTION_A, n_gauss=N_GAUSS, steps=60, n_start=16)
            res.gmm.save(gmmFn)
        protVol = runImportVolume(cls, cls.data['consensus'], APIX, label='consensus + GMM')
        vol = protVol.outputVolume
        setattr(vol, GMM_FILE_ATTR, String(gmmFn))
        cls.proj.mapper.store(vol)
        cls.proj.mapper.commit()
        return cls.proj.getProtocol(protVol.getObjId()), 'outputVolume'

    # ------------------------------------------------------------------ helpers
    def _latentById(self, prot):
        """{particle id: latent row} read independently of the protocol: star ids + latent.npy."""
        star = read_star(prot.getParticlesStar())['particles']
        ids = star[GMMHET_PARTICLE_ID].astype(int).tolist()
        z = np.load(prot.getLatentFile())
        self.assertEqual(z.shape, (len(ids), ZDIM))
        self.assertEqual(z.dtype, np.float32)
        return {pid: z[i] for i, pid in enumerate(ids)}

    def _checkOutput(self, prot):
        inp = self.protParts.outputParticles
        out = prot.outputParticles
        self.assertIsInstance(out, SetOfParticlesFlex)
        self.assertEqual(out.getSize(), inp.getSize())
        self.assertTrue(out.hasAlignmentProj())
        self.assertTrue(out.hasCTF())
        self.assertAlmostEqual(out.getSamplingRate(), inp.getSamplingRate())
        self.assertEqual(out.getFlexInfo().getProgName(), FLEX_PROG_NAME)
        self.assertEqual(out.getFlexInfo().getAttr('zDim'), ZDIM)
        self.assertTrue(os.path.exists(out.getFlexInfo().getAttr('modelPath')))
        self.assertEqual(out.getFlexInfo().getAttr('trainDir'), prot.getTrainDir())
        self.assertTrue(os.path.exists(os.path.join(prot.getTrainDir(), 'model.pt')))

        latent = self._latentById(prot)
        inputById = {p.getObjId(): p.clone() for p in inp.iterItems()}
        outIds = []
        for part in out.iterItems():
            pid = part.getObjId()
            outIds.append(pid)
            z = part.getZFlex()
            self.assertEqual(len(z), ZDIM)
            np.testing.assert_allclose(z, latent[pid], rtol=0, atol=1e-6,
                                       err_msg='particle %d' % pid)
            src = inputById[pid]
            np.testing.assert_allclose(part.getTransform().getMatrix(),
                                       src.getTransform().getMatrix(), atol=1e-12)
            self.assertAlmostEqual(part.getCTF().getDefocusU(), src.getCTF().getDefocusU())
            self.assertEqual(part.getLocation(), src.getLocation())
        self.assertEqual(sorted(outIds), sorted(inputById))
        allZ = np.array([latent[i] for i in outIds])
        self.assertTrue(np.all(np.isfinite(allZ)))
        self.assertGreater(allZ.std(axis=0).min(), 0.0)  # not a constant encoder
        # close the sets' sqlite connections: a continued run replaces the output file
        out.close()
        inp.close()

    # ------------------------------------------------------------------ tests
    def test_1_outputKeyedById(self):
        prot = self.protTrain
        self._checkOutput(prot)
        loss = prot.getLoss()
        self.assertEqual([int(r['epoch']) for r in loss], list(range(1, EPOCHS + 1)))
        summary = '\n'.join(prot.summary())
        self.assertIn('Latent dimension: %d' % ZDIM, summary)
        self.assertIn('Particles: %d' % N, summary)
        self.assertIn('final loss', summary)
        self.assertIn('Effective latent dimension:', summary)   # engine's train/summary.json
        self.assertIn('(lowest validation loss)', summary)
        # the methods text names the similarity this run trained with (the default 'corr')
        self.assertEqual(prot.getLossName(), 'corr')
        methods = '\n'.join(prot.methods())
        self.assertIn('one correlation over all Fourier coefficients', methods)
        self.assertNotIn('Fourier ring correlation', methods)
        self.assertIn("Gaussians' positions and amplitudes;", methods)
        self.assertEqual(prot.getTrainDir(), prot.outputParticles.getFlexInfo().getAttr('trainDir'))

    def test_2_latentRowsByIdNotByPosition(self):
        """The id -> latent-row map follows the star's rlnGmmhetParticleId even when the star's
        rows are not in id order (symmetry-expanded latents: particle-major blocks)."""
        blocks = read_star(self.protTrain.getParticlesStar())
        parts = blocks['particles'].copy()
        perm = np.random.default_rng(0).permutation(len(parts))
        blocks['particles'] = parts.iloc[perm].reset_index(drop=True)
        fn = os.path.abspath(self.proj.getTmpPath('shuffled.star'))
        write_star(fn, blocks)
        ids = blocks['particles'][GMMHET_PARTICLE_ID].astype(int).to_numpy()
        rows = latentRowsById(fn, len(ids))
        for i, pid in enumerate(ids):
            self.assertEqual(rows[int(pid)], i)
        rows3 = latentRowsById(fn, 3 * len(ids), nOps=3)
        self.assertEqual(rows3[int(ids[5])], 15)
        with self.assertRaises(Exception):
            latentRowsById(fn, len(ids) + 1)

    def test_2b_latentRowsFollowRecordedKeys(self):
        """With the training's recorded particle keys (id:<rlnGmmhetParticleId>) the id -> row
        map follows them, even when the star recorded for the training was rewritten after it
        (other order, fewer rows); the "cluster"/"refine" inputs get their latents that way."""
        from scipion_gmmhet.engine.io.outputs import TrainFolder
        from scipion_gmmhet.protocols.trained_input import TrainedParticlesInput
        trainDir = self.protTrain.getTrainDir()
        starFn = self.protTrain.getParticlesStar()
        trainIds = read_star(starFn)['particles'][GMMHET_PARTICLE_ID].astype(int).tolist()
        keys = TrainFolder(trainDir).read_particle_keys()
        self.assertEqual(list(keys), ['id:%d' % pid for pid in trainIds])  # the run recorded them
        self.assertEqual(latentRowsById(starFn, len(trainIds), 1, trainDir),
                         {pid: i for i, pid in enumerate(trainIds)})
        # a fake run: its keys in one order, the star it names rewritten in another, shorter
        fake = TrainFolder(os.path.abspath(self.proj.getTmpPath('fake_train')))
        os.makedirs(fake.folder, exist_ok=True)
        order = np.random.default_rng(1).permutation(len(trainIds))
        fakeIds = [trainIds[i] for i in order]
        fake.write_particle_keys(['id:%d' % pid for pid in fakeIds])
        z = np.stack([np.arange(len(fakeIds)), -np.arange(len(fakeIds))], 1).astype(np.float32)
        fake.write_latents(z)
        fake.write_config({'n_ops': 1})
        blocks = read_star(starFn)
        blocks['particles'] = blocks['particles'].iloc[::-2].reset_index(drop=True)
        rewritten = os.path.abspath(self.proj.getTmpPath('rewritten.star'))
        write_star(rewritten, blocks)
        expected = {pid: i for i, pid in enumerate(fakeIds)}
        self.assertEqual(latentRowsById(rewritten, len(fakeIds), 1, fake.folder), expected)
        self.assertEqual(latentRowsById(rewritten, 2 * len(fakeIds), 2, fake.folder),
                         {pid: 2 * i for i, pid in enumerate(fakeIds)})
        with self.assertRaises(Exception):
            latentRowsById(rewritten, len(fakeIds) + 1, 1, fake.folder)
        with self.assertRaises(Exception):  # without keys: the star's count check, as before
            latentRowsById(rewritten, len(fakeIds), 1, None)

        class _NoZFlex:
            def iterItems(self, orderBy=None):
                return iter(())

        class _Input(TrainedParticlesInput):
            def getTrainDir(self):
                return fake.folder

            def _trainStar(self):
                return rewritten

        zById = _Input()._latentsById(_NoZFlex())
        self.assertEqual(sorted(zById), sorted(fakeIds))
        for pid, i in expected.items():
            np.testing.assert_array_equal(zById[pid], z[i])

    def test_3_validation(self):
        prot = self.newProtocol(ProtGmmhetTrain, zDim=0, useGpu=False,
                                changePositions=False, changeAmplitudes=False)
        prot.inputParticles.set(self.protParts)
        prot.inputParticles.setExtended('outputParticles')
        errorList = prot.validate()
        errors = '\n'.join(errorList)
        self.assertIn('Gaussian model', errors)
        self.assertIn('What may change', errors)
        # one message for zDim = 0 (the plugin's, not also Scipion's vaguer GE validator)
        self.assertEqual([e for e in errorList if 'Latent dimension' in e],
                         ['Latent dimension: must be at least 1.'])
        # Continue after changing a setting: a clear refusal instead of a silent restart
        trainDir = self.protTrain.getTrainDir()
        prot.inputGmm.set(self.protGmm)
        prot.inputGmm.setExtended(self.gmmExtended)
        prot.zDim.set(ZDIM + 1)
        prot.changePositions.set(True)
        prot.changeAmplitudes.set(True)
        with self.assertRaises(Exception) as ctx:
            prot._checkResumable(trainDir)
        self.assertIn('zdim 2 -> 3', str(ctx.exception))
        self.assertIn('Restart', str(ctx.exception))
        prot.zDim.set(ZDIM)
        prot.seed.set(3)
        prot._checkResumable(trainDir)  # same settings: resumable
        prot2 = self.newProtocol(ProtGmmhetTrain, symmetry='X5', useGpu=False)
        prot2.inputParticles.set(self.protParts)
        prot2.inputParticles.setExtended('outputParticles')
        prot2.inputGmm.set(self.protGmm)
        prot2.inputGmm.setExtended(self.gmmExtended)
        errors2 = '\n'.join(prot2.validate())
        self.assertIn('Symmetry', errors2)
        self.assertNotIn('Gaussian model', errors2)

    def test_4_viewerPngs(self):
        from scipion_gmmhet.viewers.viewer_train import (latentTable, writeLatentPng,
                                                         writeLossPng)
        outDir = self.proj.getTmpPath('viewer_train')
        os.makedirs(outDir, exist_ok=True)
        ids, z, defocus = latentTable(self.protTrain.outputParticles, 'defocus')
        self.assertEqual(z.shape, (N, ZDIM))
        self.assertTrue(np.all(defocus > 1000))
        latent = self._latentById(self.protTrain)
        np.testing.assert_allclose(z, np.array([latent[i] for i in ids]), atol=1e-6)
        self.protTrain.outputParticles.close()
        assertPngNotBlank(self, writeLatentPng(self.protTrain, os.path.join(outDir, 'pca.png'),
                                            method='pca', colorBy='defocus'))
        assertPngNotBlank(self, writeLatentPng(self.protTrain, os.path.join(outDir, 'z1.png'),
                                            method='pca', colorBy='z1', kind='scatter'))
        assertPngNotBlank(self, writeLatentPng(self.protTrain, os.path.join(outDir, 'hex.png'),
                                            method='pca', kind='hexbin'))
        assertPngNotBlank(self, writeLossPng(self.protTrain, os.path.join(outDir, 'loss.png')))
        # the viewer object itself (the GUI's code path, Agg backend): it saves its PNGs
        from scipion_gmmhet.viewers.viewer_train import COLOR_LATENT, GmmhetTrainViewer
        viewer = GmmhetTrainViewer(project=self.proj, protocol=self.protTrain)
        viewer.setProtocol(self.protTrain)
        viewer.colorBy.set(COLOR_LATENT)
        viewer.latentIndex.set(2)
        views = viewer._showLatent()
        self.assertEqual(len(views), 1)
        assertPngNotBlank(self, viewer._pngPath('latent_pca.png'))
        views[0].close()
        views = viewer._showLoss()
        assertPngNotBlank(self, viewer._pngPath('loss.png'))
        views[0].close()
        self.protTrain.outputParticles.close()

    def test_6_symmetryExpansion(self):
        """C2 expansion: one output particle per (particle, operator) with new ids
        (pid - 1) * 2 + s + 1, pose A @ S_s, latent row 2 * star_row + s."""
        from scipion_gmmhet import convert
        from scipion_gmmhet.engine.model.symmetry import expand_rotations, symmetry_operators
        prot = self.newProtocol(ProtGmmhetTrain, objLabel='train C2', zDim=ZDIM,
                                numberOfEpochs=1, symmetry='C2', seed=1, useGpu=False,
                                numberOfThreads=2)
        prot.inputParticles.set(self.protParts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(self.protGmm)
        prot.inputGmm.setExtended(self.gmmExtended)
        self.assertEqual(prot.validate(), [])
        self.assertTrue(any('focus mask' in w for w in prot.warnings()))
        self.launchProtocol(prot)
        prot = self.proj.getProtocol(prot.getObjId())
        out = prot.outputParticles
        inp = self.protParts.outputParticles
        self.assertIsInstance(out, SetOfParticlesFlex)
        self.assertEqual(out.getSize(), 2 * inp.getSize())
        self.assertEqual(out.getFlexInfo().getAttr('nSymOps'), 2)
        star = read_star(prot.getParticlesStar())['particles']
        rowOfId = {int(pid): i for i, pid in enumerate(star[GMMHET_PARTICLE_ID])}
        z = np.load(prot.getLatentFile())
        self.assertEqual(z.shape, (2 * len(rowOfId), ZDIM))
        ops = symmetry_operators('C2')
        inputById = {p.getObjId(): p.clone() for p in inp.iterItems()}
        seen = set()
        for part in out.iterItems():
            src, s = part._gmmhetSourceId.get(), part._gmmhetSymOp.get()
            self.assertEqual(part.getObjId(), (src - 1) * 2 + s + 1)
            seen.add((src, s))
            np.testing.assert_allclose(part.getZFlex(), z[2 * rowOfId[src] + s], atol=1e-6)
            A0, s0 = convert.alignProjToProjection(inputById[src].getTransform().getMatrix())
            A1, s1 = convert.alignProjToProjection(part.getTransform().getMatrix())
            np.testing.assert_allclose(A1, expand_rotations(A0[None], ops)[s], atol=1e-9)
            np.testing.assert_allclose(s1, s0, atol=1e-9)
            self.assertEqual(part.getLocation(), inputById[src].getLocation())
        self.assertEqual(seen, {(i, s) for i in inputById for s in (0, 1)})
        out.close()
        inp.close()

    def test_7_finerModel(self):
        """'Finer Gaussian model from the data?' (Yes by default) reaches gmmhet train --finer-model
        auto, No reaches off. At 4 A/px no finer GMM than the input's 12 A can be built (2.5 px =
        10 A), so the run trains once and says so; the summary line of a run that made one is
        tested on its summary.json record."""
        once = self.newProtocol(ProtGmmhetTrain, objLabel='train once', finerModel=False)
        once.inputParticles.set(self.protParts)
        once.inputParticles.setExtended('outputParticles')
        once.inputGmm.set(self.protGmm)
        once.inputGmm.setExtended(self.gmmExtended)
        self.assertIn('--finer-model off', once._getTrainArgs())
        prot = self.newProtocol(ProtGmmhetTrain, objLabel='train finer model', zDim=ZDIM,
                                numberOfEpochs=1, seed=1, useGpu=False)
        prot.inputParticles.set(self.protParts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(self.protGmm)
        prot.inputGmm.setExtended(self.gmmExtended)
        self.assertTrue(prot.finerModel.get())  # the default
        self.assertIn('--finer-model auto', prot._getTrainArgs())
        self.launchProtocol(prot)
        prot = self.proj.getProtocol(prot.getObjId())
        self._checkOutput(prot)
        from scipion_gmmhet.engine.io.outputs import TrainFolder
        folder = TrainFolder(prot.getTrainDir())
        self.assertEqual(folder.read_config()['train']['finer_model'], 'off')  # trained once
        self.assertFalse(os.path.exists(folder.first_model.folder))
        self.assertNotIn('Finer model', '\n'.join(prot.summary()))
        line = ProtGmmhetTrain._finerModelLines({'finer_model': {
            'first_model': 'first_model', 'neutral_gaussians': 168, 'gaussians': 687, 'resolution_A': 4.8,
            'source': 'the motion-corrected reconstruction of the particles at their input poses'}})
        self.assertEqual(len(line), 1)
        self.assertIn('687 Gaussians at 4.80 A of the motion-corrected reconstruction', line[0])
        lost = ProtGmmhetTrain._finerModelLines({'finer_model': {
            'first_model': 'first_model', 'neutral_gaussians': 166, 'gaussians': 679, 'resolution_A': 4.8,
            'source': 'the reconstruction', 'effective_dim': 1, 'first_effective_dim': 2, 'fewer_directions': True}})
        self.assertEqual(len(lost), 2)
        self.assertIn('WARNING', lost[1])
        self.assertIn('train/first_model', lost[1])

    def test_5_continue(self):
        """Scipion's Continue with more epochs resumes from the checkpoint; then a new protocol
        continues that run further without touching its folder."""
        prot = self.protTrain
        before = prot.getLoss()
        prot.numberOfEpochs.set(EPOCHS + 1)
        prot.runMode.set(MODE_RESUME)
        self.launchProtocol(prot)
        prot = self.proj.getProtocol(prot.getObjId())
        after = prot.getLoss()
        self.assertEqual(len(after), EPOCHS + 1)
        for a, b in zip(before, after):  # resumed: the first epochs are not re-trained
            self.assertAlmostEqual(a['train_loss'], b['train_loss'], places=6)
            self.assertAlmostEqual(a['val_loss'], b['val_loss'], places=6)
        log = open(prot.getLogPaths()[0]).read()
        self.assertIn('--resume', log)
        self._checkOutput(prot)

        prevFiles = {p: _md5(p) for p in glob.glob(os.path.join(prot.getTrainDir(), '**'),
                                                    recursive=True) if os.path.isfile(p)}
        prot2 = self.newProtocol(ProtGmmhetTrain, objLabel='train further', doContinue=True,
                                 numberOfEpochs=EPOCHS + 2, useGpu=False, numberOfThreads=2)
        prot2.continueRun.set(prot)
        self.assertEqual(prot2.validate(), [])
        self.launchProtocol(prot2)
        prot2 = self.proj.getProtocol(prot2.getObjId())
        loss2 = prot2.getLoss()
        self.assertEqual(len(loss2), EPOCHS + 2)
        for a, b in zip(after, loss2):
            self.assertAlmostEqual(a['train_loss'], b['train_loss'], places=6)
        self._checkOutput(prot2)
        self.assertNotEqual(prot2.getTrainDir(), prot.getTrainDir())
        nowFiles = {p: _md5(p) for p in prevFiles if os.path.exists(p)}
        self.assertEqual(nowFiles, prevFiles, 'the previous run folder was modified')
        bad = self.newProtocol(ProtGmmhetTrain, doContinue=True, numberOfEpochs=1, useGpu=False)
        bad.continueRun.set(prot)
        self.assertTrue(any('Epochs' in e for e in bad.validate()))
