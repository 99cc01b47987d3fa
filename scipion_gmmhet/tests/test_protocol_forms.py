"""Harness test of what the gmmhet forms say before anything runs (no data, no training):

- a GPU IDs field that is not integers ('cuda:0', '-1', 'abc') gives one plain line in every
  GPU protocol's validation, not pyworkflow's "invalid literal for int()" traceback; an empty
  one asks for a GPU id; a good one ('0', '0 1', '0,1') gives no GPU IDs error; a run launched
  without the form (a script) stops on the same line when it reads the GPU list;
- the train protocol's methods text reads the similarity ('corr' or 'frc') from the run's
  recorded settings, and joins what may change as words ("positions and amplitudes").

    python -m scipion tests scipion_gmmhet.tests.test_protocol_forms
"""
import os
import re

from pyworkflow.tests import BaseTest, setupTestProject

import scipion_gmmhet
from scipion_gmmhet.engine.io.outputs import TrainFolder
from scipion_gmmhet.protocols import (ProtGmmhetBuildGmm, ProtGmmhetCluster, ProtGmmhetImportPoses,
                                      ProtGmmhetRefine, ProtGmmhetTrain)
from scipion_gmmhet.protocols.gpu import protocolGpus
from scipion_gmmhet.protocols.protocol_train import _joinWords

GPU_PROTOCOLS = (ProtGmmhetBuildGmm, ProtGmmhetTrain, ProtGmmhetCluster, ProtGmmhetRefine)
ALL_PROTOCOLS = GPU_PROTOCOLS + (ProtGmmhetImportPoses,)


def _gpuIdErrors(errors):
    return [e for e in errors if 'GPU ID' in e]


