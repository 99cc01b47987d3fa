"""Training's GPU path, checked on the CPU: mixed precision (bf16 close to float32, fp16 refused
on the CPU), torch.compile (works or falls back), and the prefetching loader (bit-identical
results, errors of the reading thread reach the caller)."""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.io import data as data_mod
from scipion_gmmhet.engine.training import acceleration
from scipion_gmmhet.engine.training import train as train_mod
from scipion_gmmhet.engine.cli import build_parser, main as cli_main
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.data import ArrayImages, Particles
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.training.prefetch import Prefetcher
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training.config import TrainConfig
from scipion_gmmhet.engine.training.train import train
from scipion_gmmhet.engine.training.trained import load_trained

SMALL = dict(hidden=32, layers=2, batch_size=16, n_stats=64, highres_A=15.0, zdim=2, lr=1e-3, epochs=2, seed=2)


@pytest.fixture(scope="module")
def gpu_set(tmp_path_factory):
    """96 conformational particles, box 32, 64 Gaussians; plus a float32 reference run."""
    d = tmp_path_factory.mktemp("gpu")
    r = simulate(str(d), "conformational", n=96, box=32, apix=5.0, snr=1.0, seed=4, n_gaussians=64)
    mid = sorted(r["truth_gmm"])[len(r["truth_gmm"]) // 2]
    s = {"star": r["star"], "gmm": r["truth_gmm"][mid], "ref_dir": str(d / "ref")}
    s["ref"] = _train(s, s["ref_dir"])
    return s


def _train(s, out, **kw):
    torch.set_num_threads(1)
    p = Particles.from_star(s["star"])
    return train(p, GMM.load(s["gmm"]), TrainConfig(**{**SMALL, **kw}), out, star_path=s["star"])


def _layout(out):
    return sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)


def _train_losses(out):
    return pd.read_csv(os.path.join(out, "loss.csv"))["train_loss"].to_numpy()


# ------------------------------------------------------------------------------- mixed precision
def test_bf16_training_is_close_to_float32(gpu_set, tmp_path):
    out = str(tmp_path / "bf16")
    r = _train(gpu_set, out, amp="bf16")
    ref = gpu_set["ref"]
    z = np.load(os.path.join(out, "latent.npy"))
    assert z.shape == (96, 2) and z.dtype == np.float32 and np.isfinite(z).all()
    losses = np.array([h["train_loss"] for h in r["history"]])
    ref_losses = np.array([h["train_loss"] for h in ref["history"]])
    assert np.isfinite(losses).all() and np.isfinite([h["val_loss"] for h in r["history"]]).all()
    assert abs(losses[-1] - ref_losses[-1]) < 0.05, (losses, ref_losses)
    assert not np.array_equal(z, ref["latent"])  # it did run in another precision
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["train"]["amp"] == "bf16"
    assert _layout(out) == _layout(gpu_set["ref_dir"])
    tm = load_trained(out)  # float32 model, loads as any other
    assert tm.config["amp"] == "bf16"
    c, _, _ = tm.decode(torch.as_tensor(z[:3]))
    assert c.dtype == torch.float32 and torch.isfinite(c).all()


def test_fp16_on_cpu_is_a_one_line_input_error(gpu_set, tmp_path):
    with pytest.raises(InputError) as e:
        _train(gpu_set, str(tmp_path / "fp16"), amp="fp16")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--amp fp16") and "bf16" in msg and "off" in msg
    with pytest.raises(InputError, match="--amp 'fp32'"):
        _train(gpu_set, str(tmp_path / "bad"), amp="fp32")
    rc = cli_main(["train", "--particles", gpu_set["star"], "--gmm", gpu_set["gmm"], "--out",
                   str(tmp_path / "cli"), "--device", "cpu", "--amp", "fp16"])
    assert rc == 2


