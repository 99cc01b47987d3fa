"""Harness tests of mixed workflows: this plugin between RELION and cryoSPARC, as a user builds
them in a Scipion project (tiny simulated data, CPU).

:class:`TestWorkflowRelion`
    particles and poses imported from a RELION star by pwem's import with scipion-em-relion,
    the consensus map imported; then build Gaussian model -> train (2 epochs) -> cluster and
    reconstruct (2 classes) -> refine orientations (when ``protocol_refine`` imports; else that
    step is skipped with the reason) -> the particles of one class made into a subset with the
    interactive-selection API (:func:`createSubsetFromIds`, Scipion's ``ProtUserSubSet``) ->
    exported with scipion-em-relion's ``ProtRelionExportParticles`` (its star writer) -> read
    back with scipion-em-relion's star reader: rotation matrix, shifts and defocus of every
    particle equal the subset's, matched by particle id. The GMM map at a latent point from
    the selection API equals ``gmmhet eval``'s.

:class:`TestWorkflowCryosparc`
    particles imported without poses (RELION star, pwem import); their poses read from a
    cryoSPARC ``.cs`` export (the fields of a real cryoSPARC export, with a 3D alignment) by
    "gmmhet - import poses"; trained one epoch: the poses the engine trained on (the training's
    canonical star) and the training's output particles are the imported ones, by id, and the
    simulator's truth.

    python -m scipion tests scipion_gmmhet.tests.test_workflow_relion
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time

import numpy as np

from pyworkflow.tests import BaseTest, setupTestProject
from pwem.objects import SetOfParticles, SetOfParticlesFlex

from scipion_gmmhet.constants import (FLEX_PROG_NAME, GMMHET_PARTICLE_ID, MATCH_BY_NAME,
                                      POSES_FROM_CS)
from scipion_gmmhet.convert import alignProjToProjection
from scipion_gmmhet.engine import conventions
from scipion_gmmhet.engine.io.mrc import read_map
from scipion_gmmhet.engine.io.star import read_star
from scipion_gmmhet.protocols import (ProtGmmhetBuildGmm, ProtGmmhetCluster,
                                      ProtGmmhetImportPoses, ProtGmmhetTrain)
from scipion_gmmhet.tests.common import (POSE_COLUMNS, assertPosesMatchTruth,
                                         runImportParticlesStar, runImportVolume,
                                         simulateDataset, writeRelionImportStar)
from scipion_gmmhet.convert import trainDirOf
from scipion_gmmhet.viewers.latent_selection import createSubsetFromIds, gmmMapAt, subsetOutput

N = 200
BOX = 32
APIX = 4.0
ZDIM = 2
N_GAUSS = 48
#: a real cryoSPARC export in the shared data folder next to the checkout (used when present)
REAL_CS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir, 'shared',
                       'data', 'real-metadata', 'cryosparc_J2_particles_exported.cs')


def _setPointer(pointer, prot, extended):
    pointer.set(prot)
    pointer.setExtended(extended)


def _particleTable(partSet) -> dict:
    """{id: (4x4 transform matrix, (defocusU, defocusV, angle), (index, file))}."""
    out = {}
    for p in partSet.iterItems(orderBy='id'):
        ctf = p.getCTF()
        out[p.getObjId()] = (np.array(p.getTransform().getMatrix(), dtype=np.float64),
                             (ctf.getDefocusU(), ctf.getDefocusV(), ctf.getDefocusAngle()),
                             p.getLocation())
    return out


def _timed(label, t0):
    print('  %-34s %6.1f s' % (label, time.time() - t0))


class TestWorkflowRelion(BaseTest):
    """RELION star -> pwem import -> build -> train -> cluster -> refine -> class subset ->
    RELION export -> RELION reader."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        t0 = time.time()
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='compositional',
                                   n=N, box=BOX, apix=APIX, snr=1.0)
        star = writeRelionImportStar(cls.data['star'],
                                     os.path.join(cls.dataDir, 'relion', 'particles.star'))
        cls.protParts = runImportParticlesStar(cls, star)
        cls.protVol = runImportVolume(cls, cls.data['consensus'], APIX, label='consensus map')
        _timed('simulate + import', t0)

        t = time.time()
        prot = cls.newProtocol(ProtGmmhetBuildGmm, objLabel='build GMM', resolution=12.0,
                               numberOfGaussians=N_GAUSS, steps=60, useGpu=False,
                               numberOfThreads=2)
        _setPointer(prot.inputVolume, cls.protVol, 'outputVolume')
        cls.protBuild = cls.launchProtocol(prot)
        _timed('build Gaussian model', t)

        t = time.time()
        prot = cls.newProtocol(ProtGmmhetTrain, objLabel='train', zDim=ZDIM, numberOfEpochs=2,
                               batchSize=64, seed=1, useGpu=False, numberOfThreads=2)
        _setPointer(prot.inputParticles, cls.protParts, 'outputParticles')
        _setPointer(prot.inputGmm, cls.protBuild, 'outputVolume')
        cls.protTrain = cls.launchProtocol(prot)
        _timed('train (2 epochs)', t)

        t = time.time()
        prot = cls.newProtocol(ProtGmmhetCluster, objLabel='cluster k=2', numberOfClusters=2,
                               trajectorySteps=2, numberOfPcs=1, useGpu=False,
                               numberOfThreads=2)
        _setPointer(prot.inputParticles, cls.protTrain, 'outputParticles')
        cls.protCluster = cls.launchProtocol(prot)
        _timed('cluster and reconstruct', t)

        cls.protRefine, cls.refineSkipped, refineClass = None, None, None
        import scipion_gmmhet.protocols as gmmhetProtocols
        try:
            importlib.import_module('scipion_gmmhet.protocols.protocol_refine')
            refineClass = getattr(gmmhetProtocols, 'ProtGmmhetRefine', None)
            if refineClass is None:  # Scipion's run process finds protocols only there
                cls.refineSkipped = ('ProtGmmhetRefine is not registered in '
                                     'scipion_gmmhet/protocols/__init__.py, so Scipion cannot '
                                     'run it')
        except Exception as exc:  # not there yet: the rest of the workflow still runs
            cls.refineSkipped = 'protocol_refine does not import (%s: %s)' % (
                type(exc).__name__, exc)
        if refineClass is not None:
            t = time.time()
            prot = cls.newProtocol(refineClass, objLabel='refine orientations', maxAngle=3.0,
                                   levels=1, polishSteps=2, doReconstruct=False,
                                   useGpu=False, numberOfThreads=2)
            _setPointer(prot.inputParticles, cls.protTrain, 'outputParticles')
            cls.proj.launchProtocol(prot, wait=True)
            prot = cls.proj.getProtocol(prot.getObjId())
            if prot.isFinished() and prot.hasAttribute('outputParticles'):
                cls.protRefine = prot
            else:
                cls.refineSkipped = ('"gmmhet - refine orientations" did not finish (%s): %s'
                                     % (prot.getStatus(), prot.getErrorMessage()))
            _timed('refine orientations', t)
        if cls.refineSkipped:
            print('  refine step skipped: %s' % cls.refineSkipped)

        # the particles of the class 1 (with refined poses when available) as a user subset
        t = time.time()
        cls.classIds = sorted(p.getObjId() for p in
                              cls.protCluster.outputClasses.getFirstItem().iterItems())
        cls.subsetSource = cls.protRefine or cls.protTrain
        cls.protSubset = createSubsetFromIds(cls.proj, cls.subsetSource, 'outputParticles',
                                             cls.classIds, label='class 1 (latent selection)',
                                             wait=True)
        cls.protSubset = cls.proj.getProtocol(cls.protSubset.getObjId())
        _timed('class subset (ProtUserSubSet)', t)

        t = time.time()
        cls.exportStar, cls.protExport = cls._exportWithRelion()
        _timed('RELION export', t)
        _timed('setUpClass total', t0)

    @classmethod
    def _exportWithRelion(cls):
        """Write the class subset with scipion-em-relion's star writer: through its "export
        particles" protocol where RELION is installed (the protocol's validation needs the
        RELION binaries), else by calling the same writer with the protocol's arguments
        (``relion.convert.writeSetOfParticles``, one new stack). Returns (star, protocol or
        None)."""
        import relion
        from relion.constants import STACK_ONE
        subsetName = [n for n in ('outputParticlesFlex', 'outputParticles')
                      if getattr(cls.protSubset, n, None) is not None][0]
        if os.path.isdir(relion.Plugin.getHome()):
            from relion.protocols import ProtRelionExportParticles
            prot = cls.newProtocol(ProtRelionExportParticles, objLabel='relion export class 1',
                                   useAlignment=True, stackType=STACK_ONE)
            _setPointer(prot.inputParticles, cls.protSubset, subsetName)
            prot = cls.launchProtocol(prot)
            exportDir = prot._getExportPath()
            stars = [f for f in os.listdir(exportDir) if f.endswith('.star')]
            return os.path.join(exportDir, stars[0]), prot
        import relion.convert as rconv
        print('  RELION is not installed (%s): exporting with relion.convert.'
              'writeSetOfParticles, as ProtRelionExportParticles does' % relion.Plugin.getHome())
        exportDir = os.path.abspath(cls.proj.getPath('relion_export'))
        os.makedirs(os.path.join(exportDir, 'Particles'), exist_ok=True)
        subset = getattr(cls.protSubset, subsetName)
        starFn = os.path.join(exportDir, 'particles_class1.star')
        rconv.writeSetOfParticles(subset, starFn,
                                  outputStack=os.path.join(exportDir, 'Particles',
                                                           'particles.mrcs'),
                                  alignType=subset.getAlignment(), fillMagnification=True,
                                  forceConvert=True)
        return starFn, None

    def test_chain(self):
        """Every protocol of the chain produced its output, on the right particles."""
        self.assertEqual(self.protParts.outputParticles.getSize(), N)
        self.assertTrue(os.path.exists(self.protBuild.getGmmFile()))
        flex = self.protTrain.outputParticles
        self.assertEqual(flex.getSize(), N)
        self.assertEqual(trainDirOf(flex), self.protTrain.getTrainDir())
        classes = self.protCluster.outputClasses
        self.assertEqual(classes.getSize(), 2)
        inClasses = sorted(p.getObjId() for c in classes.iterItems() for p in c.iterItems())
        self.assertEqual(inClasses, sorted(flex.getIdSet()))

    def test_refine(self):
        if self.protRefine is None:
            self.skipTest('refine step skipped: %s' % self.refineSkipped)
        out = self.protRefine.outputParticles
        self.assertEqual(sorted(out.getIdSet()), sorted(self.protTrain.outputParticles.getIdSet()))
        self.assertTrue(out.hasAlignmentProj())

    def test_class_subset(self):
        """The user subset holds exactly the class's particles, each identical to its source
        particle (pose, CTF, image, latent vector), matched by id."""
        sub = subsetOutput(self.protSubset)
        self.assertEqual(sorted(sub.getIdSet()), self.classIds)
        # still a Flexibility Hub set naming the trained model (cluster/refine can take it)
        self.assertIsInstance(sub, SetOfParticlesFlex)
        self.assertEqual(trainDirOf(sub), self.protTrain.getTrainDir())
        self.assertEqual(sub.getFlexInfo().getProgName(), FLEX_PROG_NAME)
        self.assertTrue(sub.hasAlignmentProj())
        src = _particleTable(self.subsetSource.outputParticles)
        got = _particleTable(sub)
        for pid, (m, ctf, loc) in got.items():
            self.assertTrue(np.allclose(m, src[pid][0], atol=1e-9), pid)
            self.assertEqual(ctf, src[pid][1])
            self.assertEqual(loc, src[pid][2])
        zSrc = {p.getObjId(): list(p.getZFlex()) for p in
                self.protTrain.outputParticles.iterItems()}
        for p in sub.iterItems():
            self.assertEqual(list(p.getZFlex()), zSrc[p.getObjId()])
        with self.assertRaises(ValueError):
            createSubsetFromIds(self.proj, self.protTrain, 'outputParticles', [10 ** 7])
        with self.assertRaises(ValueError):
            createSubsetFromIds(self.proj, self.protTrain, 'outputParticles', [])

    def test_relion_export_roundtrip(self):
        """scipion-em-relion's writer then reader: same ids, rotation matrices, shifts and
        defoci as the class subset."""
        import relion.convert as rconv
        starFn = self.exportStar
        self.assertTrue(os.path.exists(starFn), starFn)
        readFn = os.path.abspath(self.proj.getTmpPath('relion_readback.sqlite'))
        if os.path.exists(readFn):
            os.remove(readFn)
        back = SetOfParticles(filename=readFn)
        from pwem.constants import ALIGN_PROJ
        rconv.readSetOfParticles(starFn, back, alignType=ALIGN_PROJ)
        self.assertTrue(back.hasAlignmentProj())
        self.assertTrue(back.hasCTF())
        self.assertAlmostEqual(back.getSamplingRate(), APIX, places=4)
        sub = _particleTable(subsetOutput(self.protSubset))
        got = _particleTable(back)
        self.assertEqual(sorted(got), sorted(sub))
        ids = sorted(sub)
        mSub = np.stack([sub[i][0] for i in ids])
        mGot = np.stack([got[i][0] for i in ids])
        A0, s0 = alignProjToProjection(mSub)
        A1, s1 = alignProjToProjection(mGot)
        self.assertLess(np.abs(A0 - A1).max(), 1e-4)
        self.assertLess(float(conventions.angular_distance_deg(A0, A1).max()), 0.01)
        self.assertLess(np.abs(np.asarray(s0) - np.asarray(s1)).max(), 1e-3)
        dSub = np.array([sub[i][1] for i in ids])
        dGot = np.array([got[i][1] for i in ids])
        self.assertLess(np.abs(dSub[:, :2] - dGot[:, :2]).max(), 0.05)
        dAng = np.abs(dSub[:, 2] - dGot[:, 2]) % 180.0
        self.assertLess(np.minimum(dAng, 180.0 - dAng).max(), 1e-3)
        # the exported stack holds the subset's images (pixel for pixel), row by row with ids
        from scipion_gmmhet.engine.io.mrc import open_stack
        star = read_star(starFn)['particles']
        self.assertEqual(len(star), len(ids))
        self.assertEqual(sorted(star['rlnImageId'].astype(int).tolist()), ids)
        stacks = {}

        def image(name, root):
            index, _, fn = str(name).partition('@')
            fn = fn if os.path.isabs(fn) else os.path.join(root, fn)
            if fn not in stacks:
                stacks[fn] = open_stack(fn)
            return np.asarray(stacks[fn][int(index) - 1])

        exportDir = os.path.dirname(starFn)
        for pid, name in zip(star['rlnImageId'].astype(int), star['rlnImageName']):
            index, fn = sub[pid][2]
            src = image('%d@%s' % (index, fn), self.proj.getPath())
            self.assertTrue(np.array_equal(image(name, exportDir), src), pid)

    def test_map_at_latent_point(self):
        """The selection window's map at a particle's latent point = ``gmmhet eval``."""
        part = self.protTrain.outputParticles.getFirstItem()
        z = np.asarray(part.getZFlex(), dtype=np.float32)
        outDir = os.path.abspath(self.proj.getTmpPath('map_at_point'))
        ours = gmmMapAt(self.protTrain.getTrainDir(), z, os.path.join(outDir, 'api.mrc'),
                        chimerax=True)
        for ext in ('.cxc', '.cmm'):  # ChimeraX command file + Gaussian markers next to it
            self.assertTrue(os.path.getsize(os.path.join(outDir, 'api' + ext)) > 0, ext)
        self.assertIn(os.path.abspath(ours), open(os.path.join(outDir, 'api.cxc')).read())
        cli = os.path.join(outDir, 'cli.mrc')
        subprocess.run([sys.executable, '-m', 'scipion_gmmhet.engine', 'eval', '--train',
                        self.protTrain.getTrainDir(), '--z', ','.join('%.9g' % v for v in z),
                        '--out', cli], check=True)
        a, apixA = read_map(ours)
        b, apixB = read_map(cli)
        self.assertEqual(a.shape, (BOX, BOX, BOX))
        self.assertAlmostEqual(apixA, APIX, places=4)
        self.assertAlmostEqual(apixA, apixB, places=6)
        self.assertGreater(float(np.asarray(a).std()), 0.0)
        self.assertLess(float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        1e-5 * float(np.abs(b).max()))


    def test_selection_viewer_gui(self):
        """The interactive-selection viewer on the trained run, in a real Tk window under
        Xvfb: a rectangle selects particles, "Create subset" launches Scipion's subset
        protocol in the background (as in the GUI) and it ends with exactly those ids; a
        clicked point writes its map (+ ChimeraX files)."""
        import shutil
        from scipion_gmmhet.tests.test_gui_forms import XVFB_MISSING, Xvfb, grabWindow, pngStats
        from scipion_gmmhet.tests.test_gui_forms import (closeTk, docsScreenshotDir,
                                                         quietBackgroundErrors)
        from scipion_gmmhet.viewers.latent_selection import GmmhetLatentSelectionViewer
        if shutil.which('Xvfb') is None:
            self.skipTest(XVFB_MISSING)
        xvfb = Xvfb.shared()  # one X server per test process (see Xvfb.shared)
        old = os.environ.get('DISPLAY')
        os.environ['DISPLAY'] = xvfb.display
        import tkinter as tk
        root = tk.Tk()
        root.withdraw()
        quietBackgroundErrors(root)
        try:
            viewer = GmmhetLatentSelectionViewer(project=self.proj, protocol=self.protTrain)
            viewer.setProtocol(self.protTrain)
            viewer._tkRoot = root
            viewer.openChimerax.set(False)
            views = viewer._showSelection()
            self.assertEqual(len(views), 1)
            views[0].show()
            win = views[0].window
            win.root.geometry('1000x560+0+0')
            xy = win.xy
            cut = float(np.median(xy[:, 0]))
            mask = win.applyRectangle((xy[:, 0].min() - 1, xy[:, 1].min() - 1),
                                      (cut, xy[:, 1].max() + 1))
            want = sorted(int(i) for i in win.ids[xy[:, 0] <= cut])
            self.assertEqual(win.selectedIds(), want)
            self.assertEqual(int(mask.sum()), len(want))
            row = win.pickPoint(*xy[3])
            self.assertEqual(row, 3)
            self.assertTrue(os.path.exists(win.lastMap), win.lastMap)
            self.assertTrue(os.path.exists(os.path.splitext(win.lastMap)[0] + '.cxc'))
            win.nameVar.set('left half (GUI)')
            prot = win.createSubset()
            self.assertIsNotNone(prot, win.status.get())
            out = os.path.join(os.path.abspath(self.proj.getPath('screenshots')),
                               'latent_selection_train.png')
            grabWindow(win.root, xvfb.display, out)
            self.assertGreater(pngStats(out)['std'], 0.0)
            if docsScreenshotDir():
                shutil.copyfile(out, os.path.join(docsScreenshotDir(),
                                                  'latent_selection_train.png'))
            deadline = time.time() + 180
            while time.time() < deadline:
                self.proj._updateProtocol(prot)
                if not prot.isActive():
                    break
                time.sleep(1)
            prot = self.proj.getProtocol(prot.getObjId())
            self.assertTrue(prot.isFinished(), prot.getErrorMessage())
            self.assertEqual(prot.getObjLabel(), 'left half (GUI)')
            self.assertEqual(sorted(subsetOutput(prot).getIdSet()), want)
        finally:
            closeTk(root)   # and its pending callbacks: none may fire in a later test
            if old is None:
                os.environ.pop('DISPLAY', None)
            else:
                os.environ['DISPLAY'] = old


