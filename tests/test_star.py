"""STAR reader/writer: syntax coverage, round trips, real files, errors, fuzzing."""
from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.star import read_star, write_star

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


# ----------------------------------------------------------------------------- issue 7: fast path for big tables
# read_star types a big table's rows without a Python str per cell (star._read_fast); the
# line-by-line reader (star._read_reference) is the reference: same frames, dtype for dtype and
# bit for bit, and the same errors. Tests lower star._FAST_MIN_ROWS so small tables take the fast
# path too, and star._FAST_CHUNK to cross the chunk boundaries of the row analysis.
from scipion_gmmhet.engine.io import star as star_mod  # noqa: E402


@contextlib.contextmanager
def _fast_settings(min_rows=0, chunk=None):
    saved = star_mod._FAST_MIN_ROWS, star_mod._FAST_CHUNK
    star_mod._FAST_MIN_ROWS = min_rows
    if chunk is not None:
        star_mod._FAST_CHUNK = chunk
    try:
        yield
    finally:
        star_mod._FAST_MIN_ROWS, star_mod._FAST_CHUNK = saved


def _outcome(fn):
    try:
        return fn()
    except InputError as exc:
        return ("InputError", str(exc))


def _reference(path):
    return _outcome(lambda: star_mod._read_reference(path, star_mod._decode(path)))


def _fast_only(path):
    """The fast path alone: frames, or None where it declines (read_star then falls back)."""
    with open(path, "rb") as f:
        return star_mod._read_fast(path, [f.read()])


def _assert_same(got, ref):
    if isinstance(got, tuple) or isinstance(ref, tuple):
        assert got == ref
        return
    assert list(got) == list(ref)
    for name in ref:
        a, b = got[name], ref[name]
        assert list(a.columns) == list(b.columns) and a.shape == b.shape, name
        for c in b.columns:
            assert a[c].dtype == b[c].dtype, (name, c, a[c].dtype, b[c].dtype)
            u, v = a[c].to_numpy(), b[c].to_numpy()
            if u.dtype.kind == "f":
                assert np.array_equal(u.view(np.int64), v.view(np.int64)), (name, c)  # -0.0, NaN bits too
            else:
                assert [(type(x), x) for x in u.tolist()] == [(type(x), x) for x in v.tolist()], (name, c)
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def _table(columns, *, newline="\n", sep=" ", lead="", trail="", before="", after="", final_newline=True):
    """A star with an optics table, then data_particles holding ``columns`` (lists of words)."""
    head = (f"{newline}# version 30001{newline}{newline}data_optics{newline}{newline}loop_{newline}"
            f"_rlnOpticsGroup #1{newline}_rlnImagePixelSize #2{newline}1 1.5{newline}{newline}"
            f"{before}data_particles{newline}{newline}loop_{newline}")
    labels = "".join(f"_rlnC{i} #{i + 1}{newline}" for i in range(len(columns)))
    rows = newline.join(lead + sep.join(r) + trail for r in zip(*columns))
    text = head + labels + rows + (newline if final_newline or after else "") + after
    return text


def _check(tmp_path, text, *, expect_fast=True, name="t.star", **settings_):
    path = _write(tmp_path, text.encode("utf-8") if isinstance(text, str) else text, name=name, mode="wb")
    with _fast_settings(**settings_):
        ref = _reference(path)
        got = _outcome(lambda: read_star(path))
        _assert_same(got, ref)
        fast = _fast_only(path)
    if expect_fast:
        assert fast is not None, "the fast path declined"
        _assert_same(fast, ref)
    return ref


