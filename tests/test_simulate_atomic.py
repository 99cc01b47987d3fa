"""Tests of simulation/atomic.py: rigid-domain motions of a real structure (tests/data/1ake.pdb,
adenylate kinase) and `gmmhet simulate --kind hinge|two_motions|cyclic|trajectory`."""
from __future__ import annotations

import json
import os

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine import cli
from scipion_gmmhet.engine.conventions import euler_to_matrix, fourier_to_image
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io import star
from scipion_gmmhet.engine.model.gmm import GMM, project
from scipion_gmmhet.engine.simulation.atomic import (build_system, domain_atoms_mask, read_pdb,
                                                      simulate_atomic, thermal_displacements)

PDB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "1ake.pdb")


def _at(system, **coords):
    c = np.array([[coords.get(name, 0.0) for name in system.coords]])
    return system.centers(c)[0].numpy()


def test_read_pdb_heavy_atoms_and_domains():
    atoms = read_pdb(PDB)
    assert 1500 < len(atoms["xyz_A"]) <= 1661  # heavy atoms of chain A
    assert atoms["resseq"].min() == 1 and atoms["resseq"].max() == 214
    s = build_system("hinge", PDB)
    counts = {d: int(np.sum(s.domain == d)) for d in ("CORE", "LID", "NMP")}
    assert counts["LID"] > 250 and counts["NMP"] > 200 and counts["CORE"] > counts["LID"] + counts["NMP"]


def test_hinge_opens_both_domains_and_keeps_core_and_linkers():
    s = build_system("hinge", PDB)
    x0, x1 = _at(s, conformation=0.0), _at(s, conformation=1.0)
    core = s.domain == "CORE"
    np.testing.assert_allclose(x0[core], x1[core], atol=1e-4)
    core_c = x0[core].mean(0)
    for dom, min_shift in (("LID", 5.0), ("NMP", 2.5)):
        sel = s.domain == dom
        # rigid: distances inside the domain kept
        d0 = np.linalg.norm(x0[sel][:50, None] - x0[sel][None, :50], axis=-1)
        d1 = np.linalg.norm(x1[sel][:50, None] - x1[sel][None, :50], axis=-1)
        np.testing.assert_allclose(d0, d1, atol=1e-3)
        assert np.linalg.norm(x1[sel].mean(0) - x0[sel].mean(0)) > min_shift
        # opening: the domain's centroid moves away from the core's
        assert np.linalg.norm(x1[sel].mean(0) - core_c) > np.linalg.norm(x0[sel].mean(0) - core_c)
    # the hinge axis passes through the C-alpha atoms at the domain ends: they do not move
    atoms = read_pdb(PDB)
    for r in (122, 159, 30, 59):
        i = np.flatnonzero((atoms["resseq"] == r) & (atoms["name"] == "CA"))[0]
        np.testing.assert_allclose(x0[i], x1[i], atol=1e-3)


def test_two_motions_are_independent():
    s = build_system("two_motions", PDB)
    assert s.coords == ("motion_lid", "motion_nmp")
    base = _at(s)
    lid_only = _at(s, motion_lid=1.0)
    nmp_only = _at(s, motion_nmp=1.0)
    lid, nmp = s.domain == "LID", s.domain == "NMP"
    np.testing.assert_allclose(lid_only[~lid], base[~lid], atol=1e-4)
    np.testing.assert_allclose(nmp_only[~nmp], base[~nmp], atol=1e-4)
    assert np.abs(lid_only[lid] - base[lid]).max() > 5 and np.abs(nmp_only[nmp] - base[nmp]).max() > 3


def test_cyclic_turn_closes_a_circle():
    s = build_system("cyclic", PDB)
    lid = s.domain == "LID"
    np.testing.assert_allclose(_at(s, turn=0.0), _at(s, turn=1.0), atol=1e-3)
    cents = np.array([_at(s, turn=t)[lid].mean(0) for t in np.arange(12) / 12])
    radius = np.linalg.norm(cents - cents.mean(0), axis=1)
    assert radius.min() > 7.0 and radius.max() - radius.min() < 0.5  # a circle of ~10 A
    # every state is distinct
    d = np.linalg.norm(cents[:, None] - cents[None], axis=-1) + np.eye(12) * 99
    assert d.min() > 3.0


