"""The heterogeneity network: encoder (gradient features -> latent) and decoder (latent ->
changes of the neutral GMM), e2gmm's design with leaky ReLU.

Both are multilayer perceptrons (default 3 hidden layers of 512 units, LeakyReLU 0.2: plain
ReLU networks lose a share of runs to dead units). The decoder outputs, for the ``Nm`` mobile
Gaussians (all, or those inside the focus mask), the changes allowed by ``changes``:

- ``positions``: ``centre = centre0 + pos_scale_A * d`` (Angstrom; ``pos_scale_A`` is a tenth
  of the box edge, so an output of order one is a large domain motion);
- ``amplitudes``: ``amplitude = amplitude0 * (1 + d)`` (relative; 0 removes a Gaussian);
- ``widths``: ``sigma = sigma0 * exp(d)`` (relative, stays positive).

``d = f(z) - f(0)``, and rows whose latent is exactly zero get ``d = 0`` by construction, so
the decoder returns the neutral model EXACTLY at latent 0 (bit for bit). Gaussians outside
the focus mask never change.
"""
from __future__ import annotations

import math

import torch
from torch import nn

CHANGES = ("positions", "amplitudes", "widths")


#: initial posterior width of ``--prior kl``, in prior standard deviations. 1 (the prior): on the
#: simulator's swinging arm (5,000 particles, SNR 0.1, zdim 4) the latents then use 2 dimensions
#: instead of 4 and |Spearman(PC1, truth)| is 0.918 instead of 0.889 with 0.1; the 1AKE hinge is
#: unchanged (0.958 / 0.957). benchmarks/results/science3_init_width.md.
POSTERIOR_INIT_WIDTH = 1.0


def parse_changes(text) -> tuple[str, ...]:
    """``'positions,amplitudes'`` (or a list) -> ordered tuple of known change names."""
    from ..errors import InputError
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    alias = {"position": "positions", "pos": "positions", "p": "positions", "amplitude": "amplitudes",
             "amp": "amplitudes", "a": "amplitudes", "width": "widths", "sigma": "widths", "sigmas": "widths",
             "s": "widths", "w": "widths"}
    items = [alias.get(t, t) for t in items]
    bad = [t for t in items if t not in CHANGES]
    if bad or not items:
        raise InputError(f"--changes {text!r}: give a comma-separated subset of {','.join(CHANGES)}")
    return tuple(c for c in CHANGES if c in items)


def mlp(n_in: int, n_out: int, hidden: int, layers: int, dropout: float = 0.0,
        batchnorm: bool = False) -> nn.Sequential:
    mods, d = [], n_in
    for i in range(layers):
        mods += [nn.Linear(d, hidden), nn.LeakyReLU(0.2)]
        d = hidden
    if batchnorm:
        mods.append(nn.BatchNorm1d(d))
    if dropout > 0:
        mods.append(nn.Dropout(dropout))
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