def writeCryosparcCs(truth, outFn: str, stackName: str, apix: float, box: int,
                     template: str | None = REAL_CS, seed: int = 2) -> str:
    """A cryoSPARC particle export (.cs) of the simulator's truth with a 3D alignment, rows
    shuffled: every field of a real cryoSPARC export (``template``, when readable) plus
    ``alignments3D/*`` (rotation vector of the projection matrix's transpose, shift in pixels,
    as cryoSPARC stores them), stack paths with cryoSPARC's UID prefix, 0-based indices."""
    from scipy.spatial.transform import Rotation
    t = truth.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n = len(t)
    fields = []
    base = None
    if template and os.path.exists(template):
        base = np.load(template)
        fields = [(name, base.dtype.fields[name][0]) for name in base.dtype.names
                  if not name.startswith('alignments2D/')]
    have = {f[0] for f in fields}
    for name, dt in [('uid', '<u8'), ('blob/path', 'S96'), ('blob/idx', '<u4'),
                     ('blob/shape', ('<u4', (2,))), ('blob/psize_A', '<f4'),
                     ('ctf/accel_kv', '<f4'), ('ctf/cs_mm', '<f4'), ('ctf/amp_contrast', '<f4'),
                     ('ctf/df1_A', '<f4'), ('ctf/df2_A', '<f4'), ('ctf/df_angle_rad', '<f4')]:
        if name not in have:
            fields.append((name, dt))
    fields = [(name, 'S96') if name == 'blob/path' else (name, dt) for name, dt in fields]
    fields += [('alignments3D/split', '<u4'), ('alignments3D/shift', '<f4', (2,)),
               ('alignments3D/pose', '<f4', (3,)), ('alignments3D/psize_A', '<f4'),
               ('alignments3D/error', '<f4'), ('alignments3D/class_posterior', '<f4'),
               ('alignments3D/class', '<u4')]
    cs = np.zeros(n, dtype=[f if len(f) == 3 else (f[0], f[1]) for f in fields])
    if base is not None:  # the real export's constant fields (CTF model type, scale...)
        for name in base.dtype.names:
            if name in cs.dtype.names and name not in ('uid', 'blob/path', 'blob/idx'):
                cs[name] = base[name][0]
    A = conventions.euler_to_matrix(t['rot'].to_numpy(), t['tilt'].to_numpy(),
                                    t['psi'].to_numpy())
    cs['uid'] = np.arange(n, dtype=np.uint64) + np.uint64(8_000_000_000_000_000_000)
    cs['blob/path'] = ('J3/imported/001122334455667788_%s' % stackName).encode()
    cs['blob/idx'] = [int(s.split('@')[0]) - 1 for s in t['image_name']]
    cs['blob/shape'] = box
    cs['blob/psize_A'] = cs['alignments3D/psize_A'] = apix
    cs['ctf/accel_kv'], cs['ctf/cs_mm'], cs['ctf/amp_contrast'] = 300.0, 2.7, 0.1
    if 'ctf/phase_shift_rad' in cs.dtype.names:
        cs['ctf/phase_shift_rad'] = 0.0
    cs['ctf/df1_A'], cs['ctf/df2_A'] = t['defocus_u_A'], t['defocus_v_A']
    cs['ctf/df_angle_rad'] = np.radians(t['defocus_angle_deg'])
    cs['alignments3D/pose'] = Rotation.from_matrix(np.transpose(A, (0, 2, 1))).as_rotvec()
    cs['alignments3D/shift'] = np.stack([t['origin_x_A'], t['origin_y_A']], 1) / apix
    cs['alignments3D/split'] = np.arange(n) % 2
    cs['alignments3D/class_posterior'] = 1.0
    os.makedirs(os.path.dirname(os.path.abspath(outFn)), exist_ok=True)
    tmp = outFn + '.tmp'
    with open(tmp, 'wb') as f:
        np.save(f, cs)
    os.replace(tmp, outFn)
    return outFn


