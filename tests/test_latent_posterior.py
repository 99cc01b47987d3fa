"""The latent posterior (engine/training/latent_posterior.py): the likelihood picks the state a
particle was simulated from, the posterior mean follows the truth, and `gmmhet train` writes
the posterior latents and carries the anchors so that encoding the same particles again gives
the same latents."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from scipion_gmmhet.engine.io.data import Particles
from scipion_gmmhet.engine.io.outputs import TrainFolder
from scipion_gmmhet.engine.model.fourier import RingBinner
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training import latent_posterior as lp
from scipion_gmmhet.engine.training.config import TrainConfig
from scipion_gmmhet.engine.training.train import train
from scipion_gmmhet.engine.training.trained import load_trained

BOX, APIX = 32, 4.0


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    """240 conformational particles at SNR 1 and the simulator's true states (conformation 0, 0.25 ... 1)."""
    torch.set_num_threads(1)
    d = str(tmp_path_factory.mktemp("posterior"))
    r = simulate(d, "conformational", n=240, box=BOX, apix=APIX, snr=1.0, seed=7, n_gaussians=96)
    gmms = [GMM.load(r["truth_gmm"][s]) for s in sorted(r["truth_gmm"]) if s.startswith("conf_")]
    truth = pd.read_csv(r["truth_csv"])["conformation"].to_numpy()
    return {"dir": d, "star": r["star"], "gmms": gmms, "truth": truth,
            "values": np.array([float(g.info["conformation"]) for g in gmms])}


def _truth_decoder(gmms):
    """A decoder whose latent is the state index: (M, 1) -> the true GMMs of those states."""
    c = torch.stack([torch.as_tensor(np.asarray(g.centers_A), dtype=torch.float32) for g in gmms])
    a = torch.stack([torch.as_tensor(np.asarray(g.amplitudes), dtype=torch.float32) for g in gmms])
    s = torch.stack([torch.as_tensor(np.asarray(g.sigmas_A), dtype=torch.float32) for g in gmms])
    return lambda z: (c[z[:, 0].round().long()], a[z[:, 0].round().long()], s[z[:, 0].round().long()])


def test_likelihood_picks_the_simulated_state_and_the_posterior_follows_the_truth(conf):
    gmms = conf["gmms"]
    p = Particles.from_star(conf["star"])
    p.crop(2.5 * APIX)
    binner = RingBinner(p.fbox, p.fapix, None, 2.5 * APIX, loss="corr")
    anchors = lp.LatentAnchors(np.arange(len(gmms), dtype=np.float32)[:, None], np.full(len(gmms), -np.log(len(gmms))))
    ll = lp.anchor_log_likelihoods(_truth_decoder(gmms), p, binner, np.arange(len(p)), anchors, 64, "cpu")
    assert ll.shape == (len(p), len(gmms)) and ll.dtype == torch.float64
    nearest = np.abs(conf["truth"][:, None] - conf["values"][None]).argmin(1)
    assert (ll.argmax(1).numpy() == nearest).mean() > 0.8
    z, peak = lp.posterior_mean(ll, anchors)
    assert z.shape == (len(p), 1) and np.all((peak > 0) & (peak <= 1))
    assert spearmanr(z[:, 0], conf["truth"]).correlation > 0.9
    # the likelihood is in nats of the band's degrees of freedom: posterior weights are not flat
    assert np.median(peak) > 0.5


