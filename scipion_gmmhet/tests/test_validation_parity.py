"""Issue 18: the command line and the GUI refuse the same input with the same text.

Same input both ways: particles imported without CTF (the RELION importer on a star without
defocus columns) and a focus mask of another box or sampling than the Gaussian model / map.
Each is given to a protocol (``validate()``, what the GUI shows) and to ``gmmhet`` (the star
the protocol itself would write, and the same mask file); the refusals must be equal after the
input's name (the form field in the GUI, the file or option on the command line).

    python -m scipion tests scipion_gmmhet.tests.test_validation_parity
"""
import contextlib
import io
import os

import numpy as np

from pyworkflow.object import String
from pyworkflow.tests import BaseTest, setupTestProject

from scipion_gmmhet import convert
from scipion_gmmhet.engine.cli import main as gmmhet
from scipion_gmmhet.engine.io.mrc import write_map
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.protocols import ProtGmmhetTrain
from scipion_gmmhet.protocols.protocol_build_gmm import ProtGmmhetBuildGmm
from scipion_gmmhet.protocols.protocol_train import GMM_FILE_ATTR
from scipion_gmmhet.tests.common import (runImportParticlesStar, runImportVolume, simulateDataset,
                                         writeRelionImportStar)

N, BOX, APIX = 12, 32, 4.0
CTF_COLUMNS = ('rlnDefocusU', 'rlnDefocusV', 'rlnDefocusAngle')


def _afterName(message: str) -> str:
    """The refusal without the input's name (everything after the first ': ')."""
    return message.split(': ', 1)[1]


