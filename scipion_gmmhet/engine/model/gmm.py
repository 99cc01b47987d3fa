"""The 3D Gaussian mixture: its units, its file, rendering to a map and batched projection.

Units (stated once, used everywhere): Gaussian centres in Angstrom, in the map frame, relative
to the map's centre voxel ``D//2`` (see :mod:`conventions`), ordered ``(x, y, z)``; widths
``sigma`` in Angstrom; amplitudes are peak densities in the map's units. Gaussian ``j`` is

    rho_j(r) = amplitude_j * exp(-|r - centre_j|^2 / (2 sigma_j^2)).

A rendered map holds ``sum_j rho_j`` sampled at voxel centres; a projection is that map summed
along the viewing axis (voxel sums, as ``relion_project`` does), so the DFT of a projection is,
in the continuum limit (sigma >~ 1 px),

    F(k) = sum_j amplitude_j (2 pi)^(3/2) (sigma_j/apix)^3 exp(-2 pi^2 sigma_j^2 |k|^2)
           exp(-2 pi i k . c'_j),

with ``c'_j = (A @ centre_j)[:2] - origin`` the Gaussian's position in the raw image. Each term
factors into a ``ky`` vector times a ``kx`` vector, so a batch of B projections of N Gaussians is
one batched complex matrix product ``(B, H, N) @ (B, N, W)``: the separable form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..conventions import fourier_grid

GMM_FILE_VERSION = 1


@dataclass
class GMM:
    """A Gaussian mixture in a map frame of ``box`` voxels of ``apix`` Angstrom.

    ``centers_A`` ``(N, 3)`` xyz Angstrom from the box centre, ``sigmas_A`` ``(N,)`` Angstrom,
    ``amplitudes`` ``(N,)`` peak density. Arrays are numpy float32.
    """

    centers_A: np.ndarray
    amplitudes: np.ndarray
    sigmas_A: np.ndarray
    box: int
    apix: float
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.centers_A = np.asarray(self.centers_A, dtype=np.float32).reshape(-1, 3)
        self.amplitudes = np.asarray(self.amplitudes, dtype=np.float32).reshape(-1)
        self.sigmas_A = np.asarray(self.sigmas_A, dtype=np.float32).reshape(-1)
        n = self.centers_A.shape[0]
        if self.amplitudes.shape[0] != n or self.sigmas_A.shape[0] != n:
            raise ValueError("centers, amplitudes and sigmas must have one entry per Gaussian")
        self.box, self.apix = int(self.box), float(self.apix)

    def __len__(self) -> int:
        return self.centers_A.shape[0]

    def save(self, path: str) -> None:
        """Write the documented ``gmm.npz`` (atomically)."""
        from ..io.atomic import atomic_write  # InputError on a full disk; no half-written file or stray .tmp

        atomic_write(path, lambda tmp: np.savez(
            tmp, version=GMM_FILE_VERSION, centers_A=self.centers_A, amplitudes=self.amplitudes,
            sigmas_A=self.sigmas_A, box=self.box, apix=self.apix,
            info_keys=np.array(list(self.info.keys()), dtype=str),
            info_values=np.array([str(v) for v in self.info.values()], dtype=str),
            units=np.array("centers_A: Angstrom xyz from the centre voxel D//2; sigmas_A: Angstrom; "
                           "amplitudes: peak density")), suffix=".tmp.npz")

    @classmethod
    def load(cls, path: str) -> "GMM":
        with np.load(path) as z:
            info = dict(zip(z["info_keys"].tolist(), z["info_values"].tolist())) if "info_keys" in z else {}
            return cls(z["centers_A"], z["amplitudes"], z["sigmas_A"], int(z["box"]), float(z["apix"]), info)

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(centers_A, amplitudes, sigmas_A)`` as float32 tensors."""
        return (torch.as_tensor(self.centers_A, device=device), torch.as_tensor(self.amplitudes, device=device),
                torch.as_tensor(self.sigmas_A, device=device))

    def render(self, box: int | None = None, apix: float | None = None) -> np.ndarray:
        """The map ``(D, D, D)`` [z, y, x] at any box and pixel size (default: the model's)."""
        c, a, s = self.tensors()
        return render_map(c, a, s, box or self.box, apix or self.apix).numpy()


