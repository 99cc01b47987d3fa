"""Training reliability: SIGKILL mid-epoch and --resume, CUDA out-of-memory (injected on CPU),
atomic outputs and a full disk while the feature cache is written."""
from __future__ import annotations

import errno
import glob
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.training import features as features_mod
from scipion_gmmhet.engine.training import train as train_mod
from scipion_gmmhet.engine.cli import main as cli_main
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.device import AdaptiveBatch, is_oom
from scipion_gmmhet.engine.io.data import Particles
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training.config import TrainConfig
from scipion_gmmhet.engine.training.train import train

SMALL = dict(hidden=32, layers=2, batch_size=32, n_stats=100, highres_A=15.0, zdim=2, lr=1e-3)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rel"))
    r = simulate(d, "conformational", n=160, box=32, apix=5.0, snr=1.0, seed=3, n_gaussians=64)
    mid = sorted(r["truth_gmm"])[len(r["truth_gmm"]) // 2]
    return {"dir": d, "star": r["star"], "gmm": r["truth_gmm"][mid]}


def _cli(small_set, out, epochs, *extra):
    return [sys.executable, "-m", "scipion_gmmhet.engine", "train", "--particles", small_set["star"], "--gmm",
            small_set["gmm"], "--out", out, "--epochs", str(epochs), "--batch-size", "4", "--hidden", "64",
            "--layers", "2", "--seed", "3", "--zdim", "2", "--device", "cpu", "--features", "onthefly",
            "--highres", "15", "--lr", "1e-3", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_sigkill_mid_epoch_then_resume_gives_the_same_latents(small_set, tmp_path):
    """Issue 8: SIGKILL a `gmmhet train` process in the middle of an epoch (after its first
    checkpoint), `--resume` it: the latents equal an uninterrupted run's, bit for bit (CPU,
    fixed seed, one thread)."""
    epochs = 6
    ref = str(tmp_path / "ref")  # the uninterrupted run, in this process (one thread: the same numerics)
    torch.set_num_threads(1)
    assert cli_main(_cli(small_set, ref, epochs)[3:]) == 0
    epoch_s = float(pd.read_csv(os.path.join(ref, "loss.csv"))["seconds"].median())

    out = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli(small_set, out, epochs), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = os.path.join(out, "checkpoints", "epoch_0001.pt")
    t_end = time.time() + 90
    while not os.path.exists(first) and proc.poll() is None and time.time() < t_end:
        time.sleep(0.005)
    assert os.path.exists(first), "no checkpoint appeared"
    time.sleep(0.5 * epoch_s)  # into the middle of epoch 2 (or a later one on a busy machine)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "latent.npy")), "the run finished before the kill"
    done = sorted(glob.glob(os.path.join(out, "checkpoints", "epoch_*.pt")))
    assert done and len(done) <= 2
    for ck in done:  # whatever the moment of the kill, every checkpoint that looks complete loads
        assert int(torch.load(ck, weights_only=True)["epoch"]) >= 1  # format 2: no code runs
    last_done = int(os.path.basename(done[-1])[6:10])
    assert last_done < epochs

    r = subprocess.run(_cli(small_set, out, epochs, "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"epoch {last_done} done" in r.stdout, r.stdout[-2000:]
    a, b = np.load(os.path.join(ref, "latent.npy")), np.load(os.path.join(out, "latent.npy"))
    assert a.shape == (160, 2)
    np.testing.assert_array_equal(a, b)
    la, lb = pd.read_csv(os.path.join(ref, "loss.csv")), pd.read_csv(os.path.join(out, "loss.csv"))
    assert list(lb["epoch"]) == list(range(1, epochs + 1))
    np.testing.assert_array_equal(la["train_loss"].values, lb["train_loss"].values)
    assert not glob.glob(os.path.join(out, "**", "*.tmp*"), recursive=True)


# ---------------------------------------------------------------------------------- out of memory
def _train(small_set, out, **kw):
    torch.set_num_threads(1)
    p = Particles.from_star(small_set["star"])
    cfg = TrainConfig(**{**SMALL, "epochs": 2, "seed": 1, **kw})
    return train(p, GMM.load(small_set["gmm"]), cfg, out, star_path=small_set["star"])


def _oom_above(limit, kind="cuda"):
    real = train_mod._chunk_step
    calls = []

    def step(model, binner, x, b, *args, **kw):
        calls.append(int(x.shape[0]))
        if x.shape[0] > limit:
            if kind == "cuda":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            raise RuntimeError("CUDA error: out of memory (injected)")
        return real(model, binner, x, b, *args, **kw)

    return step, calls


@pytest.mark.parametrize("kind", ["cuda", "runtime"])
def test_out_of_memory_halves_the_batch_and_carries_on(small_set, tmp_path, monkeypatch, caplog, kind):
    ref = _train(small_set, str(tmp_path / "ref"), extra={"max_chunk": 8})  # a run that starts at chunks of 8
    full = _train(small_set, str(tmp_path / "full"))
    step, calls = _oom_above(8, kind)
    monkeypatch.setattr(train_mod, "_chunk_step", step)
    with caplog.at_level(logging.WARNING, logger="scipion_gmmhet"):
        r = _train(small_set, str(tmp_path / "oom"))
    assert r["chunk_size"] == 8  # 32 -> 16 -> 8
    assert calls[:2] == [32, 16] and max(calls[2:]) == 8
    msgs = [rec.getMessage() for rec in caplog.records]
    assert any("out of GPU memory with batch size 32" in m and "batch size 16" in m for m in msgs), msgs
    assert any("out of GPU memory with batch size 16" in m and "batch size 8" in m for m in msgs), msgs
    z = np.load(str(tmp_path / "oom" / "latent.npy"))
    # deterministic given the final chunk size: identical to a run that used chunks of 8 from the start
    np.testing.assert_array_equal(z, ref["latent"])
    # and the same optimisation as whole batches of 32 (gradients of chunks add up), up to rounding
    np.testing.assert_allclose(z, full["latent"], rtol=0, atol=1e-4 * float(np.abs(full["latent"]).max()) + 1e-6)
    np.testing.assert_allclose([h["train_loss"] for h in r["history"]],
                               [h["train_loss"] for h in full["history"]], rtol=1e-5)


def test_out_of_memory_even_at_batch_one_is_a_clear_error(small_set, tmp_path, monkeypatch):
    step, _ = _oom_above(0)
    monkeypatch.setattr(train_mod, "_chunk_step", step)
    with pytest.raises(InputError) as e:
        _train(small_set, str(tmp_path / "t"), epochs=1)
    msg = str(e.value)
    assert "\n" not in msg
    for frag in ("does not fit in GPU memory even with batch size 1", "--n-gauss", "--highres", "--device cpu"):
        assert frag in msg, msg


def test_out_of_memory_while_computing_features(small_set, tmp_path, monkeypatch, caplog):
    ref = _train(small_set, str(tmp_path / "ref"), epochs=1)
    real = features_mod.GradientFeatures.raw
    sizes = []

    def raw(self, b):
        sizes.append(int(b.rotations.shape[0]))
        if b.rotations.shape[0] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, b)

    monkeypatch.setattr(features_mod.GradientFeatures, "raw", raw)
    with caplog.at_level(logging.WARNING, logger="scipion_gmmhet"):
        r = _train(small_set, str(tmp_path / "oom"), epochs=1)
    assert max(s for s in sizes if s <= 16) == 16 and 64 in sizes  # the cache asked for 64, then 32, then 16
    msgs = " | ".join(rec.getMessage() for rec in caplog.records)
    assert "gradient features: out of GPU memory" in msgs and "feature statistics: out of GPU memory" in msgs
    np.testing.assert_allclose(r["latent"], ref["latent"], rtol=0, atol=1e-4 * float(np.abs(ref["latent"]).max()))


def test_is_oom_and_adaptive_batch():
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    seen = []

    def fn(i0, i1):
        if i1 - i0 > 3:
            raise torch.OutOfMemoryError("injected")
        seen.extend(range(i0, i1))

    ab = AdaptiveBatch(16, "test", "cpu")
    ab.run(10, fn)
    assert seen == list(range(10)) and ab.size == 2 and ab.halvings == 3


# ---------------------------------------------------------------------------------- atomic outputs, full disk
def test_outputs_are_atomic_and_a_full_disk_in_the_feature_cache_is_clear(small_set, tmp_path, monkeypatch):
    out = str(tmp_path / "t")
    _train(small_set, out, epochs=1, features="cache")
    names = set(os.listdir(out))
    assert {"latent.npy", "model.pt", "loss.csv", "config.json", "feature_stats.npz", "features.f16",
            "features.json", "gmm.npz"} <= names
    assert not [n for n in names if ".tmp" in n]

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(features_mod, "reserve_space", full)
    out2 = str(tmp_path / "full")
    with pytest.raises(InputError) as e:
        _train(small_set, out2, epochs=1, features="cache")
    msg = str(e.value)
    assert "disk full while writing" in msg and "features.f16" in msg and "\n" not in msg
    left = os.listdir(out2)
    assert "features.f16" not in left and "features.json" not in left and not [n for n in left if ".tmp" in n]


def test_a_cache_killed_mid_build_is_not_taken_as_complete(small_set, tmp_path, monkeypatch):
    out = str(tmp_path / "t")
    _train(small_set, out, epochs=1, features="cache")
    before = np.fromfile(os.path.join(out, "features.f16"), dtype=np.float16)

    class Killed(BaseException):
        pass

    real = features_mod.GradientFeatures.__call__
    n = {"calls": 0}

    def dies(self, b):
        n["calls"] += 1
        if n["calls"] > 1:
            raise Killed()
        return real(self, b)

    monkeypatch.setattr(features_mod.GradientFeatures, "__call__", dies)
    with pytest.raises(Killed):  # another seed -> other features -> rebuilt, dies half-way
        _train(small_set, out, epochs=1, features="cache", seed=2)
    # neither the old nor a half-written cache remains under the cache's name
    assert not os.path.exists(os.path.join(out, "features.json"))
    monkeypatch.undo()
    _train(small_set, out, epochs=1, features="cache", seed=1)
    np.testing.assert_array_equal(np.fromfile(os.path.join(out, "features.f16"), dtype=np.float16), before)
