"""Projections of a batch of particle GMMs at many candidate poses near their current poses.

The pose search of :mod:`refine` scores ~100 candidate poses per particle. Every candidate of
one particle shares the particle's Gaussians, their widths and amplitudes, its CTF and its
origin; only the image positions of the Gaussians change. :class:`PoseProjector` therefore
computes once per batch what :func:`gmm.project` recomputes per call (the Gaussian envelopes
``exp(-2 pi^2 sigma^2 k^2)`` times the Fourier weights, and the ring range), and for each
candidate only the phases and one real matrix product of the separable form (see
:mod:`gmm`): ``(2M, N) @ (N, 2M)`` with ``M`` the frequencies up to the highest ring that is
scored (``max_ring``), not up to Nyquist. Results equal :func:`gmm.project` at every pixel up
to ring ``max_ring`` (and along the rows/columns past it up to ``M``; zero beyond).

Conventions as :func:`gmm.project`: RELION rotation matrices, origins in Angstrom, the rfft
layout of :func:`conventions.image_to_fourier`. Candidate rotations ``R(delta) @ A_cur`` act on
the Gaussians already rotated into the current view frame (``y = A_cur c``), so a candidate is
the matrix ``R(delta)`` (``(3, 3)``) and a shift (pixels) added to the current origin.
"""
from __future__ import annotations

import math

import torch

from ..model.gmm import projection_weights