class TestValidationParity(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), n=N, box=BOX, apix=APIX,
                                   nGaussians=40)
        relion = os.path.join(cls.dataDir, 'relion')
        cls.protCtf = runImportParticlesStar(cls, writeRelionImportStar(
            cls.data['star'], os.path.join(relion, 'particles.star')), label='with CTF')
        cls.protNoCtf = runImportParticlesStar(cls, writeRelionImportStar(
            cls.data['star'], os.path.join(relion, 'noctf.star'), dropColumns=CTF_COLUMNS),
            label='without CTF')
        cls.gmmFn = os.path.join(cls.dataDir, 'gmm', 'gmm.npz')
        os.makedirs(os.path.dirname(cls.gmmFn), exist_ok=True)
        rng = np.random.default_rng(0)
        GMM(rng.normal(0, 10, (20, 3)), np.ones(20), np.full(20, 6.0), BOX, APIX,
            {'resolution_A': 12.0}).save(cls.gmmFn)
        protVol = runImportVolume(cls, cls.data['consensus'], APIX, label='consensus + GMM')
        setattr(protVol.outputVolume, GMM_FILE_ATTR, String(cls.gmmFn))
        cls.proj.mapper.store(protVol.outputVolume)
        cls.proj.mapper.commit()
        cls.protVol = cls.proj.getProtocol(protVol.getObjId())
        # masks: another box (24 px), another sampling (3 A/px); files the CLI gets too
        cls.masks = {}
        for name, box, apix in (('mask_box24', 24, APIX), ('mask_apix3', BOX, 3.0)):
            fn = os.path.join(cls.dataDir, name + '.mrc')
            m = np.zeros((box,) * 3, np.float32)
            m[box // 4:-box // 4, box // 4:-box // 4, box // 4:-box // 4] = 1
            write_map(fn, m, apix)
            cls.masks[name] = (fn, runImportVolume(cls, fn, apix, label=name))

    # ------------------------------------------------------------------ helpers
    def _cli(self, *argv) -> str:
        """The one-line refusal of ``gmmhet ARGV`` (exit status 2), without the prefix."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = gmmhet([str(a) for a in argv])
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        self.assertEqual(rc, 2, err.getvalue())
        self.assertEqual(len(lines), 1, err.getvalue())
        prefix = 'gmmhet %s: error: ' % argv[0]
        self.assertTrue(lines[0].startswith(prefix), lines[0])
        return lines[0][len(prefix):]

    def _train(self, parts, mask=None, ctfChoice=0, **extra):
        prot = self.newProtocol(ProtGmmhetTrain, zDim=2, numberOfEpochs=1, useGpu=False,
                                ctfChoice=ctfChoice, **extra)
        prot.inputParticles.set(parts)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputGmm.set(self.protVol)
        prot.inputGmm.setExtended('outputVolume')
        if mask is not None:
            prot.focusMask.set(mask)
            prot.focusMask.setExtended('outputVolume')
        return prot

    def _protocolStar(self, protImport, name) -> str:
        """The canonical star the protocols write for these particles (convert.py)."""
        fn = os.path.join(self.dataDir, 'stars', name + '.star')
        os.makedirs(os.path.dirname(fn), exist_ok=True)
        convert.writeSetOfParticles(protImport.outputParticles, fn, os.path.dirname(fn))
        return fn

    def _matching(self, errors, text):
        found = [e for e in errors if _afterName(e) == text]
        self.assertEqual(len(found), 1, 'GUI %s vs CLI %r' % (errors, text))
        return found[0]

    # ------------------------------------------------------------------ tests
    def test_particlesWithoutCtf(self):
        """No CTF: refused by the protocol and by gmmhet train/reconstruct alike, unless CTF none."""
        self.assertFalse(self.protNoCtf.outputParticles.hasCTF())
        star = self._protocolStar(self.protNoCtf, 'noctf')
        out = os.path.join(self.dataDir, 'cli_noctf')
        cli = self._cli('train', '--particles', star, '--gmm', self.gmmFn, '--out', out)
        self.assertTrue(cli.startswith('%s: no CTF parameters' % star), cli)
        gui = self._matching(self._train(self.protNoCtf).validate(), _afterName(cli))
        self.assertTrue(gui.startswith('Input particles: no CTF parameters'), gui)
        self.assertIn('--ctf none', gui)
        # the explicit choice: accepted both ways (the protocol passes --ctf none to the engine)
        prot = self._train(self.protNoCtf, ctfChoice=1)
        self.assertEqual(prot.validate(), [])
        self.assertIn('--ctf none', prot._getTrainArgs())
        self.assertTrue(any('CTF is ignored' in w for w in prot.warnings()))
        from scipion_gmmhet.engine.io.data import Particles
        self.assertIsNone(Particles.from_star(star, ctf_mode='none').ctf)
        # particles with CTF: no refusal, no --ctf in the command
        prot = self._train(self.protCtf)
        self.assertEqual(prot.validate(), [])
        self.assertNotIn('--ctf', prot._getTrainArgs())
        # centring: on by default, off when the form says No (gmmhet train --center)
        self.assertIn('--center auto', prot._getTrainArgs())
        self.assertIn('--center off', self._train(self.protCtf, centerParticles=False)._getTrainArgs())
        # latents: the likelihood posterior by default, the encoder's when the form says No
        self.assertIn('--latent-estimate posterior', prot._getTrainArgs())
        self.assertIn('--latent-estimate encoder',
                      self._train(self.protCtf, posteriorLatents=False)._getTrainArgs())

    def test_maskOfAnotherGrid(self):
        """A focus mask of another box or sampling: the train protocol and gmmhet train refuse it
        with the same text; the build protocol and gmmhet build too (against the map)."""
        star = self._protocolStar(self.protCtf, 'ctf')
        for name, (fn, protMask) in sorted(self.masks.items()):
            cli = self._cli('train', '--particles', star, '--gmm', self.gmmFn, '--mask', fn,
                            '--epochs', 1, '--out', os.path.join(self.dataDir, 'cli_' + name))
            self.assertTrue(cli.startswith('--mask %s: ' % fn), cli)
            self.assertIn('the Gaussian model', cli)
            gui = self._matching(self._train(self.protCtf, mask=protMask).validate(), _afterName(cli))
            self.assertTrue(gui.startswith('Focus mask: '), gui)

            cli = self._cli('build', '--map', self.data['consensus'], '--resolution', 12, '--mask', fn,
                            '--out', os.path.join(self.dataDir, 'build_' + name))
            build = self.newProtocol(ProtGmmhetBuildGmm, resolution=12.0, useGpu=False)
            build.inputVolume.set(self.protVol)
            build.inputVolume.setExtended('outputVolume')
            build.inputMask.set(protMask)
            build.inputMask.setExtended('outputVolume')
            gui = self._matching(build.validate(), _afterName(cli))
            self.assertTrue(gui.startswith('Mask: '), gui)