def test_loss_scaling_with_chunks_and_out_of_memory_retries(gpu_set, tmp_path, monkeypatch):
    """fp16's GradScaler path, run on the CPU with bf16: a power-of-two loss scale is exact, so
    scaled chunked gradients (with an out-of-memory retry) give the unscaled run bit for bit."""
    plain = _train(gpu_set, str(tmp_path / "plain"), amp="bf16", extra={"max_chunk": 4})
    real_init, real_step = acceleration.Amp.__init__, train_mod._chunk_step
    sizes = []

    def init(self, mode, device):
        real_init(self, mode, device)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def step(model, binner, x, b, *args, **kw):
        sizes.append(int(x.shape[0]))
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_step(model, binner, x, b, *args, **kw)

    monkeypatch.setattr(acceleration.Amp, "__init__", init)
    monkeypatch.setattr(train_mod, "_chunk_step", step)
    out = str(tmp_path / "scaled")
    r = _train(gpu_set, out, amp="bf16")
    assert sizes[:3] == [16, 8, 4] and r["chunk_size"] == 4
    np.testing.assert_array_equal(r["latent"], plain["latent"])
    assert [h["train_loss"] for h in r["history"]] == [h["train_loss"] for h in plain["history"]]
    ck_dir = os.path.join(out, "checkpoints")
    ck = torch.load(os.path.join(ck_dir, sorted(os.listdir(ck_dir))[-1]), weights_only=True)
    assert ck["grad_scaler"]["scale"] == 2.0 ** 10  # saved for --resume


