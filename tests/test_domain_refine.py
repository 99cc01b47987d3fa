"""Tests of engine/analysis/domain_refine.py and `gmmhet refine-domain` (local refinement of a domain)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.analysis import domain_refine, refine
from scipion_gmmhet.engine.analysis.reconstruct import reconstruct_particles
from scipion_gmmhet.engine.conventions import angular_distance_deg, fourier_to_image, matrix_to_euler
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.io.data import ArrayImages, Particles
from scipion_gmmhet.engine.model.fourier import fsc_table
from scipion_gmmhet.engine.model.gmm import project, render_map
from scipion_gmmhet.engine.simulation import simulate

BOX, APIX, N = 40, 2.5, 240
ARM_DEG = 12.0  # per-particle rotation of the arm about its hinge


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Particles (no CTF, SNR 3) of the simulator's molecule whose arm is rotated about its centre
    by ARM_DEG about the hinge, about a random axis, in every particle; particle poses exact; the reference models
    are the neutral molecule (the arm's per-particle orientation is unknown to them)."""
    d = str(tmp_path_factory.mktemp("domain_sim"))
    simulate.simulate(d, "conformational", n=N, box=BOX, apix=APIX, snr=100.0, seed=5, n_gaussians=400, ctf=False)
    meta = metadata.read_particles(os.path.join(d, "particles.star"))
    mol = simulate.build_molecule(BOX, APIX, 0, 400)
    models = mol.conformation_models(np.full(N, 0.5))
    arm = np.zeros(mol.n_without_subunit(), bool)
    arm[mol.arm_slice()] = True
    rng = np.random.default_rng(1)
    rot = simulate.random_rotations(N, rng)
    v = rng.normal(size=(N, 3))
    v = ARM_DEG * v / np.linalg.norm(v, axis=1, keepdims=True)
    Q = refine.rotvec_to_matrix(torch.as_tensor(v)).float()  # arm rotation in the molecule frame
    cen, amp, sig = models.gaussians(np.arange(N), "cpu")
    g = torch.as_tensor(mol.hinge_A, dtype=torch.float32)
    cen_p = cen.clone()
    cen_p[:, arm] = torch.einsum("bij,bnj->bni", Q, cen[:, arm] - g) + g
    A = torch.as_tensor(rot, dtype=torch.float32)
    imgs = fourier_to_image(project(cen_p, amp, sig, A, BOX, APIX), BOX).numpy()
    imgs += rng.normal(size=imgs.shape).astype(np.float32) * float(imgs.std()) / math.sqrt(3.0)
    meta = meta.with_poses(np.stack(matrix_to_euler(rot), 1), np.zeros((N, 2)))
    A_arm = (A @ Q).double().numpy()  # the arm's true domain pose: A Q c + A (g - Q g)
    o_arm = -torch.einsum("bij,bj->bi", A, (g - torch.einsum("bij,j->bi", Q, g)))[:, :2].double().numpy()
    arm_truth = render_map(cen[0, arm], amp[0, arm], sig[0, arm], BOX, APIX).numpy()
    return dict(meta=meta, images=ArrayImages(imgs), models=models, arm=arm, rot=rot, A_arm=A_arm, o_arm=o_arm,
                arm_truth=arm_truth, moved=(cen_p, amp, sig), sigma=float(mol.sigma_A))


def masked_fsc_vs_truth(vol, truth, mask, sigma):
    """Mean FSC of the masked maps over the shells where the truth has signal (to 2.5 sigma)."""
    f = fsc_table(vol * mask, truth * mask, APIX)["fsc"]
    return float(np.mean(f[1:int(BOX * APIX / (2.5 * sigma)) + 1]))


def projected_rmsd_A(models, domain, R, o, R_true, o_true):
    """Median over particles of the RMS distance (A) between the domain's neutral Gaussians
    projected with the estimated and with the true domain poses."""
    c0 = torch.as_tensor(np.asarray(models.neutral_centers_A)[domain], dtype=torch.float64)

    def proj(R, o):
        return torch.einsum("bij,nj->bni", torch.as_tensor(R)[:, :2], c0) - torch.as_tensor(o)[:, None]
    return float(((proj(R, o) - proj(R_true, o_true)) ** 2).sum(-1).mean(1).sqrt().median())


