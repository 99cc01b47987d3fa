"""Shared helpers for the plugin's Scipion-harness tests: simulate a small dataset, import it
into the test project the way a user would (pwem's import protocols, the RELION plugin's star
importer), and compare particles with the simulator's ground truth.

Typical use in a ``BaseTest``::

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.data = simulateDataset(cls.proj.getPath('gmmhet_data'))
        cls.protParts = runImportParticlesStar(cls, cls.data['star'])
        cls.protMap = runImportVolume(cls, cls.data['consensus'], cls.data['apix'])
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from pwem.protocols import ProtImportParticles, ProtImportVolumes

from ..convert import alignProjToProjection, imageKey, writeRelionImportStar  # noqa: F401 (used by the tests)
from ..engine import conventions
from ..engine.io.star import read_star

#: Star columns of the pose (dropped to make particles "without alignment").
POSE_COLUMNS = ('rlnAngleRot', 'rlnAngleTilt', 'rlnAnglePsi', 'rlnOriginXAngst',
                'rlnOriginYAngst', 'rlnOriginX', 'rlnOriginY')


def simulateDataset(outDir: str, kind: str = 'conformational', n: int = 48, box: int = 32,
                    apix: float = 4.0, snr: float = 1.0, seed: int = 0,
                    nGaussians: int = 400) -> dict:
    """Simulate a small dataset with the engine's simulator (``gmmhet simulate``) into
    ``outDir`` (reused when ``truth.csv`` is already there).

    Returns the simulator's dict (absolute paths: ``star``, ``stack``, ``consensus``,
    ``truth_csv``, ``truth_maps``...) plus ``truth`` (the truth.csv DataFrame), ``apix``,
    ``box`` and ``n``.
    """
    from ..engine.simulation.simulate import simulate
    outDir = os.path.abspath(outDir)
    truthCsv = os.path.join(outDir, 'truth.csv')
    if os.path.exists(truthCsv):
        result = {'out_dir': outDir, 'star': os.path.join(outDir, 'particles.star'),
                  'stack': os.path.join(outDir, 'particles.mrcs'),
                  'consensus': os.path.join(outDir, 'consensus.mrc'), 'truth_csv': truthCsv}
    else:
        result = simulate(outDir, kind, n=n, box=box, apix=apix, snr=snr, seed=seed,
                          n_states_maps=1, n_gaussians=nGaussians)
    result['truth'] = pd.read_csv(truthCsv)
    result.update(apix=float(apix), box=int(box), n=len(result['truth']))
    return result


def runImportParticlesStar(testCls, starFn: str, label: str = 'import particles (RELION star)',
                           phaseFlipped: bool = False):
    """Import a RELION 3.1 star as a SetOfParticles with pwem's ProtImportParticles and the
    RELION plugin's importer (acquisition and sampling taken from the star's optics table).
    Runs in ``testCls.proj``; returns the finished protocol (``outputParticles``)."""
    optics = read_star(starFn)['optics'].iloc[0]
    prot = testCls.newProtocol(ProtImportParticles, objLabel=label,
                               importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                               starFile=os.path.abspath(starFn),
                               samplingRate=float(optics['rlnImagePixelSize']),
                               voltage=float(optics['rlnVoltage']),
                               sphericalAberration=float(optics['rlnSphericalAberration']),
                               amplitudeContrast=float(optics['rlnAmplitudeContrast']),
                               haveDataBeenPhaseFlipped=phaseFlipped)
    return testCls.launchProtocol(prot)


def runImportVolume(testCls, mapFn: str, samplingRate: float, label: str = 'import volume'):
    """Import a map with pwem's ProtImportVolumes in ``testCls.proj``; returns the finished
    protocol (``outputVolume``)."""
    prot = testCls.newProtocol(ProtImportVolumes, objLabel=label,
                               filesPath=os.path.abspath(mapFn), samplingRate=float(samplingRate))
    return testCls.launchProtocol(prot)


# ---------------------------------------------------------------------------- truth checks
def truthByImage(truth: pd.DataFrame) -> dict:
    """{(stack stem, 1-based index): truth row (Series)} from truth.csv's ``image_name``."""
    out = {}
    for _, row in truth.iterrows():
        index, _, stack = str(row['image_name']).partition('@')
        out[imageKey(stack, int(index))] = row
    return out