@pytest.fixture(scope="module")
def hinge_clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("hinge")
    res = simulate_atomic(str(out), "hinge", PDB, n=24, box=64, apix=1.5, snr=float("inf"), seed=3, ctf=False)
    return out, res


def test_files_truth_and_images(hinge_clean):
    out, res = hinge_clean
    truth = pd.read_csv(res["truth_csv"])
    assert list(truth.columns[:3]) == ["particle", "conformation", "composition"]
    assert truth["conformation"].between(0, 1).all() and (truth["composition"] == 0).all()
    parts = star.read_star(res["star"])["particles"]
    assert len(parts) == 24 and (parts["rlnImageName"] == truth["image_name"]).all()
    params = json.load(open(res["json"]))
    assert params["truth_coordinates"] == ["conformation"] and len(params["motions"]) == 2
    assert {m["domain"] for m in params["motions"]} == {"LID", "NMP"}
    assert len(res["truth_maps"]) == 5 and os.path.exists(res["consensus"])
    with mrcfile.open(res["stack"]) as m:
        data = np.array(m.data)
        assert data.shape == (24, 64, 64) and abs(float(m.voxel_size.x) - 1.5) < 1e-4
    # noiseless, no CTF: image i is the projection of the truth GMM at its conformation and pose
    s = build_system("hinge", PDB)
    for i in (0, 7):
        r = truth.iloc[i]
        g = s.gmm([r["conformation"]], box=64, apix=1.5)
        A = torch.as_tensor(euler_to_matrix(np.array([r["rot"]]), np.array([r["tilt"]]), np.array([r["psi"]])),
                            dtype=torch.float32)
        c, a, sg = g.tensors()
        F = project(c, a, sg, A, 64, 1.5, origins_A=torch.tensor([[r["origin_x_A"], r["origin_y_A"]]],
                                                                   dtype=torch.float32))
        img = fourier_to_image(F, 64)[0].numpy()
        assert np.abs(img - data[i]).max() < 1e-3 * np.abs(img).max()


def test_consensus_is_between_the_states(hinge_clean):
    out, res = hinge_clean
    from scipion_gmmhet.engine.io.mrc import read_map
    cons = read_map(res["consensus"])[0]
    ends = [read_map(res["truth_maps"][k])[0] for k in ("conf_000", "conf_004")]
    assert abs(cons.sum() - ends[0].sum()) < 1e-3 * ends[0].sum()  # mass kept
    assert np.abs(cons - ends[0]).max() < np.abs(ends[1] - ends[0]).max()


def test_cyclic_and_two_motions_truth_columns(tmp_path):
    res = simulate_atomic(str(tmp_path / "c"), "cyclic", PDB, n=10, snr=1.0, seed=0)
    t = pd.read_csv(res["truth_csv"])
    np.testing.assert_allclose(t["angle_deg"], 360 * t["turn"])
    np.testing.assert_allclose(t["conformation"], t["turn"])
    res = simulate_atomic(str(tmp_path / "t"), "two_motions", PDB, n=10, snr=1.0, seed=0)
    t = pd.read_csv(res["truth_csv"])
    assert {"motion_lid", "motion_nmp"} <= set(t.columns) and len(res["truth_maps"]) == 9
    assert abs(np.corrcoef(t["motion_lid"], t["motion_nmp"])[0, 1]) < 0.9


def test_domain_mask_selects_the_domain(hinge_clean):
    out, res = hinge_clean
    g = GMM.load(res["truth_gmm"]["conf_002"])
    s = build_system("hinge", PDB)
    lid = domain_atoms_mask(res["json"], PDB, g.centers_A, "LID")
    np.testing.assert_array_equal(lid, s.domain == "LID")


