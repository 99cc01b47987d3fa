"""training/batching.py: learning-rate scaling, the batch-size probe, device-side sums (issue 14)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.training import batching


def test_scaled_lr_linear_rule():
    assert batching.scaled_lr(1e-4, 64) == pytest.approx(1e-4)
    assert batching.scaled_lr(1e-4, 256) == pytest.approx(4e-4)
    assert batching.scaled_lr(1e-4, 32, reference_batch=64) == pytest.approx(5e-5)


def test_probe_keeps_the_reference_on_cpu_without_running_the_trial():
    calls = []
    assert batching.probe_batch_size(calls.append, "cpu") == (64, [])
    assert calls == []


class _FakeDevice:
    """A simulated clock and a step costing a fixed overhead plus a per-particle time (a GPU that
    likes big batches), out of memory from ``oom_at`` particles."""

    def __init__(self, oom_at=None, per_step_s=0.004, per_particle_s=1e-5):
        self.now, self.oom_at, self.per_step_s, self.per_particle_s = 0.0, oom_at, per_step_s, per_particle_s

    def clock(self):
        return self.now

    def trial(self, b):
        if self.oom_at is not None and b >= self.oom_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.now += self.per_step_s + b * self.per_particle_s


def _probe(dev, **kw):
    return batching.probe_batch_size(dev.trial, "cpu", cuda_only=False, clock=dev.clock, **kw)


def test_probe_stops_at_out_of_memory_and_picks_the_fastest():
    b, tried = _probe(_FakeDevice(oom_at=512))
    assert b == 256
    assert [k for k, _ in tried] == [64, 128, 256, 512] and tried[-1][1] is None


def test_probe_stops_when_the_gain_flattens_and_respects_the_data_size():
    b, tried = _probe(_FakeDevice(per_step_s=0.0))  # no fixed overhead: doubling gains nothing
    assert b == 64 and [k for k, _ in tried] == [64, 128]
    b, tried = _probe(_FakeDevice(per_step_s=0.004, per_particle_s=1e-5))  # gain < 10% from 4096 on
    assert b == 2048 and tried[-1][0] == 4096
    b, tried = _probe(_FakeDevice(), n_items=200)
    assert b == 128 and max(k for k, _ in tried) <= 200


def test_probe_reraises_other_errors():
    def bad(b):
        raise ValueError("not an OOM")
    with pytest.raises(ValueError):
        batching.probe_batch_size(bad, "cpu", cuda_only=False)


def test_device_sum_accumulates_without_reading_back():
    s = batching.DeviceSum("cpu")
    for v in (torch.tensor([1.0, 2.0]), torch.tensor(3.5), torch.tensor([0.25])):
        s.add(v)
    assert s.steps == 3 and s.value() == pytest.approx(6.75)
    assert s.total.dtype == torch.float64


def test_resident_rows_is_host_only_on_cpu():
    assert batching.resident_rows(np.zeros((10, 4), np.float16), "cpu") is None
