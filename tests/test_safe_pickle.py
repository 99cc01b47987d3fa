"""Issue 18: cryoDRGN pickles are read by a restricted unpickler (engine/io/safe_pickle.py) that
runs no code from the file. Malicious pickles leave no marker and end in a one-line InputError;
real cryoDRGN-format files (every pickle protocol) still load; a hypothesis fuzzer on the pose
reader (style and bounds of tests/test_fuzz_readers.py)."""
from __future__ import annotations

import os
import pickle
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.safe_pickle import (load_array_pickle, read_cryodrgn_ctf,
                                                  read_cryodrgn_poses)

from test_fuzz_readers import FUZZ, input_error_or_success


class _SystemCall:
    """Unpickling this object runs ``os.system(command)`` with the standard unpickler."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _MarkerFile:
    """Unpickling this object creates ``path`` with the standard unpickler (no shell needed)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _one_line_error(fn, *args, match: str = "") -> str:
    with pytest.raises(InputError, match=match) as info:
        fn(*args)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def _rotations(n: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, 3, 3)))
    return q.astype(np.float32)


@pytest.mark.parametrize("payload", ["system", "open", "nested"])
def test_malicious_pose_pickle_runs_nothing(tmp_path, payload):
    """A pose pickle whose __reduce__ calls os.system (or open) creates no marker: one-line error."""
    marker = tmp_path / "marker"
    evil = {"system": _SystemCall("touch %s" % marker), "open": _MarkerFile(str(marker))}.get(payload)
    if payload == "nested":  # the call hidden inside a valid-looking (rot, trans) tuple
        evil = (_rotations(3), [_SystemCall("touch %s" % marker)])
    path = tmp_path / "poses.pkl"
    with open(path, "wb") as f:
        pickle.dump(evil, f)
    with open(path, "rb") as f:  # the file really is malicious: it names the function to call
        assert b"system" in f.read() or payload == "open"
    msg = _one_line_error(read_cryodrgn_poses, str(path), match="refused")
    assert str(path) in msg and "cryoDRGN poses .pkl" in msg
    assert ("posix.system" in msg or "os.system" in msg) or payload == "open"
    assert not marker.exists()


def test_malicious_ctf_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "ctf.pkl"
    with open(path, "wb") as f:
        pickle.dump(_SystemCall("touch %s" % marker), f)
    msg = _one_line_error(read_cryodrgn_ctf, str(path), match="refused")
    assert str(path) in msg and "cryoDRGN ctf .pkl" in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_cryodrgn_pose_pickle_loads(tmp_path, protocol):
    """cryoDRGN's parse_pose_star writes (rot float32 (N,3,3), trans float32 (N,2)) with pickle.dump."""
    rot = _rotations(7, seed=protocol)
    trans = np.random.default_rng(1).uniform(-0.1, 0.1, size=(7, 2)).astype(np.float32)
    path = tmp_path / "poses.pkl"
    with open(path, "wb") as f:
        pickle.dump((rot, trans), f, protocol=protocol)
    r, t = read_cryodrgn_poses(str(path))
    assert r.dtype == np.float64 and np.array_equal(r, rot.astype(np.float64))
    assert np.array_equal(t, trans.astype(np.float64))
    with open(path, "wb") as f:  # rotations only (cryoDRGN's --no-trans)
        pickle.dump(rot, f, protocol=protocol)
    r, t = read_cryodrgn_poses(str(path))
    assert np.array_equal(r, rot.astype(np.float64)) and not t.any() and t.shape == (7, 2)
    with open(path, "wb") as f:  # a non-contiguous array and a list of arrays
        pickle.dump([np.asfortranarray(rot), trans[::1]], f, protocol=protocol)
    assert np.array_equal(read_cryodrgn_poses(str(path))[0], rot)


