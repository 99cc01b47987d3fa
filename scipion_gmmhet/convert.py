"""Where Scipion's conventions meet the engine's: the only module that turns Scipion objects
into the engine's canonical RELION 3.1 star file and engine results back into Scipion objects.

Conventions
    Engine side (``scipion_gmmhet.engine.conventions``): RELION. Euler angles
    ``rlnAngleRot/Tilt/Psi`` (ZYZ, degrees) give the projection matrix ``A`` (map frame ->
    image frame), ``rlnOriginXAngst/YAngst`` (Angstrom) is the shift that centres the
    particle (its centre lies at ``-origin`` in the image).

    Scipion side (``Transform`` of a SetOfParticles with ``ALIGN_PROJ``): a 4x4 matrix, shifts
    in pixels of the set's sampling rate, storing the *inverse* of the projection transform
    ``P = [[A, -s], [0, 1]]`` with ``s`` the RELION origin in pixels. So the stored matrix is
    ``S = inv(P) = [[A.T, A.T @ s], [0, 1]]`` and back ``A = inv(S)[:3, :3]``,
    ``s = -inv(S)[:3, 3]``. This is what scipion-em-relion does (``_alignProjToRow`` /
    ``__setParticleTransformProj`` with ``pwem.convert.transformations``: ``euler_matrix(-rot,
    -tilt, -psi, 'szyz')`` is ``A``); the tests check both against each other and against the
    RELION plugin's golden values (rot=-20, tilt=0, psi=0, shifts (-12.8558, 15.3210) px).

    CTF: Scipion's defocus U/V/angle (Angstrom, degrees) are RELION's ``rlnDefocusU/V/Angle``;
    phase shift in degrees is ``rlnPhaseShift``. Acquisition voltage (kV), Cs (mm) and
    amplitude contrast fill the optics table.

    Identity: every canonical star written here has ``rlnGmmhetParticleId`` = the particle's
    Scipion id; everything read back is keyed by that id, never by row position.

    Phase flipping: RELION has no label for phase-flipped or Wiener-corrected images, so the
    optics table gets ``rlnGmmhetPhaseFlipped`` and ``rlnGmmhetAmplitudeCorrected`` (0/1) from
    ``SetOfParticles.isPhaseFlipped()`` / ``isAmplitudeCorrected()``.

External pose sources (for "import poses"): RELION stars and cryoSPARC ``.cs`` are read with
``engine.io.metadata.read_particles`` (which documents the cryoSPARC convention); cryoDRGN pose
pickles by ``engine.io.safe_pickle`` (which runs no code from them): ``(rot, trans)`` with ``rot``
``(N, 3, 3)`` equal to RELION's ``A``
(cryoDRGN's ``R_from_relion(rot, tilt, psi)``; its ``parse_pose_csparc`` stores the
transposed Rodrigues matrix, the same ``A``) and ``trans`` ``(N, 2)`` the RELION origin as a
fraction of the box (``parse_pose_star`` divides ``rlnOriginX/Y`` in pixels by ``D``;
``write_star`` multiplies back), so ``s = trans * D`` pixels, same sign.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from pwem.constants import ALIGN_2D, ALIGN_3D, ALIGN_NONE, ALIGN_PROJ, NO_INDEX
from pwem.emlib.image import ImageHandler
from pwem.objects import Transform

from .constants import GMMHET_AMPLITUDE_CORRECTED, GMMHET_PARTICLE_ID, GMMHET_PHASE_FLIPPED, TRAIN_DIR_ATTR
from .engine.errors import InputError

# pandas and the engine's modules (conventions and metadata import torch) are imported inside
# the functions: pyworkflow imports every plugin's protocols (and so this module) whenever it
# lists protocols, and the GUI should not pay for torch.

#: Image formats the engine reads in place (others are converted into MRC stacks).
MRC_EXTENSIONS = ('.mrc', '.mrcs', '.st', '.map')
#: Per-particle Scipion attributes copied to the star when present (``_rlnRandomSubset`` ...).
EXTRA_LABELS = ('rlnRandomSubset',)


# ============================================================================ transforms
def projectionToAlignProj(A, shiftsPx) -> np.ndarray:
    """RELION matrices ``A`` ``(N, 3, 3)`` (or ``(3, 3)``) and origins in pixels ``(N, 2)`` ->
    Scipion ALIGN_PROJ matrices ``(N, 4, 4)`` (``(4, 4)`` for one pose)."""
    A = np.asarray(A, dtype=np.float64)
    s = np.asarray(shiftsPx, dtype=np.float64)
    single = A.ndim == 2
    A, s = A.reshape(-1, 3, 3), s.reshape(-1, 2)
    At = np.swapaxes(A, -1, -2)
    s3 = np.concatenate([s, np.zeros((len(s), 1))], axis=1)
    S = np.zeros((len(A), 4, 4))
    S[:, :3, :3] = At
    S[:, :3, 3] = np.einsum('nij,nj->ni', At, s3)
    S[:, 3, 3] = 1.0
    return S[0] if single else S


def alignProjToProjection(matrices) -> tuple[np.ndarray, np.ndarray]:
    """Scipion ALIGN_PROJ matrices ``(N, 4, 4)`` (or ``(4, 4)``) -> RELION ``A`` ``(N, 3, 3)``
    and origins in pixels ``(N, 2)``. A z shift (meaningless for 2D particles) is dropped."""
    S = np.asarray(matrices, dtype=np.float64)
    single = S.ndim == 2
    P = np.linalg.inv(S.reshape(-1, 4, 4))
    A, s = P[:, :3, :3], -P[:, :2, 3]
    return (A[0], s[0]) if single else (A, s)


def relionToAlignProj(euler_deg, originsA, pixelSize: float) -> np.ndarray:
    """RELION Euler angles ``(N, 3)`` (degrees) and origins ``(N, 2)`` (Angstrom) -> Scipion
    ALIGN_PROJ matrices ``(N, 4, 4)`` with shifts in pixels of ``pixelSize``."""
    from .engine import conventions
    e = np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3)
    A = conventions.euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    return projectionToAlignProj(A, np.asarray(originsA, dtype=np.float64).reshape(-1, 2) / pixelSize)


def alignProjToRelion(matrices, pixelSize: float) -> tuple[np.ndarray, np.ndarray]:
    """Scipion ALIGN_PROJ matrices ``(N, 4, 4)`` -> RELION Euler angles ``(N, 3)`` (degrees;
    tilt in [0, 180]) and origins ``(N, 2)`` in Angstrom."""
    from .engine import conventions
    A, s = alignProjToProjection(np.asarray(matrices, dtype=np.float64).reshape(-1, 4, 4))
    rot, tilt, psi = conventions.matrix_to_euler(A)
    return np.stack([rot, tilt, psi], axis=1), s * pixelSize


# ============================================================================ image names
def cleanFileName(fn: str) -> str:
    """Scipion file name without a format suffix (``stack.mrc:mrcs`` -> ``stack.mrc``)."""
    return ImageHandler.removeFileType(str(fn))


_UID = re.compile(r'^\d{6,}_')


def imageKey(path: str, index: int, stripUid: bool = False) -> tuple[str, int]:
    """Key to match one particle image across programs: (stack stem, 1-based index).

    The stem is the file's base name without format suffix, cryoSPARC's leading ``>`` and
    extension (so ``stack.mrc`` matches ``stack.mrcs``); ``stripUid`` also drops a leading
    cryoSPARC UID (``000090334788266266069_stack`` -> ``stack``). Index 0 (Scipion's
    NO_INDEX, a one-image file) counts as 1.
    """
    base = os.path.basename(cleanFileName(path)).lstrip('>')
    stem = os.path.splitext(base)[0]
    if stripUid:
        stem = _UID.sub('', stem)
    return stem, int(index) if int(index) > 0 else 1


# ============================================================================ Scipion -> star
def _stackPath(part, ih: ImageHandler, outputDir: str, converted: dict) -> tuple[int, str]:
    """(1-based index, absolute MRC path) of a particle's image, converting non-MRC files
    into ``outputDir`` once per file (indices kept)."""
    index, fn = part.getLocation()
    fn = cleanFileName(fn)
    if os.path.splitext(fn)[1].lower() in MRC_EXTENSIONS:
        return (index if index != NO_INDEX else 1), os.path.abspath(fn)
    if outputDir is None:
        raise InputError("%s: image format the engine cannot read; give an output folder to "
                         "convert it to MRC" % fn)
    if index == NO_INDEX:  # single images in another format: gather them into one stack
        single = converted.setdefault(None, [os.path.join(outputDir, 'gmmhet_single_images.mrcs'), 0])
        single[1] += 1
        ih.convert(part, (single[1], single[0]))
        return single[1], os.path.abspath(single[0])
    if fn not in converted:
        base = os.path.splitext(os.path.basename(fn))[0]
        newFn = os.path.join(outputDir, '%s.mrcs' % base)
        n = 1
        while newFn in {v for k, v in converted.items() if k is not None}:
            n += 1
            newFn = os.path.join(outputDir, '%s_%d.mrcs' % (base, n))
        os.makedirs(outputDir, exist_ok=True)
        ih.convertStack(fn, newFn)
        converted[fn] = newFn
    return index, os.path.abspath(converted[fn])


def writeSetOfParticles(partSet, starFn: str, outputDir: str | None = None,
                        alignType: str = ALIGN_PROJ) -> int:
    """Write ``partSet`` as the engine's canonical RELION 3.1 star ``starFn``; returns the
    number of particles.

    Optics: one group per distinct (voltage, Cs, amplitude contrast) of the particles'
    acquisitions, pixel size and box from the set, ``rlnGmmhetPhaseFlipped`` /
    ``rlnGmmhetAmplitudeCorrected`` flags. Particles (in id order): ``rlnImageName``
    (``index@path``; MRC stacks referenced in place, other formats converted with pwem's
    ImageHandler into ``outputDir``), with ``alignType == ALIGN_PROJ`` the pose
    ``rlnAngleRot/Tilt/Psi`` + ``rlnOriginXAngst/YAngst`` (see the module docstring), CTF
    ``rlnDefocusU/V/Angle`` + ``rlnPhaseShift`` when the set has CTF, ``rlnGmmhetParticleId``
    (Scipion id; also as ``rlnImageId``, which scipion-em-relion reads back as the id) and ``rlnRandomSubset`` when the particles carry it. ``ALIGN_NONE`` writes no
    pose. Written atomically.
    """
    if alignType not in (ALIGN_PROJ, ALIGN_NONE):
        raise InputError("%s: alignment %s cannot be written for the engine; it needs 3D "
                         "projection alignment (ALIGN_PROJ) or none" % (starFn, alignType))
    if alignType == ALIGN_PROJ and partSet.getAlignment() != ALIGN_PROJ:
        raise InputError("input particles: no 3D alignment (alignment is '%s'); run a 3D "
                         "refinement or 'gmmhet - import poses' first" % partSet.getAlignment())
    import pandas as pd
    pixelSize = partSet.getSamplingRate()
    if not pixelSize or pixelSize <= 0:
        raise InputError("input particles: no sampling rate; set it in the import protocol")
    box = partSet.getXDim()
    writeCtf = bool(partSet.hasCTF())
    ih = ImageHandler()
    converted: dict = {}
    extraLabels = None

    ids, names, matrices, ctf, acq = [], [], [], [], []
    extras: dict[str, list] = {}
    for part in partSet.iterItems(orderBy='id', direction='ASC'):
        if extraLabels is None:
            extraLabels = [l for l in EXTRA_LABELS if part.hasAttribute('_' + l)]
            extras = {l: [] for l in extraLabels}
        pid = part.getObjId()
        ids.append(pid)
        index, path = _stackPath(part, ih, outputDir, converted)
        names.append('%06d@%s' % (index, path))
        if alignType == ALIGN_PROJ:
            t = part.getTransform()
            if t is None:
                raise InputError("input particles: particle %d has no transform; its set claims "
                                 "3D alignment; re-import the poses" % pid)
            matrices.append(t.getMatrix())
        if writeCtf:
            c = part.getCTF()
            if c is None:
                raise InputError("input particles: particle %d has no CTF; the set claims CTF; "
                                 "re-run the CTF assignment" % pid)
            ps = c.getPhaseShift()
            ctf.append((c.getDefocusU(), c.getDefocusV(), c.getDefocusAngle(), ps or 0.0))
        a = part.getAcquisition() if part.hasAcquisition() else partSet.getAcquisition()
        acq.append((a.getVoltage(), a.getSphericalAberration(), a.getAmplitudeContrast()))
        for l in extraLabels:
            extras[l].append(part.getAttributeValue('_' + l))
    if not ids:
        raise InputError("input particles: the set is empty; give a set with particles")

    acqKeys = pd.DataFrame(acq, columns=['rlnVoltage', 'rlnSphericalAberration',
                                         'rlnAmplitudeContrast']).astype(np.float64)
    codes = acqKeys.groupby(list(acqKeys.columns), sort=False, dropna=False).ngroup().to_numpy()
    optics = acqKeys.drop_duplicates().reset_index(drop=True)
    nGroups = len(optics)
    optics.insert(0, 'rlnOpticsGroup', np.arange(1, nGroups + 1, dtype=np.int64))
    optics.insert(1, 'rlnOpticsGroupName', ['opticsGroup%d' % g for g in range(1, nGroups + 1)])
    optics['rlnImagePixelSize'] = float(pixelSize)
    optics['rlnImageSize'] = np.int64(box)
    optics['rlnImageDimensionality'] = np.int64(2)
    optics['rlnCtfDataAreCtfPremultiplied'] = np.int64(0)
    optics[GMMHET_PHASE_FLIPPED] = np.int64(bool(partSet.isPhaseFlipped()))
    optics[GMMHET_AMPLITUDE_CORRECTED] = np.int64(bool(partSet.isAmplitudeCorrected()))

    particles = pd.DataFrame({'rlnImageName': names,
                              'rlnOpticsGroup': (codes + 1).astype(np.int64)})
    if alignType == ALIGN_PROJ:
        euler, originsA = alignProjToRelion(np.array(matrices), pixelSize)
        particles['rlnAngleRot'], particles['rlnAngleTilt'], particles['rlnAnglePsi'] = euler.T
        particles['rlnOriginXAngst'], particles['rlnOriginYAngst'] = originsA.T
    else:
        particles['rlnOriginXAngst'] = 0.0
        particles['rlnOriginYAngst'] = 0.0
    if writeCtf:
        c = np.array(ctf, dtype=np.float64)
        for i, label in enumerate(['rlnDefocusU', 'rlnDefocusV', 'rlnDefocusAngle', 'rlnPhaseShift']):
            particles[label] = c[:, i]
    particles[GMMHET_PARTICLE_ID] = np.array(ids, dtype=np.int64)
    particles['rlnImageId'] = particles[GMMHET_PARTICLE_ID]  # what scipion-em-relion reads as id
    for l, values in extras.items():
        particles[l] = values

    from .engine.io.metadata import ParticleMetadata, write_particles
    meta = ParticleMetadata(particles, optics, os.path.dirname(os.path.abspath(starFn)), starFn)
    write_particles(starFn, meta)
    return len(ids)


# ============================================================================ star -> Scipion
def _particleIds(frame, source: str, label: str = GMMHET_PARTICLE_ID) -> np.ndarray:
    import pandas as pd
    if label not in frame.columns:
        raise InputError("%s: no %s column; give a star written by this plugin (or one of its "
                         "engine commands)" % (source, label))
    ids = pd.to_numeric(frame[label], errors='coerce')
    if ids.isna().any() or (ids % 1 != 0).any():
        raise InputError("%s: %s holds non-integer values; the file is corrupt" % (source, label))
    ids = ids.to_numpy().astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise InputError("%s: %d repeated %s value(s); each particle must appear once"
                         % (source, len(ids) - len(np.unique(ids)), label))
    return ids


def readParticleIds(starFn: str, block: str = 'particles') -> np.ndarray:
    """The Scipion particle id of every row of a canonical star (``rlnGmmhetParticleId``), in
    row order: row ``i`` of any engine result (latent.npy, labels.npy) belongs to particle
    ``readParticleIds(star)[i]``."""
    from .engine.io.star import read_star
    blocks = read_star(starFn)
    if block not in blocks:
        raise InputError("%s: no data_%s block; give a star written by this plugin" % (starFn, block))
    return _particleIds(blocks[block], starFn)


def iterStarRowsById(starFn: str, block: str = 'particles'):
    """Yield ``(particleId, row)`` for every row of ``block`` of a star file, with ``row`` a
    dict ``{column: value}`` and ``particleId`` its ``rlnGmmhetParticleId`` (unique)."""
    from .engine.io.star import read_star
    blocks = read_star(starFn)
    if block not in blocks:
        raise InputError("%s: no data_%s block; give a particle star file" % (starFn, block))
    frame = blocks[block]
    ids = _particleIds(frame, starFn)
    columns = list(frame.columns)
    for pid, values in zip(ids.tolist(), frame.itertuples(index=False, name=None)):
        yield pid, dict(zip(columns, values))


def readPosesIntoSet(inputSet, starFn: str, outputSet, extraCallback=None) -> tuple[int, list[int]]:
    """Copy ``inputSet`` into ``outputSet`` with each particle's ALIGN_PROJ transform taken from
    the row of ``starFn`` with the same ``rlnGmmhetParticleId`` (keyed by id, never by row).

    Everything else (CTF, acquisition, location, extra attributes) is kept.
    ``extraCallback(particle, row)`` may set more attributes (``row`` is a dict of the star's
    columns); setting ``particle._appendItem = False`` drops the particle. Particles without a
    row are left out. Returns ``(number written, ids of input particles without a row)``.
    """
    from .engine.io.metadata import read_particles
    meta = read_particles(starFn)
    ids = _particleIds(meta.particles, starFn)
    matrices = relionToAlignProj(meta.euler_deg(), meta.origins_A(), inputSet.getSamplingRate())
    rowOf = {pid: pos for pos, pid in enumerate(ids.tolist())}
    columns = list(meta.particles.columns)
    frame = meta.particles
    missing: list[int] = []
    written = [0]

    def _update(item, _row):
        pid = item.getObjId()
        pos = rowOf.get(pid, -1)
        if pos < 0:
            missing.append(pid)
            item._appendItem = False
            return
        item.setTransform(Transform(matrices[pos]))
        if extraCallback is not None:
            extraCallback(item, dict(zip(columns, frame.iloc[pos].tolist())))
        if getattr(item, '_appendItem', True):
            written[0] += 1

    outputSet.copyInfo(inputSet)
    outputSet.setAlignmentProj()
    outputSet.copyItems(inputSet, updateItemCallback=_update)
    return written[0], missing


# ============================================================================ pose sources
@dataclass
class PoseTable:
    """Poses from any source, as Scipion ALIGN_PROJ matrices with shifts in pixels of the
    target set, plus what they can be matched by.

    ``matrices`` ``(N, 4, 4)``; ``paths`` ``(N,)`` stack paths and ``indices`` ``(N,)``
    1-based indices (None when the source has no image names); ``ids`` ``(N,)`` Scipion
    particle ids (None when unknown); ``source`` names the source for messages.
    """
    matrices: np.ndarray
    paths: np.ndarray | None
    indices: np.ndarray | None
    ids: np.ndarray | None
    source: str

    def __len__(self):
        return len(self.matrices)


def readStarOrCsPoses(fn: str, pixelSize: float) -> PoseTable:
    """Poses of a RELION star (3.0-5) or cryoSPARC ``.cs`` via the engine's reader; shifts in
    pixels of ``pixelSize`` (the target particles' sampling rate)."""
    from .engine.io.metadata import read_particles
    meta = read_particles(fn)
    if len(meta) == 0:
        raise InputError("%s: no particles in the file; give a particle star/.cs file" % fn)
    A = meta.rotation_matrices()
    matrices = projectionToAlignProj(A, meta.origins_A() / pixelSize)
    paths, idx0 = meta.image_locations()
    ids = None
    for label in (GMMHET_PARTICLE_ID, 'rlnImageId'):
        if label in meta.particles.columns:
            ids = _particleIds(meta.particles, fn, label)
            break
    return PoseTable(matrices, np.asarray(paths, dtype=object), idx0 + 1, ids, fn)


def readCryoDrgnPoses(fn: str, boxSize: int, pixelSize: float | None = None) -> PoseTable:
    """Poses of a cryoDRGN ``poses.pkl`` (``(rot, trans)`` or only ``rot``; module docstring).
    ``boxSize``: the box (pixels) of the particles the poses belong to (translations are
    fractions of it). cryoDRGN stores no image names or ids: match by order."""
    from .engine.io.safe_pickle import read_cryodrgn_poses  # restricted unpickler: runs no code
    rot, trans = read_cryodrgn_poses(fn)
    matrices = projectionToAlignProj(rot, trans * float(boxSize))
    return PoseTable(matrices, None, None, None, fn)


def poseTableFromSet(partSet, pixelSize: float, source: str = 'pose particles') -> PoseTable:
    """Poses of a Scipion SetOfParticles with 3D alignment, shifts rescaled from its sampling
    rate to ``pixelSize`` (the target particles')."""
    if partSet.getAlignment() != ALIGN_PROJ:
        what = {ALIGN_NONE: 'no alignment', ALIGN_2D: 'only 2D alignment',
                ALIGN_3D: 'a 3D (volume) alignment'}.get(partSet.getAlignment(), partSet.getAlignment())
        raise InputError("%s: %s; give particles from a 3D refinement (projection alignment)"
                         % (source, what))
    scale = partSet.getSamplingRate() / pixelSize
    mats, paths, indices, ids = [], [], [], []
    for part in partSet.iterItems(orderBy='id', direction='ASC'):
        t = part.getTransform()
        if t is None:
            continue
        m = np.array(t.getMatrix(), dtype=np.float64)
        m[:3, 3] *= scale
        mats.append(m)
        index, fn = part.getLocation()
        paths.append(cleanFileName(fn))
        indices.append(index if index != NO_INDEX else 1)
        ids.append(part.getObjId())
    if not mats:
        raise InputError("%s: no particle has a transform; give particles with 3D alignment" % source)
    return PoseTable(np.array(mats), np.array(paths, dtype=object), np.array(indices, np.int64),
                     np.array(ids, np.int64), source)


# ============================================================================ matching
def _nameKeys(paths, indices, stripUid: bool) -> list[tuple[str, int]]:
    return [imageKey(p, i, stripUid) for p, i in zip(paths, indices)]


def matchByName(targetPaths, targetIndices, table: PoseTable) -> np.ndarray:
    """Row of ``table`` for each target image, matched by (stack stem, index); -1 when none.

    Tries plain stems and stems without cryoSPARC UID prefixes and keeps whichever matches
    more images; a key that appears twice in the pose source is an error (ambiguous).
    """
    import pandas as pd
    if table.paths is None:
        raise InputError("%s: has no image names; match by order instead" % table.source)
    if len(targetPaths) == 0:
        return np.zeros(0, dtype=np.int64)
    best = None
    for strip in (False, True):
        srcKeys = _nameKeys(table.paths, table.indices, strip)
        index = pd.Index(pd.MultiIndex.from_tuples(srcKeys))
        if not index.is_unique:
            dup = index[index.duplicated()][0]
            if strip:
                continue
            raise InputError("%s: image %d@%s appears more than once; remove duplicates or "
                             "match by order" % (table.source, dup[1], dup[0]))
        tgt = pd.MultiIndex.from_tuples(_nameKeys(targetPaths, targetIndices, strip))
        rows = index.get_indexer(tgt)
        if best is None or (rows >= 0).sum() > (best >= 0).sum():
            best = rows
    return best


def matchById(targetIds, table: PoseTable) -> np.ndarray:
    """Row of ``table`` for each target particle id; -1 when none."""
    if table.ids is None:
        raise InputError("%s: has no particle ids (rlnGmmhetParticleId/rlnImageId); match by "
                         "image name or order instead" % table.source)
    import pandas as pd
    return pd.Index(table.ids).get_indexer(np.asarray(targetIds, dtype=np.int64))


def matchByOrder(nTargets: int, table: PoseTable) -> np.ndarray:
    """i-th target particle (in id order) <-> i-th pose; -1 past the end of the poses."""
    rows = np.arange(nTargets)
    rows[rows >= len(table)] = -1
    return rows


def trainDirOf(partSet) -> str | None:
    """The ``gmmhet train`` folder a particle set comes from (the training's output or a subset
    of it): the set's ``_gmmhet_trainDir`` attribute, else its Flexibility Hub ``trainDir``;
    None when it names none."""
    attr = getattr(partSet, TRAIN_DIR_ATTR, None)
    value = attr.get() if attr is not None and hasattr(attr, 'get') else None
    if not value and hasattr(partSet, 'getFlexInfo'):
        flex = partSet.getFlexInfo()
        try:
            value = flex.getAttr('trainDir')
        except AttributeError:  # a FlexInfo without that attribute
            value = getattr(flex, 'trainDir', None)
            value = value.get() if hasattr(value, 'get') else value
    return value or None


def writeRelionImportStar(starFn: str, outFn: str, dropColumns=()) -> str:
    """Copy ``starFn`` to ``outFn`` in the form the RELION plugin's importer accepts: image
    names relative to ``outFn``'s folder (each stack symlinked there; the importer refuses
    absolute names), without the particle columns ``dropColumns`` (e.g. ``tests.common.POSE_COLUMNS``
    for particles "without alignment"). Returns ``outFn``."""
    from .engine.io.star import read_star, write_star
    blocks = read_star(starFn)
    particles = blocks['particles'].copy()
    outDir = os.path.dirname(os.path.abspath(outFn))
    os.makedirs(outDir, exist_ok=True)
    srcDir = os.path.dirname(os.path.abspath(starFn))
    names = []
    for name in particles['rlnImageName'].astype(str):
        index, _, stack = name.partition('@')
        src = stack if os.path.isabs(stack) else os.path.join(srcDir, stack)
        link = os.path.join(outDir, os.path.basename(stack))
        if os.path.abspath(src) != os.path.abspath(link) and not os.path.lexists(link):
            os.symlink(os.path.abspath(src), link)
        names.append('%s@%s' % (index, os.path.basename(stack)))
    particles['rlnImageName'] = names
    particles = particles.drop(columns=[c for c in dropColumns if c in particles.columns])
    blocks['particles'] = particles
    write_star(outFn, blocks)
    return outFn