_EDGE_COLUMNS = [
    ["1", "2", "-3"], ["+5", "6", "-0"], ["0", "-0", "+0"], ["0003", "1", "2"], ["1", "-007", "2"],
    ["00", "1", "2"], ["0.5", "00.5", "1"], ["0e5", "1", "2"], ["1e5", "2", "3"], ["1E5", "-2e-3", "+.5"],
    ["-0", "1.5", "2"], ["-0.0", "0.0", "-0"], ["1.", ".5", "-.5e+3"], ["1e400", "-1e400", "1e-400"],
    ["4.9406564584124654e-324", "2.4703282292062327e-324", "0.1000000000000000055511151231257827"],
    ["nan", "1", "2"], ["NaN", "-nan", "inf"], ["inf", "-Infinity", "+infinity"], ["nan", "nan", "nan"],
    ["9223372036854775807", "-9223372036854775808", "1"], ["9223372036854775808", "1", "2"],
    ["123456789012345678", "-123456789012345678", "0"], ["1234567890123456789", "1", "2"],
    ["123456789012345678901234567890", "1.5", "2"], ["True", "False", "True"], ["1_000", "2", "3"],
    ["1,5", "2", "3"], ["0x10", "1", "2"], ["1d5", "1", "2"], ["e", "E", "1"], ["-", "+", "1"], ["1-2", "3", "4"],
    ["1e", "2", "3"], ["1.2.3", "1", "2"], ["--5", "1", "2"], ["5-", "1", "2"], ["++1", "1", "2"],
    ["000001@stack.mrcs", "000002@stack.mrcs", "000003@stack.mrcs"], ["1@a/b/c.mrcs", "2@a/b.mrcs", "3@x"],
    ["mics/mic_00001.mrc", "mics/mic_00002.mrc", "x"], ["a\\b", "c&d", "x;y"], ["None", "null", "NA"],
    ["-nan", "1", "2"], ["[1.0,2.0]", "[3]", "[]"], ["dog", "loopy", "data"], ["1.5", "x", "2"],
]


def test_fast_path_matches_reference_on_edge_values(tmp_path):
    columns = [c * 2 for c in _EDGE_COLUMNS]
    _check(tmp_path, _table(columns))
    for i, col in enumerate(_EDGE_COLUMNS):  # each column alone: one-column tables, one row too
        _check(tmp_path, _table([col]), name=f"c{i}.star")
        _check(tmp_path, _table([col[:1]]), name=f"r{i}.star")


@pytest.mark.parametrize("layout", [
    dict(newline="\r\n"), dict(sep="\t"), dict(sep=" \t  "), dict(lead="   ", trail="  \t"),
    dict(newline="\r\n", lead="\t", trail=" "), dict(final_newline=False), dict(after="\n# version 30001\n\n"),
    dict(after="\n\n   \n\t\n"), dict(after="data_more\n\nloop_\n_rlnX #1\n1\n2\n"),
    dict(after="data_kv\n_rlnK 5\n_rlnName 'a b'\n"),
])
@pytest.mark.parametrize("chunk", [None, 16, 64])
def test_fast_path_layouts(tmp_path, layout, chunk):
    rng = np.random.default_rng(1)
    n = 40
    columns = [[f"{i:06d}@stack.mrcs" for i in range(1, n + 1)], [repr(x) for x in rng.normal(size=n)],
               [str(x) for x in rng.integers(-10**12, 10**12, n)], ["%.6g" % x for x in rng.normal(size=n) * 1e5],
               [f"mics/mic_{i // 7:05d}.mrc" for i in range(n)], ["%e" % x for x in rng.normal(size=n)]]
    _check(tmp_path, _table(columns, **layout), chunk=chunk)


def test_blank_lines_inside_the_rows(tmp_path):
    rows = "1 2.5 a\n\n   \n\t\n3 4 b\r\n\r\n5 -6e1 c\n\n\n"
    text = "data_x\nloop_\n_rlnA\n_rlnB\n_rlnC\n" + rows
    for chunk in (None, 3, 8):
        _check(tmp_path, text, chunk=chunk)


def test_empty_and_all_blank_tables_keep_the_reference_path(tmp_path):
    ref = _check(tmp_path, "data_x\nloop_\n_rlnA\n_rlnB\n\n\n   \n", expect_fast=False)
    assert len(ref["x"]) == 0 and list(ref["x"].columns) == ["rlnA", "rlnB"]
    _check(tmp_path, "data_x\nloop_\n_rlnA\n_rlnB\n", expect_fast=False)


