"""The batched local pose search of :func:`refine.refine_poses` (one batch of particles).

Every stage scores all particles of the batch times all their candidate poses in a few large
tensor operations (:class:`pose_projector.PoseProjector`: the particle's Gaussians in its
current view frame, envelopes computed once per batch, only the phases and one matrix product
per candidate); nothing loops over particles and nothing leaves the device until the batch's
result.

1. Coarse: the rotation lattice of :func:`refine.coarse_rotation_grid` (step ``max_angle/2``,
   33 candidates) scored at LOW resolution (rings up to ``coarse_fraction`` of the band's top,
   where a step of ``max_angle/2`` still changes the image smoothly), every integer shift at
   once by one inverse FFT per candidate (:meth:`refine._Scorer.shift_scores`).
2. ``levels`` fine levels at the full band, each with the step halved: the centre and its 6
   axis neighbours (each with its own best shift), then the vertex of the per-axis parabola
   through the three values of each axis (clamped to one step), scored too; the best of the 8
   becomes the centre. With a focus mask (``repeat_first``) the first level is run twice: a
   domain's score surface is flatter and more anisotropic, and a second pass at the same step
   from the new centre follows a diagonal ridge that one axis pass cuts across (on the whole
   particle it changes nothing measurable and costs ~20%).
3b. Shift polish at the final rotation: two 3 x 3 sub-pixel lattices (0.25, 0.1 px) with their
   parabola vertices; a shift is a phase ramp on the one projection, so this is nearly free.
3. ``polish_steps`` (default 0) Adam steps on the exact objective (autograd through
   :func:`gmm.project`), clamped to the ranges.
4. Acceptance: the best pose replaces the input pose only if it beats it in objective by
   ``min_gain`` nats and in score (the module docstring of :mod:`refine`).
5. ``wcc``: the fit at the poses returned (the accepted ones, else the input poses) is added to
   the scorers' per-ring image-to-model scale (:meth:`refine._Scorer.add_ring_scale`), which
   weights the rings of the batches after it.
"""
from __future__ import annotations

import torch

from ..model.gmm import project
from .pose_projector import PoseProjector

POLISH_LR = 0.05  # Adam step of the polishing (degrees for rotations, pixels for shifts)
COARSE_FRACTION = 0.3
COARSE_MIN_RINGS = 8  # ... and at least this many rings  # coarse stage: rings up to this fraction of the band's highest ring

