"""Centring before training (engine/training/centering.py): shift errors of the input poses are
found against the neutral GMM, correct shifts stay exactly, and `gmmhet train` records and reuses
the corrections."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.cli import main as cli_main
from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.io.data import Particles
from scipion_gmmhet.engine.io.outputs import TrainFolder
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training import centering as ctr
from scipion_gmmhet.engine.training.config import TrainConfig
from scipion_gmmhet.engine.training.train import train
from scipion_gmmhet.engine.training.trained import load_trained

BOX, APIX = 32, 4.0


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    """200 conformational particles at SNR 1, the true middle state as neutral GMM, and a copy of
    the star whose origins are off by 1.2 px RMS (the images are the same)."""
    torch.set_num_threads(1)
    d = str(tmp_path_factory.mktemp("centre"))
    r = simulate(d, "conformational", n=200, box=BOX, apix=APIX, snr=1.0, seed=5, n_gaussians=128)
    mid = sorted(r["truth_gmm"])[len(r["truth_gmm"]) // 2]
    meta = metadata.read_particles(r["star"])
    rng = np.random.default_rng(2)
    err = rng.normal(size=(len(meta), 2)) * 1.2 * APIX / math.sqrt(2)
    shifted = meta.with_poses(None, meta.origins_A() + err)
    star_off = os.path.join(d, "shifted.star")
    metadata.write_particles(star_off, shifted)
    return {"dir": d, "star": r["star"], "star_off": star_off, "gmm": r["truth_gmm"][mid], "err": err,
            "origins": meta.origins_A()}


def test_centring_finds_shift_errors_and_keeps_correct_shifts(conf):
    neutral = GMM.load(conf["gmm"])
    p = Particles.from_star(conf["star_off"])
    c = ctr.center_particles(p, neutral)
    before = np.linalg.norm(conf["err"], axis=1)
    after = np.linalg.norm(conf["err"] + c.shifts_A, axis=1)
    assert np.median(after) < 0.4 * np.median(before), (np.median(before), np.median(after))
    assert c.n_moved > 0.7 * len(before)
    s = c.summary()
    assert s["n_particles"] == 200 and s["n_moved"] == c.n_moved and s["median_correction_A"] > 0
    # exact shifts: most particles keep them exactly (refine's evidence test)
    exact = ctr.center_particles(Particles.from_star(conf["star"]), neutral)
    unchanged = np.all(exact.shifts_A == 0, axis=1)
    assert unchanged.mean() >= 0.8, unchanged.mean()
    assert np.median(np.linalg.norm(exact.shifts_A, axis=1)) == 0.0
    # the corrections go onto the particles' origins (Angstrom, RELION origins)
    o0 = p.origins_A.clone()
    ctr.apply_centering(p, c)
    np.testing.assert_allclose((p.origins_A - o0).numpy(), c.shifts_A, atol=1e-5)


def test_symmetry_expanded_particles_are_centred_once_per_particle(conf):
    neutral = GMM.load(conf["gmm"])
    p = Particles.from_star(conf["star_off"], symmetry="C2")
    assert p.n_ops == 2
    c = ctr.center_particles(p, neutral)
    assert c.shifts_A.shape == (200, 2)
    plain = ctr.center_particles(Particles.from_star(conf["star_off"]), neutral)
    np.testing.assert_array_equal(c.shifts_A, plain.shifts_A)


def test_train_records_and_reuses_the_centring(conf, tmp_path, monkeypatch):
    out = str(tmp_path / "t")
    assert cli_main(["train", "--particles", conf["star_off"], "--gmm", conf["gmm"], "--zdim", "2", "--epochs", "1",
                     "--hidden", "32", "--layers", "1", "--batch-size", "64", "--device", "cpu", "--out", out]) == 0
    folder = TrainFolder(out)
    shifts = folder.read_centering()
    assert shifts is not None and shifts.shape == (200, 2)
    info = json.load(open(folder.config))
    assert info["train"]["center"] == "auto" and info["fingerprint"]["center"] == "auto"
    assert info["centering"]["n_moved"] == int(np.count_nonzero(np.any(shifts != 0, axis=1))) > 100
    table = pd.read_csv(folder.centering)
    assert list(table.columns) == ["row", "dx_A", "dy_A"] and table["row"].tolist() == list(range(200))
    # the input star is not changed
    np.testing.assert_allclose(metadata.read_particles(conf["star_off"]).origins_A(), conf["origins"] + conf["err"],
                               atol=1e-4)
    # encoding the same particles later applies the same centring (latents as in training)
    tm = load_trained(out)
    np.testing.assert_allclose(tm.encode_particles(conf["star_off"]), tm.latents(), atol=1e-4)
    # a resumed run reads the corrections instead of searching again
    monkeypatch.setattr(ctr, "center_particles", lambda *a, **k: pytest.fail("searched again on resume"))
    torch.set_num_threads(1)
    cfg = TrainConfig(zdim=2, epochs=2, hidden=32, layers=1, batch_size=64, n_stats=1000)
    train(Particles.from_star(conf["star_off"]), GMM.load(conf["gmm"]), cfg, out, resume=True,
          star_path=conf["star_off"])
    np.testing.assert_array_equal(folder.read_centering(), shifts)


def test_center_off_and_bad_values(conf, tmp_path):
    out = str(tmp_path / "off")
    assert cli_main(["train", "--particles", conf["star_off"], "--gmm", conf["gmm"], "--zdim", "2", "--epochs", "1",
                     "--hidden", "32", "--layers", "1", "--batch-size", "64", "--device", "cpu", "--center", "off",
                     "--out", out]) == 0
    assert TrainFolder(out).read_centering() is None
    assert json.load(open(TrainFolder(out).config))["centering"] is None
    # a run folder whose centering.csv is damaged reads as "no corrections", not a crash
    f = TrainFolder(str(tmp_path / "bad"))
    os.makedirs(f.folder)
    with open(f.centering, "w") as fh:
        fh.write("row,dx_A,dy_A\n0,1.0\n")
    assert f.read_centering() is None
    f.write_centering(np.array([[0.5, -0.25], [0.0, 0.0]]))
    np.testing.assert_array_equal(f.read_centering(), [[0.5, -0.25], [0.0, 0.0]])


def test_exact_shifts_train_exactly_as_without_centring(conf, tmp_path):
    """At exact poses the search still moves a few particles by their conformation; the
    gold-standard check finds that the half maps do not agree better and keeps every shift, so
    the run is the same as --center off (latents bit for bit)."""
    args = ["--zdim", "2", "--epochs", "1", "--hidden", "32", "--layers", "1", "--batch-size", "64", "--device",
            "cpu", "--particles", conf["star"], "--gmm", conf["gmm"]]
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    torch.set_num_threads(1)
    assert cli_main(["train", *args, "--out", on]) == 0
    assert cli_main(["train", *args, "--center", "off", "--out", off]) == 0
    c = json.load(open(TrainFolder(on).config))["centering"]
    assert c["n_moved"] == 0 and c["gate_accepted"] is False and c["n_found"] >= 0
    assert not np.any(TrainFolder(on).read_centering())
    np.testing.assert_array_equal(TrainFolder(on).read_latents(), TrainFolder(off).read_latents())


def test_gate_keeps_real_corrections(conf, tmp_path):
    """With 1.2 px shift errors the centred half maps agree better: the check keeps them."""
    p = Particles.from_star(conf["star_off"])
    c = ctr.gold_standard(ctr.center_particles(p, GMM.load(conf["gmm"])), conf["star_off"], p)
    assert c.gate.accepted and c.gate.t > c.gate.t_min and c.n_moved == c.n_found > 100
    assert c.summary()["gate_accepted"] is True