def test_big_table_takes_the_fast_path_by_default(tmp_path):
    n = star_mod._FAST_MIN_ROWS + 500
    rng = np.random.default_rng(2)
    columns = [[f"{i:07d}@particles.mrcs" for i in range(1, n + 1)], ["%.6g" % x for x in rng.uniform(-180, 180, n)],
               [str(1 + i % 2) for i in range(n)], ["%.6g" % x for x in rng.normal(1e5, 1e3, n)]]
    path = _write(tmp_path, _table(columns, after="\n"), name="big.star")
    assert _fast_only(path) is not None
    _assert_same(read_star(path), _reference(path))
    small = _write(tmp_path, _table([c[:10] for c in columns]), name="small.star")
    assert _fast_only(small) is None  # small tables keep the reference path


@pytest.mark.parametrize("rows, declines", [
    ('1 "a b"\n2 c\n', True),             # quotes: the reference reader takes them
    ("1 a\n2 b # comment\n", True),        # a comment
    ("1 a\n# comment\n2 b\n", True),       # a comment line between rows
    ("1 caf\u00e9\n2 b\n", True),          # non-ASCII
    ("1 a\x0c\n2 b\n", True),              # a form feed: a line break for str.splitlines
    ("1 a\r2 b\n", True),                  # a lone CR: a line break too
    ("1 a\x0b2\n2 b\n", True),             # a vertical tab
    ("1 a\x1c2\n2 b\n", True),             # a file separator (a line break for str.splitlines)
    ("1 a\xa02\n2 b\n", True),             # a no-break space (whitespace for str.split)
    ("1 a\x7f\n2 b\n", True),
    ("1 a\x00\n2 b\n", True),
    ("1 a\n2 b\n", False),
])
def test_unusual_rows_fall_back_to_the_reference(tmp_path, rows, declines):
    _check(tmp_path, "data_x\nloop_\n_rlnA\n_rlnB\n" + rows, expect_fast=not declines)


@pytest.mark.parametrize("rows, fragment", [
    ("1 2\n3 4\n5\n7 8\n", ":7:"),                      # a short row
    ("1 2\n3 4 5\n", ":6:"),                            # a long row
    ("1 2\n3 4\n_rlnC\n", "after the rows"),            # a label after the rows
    ("1 2\n_x 4\n", "after the rows"),                  # a row starting with '_'
    ("1 2\n3 4\nloop_\n_rlnC\n5\n", "second table"),
    ("1 2\n3 4\n\ndata_x\n", "appears twice"),
    ("1 2\n3 4\n\ndata_y\nhello world\n", "unexpected line"),
])
@pytest.mark.parametrize("chunk", [None, 8])
def test_errors_after_the_fast_path_are_the_references(tmp_path, rows, fragment, chunk):
    path = _write(tmp_path, "data_x\nloop_\n_rlnA\n_rlnB\n" + rows)
    with _fast_settings(chunk=chunk):
        with pytest.raises(InputError) as exc:
            read_star(path)
        assert ("InputError", str(exc.value)) == _reference(path)
    assert path in str(exc.value) and fragment in str(exc.value)


def test_not_utf8_after_a_big_table_names_its_line(tmp_path):
    text = b"data_x\nloop_\n_rlnA\n_rlnB\n" + b"1 2\n" * 1500 + b"\ndata_y\nloop_\n_rlnC\n\xff\n"
    path = _write(tmp_path, text, mode="wb")
    with pytest.raises(InputError, match=r":1509: not UTF-8"):
        read_star(path)


def test_rows_without_a_loop_fall_back(tmp_path):
    for text in ["data_x\n_rlnA 1\n" + "1 2\n" * 5, "data_x\n" + "1 2\n" * 5, "data_x\nloop_\n" + "1 2\n" * 5,
                 "data_x\nloop_\n_rlnA\n_rlnB\n1 2\n# c\n3 4\n"]:
        _check(tmp_path, text, expect_fast=False)