class PoseProjector:
    """Candidate projections of ``B`` particles' GMMs (no autograd; float32 on the particles'
    device).

    ``centers_view_A`` ``(B, N, 3)``: Gaussian centres in the current view frame
    (``A_cur @ c``, Angstrom); ``amplitudes``/``sigmas_A`` ``(B, N)``; ``origins_A`` ``(B, 2)``
    current RELION origins; ``ctf`` ``(B, D, D//2+1)`` or None; ``max_ring``: the highest
    Fourier ring (pixels) that the score reads (default Nyquist). ``band_index``: flat indices
    into ``(D, D//2+1)`` of the pixels the score reads (:attr:`fourier.RingBinner.flat_index`,
    all within ``max_ring``): :meth:`project` then returns only those coefficients.

    ``layers`` ``(n_low, n_fine, tau_A)``: the Gaussians are a layered reference
    (:class:`fine_reference.WarpedModels`): ``n_low`` low-passed ones, ``n_fine`` fine ones,
    then the same ``n_fine`` low-passed by ``exp(-2 pi^2 tau^2 k^2)`` with negative amplitudes.
    Such a copy's projection is the fine one's times that low-pass at every pixel, so it is not
    projected: the fine layer's projection is multiplied by ``1 - L`` (``L`` is separable in
    ``kx``, ``ky``: one ``(2M, 2M)`` factor on the separable product). Same result, the phases
    and products of ``n_low + n_fine`` Gaussians instead of ``n_low + 2 n_fine``.
    """

    def __init__(self, centers_view_A: torch.Tensor, amplitudes: torch.Tensor, sigmas_A: torch.Tensor,
                 box: int, apix: float, origins_A: torch.Tensor, ctf: torch.Tensor | None = None,
                 max_ring: int | None = None, band_index: torch.Tensor | None = None,
                 layers: tuple[int, int, float] | None = None):
        self.box, self.apix = box, apix
        self.split, self.highpass = None, None
        if layers is not None:
            n_low, n_fine, _ = layers
            if n_low + 2 * n_fine != centers_view_A.shape[1]:
                raise ValueError(f"PoseProjector: layers {layers} do not add up to {centers_view_A.shape[1]} Gaussians")
            keep = n_low + n_fine  # the negative low-passed copies are applied as a filter
            centers_view_A, amplitudes, sigmas_A = centers_view_A[:, :keep], amplitudes[:, :keep], sigmas_A[:, :keep]
            self.split = n_low
        self.y = centers_view_A.float()
        dev = self.y.device
        self.B, self.N = self.y.shape[0], self.y.shape[1]
        M = min(box // 2, box // 2 if max_ring is None else int(max_ring)) + 1
        self.M = M
        k = torch.arange(M, dtype=torch.float32, device=dev) / (box * apix)  # |ky| = kx, 1/A
        self.k2pi = (2.0 * math.pi) * k
        sig = sigmas_A.float()
        env = torch.exp(-(2.0 * math.pi ** 2) * sig[:, None, :] ** 2 * (k * k)[None, :, None])  # (B, M, N)
        w = projection_weights(amplitudes.float(), sig, apix)[:, None, :]
        self.env_x = torch.cat([env, env], dim=1).contiguous()  # (B, 2M, N) for [cos; sin]
        self.env_y = self.env_x * w
        if layers is not None:
            low = torch.exp(-(2.0 * math.pi ** 2) * float(layers[2]) ** 2 * k * k)  # (M,) L along one axis
            low2 = torch.cat([low, low])  # rows/columns [cos; sin]
            self.highpass = (1.0 - low2[:, None] * low2[None, :]).contiguous()  # (2M, 2M): 1 - L(ky) L(kx)
        self.origins_A = origins_A.float()
        self.ctf = ctf
        self._bufs: dict[str, torch.Tensor] = {}
        m = torch.round(torch.fft.fftfreq(box, device=dev, dtype=torch.float64) * box).long()
        self.rows = (m.abs() < M).nonzero().squeeze(1)  # fft rows holding |ky| < M
        self.row_a = m[self.rows].abs()
        self.row_plus = (m[self.rows] >= 0)[None, :, None]
        self.band = None
        if band_index is not None:
            W = box // 2 + 1
            pos_of_row = torch.full((box,), -1, dtype=torch.long, device=dev)
            pos_of_row[self.rows] = torch.arange(len(self.rows), device=dev)
            r, c = band_index // W, band_index % W
            if bool((pos_of_row[r] < 0).any() or (c >= M).any()):
                raise ValueError("PoseProjector: band pixels beyond max_ring")
            self.band = pos_of_row[r] * M + c  # into the compact (rows, M) layout
            if ctf is not None:
                self.ctf = ctf.reshape(ctf.shape[0], -1)[:, band_index]

    def elements_per_candidate(self) -> int:
        """Floats of work memory one candidate needs (for chunking)."""
        return 4 * self.M * self.N + 4 * self.M * self.M + self.box * (self.box // 2 + 1) * 2

    def project(self, b0: int, b1: int, rotations: torch.Tensor, shifts_px: torch.Tensor | None) -> torch.Tensor:
        """Particles ``b0:b1``, ``C`` candidates each: ``rotations`` ``(b, C, 3, 3)`` (``R(delta)``,
        applied in the view frame), ``shifts_px`` ``(b, C, 2)`` origin changes (pixels) or None.
        Returns the rfft transforms ``(b * C, D, D//2+1)``, particle-major (with ``band_index``:
        the band's coefficients ``(b * C, n_band)``)."""
        b, C = rotations.shape[0], rotations.shape[1]
        M = self.M
        pos = torch.einsum("bcij,bnj->bcin", rotations[:, :, :2, :].float(), self.y[b0:b1])  # (b, C, 2, N)
        org = self.origins_A[b0:b1, None, :].expand(b, C, 2)
        if shifts_px is not None:
            org = org + shifts_px.float() * self.apix
        pos = pos - org[..., None]
        Y = self._trig(pos[:, :, 1:2, :], self.env_y[b0:b1], "Y")
        X = self._trig(pos[:, :, 0:1, :], self.env_x[b0:b1], "X")
        if self.split is None:
            P = torch.matmul(Y, X.transpose(-1, -2))
        else:  # layered: low layer as is, fine layer times (1 - L)
            s = self.split
            P = torch.matmul(Y[..., s:], X[..., s:].transpose(-1, -2)).mul_(self.highpass)
            if s > 0:
                P += torch.matmul(Y[..., :s], X[..., :s].transpose(-1, -2))
        P = P.reshape(b * C, 2 * M, 2 * M)
        cc, cs, sc, ss = P[:, :M, :M], P[:, :M, M:], P[:, M:, :M], P[:, M:, M:]
        a, plus = self.row_a, self.row_plus
        re = torch.where(plus, (cc - ss)[:, a], (cc + ss)[:, a])
        im = torch.where(plus, -(cs + sc)[:, a], (sc - cs)[:, a])
        if self.band is not None:
            F = torch.complex(re, im).reshape(b * C, -1)[:, self.band]
            if self.ctf is not None:
                F = (F.reshape(b, C, -1) * self.ctf[b0:b1, None]).reshape(b * C, -1)
            return F
        D, W = self.box, self.box // 2 + 1
        F = torch.zeros(b * C, D, W, dtype=torch.complex64, device=P.device)
        F[:, self.rows, :M] = torch.complex(re, im)
        if self.ctf is not None:
            F = (F.reshape(b, C, D, W) * self.ctf[b0:b1, None]).reshape(b * C, D, W)
        return F

    def _buffer(self, name: str, shape) -> torch.Tensor:
        """A work buffer reused across calls (large temporaries cost page faults on the CPU)."""
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=self.y.device)
            self._bufs[name] = buf
        return buf[:n].view(shape)

    def _trig(self, coord: torch.Tensor, env: torch.Tensor, name: str) -> torch.Tensor:
        """``[cos; sin](2 pi k coord) * env``: coord ``(b, C, 1, N)`` Angstrom, env ``(b, 2M, N)``
        -> ``(b, C, 2M, N)``, written in place into a reused buffer ``name``."""
        M = self.M
        b, C, _, N = coord.shape
        theta = self._buffer("theta", (b, C, M, N))
        torch.mul(coord, self.k2pi[:, None], out=theta)
        out = self._buffer(name, (b, C, 2 * M, N))
        torch.cos(theta, out=out[:, :, :M])
        torch.sin(theta, out=out[:, :, M:])
        out.mul_(env[:, None])
        return out