def test_bad_input_and_cli(tmp_path, capsys):
    with pytest.raises(InputError, match="box 32"):
        simulate_atomic(str(tmp_path / "small"), "hinge", PDB, n=5, box=32)
    with pytest.raises(InputError, match="--pdb"):
        simulate_atomic(str(tmp_path / "x"), "hinge", str(tmp_path / "missing.pdb"), n=5)
    with pytest.raises(InputError, match="system"):
        simulate_atomic(str(tmp_path / "x"), "helix", PDB, n=5)
    assert cli.main(["simulate", "--out", str(tmp_path / "nopdb"), "--kind", "hinge", "--n", "5"]) == 2
    assert "--pdb" in capsys.readouterr().err
    rc = cli.main(["simulate", "--out", str(tmp_path / "ok"), "--kind", "two_motions", "--pdb", PDB, "--n", "6",
                   "--snr", "inf"])
    assert rc == 0 and "6 two_motions particles (64 px, 1.5 A/px" in capsys.readouterr().out


def test_thermal_fluctuations_rms_correlation_and_reproducibility():
    s = build_system("hinge", PDB)
    d = thermal_displacements(s, np.arange(1, 41), 1.0, seed=5)
    assert d.shape == (40, len(s.centers_A), 3)
    rmsf = np.sqrt((d.astype(np.float64) ** 2).sum(-1).mean())
    assert 0.9 < rmsf < 1.1                                     # RMS per atom = thermal_A
    np.testing.assert_array_equal(d[3:5], thermal_displacements(s, np.array([4, 5]), 1.0, seed=5))
    assert not np.allclose(d[0], thermal_displacements(s, np.array([1]), 1.0, seed=6)[0])
    # atoms of one residue move together (80% shared), neighbours along the chain partly
    ca = np.flatnonzero(read_pdb(PDB)["name"] == "CA")
    same = [np.corrcoef(d[:, a, 0], d[:, a + 1, 0])[0, 1] for a in ca[10:30]]  # CA and its C, same residue
    far = [np.corrcoef(d[:, ca[i], 0], d[:, ca[i + 40], 0])[0, 1] for i in range(10, 30)]
    assert np.mean(same) > 0.6 and abs(np.mean(far)) < 0.2
    assert not thermal_displacements(s, np.arange(3), 0.0, seed=5).any()
    # no rigid-body part: zero weighted mean and zero weighted angular moment about the centroid
    w = s.electrons.astype(np.float64)[None, :, None]
    r = s.centers_A - (w[0] * s.centers_A).sum(0) / w.sum()
    assert np.abs((w * d).sum(1) / w.sum()).max() < 1e-4
    assert np.abs((w * np.cross(r[None], d)).sum(1) / w.sum()).max() < 1e-3


def test_thermal_field_has_no_rigid_part_left():
    """The field is superposed like an MD frame: fitting the fluctuated atoms onto the mean
    structure again (refine.remove_rigid_motion, the same Kabsch fit) moves nothing."""
    from scipion_gmmhet.engine.analysis.refine import remove_rigid_motion
    s = build_system("hinge", PDB)
    d = thermal_displacements(s, np.arange(1, 6), 1.5, seed=2).astype(np.float64)
    c0 = torch.as_tensor(s.centers_A, dtype=torch.float64)
    again = remove_rigid_motion(c0 + torch.as_tensor(d), c0, torch.as_tensor(s.electrons, dtype=torch.float64),
                                iterations=1) - c0
    assert np.abs(again.numpy() - d).max() < 1e-3
    # while a planted turn of 1 deg plus a 0.5 A shift would have been removed
    th = np.radians(1.0)
    R = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    moved = s.centers_A @ R.T + np.array([0.5, 0.0, 0.0]) + d[0] - s.centers_A
    back = remove_rigid_motion(c0 + torch.as_tensor(moved)[None], c0, torch.as_tensor(s.electrons, dtype=torch.float64),
                               iterations=1)[0] - c0
    # (the field comes back in the frame of the fit: turned by the planted 1 deg)
    assert np.abs(back.numpy() - d[0] @ R).max() < 0.01 and np.abs(moved - d[0]).max() > 0.3


