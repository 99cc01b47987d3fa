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

    4. Anchors finer where the likelihood is sharp: when the median particle's largest
       posterior weight exceeds 0.5, most posteriors sit on one anchor and the posterior mean
       snaps to the anchors' spacing; the anchors are then fitted again, 4x as many (at most
       ``N / 25``), and every particle is scored once more, against the finer anchors near its
       likely coarse ones only (:func:`finer_candidates`; 30 of 240 per particle on the full
       circle, with the same latents as scoring all 240). On the LID turning a full circle
       (median largest weight 0.56-0.57 in the first training, 0.71-0.74 in the second) the
       median angle error goes from 2.89 / 3.22 to 2.69 / 2.93 deg on seeds 1 / 2 (circular
       correlation 0.995 both), +20-150 s per training on one CPU thread; the hinge, MD-like,
       two-motion and simulator sets stay below 0.5 (0.08-0.46) and are unchanged
       (benchmarks/results/latent_anchors_refit.md). ``summary.json`` keeps the first pass under
       ``coarse_pass``; ``model.pt`` keeps both anchor sets (``LatentAnchors.coarse``).

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
REFIT_PEAK_WEIGHT = 0.5     #: median largest posterior weight above which the anchors are too coarse ...
REFIT_FACTOR = 4            #: ... and are fitted again with this many times more (still at most N / 25);
REFIT_TOP = 8               #: each particle is scored against the finer anchors of its 8 largest coarse weights ...
REFIT_MIN_WEIGHT = 1e-3     #: ... of at least this weight
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
    (:func:`effective_dof` of the training particles; None: computed from the particles scored).
    ``coarse``: after a refit (module doc, step 4) the first anchors, whose likely ones pick the
    finer anchors each particle is scored against."""

    anchors: np.ndarray
    log_prior: np.ndarray
    n_dof: float | None = None
    coarse: "LatentAnchors | None" = None

    def to_payload(self) -> dict:
        """The ``model.pt`` entry (tensors and numbers only: loadable with ``weights_only=True``)."""
        return {"anchors": torch.as_tensor(np.asarray(self.anchors, dtype=np.float32)),
                "log_prior": torch.as_tensor(np.asarray(self.log_prior, dtype=np.float64)),
                "n_dof": None if self.n_dof is None else float(self.n_dof),
                "coarse": None if self.coarse is None else self.coarse.to_payload()}

    @classmethod
    def from_payload(cls, d) -> "LatentAnchors | None":
        if not d:
            return None
        n_dof = d.get("n_dof")
        return cls(np.asarray(d["anchors"], dtype=np.float32), np.asarray(d["log_prior"], dtype=np.float64),
                   None if n_dof is None else float(n_dof), cls.from_payload(d.get("coarse")))


def fit_anchors(z: np.ndarray, seed: int = 0, max_anchors: int | None = None,
                per_anchor: int | None = None) -> LatentAnchors | None:
    """k-means anchors of the encoder latents ``z`` ``(N, K)``: ``min(max_anchors, N / per_anchor)``
    centres (defaults :data:`MAX_ANCHORS`, :data:`PARTICLES_PER_ANCHOR`; module doc), or None when
    that is below :data:`MIN_ANCHORS`."""
    from sklearn.cluster import KMeans
    max_anchors = MAX_ANCHORS if max_anchors is None else max_anchors
    per_anchor = PARTICLES_PER_ANCHOR if per_anchor is None else per_anchor
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
def _scan(decoder, particles, binner, items: np.ndarray, anchors: LatentAnchors, batch_size: int, device, reduce,
          candidates=None):
    """Score ``items`` against every anchor's decoded model, one batch of particles at a time;
    ``reduce`` takes each batch's ``(B, M)`` float64 log-likelihoods (CPU; ``n`` of the module
    doc: :func:`effective_dof`) and returns what to keep. Returns the list of kept values.
    ``candidates(i0, i1)``: a ``(B, M)`` bool tensor of the (particle, anchor) pairs of
    ``items[i0:i1]`` to score; the others get ``-inf`` (None: every pair)."""
    from ..model.gmm import project
    A = torch.as_tensor(anchors.anchors, device=device)
    c, a, s = (t.float() for t in decoder(A))
    M = A.shape[0]
    n_dof = anchors.n_dof if anchors.n_dof is not None else effective_dof(particles, binner, items)
    budget = _projection_budget(c.shape[1], particles.fbox, device)
    out = []

    def pairs(b, bi, mi):  # band correlations of particles bi of batch b with anchors mi, (P,)
        rho = []
        for p0 in range(0, len(bi), budget):
            j, m = bi[p0:p0 + budget], mi[p0:p0 + budget]
            F = project(c[m], a[m], s[m], b.rotations[j], particles.fbox, particles.fapix, b.origins_A[j],
                        None if b.ctf is None else b.ctf[j])
            rho.append(binner.band_corr(F, b.F_img[j]))
        return torch.cat(rho).double().clamp(-0.999999, 0.999999)

    def step(i0, i1):
        b = particles.batch(items[i0:i1])
        B = b.rotations.shape[0]
        if candidates is None:
            r = pairs(b, torch.arange(B, device=device).repeat_interleave(M),
                      torch.arange(M, device=device).repeat(B)).reshape(B, M)
            ll = band_log_likelihood(r, n_dof)
        else:
            bi, mi = candidates(i0, i1).to(device).nonzero(as_tuple=True)
            r = pairs(b, bi, mi)
            ll = torch.full((B, M), float("-inf"), dtype=torch.float64, device=device)
            ll[bi, mi] = band_log_likelihood(r, n_dof)
        out.append(reduce(ll.cpu()))

    AdaptiveBatch(min(batch_size, budget), "latent posterior", device).run(len(items), step)
    return out


def anchor_log_likelihoods(decoder, particles, binner, items: np.ndarray, anchors: LatentAnchors,
                           batch_size: int, device) -> torch.Tensor:
    """``(len(items), M)`` float64 white-noise log-likelihoods (nats, up to a per-particle
    constant) of the particles ``items`` of ``particles`` (:class:`io.data.Particles`, cropped
    to the band of ``binner``) under each anchor's decoded model at the particle's pose."""
    out = _scan(decoder, particles, binner, items, anchors, batch_size, device, lambda ll: ll)
    return torch.cat(out) if out else torch.zeros((0, len(anchors.anchors)), dtype=torch.float64)


def band_log_likelihood(rho: torch.Tensor, n_dof: float) -> torch.Tensor:
    """White-noise log-likelihood with the best scale of band correlations ``rho`` (module doc,
    step 3): ``-(n_dof / 2) log(1 - rho^2)``; ``rho`` kept inside (-1, 1) by the caller."""
    return -0.5 * n_dof * torch.log1p(-rho * rho)


def posterior_weights(log_lik: torch.Tensor, anchors: LatentAnchors) -> torch.Tensor:
    """Posterior weights ``(N, M)`` float64 (rows sum to 1) from log-likelihoods ``(N, M)``
    (:func:`anchor_log_likelihoods`; ``-inf``: not scored) and the anchors' prior."""
    return torch.softmax(log_lik + torch.as_tensor(anchors.log_prior, dtype=torch.float64), dim=1)


