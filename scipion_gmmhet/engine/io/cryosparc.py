"""cryoSPARC ``.cs`` particle exports (numpy structured arrays) read into the canonical
:class:`metadata.ParticleMetadata` (through :func:`metadata.read_particles`).

cryoSPARC stores a pose as a rotation vector ``pose`` (axis * angle, radians) and a
shift in pixels. With ``R = Rotation.from_rotvec(pose).as_matrix()`` (Rodrigues), the
RELION matrix is ``A = R.T`` and the RELION origin is the shift itself:
``rlnOriginXAngst, rlnOriginYAngst = shift * psize`` (psize = ``alignments3D/psize_A``
when present, else ``blob/psize_A``). This is what cryoDRGN does (``parse_pose_csparc``
stores ``expmap(pose).T`` and ``parse_pose_star`` stores ``R_from_relion(euler)``, which
equals ``A``; both store the shift/origin as the translation) and what pyem's
``csparc2star`` does (its ``expmap`` returns the transposed Rodrigues matrix, then
RELION's Euler decomposition; ``rlnOriginX/Y = shift``). ``blob/idx`` is 0-based,
``df1_A``/``df2_A`` are defocus U/V, ``df_angle_rad`` and ``phase_shift_rad`` are radians.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .. import conventions
from ..errors import InputError
from .metadata import ParticleMetadata, _as_float64, _canonical, _find_root, _group


# cryoSPARC fields the reader converts -> values per particle (numeric kind required). Other
# fields (ctf/type is text, ctf/tetra_A has 4 values...) are never read, so never checked.
CS_NUMERIC = {
    "blob/idx": 1, "blob/psize_A": 1, "blob/shape": 2,
    "ctf/accel_kv": 1, "ctf/cs_mm": 1, "ctf/amp_contrast": 1, "ctf/df1_A": 1, "ctf/df2_A": 1,
    "ctf/df_angle_rad": 1, "ctf/phase_shift_rad": 1, "ctf/bfactor": 1, "ctf/scale": 1, "ctf/exp_group_id": 1,
    "alignments3D/pose": 3, "alignments3D/shift": 2, "alignments3D/psize_A": 1, "alignments3D/split": 1,
}


def cs_field(cs: np.ndarray, name: str, path: str) -> np.ndarray:
    """Field ``name`` of a cryoSPARC array, checked: ``(n,)`` for one value per particle,
    ``(n, k)`` for k values; InputError when its dtype or shape is not what cryoSPARC writes."""
    dt = cs.dtype[name]
    want = CS_NUMERIC[name]
    if dt.base.kind not in "iuf" or dt.shape != (() if want == 1 else (want,)):
        raise InputError(f"{path}: field {name} has dtype {dt.base}/shape {(len(cs),) + dt.shape}, not what "
                         "cryoSPARC writes; export the particles again from cryoSPARC")
    a = np.asarray(cs[name])
    return a.reshape(len(cs), want) if want > 1 else a


def read_cs(path: str, images_root: str | None, apix: float | None) -> ParticleMetadata:
    """Particles of a cryoSPARC export (module docstring), as :func:`metadata.read_particles`
    gives them."""
    from scipy.spatial.transform import Rotation

    try:
        cs = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except Exception:
        raise InputError(f"{path}: not a cryoSPARC .cs file (numpy structured array); "
                         "export the particles from cryoSPARC") from None
    names = cs.dtype.names or ()
    if cs.ndim != 1 or "blob/path" not in names or "blob/idx" not in names:
        raise InputError(f"{path}: not a cryoSPARC particle file (no blob/path, blob/idx); "
                         "export the particles of a 3D refinement job from cryoSPARC")
    has3d = "alignments3D/pose" in names and "alignments3D/shift" in names
    if not has3d and any(n.startswith("alignments2D/") for n in names):
        raise InputError(f"{path}: has only 2D alignments; run a 3D refinement in cryoSPARC "
                         "and export its particles")
    n = len(cs)
    field = {name: cs_field(cs, name, path) for name in CS_NUMERIC if name in names}  # checked first
    paths = [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in cs["blob/path"]]
    paths = [p[1:] if p.startswith(">") else p for p in paths]
    idx_raw = field["blob/idx"]
    if idx_raw.dtype.kind == "f" and not (np.isfinite(idx_raw) & (idx_raw % 1 == 0) & (idx_raw >= 0)
                                          & (idx_raw < 2 ** 62)).all():
        raise InputError(f"{path}: field blob/idx holds values that are not image indices (whole numbers >= 0); "
                         "export the particles again from cryoSPARC")
    idx = idx_raw.astype(np.int64)
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{p}" for i, p in zip(idx, paths)]})
    if "location/micrograph_path" in names:
        mics = [m.decode("utf-8", "replace") if isinstance(m, bytes) else str(m)
                for m in cs["location/micrograph_path"]]
        particles["rlnMicrographName"] = [m[1:] if m.startswith(">") else m for m in mics]

    if apix is not None:
        psize = np.full(n, float(apix))
    elif "blob/psize_A" in names:
        psize = np.round(_as_float64(field["blob/psize_A"]), 6)
    else:
        raise InputError(f"{path}: no blob/psize_A; give the pixel size (--apix)")
    if "blob/shape" in names:
        shape = field["blob/shape"].astype(np.int64)
        if (shape[:, 0] != shape[:, -1]).any():
            raise InputError(f"{path}: particle images are not square; re-extract in a square box")
        box = shape[:, 0]
    else:
        box = None

    if "ctf/df1_A" in names:
        particles["rlnDefocusU"] = _as_float64(field["ctf/df1_A"])
        particles["rlnDefocusV"] = _as_float64(field["ctf/df2_A"]) if "ctf/df2_A" in names \
            else particles["rlnDefocusU"].to_numpy()
        if "ctf/df_angle_rad" in names:
            particles["rlnDefocusAngle"] = np.degrees(_as_float64(field["ctf/df_angle_rad"]))
        if "ctf/phase_shift_rad" in names:
            particles["rlnPhaseShift"] = np.degrees(_as_float64(field["ctf/phase_shift_rad"]))
        if "ctf/bfactor" in names:
            particles["rlnCtfBfactor"] = _as_float64(field["ctf/bfactor"])
        if "ctf/scale" in names:
            particles["rlnCtfScalefactor"] = _as_float64(field["ctf/scale"])

    if has3d:
        pose = field["alignments3D/pose"].astype(np.float64)
        shift = field["alignments3D/shift"].astype(np.float64)
        A = np.transpose(Rotation.from_rotvec(pose).as_matrix(), (0, 2, 1)) if n else np.zeros((0, 3, 3))
        rot, tilt, psi = conventions.matrix_to_euler(A)
        particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"] = rot, tilt, psi
        shift_psize = psize
        if "alignments3D/psize_A" in names and apix is None:
            p3 = np.round(_as_float64(field["alignments3D/psize_A"]), 6)
            shift_psize = np.where(p3 > 0, p3, psize)
        particles["rlnOriginXAngst"] = shift[:, 0] * shift_psize
        particles["rlnOriginYAngst"] = shift[:, 1] * shift_psize
        if "alignments3D/split" in names:
            particles["rlnRandomSubset"] = field["alignments3D/split"].astype(np.int64) + 1

    keys = pd.DataFrame({"rlnImagePixelSize": np.round(psize, 6)})
    if box is not None:
        keys["rlnImageSize"] = box
    for src, dst in (("ctf/accel_kv", "rlnVoltage"), ("ctf/cs_mm", "rlnSphericalAberration"),
                     ("ctf/amp_contrast", "rlnAmplitudeContrast")):
        if src in names:
            keys[dst] = np.round(_as_float64(field[src]), 6)
    group_ids = field["ctf/exp_group_id"].astype(np.int64) if "ctf/exp_group_id" in names else np.zeros(n, np.int64)
    keys["_exp"] = group_ids
    codes, optics = _group(keys)
    optics = optics.drop(columns=["_exp"])
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1, dtype=np.int64))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    particles["rlnOpticsGroup"] = (codes + 1).astype(np.int64)
    root = os.path.abspath(images_root) if images_root else _find_root(
        os.path.dirname(os.path.abspath(path)), paths[0] if paths else None)
    return _canonical(particles, optics, root, path)