def test_thermal_images_differ_and_consensus_is_wider(tmp_path, capsys):
    kw = dict(n=4, box=64, apix=1.5, snr=float("inf"), seed=3, ctf=False)
    rigid = simulate_atomic(str(tmp_path / "r"), "hinge", PDB, **kw)
    md = simulate_atomic(str(tmp_path / "m"), "hinge", PDB, thermal_A=1.5, **kw)
    with mrcfile.open(rigid["stack"]) as a, mrcfile.open(md["stack"]) as b:
        x, y = np.array(a.data), np.array(b.data)
    rel = np.abs(x - y).max() / np.abs(x).max()
    assert 0.02 < rel < 0.8                                     # same particles, fluctuated atoms
    from scipion_gmmhet.engine.io.mrc import read_map
    c0, c1 = read_map(rigid["consensus"])[0], read_map(md["consensus"])[0]
    assert c1.max() < c0.max() and abs(c1.sum() - c0.sum()) < 1e-3 * c0.sum()
    assert json.load(open(md["json"]))["thermal_A"] == 1.5
    with pytest.raises(InputError, match="thermal"):
        simulate_atomic(str(tmp_path / "x"), "hinge", PDB, thermal_A=-1, **kw)
    assert cli.main(["simulate", "--out", str(tmp_path / "c"), "--kind", "conformational", "--n", "4",
                     "--thermal", "1"]) == 2
    assert "--thermal" in capsys.readouterr().err and not (tmp_path / "c").exists()  # nothing written


def test_atomic_particle_models_are_each_particles_truth(tmp_path):
    """bench_refine's ``--model truth`` on the atomic kinds: each particle's atoms at its truth
    coordinates (mean structure), or with its own thermal displacement; same as the images'."""
    from scipion_gmmhet.engine.simulation.atomic import AtomicParticleModels
    s = build_system("two_motions", PDB)
    coords = np.array([[0.1, 0.9], [0.7, 0.2], [0.5, 0.5]])
    m = AtomicParticleModels(s, coords, np.array([1, 2, 3]))
    c, a, sg = m.gaussians(np.array([2, 0]), "cpu")
    assert c.shape == (2, len(s.centers_A), 3) and a.shape == sg.shape == (2, len(s.centers_A))
    np.testing.assert_allclose(c[1].numpy(), s.gmm(coords[0]).centers_A, atol=1e-4)
    np.testing.assert_allclose(a[0].numpy(), s.electrons)
    np.testing.assert_allclose(m.neutral_centers_A, s.gmm(coords[2]).centers_A, atol=1e-4)
    mt = AtomicParticleModels(s, coords, np.array([1, 2, 3]), thermal_A=1.0, seed=4)
    ct = mt.gaussians(np.array([1]), "cpu")[0][0].numpy()
    expect = s.centers(coords[1:2]).numpy() + thermal_displacements(s, np.array([2]), 1.0, 4,
                                                                    s.centers(coords[1:2]).numpy())
    np.testing.assert_allclose(ct, expect[0], atol=1e-4)
    # widened by the disorder (bench_refine --truth-widened): same centres, each atom's mass kept
    mw = AtomicParticleModels(s, coords, np.array([1, 2, 3]), sigma_A=1.5)
    cw, aw, sw = mw.gaussians(np.array([2, 0]), "cpu")
    np.testing.assert_allclose(cw.numpy(), c.numpy(), atol=1e-5)
    np.testing.assert_allclose(sw.numpy(), 1.5)
    np.testing.assert_allclose((aw * sw ** 3).numpy(), (a * sg ** 3).numpy(), rtol=1e-5)
    assert mw.median_sigma_A == 1.5
    from scipion_gmmhet.engine.simulation.atomic import ATOM_SIGMA_A, widened_sigma_A
    assert widened_sigma_A(0.0) == ATOM_SIGMA_A and abs(widened_sigma_A(3.0) ** 2 - ATOM_SIGMA_A ** 2 - 3.0) < 1e-12
    # the CLI writes the same thermal set
    assert cli.main(["simulate", "--out", str(tmp_path / "md"), "--kind", "hinge", "--pdb", PDB, "--n", "3",
                     "--snr", "inf", "--thermal", "0.5"]) == 0
    assert json.load(open(tmp_path / "md" / "simulation.json"))["thermal_A"] == 0.5


