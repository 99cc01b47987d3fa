"""STAR reader/writer: syntax coverage, round trips, real files, errors, fuzzing."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.star import read_star, write_star

VALID = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
1 opticsGroup1 1.5
2 "group two" 1.25

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnOpticsGroup #3
000001@stack.mrcs -102.30296 1
000002@stack.mrcs 12.5 2
"""


def _write(tmp_path, text: str, name="x.star", mode="w") -> str:
    p = os.path.join(tmp_path, name)
    with open(p, mode) as f:
        f.write(text)
    return p


def test_reads_relion31_layout(tmp_path):
    blocks = read_star(_write(tmp_path, VALID))
    assert list(blocks) == ["optics", "particles"]
    opt, part = blocks["optics"], blocks["particles"]
    assert list(opt.columns) == ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize"]
    assert opt["rlnOpticsGroup"].dtype == np.int64
    assert opt["rlnImagePixelSize"].dtype == np.float64
    assert opt["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "group two"]
    assert part["rlnImageName"].tolist() == ["000001@stack.mrcs", "000002@stack.mrcs"]
    assert part["rlnAngleRot"].tolist() == [-102.30296, 12.5]


def test_crlf_comments_trailing_spaces_and_key_value(tmp_path):
    text = ("# a comment\r\n\r\ndata_   \r\n\r\n_rlnFoo   3   # trailing comment\r\n"
            "_rlnBar 'two words'  \r\n_rlnBaz 0.5\r\n\r\ndata_images\r\nloop_   \r\n"
            "_rlnImageName   #1  \r\n_rlnOriginX #2\r\n  1@a.mrcs   1.5   \r\n\r\n  2@a.mrcs  -2 # c\r\n")
    blocks = read_star(_write(tmp_path, text, mode="w"))
    assert list(blocks) == ["", "images"]
    kv = blocks[""]
    assert len(kv) == 1 and kv["rlnFoo"].iloc[0] == 3 and kv["rlnBar"].iloc[0] == "two words"
    assert kv["rlnBaz"].iloc[0] == 0.5
    assert blocks["images"]["rlnOriginX"].tolist() == [1.5, -2.0]


def test_leading_zeros_stay_strings_and_empty_loop(tmp_path):
    text = "data_x\nloop_\n_rlnMicrographName\n_rlnN\n0003 1\n0010 2\n\ndata_empty\nloop_\n_rlnA\n_rlnB\n"
    blocks = read_star(_write(tmp_path, text))
    assert blocks["x"]["rlnMicrographName"].tolist() == ["0003", "0010"]
    assert blocks["x"]["rlnN"].dtype == np.int64
    assert len(blocks["empty"]) == 0 and list(blocks["empty"].columns) == ["rlnA", "rlnB"]


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    n = 50
    df = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@dir with space/s.mrcs" if i % 7 == 0 else f"{i + 1:06d}@s.mrcs"
                         for i in range(n)],
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnDefocusU": rng.uniform(5000, 25000, n),
        "rlnTiny": rng.normal(size=n) * 1e-12,
        "rlnOpticsGroup": rng.integers(1, 3, n),
        "rlnComment": ["", "#hash", "_under", "data_x", 'say "hi"', "loop_"] * 8 + ["a", "b"],
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnImagePixelSize": [1.403, 0.1 + 0.2]})
    path = os.path.join(tmp_path, "out.star")
    write_star(path, {"optics": optics, "particles": df})
    assert not os.path.exists(path + ".tmp")
    back = read_star(path)
    pd.testing.assert_frame_equal(back["optics"], optics)
    pd.testing.assert_frame_equal(back["particles"], df)
    assert open(path).read().count("# version 30001") == 2


def test_real_relion31(real_metadata_dir):
    blocks = read_star(real_metadata_dir / "relion31.star")
    part = blocks["particles"]
    assert len(part) == 5
    assert part["rlnAngleRot"].iloc[0] == -102.30296
    assert part["rlnAngleTilt"].iloc[0] == 82.318041
    assert part["rlnAnglePsi"].iloc[0] == 124.706463
    assert part["rlnDefocusU"].iloc[0] == 13108.082418
    assert part["rlnImageName"].iloc[0] == "000001@relion31.mrcs"
    assert blocks["optics"]["rlnImageSize"].iloc[0] == 256


def test_real_files_all_parse(real_metadata_dir):
    assert len(read_star(real_metadata_dir / "relion5.star")["particles"]) == 17
    six = read_star(real_metadata_dir / "relion31.6opticsgroups.star")
    assert len(six["optics"]) == 6 and len(six["particles"]) == 139
    assert six["optics"]["rlnOddZernike"].iloc[0].startswith("[1.7055")


@pytest.mark.parametrize("text, fragment", [
    ("data_a\nloop_\n_rlnA\n_rlnB\n1 2\n3\n", ":6:"),        # wrong number of fields, names line
    ("# only comments\n\n", "no data_ blocks"),
    ("", "empty"),
    ("loop_\n_rlnA\n1\n", "before the first data_"),
    ("data_a\nloop_\n_rlnA\n_rlnA\n1 2\n", "appears twice"),
    ("data_a\n_rlnA\n", "expected '_rlnA value'"),
    ("data_a\ndata_a\n", "appears twice"),
    ("data_a\nloop_\n_rlnA\n\"unclosed 1\n", "unclosed quote"),
    ("data_a\nhello world\n", "unexpected line"),
    ("data_a\nloop_\n_rlnA\n1\n_rlnB\n", "after the rows"),
])
def test_malformed_raises_input_error_naming_file(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as exc:
        read_star(path)
    msg = str(exc.value)
    assert path in msg and fragment in msg and "\n" not in msg


def test_binary_and_missing(tmp_path):
    path = _write(tmp_path, b"\x00\x01\x02binary\xff" * 10, mode="wb")
    with pytest.raises(InputError, match="binary"):
        read_star(path)
    with pytest.raises(InputError, match="not UTF-8"):
        read_star(_write(tmp_path, b"data_a\nloop_\n_rlnA\n\xff\xfe\n", name="y.star", mode="wb"))
    with pytest.raises(InputError, match="no such file"):
        read_star(os.path.join(tmp_path, "missing.star"))


def _parse_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.star")
        with open(p, "wb") as f:
            f.write(data)
        try:
            blocks = read_star(p)
        except InputError as exc:
            assert "\n" not in str(exc)
            return
        assert isinstance(blocks, dict) and blocks


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    _parse_bytes(data)


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 3),
                          st.sampled_from(["", " ", "\n", "#", "_", "\"", "'", "loop_", "data_",
                                           "\x00", "\r\n", "1", "x y", "data_particles\n"])),
                max_size=8))
def test_fuzz_mutated_valid_star(edits):
    text = VALID
    for pos, cut, ins in edits:
        pos = min(pos, len(text))
        text = text[:pos] + ins + text[pos + cut:]
    _parse_bytes(text.encode("utf-8"))
