"""MRC maps and image stacks: checked reads, memory-mapped stacks, atomic writes.

Arrays follow MRC order: a map is ``vol[z, y, x]`` and a stack ``stack[n, y, x]``
(see ``conventions``). Pixel sizes (``apix``) are in Angstrom per pixel/voxel.

Headers are read with ``mrcfile`` (permissively: RELION writes stacks without the ``MAP``
id string and with a zero machine stamp) once the extended-header size (``nsymbt``) read from
the raw bytes fits in the file (mrcfile would allocate it first), and then checked here: the data block must fit in
the file and, for files without the ``MAP`` id, fill it exactly. Stacks are then mapped with
``numpy.memmap`` read-only, so opening a 100 GB stack costs nothing and a stack never
outlives its file handle. Anything wrong raises :class:`~.errors.InputError`. Writes go
through :mod:`.atomic` (``path.tmp`` then rename; a full disk is an InputError).
"""
from __future__ import annotations

import os
import warnings

import mrcfile
import mrcfile.utils
import numpy as np

from .atomic import atomic_write
from ..errors import InputError

_HEADER_BYTES = 1024


_MODES = (0, 1, 2, 4, 6, 12)  # the modes mrcfile maps to a dtype


def _byte_order(raw: bytes) -> str:
    """The byte order mrcfile reads a header in (permissive): big-endian when the machine stamp
    (bytes 212-213) is 0x11 0x11, else little-endian; the other one when only it gives a known mode."""
    order = "big" if raw[212] == 0x11 and raw[213] == 0x11 else "little"
    other = "little" if order == "big" else "big"
    if (int.from_bytes(raw[12:16], order, signed=True) not in _MODES
            and int.from_bytes(raw[12:16], other, signed=True) in _MODES):
        return other
    return order


def _header(path: str):
    """Parsed, sanity-checked header -> (header, dtype, shape (nz, ny, nx), data offset)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; check the path")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an MRC file")
    size = os.path.getsize(path)
    bad = f"{path}: truncated or not an MRC file"
    if size < _HEADER_BYTES:
        raise InputError(f"{bad} ({size} bytes); re-export or re-copy it")
    # mrcfile reads (allocates) the extended header of nsymbt bytes before anything can be
    # checked: refuse a size the file cannot hold first (a corrupt word would cost up to 2 GiB).
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEADER_BYTES)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc}); check the file's permissions") from None
    nsymbt = int.from_bytes(raw[92:96], _byte_order(raw), signed=True)
    if nsymbt < 0 or _HEADER_BYTES + nsymbt > size:
        raise InputError(f"{bad}: header says {nsymbt} bytes of extended header but the file has {size} bytes; "
                         "re-export or re-copy it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
                header = m.header.copy()
                has_map_id = bytes(header.map).startswith(b"MAP")
        dtype = mrcfile.utils.data_dtype_from_header(header)
        nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
        nsymbt = int(header.nsymbt)
    except InputError:
        raise
    except Exception:  # mrcfile raises many types for garbage headers
        raise InputError(f"{bad} (unreadable header); re-export or re-copy it") from None
    if dtype.kind == "c":
        raise InputError(f"{path}: complex-valued MRC (mode {int(header.mode)}); give a real-space map")
    if min(nx, ny, nz) < 1 or nsymbt < 0:
        raise InputError(f"{bad} (dimensions {nx} x {ny} x {nz}); re-export or re-copy it")
    offset = _HEADER_BYTES + nsymbt
    need = offset + nx * ny * nz * dtype.itemsize
    if size < need or (not has_map_id and size != need):
        raise InputError(f"{bad}: header says {nx} x {ny} x {nz} values of {dtype.name} "
                         f"({need} bytes) but the file has {size} bytes; re-export or re-copy it")
    return header, dtype, (nz, ny, nx), offset


def _memmap(path: str):
    header, dtype, shape, offset = _header(path)
    data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return header, data


def _zyx_order(header) -> list[int] | None:
    """Permutation that turns the file's array (sections, rows, columns) into ``[z, y, x]``
    from the header's ``maps``/``mapr``/``mapc`` (None: already ``[z, y, x]``, or the header's
    axis words are not a permutation of 1, 2, 3 and the file order is taken as it is)."""
    axes = [int(header.maps), int(header.mapr), int(header.mapc)]
    if sorted(axes) == [1, 2, 3] and axes != [3, 2, 1]:
        return [axes.index(3), axes.index(2), axes.index(1)]
    return None


def _apix(header) -> float:
    mx = int(header.mx)
    cella = float(header.cella.x)
    return cella / mx if mx > 0 and np.isfinite(cella) else 0.0


def read_map(path, apix: float | None = None) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map -> (``vol[z, y, x]`` float32 ``(D, D, D)``, apix in Angstrom).

    ``apix`` overrides the header's voxel size (needed when the header holds none).
    Raises InputError for a missing, truncated or corrupt file, a 2D image or stack, a
    non-cubic box, or NaN/Inf values.
    """
    path = os.fspath(path)
    header, data = _memmap(path)
    order = _zyx_order(header)
    if order is not None:
        data = np.transpose(data, order)
    if data.shape[0] == 1:
        raise InputError(f"{path}: a 2D image ({data.shape[2]} x {data.shape[1]}), not a 3D map")
    if len(set(data.shape)) != 1:
        raise InputError(f"{path}: non-cubic map {data.shape[2]} x {data.shape[1]} x {data.shape[0]} "
                         "(x, y, z); pad or crop it to a cube")
    vol = np.array(data, dtype=np.float32)
    del data
    if not np.isfinite(vol).all():
        raise InputError(f"{path}: contains NaN or Inf values; fix or regenerate the map")
    if apix is None:
        apix = _apix(header)
        if not apix > 0:
            raise InputError(f"{path}: the header holds no pixel size; give the pixel size (--apix)")
    return vol, float(apix)