def test_cryodrgn_ctf_pickle_loads(tmp_path):
    """cryoDRGN's parse_ctf_star writes one float32 (N, 9) array."""
    n = 5
    ctf = np.zeros((n, 9), np.float32)
    ctf[:, 0], ctf[:, 1] = 64, 1.5
    ctf[:, 2:5] = [[15000 + 10 * i, 14800, 30] for i in range(n)]
    ctf[:, 5:9] = [300, 2.7, 0.1, 0]
    path = tmp_path / "ctf.pkl"
    with open(path, "wb") as f:
        pickle.dump(ctf, f)
    assert np.array_equal(read_cryodrgn_ctf(str(path)), ctf.astype(np.float64))
    with open(path, "wb") as f:
        pickle.dump(ctf[:, :8], f)
    _one_line_error(read_cryodrgn_ctf, str(path), match=r"shape \(5, 8\)")
    ctf[0, 1] = 0
    with open(path, "wb") as f:
        pickle.dump(ctf, f)
    _one_line_error(read_cryodrgn_ctf, str(path), match="pixel size")


@pytest.mark.parametrize("obj, what", [({"rot": 1}, "a dict"), ("text", "a str"),
                                       (np.array([None, 1], dtype=object), "dtype object"),
                                       ((np.zeros((1, 3, 3)), b"xy"), "a bytes")])
def test_plain_data_only(tmp_path, obj, what):
    """Data that needs no global but is not arrays/tuples/lists/numbers is refused too."""
    path = tmp_path / "x.pkl"
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    msg = _one_line_error(load_array_pickle, str(path), "numbers", match=what)
    assert msg.startswith(str(path))


def test_missing_and_garbled_files(tmp_path):
    _one_line_error(read_cryodrgn_poses, str(tmp_path / "nope.pkl"), match="no such file")
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps((_rotations(2), np.zeros((2, 2), np.float32)))[:-9])
    _one_line_error(read_cryodrgn_poses, str(path), match="not a readable pickle")


# ============================================================================ fuzzer
VALID_POSES = pickle.dumps((_rotations(3), np.zeros((3, 2), np.float32)))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_POSES) - 1), st.binary(min_size=1, max_size=4)), max_size=6),
       st.integers(0, len(VALID_POSES)))
def test_fuzz_pose_pickle_corrupted_bytes(edits, cut):
    """Overwritten opcodes, lengths, dtype strings or data bytes: InputError (one line) or a valid read."""
    data = bytearray(VALID_POSES)
    for pos, new in edits:
        data[pos:pos + len(new)] = new
    data = bytes(data[:cut]) if cut % 3 == 0 else bytes(data)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "poses.pkl")
        with open(path, "wb") as f:
            f.write(data)
        out = input_error_or_success(read_cryodrgn_poses, path)
        if out is not None:
            rot, trans = out
            assert rot.ndim == 3 and rot.shape[1:] == (3, 3) and trans.shape == (len(rot), 2)
            assert np.isfinite(rot).all() and np.isfinite(trans).all()


_leaf = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(), st.none(),
                  st.text(max_size=3), st.binary(max_size=3),
                  st.builds(lambda shape, dt: np.zeros(shape, dt),
                            st.lists(st.integers(0, 4), max_size=4).map(tuple),
                            st.sampled_from(["f4", "f8", "i4", "u1", "c8", "O", "U2"])))
_structures = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.lists(inner, max_size=3).map(tuple),
                                                          st.dictionaries(st.text(max_size=2), inner, max_size=2)),
                           max_leaves=10)


@FUZZ
@given(_structures, st.integers(2, pickle.HIGHEST_PROTOCOL))
def test_fuzz_pose_pickle_structures(obj, protocol):
    """Any Python structure of arrays/containers/scalars: InputError (one line) or valid poses."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "poses.pkl")
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
        out = input_error_or_success(read_cryodrgn_poses, path)
        if out is not None:
            assert out[0].shape[1:] == (3, 3) and out[1].shape == (len(out[0]), 2)