def test_frame_all_superposes_every_conformation_on_the_middle_one(tmp_path, capsys):
    """``frame='all'`` (gmmhet simulate --frame all): each conformation is the core-frame structure
    superposed on the middle state by all atoms (electron-weighted Kabsch), as MD frames usually
    are: its centroid stays put, a second fit moves nothing, the core turns with the motion."""
    from scipion_gmmhet.engine.analysis.refine import remove_rigid_motion
    core, allf = build_system("hinge", PDB), build_system("hinge", PDB, frame="all")
    w = torch.as_tensor(core.electrons, dtype=torch.float64)
    mid = _at(core, conformation=0.5)
    np.testing.assert_allclose(_at(allf, conformation=0.5), mid, atol=1e-3)   # the reference itself
    for c in (0.0, 1.0):
        x, x_core = _at(allf, conformation=c), _at(core, conformation=c)
        centroid = (x * core.electrons[:, None]).sum(0) / core.electrons.sum()
        assert np.abs(centroid).max() < 1e-3                                    # the middle state's (0)
        again = remove_rigid_motion(torch.as_tensor(x, dtype=torch.float64)[None],
                                    torch.as_tensor(mid, dtype=torch.float64), w, iterations=1)[0].numpy()
        assert np.abs(again - x).max() < 1e-3                                   # nothing rigid left
        # the same shape: pairwise distances kept; but the core moved (it was fixed in the core frame)
        i = np.arange(0, len(x), 37)
        d = lambda y: np.linalg.norm(y[i, None] - y[None, i], axis=-1)
        np.testing.assert_allclose(d(x), d(x_core), atol=1e-3)
        is_core = core.domain == "CORE"
        assert np.sqrt(((x - x_core)[is_core] ** 2).sum(1).mean()) > 0.3
    assert allf.moving().all() and not core.moving().all()
    with pytest.raises(InputError, match="frame"):
        build_system("hinge", PDB, frame="middle")
    # the CLI: written to simulation.json and used by domain_atoms_mask; refused for synthetic kinds
    assert cli.main(["simulate", "--out", str(tmp_path / "md"), "--kind", "hinge", "--pdb", PDB, "--n", "3",
                     "--snr", "inf", "--frame", "all"]) == 0
    assert json.load(open(tmp_path / "md" / "simulation.json"))["frame"] == "all"
    lid = domain_atoms_mask(str(tmp_path / "md" / "simulation.json"), PDB, mid, "LID")
    assert 0 < lid.sum() < len(mid)
    assert cli.main(["simulate", "--out", str(tmp_path / "c"), "--kind", "conformational", "--n", "4",
                     "--frame", "all"]) == 2
    assert "--frame" in capsys.readouterr().err and not (tmp_path / "c").exists()


