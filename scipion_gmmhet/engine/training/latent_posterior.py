"""Each particle's latent from the trained decoder's likelihood: the posterior mean over anchors.

Why
    The encoder maps a particle's gradient features to a latent in one pass (amortised
    inference). At SNR 0.1 it leaves information in the image unused: scoring every particle
    against the decoded models of a few dozen latent states and averaging those states by
    the likelihood ranks the particles closer to what the data allow. 1AKE hinge, 6,000
    particles, 64 px at 1.5 A/px, SNR 0.1, defaults (zdim 4), |Spearman(latent PC1, true
    hinge)| / kNN R2: encoder 0.958 / 0.904, posterior 0.962 / 0.920 (Bayes ceiling in the
    band, the TRUE model at each particle's exact pose: 0.968 / 0.933); MD-like hinge (1 A
    disorder, frames superposed on all atoms) 0.938 / 0.869 -> 0.944 / 0.884 (ceiling 0.950)
    (benchmarks/results/science_latent_posterior*.md against science_latent_encoder*.md).

Method
    1. Anchors: k-means of the encoder's latents (``min(64, N / 25)`` centres, fitted on at
       most 50,000 rows; fewer than 8 anchors: the encoder's latents are kept), each anchor's
       population its prior weight.
    2. Each anchor decoded once; every particle scored against each anchor's CTF-applied
       projection at the particle's pose (with the training's centring) by the band correlation
       ``rho`` over the training band (:meth:`fourier.RingBinner.band_corr`).
    3. White-noise log-likelihood with the best scale, ``LL = -(n / 2) log(1 - rho^2)``, ``n``
       the band's real degrees of freedom (:meth:`fourier.RingBinner.band_dof`), reduced when
       the noise is not white (:func:`effective_dof` of the images minus the mean anchor's
       projection: 487 of 488 on the simulated hinge at SNR 0.1, 439 at SNR 1, where the
       residual carries the motion too); posterior ``p(m) exp(LL_m)``, normalised; the latent
       is the posterior mean of the anchors. Why the reduction: an over-confident likelihood
       snaps the latents to the anchors, and on the MD-like hinge 4x over-confidence cost PC1
       0.944 -> 0.925 (10x: 0.68, the snapping noise in the unused directions outweighs the
       motion), while 2-4x under-confidence changed little (the images' own power instead of
       the residual's, 488 -> ~210: hinge 0.962 -> 0.960, cyclic 3.45 -> 3.37 deg).

    The cost is ``N x M`` projections in the cropped band (6,000 x 64 at box 64: ~18 s on one
    CPU thread). The anchors travel in ``model.pt``, so that ``TrainedModel.encode_particles``
    gives other particles the same estimate. ``--latent-estimate encoder`` keeps the
    encoder's latents. The effective dimension is counted on the encoder's latents (the KL
    prior's active units).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..device import AdaptiveBatch

log = logging.getLogger(__name__)

LATENT_ESTIMATES = ("posterior", "encoder")
MAX_ANCHORS = 64            #: latent states scored per particle
PARTICLES_PER_ANCHOR = 25   #: at most N / 25 anchors ...
MIN_ANCHORS = 8             #: ... and no posterior below 8 (fewer than 200 particles)
KMEANS_ROWS = 50_000        #: the anchors are fitted on at most this many latents
MAX_PROJECTIONS_PER_CALL = 8192
#: float32 elements of the phase matrices per projection call: ~32 MB on a CPU (calls that fit
#: the cache ran 2x faster per projection: 0.29 vs 0.64 ms at 655 Gaussians, 40 px band, one
#: thread), ~256 MB on a GPU
PROJECTION_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}
DOF_SAMPLE = 2000           #: particles whose mean power spectrum sets the effective dof


@dataclass
class LatentAnchors:
    """Latent states ``anchors`` ``(M, K)`` float32, their log prior weights ``log_prior``
    ``(M,)`` (the k-means populations) and the likelihood's degrees of freedom ``n_dof``
    (:func:`effective_dof` of the training particles; None: computed from the particles scored)."""

    anchors: np.ndarray
    log_prior: np.ndarray
    n_dof: float | None = None

    def to_payload(self) -> dict:
        """The ``model.pt`` entry (tensors and numbers only: loadable with ``weights_only=True``)."""
        return {"anchors": torch.as_tensor(np.asarray(self.anchors, dtype=np.float32)),
                "log_prior": torch.as_tensor(np.asarray(self.log_prior, dtype=np.float64)),
                "n_dof": None if self.n_dof is None else float(self.n_dof)}

    @classmethod
    def from_payload(cls, d) -> "LatentAnchors | None":
        if not d:
            return None
        n_dof = d.get("n_dof")
        return cls(np.asarray(d["anchors"], dtype=np.float32), np.asarray(d["log_prior"], dtype=np.float64),
                   None if n_dof is None else float(n_dof))


def fit_anchors(z: np.ndarray, seed: int = 0, max_anchors: int = MAX_ANCHORS,
                per_anchor: int = PARTICLES_PER_ANCHOR) -> LatentAnchors | None:
    """k-means anchors of the encoder latents ``z`` ``(N, K)``: ``min(max_anchors, N / per_anchor)``
    centres (module doc), or None when that is below :data:`MIN_ANCHORS`."""
    from sklearn.cluster import KMeans
    n = len(z)
    m = min(max_anchors, n // per_anchor)
    if m < MIN_ANCHORS:
        return None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, KMEANS_ROWS, replace=False)) if n > KMEANS_ROWS else np.arange(n)
    km = KMeans(m, n_init=3, random_state=seed).fit(np.asarray(z, dtype=np.float64)[rows])
    counts = np.bincount(km.labels_, minlength=m).astype(np.float64)
    return LatentAnchors(km.cluster_centers_.astype(np.float32), np.log(np.maximum(counts, 0.5) / counts.sum()))


def _projection_budget(n_gaussians: int, fbox: int, device) -> int:
    """Projections per :func:`gmm.project` call: :data:`PROJECTION_ELEMENTS` floats of its
    per-Gaussian phase matrices (about ``n_gaussians x 3 fbox`` per projection), at most
    :data:`MAX_PROJECTIONS_PER_CALL`."""
    elements = PROJECTION_ELEMENTS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return int(max(1, min(MAX_PROJECTIONS_PER_CALL, elements // max(1, n_gaussians * 3 * fbox))))


@torch.no_grad()
def effective_dof(particles, binner, items: np.ndarray, model=None, batch_size: int = 256) -> float:
    """Degrees of freedom of the band corrected for coloured noise: ``(sum P)^2 / sum P^2`` over
    the band's coefficients (Hermitian mirrors counted), ``P`` the mean noise power per
    coefficient over up to :data:`DOF_SAMPLE` particles evenly spread over ``items``: the
    images' power after subtracting ``model`` (``(centers_A, amplitudes, sigmas_A)`` of one
    state, e.g. the mean anchor's decoded model) projected at each particle's pose with the best
    scale; the images' own power without a model. White noise gives
    :meth:`fourier.RingBinner.band_dof`; noise whose power varies over the band gives fewer,
    so the posterior is broader, never sharper."""
    from ..model.gmm import project
    rows = items[np.linspace(0, len(items) - 1, min(len(items), DOF_SAMPLE)).round().astype(np.int64)]
    power = None
    for i0 in range(0, len(rows), batch_size):
        b = particles.batch(rows[i0:i0 + batch_size])
        F = binner.gather(b.F_img)
        if model is not None:
            c, a, s = model
            M = binner.gather(project(c, a, s, b.rotations, particles.fbox, particles.fapix, b.origins_A, b.ctf))
            w = binner._hermitian_weight(F.device)
            beta = ((F * M.conj()).real * w).sum(1) / ((M.real ** 2 + M.imag ** 2) * w).sum(1).clamp_min(1e-30)
            F = F - beta[:, None] * M
        p = (F.real ** 2 + F.imag ** 2).double().sum(0)
        power = p if power is None else power + p
    if power is None:
        return binner.band_dof()
    w = binner._hermitian_weight(power.device).double()
    return float(min(binner.band_dof(), (w * power).sum() ** 2 / (w * power ** 2).sum()))


@torch.no_grad()
def _scan(decoder, particles, binner, items: np.ndarray, anchors: LatentAnchors, batch_size: int, device, reduce):
    """Score ``items`` against every anchor's decoded model, one batch of particles at a time;
    ``reduce`` takes each batch's ``(B, M)`` float64 log-likelihoods (CPU; ``n`` of the module
    doc: :func:`effective_dof`) and returns what to keep. Returns the list of kept values."""
    from ..model.gmm import project
    A = torch.as_tensor(anchors.anchors, device=device)
    c, a, s = (t.float() for t in decoder(A))
    M = A.shape[0]
    n_dof = anchors.n_dof if anchors.n_dof is not None else effective_dof(particles, binner, items)
    budget = _projection_budget(c.shape[1], particles.fbox, device)
    out = []

    def step(i0, i1):
        b = particles.batch(items[i0:i1])
        B = b.rotations.shape[0]
        per = max(1, min(M, budget // max(B, 1)))
        rho = []
        for m0 in range(0, M, per):
            k = min(M, m0 + per) - m0
            F = project(c[m0:m0 + k].unsqueeze(0).expand(B, -1, -1, -1).reshape(B * k, *c.shape[1:]),
                        a[m0:m0 + k].unsqueeze(0).expand(B, -1, -1).reshape(B * k, -1),
                        s[m0:m0 + k].unsqueeze(0).expand(B, -1, -1).reshape(B * k, -1),
                        b.rotations.repeat_interleave(k, 0), particles.fbox, particles.fapix,
                        b.origins_A.repeat_interleave(k, 0),
                        None if b.ctf is None else b.ctf.repeat_interleave(k, 0))
            rho.append(binner.band_corr(F, b.F_img.repeat_interleave(k, 0)).reshape(B, k))
        r = torch.cat(rho, 1).double().clamp(-0.999999, 0.999999)
        out.append(reduce((-0.5 * n_dof * torch.log1p(-r * r)).cpu()))

    AdaptiveBatch(min(batch_size, budget), "latent posterior", device).run(len(items), step)
    return out


def anchor_log_likelihoods(decoder, particles, binner, items: np.ndarray, anchors: LatentAnchors,
                           batch_size: int, device) -> torch.Tensor:
    """``(len(items), M)`` float64 white-noise log-likelihoods (nats, up to a per-particle
    constant) of the particles ``items`` of ``particles`` (:class:`io.data.Particles`, cropped
    to the band of ``binner``) under each anchor's decoded model at the particle's pose."""
    out = _scan(decoder, particles, binner, items, anchors, batch_size, device, lambda ll: ll)
    return torch.cat(out) if out else torch.zeros((0, len(anchors.anchors)), dtype=torch.float64)


def posterior_mean(log_lik: torch.Tensor, anchors: LatentAnchors) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean latents ``(N, K)`` float32 and each particle's largest posterior weight
    ``(N,)`` from log-likelihoods ``(N, M)`` (:func:`anchor_log_likelihoods`)."""
    logp = log_lik + torch.as_tensor(anchors.log_prior, dtype=torch.float64)
    w = torch.softmax(logp, dim=1)
    z = (w @ torch.as_tensor(anchors.anchors, dtype=torch.float64)).float().numpy()
    return z, w.max(1).values.numpy()