def standardDefocus(u, v, angle):
    """Scipion's (EMX) form of a defocus triple: U >= V, angle in [0, 180) degrees."""
    if v > u:
        u, v, angle = v, u, angle + 90.0
    return u, v, angle % 180.0


def poseErrors(partSet, truth: pd.DataFrame, apix: float) -> dict:
    """Compare every particle of ``partSet`` (ALIGN_PROJ) with the simulator's truth, matched
    by image name. Returns max errors: ``rotation`` (max |A - A_true| element),
    ``angle_deg`` (max angular distance), ``shift_px``, ``defocus_A``, ``defocus_angle_deg``,
    plus ``n`` (particles compared) and ``unmatched`` (particles not in the truth)."""
    byImage = truthByImage(truth)
    mats, trueA, trueS, ctfErr, angErr = [], [], [], [], []
    unmatched = 0
    for part in partSet.iterItems(orderBy='id'):
        index, fn = part.getLocation()
        row = byImage.get(imageKey(fn, index))
        if row is None:
            unmatched += 1
            continue
        mats.append(part.getTransform().getMatrix())
        trueA.append(conventions.euler_to_matrix(row['rot'], row['tilt'], row['psi']))
        trueS.append([row['origin_x_A'] / apix, row['origin_y_A'] / apix])
        ctf = part.getCTF()
        tu, tv, ta = standardDefocus(row['defocus_u_A'], row['defocus_v_A'], row['defocus_angle_deg'])
        ctfErr.append(max(abs(ctf.getDefocusU() - tu), abs(ctf.getDefocusV() - tv)))
        d = abs(ctf.getDefocusAngle() - ta) % 180.0
        angErr.append(min(d, 180.0 - d))
    if not mats:
        return {'n': 0, 'unmatched': unmatched}
    A, s = alignProjToProjection(np.array(mats))
    trueA, trueS = np.array(trueA), np.array(trueS)
    return {'n': len(mats), 'unmatched': unmatched,
            'rotation': float(np.abs(A - trueA).max()),
            'angle_deg': float(conventions.angular_distance_deg(A, trueA).max()),
            'shift_px': float(np.abs(s - trueS).max()),
            'defocus_A': float(max(ctfErr)), 'defocus_angle_deg': float(max(angErr))}


def assertPosesMatchTruth(test, partSet, truth: pd.DataFrame, apix: float, n: int | None = None,
                          rotTol: float = 1e-4, shiftTol: float = 1e-3, defocusTol: float = 0.05):
    """unittest assertions: every particle of ``partSet`` has the true pose, shift and defocus
    (and, with ``n``, exactly ``n`` particles were compared). Returns the error dict."""
    err = poseErrors(partSet, truth, apix)
    test.assertEqual(err['unmatched'], 0, 'particles not found in the truth: %s' % err)
    if n is not None:
        test.assertEqual(err['n'], n, err)
    test.assertGreater(err['n'], 0, err)
    test.assertLess(err['rotation'], rotTol, err)
    test.assertLess(err['shift_px'], shiftTol, err)
    test.assertLess(err['defocus_A'], defocusTol, err)
    test.assertLess(err['defocus_angle_deg'], 1e-3, err)
    return err


def assertPngNotBlank(test, path: str) -> None:
    """``path`` is a PNG of a real plot: over 100 px high, not one flat colour (at least 4
    colours, none covering 99% of the pixels)."""
    import matplotlib.image as mpimg
    test.assertTrue(os.path.isfile(path), path)
    img = np.asarray(mpimg.imread(path), dtype=np.float64)[..., :3]
    test.assertGreater(img.shape[0], 100)
    test.assertGreater(img.std(), 0.01, path)
    flat = (img * 255).astype(np.uint8).reshape(-1, 3)
    _, counts = np.unique(flat, axis=0, return_counts=True)
    test.assertGreater(len(counts), 3, path)
    test.assertLess(counts.max() / counts.sum(), 0.99, path)
