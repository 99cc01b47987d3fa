"""Reading cryoDRGN pickles without running code from them.

A pickle can name any importable callable (``os.system`` ...) and the standard unpickler calls
it while loading. cryoDRGN's pose and CTF files hold only numpy arrays, tuples, lists and
numbers, so the unpickler here resolves nothing but numpy's array-rebuilding functions (and
``_codecs.encode``, which protocol-2 pickles use for byte strings); any other name stops the load
before anything is called, with a one-line ``InputError`` naming the file. The loaded object
is then checked again: only numeric (non-object) arrays, tuples, lists and numbers.

cryoDRGN formats (cryodrgn ``parse_pose_star``/``parse_pose_csparc``/``parse_ctf_star``):
    poses.pkl  ``(rot, trans)`` or ``rot``: ``rot`` ``(N, 3, 3)`` the RELION projection matrix
               ``A`` (map frame -> image frame), ``trans`` ``(N, 2)`` the RELION origin as a
               fraction of the box (pixels = ``trans * D``).
    ctf.pkl    ``(N, 9)``: box D (px), pixel size (A), defocus U, V (A), astigmatism angle
               (degrees), voltage (kV), Cs (mm), amplitude contrast, phase shift (degrees).
"""
from __future__ import annotations

import io
import pickle

import numpy as np

from ..errors import InputError

