"""Point-group symmetry operators (C and D groups, RELION's axes) and symmetry expansion.

Axes follow RELION's ``symmetries.cpp``: the principal n-fold axis of ``Cn`` and ``Dn`` is the
map's z axis, and the 2-fold axes of ``Dn`` include the x axis. An operator ``S`` is a
rotation of the map frame (``p -> S @ p``, Angstrom xyz from the centre voxel, see
:mod:`conventions`). ``C1`` is the identity alone.

Symmetry expansion (as ``relion_particle_symmetry_expand``): a particle with RELION pose
``A`` is used once per operator, with the pose ``A @ S``. For a map with the symmetry, the
projection at ``A @ S`` equals the projection at ``A`` (``S`` permutes the symmetric copies),
so every expanded copy explains the same image, but a focus mask on one asymmetric unit sees
a different subunit of the particle in each copy. Expanded items are numbered particle-major:
item ``i * n_ops + s`` is particle row ``i`` with operator ``s`` (operator 0 is the
identity), which is also the row order of ``latent.npy`` after expansion.
"""
from __future__ import annotations

import math
import re

import numpy as np

from ..errors import InputError

_PATTERN = re.compile(r"^\s*([CD])\s*(\d+)\s*$", re.IGNORECASE)


def _rot_z(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def parse_symmetry(name: str | None) -> tuple[str, int]:
    """``'C3'``, ``'d2'``, ``None`` ... -> (``'C'`` or ``'D'``, order n). InputError otherwise."""
    if name is None or str(name).strip() == "":
        return "C", 1
    m = _PATTERN.match(str(name))
    if not m or int(m.group(2)) < 1:
        raise InputError(f"--symmetry {name!r}: not a C or D point group; give e.g. C1, C3, D2, D7 "
                         "(T, O and I are not supported)")
    return m.group(1).upper(), int(m.group(2))


def symmetry_operators(name: str | None) -> np.ndarray:
    """All operators of a C or D group, ``(n_ops, 3, 3)`` float64, identity first.

    ``Cn``: rotations by ``2 pi k / n`` about z (k = 0..n-1). ``Dn``: those, then each
    followed by the 2-fold about x (``diag(1, -1, -1) @ Rz``), 2n operators in all.
    """
    kind, n = parse_symmetry(name)
    ops = [_rot_z(2.0 * math.pi * k / n) for k in range(n)]
    if kind == "D":
        flip = np.diag([1.0, -1.0, -1.0])
        ops += [flip @ r for r in ops[:n]]
    ops = np.stack(ops)
    ops[np.abs(ops) < 1e-15] = 0.0
    return ops


def expand_rotations(rotations: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Expanded poses ``A_i @ S_s`` for rotations ``(N, 3, 3)`` and operators ``(S, 3, 3)``
    -> ``(N * S, 3, 3)``, particle-major (row ``i * S + s``)."""
    rotations = np.asarray(rotations)
    out = np.einsum("nij,sjk->nsik", rotations, np.asarray(ops, dtype=rotations.dtype))
    return out.reshape(-1, 3, 3)


def symmetrize_points(points_A: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Copies of points ``(M, 3)`` under every operator -> ``(S * M, 3)`` (operator-major)."""
    return np.einsum("sij,mj->smi", np.asarray(ops), np.asarray(points_A)).reshape(-1, 3)