def _write_atomic(path: str, data: np.ndarray, apix: float, stack: bool) -> None:
    """Write through ``atomic.atomic_write``: ``path.tmp`` then rename; a full disk is an
    InputError and leaves neither a half-written ``path`` nor ``path.tmp``."""
    def write(tmp: str) -> None:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if stack:
                m.set_image_stack()
            else:
                m.set_volume()
            m.voxel_size = float(apix)
            m.update_header_stats()

    atomic_write(path, write)


def write_map(path, data: np.ndarray, apix: float) -> None:
    """Write a 3D map ``vol[z, y, x]`` as float32 MRC with voxel size ``apix``, atomically."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"write_map needs a 3D array, got shape {data.shape}")
    _write_atomic(os.fspath(path), data, apix, stack=False)


def open_stack(path) -> np.ndarray:
    """Read-only memory map ``(n, D, D)`` of an image stack (.mrcs, or a 2D/3D .mrc).

    A single 2D image comes back as ``(1, D, D)``. The array keeps the file's dtype; copy
    slices with ``np.asarray(stack[i], np.float32)``. The header's axis order
    (``mapc``/``mapr``/``maps``, as :func:`read_map`) is honoured by a transposed view of the
    memory map (e.g. images stored with ``mapc = 2``, ``mapr = 1`` come back as ``[y, x]``):
    nothing is read until a slice is copied. InputError for missing, truncated or corrupt files
    and for non-square images.
    """
    path = os.fspath(path)
    header, data = _memmap(path)
    order = _zyx_order(header)
    if order is not None:
        data = np.transpose(data, order)  # a view: still memory-mapped
    if data.shape[1] != data.shape[2]:
        raise InputError(f"{path}: images are {data.shape[2]} x {data.shape[1]} px, not square; "
                         "re-extract the particles in a square box")
    return data


def stack_apix(path) -> float:
    """Pixel size (Angstrom) in a stack's header (0.0 when the header holds none)."""
    header, _, _, _ = _header(os.fspath(path))
    return _apix(header)


def write_stack(path, data: np.ndarray, apix: float) -> None:
    """Write ``(n, D, D)`` images as a float32 MRC image stack (ispg 0), atomically."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"write_stack needs (n, D, D) images, got shape {data.shape}")
    _write_atomic(os.fspath(path), data, apix, stack=True)
