"""Issue 18: Continue after the protocol's process was killed (Scipion harness, CPU).

"train heterogeneity" is launched as the GUI launches it (a background process), its process
group is killed with SIGKILL in the middle of an epoch once a checkpoint exists, Scipion marks
it failed (the GUI's pid check), and the run is launched again with Continue (resume mode): it
must go on from the last checkpoint (the log says which) and end with the same latent vectors
and losses as an uninterrupted run with the same settings. The same for "refine orientations"
killed while a refine-retrain round is training: Continue keeps the finished rounds and resumes
that round's training from its checkpoint; poses and scores equal an uninterrupted run's.

Data are tiny (96 particles, box 32): the whole module runs in about a minute on 2 cores.

    python -m scipion tests scipion_gmmhet.tests.test_protocol_kill_resume
"""
import contextlib
import glob
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd

from pyworkflow.object import String
from pyworkflow.protocol.constants import MODE_RESUME
from pyworkflow.tests import BaseTest, setupTestProject

from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.protocols import ProtGmmhetTrain
from scipion_gmmhet.protocols.protocol_refine import ProtGmmhetRefine
from scipion_gmmhet.protocols.protocol_train import GMM_FILE_ATTR
from scipion_gmmhet.tests.common import (runImportParticlesStar, runImportVolume, simulateDataset,
                                         writeRelionImportStar)

N, BOX, APIX = 96, 32, 4.0
EPOCHS = 4


@contextlib.contextmanager
def ownProcessGroups(popens: dict):
    """Launch protocols in their own session (process group = the launcher shell's pid), as a
    job under a desktop session would be, so that killing that group cannot hit the test
    runner; the Popen objects are kept in ``popens`` (pid -> Popen) to reap them."""
    import importlib
    launch = importlib.import_module('pyworkflow.protocol.launch')  # (the package exports a function 'launch')
    original = launch._run

    def _run(command, wait, stdin=None, stdout=None, stderr=None):
        p = subprocess.Popen(command, shell=True, stdout=stdout, stderr=stderr, start_new_session=True)
        popens[p.pid] = p
        if wait:
            p.wait()
        return p.pid

    launch._run = _run
    try:
        yield
    finally:
        launch._run = original


def _waitFor(predicate, timeout: float, what: str, poll: float = 0.02):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError('timed out after %.0f s waiting for %s' % (timeout, what))


