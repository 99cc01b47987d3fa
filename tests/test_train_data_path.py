"""Training's GPU data path and step bookkeeping, checked on the CPU (issue 14): the threaded
block-shuffled loader, no host read-back inside a step, the automatic batch size, projection
precision, a NaN loss stopping the run, and a feature table held on the device."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.data import Particles
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training import train as train_mod
from scipion_gmmhet.engine.training.config import TrainConfig
from scipion_gmmhet.engine.training.features import FeatureCache, FeatureSource
from scipion_gmmhet.engine.training.train import train

SMALL = dict(hidden=32, layers=2, batch_size=16, n_stats=64, highres_A=15.0, zdim=2, lr=1e-3, epochs=2, seed=2)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("datapath")
    r = simulate(str(d), "conformational", n=96, box=32, apix=5.0, snr=1.0, seed=4, n_gaussians=64)
    mid = sorted(r["truth_gmm"])[len(r["truth_gmm"]) // 2]
    return {"star": r["star"], "gmm": r["truth_gmm"][mid]}


def _train(s, out, **kw):
    torch.set_num_threads(1)
    return train(Particles.from_star(s["star"]), GMM.load(s["gmm"]), TrainConfig(**{**SMALL, **kw}), out,
                 star_path=s["star"])


def test_threaded_loader_results_do_not_depend_on_the_number_of_threads(small_set, tmp_path):
    r1 = _train(small_set, str(tmp_path / "t1"), loader="threads", loader_threads=1)
    r3 = _train(small_set, str(tmp_path / "t3"), loader="threads", loader_threads=3)
    assert np.array_equal(r1["latent"], r3["latent"])
    assert [h["train_loss"] for h in r1["history"]] == [h["train_loss"] for h in r3["history"]]
    assert np.isfinite(r1["latent"]).all()


def test_unknown_loader_is_refused(small_set, tmp_path):
    with pytest.raises(InputError, match="loader 'fast'"):
        _train(small_set, str(tmp_path / "bad"), loader="fast", epochs=1)


def test_no_host_read_back_inside_the_steps(small_set, tmp_path, monkeypatch):
    """The number of tensor -> host reads per epoch does not grow with the number of steps."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__float__", "cpu", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            counts["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    per_epoch = {}
    real_epoch = train_mod._train_epoch
    for bs in (8, 32):  # 12 vs 3 steps per epoch
        def epoch_counted(run, items, epoch):
            before = counts["n"]
            out = real_epoch(run, items, epoch)
            per_epoch.setdefault(run.cfg.batch_size, []).append(counts["n"] - before)
            return out
        monkeypatch.setattr(train_mod, "_train_epoch", epoch_counted)
        _train(small_set, str(tmp_path / f"b{bs}"), batch_size=bs, log_every=0)
    assert per_epoch[8] == per_epoch[32], per_epoch  # a fixed number per epoch (the epoch's loss)
    assert max(per_epoch[8]) <= 2


def test_automatic_batch_size_is_64_on_the_cpu_with_the_rate_unchanged(small_set, tmp_path):
    out = str(tmp_path / "auto")
    r = _train(small_set, out, batch_size=0, epochs=1)
    assert r["config"]["batch_size"] == 64 and r["config"]["lr"] == SMALL["lr"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["train"]["batch_size"] == 64
    r2 = _train(small_set, out, batch_size=0, epochs=2)  # resumed with auto: same settings accepted
    assert len(r2["history"]) == 2


def test_bf16_projection_trains_close_to_fp32(small_set, tmp_path):
    ref = _train(small_set, str(tmp_path / "fp32"))
    low = _train(small_set, str(tmp_path / "bf16"), proj_precision="bf16")
    a = np.array([h["train_loss"] for h in ref["history"]])
    b = np.array([h["train_loss"] for h in low["history"]])
    assert np.isfinite(b).all() and np.abs(a - b).max() < 0.01 and not np.array_equal(a, b)
    with pytest.raises(InputError, match="--proj-precision 'int8'"):
        _train(small_set, str(tmp_path / "bad"), proj_precision="int8")


def test_nan_loss_stops_with_one_line(small_set, tmp_path, monkeypatch):
    real = train_mod.project

    def nan_project(*a, **k):
        return real(*a, **k) * float("nan")
    monkeypatch.setattr(train_mod, "project", nan_project)
    with pytest.raises(InputError) as e:
        _train(small_set, str(tmp_path / "nan"), epochs=1)
    assert "training loss is nan in epoch 1" in str(e.value) and "\n" not in str(e.value)


def test_resident_feature_table_gives_the_cached_features(small_set, tmp_path):
    out = str(tmp_path / "res")
    _train(small_set, out, epochs=1)
    p = Particles.from_star(small_set["star"])
    p.crop(SMALL["highres_A"])
    cache = FeatureCache(out)
    cache.array = np.memmap(cache.path, dtype=np.float16, mode="r").reshape(len(p), -1)
    src = FeatureSource(p, None, cache, torch.device("cpu"))
    items = np.array([3, 10, 11, 40, 95])
    x_host, _ = src(items)
    src.resident = torch.from_numpy(np.array(cache.array))
    assert src.read_features(items) is None
    x_dev, b = src(items)
    assert torch.equal(x_host, x_dev) and x_dev.dtype == torch.float32


def test_batch_size_probe_runs_real_training_steps_and_scales_the_rate(small_set, tmp_path, monkeypatch):
    """The probe's trial (a real forward/backward at each size) on the CPU via the test hook, with
    the size caps lifted and a clock under which bigger batches are faster: batch 128 is chosen
    and the learning rate doubles (linear rule)."""
    from scipion_gmmhet.engine.training import batching
    seen = []
    real = batching.probe_batch_size

    def probe(trial, device, **kw):
        kw["max_batch"], kw["n_items"] = 128, 4096  # lift the caps of this 96-particle set
        b, tried = real(trial, device, **kw, clock=_fake_clock(seen))
        return b, tried
    monkeypatch.setattr(train_mod, "probe_batch_size", probe)
    r = _train(small_set, str(tmp_path / "probe"), batch_size=0, epochs=1, extra={"probe_cpu": True})
    assert seen and r["config"]["batch_size"] == 128
    assert r["config"]["lr"] == pytest.approx(SMALL["lr"] * 2)
    assert np.isfinite(r["latent"]).all()


def _fake_clock(seen):
    """A clock under which every timed span lasts 5 ms whatever the batch size (a GPU with room)."""
    state = {"t": 0.0}

    def clock():
        seen.append(state["t"])
        state["t"] += 0.005
        return state["t"]
    return clock
