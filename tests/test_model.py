"""Encoder/decoder: exact neutral model at latent 0, focus mask, change options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.model.networks import Decoder, HetModel, parse_changes


def neutral(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return (torch.as_tensor(rng.normal(scale=15.0, size=(n, 3)), dtype=torch.float32),
            torch.as_tensor(rng.uniform(0.5, 1.5, n), dtype=torch.float32),
            torch.as_tensor(rng.uniform(3.0, 6.0, n), dtype=torch.float32))


@pytest.mark.parametrize("changes", [("positions",), ("amplitudes",), ("widths",),
                                     ("positions", "amplitudes", "widths")])
def test_decoder_exact_at_zero_latent(changes):
    torch.manual_seed(0)
    c0, a0, s0 = neutral()
    dec = Decoder(4, c0, a0, s0, torch.arange(96), changes, pos_scale_A=20.0, hidden=64, layers=3)
    # perturb the weights so f(0) is far from 0
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p))
    for B in (1, 3, 17):
        c, a, s = dec(torch.zeros(B, 4))
        assert torch.equal(c, c0.expand(B, -1, -1))
        assert torch.equal(a, a0.expand(B, -1))
        assert torch.equal(s, s0.expand(B, -1))
    # a batch mixing zero and non-zero latents: zero rows still exact, others change
    z = torch.randn(5, 4)
    z[2] = 0
    c, a, s = dec(z)
    assert torch.equal(c[2], c0) and torch.equal(a[2], a0) and torch.equal(s[2], s0)
    c, a, s = c.detach(), a.detach(), s.detach()
    moved = {"positions": (c[0] - c0).abs().max(), "amplitudes": (a[0] - a0).abs().max(),
             "widths": (s[0] - s0).abs().max()}
    for k, v in moved.items():
        assert (float(v) > 1e-4) == (k in changes), k


def test_focus_mask_keeps_other_gaussians_fixed():
    torch.manual_seed(1)
    c0, a0, s0 = neutral()
    mobile = torch.arange(10, 40)
    model = HetModel(50, 3, c0, a0, s0, mobile, ("positions", "amplitudes", "widths"), pos_scale_A=20.0,
                     hidden=64, layers=2)
    x = torch.randn(8, 50)
    z, (c, a, s) = model(x, latent_noise=0.5)
    fixed = torch.ones(96, dtype=torch.bool)
    fixed[mobile] = False
    assert torch.equal(c[:, fixed], c0[fixed].expand(8, -1, -1))
    assert torch.equal(a[:, fixed], a0[fixed].expand(8, -1))
    assert torch.equal(s[:, fixed], s0[fixed].expand(8, -1))
    assert float((c.detach()[:, mobile] - c0[mobile]).abs().max()) > 1e-4
    # gradients reach the network through the mobile Gaussians only
    (c.sum() + a.sum() + s.sum()).backward()
    assert model.decoder.net[0].weight.grad.abs().sum() > 0
    assert z.shape == (8, 3)


def test_encoder_starts_near_zero_and_latent_noise_is_seeded():
    torch.manual_seed(2)
    c0, a0, s0 = neutral()
    model = HetModel(200, 4, c0, a0, s0, torch.arange(96), ("positions",), 10.0, hidden=128, layers=3)
    x = torch.randn(64, 200)
    with torch.no_grad():
        z = model.encoder(x)
    assert 0 < float(z.abs().mean()) < 0.2
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, (c1, _, _) = model(x, 0.1, g1)
    _, (c2, _, _) = model(x, 0.1, g2)
    assert torch.equal(c1, c2)


def test_parse_changes():
    assert parse_changes("amplitudes,positions") == ("positions", "amplitudes")
    assert parse_changes("pos, sigma") == ("positions", "widths")
    assert parse_changes(["widths"]) == ("widths",)
    for bad in ("", "colour", "positions,size"):
        with pytest.raises(InputError):
            parse_changes(bad)