def posterior_mean(log_lik: torch.Tensor, anchors: LatentAnchors) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean latents ``(N, K)`` float32 and each particle's largest posterior weight
    ``(N,)`` from log-likelihoods ``(N, M)`` (:func:`anchor_log_likelihoods`)."""
    return _mean_and_peak(posterior_weights(log_lik, anchors), anchors)


def _mean_and_peak(w: torch.Tensor, anchors: LatentAnchors) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean latents ``(N, K)`` float32 and largest weights ``(N,)`` of weights ``w``."""
    return (w @ torch.as_tensor(anchors.anchors, dtype=torch.float64)).float().numpy(), w.max(1).values.numpy()


def _largest_weights(w: torch.Tensor) -> np.ndarray:
    """Anchor indices ``(N, REFIT_TOP)`` int16 of each particle's largest weights ``>=``
    :data:`REFIT_MIN_WEIGHT` (largest first; -1 pads)."""
    top = torch.topk(w, min(REFIT_TOP, w.shape[1]), dim=1)
    return torch.where(top.values >= REFIT_MIN_WEIGHT, top.indices, -1).to(torch.int16).numpy()


def finer_candidates(coarse: LatentAnchors, finer: LatentAnchors, largest: np.ndarray):
    """``candidates(i0, i1)`` for :func:`_scan` (finer anchors ``(Mf, K)``): the finer anchors
    owned by one of each particle's largest coarse anchors ``largest`` ``(N, T)`` (-1: none).
    A finer anchor belongs to its two nearest coarse anchors (a particle whose likelihood
    falls sharply from one coarse anchor to the next still reaches the finer anchors on the
    border between them), and each coarse anchor also owns the finer anchor nearest to it (so
    no particle has none)."""
    d = ((finer.anchors[:, None, :] - coarse.anchors[None, :, :]) ** 2).sum(-1)  # (Mf, Mc)
    owns = np.zeros((len(coarse.anchors) + 1, len(finer.anchors)), dtype=bool)  # last row: the -1 pad
    nearest = np.argsort(d, axis=1)[:, :2]
    for k in range(nearest.shape[1]):
        owns[nearest[:, k], np.arange(len(finer.anchors))] = True
    owns[np.arange(len(coarse.anchors)), d.argmin(0)] = True
    owns_t = torch.as_tensor(owns)
    largest_t = torch.as_tensor(largest.astype(np.int64))

    def candidates(i0: int, i1: int) -> torch.Tensor:
        return owns_t[largest_t[i0:i1]].any(dim=1)  # (B, T, Mf) -> (B, Mf)
    return candidates


