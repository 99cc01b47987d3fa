"""Fourier-ring and Fourier-shell bookkeeping, FRC and FSC, written once.

Rings/shells are indexed by the integer radius ``round(|k| * box)`` in Fourier pixels, on
the grids of :func:`conventions.fourier_grid` (``rfft`` half-plane for images). A shell ``s``
corresponds to the spatial frequency ``s / (box * apix)`` 1/Angstrom, i.e. the resolution
``box * apix / s`` Angstrom. Shell 0 (DC) is never part of a correlation.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..conventions import fourier_grid


def shell_index_2d(box: int, rfft: bool = True, device=None) -> torch.Tensor:
    """Integer ring radius (Fourier pixels) of each coefficient of a box x box image's
    (r)fft, shape ``(box, box//2+1)`` (or ``(box, box)``)."""
    ky, kx = fourier_grid(box, 1.0, rfft=rfft, device=device, dtype=torch.float64)
    return torch.round(torch.sqrt(ky * ky + kx * kx) * box).long()


def shell_index_3d(box: int) -> np.ndarray:
    """Integer shell radius of each coefficient of a box^3 map's ``rfftn``, ``(D, D, D//2+1)``."""
    f = np.fft.fftfreq(box)
    fx = np.fft.rfftfreq(box)
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    return np.round(r * box).astype(np.int64)


def shell_for_resolution(box: int, apix: float, resolution_A: float) -> int:
    """The shell whose frequency is ``1/resolution_A`` (rounded down, at least 1)."""
    return max(1, int(math.floor(box * apix / resolution_A + 1e-9)))  # 1e-9: box*apix rounding


def shell_resolution_A(box: int, apix: float, shells: np.ndarray) -> np.ndarray:
    """Resolution (Angstrom) of shells ``s`` (inf at s = 0)."""
    shells = np.asarray(shells, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return box * apix / shells


LOSSES = ("corr", "frc")


class RingBinner:
    """Sums over Fourier rings of a ``box``-px image's rfft, restricted to a resolution band.

    ``lowres_A``/``highres_A`` bound the rings that take part (e2gmm's FRC range). Ring sums
    are one matrix product with a (pixels x rings) indicator matrix, so a whole batch is
    binned at once on any device.
    """

    def __init__(self, box: int, apix: float, lowres_A: float | None = None, highres_A: float | None = None,
                 device=None, loss: str = "frc"):
        self.box, self.apix = box, apix
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: one of {', '.join(LOSSES)}")
        self.loss = loss
        idx = shell_index_2d(box, device=device)
        lo = 1 if lowres_A is None else max(1, int(math.ceil(box * apix / lowres_A)))
        hi = box // 2 if highres_A is None else min(box // 2, shell_for_resolution(box, apix, highres_A))
        if hi < lo:
            raise ValueError(f"empty ring range: {lowres_A} - {highres_A} A at box {box}, {apix} A/px")
        self.lo, self.hi = lo, hi
        self.n_rings = hi - lo + 1
        keep = (idx >= lo) & (idx <= hi)
        self.pixel_mask = keep  # (H, W) bool
        flat = idx[keep] - lo
        self.flat_index = keep.reshape(-1).nonzero().squeeze(1)
        onehot = torch.zeros(flat.numel(), self.n_rings, device=device)
        onehot[torch.arange(flat.numel(), device=device), flat] = 1.0
        self.onehot = onehot  # (P, R)

    def to(self, device) -> "RingBinner":
        self.pixel_mask = self.pixel_mask.to(device)
        self.flat_index = self.flat_index.to(device)
        self.onehot = self.onehot.to(device)
        return self

    def gather(self, F: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` -> ``(B, P)`` coefficients inside the band."""
        return F.reshape(F.shape[0], -1).index_select(1, self.flat_index)

    def ring_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, P)`` real values inside the band -> ``(B, R)`` sums per ring."""
        return values @ self.onehot.to(values.dtype)

    def frc(self, F1: torch.Tensor, F2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        """Per-ring FRC ``(B, R)`` between two batches of rfft images ``(B, H, W)``."""
        a, b = self.gather(F1), self.gather(F2)
        cross = self.ring_sums((a * b.conj()).real)
        p1 = self.ring_sums(a.real ** 2 + a.imag ** 2)
        p2 = self.ring_sums(b.real ** 2 + b.imag ** 2)
        return cross / torch.sqrt(p1 * p2 + eps)

    def mean_frc(self, F1: torch.Tensor, F2: torch.Tensor) -> torch.Tensor:
        """e2gmm's score: the FRC averaged over the rings of the band, ``(B,)``."""
        return self.frc(F1, F2).mean(dim=1)

    def band_corr(self, F1: torch.Tensor, F2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        """One correlation over every Fourier coefficient of the band, ``(B,)``: the white-noise
        Gaussian likelihood's score (with the best scale, ``-log L = |y|^2 (1 - corr^2) / 2 s^2``),
        which weights each ring by its number of pixels and its signal, unlike the ring average.
        Coefficients stand for themselves and their Hermitian mirror (columns ``0 < kx < D/2``
        count twice)."""
        a, b = self.gather(F1), self.gather(F2)
        w = self._hermitian_weight(a.device)
        cross = ((a * b.conj()).real * w).sum(1)
        p1 = ((a.real ** 2 + a.imag ** 2) * w).sum(1)
        p2 = ((b.real ** 2 + b.imag ** 2) * w).sum(1)
        return cross / torch.sqrt(p1 * p2 + eps)

    def _hermitian_weight(self, device) -> torch.Tensor:
        w = getattr(self, "_hw", None)
        if w is None or w.device != torch.device(device):
            W = self.box // 2 + 1
            col = self.flat_index.to(device) % W
            w = torch.where((col == 0) | (col == W - 1), 1.0, 2.0).to(device)
            self._hw = w
        return w

    def band_dof(self) -> float:
        """Real degrees of freedom of the band (its pixels in the full 2-D spectrum): the ``n``
        of the white-noise log-likelihood with the best scale, ``-(n / 2) log(1 - corr^2)``."""
        return float(self._hermitian_weight(self.flat_index.device).sum())

    def score(self, F1: torch.Tensor, F2: torch.Tensor) -> torch.Tensor:
        """The similarity the training maximises, ``(B,)``: :meth:`band_corr` (``loss = 'corr'``,
        the training default) or :meth:`mean_frc` (``loss = 'frc'``, e2gmm's)."""
        return self.mean_frc(F1, F2) if self.loss == "frc" else self.band_corr(F1, F2)


def fsc(map1: np.ndarray, map2: np.ndarray) -> np.ndarray:
    """FSC between two maps of the same cubic box, per shell 0..D//2 (shell 0 set to 1)."""
    if map1.shape != map2.shape or len(set(map1.shape)) != 1:
        raise ValueError(f"FSC needs two cubic maps of one size, got {map1.shape} and {map2.shape}")
    box = map1.shape[0]
    F1 = np.fft.rfftn(np.asarray(map1, dtype=np.float64))
    F2 = np.fft.rfftn(np.asarray(map2, dtype=np.float64))
    idx = shell_index_3d(box).ravel()
    n = box // 2 + 1
    keep = idx < n
    idx = idx[keep]
    a, b = F1.ravel()[keep], F2.ravel()[keep]
    cross = np.bincount(idx, weights=(a * b.conj()).real, minlength=n)
    p1 = np.bincount(idx, weights=np.abs(a) ** 2, minlength=n)
    p2 = np.bincount(idx, weights=np.abs(b) ** 2, minlength=n)
    curve = cross / np.sqrt(np.maximum(p1 * p2, 1e-30))
    curve[0] = 1.0
    return curve


def fsc_table(map1: np.ndarray, map2: np.ndarray, apix: float) -> dict[str, np.ndarray]:
    """FSC with its axes: ``shell``, ``freq_invA`` (1/Angstrom), ``resolution_A``, ``fsc``."""
    curve = fsc(map1, map2)
    box = map1.shape[0]
    shells = np.arange(curve.size)
    return {"shell": shells, "freq_invA": shells / (box * apix),
            "resolution_A": shell_resolution_A(box, apix, shells), "fsc": curve}


def resolution_at_threshold(freq_invA: np.ndarray, curve: np.ndarray, threshold: float) -> float:
    """Resolution (Angstrom) where ``curve`` first drops below ``threshold`` (linear
    interpolation between shells); the Nyquist resolution if it never does."""
    freq_invA, curve = np.asarray(freq_invA), np.asarray(curve)
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        return float(1.0 / freq_invA[-1])
    i = below[0] + 1
    f0, f1, c0, c1 = freq_invA[i - 1], freq_invA[i], curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    return float(1.0 / f) if f > 0 else float("inf")


def lowpass_map(vol: np.ndarray, apix: float, resolution_A: float, edge_shells: float = 2.0) -> np.ndarray:
    """Low-pass filter a map to ``resolution_A`` with a raised-cosine edge ``edge_shells`` wide."""
    box = vol.shape[0]
    F = np.fft.rfftn(vol)
    f = np.fft.fftfreq(box, d=apix)
    fx = np.fft.rfftfreq(box, d=apix)
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    cutoff = 1.0 / resolution_A
    width = edge_shells / (box * apix)
    w = np.clip((cutoff + width / 2 - r) / width, 0.0, 1.0)
    w = 0.5 - 0.5 * np.cos(np.pi * w)
    return np.fft.irfftn(F * w, s=vol.shape, axes=(-3, -2, -1)).astype(np.float32)