_AXES = torch.tensor([[0.0, 0.0, 0.0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def _clamp_norm(v: torch.Tensor, limit: float) -> torch.Tensor:
    n = v.norm(dim=-1, keepdim=True)
    return v * torch.clamp(limit / n.clamp_min(1e-12), max=1.0)


class _Search:
    """State of one batch: the images, the projector(s), the objective."""

    def __init__(self, Fimg, y, amp, sig, o0, C, scorer, scorer_lo, max_angle, prior_deg, prior_px,
                 max_elements, rotvec_to_matrix, layers=None):
        self.Fimg, self.scorer, self.scorer_lo = Fimg, scorer, scorer_lo
        self.B, self.device = Fimg.shape[0], Fimg.device
        self.max_angle, self.prior_deg, self.prior_px = max_angle, prior_deg, prior_px
        self.rotvec_to_matrix = rotvec_to_matrix
        box, apix = scorer.box, scorer.apix
        self.proj = PoseProjector(y, amp, sig, box, apix, o0, C, max_ring=scorer.binner.hi,
                                  band_index=scorer.binner.flat_index, layers=layers)
        self.proj_lo = (PoseProjector(y, amp, sig, box, apix, o0, C, max_ring=scorer_lo.binner.hi,
                                      band_index=scorer_lo.binner.flat_index, layers=layers)
                        if scorer_lo is not None else None)
        self.max_elements = max_elements
        self.a = scorer.binner.gather(Fimg)  # the images' band coefficients
        self.a_lo = scorer_lo.binner.gather(Fimg) if scorer_lo is not None else None
        self.p_img = scorer.image_power(Fimg)
        self.p_img_lo = scorer_lo.image_power(Fimg) if scorer_lo is not None else None
        self.n_dof = 2.0 * scorer.binner.flat_index.numel()
        self.n_dof_lo = 2.0 * scorer_lo.binner.flat_index.numel() if scorer_lo is not None else None
        # band pixel frequencies (cycles/pixel), for shifting a projection by a phase ramp
        W = box // 2 + 1
        fi = scorer.binner.flat_index
        self.band_ky = torch.fft.fftfreq(box, device=self.device)[fi // W]
        self.band_kx = torch.fft.rfftfreq(box, device=self.device)[fi % W]

    def objective(self, v, s_px, score, n_dof=None):
        """MAP objective: profile log-likelihood of a correlation over ``n_dof`` real degrees of
        freedom (noise level unknown) plus the Gaussian prior on the pose change."""
        n_dof = self.n_dof if n_dof is None else n_dof
        loglik = -0.5 * n_dof * torch.log1p(-(score * score.abs()).clamp(max=1.0 - 1e-6))
        if self.prior_deg is None:
            return loglik
        return (loglik - (v * v).sum(-1) / (2.0 * self.prior_deg ** 2)
                - (s_px * s_px).sum(-1) / (2.0 * self.prior_px ** 2))

    def _chunks(self, proj, C):
        per = max(1, self.max_elements // max(1, proj.elements_per_candidate() * C))
        for b0 in range(0, self.B, per):
            yield b0, min(self.B, b0 + per)

    def scores(self, vecs, shifts_px=None, low=False):
        """Rotation vectors ``(B, C, 3)`` degrees: with ``shifts_px`` ``(B, C, 2)`` the exact
        scores ``(B, C)`` there; without, the best shift of each ``(B, C, 2)`` (integer search,
        sub-pixel parabola) and its score. ``low``: the coarse (low-resolution) scorer."""
        proj, scorer = (self.proj_lo, self.scorer_lo) if low else (self.proj, self.scorer)
        p_img = self.p_img_lo if low else self.p_img
        B, C = vecs.shape[:2]
        R = self.rotvec_to_matrix(vecs)
        out_s = torch.empty(B, C, device=self.device)
        out_d = torch.empty(B, C, 2, device=self.device) if shifts_px is None else shifts_px
        a = self.a_lo if low else self.a
        for b0, b1 in self._chunks(proj, C):
            F = proj.project(b0, b1, R[b0:b1], None if shifts_px is None else shifts_px[b0:b1])
            ai = a[b0:b1].repeat_interleave(C, dim=0)
            if shifts_px is None:
                d, s = scorer.shift_scores_band(ai, p_img[b0:b1].repeat_interleave(C, dim=0), F)
                out_d[b0:b1], out_s[b0:b1] = d.reshape(b1 - b0, C, 2), s.reshape(b1 - b0, C)
            else:
                out_s[b0:b1] = scorer.frc_band(ai, F).reshape(b1 - b0, C)
        return out_d, out_s

    def fit(self, v, s_px, scorer):
        """The model's band transforms at rotation vectors/shifts ``(B, 3)``/``(B, 2)`` for
        ``scorer`` and the ring sums ``(B, R)`` of the fit: image power, cross term, model power."""
        proj = self.proj if scorer is self.scorer else self.proj_lo
        F = torch.cat([proj.project(b0, b1, self.rotvec_to_matrix(v[b0:b1, None]), s_px[b0:b1, None])
                       for b0, b1 in self._chunks(proj, 1)])
        g = scorer.binner
        a = self.a if scorer is self.scorer else self.a_lo
        p_img = self.p_img if scorer is self.scorer else self.p_img_lo
        return F, p_img, g.ring_sums((F * a.conj()).real), g.ring_sums(F.real ** 2 + F.imag ** 2)

    def set_noise(self, v, s_px, scorer=None):
        """Whitening spectrum of ``scorer`` from the fit at rotation vectors/shifts ``(B, 3)``/``(B, 2)``."""
        F, p_img, cross, p_mod = self.fit(v, s_px, scorer or self.scorer)
        (scorer or self.scorer).set_noise(p_img, cross, p_mod)
        return F

    def add_ring_scale(self, v, s_px):
        """Add the fit at the refined poses ``v``, ``s_px`` to the scorers' image-to-model ring
        scales (:meth:`refine._Scorer.add_ring_scale`), for the batches after this one."""
        for scorer in (self.scorer, self.scorer_lo):
            if scorer is not None:
                _, _, cross, p_mod = self.fit(v, s_px, scorer)
                scorer.add_ring_scale(cross, p_mod)

    def coarse(self, grid):
        """Best lattice rotation and shift ``(B, 3)``, ``(B, 2)`` by the low-resolution objective."""
        B = self.B
        cand = grid.to(self.device).expand(B, -1, -1)
        low = self.scorer_lo is not None
        sh, sc = self.scores(cand, low=low)
        ob = self.objective(cand, sh, sc, self.n_dof_lo if low else None)
        k = ob.argmax(1)
        bi = torch.arange(B, device=self.device)
        return cand[bi, k], sh[bi, k]

    def level(self, best_v, best_s, best_ob, step, vertex=True):
        """One fine level around ``best_v`` (see module docstring); returns the new best. A centre
        whose objective is not known yet (``-inf``, the first level) is scored too; ``vertex``:
        also score the per-axis parabola's vertex."""
        B, dev = self.B, self.device
        bi = torch.arange(B, device=dev)
        first = bool(torch.isinf(best_ob).any())
        axes = _AXES.to(dev) if first else _AXES[1:].to(dev)
        cand = _clamp_norm(best_v[:, None, :] + axes[None] * step, self.max_angle)  # (B, 7 or 6, 3)
        sh, sc = self.scores(cand)
        ob = self.objective(cand, sh, sc)
        if first:
            best_v, best_s, best_ob = cand[:, 0], sh[:, 0], ob[:, 0]
            cand, sh, ob = cand[:, 1:], sh[:, 1:], ob[:, 1:]
        if vertex:
            cand, sh, ob = self._with_vertex(best_v, best_s, best_ob, cand, sh, ob, step)
        k = ob.argmax(1)
        better = ob[bi, k] > best_ob
        return (torch.where(better[:, None], cand[bi, k], best_v), torch.where(better[:, None], sh[bi, k], best_s),
                torch.where(better, ob[bi, k], best_ob))

    def _with_vertex(self, best_v, best_s, best_ob, cand, sh, ob, step):
        """Append the vertex of the per-axis parabolas through (-step, 0, +step) (offset clamped
        to one step) to the candidates ``(B, 6, .)`` of a level."""
        f0, fp, fm = best_ob[:, None], ob[:, 0:6:2], ob[:, 1:6:2]
        den = fp - 2.0 * f0 + fm
        off = torch.where(den < 0, 0.5 * (fm - fp) / den.clamp(max=-1e-12), torch.zeros_like(den)).clamp(-1.0, 1.0)
        vert = _clamp_norm(best_v + off * step, self.max_angle)[:, None, :]
        shv, scv = self.scores(vert)
        cand, sh = torch.cat([cand, vert], 1), torch.cat([sh, shv], 1)
        return cand, sh, torch.cat([ob, self.objective(vert, shv, scv)], 1)

    def subpixel(self, v, s_px, steps=(0.25, 0.1)):
        """Shift polish at rotation vectors ``v`` ``(B, 3)``: 3 x 3 sub-pixel lattices around
        ``s_px`` ``(B, 2)``, each then the vertex of the per-axis parabola. Shifting a projection
        is a phase ramp, so this costs one projection per particle. Returns shifts, scores."""
        B, dev = self.B, self.device
        F = torch.cat([self.proj.project(b0, b1, self.rotvec_to_matrix(v[b0:b1, None]), None)
                       for b0, b1 in self._chunks(self.proj, 1)])  # (B, n_band) at the current origin
        bi = torch.arange(B, device=dev)
        g = torch.tensor([-1.0, 0.0, 1.0], device=dev)
        lattice = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)  # (9, 2) dx, dy
        lattice = lattice[torch.argsort((lattice * lattice).sum(1), stable=True)]  # centre first

        def score_at(sh):  # sh (B, C, 2) px -> scores (B, C); origin + d: factor exp(+2 pi i k.d)
            C = sh.shape[1]
            ph = torch.polar(torch.ones(B, C, self.band_kx.numel(), device=dev),
                             2 * torch.pi * (self.band_kx * sh[..., 0, None] + self.band_ky * sh[..., 1, None]))
            Fm = (F[:, None] * ph).reshape(B * C, -1)
            return self.scorer.frc_band(self.a.repeat_interleave(C, dim=0), Fm).reshape(B, C)

        best = score_at(s_px[:, None])[:, 0]
        best_ob = self.objective(v, s_px, best)
        for st in steps:
            cand = _clamp_norm(s_px[:, None, :] + lattice[None] * st, self.scorer.max_shift_px)
            sc = score_at(cand)
            ob = self.objective(v[:, None].expand(-1, 9, -1), cand, sc)
            f0 = ob[:, :1]
            fx = torch.stack([ob[:, (lattice[:, 0] == 1) & (lattice[:, 1] == 0)][:, 0],
                              ob[:, (lattice[:, 0] == -1) & (lattice[:, 1] == 0)][:, 0]], 1)
            fy = torch.stack([ob[:, (lattice[:, 1] == 1) & (lattice[:, 0] == 0)][:, 0],
                              ob[:, (lattice[:, 1] == -1) & (lattice[:, 0] == 0)][:, 0]], 1)
            offs = []
            for fpm in (fx, fy):
                den = fpm[:, 0] - 2.0 * f0[:, 0] + fpm[:, 1]
                offs.append(torch.where(den < 0, 0.5 * (fpm[:, 1] - fpm[:, 0]) / den.clamp(max=-1e-12),
                                        torch.zeros_like(den)).clamp(-1.0, 1.0))
            vert = _clamp_norm(s_px + torch.stack(offs, 1) * st, self.scorer.max_shift_px)[:, None]
            cand = torch.cat([cand, vert], 1)
            sc = torch.cat([sc, score_at(vert)], 1)
            ob = torch.cat([ob, self.objective(v, vert[:, 0], sc[:, -1])[:, None]], 1)
            k = ob.argmax(1)
            better = ob[bi, k] > best_ob
            s_px = torch.where(better[:, None], cand[bi, k], s_px)
            best = torch.where(better, sc[bi, k], best)
            best_ob = torch.where(better, ob[bi, k], best_ob)
        return s_px, best

    def exact(self, v, s_px):
        """Exact scores ``(B,)`` at rotation vectors ``(B, 3)`` and shifts ``(B, 2)`` px."""
        _, sc = self.scores(v[:, None], s_px[:, None])
        return sc[:, 0]


def search_batch(Fimg, y, amp, sig, o0, C, scorer, scorer_lo, *, max_angle, levels, polish_steps, max_elements,
                 prior_deg, prior_px, min_gain, rotvec_to_matrix, coarse_grid, repeat_first: bool = False,
                 layers: tuple[int, int, float] | None = None):
    """Refine the poses of one batch (module docstring). ``y`` ``(B, N, 3)``: the Gaussians in the
    current view frame; ``o0`` ``(B, 2)`` current origins (A); ``C`` CTFs or None. Returns
    rotation vectors ``(B, 3)`` deg, shift changes ``(B, 2)`` px, score before and after ``(B,)``
    (torch, on the device). ``layers``: the layout of a layered reference
    (:class:`pose_projector.PoseProjector`)."""
    S = _Search(Fimg, y, amp, sig, o0, C, scorer, scorer_lo, max_angle, prior_deg, prior_px, max_elements,
                rotvec_to_matrix, layers)
    B, dev = S.B, S.device
    zv, zs = torch.zeros(B, 3, device=dev), torch.zeros(B, 2, device=dev)
    with torch.no_grad():
        F0 = S.set_noise(zv, zs)  # whitening from the fit at the current poses
        if scorer_lo is not None:
            S.set_noise(zv, zs, scorer_lo)
        if max_angle > 0:
            best_v, best_s = S.coarse(coarse_grid)
            if scorer.score == "wcc":
                # noise spectrum again at the coarse optimum (a mis-posed fit takes the poses'
                # own high-resolution signal for noise and whitens it away)
                S.set_noise(best_v, best_s)
        else:
            best_v = zv
            best_s, _ = S.scores(zv[:, None])
            best_s = best_s[:, 0]
        score0 = scorer.frc_band(S.a, F0)  # the input pose, with the final whitening
        ob0 = S.objective(zv, zs, score0)
        best_ob = torch.full((B,), -float("inf"), device=dev)  # the first level scores its centre
        step = max_angle / 2.0
        n_levels = levels if max_angle > 0 else 0
        for lv in range(n_levels):
            step /= 2.0
            best_v, best_s, best_ob = S.level(best_v, best_s, best_ob, step)
            if lv == 0 and repeat_first:
                best_v, best_s, best_ob = S.level(best_v, best_s, best_ob, step)
        best_s, best_sc = S.subpixel(best_v, best_s)  # exact scores (the search's were a parabola's estimate)
        best_ob = S.objective(best_v, best_s, best_sc)
    if polish_steps > 0:
        best_v, best_s, best_sc, best_ob = _polish(S, y, amp, sig, o0, C, best_v, best_s, best_sc, best_ob,
                                                   polish_steps)
    keep = (best_ob > ob0 + min_gain) & (best_sc > score0)
    vec = torch.where(keep[:, None], best_v, torch.zeros_like(best_v)).detach()
    shift = torch.where(keep[:, None], best_s, torch.zeros_like(best_s)).detach()
    if scorer.score == "wcc":  # the ring weights of the next batches, at the poses returned
        with torch.no_grad():
            S.add_ring_scale(vec, shift)
    after = torch.where(keep, best_sc, score0).detach()
    return vec, shift, score0, after


def _polish(S, y, amp, sig, o0, C, best_v, best_s, best_sc, best_ob, steps):
    """Adam on the exact objective (autograd through :func:`gmm.project`); keeps the best seen."""
    box, apix, scorer = S.scorer.box, S.scorer.apix, S.scorer

    def exact(v, s_px):
        return scorer.frc(S.Fimg, project(y, amp, sig, S.rotvec_to_matrix(v), box, apix, o0 + s_px * apix, C))

    v = best_v.clone().requires_grad_(S.max_angle > 0)
    s_px = best_s.clone().requires_grad_(True)
    opt = torch.optim.Adam([v, s_px] if S.max_angle > 0 else [s_px], lr=POLISH_LR)
    for it in range(steps + 1):
        sc = exact(v, s_px)
        ob = S.objective(v, s_px, sc)
        with torch.no_grad():
            better = ob > best_ob
            best_v = torch.where(better[:, None], v, best_v)
            best_s = torch.where(better[:, None], s_px, best_s)
            best_sc, best_ob = torch.where(better, sc, best_sc), torch.where(better, ob, best_ob)
        if it == steps:
            break
        opt.zero_grad()
        (-ob.sum()).backward()
        opt.step()
        with torch.no_grad():
            if S.max_angle > 0:
                v.copy_(_clamp_norm(v, S.max_angle))
            s_px.copy_(_clamp_norm(s_px, scorer.max_shift_px))
    return best_v.detach(), best_s.detach(), best_sc.detach(), best_ob.detach()
