"""Diagnosis of the gap between trained-network and ground-truth refinement (issue 15).

Uses the data and networks a ``bench_refine.py --model trained --train-mask none --refine-mask none``
run left in ``--work`` and refines the perturbed particles ONCE (``refine.refine_poses``, the
benchmark's default search, no gold-standard gate) against several reference sets:

- truth: each particle's ground-truth GMM (the ceiling);
- neutral: the simulator's neutral GMM for every particle (a homogeneous reference);
- pert-net: the network trained on the perturbed poses at its training latents (as round 1 of
  ``gmmhet refine``), with and without the rigid gauge;
- true-net: the network trained on the TRUE poses, latents encoded from the perturbed particles
  (a decoder that has not absorbed the pose errors).

Also reports how far each decoded model is from the particle's truth: RMS centre error (A) and
the rotation (deg) of the best rigid fit of the truth onto the decoded centres, and that
rotation's correlation with the pose error (pose error absorbed as a deformation).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_refine as br  # noqa: E402
from scipion_gmmhet.engine.analysis import refine  # noqa: E402
from scipion_gmmhet.engine.conventions import euler_to_matrix, matrix_to_euler  # noqa: E402
from scipion_gmmhet.engine.io import metadata  # noqa: E402
from scipion_gmmhet.engine.io.data import ParticleImages, Particles  # noqa: E402
from scipion_gmmhet.engine.model.gmm import GMM  # noqa: E402
from scipion_gmmhet.engine.simulation import simulate  # noqa: E402
from scipion_gmmhet.engine.training.trained import TrainedModel  # noqa: E402


class FixedModels:
    """One GMM for every particle."""

    def __init__(self, g: GMM):
        self.g = g
        self.neutral_centers_A = g.centers_A
        self.median_sigma_A = float(np.median(g.sigmas_A))

    def gaussians(self, rows, device):
        B = len(rows)
        f = dict(device=device, dtype=torch.float32)
        return (torch.as_tensor(self.g.centers_A, **f).expand(B, -1, 3).clone(),
                torch.as_tensor(self.g.amplitudes, **f).expand(B, -1).clone(),
                torch.as_tensor(self.g.sigmas_A, **f).expand(B, -1).clone())


class HybridModels:
    """Gaussians ``sel`` from ``a``, the rest from ``b`` (both :class:`refine.ParticleModels`)."""

    def __init__(self, a, b, sel: np.ndarray):
        self.a, self.b, self.sel = a, b, torch.as_tensor(np.asarray(sel, dtype=bool))
        self.neutral_centers_A = b.neutral_centers_A
        self.median_sigma_A = b.median_sigma_A

    def gaussians(self, rows, device):
        ca, aa, sa = self.a.gaussians(rows, device)
        cb, ab, sb = self.b.gaussians(rows, device)
        cb, ab, sb = cb.clone(), ab.clone(), sb.clone()
        cb[:, self.sel], ab[:, self.sel], sb[:, self.sel] = ca[:, self.sel], aa[:, self.sel], sa[:, self.sel]
        return cb, ab, sb


def kabsch_angle(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Rotation angle (deg) of the best rigid fit of P (B,N,3) onto Q (B,N,3)."""
    P = P - P.mean(1, keepdims=True)
    Q = Q - Q.mean(1, keepdims=True)
    H = np.einsum("bni,bnj->bij", P, Q)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(np.einsum("bij,bjk->bik", U, Vt)))
    D = np.zeros_like(H)
    D[:, 0, 0] = D[:, 1, 1] = 1
    D[:, 2, 2] = d
    R = np.einsum("bij,bjk,bkl->bil", U, D, Vt)
    return np.degrees(np.arccos(np.clip((np.trace(R, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="the --work of a bench_refine.py trained run")
    ap.add_argument("--perturb-deg", type=float, default=3.0)
    ap.add_argument("--perturb-px", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sim_dir = glob.glob(os.path.join(args.work, "sim_*"))[0]
    truth = pd.read_csv(os.path.join(sim_dir, "truth.csv"))
    meta = metadata.read_particles(os.path.join(sim_dir, "particles.star"))
    apix, box = meta.apix, meta.box
    rot_true = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
    org_true = truth[["origin_x_A", "origin_y_A"]].to_numpy()
    rot_p, org_p = br.perturb(rot_true, org_true, apix, args.perturb_deg, args.perturb_px, args.seed + 100)
    meta_p = meta.with_poses(np.stack(matrix_to_euler(rot_p), 1), org_p)
    star_p = os.path.join(args.work, "perturbed.star")
    rot_p = meta_p.rotation_matrices()
    err0 = br.pose_errors(rot_p, org_p, rot_true, org_true, apix)
    import json
    info = json.load(open(os.path.join(sim_dir, "simulation.json")))
    mol = simulate.build_molecule(box, apix, int(info.get("molecule_seed", 0)), 1600)
    tmodels = mol.conformation_models(truth["conformation"].to_numpy())
    neutral = GMM.load(br.neutral_truth_gmm(sim_dir))
    n = len(meta)
    tc = tmodels.gaussians(np.arange(n), "cpu")[0].numpy()
    ang0 = br.angular_distance_deg(rot_p, rot_true)  # per-particle input angular error (deg)

    refs = {"truth (per-particle GMM)": tmodels, "neutral GMM for all": FixedModels(neutral)}
    pert_dir = sorted(glob.glob(os.path.join(args.work, "train_pert_*")))[0]
    true_dir = sorted(glob.glob(os.path.join(args.work, "train_true_*")))[0]
    tm_p, tm_t = TrainedModel(pert_dir), TrainedModel(true_dir)
    z_p = tm_p.latents()
    z_t = tm_t.encode_particles(star_p, device=args.device)
    refs["pert-net, rigid gauge (round 1 of gmmhet refine)"] = refine.LatentModels(tm_p, z_p)
    refs["pert-net, no gauge"] = refine.LatentModels(tm_p, z_p, rigid_gauge=False)
    refs["true-net (trained on true poses), latents of the perturbed particles"] = refine.LatentModels(tm_t, z_t)
    refs["true-net, no gauge"] = refine.LatentModels(tm_t, z_t, rigid_gauge=False)
    from scipion_gmmhet.engine.analysis.rigid_core import AnchoredCoreModels, rigid_core
    arm = np.zeros(tc.shape[1], dtype=bool)
    arm[mol.arm_slice()] = True
    core_p = rigid_core(refs["pert-net, rigid gauge (round 1 of gmmhet refine)"])
    print(f"automatic rigid core of pert-net: {core_p.sum()} of {len(core_p)} Gaussians, "
          f"{(core_p & arm).sum()} of {arm.sum()} arm Gaussians in it")
    focus = {}
    refs["truth, focus on the true core (arm subtracted)"] = tmodels
    focus["truth, focus on the true core (arm subtracted)"] = ~arm
    refs["pert-net, focus on its automatic rigid core"] = refs["pert-net, rigid gauge (round 1 of gmmhet refine)"]
    focus["pert-net, focus on its automatic rigid core"] = core_p
    refs["pert-net, automatic core anchored at neutral, focus on it"] = AnchoredCoreModels(
        refs["pert-net, rigid gauge (round 1 of gmmhet refine)"], core_p)
    focus["pert-net, automatic core anchored at neutral, focus on it"] = core_p
    refs["truth core + pert-net arm"] = HybridModels(refs["pert-net, rigid gauge (round 1 of gmmhet refine)"],
                                                     tmodels, arm)
    refs["pert-net core + truth arm"] = HybridModels(tmodels, refs["pert-net, rigid gauge (round 1 of gmmhet refine)"],
                                                     arm)
    refs["neutral core + truth arm"] = HybridModels(tmodels, FixedModels(neutral), arm)
    print(f"perturbed: median angle {err0['ang_med']:.2f} deg, shift {err0['sh_med_px']:.3f} px")
    print("| reference | median angle error (deg) | change | median shift error (px) | decoded vs truth: RMS centre "
          "error (A) | rigid-fit rotation median (deg) | corr(rigid-fit rotation, pose error) | core RMS (A) "
          "| core rigid-fit rotation (deg) | arm RMS (A) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, models in refs.items():
        c = models.gaussians(np.arange(n), "cpu")[0].numpy()
        ncmp = min(c.shape[1], tc.shape[1])
        rms = np.sqrt(((c[:, :ncmp] - tc[:, :ncmp]) ** 2).sum(-1).mean(1))
        kang = kabsch_angle(tc[:, :ncmp], c[:, :ncmp])
        core_ix = ~arm[:ncmp]
        core_rms = np.sqrt(((c[:, core_ix] - tc[:, core_ix]) ** 2).sum(-1).mean(1))
        arm_rms = np.sqrt(((c[:, arm[:ncmp]] - tc[:, arm[:ncmp]]) ** 2).sum(-1).mean(1))
        core_ang = kabsch_angle(tc[:, core_ix], c[:, core_ix])
        corr = np.corrcoef(kang, ang0)[0, 1] if kang.std() > 0 else float("nan")
        parts = Particles(ParticleImages(meta_p), rot_p, org_p, box, apix, ctf=meta_p.ctf_params(), ctf_mode="full",
                          device=args.device)
        res = refine.refine_poses(parts, models, max_angle_deg=6.0, max_shift_A=2.0 * apix, focus=focus.get(name))
        e = br.pose_errors(res.rotations, res.origins_A, rot_true, org_true, apix)
        print(f"| {name} | {err0['ang_med']:.2f} -> {e['ang_med']:.2f} | {100 * (e['ang_med'] / err0['ang_med'] - 1):+.0f}% "
              f"| {err0['sh_med_px']:.3f} -> {e['sh_med_px']:.3f} | {np.median(rms):.2f} | {np.median(kang):.2f} "
              f"| {corr:.2f} | {np.median(core_rms):.2f} | {np.median(core_ang):.2f} | {np.median(arm_rms):.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