def posterior_latents(decoder, particles, binner, items: np.ndarray, anchors: LatentAnchors, batch_size: int,
                      device) -> tuple[np.ndarray, dict]:
    """Posterior mean latents ``(len(items), K)`` of ``items`` (module doc; no ``N x M`` array
    is kept) and a JSON-ready summary."""
    t0 = time.time()
    parts = _scan(decoder, particles, binner, items, anchors, batch_size, device,
                  lambda ll: posterior_mean(ll, anchors))
    K = anchors.anchors.shape[1]
    z = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, K), np.float32)
    peak = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
    info = {"anchors": int(len(anchors.anchors)), "n_particles": int(len(items)),
            "n_dof": None if anchors.n_dof is None else round(float(anchors.n_dof), 1),
            "median_peak_weight": round(float(np.median(peak)), 4) if len(peak) else None,
            "seconds": round(time.time() - t0, 2)}
    return z, info


def final_latents(model, particles, binner, z_encoder: np.ndarray, lo: int, hi: int, dist, cfg, device):
    """The latents a training writes: the encoder's ``z_encoder`` (all rows, every process) or,
    with ``cfg.latent_estimate == 'posterior'``, the posterior means (this process computes rows
    ``[lo, hi)``, gathered). Returns (latents, :class:`LatentAnchors` or None, summary dict or None)."""
    if cfg.latent_estimate != "posterior":
        return z_encoder, None, None
    anchors = fit_anchors(z_encoder, cfg.seed)
    if anchors is None:
        log.info("latent posterior: %d particles are too few for %d anchors; keeping the encoder's latents",
                 len(z_encoder), MIN_ANCHORS)
        return z_encoder, None, None
    net = getattr(model, "module", model)
    z_mean = torch.as_tensor(np.exp(anchors.log_prior) @ anchors.anchors, dtype=torch.float32, device=device)
    with torch.no_grad():
        mean_model = tuple(t[0].float() for t in net.decoder(z_mean[None]))
    anchors.n_dof = effective_dof(particles, binner, np.arange(len(z_encoder)), mean_model)  # same in every process
    was = net.training
    net.eval()
    z, info = posterior_latents(net.decoder, particles, binner, np.arange(lo, hi), anchors,
                                max(cfg.batch_size, 256), device)
    net.train(was)
    z = dist.gather_rows(z, len(z_encoder))
    info["mean_change"] = round(float(np.linalg.norm(z - z_encoder, axis=1).mean()), 4)
    log.info("latent posterior: %d anchors, %.0f degrees of freedom (band %.0f), median largest weight %s, "
             "mean move %.3f (latent units), %.1f s", info["anchors"], anchors.n_dof, binner.band_dof(),
             info["median_peak_weight"], info["mean_change"], info["seconds"])
    return z, anchors, info
