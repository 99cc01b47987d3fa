"""Training: learning a conformational coordinate, exact resume, loading API, CLI train/eval."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from scipion_gmmhet.engine.cli import main as cli_main
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.data import Particles
from scipion_gmmhet.engine.model.gmm import GMM, project
from scipion_gmmhet.engine.io.mrc import read_map, write_map
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training.config import TrainConfig
from scipion_gmmhet.engine.training.train import train
from scipion_gmmhet.engine.training.trained import load_trained

SMALL = dict(hidden=64, layers=2, batch_size=32, n_stats=200)


@pytest.fixture(scope="module")
def conf_set(tmp_path_factory):
    """300 conformational particles, box 32, ~110 Gaussians; the neutral GMM is the true middle state."""
    d = str(tmp_path_factory.mktemp("conf"))
    r = simulate(d, "conformational", n=300, box=32, apix=5.0, snr=1.0, seed=3, n_gaussians=128)
    mid = sorted(r["truth_gmm"])[len(r["truth_gmm"]) // 2]
    return {"dir": d, "star": r["star"], "gmm": r["truth_gmm"][mid], "truth": pd.read_csv(r["truth_csv"])}


def _train(conf_set, out, resume=False, **kw):
    torch.set_num_threads(1)
    p = Particles.from_star(conf_set["star"])
    cfg = TrainConfig(**{**SMALL, **kw})
    return train(p, GMM.load(conf_set["gmm"]), cfg, out, resume=resume, star_path=conf_set["star"])


def test_short_training_learns_conformation(conf_set, tmp_path):
    out = str(tmp_path / "t")
    r = _train(conf_set, out, epochs=8, zdim=2, lr=1e-3)
    z = np.load(os.path.join(out, "latent.npy"))
    assert z.shape == (300, 2) and z.dtype == np.float32
    zc = z - z.mean(0)
    pc1 = zc @ np.linalg.svd(zc, full_matrices=False)[2][0]
    rho = abs(spearmanr(pc1, conf_set["truth"]["conformation"]).correlation)
    assert rho > 0.7, rho
    loss = pd.read_csv(os.path.join(out, "loss.csv"))
    assert list(loss.columns) == ["epoch", "train_loss", "val_loss", "seconds", "best"]
    assert len(loss) == 8 and loss["val_loss"].notna().all()
    # early stopping: the kept model is the epoch of the lowest validation loss
    assert loss["best"].sum() == 1 and loss["best"].iloc[int(loss["val_loss"].idxmin())] == 1
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["best_epoch"] == int(loss["epoch"][loss["best"] == 1].iloc[0]) == r["info"]["best_epoch"]
    assert 1 <= summary["effective_dim"] <= 2 and summary["loss"] == "corr" and summary["prior"] == "kl"
    assert "band_reason" in summary and len(summary["latent_pc_variance"]) == 2
    assert loss["train_loss"].iloc[-1] < loss["train_loss"].iloc[0]
    # the loading API
    tm = load_trained(out)
    n_gauss = len(GMM.load(conf_set["gmm"]))
    assert tm.zdim == 2 and len(tm.neutral) == n_gauss
    np.testing.assert_array_equal(tm.latents(), z)
    c, a, s = tm.decode(torch.zeros(3, 2))
    assert torch.equal(c[1], torch.as_tensor(tm.neutral.centers_A))
    g = tm.gmm_at(z[0])
    assert isinstance(g, GMM) and len(g) == n_gauss
    enc = tm.encode_particles(conf_set["star"])
    np.testing.assert_allclose(enc, z, atol=0.05 * float(np.abs(z).max()) + 1e-3)
    assert r["info"]["n_items"] == 300


def test_resume_gives_identical_latents(conf_set, tmp_path):
    full = str(tmp_path / "full")
    _train(conf_set, full, epochs=3, seed=5)
    part = str(tmp_path / "part")
    _train(conf_set, part, epochs=2, seed=5)      # "interrupted" after 2 epochs
    os.remove(os.path.join(part, "latent.npy"))
    _train(conf_set, part, epochs=3, seed=5, resume=True)
    a, b = np.load(os.path.join(full, "latent.npy")), np.load(os.path.join(part, "latent.npy"))
    np.testing.assert_array_equal(a, b)
    la, lb = pd.read_csv(os.path.join(full, "loss.csv")), pd.read_csv(os.path.join(part, "loss.csv"))
    np.testing.assert_allclose(la["train_loss"], lb["train_loss"], rtol=0, atol=1e-6)
    ckpts = sorted(os.listdir(os.path.join(part, "checkpoints")))
    assert ckpts == ["epoch_0002.pt", "epoch_0003.pt"]
    assert not [f for f in os.listdir(part) if f.endswith(".tmp")]
    # resuming with other settings is refused
    with pytest.raises(InputError, match="resume"):
        _train(conf_set, part, epochs=4, seed=5, resume=True, lr=5e-3)


def test_cli_train_and_eval(conf_set, tmp_path):
    out = str(tmp_path / "cli")
    rc = cli_main(["train", "--particles", conf_set["star"], "--gmm", conf_set["gmm"], "--zdim", "3", "--epochs", "1",
                   "--batch-size", "64", "--hidden", "32", "--layers", "1", "--device", "cpu", "--changes",
                   "positions,amplitudes,widths", "--features", "onthefly", "--out", out])
    assert rc == 0
    for f in ("latent.npy", "model.pt", "loss.csv", "config.json", "gmm.npz"):
        assert os.path.exists(os.path.join(out, f)), f
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["train"]["changes"] == ["positions", "amplitudes", "widths"] and cfg["n_items"] == 300
    assert np.load(os.path.join(out, "latent.npy")).shape == (300, 3)
    # eval at latent 0 renders the neutral model
    m0 = str(tmp_path / "z0.mrc")
    assert cli_main(["eval", "--train", out, "--z", "0,0,0", "--out", m0]) == 0
    vol, apix = read_map(m0)
    neutral = GMM.load(conf_set["gmm"])
    np.testing.assert_allclose(vol, neutral.render(), rtol=1e-4, atol=1e-4 * float(np.abs(vol).max()))
    assert apix == pytest.approx(5.0)
    zf = tmp_path / "z.txt"
    zf.write_text("0 0 0\n1.0, -0.5, 0.2\n")
    assert cli_main(["eval", "--train", out, "--z-file", str(zf), "--out", str(tmp_path / "pts.mrc"),
                     "--box", "40", "--apix", "4"]) == 0
    v1, a1 = read_map(str(tmp_path / "pts_001.mrc"))
    assert v1.shape == (40, 40, 40) and a1 == pytest.approx(4.0)
    assert os.path.exists(tmp_path / "pts_000.mrc")
    # bad inputs: one-line errors, exit status 2
    assert cli_main(["eval", "--train", out, "--z", "0,0", "--out", m0]) == 2
    assert cli_main(["train", "--particles", conf_set["star"], "--gmm", conf_set["gmm"], "--zdim", "0",
                     "--out", str(tmp_path / "bad")]) == 2


def test_mask_selecting_nothing_and_symmetry_rows(conf_set, tmp_path):
    mask = str(tmp_path / "empty.mrc")
    write_map(mask, np.zeros((32, 32, 32), np.float32), 5.0)
    with pytest.raises(InputError, match="selects none"):
        _train(conf_set, str(tmp_path / "m"), epochs=1, mask=mask)
    # symmetry expansion: n_particles x n_ops latent rows, particle-major
    torch.set_num_threads(1)
    p = Particles.from_star(conf_set["star"], symmetry="C2")
    assert len(p) == 600
    out = str(tmp_path / "sym")
    train(p, GMM.load(conf_set["gmm"]), TrainConfig(**{**SMALL, "epochs": 1, "symmetry": "C2"}), out)
    assert np.load(os.path.join(out, "latent.npy")).shape == (600, 4)


def test_symmetry_expansion_with_focus_mask_sees_each_subunit(tmp_path):
    """C2 dimer whose two flaps are present or absent independently: with symmetry expansion and a
    mask on one asymmetric unit, latent row i*2+s tells whether flap s of particle i is present."""
    from scipion_gmmhet.engine.conventions import euler_to_matrix, fourier_to_image
    from scipion_gmmhet.engine.io.data import ArrayImages
    from scipion_gmmhet.engine.model.symmetry import symmetry_operators
    torch.set_num_threads(1)
    box, apix, n = 32, 5.0, 240
    rng = np.random.default_rng(0)
    ops = symmetry_operators("C2")
    body = rng.normal(scale=6.0, size=(20, 3)) + np.array([14.0, 0.0, 0.0])
    flap = rng.normal(scale=3.0, size=(8, 3)) + np.array([22.0, 18.0, 6.0])
    asu = np.concatenate([body, flap])
    centers = np.concatenate([asu @ op.T for op in ops])  # copy s = S_s @ asu
    is_flap = np.tile(np.r_[np.zeros(20, bool), np.ones(8, bool)], 2)
    copy = np.repeat([0, 1], 28)
    sig = np.full(56, 5.0)
    present = rng.integers(0, 2, size=(n, 2))  # flap of copy s present in particle i
    amps = np.ones((n, 56))
    for s in range(2):
        amps[:, is_flap & (copy == s)] = present[:, s:s + 1]
    rot = euler_to_matrix(rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                          rng.uniform(-180, 180, n)).astype(np.float32)
    F = project(torch.as_tensor(centers, dtype=torch.float32).expand(n, -1, -1), torch.as_tensor(amps, dtype=torch.float32),
                torch.as_tensor(sig, dtype=torch.float32).expand(n, -1), torch.as_tensor(rot), box, apix)
    img = fourier_to_image(F, box).numpy()
    img = img + 0.3 * img.std() * rng.normal(size=img.shape)
    neutral_amps = np.where(is_flap, 0.5, 1.0)
    neutral = GMM(centers, neutral_amps, sig, box, apix)
    mask = np.zeros((box, box, box), np.float32)
    for c in centers[copy == 0]:
        i = np.rint(c / apix).astype(int) + box // 2
        mask[i[2], i[1], i[0]] = 1.0
    mask_path = str(tmp_path / "asu.mrc")
    write_map(mask_path, mask, apix)
    p = Particles(ArrayImages(img.astype(np.float32)), rot, np.zeros((n, 2)), box, apix, ctf_mode="none", sym_ops=ops)
    out = str(tmp_path / "sym")
    cfg = TrainConfig(zdim=1, epochs=6, lr=1e-3, changes=("amplitudes",), mask=mask_path, symmetry="C2",
                      highres_A=12.0, **SMALL)
    r = train(p, neutral, cfg, out)
    assert 28 <= r["info"]["n_mobile"] <= 31  # copy 0, plus any copy-1 body Gaussian sharing a voxel
    z = np.load(os.path.join(out, "latent.npy"))[:, 0]
    assert z.shape == (2 * n,)
    rho = spearmanr(z, present.reshape(-1)).correlation  # particle-major rows: i*2+s
    assert abs(rho) > 0.7, rho
    # the wrong pairing (copy 1-s) is not what the latent follows
    assert abs(spearmanr(z, present[:, ::-1].reshape(-1)).correlation) < 0.3