class Encoder(nn.Module):
    """Normalised gradient features ``(B, F)`` -> latents ``(B, K)``. The output layer starts
    with small weights, so latents start close to (not exactly) zero, as in e2gmm.
    ``variational``: ``(B, 2K)``, the posterior means then log-variances; these start at 0
    (:data:`POSTERIOR_INIT_WIDTH`: every posterior starts as wide as the prior, so the decoder
    first sees latents that carry almost nothing, and information enters the latent space
    gradually, strongest direction first, as the reconstruction pays for it)."""

    def __init__(self, n_features: int, zdim: int, hidden: int = 512, layers: int = 3, dropout: float = 0.0,
                 batchnorm: bool = False, variational: bool = False):
        super().__init__()
        self.net = mlp(n_features, zdim * (2 if variational else 1), hidden, layers, dropout, batchnorm)
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.zero_()
            if variational:
                self.net[-1].bias[zdim:] = 2.0 * math.log(POSTERIOR_INIT_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latents ``(B, K)`` -> changed GMM ``(centres_A (B,N,3), amplitudes (B,N), sigmas_A (B,N))``."""

    def __init__(self, zdim: int, centers_A: torch.Tensor, amplitudes: torch.Tensor, sigmas_A: torch.Tensor,
                 mobile: torch.Tensor, changes=("positions", "amplitudes"), pos_scale_A: float = 10.0,
                 hidden: int = 512, layers: int = 3):
        super().__init__()
        self.zdim, self.changes, self.pos_scale_A = int(zdim), tuple(changes), float(pos_scale_A)
        self.register_buffer("c0", centers_A.detach().clone().float())
        self.register_buffer("a0", amplitudes.detach().clone().float())
        self.register_buffer("s0", sigmas_A.detach().clone().float())
        self.register_buffer("mobile", mobile.detach().clone().long())
        self.n_mobile = int(mobile.numel())
        self.n_out = self.n_mobile * (3 * ("positions" in self.changes) + ("amplitudes" in self.changes)
                                      + ("widths" in self.changes))
        self.net = mlp(zdim, self.n_out, hidden, layers)

    def deltas(self, z: torch.Tensor) -> torch.Tensor:
        """``f(z) - f(0)`` ``(B, n_out)``, exactly zero on rows where ``z`` is exactly zero."""
        zero = torch.zeros(1, z.shape[1], dtype=z.dtype, device=z.device)
        d = self.net(z) - self.net(zero)
        nonzero = (z != 0).any(dim=1, keepdim=True)
        return torch.where(nonzero, d, torch.zeros((), dtype=d.dtype, device=d.device))

    def forward(self, z: torch.Tensor):
        B, m = z.shape[0], self.n_mobile
        d = self.deltas(z)
        c = self.c0.expand(B, -1, -1)
        a = self.a0.expand(B, -1)
        s = self.s0.expand(B, -1)
        o = 0
        if "positions" in self.changes:
            dc = d[:, o:o + 3 * m].reshape(B, m, 3) * self.pos_scale_A
            c = c.index_add(1, self.mobile, dc)
            o += 3 * m
        if "amplitudes" in self.changes:
            a = a.index_add(1, self.mobile, self.a0[self.mobile] * d[:, o:o + m])
            o += m
        if "widths" in self.changes:
            factor = torch.ones(B, s.shape[1], dtype=s.dtype, device=s.device)
            factor = factor.index_copy(1, self.mobile, torch.exp(d[:, o:o + m]))
            s = s * factor
        return c, a, s


class HetModel(nn.Module):
    """Encoder + decoder; ``forward(features) -> (z, (centres, amplitudes, sigmas))``."""

    def __init__(self, n_features: int, zdim: int, centers_A, amplitudes, sigmas_A, mobile, changes,
                 pos_scale_A: float, hidden: int = 512, layers: int = 3, dropout: float = 0.0,
                 batchnorm: bool = False, variational: bool = False):
        super().__init__()
        self.variational = bool(variational)
        self.encoder = Encoder(n_features, zdim, hidden, layers, dropout, batchnorm, self.variational)
        self.decoder = Decoder(zdim, centers_A, amplitudes, sigmas_A, mobile, changes, pos_scale_A, hidden, layers)
        self.kl_terms = None

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, K)`` of features: the posterior means when ``variational``."""
        out = self.encoder(features)
        return out[:, :out.shape[1] // 2] if self.variational else out

    def forward(self, features: torch.Tensor, latent_noise: float = 0.0, generator=None,
                noise: torch.Tensor | None = None):
        """``noise``: standard normal draws ``(B, K)`` to use (scaled by ``latent_noise``) instead
        of drawing them from ``generator`` (training draws a whole global batch's noise once, so
        that splitting the batch into chunks or across processes leaves it unchanged).

        ``variational`` (``--prior kl``): ``z`` is the posterior mean; with ``latent_noise > 0``
        the decoder gets a sample ``z + exp(logvar / 2) * noise`` (the posterior's own width, not
        ``latent_noise``); ``kl_terms`` ``(B,)`` holds KL(posterior || N(0, I)) in nats."""
        out = self.encoder(features)
        logvar = None
        if self.variational:
            z, logvar = out.chunk(2, dim=1)
            logvar = logvar.clamp(-16.0, 4.0)
            self.kl_terms = 0.5 * (z * z + logvar.exp() - 1.0 - logvar).sum(1)
        else:
            z = out
        zn = z
        if latent_noise > 0:
            if noise is None:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            zn = z + (torch.exp(0.5 * logvar) if logvar is not None else latent_noise) * noise
        return z, self.decoder(zn)