def finer_anchors(coarse: LatentAnchors, z: np.ndarray, seed: int, max_anchors: int) -> LatentAnchors:
    """The refit's anchors (module doc, step 4): ``max_anchors`` k-means centres of the encoder
    latents ``z`` with the coarse anchors' degrees of freedom, ``coarse`` kept on them."""
    finer = fit_anchors(z, seed, max_anchors=max_anchors)
    finer.n_dof, finer.coarse = coarse.n_dof, coarse
    return finer


def posterior_rows(decoder, particles, binner, items: np.ndarray, anchors: LatentAnchors, batch_size: int,
                    device, candidates=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior mean latents ``(len(items), K)`` float32, largest weights ``(len(items),)`` and
    the anchors of the largest weights (:func:`_largest_weights`)."""
    def reduce(ll):
        w = posterior_weights(ll, anchors)
        return (*_mean_and_peak(w, anchors), _largest_weights(w))
    parts = _scan(decoder, particles, binner, items, anchors, batch_size, device, reduce, candidates)
    K = anchors.anchors.shape[1]
    if not parts:
        return np.zeros((0, K), np.float32), np.zeros(0), np.zeros((0, REFIT_TOP), np.int16)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _summary(anchors: LatentAnchors, peak: np.ndarray, seconds: float) -> dict:
    return {"anchors": int(len(anchors.anchors)), "n_particles": int(len(peak)),
            "n_dof": None if anchors.n_dof is None else round(float(anchors.n_dof), 1),
            "median_peak_weight": round(float(np.median(peak)), 4) if len(peak) else None,
            "seconds": round(seconds, 2)}


def posterior_latents(decoder, particles, binner, items: np.ndarray, anchors: LatentAnchors, batch_size: int,
                      device) -> tuple[np.ndarray, dict]:
    """Posterior mean latents ``(len(items), K)`` of ``items`` (module doc; no ``N x M`` array
    is kept) and a JSON-ready summary. Anchors with ``coarse`` ones (a refit): each particle is
    scored against the finer anchors near its likely coarse ones, as the training did."""
    t0 = time.time()
    candidates = None
    if anchors.coarse is not None:
        _, _, largest = posterior_rows(decoder, particles, binner, items, anchors.coarse, batch_size, device)
        candidates = finer_candidates(anchors.coarse, anchors, largest)
    z, peak, _ = posterior_rows(decoder, particles, binner, items, anchors, batch_size, device, candidates)
    return z, _summary(anchors, peak, time.time() - t0)


def final_latents(model, particles, binner, z_encoder: np.ndarray, lo: int, hi: int, dist, cfg, device):
    """The latents a training writes: the encoder's ``z_encoder`` (all rows, every process) or,
    with ``cfg.latent_estimate == 'posterior'``, the posterior means (this process computes rows
    ``[lo, hi)``, gathered; anchors fitted again, finer, where the posterior is sharp: module doc,
    step 4). Returns (latents, :class:`LatentAnchors` or None, summary dict or None)."""
    if cfg.latent_estimate != "posterior":
        return z_encoder, None, None
    anchors = fit_anchors(z_encoder, cfg.seed)
    if anchors is None:
        log.info("latent posterior: %d particles are too few for %d anchors; keeping the encoder's latents",
                 len(z_encoder), MIN_ANCHORS)
        return z_encoder, None, None
    n = len(z_encoder)
    net = getattr(model, "module", model)
    z_mean = torch.as_tensor(np.exp(anchors.log_prior) @ anchors.anchors, dtype=torch.float32, device=device)
    with torch.no_grad():
        mean_model = tuple(t[0].float() for t in net.decoder(z_mean[None]))
    anchors.n_dof = effective_dof(particles, binner, np.arange(n), mean_model)  # same in every process
    was = net.training
    net.eval()

    def scored(a: LatentAnchors, candidates=None) -> tuple[np.ndarray, dict, np.ndarray]:
        t0 = time.time()
        z, peak, largest = posterior_rows(net.decoder, particles, binner, np.arange(lo, hi), a,
                                           max(cfg.batch_size, 256), device, candidates)
        both = dist.gather_rows(np.concatenate([z, peak[:, None]], axis=1).astype(np.float32), n)
        return both[:, :-1], _summary(a, both[:, -1], time.time() - t0), largest  # every process: one decision

    z, info, largest = scored(anchors)
    finer_m = min(REFIT_FACTOR * MAX_ANCHORS, n // PARTICLES_PER_ANCHOR)
    if info["median_peak_weight"] > REFIT_PEAK_WEIGHT and finer_m > len(anchors.anchors):
        log.info("latent posterior: median largest weight %.2f > %.2f with %d anchors (the likelihood is sharper "
                 "than their spacing); scoring again against %d, each particle against those near its likely "
                 "ones", info["median_peak_weight"], REFIT_PEAK_WEIGHT, len(anchors.anchors), finer_m)
        finer = finer_anchors(anchors, z_encoder, cfg.seed, finer_m)
        coarse = {k: info[k] for k in ("anchors", "median_peak_weight", "seconds")}
        candidates = finer_candidates(anchors, finer, largest)
        (z, info, _), anchors = scored(finer, candidates), finer
        info["coarse_pass"] = coarse
        scored_pairs = sum(int(candidates(i, min(i + 4096, hi - lo)).sum()) for i in range(0, hi - lo, 4096))
        info["anchors_scored_per_particle"] = round(scored_pairs / max(1, hi - lo), 1)  # this process's rows
    net.train(was)
    info["mean_change"] = round(float(np.linalg.norm(z - z_encoder, axis=1).mean()), 4)
    log.info("latent posterior: %d anchors, %.0f degrees of freedom (band %.0f), median largest weight %s, "
             "mean move %.3f (latent units), %.1f s", info["anchors"], anchors.n_dof, binner.band_dof(),
             info["median_peak_weight"], info["mean_change"], info["seconds"])
    return z, anchors, info