def test_finer_anchors_scored_near_the_likely_coarse_ones_give_the_full_posterior(conf):
    """The refit's sparse scoring (each particle against the finer anchors owned by its likely
    coarse anchors) gives the posterior of scoring every finer anchor, at a fraction of the pairs."""
    gmms = conf["gmms"]
    p = Particles.from_star(conf["star"])
    p.crop(2.5 * APIX)
    binner = RingBinner(p.fbox, p.fapix, None, 2.5 * APIX, loss="corr")
    states = np.arange(len(gmms), dtype=np.float32)
    coarse = lp.LatentAnchors(states[::2, None], np.full(len(states[::2]), -np.log(len(states[::2]))))
    finer = lp.LatentAnchors(states[:, None], np.full(len(states), -np.log(len(states))))
    dec, items = _truth_decoder(gmms), np.arange(len(p))
    _, _, largest = lp.posterior_rows(dec, p, binner, items, coarse, 64, "cpu")
    assert largest.shape == (len(p), min(lp.REFIT_TOP, len(coarse.anchors))) and np.all(largest[:, 0] >= 0)
    candidates = lp.finer_candidates(coarse, finer, largest)
    mask = candidates(0, len(p)).numpy()
    assert mask.any(1).all() and mask.mean() < 0.9  # nobody without a candidate; not every pair
    # a finer anchor belongs to its two nearest coarse ones: a particle whose only likely coarse
    # state is 0 is scored against finer states 0, 1 (nearest to 0) and 2 (0 its second nearest), not 3 or 4
    only0 = (largest[:, 0] == 0) & np.all(largest[:, 1:] < 0, axis=1)
    assert only0.any() and np.all(mask[only0][:, :3]) and not mask[only0][:, 3:].any()
    z_sparse, _, _ = lp.posterior_rows(dec, p, binner, items, finer, 64, "cpu", candidates)
    z_full, _, _ = lp.posterior_rows(dec, p, binner, items, finer, 64, "cpu")
    assert np.median(np.abs(z_sparse - z_full)) < 1e-3 and np.mean(np.abs(z_sparse - z_full) < 0.05) > 0.95


def test_posterior_mean_weighs_the_prior_and_the_likelihood():
    anchors = lp.LatentAnchors(np.array([[0.0, 0.0], [2.0, 0.0]], np.float32), np.log(np.array([0.75, 0.25])))
    z, peak = lp.posterior_mean(torch.zeros((1, 2), dtype=torch.float64), anchors)
    np.testing.assert_allclose(z, [[0.5, 0.0]], atol=1e-6)
    np.testing.assert_allclose(peak, [0.75])
    z, _ = lp.posterior_mean(torch.tensor([[0.0, 50.0]], dtype=torch.float64), anchors)
    np.testing.assert_allclose(z, [[2.0, 0.0]], atol=1e-6)


