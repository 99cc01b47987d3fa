"""Issue 18: model.pt and checkpoints load with torch.load(weights_only=True) (engine/io/torch_files.py).

A torch file holding a custom class whose __reduce__ calls os.system, put where a training
folder's model.pt or checkpoint goes, runs nothing (no marker file) and ends in a one-line
error; a real training folder loads and resumes; a gmmhet 0.1 folder (numpy arrays inside
model.pt) is refused with a line that says how to retrain or convert, and the converter for
trusted folders produces a folder that loads and decodes the same.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.cli import main as cli_main
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io import torch_files
from scipion_gmmhet.engine.simulation.simulate import simulate
from scipion_gmmhet.engine.training.trained import load_trained


class _SystemCall:
    """Unpickling this object runs ``os.system(command)`` (weights_only=False would)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _one_line(exc_info, *fragments) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real (tiny) training folder: 2 epochs on 48 simulated particles, box 24."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tf")
    r = simulate(str(d / "sim"), "conformational", n=48, box=24, apix=5.0, snr=2.0, seed=1, n_gaussians=32)
    gmm = r["truth_gmm"][sorted(r["truth_gmm"])[0]]
    out = str(d / "train")
    argv = ["train", "--particles", r["star"], "--gmm", gmm, "--out", out, "--epochs", "2", "--batch-size", "16",
            "--hidden", "16", "--layers", "1", "--zdim", "2", "--device", "cpu", "--features", "onthefly",
            "--highres", "15"]
    assert cli_main(argv) == 0
    return {"dir": out, "argv": argv}


def test_training_folder_holds_only_safe_torch_files(trained):
    """model.pt and checkpoints load with weights_only=True and are format 2; load_trained works."""
    files = [os.path.join(trained["dir"], "model.pt")] + sorted(
        os.path.join(trained["dir"], "checkpoints", f) for f in os.listdir(os.path.join(trained["dir"], "checkpoints")))
    for path in files:
        payload = torch.load(path, weights_only=True)
        assert payload["format"] == torch_files.FORMAT
        assert isinstance(json.loads(payload["config_json"]), dict)
    tm = load_trained(trained["dir"])
    assert tm.zdim == 2 and tm.mobile.dtype == np.int64 and tm.config["epochs"] == 2
    z = tm.latents()
    assert z.shape == (48, 2) and np.isfinite(tm.decode(torch.as_tensor(z[:3]))[0].numpy()).all()


@pytest.mark.parametrize("where", ["model.pt", "checkpoint"])
def test_torch_file_with_a_custom_class_runs_nothing(trained, tmp_path, where):
    """A crafted model.pt / checkpoint (os.system in __reduce__): no marker, one-line error."""
    folder = tmp_path / "shared_train"
    shutil.copytree(trained["dir"], folder)
    marker = tmp_path / "marker"
    evil = {"format": 2, "state_dict": {}, "payload": _SystemCall("touch %s" % marker)}
    if where == "model.pt":
        torch.save(evil, folder / "model.pt")
        with pytest.raises(InputError) as e:
            load_trained(str(folder))
        _one_line(e, str(folder / "model.pt"), "not loaded", "could run code", "gmmhet train", "--trusted")
        rc = cli_main(["eval", "--train", str(folder), "--z", "0,0", "--out", str(tmp_path / "m.mrc")])
        assert rc == 2
    else:
        ck_dir = folder / "checkpoints"
        for f in ck_dir.iterdir():
            f.unlink()
        torch.save(evil, ck_dir / "epoch_0001.pt")
        os.remove(folder / "model.pt")
        argv = list(trained["argv"])
        argv[argv.index("--out") + 1] = str(folder)
        argv[argv.index("--epochs") + 1] = "3"
        assert cli_main(argv + ["--resume"]) == 2
    assert not marker.exists()


def _as_v1(folder):
    """Rewrite a training folder's .pt files the way gmmhet 0.1 wrote them (numpy arrays,
    config/info/history as Python objects)."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            new = torch.load(path, weights_only=True)
            if "state_dict" in new:
                old = {"version": 1, "config": json.loads(new["config_json"]), "info": json.loads(new["info_json"]),
                       "state_dict": new["state_dict"], "n_features": new["n_features"],
                       "mobile": new["mobile"].numpy(),
                       "feature_stats": {"mean": new["feature_stats"]["mean"].numpy(),
                                         "scale": new["feature_stats"]["scale"],
                                         "n_sample": new["feature_stats"]["n_sample"]}}
            else:
                old = {k: new[k] for k in ("model", "optimizer", "epoch", "chunk_size", "grad_scaler")}
                old.update(history=json.loads(new["history_json"]), config=json.loads(new["config_json"]))
            torch.save(old, path)


def test_old_folder_is_refused_then_converted(trained, tmp_path):
    old = tmp_path / "old_train"
    shutil.copytree(trained["dir"], old)
    _as_v1(old)
    with pytest.raises(InputError) as e:
        load_trained(str(old))
    _one_line(e, "model.pt", "gmmhet < 0.2", "retrain with 'gmmhet train'",
              "python -m scipion_gmmhet.engine.io.torch_files --trusted OLD_DIR --out NEW_DIR")
    before = {p: os.path.getmtime(os.path.join(old, p)) for p in os.listdir(old)}
    new = tmp_path / "new_train"
    assert torch_files.main(["--trusted", str(old), "--out", str(new)]) == 0
    assert {p: os.path.getmtime(os.path.join(old, p)) for p in os.listdir(old)} == before  # only read
    a, b = load_trained(trained["dir"]), load_trained(str(new))
    z = torch.as_tensor(a.latents()[:5])
    for x, y in zip(a.decode(z), b.decode(z)):
        assert torch.equal(x, y)
    assert b.config == a.config
    assert torch_files.main(["--trusted", str(old), "--out", str(new)]) == 2  # never overwrites


def test_save_refuses_what_would_not_load(tmp_path):
    with pytest.raises(ValueError, match="ndarray"):
        torch_files.save_torch_file({"x": np.zeros(3)}, str(tmp_path / "x.pt"))
    assert not os.listdir(tmp_path)
    with pytest.raises(InputError) as e:
        torch_files.load_torch_file(str(tmp_path / "none.pt"), "model.pt")
    _one_line(e, "no such file")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError) as e:
        torch_files.load_torch_file(str(tmp_path / "bad.pt"), "model.pt")
    _one_line(e, "not a readable model.pt")


def test_converter_runs_no_code_from_a_crafted_old_file(trained, tmp_path):
    """The converter of old folders reads with weights_only=True + numpy only: a crafted model.pt
    in the folder to convert is refused in one line and its os.system call never runs."""
    old = tmp_path / "old_train"
    shutil.copytree(trained["dir"], old)
    _as_v1(old)
    marker = tmp_path / "marker"
    torch.save({"version": 1, "state_dict": {}, "payload": _SystemCall("touch %s" % marker)}, old / "model.pt")
    assert torch_files.main(["--trusted", str(old), "--out", str(tmp_path / "new_train")]) == 2
    with pytest.raises(InputError) as e:
        torch_files.convert_trusted_folder(str(old), str(tmp_path / "new_train2"))
    _one_line(e, "model.pt", "Python objects other than tensors and numpy arrays")
    assert not marker.exists()
    assert not (tmp_path / "new_train").exists() and not (tmp_path / "new_train2").exists()
