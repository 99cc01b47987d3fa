"""Warm start of the finer model's network from the first one (``gmmhet train --finer-model auto``).

The second training of :mod:`finer_model` learns the same motions on a finer GMM. Started from
random weights it must find them again in a wider, noisier band, and a weaker motion can be lost
(two independent openings: the NMP opening 0.807 after the first training, 0.758 after the
second). :func:`distill` starts it where the first network ended instead:

- the decoder is fitted to the first network's decoded motions carried to the fine Gaussians:
  for latents ``z`` drawn around the particles' first-model latents, the coarse Gaussians' moves
  (Angstrom), relative amplitude changes and log width factors go to each fine Gaussian with the
  weights of the motion-corrected map's displacement field (:func:`motion_corrected.move_weights`,
  width :func:`motion_corrected.default_field_sigma_A`, the same carry as the refinement's fine
  reference);
- the encoder is fitted to map each particle's gradient features on the finer GMM to its
  first-model latent (posterior mean); with ``--prior kl`` its log-variance to
  ``log(1 - Var(z_k))`` per dimension (clipped to [0.01, 1]), the posterior width of a latent
  space whose aggregate matches the N(0, I) prior.

Both fits are relative mean squared errors (the encoder's per latent dimension over that
dimension's variance, the decoder's over the targets' mean square), minimised together by
Adam at 10x the training rate for ``steps`` steps of one training batch each (features from the
training's own source: the cache by default, so a step costs an MLP pass). The training then
runs as usual from these weights (its own optimiser, epochs and early stopping).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..model.networks import HetModel

log = logging.getLogger(__name__)

WARM_START_STEPS = 1000  # Adam steps of the fit (about 12 passes over 5,400 particles at batch 64)
WARM_START_LR_FACTOR = 10.0


class CarriedMoves:
    """The first network's decoded changes carried to the fine Gaussians, in the layout of
    :meth:`networks.Decoder.deltas` of a decoder on ``fine_mobile`` with ``changes`` and
    ``pos_scale_A``: ``targets(z)`` -> ``(B, n_out)``."""

    def __init__(self, first, fine_centers_A: torch.Tensor, fine_mobile: torch.Tensor, changes, pos_scale_A: float):
        from ..analysis.motion_corrected import default_field_sigma_A, move_weights
        self.first, self.changes, self.pos_scale_A = first, tuple(changes), float(pos_scale_A)
        c0, a0, s0 = first.neutral.tensors(first.device)
        self.c0, self.a0, self.s0 = c0.float(), a0.float(), s0.float()
        sigma = default_field_sigma_A(first.neutral.sigmas_A, first.neutral.apix)
        W, _ = move_weights(fine_centers_A.to(first.device), self.c0, self.a0, sigma)
        self.W = W.index_select(0, fine_mobile.to(first.device).long()).coalesce()  # (m, Nc)

    def _carry(self, per_gaussian: torch.Tensor) -> torch.Tensor:
        """``(B, Nc, C)`` -> ``(B, m, C)`` through the sparse weights."""
        B, n, C = per_gaussian.shape
        flat = per_gaussian.permute(1, 0, 2).reshape(n, B * C)
        return torch.sparse.mm(self.W, flat).reshape(-1, B, C).permute(1, 0, 2)

    def targets(self, z: torch.Tensor) -> torch.Tensor:
        c, a, s = self.first.decode(z)
        parts = []
        if "positions" in self.changes:
            parts.append((self._carry(c - self.c0[None]) / self.pos_scale_A).flatten(1))
        if "amplitudes" in self.changes:
            rel = a / self.a0.clamp_min(1e-12)[None] - 1.0
            parts.append(self._carry(rel[..., None])[..., 0])
        if "widths" in self.changes:
            parts.append(self._carry(torch.log(s / self.s0[None])[..., None])[..., 0])
        return torch.cat(parts, dim=1)


def posterior_logvar_target(z_first: np.ndarray) -> np.ndarray:
    """``log(1 - Var(z_k))`` per latent dimension, the variance clipped to [0.01, 1] (float32)."""
    var = np.var(np.asarray(z_first, np.float64), axis=0)
    return np.log(np.clip(1.0 - var, 0.01, 1.0)).astype(np.float32)


def distill(model: HetModel, source, items: np.ndarray, first, z_first: np.ndarray, *, batch_size: int,
            lr: float, seed: int, steps: int = WARM_START_STEPS) -> dict:
    """Fit ``model`` (a fresh network on the finer GMM) to the first network ``first``
    (:class:`trained.TrainedModel`) and its latents ``z_first`` ``(n_items, K)`` (row = item), on
    the training ``items`` read from ``source`` (:class:`features.FeatureSource`). Returns what
    the fit reached (``encoder_r2``, ``decoder_rel_mse``, ``steps``, ``seconds``)."""
    t0 = time.time()
    dev = next(model.parameters()).device
    dec = model.decoder
    carried = CarriedMoves(first, dec.c0, dec.mobile, dec.changes, dec.pos_scale_A)
    zt_all = torch.as_tensor(np.asarray(z_first, np.float32), device=dev)
    z_var = zt_all[torch.as_tensor(items, device=dev)].var(0).clamp_min(1e-6)
    logvar_t = torch.as_tensor(posterior_logvar_target(z_first[items]), device=dev)
    sd = torch.exp(0.5 * logvar_t)
    opt = torch.optim.Adam(model.parameters(), lr=lr * WARM_START_LR_FACTOR)
    rng = np.random.default_rng([int(seed), 23])
    gen = torch.Generator(device="cpu").manual_seed(int(seed) * 7 + 23)
    bs = max(int(batch_size), 64)
    was_training = model.training
    model.train()
    last: list = []
    for step in range(int(steps)):
        batch = np.sort(rng.choice(items, size=min(bs, len(items)), replace=False))
        x, _ = source(batch)
        zt = zt_all[torch.as_tensor(batch, device=dev)]
        out = model.encoder(x.float())
        mu = out[:, :zt.shape[1]]
        enc = ((mu - zt) ** 2).mean(0) / z_var  # per dimension, relative to its variance
        loss_enc = enc.mean()
        if model.variational:
            loss_enc = loss_enc + ((out[:, zt.shape[1]:].clamp(-16.0, 4.0) - logvar_t) ** 2).mean()
        zd = zt + sd * torch.randn(zt.shape, generator=gen).to(dev)  # where training samples the decoder
        with torch.no_grad():
            target = carried.targets(zd)
        d = dec.deltas(zd)
        loss_dec = ((d - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)
        opt.zero_grad(set_to_none=True)
        (loss_enc + loss_dec).backward()
        opt.step()
        if step >= steps - 20:  # the fit reached: the last 20 steps' mean
            last.append(torch.stack([enc.mean(), loss_dec]).detach())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    enc_rel, dec_rel = (torch.stack(last).mean(0).tolist() if last else (float("nan"), float("nan")))
    fit = {"steps": int(steps), "encoder_r2": float(1.0 - enc_rel), "decoder_rel_mse": float(dec_rel),
           "seconds": round(time.time() - t0, 1)}
    log.info("finer model: network started from the first one (%d steps, %.1f s): encoder R2 %.3f on the first "
             "latents, decoder relative error %.3f on the carried motions", fit["steps"], fit["seconds"],
             fit["encoder_r2"], fit["decoder_rel_mse"])
    return fit