class TestKillAndContinue(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='conformational', n=N,
                                   box=BOX, apix=APIX, snr=2.0, nGaussians=60)
        cls.protParts = runImportParticlesStar(cls, writeRelionImportStar(
            cls.data['star'], os.path.join(cls.dataDir, 'relion', 'particles.star')))
        gmmFn = os.path.join(cls.dataDir, 'gmm', 'gmm.npz')
        os.makedirs(os.path.dirname(gmmFn), exist_ok=True)
        rng = np.random.default_rng(0)
        GMM(rng.normal(0, 12, (40, 3)), np.ones(40), np.full(40, 5.0), BOX, APIX,
            {'resolution_A': 12.0}).save(gmmFn)
        protVol = runImportVolume(cls, cls.data['consensus'], APIX, label='consensus + GMM')
        setattr(protVol.outputVolume, GMM_FILE_ATTR, String(gmmFn))
        cls.proj.mapper.store(protVol.outputVolume)
        cls.proj.mapper.commit()
        cls.protVol = cls.proj.getProtocol(protVol.getObjId())
        cls.popens = {}

    # ------------------------------------------------------------------ helpers
    def _newTrain(self, label):
        prot = self.newProtocol(ProtGmmhetTrain, objLabel=label, zDim=2, numberOfEpochs=EPOCHS,
                                batchSize=16, seed=5, useGpu=False, numberOfThreads=1)
        prot.inputParticles.set(self.protParts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(self.protVol)
        prot.inputGmm.setExtended('outputVolume')
        self.assertEqual(prot.validate(), [])
        return prot

    def _killWhen(self, prot, checkpointGlob: str, delay: float, timeout: float = 300):
        """Launch ``prot`` in the background; when a file matching ``checkpointGlob`` (under
        the run's folder) exists, wait ``delay`` s (into the next epoch) and SIGKILL the run's
        process group. Returns the checkpoints present at the kill."""
        with ownProcessGroups(self.popens):
            self.proj.launchProtocol(prot, wait=False)
        pid = prot.getPid()
        self.assertTrue(pid)
        pattern = os.path.join(self.proj.getPath(prot.getWorkingDir()), checkpointGlob)
        _waitFor(lambda: glob.glob(pattern), timeout, pattern)
        time.sleep(delay)
        present = sorted(glob.glob(pattern))
        os.killpg(pid, signal.SIGKILL)
        self.popens.pop(pid).wait()
        _waitFor(lambda: not _groupAlive(pid), 30, 'process group %d to die' % pid)
        return present

    def _continue(self, prot):
        """What the GUI does: notice the dead process (failed), then Continue."""
        prot = self.proj.getProtocol(prot.getObjId())
        self.proj.checkPid(prot)
        self.assertTrue(prot.isFailed(), prot.getStatus())
        self.proj.mapper.store(prot)
        self.proj.mapper.commit()
        prot.runMode.set(MODE_RESUME)
        self.launchProtocol(prot)
        return self.proj.getProtocol(prot.getObjId())

    # ------------------------------------------------------------------ tests
    def test_1_trainKilledMidEpoch(self):
        ref = self.launchProtocol(self._newTrain('uninterrupted'))
        epochSeconds = float(np.median([r['seconds'] for r in ref.getLoss()]))

        prot = self._newTrain('killed, then Continue')
        present = self._killWhen(prot, 'extra/train/checkpoints/epoch_0001.pt', 0.4 * epochSeconds)
        done = [int(os.path.basename(p)[6:10]) for p in present]
        self.assertTrue(done and max(done) < EPOCHS, present)
        self.assertFalse(os.path.exists(prot.getLatentFile()), 'killed after the end of training')

        prot = self._continue(prot)
        self.assertTrue(prot.isFinished(), prot.getStatus())
        log = open(prot.getLogPaths()[0]).read()
        self.assertIn('--resume', log)
        self.assertIn('resuming from', log)
        self.assertIn('epoch_%04d.pt' % max(done), log)
        np.testing.assert_array_equal(np.load(prot.getLatentFile()), np.load(ref.getLatentFile()))
        for a, b in zip(ref.getLoss(), prot.getLoss()):
            self.assertEqual((a['epoch'], a['train_loss'], a['val_loss']),
                             (b['epoch'], b['train_loss'], b['val_loss']))
        self.assertEqual(len(prot.getLoss()), EPOCHS)
        self.assertEqual(prot.outputParticles.getSize(), N)
        zOut = {p.getObjId(): np.array(p.getZFlex()) for p in prot.outputParticles.iterItems()}
        zRef = {p.getObjId(): np.array(p.getZFlex()) for p in ref.outputParticles.iterItems()}
        self.assertEqual(sorted(zOut), sorted(zRef))
        for pid in zRef:
            np.testing.assert_array_equal(zOut[pid], zRef[pid])
        TestKillAndContinue.protTrainRef = ref

    # ------------------------------------------------------------------ refine
    def _newRefine(self, trained, label):
        prot = self.newProtocol(ProtGmmhetRefine, objLabel=label, maxAngle=4.0, rounds=2,
                                retrainEpochs=EPOCHS, doReconstruct=False, levels=1, polishSteps=3,
                                useGpu=False, numberOfThreads=1)
        prot.inputParticles.set(trained)
        prot.inputParticles.setExtended('outputParticles')
        self.assertEqual(prot.validate(), [])
        return prot

    def test_2_refineKilledInARound(self):
        """Refine-retrain rounds (2 rounds; the kill lands in round 1's retraining)."""
        trained = getattr(TestKillAndContinue, 'protTrainRef', None) or \
            self.launchProtocol(self._newTrain('trained'))
        epochSeconds = float(np.median([r['seconds'] for r in trained.getLoss()]))
        ref = self.launchProtocol(self._newRefine(trained, 'refine, uninterrupted'))

        prot = self._newRefine(trained, 'refine killed, then Continue')
        present = self._killWhen(prot, 'extra/refine/round_1/train/checkpoints/epoch_0001.pt',
                                 0.4 * epochSeconds)
        roundDir = os.path.join(prot.getRefineDir(), 'round_1')
        self.assertTrue(present and os.path.exists(os.path.join(roundDir, 'refine_result.npz')))
        self.assertFalse(os.path.exists(os.path.join(roundDir, 'train', 'model.pt')),
                         'killed after the retraining ended')
        resultBefore = os.path.getmtime(os.path.join(roundDir, 'refine_result.npz'))

        prot = self._continue(prot)
        self.assertTrue(prot.isFinished(), prot.getStatus())
        log = open(prot.getLogPaths()[0]).read()
        self.assertIn('--resume', log)
        self.assertIn('refine round 1: finished before the interruption', log)
        self.assertIn('resuming from', log)
        self.assertIn(os.path.basename(present[-1]), log)
        self.assertEqual(os.path.getmtime(os.path.join(roundDir, 'refine_result.npz')), resultBefore)
        for name in ('pose_changes.csv', 'rounds.csv'):
            a = pd.read_csv(os.path.join(ref.getRefineDir(), name))
            b = pd.read_csv(os.path.join(prot.getRefineDir(), name))
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        for r in (1, 2):
            a = np.load(os.path.join(ref.getRefineDir(), 'round_%d' % r, 'refine_result.npz'))
            b = np.load(os.path.join(prot.getRefineDir(), 'round_%d' % r, 'refine_result.npz'))
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg='round %d %s' % (r, k))
        np.testing.assert_array_equal(
            np.load(os.path.join(ref.getRefineDir(), 'round_1', 'train', 'latent.npy')),
            np.load(os.path.join(roundDir, 'train', 'latent.npy')))
        mats = {}
        for p in (ref, prot):
            mats[p.getObjId()] = {q.getObjId(): q.getTransform().getMatrix().copy()
                                  for q in p.outputParticles.iterItems()}
        a, b = mats[ref.getObjId()], mats[prot.getObjId()]
        self.assertEqual(sorted(a), sorted(b))
        for pid in a:
            np.testing.assert_array_equal(a[pid], b[pid])


def _groupAlive(pgid: int) -> bool:
    """Whether a live (non-zombie) process of group ``pgid`` remains."""
    import psutil
    for proc in psutil.process_iter(['pid', 'status']):
        try:
            if os.getpgid(proc.info['pid']) == pgid and proc.info['status'] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False
