"""Tests of engine/training/warm_start.py: the finer model's network fitted to the first one
(decoded motions carried to the fine Gaussians, encoder mapped to the first latents)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.model.networks import HetModel
from scipion_gmmhet.engine.training.warm_start import CarriedMoves, distill, posterior_logvar_target

BOX, APIX = 32, 2.0


class _LinearFirst:
    """A stand-in first network: the coarse Gaussians move by ``z[0] x shift`` (Angstrom, rigid)
    and their amplitudes scale by ``1 + 0.2 z[1]``."""

    def __init__(self, neutral: GMM, shift=(3.0, -1.0, 0.5)):
        self.neutral, self.device = neutral, torch.device("cpu")
        self.shift = torch.tensor(shift)

    def decode(self, z):
        c0, a0, s0 = self.neutral.tensors(self.device)
        z = torch.as_tensor(z, dtype=torch.float32)
        c = c0[None] + z[:, :1, None] * self.shift
        a = a0[None] * (1.0 + 0.2 * z[:, 1:2])
        return c, a, s0[None].expand(len(z), -1)


def _blob(n: int, seed: int, radius_A: float = 12.0) -> GMM:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, 3)) * radius_A / 2
    return GMM(c.astype(np.float32), np.ones(n, np.float32), np.full(n, 3.0, np.float32), BOX, APIX, {})


def test_carried_moves_give_every_fine_gaussian_the_coarse_rigid_move_and_amplitude_change():
    coarse, fine = _blob(60, 1), _blob(200, 2, radius_A=8.0)  # fine Gaussians inside the coarse cloud
    first = _LinearFirst(coarse)
    mobile = torch.arange(0, 200, 2)  # a focus: every other fine Gaussian
    carried = CarriedMoves(first, torch.as_tensor(fine.centers_A), mobile, ("positions", "amplitudes"), 10.0)
    z = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])
    t = carried.targets(z)
    assert t.shape == (2, 100 * 4)
    moves = t[:, :300].reshape(2, 100, 3) * 10.0   # Angstrom
    np.testing.assert_allclose(moves[0].numpy(), np.tile([3.0, -1.0, 0.5], (100, 1)), rtol=0.02, atol=0.02)
    np.testing.assert_allclose(moves[1].numpy(), np.tile([-6.0, 2.0, -1.0], (100, 1)), rtol=0.02, atol=0.04)
    np.testing.assert_allclose(t[0, 300:].numpy(), 0.0, atol=1e-6)      # no amplitude change at z[1] = 0
    np.testing.assert_allclose(t[1, 300:].numpy(), 0.2, rtol=0.02)      # +20% amplitude, relative


def test_posterior_logvar_target_matches_the_prior_in_aggregate():
    z = np.stack([np.random.default_rng(0).normal(scale=0.9, size=5000), np.zeros(5000)], 1)
    lv = posterior_logvar_target(z)
    assert lv[0] == pytest.approx(np.log(1 - 0.81), abs=0.05)   # used: Var(mean) + width^2 ~ 1
    assert lv[1] == pytest.approx(0.0, abs=1e-6)                # unused: the prior's own width


class _Source:
    """Features of item i: a fixed random linear map of its latent, plus a little noise."""

    def __init__(self, z: np.ndarray, n_features: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        A = rng.normal(size=(z.shape[1], n_features))
        self.x = torch.as_tensor(z @ A + 0.05 * rng.normal(size=(len(z), n_features)), dtype=torch.float32)

    def __call__(self, items):
        return self.x[torch.as_tensor(items)], None


def test_distill_fits_the_encoder_to_the_first_latents_and_the_decoder_to_the_carried_moves():
    torch.manual_seed(0)
    coarse, fine = _blob(40, 3), _blob(80, 4, radius_A=8.0)
    rng = np.random.default_rng(5)
    z_first = np.stack([rng.uniform(-1.5, 1.5, 600), 0.5 * rng.normal(size=600)], 1).astype(np.float32)
    c0, a0, s0 = fine.tensors("cpu")
    model = HetModel(24, 2, c0, a0, s0, torch.arange(80), ("positions", "amplitudes"), 10.0, hidden=64, layers=2,
                     variational=True)
    first = _LinearFirst(coarse)
    items = np.arange(500)
    before = model.encode(_Source(z_first, 24)(items)[0]).detach()
    fit = distill(model, _Source(z_first, 24), items, first, z_first, batch_size=64, lr=1e-4, seed=1, steps=400)
    assert fit["steps"] == 400 and fit["encoder_r2"] > 0.95 and fit["decoder_rel_mse"] < 0.05
    held = np.arange(500, 600)  # particles the fit never saw: their latents come out too
    mu = model.encode(_Source(z_first, 24)(held)[0]).detach().numpy()
    assert np.corrcoef(mu[:, 0], z_first[held, 0])[0, 1] > 0.98
    assert float(((before.numpy() - z_first[items]) ** 2).mean()) > 5 * float(((mu - z_first[held]) ** 2).mean())
    # the decoder moves the fine Gaussians as the first network moves the coarse ones
    zq = torch.tensor([[1.0, 0.0]])
    c, a, _ = model.decoder(zq)
    move = (c - c0[None])[0].detach().numpy()
    np.testing.assert_allclose(np.median(move, axis=0), [3.0, -1.0, 0.5], atol=0.3)
