"""Issue 18: ``gmmhet refine --resume`` keeps an interrupted run's finished rounds only when the
settings are the same (the Scipion harness test test_protocol_kill_resume kills a real run)."""
from __future__ import annotations

import argparse
import logging

import numpy as np

from scipion_gmmhet.engine.analysis.refine import RefineResult
from scipion_gmmhet.engine.commands import refine as cmd


def _args(out, **kw):
    base = dict(train="t", particles="p.star", latents=None, encode=False, mask=None, max_angle=6.0, max_shift=None,
                lowres=None, highres=None, levels=3, polish_steps=10, score="wcc", prior=True, min_gain=None,
                ctf_mode=None, rounds=2, retrain_epochs=None, resume=False, out=str(out))
    base.update(kw)
    return argparse.Namespace(**base)


def test_resume_only_with_the_same_settings(tmp_path, caplog):
    assert cmd._resumable(_args(tmp_path)) is False  # a fresh run records its settings
    assert cmd._resumable(_args(tmp_path, resume=True, batch_size=8)) is True
    caplog.set_level(logging.WARNING)
    assert cmd._resumable(_args(tmp_path, resume=True, max_angle=3.0)) is False
    assert "starting from the first round" in caplog.text
    assert cmd._resumable(_args(tmp_path, resume=True)) is False  # settings file now holds max_angle 3


def test_round_result_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    res = RefineResult(rng.normal(size=(5, 3, 3)), rng.normal(size=(5, 2)), rng.normal(size=(5, 3)),
                       rng.random(5), rng.random(5), rng.random(5), rng.random(5))
    assert cmd._load_round("x.star", str(tmp_path)) is None  # nothing finished yet
    cmd._save_round(res, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refine_result.npz"]  # no temporary left
    with np.load(tmp_path / "refine_result.npz", allow_pickle=False) as z:
        for k, v in res.__dict__.items():
            np.testing.assert_array_equal(z[k], v)
