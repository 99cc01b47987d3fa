"""Tests of the training's similarity (band correlation vs ring FRC), variational latents (KL
prior), effective dimension, early stopping and the data-driven band."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.conventions import image_to_fourier
from scipion_gmmhet.engine.model.fourier import RingBinner, shell_index_2d
from scipion_gmmhet.engine.model.networks import POSTERIOR_INIT_WIDTH, HetModel
from scipion_gmmhet.engine.training.trained import effective_dimension


def test_band_corr_is_the_full_plane_correlation_of_the_band():
    """For real images, the half-plane weighted sum equals the correlation over every Fourier
    coefficient (full plane) inside the band."""
    rng = np.random.default_rng(0)
    box, apix = 32, 2.0
    a = rng.normal(size=(3, box, box)).astype(np.float32)
    b = (0.5 * a + rng.normal(size=a.shape)).astype(np.float32)
    binner = RingBinner(box, apix, 40.0, 6.0, loss="corr")
    Fa, Fb = image_to_fourier(torch.as_tensor(a)), image_to_fourier(torch.as_tensor(b))
    got = binner.band_corr(Fa, Fb).numpy()
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    k = np.fft.fftfreq(box) * box
    r = np.rint(np.sqrt(k[:, None] ** 2 + k[None, :] ** 2))
    sel = (r >= binner.lo) & (r <= binner.hi)
    # the rfft's last column (kx = -D/2 = D/2) is counted once: drop kx = -D/2 from the full plane too
    sel &= ~(np.abs(k[None, :]) == box // 2)
    want = [np.real(np.sum(fa[i][sel] * np.conj(fb[i][sel]))) /
            np.sqrt(np.sum(np.abs(fa[i][sel]) ** 2) * np.sum(np.abs(fb[i][sel]) ** 2)) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert binner.score(Fa, Fb).shape == (3,)
    frc = RingBinner(box, apix, 40.0, 6.0, loss="frc")
    np.testing.assert_allclose(frc.score(Fa, Fb).numpy(), frc.mean_frc(Fa, Fb).numpy())
    with pytest.raises(ValueError):
        RingBinner(box, apix, loss="l1")
    assert shell_index_2d(box).shape[0] == box


def _model(variational, zdim=3):
    c = torch.randn(20, 3) * 5
    return HetModel(16, zdim, c, torch.ones(20), torch.full((20,), 3.0), torch.arange(20), ("positions",), 5.0,
                    hidden=32, layers=2, variational=variational)


def test_variational_latents_and_kl():
    torch.manual_seed(0)
    m = _model(True)
    x = torch.randn(8, 16)
    z = m.encode(x)
    assert z.shape == (8, 3)
    z2, _ = m(x)
    torch.testing.assert_close(z, z2)
    assert m.kl_terms.shape == (8,) and (m.kl_terms >= 0).all()
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * sum(mu^2 + s^2 - 1 - log s^2); initial s ~ POSTERIOR_INIT_WIDTH (1)
    mu, logvar = m.encoder(x).detach().chunk(2, dim=1)
    want = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(m.kl_terms.detach(), want, rtol=1e-5, atol=1e-5)
    assert abs(float(logvar.mean()) - 2 * math.log(POSTERIOR_INIT_WIDTH)) < 0.5
    # sampling uses the posterior width, not latent_noise: same noise, same decoded sample
    noise = torch.randn(8, 3)
    (_, (c1, _, _)), (_, (c2, _, _)) = m(x, 0.05, noise=noise), m(x, 0.5, noise=noise)
    torch.testing.assert_close(c1, c2)
    l2 = _model(False)
    assert l2.encode(x).shape == (8, 3) and not l2.variational


def test_effective_dimension_counts_directions_with_signal():
    rng = np.random.default_rng(1)
    t = rng.uniform(-1, 1, 2000)
    z = np.stack([t, 0.5 * t, 0.01 * rng.normal(size=2000), 0.005 * rng.normal(size=2000)], 1)
    e = effective_dimension(z, "kl")
    assert e["effective_dim"] == 1 and len(e["latent_pc_variance"]) == 4 and e["threshold"] == 0.01
    z[:, 2] = 0.3 * rng.normal(size=2000)
    assert effective_dimension(z, "kl")["effective_dim"] == 2
    assert effective_dimension(z, "l2")["effective_dim"] == 2
    assert effective_dimension(np.zeros((1, 4)), "kl")["effective_dim"] == 0


def test_band_runs_to_the_last_ring_where_the_particles_carry_signal_together():
    """The likelihood band ends where the mean FRC of n particles drops below 3 standard errors
    (3 / sqrt(pi k n)), past where one particle's FRC meets its own noise level; e2gmm's
    ring-FRC rule stops where one particle's FRC falls below min(0.5, 0.6 x peak)."""
    from scipion_gmmhet.engine.training.config import band_last_ring

    rings = np.arange(1, 33)
    curve = 0.9 * np.exp(-((rings / 9.0) ** 2))  # signal fading with resolution
    n = 512
    last, rule = band_last_ring(curve, 1, n, "corr")
    threshold = 3.0 / np.sqrt(np.pi * rings * n)
    assert np.all(curve[:last] >= threshold[:last]) and curve[last] < threshold[last]
    assert "3 standard errors" in rule
    one_particle = np.nonzero(curve < 1.0 / np.sqrt(2 * np.pi * rings))[0][0]
    assert last > one_particle  # weak rings still add information to the likelihood
    # fewer particles: less certainty that a weak ring holds signal -> a coarser band
    assert band_last_ring(curve, 1, 16, "corr")[0] < last
    last_frc, _ = band_last_ring(curve, 1, n, "frc")
    assert curve[last_frc - 1] >= 0.5 and curve[last_frc] < 0.5
    # pure noise: the band keeps its minimum of 3 rings above the low-resolution limit
    assert band_last_ring(np.zeros(32), 2, n, "corr")[0] == 4