_WORDS = {
    "int": st.integers(-10**6, 10**6).map(str),
    "bigint": st.integers(-2**70, 2**70).map(str),
    "plus": st.integers(0, 10**6).map(lambda i: f"+{i}"),
    "repr": st.floats(width=64).map(repr),
    "fmt": st.tuples(st.floats(allow_nan=False, allow_infinity=False),
                     st.sampled_from(["%.6g", "%e", "%E", "%.17g", "%.3f", "%g", "%.0f", "%.1e"])).map(
        lambda t: t[1] % t[0]),
    "numlike": st.text(alphabet="0123456789+-.eE", min_size=1, max_size=7),
    "zeros": st.sampled_from(["0", "-0", "+0", "00", "0003", "-007", "+01", "0.0", "-0.0", "00.1", "0e0", "0.", ".0"]),
    "special": st.sampled_from(["nan", "NaN", "-nan", "+nan", "inf", "-inf", "+Inf", "Infinity", "-infinity", "True",
                                "False", "1_0", "None", "NA", "null", "0x1f", "1d5", "1,5", "[1]", "-", "+", "."]),
    "name": st.tuples(st.integers(1, 10**6), st.sampled_from(["stack.mrcs", "a/b/c.mrcs", "x_y.mrc", "s"])).map(
        lambda t: f"{t[0]:06d}@{t[1]}"),
    "ascii": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="\"'#"),
                     min_size=1, max_size=6),  # '_x' or 'data_' first in a row: the reference's errors
}


@st.composite
def _star_texts(draw):
    ncols = draw(st.integers(1, 5))
    nrows = draw(st.integers(1, 25))
    kinds = [draw(st.lists(st.sampled_from(sorted(_WORDS)), min_size=1, max_size=2)) for _ in range(ncols)]
    columns = [[draw(_WORDS[draw(st.sampled_from(k))]) for _ in range(nrows)] for k in kinds]
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    rows = []
    for r in zip(*columns):
        seps = [draw(st.sampled_from([" ", "  ", "\t", " \t "])) for _ in r]
        line = draw(st.sampled_from(["", " ", "\t", "  "])) + "".join(w + s for w, s in zip(r, seps))
        rows.append(line if draw(st.booleans()) else line.rstrip(" \t"))
        if draw(st.integers(0, 9)) == 0:
            rows.append(draw(st.sampled_from(["", " ", "\t \t"])))
    head = _table(columns, newline=newline).split("_rlnC0 #1")[0]  # optics table, data_particles, loop_
    labels = "".join(f"_rlnC{i} #{i + 1}{newline}" for i in range(ncols))
    after = draw(st.sampled_from(["", newline, f"{newline}# version 30001{newline}",
                                  f"{newline}data_kv{newline}_rlnK 5{newline}"]))
    final = draw(st.booleans())
    return head + labels + newline.join(rows) + (newline if final or after else "") + after


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_star_texts(), st.sampled_from([None, 7, 32]))
def test_fuzz_fast_path_equals_reference(text, chunk):
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, text.encode("utf-8"), mode="wb")
        with _fast_settings(chunk=chunk):
            ref = _reference(path)
            _assert_same(_outcome(lambda: read_star(path)), ref)
            fast = _fast_only(path)
        if fast is not None:
            _assert_same(fast, ref)


def test_float_words_parse_as_python_float():
    """The fast path types a column of words over [0-9+-.eE] with pandas (float_precision=
    "round_trip"): pandas must accept exactly the words float() accepts, with the same bits."""
    import itertools
    words = ["".join(p) for n in (1, 2, 3) for p in itertools.product("0123456789+-.eE", repeat=n)]
    words += ["".join(p) for n in (4, 5) for p in itertools.product("01+-.eE", repeat=n)]
    words += ["1e308", "1.7976931348623157e308", "1.7976931348623159e308", "2.2250738585072011e-308",
              "0.30000000000000004", "9007199254740993", "123456789012345678901234567890.5e-10"]
    for w in words:
        raw = f"{w}\n".encode()
        df = star_mod._read_words(raw, 0, len(raw), {0: np.float64})
        try:
            ref = np.float64(float(w))
        except ValueError:
            assert df is None, w
            continue
        assert df is not None and df[0].to_numpy().view(np.int64)[0] == ref.view(np.int64), w