def test_fit_anchors_needs_enough_particles():
    rng = np.random.default_rng(0)
    assert lp.fit_anchors(rng.normal(size=(150, 3)).astype(np.float32)) is None
    a = lp.fit_anchors(rng.normal(size=(1000, 3)).astype(np.float32))
    assert a.anchors.shape == (1000 // lp.PARTICLES_PER_ANCHOR, 3)
    np.testing.assert_allclose(np.exp(a.log_prior).sum(), 1.0)
    back = lp.LatentAnchors.from_payload(a.to_payload())
    np.testing.assert_array_equal(back.anchors, a.anchors)


def test_train_writes_posterior_latents_and_encoding_again_gives_them(conf, tmp_path):
    neutral = conf["gmms"][len(conf["gmms"]) // 2]
    p = Particles.from_star(conf["star"])
    cfg = TrainConfig(zdim=2, epochs=3, batch_size=32, seed=1, center="off")
    s = train(p, neutral, cfg, str(tmp_path / "run"), star_path=conf["star"])
    info = s["summary"]["latent_posterior"]
    assert info["anchors"] == 240 // lp.PARTICLES_PER_ANCHOR and info["n_particles"] == 240
    tm = load_trained(str(tmp_path / "run"))
    assert tm.anchors is not None and tm.anchors.anchors.shape == (info["anchors"], 2)
    z = TrainFolder(str(tmp_path / "run")).read_latents()
    # every latent is a convex combination of the anchors
    lo, hi = tm.anchors.anchors.min(0), tm.anchors.anchors.max(0)
    assert np.all(z >= lo - 1e-5) and np.all(z <= hi + 1e-5)
    np.testing.assert_allclose(tm.encode_particles(conf["star"]), z, atol=1e-4)
    # the encoder's latents on request: no anchors, other latents
    p = Particles.from_star(conf["star"])
    cfg_e = TrainConfig(zdim=2, epochs=3, batch_size=32, seed=1, center="off", latent_estimate="encoder")
    s_e = train(p, neutral, cfg_e, str(tmp_path / "enc"), star_path=conf["star"])
    assert s_e["summary"]["latent_posterior"] is None and load_trained(str(tmp_path / "enc")).anchors is None
    assert not np.allclose(TrainFolder(str(tmp_path / "enc")).read_latents(), z)


def test_sharp_posteriors_get_finer_anchors(conf, tmp_path, monkeypatch):
    """Posteriors sharper than the threshold (here set to 0; 8 anchors, at most 240 / 5): the
    anchors are fitted again, 4x as many, the summary keeps the first pass and model.pt carries
    the finer anchors; with the threshold out of reach the first anchors stay."""
    neutral = conf["gmms"][len(conf["gmms"]) // 2]
    monkeypatch.setattr(lp, "MAX_ANCHORS", 8)
    monkeypatch.setattr(lp, "PARTICLES_PER_ANCHOR", 5)
    monkeypatch.setattr(lp, "REFIT_PEAK_WEIGHT", 0.0)
    cfg = TrainConfig(zdim=2, epochs=3, batch_size=32, seed=1, center="off")
    s = train(Particles.from_star(conf["star"]), neutral, cfg, str(tmp_path / "fine"), star_path=conf["star"])
    info = s["summary"]["latent_posterior"]
    assert info["coarse_pass"]["anchors"] == 8 and info["anchors"] == 8 * lp.REFIT_FACTOR == 32
    # finer anchors share each particle's posterior among more states
    assert info["median_peak_weight"] < info["coarse_pass"]["median_peak_weight"]
    tm = load_trained(str(tmp_path / "fine"))
    assert tm.anchors.anchors.shape == (32, 2) and tm.anchors.coarse.anchors.shape == (8, 2)
    # encoding again scores the same (particle, finer anchor) pairs: the same latents
    np.testing.assert_allclose(tm.encode_particles(conf["star"]), TrainFolder(str(tmp_path / "fine")).read_latents(),
                               atol=1e-5)
    monkeypatch.setattr(lp, "REFIT_PEAK_WEIGHT", 1.0)
    s = train(Particles.from_star(conf["star"]), neutral, cfg, str(tmp_path / "coarse"), star_path=conf["star"])
    info = s["summary"]["latent_posterior"]
    assert info["anchors"] == 8 and "coarse_pass" not in info
    assert load_trained(str(tmp_path / "coarse")).anchors.coarse is None


def test_effective_dof_is_the_band_for_white_noise_and_fewer_for_coloured():
    from scipion_gmmhet.engine.io.data import ArrayImages
    rng = np.random.default_rng(3)
    n, box = 400, 32
    white = rng.normal(size=(n, box, box)).astype(np.float32)
    rot = np.repeat(np.eye(3)[None], n, 0)
    binner = RingBinner(box, APIX, None, 2.5 * APIX, loss="corr")
    p = Particles(ArrayImages(white), rot, np.zeros((n, 2)), box, APIX, ctf=None, ctf_mode="none")
    n_white = lp.effective_dof(p, binner, np.arange(n))
    assert 0.9 * binner.band_dof() < n_white <= binner.band_dof()
    # low-pass coloured noise: power falling over the band -> fewer effective degrees of freedom
    F = np.fft.rfft2(white)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(box), np.fft.rfftfreq(box), indexing="ij"))
    coloured = np.fft.irfft2(F / (1.0 + 20.0 * k), s=(box, box)).astype(np.float32)
    p = Particles(ArrayImages(coloured), rot, np.zeros((n, 2)), box, APIX, ctf=None, ctf_mode="none")
    assert lp.effective_dof(p, binner, np.arange(n)) < 0.8 * n_white