class TestProtocolForms(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)

    def test_badGpuIds(self):
        for cls in GPU_PROTOCOLS:
            for bad in ('cuda:0', '-1', 'abc'):
                prot = self.newProtocol(cls, useGpu=True, gpuList=bad)
                errors = prot.validate()
                where = (cls.__name__, bad, errors)
                text = '\n'.join(errors)
                self.assertNotIn('invalid literal', text, where)
                self.assertNotIn('Traceback', text, where)
                self.assertNotIn('validation failed', text, where)
                expected = ('GPU IDs: give integers separated by commas or spaces, e.g. 0 '
                            'or 0,1 (got %r)' % bad)
                lines = _gpuIdErrors(errors)
                self.assertEqual(len(lines), 1, where)
                self.assertTrue(lines[0].startswith(expected), where)
                self.assertNotIn('\n', lines[0], where)
        # '-1' (the CPU in some programs) points to "Use GPU?"
        prot = self.newProtocol(ProtGmmhetTrain, useGpu=True, gpuList='-1')
        self.assertIn('set "Use GPU?" to No', _gpuIdErrors(prot.validate())[0])

    def test_goodAndEmptyGpuIds(self):
        for cls in GPU_PROTOCOLS:
            for good in ('0', '0 1', '0,1'):
                prot = self.newProtocol(cls, useGpu=True, gpuList=good)
                self.assertEqual(_gpuIdErrors(prot.validate()), [], (cls.__name__, good))
            prot = self.newProtocol(cls, useGpu=True, gpuList='')
            lines = _gpuIdErrors(prot.validate())
            self.assertEqual(len(lines), 1, (cls.__name__, lines))
            self.assertIn('give', lines[0])
            self.assertIn('GPU id (e.g. 0)', lines[0])
            # "Use GPU?" = No: the field is not read at all
            prot = self.newProtocol(cls, useGpu=False, gpuList='cuda:0')
            self.assertEqual(_gpuIdErrors(prot.validate()), [], cls.__name__)

    def test_launchPathGpuList(self):
        """What the steps read (protocolGpus, also Plugin.runGmmhet's default): the ids, the
        first one for single-GPU steps, none with "Use GPU?" = No, and for a field that does not
        parse the form's one line as the run's error, not int()'s."""
        for cls in GPU_PROTOCOLS:
            self.assertEqual(protocolGpus(self.newProtocol(cls, useGpu=True, gpuList='0 1')), [0, 1])
            self.assertEqual(protocolGpus(self.newProtocol(cls, useGpu=True, gpuList='1,0'), first=True), [1])
            self.assertEqual(protocolGpus(self.newProtocol(cls, useGpu=False, gpuList='cuda:0')), [])
            prot = self.newProtocol(cls, useGpu=True, gpuList='cuda:0')
            with self.assertRaises(ValueError) as caught:
                protocolGpus(prot)
            message = str(caught.exception)
            self.assertTrue(message.startswith("GPU IDs: give integers"), (cls.__name__, message))
            self.assertNotIn('invalid literal', message)
            self.assertNotIn('\n', message)

    def test_trainMethodsLoss(self):
        self.assertEqual(_joinWords(['positions']), 'positions')
        self.assertEqual(_joinWords(['positions', 'amplitudes']), 'positions and amplitudes')
        self.assertEqual(_joinWords(['positions', 'amplitudes', 'widths']),
                         'positions, amplitudes and widths')
        self.assertEqual(_joinWords([]), '')
        prot = self.newProtocol(ProtGmmhetTrain, useGpu=False)
        trainDir = self.proj.getTmpPath('methods_train')
        os.makedirs(trainDir, exist_ok=True)
        prot.getTrainDir = lambda: trainDir
        self.assertEqual(prot.getLossName(), 'corr')  # nothing recorded yet: the default
        folder = TrainFolder(trainDir)
        for loss, words in (('corr', 'one correlation over all Fourier coefficients of the '
                                     '100-8.0 A resolution band'),
                            ('frc', 'the Fourier ring correlation averaged over the rings of the '
                                    '100-8.0 A resolution band')):
            folder.write_config({'train': {'loss': loss, 'lowres_A': 100.0, 'highres_A': 8.0}})
            self.assertEqual(prot.getLossName(), loss)
            self.assertEqual(prot._lossMethodsText()[:len(words)], words)
        # a run recorded before the setting existed trained with e2gmm's FRC
        folder.write_config({'train': {'zdim': 4}})
        self.assertEqual(prot.getLossName(), 'frc')

    def test_trainCentringTexts(self):
        """The summary and methods texts give the centring the run recorded (config.json), and
        nothing when it did not centre; a continued run keeps its own setting."""
        prot = self.newProtocol(ProtGmmhetTrain, useGpu=False)
        trainDir = self.proj.getTmpPath('centring_train')
        os.makedirs(trainDir, exist_ok=True)
        prot.getTrainDir = lambda: trainDir
        folder = TrainFolder(trainDir)
        folder.write_config({'train': {'center': 'auto'},
                             'centering': {'n_moved': 812, 'n_particles': 1000, 'median_correction_A': 1.7}})
        self.assertEqual(prot._centeringLines(folder.read_config()),
                         ["Centring: 812 of 1000 particles' shifts corrected before training (median 1.70 A)"])
        self.assertIn('812 of 1000 particles were re-centred (median 1.70 A)', prot._centeringMethodsText())
        self.assertEqual(prot._recordedCenterMode(), 'auto')
        folder.write_config({'train': {'center': 'off'}, 'centering': None})
        self.assertEqual(prot._centeringLines(folder.read_config()), [])
        self.assertEqual(prot._centeringMethodsText(), '')
        folder.write_config({'train': {'zdim': 4}})  # a run made before the option: it did not centre
        self.assertEqual(prot._recordedCenterMode(), 'off')
        # ... nor estimate latents by the posterior; the summary says when a run did
        self.assertEqual(prot._recordedSetting('latent_estimate', 'encoder', 'posterior'), 'encoder')
        self.assertEqual(prot._posteriorLines({'latent_posterior': None}), [])
        self.assertEqual(prot._posteriorLines({'latent_posterior': {'anchors': 64}}),
                         ["Latents: posterior mean over 64 decoded states of the latent space, weighted "
                          "by each image's likelihood"])
        finer = {'anchors': 240, 'coarse_pass': {'anchors': 64, 'median_peak_weight': 0.5667}}
        self.assertEqual(prot._posteriorLines({'latent_posterior': finer}),
                         ["Latents: posterior mean over 240 decoded states of the latent space, weighted "
                          "by each image's likelihood (the first 64 states were too far apart for these "
                          "images: median largest weight 0.57)"])
