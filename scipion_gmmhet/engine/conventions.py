"""The one definition of every geometric and CTF convention the engine uses.

Everything here follows RELION, so that data written by the simulator reconstructs in
RELION and cryoDRGN, and poses read from RELION stars mean the same thing here.

Coordinates
    A 3D map is an array ``vol[z, y, x]`` (MRC order). Voxel ``(k, j, i)`` sits at
    ``((i - D//2), (j - D//2), (k - D//2)) * apix`` Angstrom: the origin is the voxel
    ``D//2`` on each axis (RELION's and Xmipp's centre). An image ``img[y, x]`` likewise has
    its origin at pixel ``(D//2, D//2)``.

Euler angles (RELION ZYZ, degrees)
    ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]``
    and ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``. ``A`` takes a point of the map to
    the frame of the projection: the 3D point ``p`` (Angstrom, map frame) lands at image
    position ``(A @ p)[:2]`` of the centred projection, which integrates along the third
    axis of ``A @ p``. In Fourier space the 2D central slice samples the map's transform at
    ``A.T @ (kx, ky, 0)``.

Origin shifts (``rlnOriginXAngst``/``rlnOriginYAngst``, RELION 3.1+)
    The shift RELION applies to the particle image to centre it: ``centred(r) =
    image(r - origin)``, i.e. the particle's centre lies at ``-origin`` in the image. A model
    projection is made to look like the raw image by translating it by ``-origin``; in
    Fourier space ``F_image(k) = F_centred(k) * exp(+2 pi i k . origin)``.

Fourier transforms
    ``F(k) = sum_r f(r) exp(-2 pi i k . r)`` with ``r`` measured from the centre pixel, i.e.
    ``rfft2(ifftshift(img))``. Frequencies are in 1/Angstrom: ``k = fftfreq(D) / apix``.

CTF (RELION's ``CTF::getCTF``)
    ``CTF(k) = -sin(gamma) `` (times ``scale`` and ``exp(-B |k|^2 / 4)``), with
    ``gamma = pi * lambda * dz * |k|^2 + pi/2 * Cs * lambda^3 * |k|^4 - phase_shift - K3``,
    ``dz = -(dU + dV)/2 - (dU - dV)/2 * cos(2 (alpha - angle))`` (underfocus positive in the
    star file, negative ``dz`` here), ``alpha = atan2(ky, kx)``,
    ``K3 = atan(Q0 / sqrt(1 - Q0^2))`` for amplitude contrast ``Q0`` and electron wavelength
    ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` Angstrom for ``V`` in volts.
    At low frequency the CTF is about ``+Q0``: particles with positive density (RELION's
    extraction with contrast inverted) keep positive density after the CTF.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array or torch tensor


def _xp(a: ArrayLike):
    return torch if isinstance(a, torch.Tensor) else np


def _stack_last(rows: list, xp):
    if xp is torch:
        return torch.stack(rows, dim=-1)
    return np.stack(rows, axis=-1)


def euler_to_matrix(rot: ArrayLike, tilt: ArrayLike, psi: ArrayLike) -> ArrayLike:
    """RELION ZYZ Euler angles (degrees, shape ``(...)``) to matrices ``A`` (``(..., 3, 3)``).

    Works on numpy arrays and torch tensors alike (the result has the input's type).
    """
    xp = _xp(rot)
    if xp is np:
        rot, tilt, psi = (np.asarray(v, dtype=np.float64) for v in (rot, tilt, psi))
    a, b, g = (v * (math.pi / 180.0) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = _stack_last([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], xp)
    row1 = _stack_last([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], xp)
    row2 = _stack_last([sc, ss, cb], xp)
    if xp is torch:
        return torch.stack([row0, row1, row2], dim=-2)
    return np.stack([row0, row1, row2], axis=-2)


def matrix_to_euler(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_to_matrix` (numpy, ``(..., 3, 3)``) -> rot, tilt, psi in degrees.

    Tilt is in [0, 180]; at tilt 0 or 180 (gimbal lock) psi is set to 0 and rot carries the
    whole in-plane angle, as RELION's ``Euler_matrix2angles`` does.
    """
    A = np.asarray(A, dtype=np.float64)
    cos_tilt = np.clip(A[..., 2, 2], -1.0, 1.0)
    sin_tilt = np.sqrt(np.maximum(0.0, A[..., 2, 0] ** 2 + A[..., 2, 1] ** 2))
    tilt = np.arctan2(sin_tilt, cos_tilt)
    regular = sin_tilt > 16 * np.finfo(np.float32).eps
    rot = np.where(regular, np.arctan2(A[..., 2, 1], A[..., 2, 0]), np.arctan2(-A[..., 1, 0], A[..., 1, 1]))
    psi = np.where(regular, np.arctan2(A[..., 1, 2], -A[..., 0, 2]), 0.0)
    deg = 180.0 / math.pi
    return rot * deg, tilt * deg, psi * deg


def angular_distance_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) of ``A @ B.T`` for stacks of rotation matrices ``(..., 3, 3)``.

    ``atan2(sin, cos)`` from the antisymmetric part and the trace: accurate at every angle and
    exactly 0 for identical matrices (``arccos`` of the trace alone gives ~1e-6 deg there)."""
    R = np.einsum("...ij,...kj->...ik", np.asarray(A, float), np.asarray(B, float))
    cos = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    sin = np.linalg.norm(R - np.swapaxes(R, -1, -2), axis=(-2, -1)) / (2.0 * np.sqrt(2.0))
    return np.degrees(np.arctan2(sin, cos))


def electron_wavelength_A(voltage_kv: ArrayLike) -> ArrayLike:
    """Relativistic electron wavelength (Angstrom) for an acceleration voltage in kV."""
    xp = _xp(voltage_kv)
    v = voltage_kv * 1e3
    return 12.2643247 / xp.sqrt(v * (1.0 + v * 0.978466e-6))


def fourier_grid(box: int, apix: float, rfft: bool = True, device=None, dtype=torch.float32):
    """Frequencies ``(ky, kx)`` in 1/Angstrom of a ``box`` x ``box`` image's (r)fft.

    Returns two tensors broadcastable to ``(box, box//2+1)`` (or ``(box, box)`` when
    ``rfft`` is False): ``ky`` of shape ``(box, 1)`` and ``kx`` of shape ``(1, W)``.
    """
    ky = torch.fft.fftfreq(box, d=apix, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box, d=apix, device=device, dtype=dtype) if rfft else ky
    return ky[:, None], kx[None, :]


def ctf_2d(
    ky: torch.Tensor,
    kx: torch.Tensor,
    defocus_u_A: torch.Tensor,
    defocus_v_A: torch.Tensor,
    defocus_angle_deg: torch.Tensor,
    voltage_kv: torch.Tensor,
    cs_mm: torch.Tensor,
    amplitude_contrast: torch.Tensor,
    phase_shift_deg: torch.Tensor | float = 0.0,
    bfactor: torch.Tensor | float = 0.0,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """RELION's CTF on a frequency grid, for a batch of particles.

    ``ky``, ``kx``: frequencies in 1/Angstrom broadcastable to the grid shape ``(H, W)``
    (see :func:`fourier_grid`); per-particle parameters have shape ``(B,)`` (or are
    scalars). Defocus in Angstrom (underfocus positive, as in star files), angles in
    degrees, voltage in kV, Cs in mm. Returns ``(B, H, W)``.
    """
    def col(v):
        v = torch.as_tensor(v, dtype=ky.dtype, device=ky.device)
        return v.reshape(-1, 1, 1)

    du, dv, ang = col(defocus_u_A), col(defocus_v_A), col(defocus_angle_deg)
    lam = electron_wavelength_A(col(voltage_kv))
    cs_A = col(cs_mm) * 1e7
    q0 = col(amplitude_contrast)
    k2 = ky * ky + kx * kx
    alpha = torch.atan2(ky, kx)
    dz = -(du + dv) * 0.5 - (du - dv) * 0.5 * torch.cos(2.0 * (alpha - ang * (math.pi / 180.0)))
    k3 = torch.atan(q0 / torch.sqrt(1.0 - q0 * q0))
    gamma = (math.pi * lam * dz * k2 + (math.pi / 2.0) * cs_A * lam**3 * k2 * k2
             - col(phase_shift_deg) * (math.pi / 180.0) - k3)
    ctf = -torch.sin(gamma) * col(scale)
    bfac = col(bfactor)
    if bool((bfac != 0).any()):
        ctf = ctf * torch.exp(-bfac * k2 / 4.0)
    return ctf


def origin_phase(ky: torch.Tensor, kx: torch.Tensor, origin_x_A: torch.Tensor, origin_y_A: torch.Tensor) -> torch.Tensor:
    """``exp(+2 pi i k . origin)``: the factor that turns a centred projection's transform
    into the raw particle's (see the module docstring). Origins ``(B,)`` in Angstrom;
    returns complex ``(B, H, W)``."""
    ox = torch.as_tensor(origin_x_A, dtype=ky.dtype, device=ky.device).reshape(-1, 1, 1)
    oy = torch.as_tensor(origin_y_A, dtype=ky.dtype, device=ky.device).reshape(-1, 1, 1)
    return torch.polar(torch.ones((), dtype=ky.dtype, device=ky.device), 2.0 * math.pi * (kx * ox + ky * oy))


def image_to_fourier(img: torch.Tensor) -> torch.Tensor:
    """``(..., D, D)`` real images -> ``(..., D, D//2+1)`` transforms with the origin at the
    centre pixel (see the module docstring)."""
    return torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)))


def fourier_to_image(F: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`image_to_fourier`."""
    return torch.fft.fftshift(torch.fft.irfft2(F, s=(box, box)), dim=(-2, -1))