class TestWorkflowCryosparc(BaseTest):
    """RELION star without poses -> pwem import -> poses from a cryoSPARC .cs ("gmmhet -
    import poses") -> train 1 epoch: the poses reach the training unchanged."""
    N = 200

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        t0 = time.time()
        cls.dataDir = os.path.abspath(cls.proj.getPath('gmmhet_data'))
        cls.data = simulateDataset(os.path.join(cls.dataDir, 'sim'), kind='conformational',
                                   n=cls.N, box=BOX, apix=APIX, snr=1.0, seed=4)
        noPoses = writeRelionImportStar(cls.data['star'],
                                        os.path.join(cls.dataDir, 'unaligned', 'particles.star'),
                                        dropColumns=POSE_COLUMNS)
        cls.protParts = runImportParticlesStar(cls, noPoses, label='particles without poses')
        stack = os.path.basename(cls.data['stack'])
        cls.csFn = writeCryosparcCs(cls.data['truth'], os.path.join(cls.dataDir, 'cryosparc',
                                                                    'J3_particles_exported.cs'),
                                    stack, APIX, BOX)
        prot = cls.newProtocol(ProtGmmhetImportPoses, objLabel='poses from cryoSPARC',
                               poseSource=POSES_FROM_CS, posesFile=cls.csFn,
                               matchBy=MATCH_BY_NAME)
        _setPointer(prot.inputParticles, cls.protParts, 'outputParticles')
        cls.protPoses = cls.launchProtocol(prot)

        # the simulator's own GMM (no build step: this test is about the poses)
        protVol = runImportVolume(cls, cls.data['consensus'], APIX, label='consensus map')
        prot = cls.newProtocol(ProtGmmhetBuildGmm, objLabel='build GMM', resolution=12.0,
                               numberOfGaussians=N_GAUSS, steps=40, useGpu=False,
                               numberOfThreads=2)
        _setPointer(prot.inputVolume, protVol, 'outputVolume')
        cls.protBuild = cls.launchProtocol(prot)
        prot = cls.newProtocol(ProtGmmhetTrain, objLabel='train 1 epoch', zDim=ZDIM,
                               numberOfEpochs=1, batchSize=64, seed=2, useGpu=False,
                               numberOfThreads=2)
        _setPointer(prot.inputParticles, cls.protPoses, 'outputParticles')
        _setPointer(prot.inputGmm, cls.protBuild, 'outputVolume')
        cls.protTrain = cls.launchProtocol(prot)
        _timed('setUpClass total', t0)

    def test_cs_poses_match_truth(self):
        out = self.protPoses.outputParticles
        self.assertTrue(out.hasAlignmentProj())
        self.assertIn('Matched %d of %d' % (self.N, self.N), '\n'.join(self.protPoses.summary()))
        # the .cs stores float32
        assertPosesMatchTruth(self, out, self.data['truth'], APIX, n=self.N, rotTol=1e-5,
                              shiftTol=1e-4)

    def test_training_used_imported_poses(self):
        """The canonical star the engine trained on holds the imported poses (by the
        rlnGmmhetParticleId column), and the training's output particles carry them."""
        imported = _particleTable(self.protPoses.outputParticles)
        star = read_star(self.protTrain.getParticlesStar())
        parts = star['particles']
        ids = parts[GMMHET_PARTICLE_ID].astype(int).to_numpy()
        self.assertEqual(sorted(ids.tolist()), sorted(imported))
        A_star = conventions.euler_to_matrix(parts['rlnAngleRot'].astype(float).to_numpy(),
                                             parts['rlnAngleTilt'].astype(float).to_numpy(),
                                             parts['rlnAnglePsi'].astype(float).to_numpy())
        apixStar = float(star['optics']['rlnImagePixelSize'].iloc[0])
        s_star = np.stack([parts['rlnOriginXAngst'].astype(float).to_numpy(),
                           parts['rlnOriginYAngst'].astype(float).to_numpy()], 1) / apixStar
        A_imp, s_imp = alignProjToProjection(np.stack([imported[int(i)][0] for i in ids]))
        self.assertLess(float(conventions.angular_distance_deg(A_star, A_imp).max()), 1e-3)
        self.assertLess(np.abs(s_star - np.asarray(s_imp)[:, :2]).max(), 1e-3)
        dU = parts['rlnDefocusU'].astype(float).to_numpy()
        dImp = np.array([imported[int(i)][1] for i in ids])
        self.assertLess(np.abs(np.sort(np.stack([dU, parts['rlnDefocusV'].astype(float)], 1), 1)
                               - np.sort(dImp[:, :2], 1)).max(), 0.05)

        trained = _particleTable(self.protTrain.outputParticles)
        self.assertEqual(sorted(trained), sorted(imported))
        for pid, (m, ctf, loc) in trained.items():
            self.assertTrue(np.allclose(m, imported[pid][0], atol=1e-9), pid)
            self.assertEqual(ctf, imported[pid][1])
            self.assertEqual(loc, imported[pid][2])
        z = np.load(self.protTrain.getLatentFile())
        self.assertEqual(z.shape, (self.N, ZDIM))
        self.assertTrue(np.isfinite(z).all())