def test_cli_options_and_old_configs():
    args = build_parser().parse_args(["train", "--particles", "p.star", "--gmm", "g", "--out", "o", "--amp", "bf16",
                                      "--compile", "--no-prefetch"])
    assert (args.amp, args.compile, args.prefetch) == ("bf16", True, False)
    args = build_parser().parse_args(["train", "--particles", "p.star", "--gmm", "g", "--out", "o"])
    assert (args.amp, args.compile, args.prefetch) == ("off", False, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--particles", "p", "--gmm", "g", "--out", "o", "--amp", "fp8"])
    old = TrainConfig().to_dict()
    for k in ("amp", "compile", "prefetch"):
        del old[k]
    cfg = TrainConfig.from_dict(old)  # a config.json written before these options
    assert (cfg.amp, cfg.compile, cfg.prefetch) == ("off", False, True)


# ------------------------------------------------------------------------------------- prefetch
def test_prefetch_on_and_off_are_bit_identical(gpu_set, tmp_path):
    out = str(tmp_path / "noprefetch")
    _train(gpu_set, out, prefetch=False)
    ref = gpu_set["ref_dir"]
    np.testing.assert_array_equal(np.load(os.path.join(out, "latent.npy")), np.load(os.path.join(ref, "latent.npy")))
    np.testing.assert_array_equal(_train_losses(out), _train_losses(ref))


def test_prefetch_with_onthefly_features_and_chunks_is_bit_identical(gpu_set, tmp_path):
    kw = dict(features="onthefly", epochs=1, extra={"max_chunk": 5})  # chunks of 5 slice the prefetched batches
    on, off = _train(gpu_set, str(tmp_path / "on"), **kw), _train(gpu_set, str(tmp_path / "off"), prefetch=False, **kw)
    assert on["chunk_size"] == off["chunk_size"] == 5
    np.testing.assert_array_equal(on["latent"], off["latent"])
    assert [h["train_loss"] for h in on["history"]] == [h["train_loss"] for h in off["history"]]


def test_prefetcher_order_errors_and_early_exit():
    seen = []

    def load(j):
        seen.append(threading.current_thread().name)
        if j == 3:
            raise InputError("stack.mrcs: NaN or Inf pixel values in image 4 (injected)")
        return j * 10

    got = []
    with pytest.raises(InputError, match="image 4"):
        for v in Prefetcher(load, range(6), depth=2):
            got.append(v)
    assert got == [0, 10, 20]  # the results before the failing job arrive first, in order
    assert set(seen) == {"gmmhet-prefetch"}  # read on the background thread
    assert list(Prefetcher(lambda j: j + 1, [1, 2, 3], enabled=False)) == [2, 3, 4]

    before = threading.active_count()
    with Prefetcher(lambda j: (time.sleep(0.01), j)[1], range(100), depth=2) as pf:
        for v in pf:
            if v == 2:
                break  # the consumer leaves early: the thread stops
    assert threading.active_count() == before


def test_nan_image_read_on_the_prefetch_thread_reaches_the_caller():
    imgs = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    imgs[5, 3, 3] = np.nan
    p = Particles(ArrayImages(imgs), np.tile(np.eye(3), (8, 1, 1)), np.zeros((8, 2)), 16, 4.0, ctf_mode="none")
    got = []
    with pytest.raises(InputError, match="NaN or Inf pixel values in image particle row 6"):
        for host in Prefetcher(p.read, [np.arange(0, 4), np.arange(4, 8)]):
            got.append(p.to_device(host))
    assert len(got) == 1 and got[0].F_img.shape == (4, 16, 9)


def test_an_error_in_the_training_prefetch_thread_reaches_train(gpu_set, tmp_path, monkeypatch):
    real = data_mod.Particles.read
    threads = []

    def read(self, items):
        name = threading.current_thread().name
        if name == "gmmhet-prefetch":
            threads.append(name)
            if len(threads) == 3:
                raise InputError("particles.mrcs: cannot read image (injected)")
        return real(self, items)

    monkeypatch.setattr(data_mod.Particles, "read", read)
    with pytest.raises(InputError, match="injected"):
        _train(gpu_set, str(tmp_path / "t"), epochs=1)
    assert len(threads) == 3
    assert not [t for t in threading.enumerate() if t.name == "gmmhet-prefetch"]


# -------------------------------------------------------------------------------------- compile
def test_compile_failure_falls_back_to_the_same_eager_run(gpu_set, tmp_path, monkeypatch, caplog):
    def broken(fn, *a, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error (injected)\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    out = str(tmp_path / "fallback")
    with caplog.at_level(logging.WARNING, logger="scipion_gmmhet"):
        r = _train(gpu_set, out, compile=True)
    msgs = [rec.getMessage() for rec in caplog.records if "--compile" in rec.getMessage()]
    assert msgs and "training without it" in msgs[0] and "\n" not in msgs[0], msgs
    assert r["compiled"] is False
    # the trial left weights, buffers and random generators untouched: identical to the eager reference
    np.testing.assert_array_equal(r["latent"], gpu_set["ref"]["latent"])
    assert _layout(out) == _layout(gpu_set["ref_dir"])


def test_compile_trains_and_saves_plain_state_dicts(gpu_set, tmp_path):
    out = str(tmp_path / "compiled")
    t0 = time.time()
    r = _train(gpu_set, out, compile=True)
    dt = time.time() - t0
    assert _layout(out) == _layout(gpu_set["ref_dir"])
    assert np.isfinite(r["latent"]).all()
    ref = [h["train_loss"] for h in gpu_set["ref"]["history"]]
    if r["compiled"]:  # same computation up to the compiler's rounding
        np.testing.assert_allclose([h["train_loss"] for h in r["history"]], ref, rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(r["latent"], gpu_set["ref"]["latent"])
    ck_dir = os.path.join(out, "checkpoints")
    ck = torch.load(os.path.join(ck_dir, sorted(os.listdir(ck_dir))[-1]), weights_only=True)
    payload = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    ref_keys = set(torch.load(os.path.join(gpu_set["ref_dir"], "model.pt"), weights_only=True)["state_dict"])
    for sd in (ck["model"], payload["state_dict"]):
        assert set(sd) == ref_keys and not [k for k in sd if "_orig_mod" in k]
    tm = load_trained(out)
    np.testing.assert_array_equal(tm.latents(), r["latent"])
    print(f"compile run {dt:.1f} s (compiled: {r['compiled']})")