def _axis_gaussians(coord_A: torch.Tensor, sigmas_A: torch.Tensor, box: int, apix: float) -> torch.Tensor:
    """``exp(-(t - c)^2 / (2 s^2))`` on the voxel centres of one axis: ``(..., N)`` -> ``(..., D, N)``."""
    t = (torch.arange(box, dtype=coord_A.dtype, device=coord_A.device) - box // 2) * apix
    d = t[:, None] - coord_A[..., None, :]
    return torch.exp(-d * d / (2.0 * sigmas_A[..., None, :] ** 2))


def render_map(centers_A: torch.Tensor, amplitudes: torch.Tensor, sigmas_A: torch.Tensor, box: int,
               apix: float, chunk_voxels: int = 1 << 24) -> torch.Tensor:
    """Render Gaussians ``(N, 3)``, ``(N,)``, ``(N,)`` to a ``(D, D, D)`` map, separably in real
    space (exact Gaussian values at voxel centres; a matrix product per z-slab)."""
    gx = _axis_gaussians(centers_A[:, 0], sigmas_A, box, apix)  # (D, N)
    gy = _axis_gaussians(centers_A[:, 1], sigmas_A, box, apix)
    gz = _axis_gaussians(centers_A[:, 2], sigmas_A, box, apix) * amplitudes
    n = centers_A.shape[0]
    out = torch.empty(box, box, box, dtype=centers_A.dtype, device=centers_A.device)
    step = max(1, chunk_voxels // max(1, box * n))
    for z0 in range(0, box, step):
        slab = gz[z0:z0 + step, None, :] * gy[None, :, :]  # (z, D, N)
        out[z0:z0 + step] = (slab.reshape(-1, n) @ gx.T).reshape(-1, box, box)
    return out


def projection_weights(amplitudes: torch.Tensor, sigmas_A: torch.Tensor, apix: float) -> torch.Tensor:
    """Fourier weight of each Gaussian's projection: ``amplitude (2 pi)^1.5 (sigma/apix)^3``."""
    return amplitudes * (2.0 * math.pi) ** 1.5 * (sigmas_A / apix) ** 3


def project(centers_A: torch.Tensor, amplitudes: torch.Tensor, sigmas_A: torch.Tensor,
            rotations: torch.Tensor, box: int, apix: float, origins_A: torch.Tensor | None = None,
            ctf: torch.Tensor | None = None, precision: str | None = None) -> torch.Tensor:
    """Batched projections of a GMM directly in Fourier space (separable form).

    centers_A ``(N, 3)`` or per-particle ``(B, N, 3)``; amplitudes, sigmas_A ``(N,)`` or
    ``(B, N)``; rotations ``(B, 3, 3)`` RELION matrices; origins_A ``(B, 2)`` RELION origin
    shifts (Angstrom) or None; ctf ``(B, D, D//2+1)`` or None. Returns the complex rfft of the
    raw-particle-like images, ``(B, D, D//2+1)``, in the convention of
    :func:`conventions.image_to_fourier`. Differentiable in every input.

    The complex product ``(B, H, N) @ (B, N, W)`` is done in real arithmetic on the
    non-negative frequencies only: with ``Y = [cos; sin](2 pi |ky| y_j)`` and
    ``X = [cos; sin](2 pi kx x_j)`` (Gaussian envelopes folded in), one real ``bmm`` gives
    ``cc, cs, sc, ss`` blocks from which both ``+ky`` and ``-ky`` rows follow
    (``exp(-2 pi i (-ky) y)`` is the conjugate of ``exp(-2 pi i ky y)``). No complex
    exponentials are formed and half the ``ky`` rows are computed: about 1.5-2x faster than the
    direct complex product on CPU, and real matrices run on GPU tensor cores.

    ``precision`` of the matrix product only (:func:`projection_precision`): ``"fp32"``,
    ``"bf16"`` or ``"fp16"``; None follows an enclosing ``torch.autocast`` (fp32 outside one).
    Positions, phases and envelopes are always float32 (a bf16 phase ``2 pi k x`` would be off by
    up to ~1 rad); ``Y`` and ``X`` are cast to the low precision after scaling each particle's
    matrix to a largest entry of 1, the product accumulates in float32 and the result is
    float32 (complex64). With that scaling a float16 product cannot overflow (|entries| <= 1,
    at most :data:`FP16_MAX_GAUSSIANS` terms per sum); more Gaussians fall back to float32.
    """
    low = projection_precision(precision, rotations.device)
    if low is not None or torch.is_autocast_enabled() or _cpu_autocast_enabled():
        with _no_autocast(rotations.device):
            return _project(centers_A.float(), amplitudes.float(), sigmas_A.float(), rotations.float(), box, apix,
                            None if origins_A is None else origins_A.float(), None if ctf is None else ctf.float(),
                            low)
    return _project(centers_A, amplitudes, sigmas_A, rotations, box, apix, origins_A, ctf, None)


FP16_MAX_GAUSSIANS = 32768  # N unit-bounded products stay below float16's 65504
PRECISIONS = ("fp32", "bf16", "fp16")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
_fallback_logged: set = set()


def _cpu_autocast_enabled() -> bool:
    try:
        return bool(torch.is_autocast_enabled("cpu"))
    except TypeError:  # torch < 2.4
        return bool(torch.is_autocast_cpu_enabled())


def _autocast_dtype(device_type: str):
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _no_autocast(device: torch.device):
    return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False)


def projection_precision(precision: str | None, device) -> torch.dtype | None:
    """The dtype of :func:`project`'s matrix product: None for float32, else bfloat16/float16.

    ``precision`` None follows an active ``torch.autocast`` on ``device`` (so a model run
    under autocast projects with its dtype, safely); "fp32"/"off" is float32; "bf16"/"fp16".
    """
    device = torch.device(device)
    if precision is None:
        enabled = _cpu_autocast_enabled() if device.type == "cpu" else torch.is_autocast_enabled()
        if not enabled:
            return None
        dt = _autocast_dtype(device.type)
        return dt if dt in (torch.bfloat16, torch.float16) else None
    key = str(precision).lower()
    if key in ("fp32", "off", "float32"):
        return None
    if key not in _LOW:
        raise ValueError(f"projection precision {precision!r}: give one of {', '.join(PRECISIONS)}")
    return _LOW[key]


def _low_bmm(Y: torch.Tensor, X: torch.Tensor, low: torch.dtype) -> torch.Tensor:
    """``Y @ X^T`` ``(B, R, N) x (B, C, N)`` with bf16/fp16 inputs, float32 accumulation and a
    float32 result: each particle's ``Y`` and ``X`` are scaled to a largest |entry| of 1 (on the
    device, no host synchronisation) and the scales multiplied back in float32."""
    n = Y.shape[-1]
    if low == torch.float16 and n > FP16_MAX_GAUSSIANS:
        if "fp16" not in _fallback_logged:
            _fallback_logged.add("fp16")
            import logging
            logging.getLogger(__name__).warning(
                "fp16 projection of %d Gaussians could overflow float16 (limit %d): projecting in float32",
                n, FP16_MAX_GAUSSIANS)
        return torch.bmm(Y, X.transpose(1, 2))
    tiny = torch.finfo(torch.float32).tiny
    sy = Y.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(tiny)  # constants: exact gradients
    sx = X.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(tiny)
    Yl, Xl = (Y / sy).to(low), (X / sx).to(low)
    if Y.device.type == "cuda":  # cuBLAS accumulates in float32; out_dtype keeps the float32 result
        try:
            P = torch.bmm(Yl, Xl.transpose(1, 2), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            P = torch.bmm(Yl, Xl.transpose(1, 2)).float()
    else:  # the CPU kernels accumulate in float32 as well and round the output once
        P = torch.bmm(Yl, Xl.transpose(1, 2)).float()
    return P * (sy * sx)


def _project(centers_A, amplitudes, sigmas_A, rotations, box, apix, origins_A, ctf, low):
    """:func:`project` in float32 geometry; ``low``: dtype of the product (None: float32)."""
    dtype = rotations.dtype
    eq = "bij,nj->bin" if centers_A.dim() == 2 else "bij,bnj->bin"
    pos = torch.einsum(eq, rotations[:, :2, :], centers_A)  # (B, 2, N): image x, y in Angstrom
    if origins_A is not None:
        pos = pos - origins_A[:, :, None]
    M = box // 2 + 1
    k = torch.arange(M, dtype=dtype, device=rotations.device) / (box * apix)  # |ky| = kx (1/A)
    w = projection_weights(amplitudes, sigmas_A, apix)  # (N,) or (B, N)
    env = torch.exp(-(2.0 * math.pi ** 2) * sigmas_A[..., None, :] ** 2 * (k * k)[:, None])  # (.., M, N)
    ty = (2.0 * math.pi) * k[None, :, None] * pos[:, 1:2, :]  # (B, M, N)
    tx = (2.0 * math.pi) * k[None, :, None] * pos[:, 0:1, :]
    env_w = env * w[..., None, :]
    Y = torch.cat([torch.cos(ty) * env_w, torch.sin(ty) * env_w], dim=1)  # (B, 2M, N)
    X = torch.cat([torch.cos(tx) * env, torch.sin(tx) * env], dim=1)  # (B, 2M, N)
    P = torch.bmm(Y, X.transpose(1, 2)) if low is None else _low_bmm(Y, X, low)  # (B, 2M, 2M)
    cc, cs, sc, ss = P[:, :M, :M], P[:, :M, M:], P[:, M:, :M], P[:, M:, M:]
    m = torch.round(torch.fft.fftfreq(box, device=rotations.device, dtype=torch.float64) * box).long()
    a, plus = m.abs(), (m >= 0)[None, :, None]  # fft row i holds ky = m_i / (box apix)
    re = torch.where(plus, (cc - ss)[:, a], (cc + ss)[:, a])
    im = torch.where(plus, -(cs + sc)[:, a], (sc - cs)[:, a])
    F = torch.complex(re, im)
    if ctf is not None:
        F = F * ctf
    return F


def project_naive(centers_A: torch.Tensor, amplitudes: torch.Tensor, sigmas_A: torch.Tensor,
                  rotations: torch.Tensor, box: int, apix: float, origins_A: torch.Tensor | None = None,
                  ctf: torch.Tensor | None = None) -> torch.Tensor:
    """Reference implementation of :func:`project` without the separable factorisation: every
    Gaussian's term is evaluated on the full 2D frequency grid and summed, ``O(B N H W)`` memory
    traffic. Used by tests and the speed benchmark only."""
    B = rotations.shape[0]
    pos = torch.einsum("bij,nj->bni", rotations[:, :2, :], centers_A) if centers_A.dim() == 2 else \
        torch.einsum("bij,bnj->bni", rotations[:, :2, :], centers_A)
    if origins_A is not None:
        pos = pos - origins_A[:, None, :]
    amplitudes = amplitudes.expand(B, -1) if amplitudes.dim() == 1 else amplitudes
    sigmas_A = sigmas_A.expand(B, -1) if sigmas_A.dim() == 1 else sigmas_A
    w = projection_weights(amplitudes, sigmas_A, apix)
    ky, kx = fourier_grid(box, apix, rfft=True, device=rotations.device, dtype=rotations.dtype)
    k2 = ky * ky + kx * kx  # (H, W)
    F = torch.zeros(B, ky.shape[0], kx.shape[1], dtype=torch.complex64 if rotations.dtype == torch.float32
                    else torch.complex128, device=rotations.device)
    for j in range(pos.shape[1]):
        mag = w[:, j, None, None] * torch.exp(-2.0 * math.pi ** 2 * sigmas_A[:, j, None, None] ** 2 * k2)
        phase = -2.0 * math.pi * (kx * pos[:, j, 0, None, None] + ky * pos[:, j, 1, None, None])
        F = F + torch.polar(mag, phase)
    if ctf is not None:
        F = F * ctf
    return F
