"""Harness test of "gmmhet - build Gaussian model" and its viewer on the simulator's consensus
map:

- import the map with pwem's ProtImportVolumes and build a model at 12 A through the protocol;
- the output volume has the input's box and sampling, carries the model file (gmm.npz with the
  same frame), and is linked to the input map;
- the FSC in fsc.csv, and the FSC recomputed here between the output volume and the input map
  low-pass filtered to 12 A, stay >= 0.9 up to 12 A; the summary reports N and the resolutions;
- the input map is never written to;
- validation rejects a mask of another box or sampling and a resolution beyond Nyquist;
- the viewer's headless outputs: the FSC PNG is not blank, the ChimeraX marker file has one
  marker per Gaussian, the command file opens the maps and the markers.

    python -m scipion tests scipion_gmmhet.tests.test_protocol_build_gmm
"""
import hashlib
import os

import numpy as np

from pyworkflow.object import RELATION_SOURCE
from pyworkflow.tests import BaseTest, setupTestProject

from scipion_gmmhet.engine.model import fourier
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.io.mrc import read_map, write_map
from scipion_gmmhet.protocols import ProtGmmhetBuildGmm
from scipion_gmmhet.protocols.protocol_build_gmm import GMM_FILE_ATTR
from scipion_gmmhet.tests.common import runImportVolume, simulateDataset

BOX = 32
APIX = 4.0
RESOLUTION_A = 12.0


def _md5(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


class TestProtocolBuildGmm(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='homogeneous', n=16,
                                   box=BOX, apix=APIX, snr=1.0)
        cls.mapFn = cls.data['consensus']
        cls.mapMd5 = _md5(cls.mapFn)
        cls.protMap = runImportVolume(cls, cls.mapFn, APIX)
        prot = cls.newProtocol(ProtGmmhetBuildGmm, objLabel='build GMM 12 A',
                               resolution=RESOLUTION_A, useGpu=False, numberOfThreads=2)
        prot.inputVolume.set(cls.protMap)
        prot.inputVolume.setExtended('outputVolume')
        errors = prot.validate()
        assert errors == [], errors
        cls.protBuild = cls.launchProtocol(prot)

    def test_output_volume(self):
        prot = self.protBuild
        self.assertTrue(prot.hasAttribute('outputVolume'))
        vol = prot.outputVolume
        inVol = self.protMap.outputVolume
        self.assertAlmostEqual(vol.getSamplingRate(), APIX, places=5)
        self.assertEqual(tuple(vol.getDim()), (BOX, BOX, BOX))
        self.assertEqual(tuple(vol.getDim()), tuple(inVol.getDim()))
        data, apix = read_map(vol.getFileName())
        self.assertEqual(data.shape, (BOX, BOX, BOX))
        self.assertAlmostEqual(apix, APIX, places=4)
        # the model file is attached and in the same frame
        gmmFile = getattr(vol, GMM_FILE_ATTR).get()
        self.assertTrue(os.path.isfile(gmmFile), gmmFile)
        gmm = GMM.load(gmmFile)
        self.assertEqual((gmm.box, gmm.apix), (BOX, APIX))
        self.assertGreater(len(gmm), 8)
        np.testing.assert_allclose(gmm.render(), data, rtol=1e-4, atol=1e-4 * np.abs(data).max())
        # source relation: input map -> output volume
        rels = self.proj.mapper.getRelationsByName(RELATION_SOURCE)
        parents = {rel['object_parent_id'] for rel in rels if rel['object_child_id'] == vol.getObjId()}
        self.assertTrue(parents & {self.protMap.getObjId(), inVol.getObjId()}, parents)

    def test_fsc(self):
        prot = self.protBuild
        fsc = prot.getFsc()
        self.assertEqual(len(fsc['shell']), BOX // 2 + 1)
        s = fourier.shell_for_resolution(BOX, APIX, RESOLUTION_A)
        self.assertGreaterEqual(min(fsc['fsc'][1:s + 1]), 0.9, fsc['fsc'][:s + 2])
        # recomputed independently against the low-passed input map
        model, _ = read_map(prot.outputVolume.getFileName())
        inp, _ = read_map(self.mapFn)
        curve = fourier.fsc(model, fourier.lowpass_map(inp, APIX, RESOLUTION_A))
        self.assertGreaterEqual(curve[1:s + 1].min(), 0.9, curve[:s + 2])
        info = prot.getBuildSummary()
        self.assertEqual(info['n_gauss'], prot.nGaussians.get())
        self.assertLessEqual(info['fsc05_resolution_A'], RESOLUTION_A)
        summary = '\n'.join(prot.summary())
        self.assertIn('Gaussians: %d' % info['n_gauss'], summary)
        self.assertIn('Target resolution: 12 A', summary)
        self.assertIn('FSC(model, map) = 0.5 at', summary)
        self.assertTrue(prot.methods())

    def test_input_untouched(self):
        self.assertEqual(_md5(self.mapFn), self.mapMd5)
        # an MRC input is read in place, not copied
        self.assertFalse(os.path.exists(self.protBuild._getExtraPath('input_map.mrc')))
        inFn = os.path.abspath(self.protMap.outputVolume.getFileName().split(':')[0])
        self.assertEqual(self.protBuild.getInputMapFile(), inFn)
        self.assertEqual(_md5(inFn), self.mapMd5)

    def test_validation(self):
        # a mask of another box, then one of another sampling
        for name, box, apix in (('mask24', 24, APIX), ('mask_apix', BOX, 3.0)):
            fn = os.path.join(self.dataDir, '%s.mrc' % name)
            write_map(fn, np.ones((box, box, box), np.float32), apix)
            protMask = runImportVolume(self, fn, apix, label='import %s' % name)
            prot = self.newProtocol(ProtGmmhetBuildGmm, resolution=RESOLUTION_A, useGpu=False)
            prot.inputVolume.set(self.protMap)
            prot.inputVolume.setExtended('outputVolume')
            prot.inputMask.set(protMask)
            prot.inputMask.setExtended('outputVolume')
            errors = prot.validate()
            self.assertTrue(any(e.startswith('Mask:') for e in errors), errors)
        prot = self.newProtocol(ProtGmmhetBuildGmm, resolution=5.0, useGpu=False)
        prot.inputVolume.set(self.protMap)
        prot.inputVolume.setExtended('outputVolume')
        self.assertTrue(any('Nyquist' in e for e in prot.validate()))

    def test_viewer_headless(self):
        from scipion_gmmhet.viewers.viewer_build_gmm import writeBuildReport
        import matplotlib.image as mpimg
        out = writeBuildReport(self.protBuild, os.path.join(self.dataDir, 'report'))
        img = np.asarray(mpimg.imread(out['fsc']), dtype=np.float64)[..., :3]
        self.assertGreater(img.shape[0], 100)
        self.assertGreater(img.std(), 0.01)
        flat = (img * 255).astype(np.uint8).reshape(-1, 3)
        _, counts = np.unique(flat, axis=0, return_counts=True)
        self.assertLess(counts.max() / counts.sum(), 0.99)
        with open(out['markers']) as f:
            text = f.read()
        self.assertEqual(text.count('<marker '), self.protBuild.nGaussians.get())
        with open(out['chimerax']) as f:
            cxc = f.read()
        self.assertIn(os.path.abspath(self.protBuild.getGmmMapFile()), cxc)
        self.assertIn(out['markers'], cxc)