#: The only globals a cryoDRGN pickle may name (numpy 1.x and 2.x module paths).
ALLOWED_GLOBALS = frozenset(
    [(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")])

#: Upper bound on a pickle file (bytes): 10^8 particles' poses are about 4.8 GB.
MAX_PICKLE_BYTES = 8 << 30

CTF_COLUMNS = ("box_px", "apix_A", "defocus_u_A", "defocus_v_A", "defocus_angle_deg",
               "voltage_kV", "cs_mm", "amplitude_contrast", "phase_shift_deg")


class _RefusedGlobal(Exception):
    """Raised by the unpickler for a name outside ALLOWED_GLOBALS (before it is imported)."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise _RefusedGlobal("%s.%s" % (module, name))
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _RefusedGlobal("a persistent id")


def _check_plain(obj, depth: int = 0) -> str | None:
    """None when ``obj`` holds only numeric arrays, tuples, lists and numbers, else what it holds."""
    if depth > 8:
        return "nesting deeper than 8 levels"
    if isinstance(obj, np.ndarray):
        return None if obj.dtype.kind in "biuf" else "an array of dtype %s" % obj.dtype
    if isinstance(obj, (bool, int, float, np.integer, np.floating, np.bool_)):
        return None
    if isinstance(obj, (tuple, list)):
        for item in obj:
            bad = _check_plain(item, depth + 1)
            if bad:
                return bad
        return None
    return "a %s" % type(obj).__name__


def load_array_pickle(path: str, expected: str):
    """Unpickle ``path`` allowing only numeric numpy arrays, tuples, lists and numbers.

    ``expected`` says what the file should hold (it ends every error message). Raises
    ``InputError`` (one line, naming the file) for a missing file, a file that is not a pickle,
    a pickle naming any other Python object (nothing is imported or called), or a result that is
    not plain data."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PICKLE_BYTES + 1)
    except FileNotFoundError:
        raise InputError("%s: no such file; check the path" % path) from None
    except OSError as exc:
        raise InputError("%s: cannot read the file (%s); check the path and permissions"
                         % (path, exc.strerror or type(exc).__name__)) from None
    if len(data) > MAX_PICKLE_BYTES:
        raise InputError("%s: larger than %d GB; expected %s" % (path, MAX_PICKLE_BYTES >> 30, expected))
    try:
        obj = _ArrayUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as exc:
        raise InputError("%s: refused, the pickle names the Python object %s (only numpy arrays, "
                         "tuples, lists and numbers are read); expected %s"
                         % (path, str(exc)[:80].replace("\n", " "), expected)) from None
    except RecursionError:
        raise InputError("%s: not a data pickle (nested too deeply); expected %s" % (path, expected)) from None
    except Exception as exc:  # truncated/garbled bytes: pickle raises many types
        raise InputError("%s: not a readable pickle (%s); expected %s"
                         % (path, type(exc).__name__, expected)) from None
    bad = _check_plain(obj)
    if bad:
        raise InputError("%s: the pickle holds %s; expected %s" % (path, bad[:80], expected))
    return obj


POSES_EXPECTED = ("a cryoDRGN poses .pkl, (rotations (N,3,3), translations (N,2)) numpy arrays, as "
                  "written by cryodrgn parse_pose_star/parse_pose_csparc or train_vae")
CTF_EXPECTED = ("a cryoDRGN ctf .pkl, one (N, 9) numpy array, as written by cryodrgn "
                "parse_ctf_star/parse_ctf_csparc")


def _float_array(value, path: str, what: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise InputError("%s: the %s are not a numeric array; expected %s" % (path, what, POSES_EXPECTED)) from None


def read_cryodrgn_poses(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rot, trans)`` of a cryoDRGN ``poses.pkl`` (module docstring): ``rot`` ``(N, 3, 3)``
    float64 RELION ``A``, ``trans`` ``(N, 2)`` float64 fractions of the box (zeros when the file
    holds only rotations). Rotations must be orthonormal and everything finite; else InputError."""
    data = load_array_pickle(path, POSES_EXPECTED)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        rot = _float_array(data[0], path, "rotations")
        trans = _float_array(data[1], path, "translations")
    elif isinstance(data, (tuple, list)) and len(data) == 1 or isinstance(data, np.ndarray):
        rot = _float_array(data[0] if isinstance(data, (tuple, list)) else data, path, "rotations")
        trans = np.zeros((len(rot) if rot.ndim else 0, 2))
    else:
        raise InputError("%s: expected (rotations, translations) in the pickle; give %s"
                         % (path, POSES_EXPECTED))
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError("%s: rotations have shape %s, expected (N, 3, 3); give %s"
                         % (path, rot.shape, POSES_EXPECTED))
    if trans.shape != (len(rot), 2):
        raise InputError("%s: translations have shape %s, expected (%d, 2); give %s"
                         % (path, trans.shape, len(rot), POSES_EXPECTED))
    if not (np.isfinite(rot).all() and np.isfinite(trans).all()):
        raise InputError("%s: poses contain NaN or Inf; give a valid poses .pkl" % path)
    dev = np.abs(np.einsum("nij,nkj->nik", rot, rot) - np.eye(3)).max() if len(rot) else 0.0
    if dev > 1e-3:
        raise InputError("%s: rotations are not orthonormal (error %.2g); give %s"
                         % (path, dev, POSES_EXPECTED))
    return rot, trans


def read_cryodrgn_ctf(path: str) -> np.ndarray:
    """The ``(N, 9)`` float64 CTF table of a cryoDRGN ``ctf.pkl`` (columns ``CTF_COLUMNS``);
    InputError for another shape, non-finite values or non-positive box/pixel size/voltage."""
    data = load_array_pickle(path, CTF_EXPECTED)
    if not isinstance(data, np.ndarray):
        raise InputError("%s: the pickle holds a %s; expected %s" % (path, type(data).__name__, CTF_EXPECTED))
    ctf = data.astype(np.float64)
    if ctf.ndim != 2 or ctf.shape[1] != len(CTF_COLUMNS):
        raise InputError("%s: CTF table has shape %s; expected %s" % (path, ctf.shape, CTF_EXPECTED))
    if not np.isfinite(ctf).all():
        raise InputError("%s: CTF table contains NaN or Inf; expected %s" % (path, CTF_EXPECTED))
    if len(ctf) and (ctf[:, [0, 1, 5]] <= 0).any():
        raise InputError("%s: CTF table has a box, pixel size or voltage <= 0; expected %s" % (path, CTF_EXPECTED))
    return ctf