def test_domain_refinement_sharpens_the_domain_map(data):
    """The arm's poses found per particle halve its projected error, and the arm's map from the
    signal-subtracted particles with the domain poses agrees better with the truth than the one
    with the particle poses."""
    parts = Particles(data["images"], data["rot"], np.zeros((N, 2)), BOX, APIX, ctf=None, ctf_mode="none")
    res = domain_refine.refine_domain(parts, data["models"], data["arm"], max_angle_deg=12.0, levels=3)
    e0 = projected_rmsd_A(data["models"], data["arm"], data["rot"], np.zeros((N, 2)), data["A_arm"], data["o_arm"])
    e1 = projected_rmsd_A(data["models"], data["arm"], res.rotations, res.origins_A, data["A_arm"], data["o_arm"])
    mask = domain_refine.domain_mask_map(data["models"], data["arm"], BOX, APIX)
    sub = domain_refine.DomainSignalImages(parts, data["models"], data["arm"])
    kw = dict(images=sub, ctf_mode="none", mask=False, progress=False)
    plain = reconstruct_particles(data["meta"], **kw)
    focused = reconstruct_particles(data["meta"].with_poses(np.stack(matrix_to_euler(res.rotations), 1),
                                                            res.origins_A), **kw)
    f0 = masked_fsc_vs_truth(plain.volume, data["arm_truth"], mask, data["sigma"])
    f1 = masked_fsc_vs_truth(focused.volume, data["arm_truth"], mask, data["sigma"])
    print(f"arm projected error {e0:.2f} -> {e1:.2f} A; masked FSC vs truth {f0:.3f} -> {f1:.3f}")
    assert e1 < 0.6 * e0
    assert f1 > f0 + 0.02
    assert np.all(res.score_after >= res.score_before)


def test_decoded_domain_motion_gives_the_domain_pose(data):
    """Decoded models that hold each particle's moved arm: the rigid fit of the decoded arm,
    composed with the particle pose, is the arm's true domain pose (no search)."""
    cen_p, amp, sig = data["moved"]
    neutral = data["models"]

    class Decoded:
        neutral_centers_A, median_sigma_A = neutral.neutral_centers_A, neutral.median_sigma_A

        def gaussians(self, rows, device):
            rows = np.asarray(rows)
            return cen_p[rows].to(device), amp[rows].to(device), sig[rows].to(device)

    parts = Particles(data["images"], data["rot"], np.zeros((N, 2)), BOX, APIX, ctf=None, ctf_mode="none")
    res = domain_refine.refine_domain(parts, Decoded(), data["arm"], max_angle_deg=0.0, max_shift_A=0.0)
    np.testing.assert_allclose(angular_distance_deg(res.rotations, data["A_arm"]), 0.0, atol=0.05)
    np.testing.assert_allclose(res.origins_A, data["o_arm"], atol=1e-3)
    np.testing.assert_allclose(res.decoded_angle_deg, ARM_DEG, atol=0.05)


def test_domain_must_be_part_of_the_model(data):
    parts = Particles(data["images"], data["rot"], np.zeros((N, 2)), BOX, APIX, ctf=None, ctf_mode="none")
    for bad in (np.zeros_like(data["arm"]), np.ones_like(data["arm"])):
        with pytest.raises(InputError, match="domain"):
            domain_refine.refine_domain(parts, data["models"], bad)


