"""``model.pt`` and training checkpoints that never run code when they are loaded.

``torch.load`` unpickles: a file that names a Python callable (a crafted ``model.pt`` in a
training folder shared by someone else) runs it, unless ``weights_only=True``. Every torch file
the engine reads goes through :func:`load_torch_file`, which uses ``weights_only=True`` (tensors,
dicts, lists, tuples, strings and numbers only) and turns any refusal into a one-line
:class:`~..errors.InputError` that names the file and says how to retrain or convert it.

Format 2 (``FORMAT``), written by :func:`save_torch_file`: a dict with ``"format": 2``, tensors
and plain containers; settings and other free-form records as JSON strings (``*_json`` keys).
``model.pt``: ``state_dict``, ``n_features``, ``mobile`` (int64 tensor), ``feature_stats``
(``mean`` tensor, ``scale`` {param type: float}, ``n_sample``), ``config_json``, ``info_json``.
Checkpoint: ``model``, ``optimizer``, ``epoch``, ``chunk_size``, ``grad_scaler`` (or None),
``history_json``, ``config_json``.

Folders written by gmmhet 0.1 (model.pt with numpy arrays inside) are refused; a folder you
trust can be converted into a new folder (the old one is only read)::

    python -m scipion_gmmhet.engine.io.torch_files --trusted OLD_TRAIN_DIR --out NEW_TRAIN_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys

import numpy as np

from ..errors import InputError
from . import atomic

FORMAT = 2
CONVERT_HINT = ("retrain with 'gmmhet train', or, if you trust the folder it came from, convert it with "
                "'python -m scipion_gmmhet.engine.io.torch_files --trusted OLD_DIR --out NEW_DIR'")
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(obj, where: str = "") -> None:
    """Refuse (ValueError) anything but tensors, str-keyed dicts, lists, tuples, str and numbers."""
    import torch
    if isinstance(obj, (torch.Tensor, *_PLAIN_SCALARS)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise ValueError(f"{where or 'payload'}: a {type(obj).__name__} is not a tensor or plain container")


def to_plain(obj):
    """Numpy arrays -> tensors, numpy scalars -> Python numbers, recursively (containers kept)."""
    import torch
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def save_torch_file(payload: dict, path: str) -> None:
    """Write ``payload`` (format 2: tensors and plain containers; ``"format"`` is added) atomically.
    ValueError when it holds anything else (it would not load with weights_only=True)."""
    payload = dict(payload, format=FORMAT)
    _check_plain(payload, os.path.basename(path))
    atomic.torch_save(payload, path)


def load_torch_file(path: str, what: str, map_location="cpu", require_format: bool = True) -> dict:
    """Load a gmmhet torch file with ``weights_only=True``; InputError (one line) when it is
    missing, unreadable, holds Python objects (an old gmmhet folder, or a crafted file: nothing
    is run) or is not format 2 (``require_format``). ``what``: e.g. "model.pt"."""
    import torch
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; give a gmmhet training folder") from None
    except pickle.UnpicklingError:
        raise InputError(f"{path}: this {what} holds Python objects, which are not loaded because loading them could "
                         f"run code (a file from gmmhet < 0.2, or not written by gmmhet); {CONVERT_HINT}") from None
    except Exception as exc:  # truncated zip, not a torch file ...
        raise InputError(f"{path}: not a readable {what} ({type(exc).__name__}); {CONVERT_HINT}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a gmmhet {what} (holds a {type(obj).__name__}); {CONVERT_HINT}")
    if require_format and obj.get("format") != FORMAT:
        raise InputError(f"{path}: a {what} of another gmmhet version (format {obj.get('format', 1)}, "
                         f"expected {FORMAT}); {CONVERT_HINT}")
    return obj


def json_field(payload: dict, key: str, path: str, default=None):
    """``json.loads(payload[key])`` (``default`` when absent); InputError when not valid JSON."""
    if key not in payload:
        return default
    try:
        return json.loads(payload[key])
    except (TypeError, ValueError):
        raise InputError(f"{path}: field {key} is not valid JSON; {CONVERT_HINT}") from None


# ----------------------------------------------------------------------------- conversion
def convert_model_v1(old: dict) -> dict:
    """A gmmhet 0.1 ``model.pt`` dict (config/info as dicts, numpy arrays) -> format 2."""
    stats = old["feature_stats"]
    return {"version": 2, "config_json": json.dumps(to_plain(old["config"])),
            "info_json": json.dumps(to_plain(old.get("info", {})), default=float),
            "state_dict": to_plain(dict(old["state_dict"])), "n_features": int(old["n_features"]),
            "mobile": to_plain(np.asarray(old["mobile"], dtype=np.int64)),
            "feature_stats": {"mean": to_plain(np.asarray(stats["mean"], dtype=np.float32)),
                              "scale": {str(k): float(v) for k, v in dict(stats["scale"]).items()},
                              "n_sample": int(stats.get("n_sample", 0))}}


def convert_checkpoint_v1(old: dict) -> dict:
    """A gmmhet 0.1 checkpoint dict (history/config as Python objects) -> format 2."""
    new = {k: to_plain(old[k]) for k in ("model", "optimizer", "epoch", "chunk_size", "grad_scaler") if k in old}
    new["history_json"] = json.dumps(to_plain(old.get("history", [])), default=float)
    new["config_json"] = json.dumps(to_plain(old.get("config", {})), default=float)
    return new


def _numpy_globals() -> list:
    """numpy's array/scalar/dtype rebuilding callables (what a gmmhet 0.1 file names besides
    tensors), for ``torch.serialization.safe_globals``; numpy 1.x and 2.x."""
    import importlib
    core = importlib.import_module("numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core")
    dtype_classes = [type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.int32, np.bool_)]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype] + dtype_classes


def _load_v1(path: str) -> dict:
    """A gmmhet 0.1 ``model.pt``/checkpoint read with ``weights_only=True`` allowing numpy arrays
    and scalars only (no other Python object is resolved, nothing is run)."""
    import torch
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: holds Python objects other than tensors and numpy arrays (not a gmmhet 0.1 "
                         "file); retrain with gmmhet train") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a gmmhet training file (holds a {type(obj).__name__})")
    return obj


def convert_trusted_folder(old_dir: str, new_dir: str) -> list[str]:
    """Copy the training folder ``old_dir`` to ``new_dir`` (which must not exist) with its
    ``model.pt`` and checkpoints in format 2. The old files are read with ``weights_only=True``
    plus numpy's array-rebuilding functions (:func:`_load_v1`), so a crafted file runs no code
    here either. The feature cache is not copied (it is rebuilt). Returns the converted files."""
    from .outputs import TrainFolder
    old = TrainFolder(old_dir)
    if not os.path.isfile(old.model) and not os.path.isdir(old.checkpoint_dir):
        raise InputError(f"--trusted {old_dir}: no model.pt or checkpoints/ there; give a gmmhet training folder")
    if os.path.exists(new_dir):
        raise InputError(f"--out {new_dir}: exists already; give a new folder (the old one is never modified)")
    tmp_dir = new_dir.rstrip("/") + ".tmp"  # the new folder appears only when every file converted
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.copytree(old_dir, tmp_dir, ignore=shutil.ignore_patterns(*TrainFolder.CACHE_FILES, "*.tmp"))
    done = []
    try:
        for root, _, files in os.walk(tmp_dir):
            for name in sorted(f for f in files if f.endswith(".pt")):
                path = os.path.join(root, name)
                old = _load_v1(path)
                if old.get("format") == FORMAT:
                    continue
                save_torch_file(convert_model_v1(old) if "state_dict" in old else convert_checkpoint_v1(old), path)
                done.append(os.path.join(new_dir, os.path.relpath(path, tmp_dir)))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    os.rename(tmp_dir, new_dir)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scipion_gmmhet.engine.io.torch_files",
                                description="Convert a gmmhet 0.1 training folder that you trust into a new folder "
                                            "whose model.pt and checkpoints load without running code.")
    p.add_argument("--trusted", required=True, metavar="OLD_DIR", help="training folder to convert (only read)")
    p.add_argument("--out", required=True, metavar="NEW_DIR", help="new folder to write")
    args = p.parse_args(argv)
    try:
        done = convert_trusted_folder(args.trusted, args.out)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {len(done)} file(s) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