def _write_models(path, atoms, frames):
    """A multi-model PDB of ``frames`` ``(F, N, 3)`` with ``atoms``' names, residues and elements."""
    element = {6.0: "C", 7.0: "N", 8.0: "O", 16.0: "S"}
    with open(path, "w") as f:
        for k, xyz in enumerate(frames, 1):
            f.write(f"MODEL     {k:4d}\n")
            for i, (x, y, z) in enumerate(xyz):
                f.write(f"ATOM  {i + 1:5d} {atoms['name'][i]:<4s} ALA A{atoms['resseq'][i]:4d}    "
                        f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {element[float(atoms['electrons'][i])]:>2s}\n")
            f.write("ENDMDL\n")
        f.write("END\n")


def test_trajectory_frames_are_superposed_drawn_and_projected(tmp_path, capsys):
    """``--kind trajectory``: the MODELs of one PDB file are the frames of a molecular-dynamics
    trajectory; each is superposed on the middle one by all atoms (whatever rigid motion the file
    has), each particle is one frame (``frame`` and ``conformation`` = frame / (F - 1) in truth.csv),
    and its image is that frame's projection."""
    hinge = build_system("hinge", PDB)                 # three states of the hinge, as frames
    states = np.stack([_at(hinge, conformation=c) for c in (0.0, 0.5, 1.0)])
    rng = np.random.default_rng(0)
    moved = states.copy()
    for k in (0, 2):                                   # the outer frames turned and moved in the file
        R = euler_to_matrix(*(np.array([v]) for v in rng.uniform(-40, 40, 3)))[0]
        moved[k] = states[k] @ R.T + rng.uniform(-5, 5, 3)
    moved[1] += np.array([3.0, -2.0, 1.0])             # the middle one only shifted
    atoms = read_pdb(PDB)
    path = str(tmp_path / "frames.pdb")
    _write_models(path, atoms, moved)
    assert read_pdb(path)["xyz_A"].shape == states[0].shape   # the first model without all_models
    traj = build_system("trajectory", path)
    allf = build_system("hinge", PDB, frame="all")     # the same superposition of the same states
    assert traj.frames_A.shape == (3,) + states[0].shape and traj.moving().all() and traj.motions == []
    for k, c in enumerate((0.0, 0.5, 1.0)):
        np.testing.assert_allclose(traj.frames_A[k], _at(allf, conformation=c), atol=5e-3)
    # a coordinate picks the nearest frame
    np.testing.assert_allclose(traj.centers(np.array([[0.3], [0.26], [0.9]])).numpy(),
                               traj.frames_A[[1, 1, 2]], atol=1e-4)

    res = simulate_atomic(str(tmp_path / "md"), "trajectory", path, n=30, snr=float("inf"), seed=2, ctf=False)
    truth = pd.read_csv(res["truth_csv"])
    assert set(truth["frame"]) == {0, 1, 2}
    np.testing.assert_allclose(truth["conformation"], truth["frame"] / 2.0)
    params = json.load(open(res["json"]))
    assert params["n_frames"] == 3 and params["motions"] == [] and params["frame"] == "all"
    with mrcfile.open(res["stack"]) as m:
        data = np.array(m.data)
    r = truth.iloc[0]
    A = torch.as_tensor(euler_to_matrix(np.array([r["rot"]]), np.array([r["tilt"]]), np.array([r["psi"]])),
                        dtype=torch.float32)
    g = traj.gmm([r["conformation"]], box=64, apix=1.5)
    c, a, sg = g.tensors()
    img = fourier_to_image(project(c, a, sg, A, 64, 1.5, origins_A=torch.tensor(
        [[r["origin_x_A"], r["origin_y_A"]]], dtype=torch.float32)), 64)[0].numpy()
    assert np.abs(img - data[0]).max() < 1e-3 * np.abs(img).max()
    from scipion_gmmhet.engine.io.mrc import read_map
    cons = read_map(res["consensus"])[0]                # every frame by its count: mass kept
    assert abs(cons.sum() - read_map(res["truth_maps"]["conf_000"])[0].sum()) < 1e-3 * cons.sum()

    # the CLI, and frames that are not one trajectory
    assert cli.main(["simulate", "--out", str(tmp_path / "cli"), "--kind", "trajectory", "--pdb", path,
                     "--n", "4", "--snr", "inf"]) == 0
    assert "4 trajectory particles" in capsys.readouterr().out
    with pytest.raises(InputError, match="one model"):
        build_system("trajectory", PDB)
    bad = str(tmp_path / "bad.pdb")
    with open(path) as f:
        lines = f.readlines()
    second = lines.index("ENDMDL\n") + 2               # drop the first atom of model 2
    with open(bad, "w") as f:
        f.writelines(lines[:second] + lines[second + 1:])
    with pytest.raises(InputError, match="model 2 has"):
        build_system("trajectory", bad)
    swapped = lines[:second] + [lines[second + 1], lines[second]] + lines[second + 2:]   # atoms 1, 2 of model 2
    with open(bad, "w") as f:
        f.writelines(swapped)
    with pytest.raises(InputError, match="model 2's atom 1 is residue 1 CA, model 1's residue 1 N"):
        build_system("trajectory", bad)