def test_cli_refine_domain_writes_poses_and_maps(tmp_path):
    """`gmmhet refine-domain` with a domain mask on a tiny trained network: the star of domain
    poses, the per-row table, both maps with half maps, masks and FSC, and the summary; a mask
    that selects nothing is one line and exit status 2."""
    import json

    import pandas as pd

    from scipion_gmmhet.engine import cli
    from scipion_gmmhet.engine.io.mrc import write_map
    box, apix = 32, 3.0
    d = str(tmp_path / "sim")
    simulate.simulate(d, "conformational", n=48, box=box, apix=apix, snr=10.0, seed=2, n_gaussians=300)
    star = os.path.join(d, "particles.star")
    gmm = os.path.join(d, "truth_gmm", sorted(os.listdir(os.path.join(d, "truth_gmm")))[2])
    train_dir = str(tmp_path / "train")
    assert cli.main(["train", "--particles", star, "--gmm", gmm, "--zdim", "2", "--epochs", "1", "--hidden", "32",
                     "--layers", "1", "--device", "cpu", "--out", train_dir]) == 0
    mol = simulate.build_molecule(box, apix, 0, 300)
    arm_c = mol.centers_A[mol.arm_slice()]
    grid = (np.arange(box) - box // 2) * apix
    zz, yy, xx = np.meshgrid(grid, grid, grid, indexing="ij")
    pts = np.stack([xx, yy, zz], -1).reshape(-1, 3)
    near = np.min(np.linalg.norm(pts[:, None] - arm_c[None], axis=-1), axis=1) < 6.0
    mask_path = str(tmp_path / "arm_mask.mrc")
    write_map(mask_path, near.reshape(box, box, box).astype(np.float32), apix)
    out = str(tmp_path / "domain")
    assert cli.main(["refine-domain", "--train", train_dir, "--particles", star, "--domain-mask", mask_path,
                     "--max-angle", "4", "--levels", "1", "--device", "cpu", "--out", out]) == 0
    new, old = metadata.read_particles(os.path.join(out, "domain_particles.star")), metadata.read_particles(star)
    assert len(new) == len(old)
    table = pd.read_csv(os.path.join(out, "domain_poses.csv"))
    assert list(table["row"]) == list(range(len(old)))
    assert (table["score_after"] >= table["score_before"] - 1e-6).all() and table["search_angle_deg"].max() <= 4.01
    for name in ("domain", "plain"):
        for suffix in (".mrc", "_half1.mrc", "_half2.mrc", "_mask.mrc", "_fsc.csv"):
            assert os.path.exists(os.path.join(out, name + suffix)), name + suffix
    with open(os.path.join(out, "domain_summary.json")) as f:
        s = json.load(f)
    assert s["n_particles"] == len(old) and 0 < s["n_domain_gaussians"] < s["n_gaussians"]
    assert -1.0 <= s["domain_fsc_masked_mean"] <= 1.0 and -1.0 <= s["plain_fsc_masked_mean"] <= 1.0
    empty = str(tmp_path / "empty.mrc")
    write_map(empty, np.zeros((box, box, box), np.float32), apix)
    assert cli.main(["refine-domain", "--train", train_dir, "--particles", star, "--domain-mask", empty,
                     "--out", str(tmp_path / "d2")]) == 2


def test_automatic_domain_is_what_the_decoder_moves(data):
    """Without a mask the domain is the Gaussians the decoded models move (here: the arm)."""
    neutral, arm = data["models"], data["arm"]
    c0 = np.asarray(neutral.neutral_centers_A, dtype=np.float32)
    rng = np.random.default_rng(3)

    class Moving:
        neutral_centers_A, median_sigma_A, latents = c0, neutral.median_sigma_A, np.zeros((64, 1))

        def gaussians(self, rows, device):
            c = np.repeat(c0[None], len(rows), 0)
            c[:, arm] += rng.normal(size=(len(rows), 1, 3)) * 5.0
            t = torch.as_tensor(c)
            return t, torch.ones(t.shape[:2]), torch.full(t.shape[:2], 3.0)

    dom = domain_refine.domain_from_motion(Moving())
    assert dom[arm].mean() > 0.9 and not dom[~arm].any()  # (the simulator's arm is sampled sparsely)

    class Still(Moving):
        def gaussians(self, rows, device):
            t = torch.as_tensor(np.repeat(c0[None], len(rows), 0))
            return t, torch.ones(t.shape[:2]), torch.full(t.shape[:2], 3.0)

    with pytest.raises(InputError, match="no moving domain"):
        domain_refine.domain_from_motion(Still())
