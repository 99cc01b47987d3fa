"""Training with several processes (torch.distributed, DDP) launched exactly as the Scipion plugin
does (``python -m torch.distributed.run --standalone --nproc_per_node=2 -m scipion_gmmhet.engine
train ...``), on CPU with the gloo backend.

Two processes split every global batch (positions r, r + 2, ... of the same seeded batches as
one process) and each process's loss is scaled so that DDP's gradient average is the mean over
the global batch: the optimisation is the one-process one up to the order of floating-point
sums. Tolerance: Adam amplifies rounding differences in gradients whose true value is ~0 (its
step is ~lr whatever the gradient's size), so after 4 epochs of 12 steps the latents agree to
about 0.2-0.5% of their range (measured 0.17-0.55%); the test allows 2% of max |z|, requires a
per-dimension correlation > 0.999 and the loss curves to agree to 1e-4. Resuming a
2-process run from a checkpoint is exact (same processes, same sums).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.training.distributed import Dist, init_from_env
from scipion_gmmhet.engine.io.data import Particles
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training.config import TrainConfig
from scipion_gmmhet.engine.training.train import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ARGS = dict(epochs=4, batch_size=16, hidden=32, layers=2, seed=3, zdim=2, highres_A=15.0, lr=1e-3, n_stats=1000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ddp"))
    r = simulate(d, "conformational", n=150, box=32, apix=5.0, snr=1.0, seed=3, n_gaussians=64)
    mid = sorted(r["truth_gmm"])[len(r["truth_gmm"]) // 2]
    return {"star": r["star"], "gmm": r["truth_gmm"][mid]}


def _torchrun(tiny, out, epochs, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scipion_gmmhet.engine", "train", "--particles", tiny["star"], "--gmm", tiny["gmm"], "--out", out,
           "--epochs", str(epochs), "--batch-size", str(ARGS["batch_size"]), "--hidden", str(ARGS["hidden"]),
           "--layers", str(ARGS["layers"]), "--seed", str(ARGS["seed"]), "--zdim", str(ARGS["zdim"]),
           "--highres", str(ARGS["highres_A"]), "--lr", str(ARGS["lr"]), "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p


def test_two_processes_match_one_and_resume(tiny, tmp_path):
    torch.set_num_threads(1)
    one = train(Particles.from_star(tiny["star"]), GMM.load(tiny["gmm"]), TrainConfig(**ARGS),
                str(tmp_path / "one"), star_path=tiny["star"])
    two = str(tmp_path / "two")
    p = _torchrun(tiny, two, ARGS["epochs"])
    assert "2 process(es)" in p.stdout
    z1, z2 = one["latent"], np.load(os.path.join(two, "latent.npy"))
    assert z2.shape == z1.shape == (150, 2)  # gathered in star order
    scale = float(np.abs(z1).max())
    err = float(np.abs(z1 - z2).max())
    assert err <= 0.02 * scale, (err, scale)
    for k in range(z1.shape[1]):
        assert np.corrcoef(z1[:, k], z2[:, k])[0, 1] > 0.999
    l1 = [h["train_loss"] for h in one["history"]]
    l2 = pd.read_csv(os.path.join(two, "loss.csv"))["train_loss"].values
    np.testing.assert_allclose(l2, l1, rtol=0, atol=1e-4)
    # rank 0 alone wrote the outputs; the feature cache was built by both ranks into one file
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["epoch_0003.pt", "epoch_0004.pt"]
    f1 = np.fromfile(str(tmp_path / "one" / "features.f16"), dtype=np.float16)
    f2 = np.fromfile(os.path.join(two, "features.f16"), dtype=np.float16)  # other batches: float16 last bits
    np.testing.assert_allclose(f2.astype(np.float32), f1.astype(np.float32), rtol=2e-3, atol=1e-3)
    assert not [n for n in os.listdir(two) if ".tmp" in n]

    # resume a 2-process run from its epoch-3 checkpoint (as after a kill during epoch 4): the same latents
    os.remove(os.path.join(two, "checkpoints", "epoch_0004.pt"))
    os.remove(os.path.join(two, "latent.npy"))
    r = _torchrun(tiny, two, ARGS["epochs"], "--resume")
    assert "epoch 3 done" in r.stdout
    np.testing.assert_array_equal(np.load(os.path.join(two, "latent.npy")), z2)


def test_one_process_dist_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = init_from_env("cpu")
    assert not d.enabled and d.is_main and d.device == torch.device("cpu")
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert d.gather_rows(x, 3) is x and d.block(10) == (0, 10)
    np.testing.assert_array_equal(d.shard(5), np.arange(5))
    two = [Dist(rank=r, world_size=2) for r in (0, 1)]
    assert [t.block(7) for t in two] == [(0, 3), (3, 7)]
    np.testing.assert_array_equal(two[1].shard(5), [1, 3])
    d.barrier()
    d.raise_if_any(None)
