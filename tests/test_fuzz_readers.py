"""Issue 8: fuzzing the readers. Every malformed STAR, cryoSPARC .cs or MRC file must end in
``InputError`` (one line) or in a successful read -- never another exception, a crash deep in
numpy/torch, or a hang (each example runs under a 10 s alarm).

Bounded for CI: 150 examples per test, no deadline per example, the whole file well under a
minute on 2 cores. tests/test_star.py and tests/test_metadata.py fuzz random bytes and mutated
valid stars; here the inputs are generated from the formats' structure (STAR grammar tokens,
cryoSPARC field names with wrong dtypes/shapes/values, MRC header words), which reaches the
deeper branches.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.metadata import read_particles
from scipion_gmmhet.engine.io.mrc import open_stack, read_map, stack_apix, write_map, write_stack
from scipion_gmmhet.engine.io.star import read_star

# GMMHET_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_readers.py  runs a longer campaign locally.
FUZZ = settings(max_examples=int(os.environ.get("GMMHET_FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=not os.environ.get("GMMHET_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = 10.0):
    """Fail (instead of hanging CI) when the body runs longer than ``seconds``."""
    def _alarm(signum, frame):
        raise Hang(f"reader still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def input_error_or_success(fn, *args, tolerate=None, **kwargs):
    """Run a reader: return its result, or None after a one-line InputError. Anything else fails
    (except a known bug that ``tolerate(exc)`` recognises; see KNOWN_BUG_* below)."""
    with no_hang():
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg, repr(msg)
            return None
        except Exception as exc:
            if tolerate is not None and tolerate(exc):
                return None
            raise


# Bugs found by these fuzzers were kept out of the campaigns until fixed, each pinned by a
# strict-xfail regression test (test_known_bug_*). All three are fixed: the flags are False, so the
# campaigns cover these inputs again, and the regression tests below pass. A new bug: add a flag
# (True) and a strict-xfail regression test the same way, then flip/remove both with the fix.
KNOWN_BUG_EMPTY_TABLE = False   # fixed: metadata.image_locations() on 0 particles raised KeyError
KNOWN_BUG_HUGE_NSYMBT = False   # fixed: mrc._header let mrcfile allocate the extended header (nsymbt bytes)
KNOWN_BUG_CS_FIELD_TYPES = False  # fixed: cryosparc.read_cs raised ValueError for fields of a wrong dtype/shape


def _known_cs_field_bug(exc: BaseException) -> bool:
    """A ValueError raised inside cryosparc.read_cs (a field of the wrong dtype or shape)."""
    import traceback

    names = [f.name for f in traceback.extract_tb(exc.__traceback__)]
    return KNOWN_BUG_CS_FIELD_TYPES and isinstance(exc, ValueError) and "read_cs" in names


def use_metadata(meta) -> None:
    """Exercise what the commands call on metadata that was read successfully."""
    if meta is None:
        return
    input_error_or_success(meta.validate, require_alignment=False, require_ctf=False, check_images=False,
                           allow_duplicates=True)
    accessors = ["euler_deg", "origins_A", "ctf_params", "ctf_premultiplied", "image_locations"]
    if KNOWN_BUG_EMPTY_TABLE and len(meta) == 0:
        accessors.remove("image_locations")
    for accessor in accessors:
        input_error_or_success(getattr(meta, accessor))
    input_error_or_success(lambda: (meta.apix, meta.box))


# ================================================================================ STAR
LABELS = ["_rlnImageName", "_rlnAngleRot", "_rlnAngleTilt", "_rlnAnglePsi", "_rlnOriginXAngst", "_rlnOriginX",
          "_rlnDefocusU", "_rlnDefocusV", "_rlnOpticsGroup", "_rlnImagePixelSize", "_rlnImageSize", "_rlnVoltage",
          "_rlnSphericalAberration", "_rlnAmplitudeContrast", "_rlnOpticsGroupName", "_rlnMagnification",
          "_rlnDetectorPixelSize", "_rlnCtfDataAreCtfPremultiplied", "_rlnImageDimensionality", "_", "_x y"]
VALUES = ["1@s.mrcs", "000002@s.mrcs", "s.mrcs", "@", "1.5", "-0", "0", "7", "1e999", "-1e-320", "nan", "inf",
          "'quoted value'", '"dq"', "'", '"', "#c", "opticsGroup1", "1.2.3", "0x10", "\u00e9", "", "data_", "loop_",
          "_rlnAngleRot", "9" * 30]
STRUCTURE = ["data_", "data_optics", "data_particles", "data_images", "loop_", "# version 30001", "#", "",
             "loop_ extra", "data_particles # c", "save_", "global_", "\t", "\r"]


def star_line():
    return st.one_of(
        st.sampled_from(STRUCTURE),
        st.lists(st.sampled_from(LABELS), min_size=1, max_size=2).map(" ".join),
        st.lists(st.sampled_from(VALUES), min_size=0, max_size=8).map(" ".join),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
    )


@FUZZ
@given(st.lists(star_line(), max_size=40), st.sampled_from(["\n", "\r\n", "\r"]))
def test_fuzz_star_grammar(lines, newline):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.star")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(newline.join(lines))
        blocks = input_error_or_success(read_star, path)
        if blocks is not None:
            assert isinstance(blocks, dict) and blocks
        use_metadata(input_error_or_success(read_particles, path))


@FUZZ
@given(st.binary(max_size=2000), st.integers(0, 3))
def test_fuzz_star_bytes_around_a_valid_header(noise, where):
    head = b"data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\ndata_particles\nloop_\n_rlnImageName\n"
    data = [head + noise, noise + head, head[: len(head) // 2] + noise, head + b"1@s.mrcs " + noise][where]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.star")
        with open(path, "wb") as f:
            f.write(data)
        input_error_or_success(read_star, path)
        use_metadata(input_error_or_success(read_particles, path))


# ================================================================================ cryoSPARC .cs
CS_FIELDS = {
    "uid": ["<u8", "<f4", "S4"],
    "blob/path": ["S20", "<U20", "<f4", "O"],
    "blob/idx": ["<u4", "<i4", "<f8", "S3"],
    "blob/shape": [("<u4", (2,)), ("<u4", (3,)), "<u4", ("<i4", (2,))],
    "blob/psize_A": ["<f4", "<f8", "<i4", "S3"],
    "ctf/accel_kv": ["<f4", "S3"], "ctf/cs_mm": ["<f4"], "ctf/amp_contrast": ["<f4", "<f8"],
    "ctf/df1_A": ["<f4", "S3", "<i2"], "ctf/df2_A": ["<f4"], "ctf/df_angle_rad": ["<f4", "<U3"],
    "ctf/phase_shift_rad": ["<f4"], "ctf/bfactor": ["<f4"], "ctf/scale": ["<f4"], "ctf/exp_group_id": ["<u4", "<f4"],
    "alignments3D/pose": [("<f4", (3,)), ("<f4", (2,)), "<f4", ("<f8", (4,))],
    "alignments3D/shift": [("<f4", (2,)), ("<f4", (3,)), "<f4"],
    "alignments3D/psize_A": ["<f4", "S2"], "alignments3D/split": ["<u4", "<f4", "<i8"],
    "alignments2D/pose": ["<f4"], "alignments2D/shift": [("<f4", (2,))],
    "location/micrograph_path": ["S20", "<f4"],
}
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, 1e30, -1e30, np.nan, np.inf, -np.inf, 1e-40, 300.0, 12000.0]
PATHS = [b">J1/a.mrcs", b"J1/a.mrcs", b"", b">", b"/abs/x.mrcs", b"\xff\xfe", b"a b.mrcs", b"1@x"]


@st.composite
def cs_array(draw):
    names = draw(st.lists(st.sampled_from(sorted(CS_FIELDS)), unique=True, max_size=len(CS_FIELDS)))
    if draw(st.booleans()):  # usually keep the fields every particle file has, to reach the deeper code
        names = sorted(set(names) | {"blob/path", "blob/idx"})
    fields = []
    for name in names:
        spec = draw(st.sampled_from(CS_FIELDS[name]))
        fields.append((name,) + (spec if isinstance(spec, tuple) else (spec,)))
    n = draw(st.integers(0, 5))
    if not fields:
        return np.zeros(n, dtype=draw(st.sampled_from(["<f4", "<i8"])))
    a = np.zeros(n, dtype=fields)
    for name in names:
        col = a[name]
        kind = col.dtype.kind
        if kind == "O":
            col[...] = draw(st.sampled_from([None, 1.5, "x", b"J1/a.mrcs"]))
        elif kind in "SU":
            vals = [draw(st.sampled_from(PATHS)) for _ in range(n)]
            col[...] = np.array([v.decode("latin-1") if kind == "U" else v for v in vals],
                                dtype=col.dtype).reshape(col.shape[:1]) if n else col
        elif kind == "f":
            col[...] = np.array(draw(st.lists(st.sampled_from(SPECIAL_FLOATS), min_size=col.size, max_size=col.size)),
                                dtype=np.float64).reshape(col.shape) if col.size else col
        else:
            info = np.iinfo(col.dtype)
            col[...] = np.array(draw(st.lists(st.integers(max(info.min, -3), min(info.max, 300)),
                                              min_size=col.size, max_size=col.size)),
                                dtype=np.int64).reshape(col.shape) if col.size else col
    if draw(st.integers(0, 9)) == 0:  # other shapes than 1-D
        a = a.reshape(1, -1) if draw(st.booleans()) else (a[0] if n else a)
    return a


def _save_cs(path, array) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=True)


@FUZZ
@given(cs_array())
def test_fuzz_cs_structured_arrays(array):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.cs")
        _save_cs(path, array)
        use_metadata(input_error_or_success(read_particles, path, tolerate=_known_cs_field_bug))


def _valid_cs_bytes() -> bytes:
    fields = [("blob/path", "S12"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
              ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
              ("ctf/df2_A", "<f4"), ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
    a = np.zeros(3, dtype=fields)
    a["blob/path"], a["blob/idx"], a["blob/shape"], a["blob/psize_A"] = b">J1/a.mrcs", [0, 1, 2], 16, 1.5
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"], a["ctf/df1_A"], a["ctf/df2_A"] = 300, 2.7, .1, 1e4, 1e4
    a["alignments3D/pose"] = [[0.1, 0.2, 0.3]] * 3
    with tempfile.TemporaryFile() as f:
        np.save(f, a)
        f.seek(0)
        return f.read()


VALID_CS = _valid_cs_bytes()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_CS) - 1), st.binary(min_size=1, max_size=4)), max_size=6),
       st.integers(0, len(VALID_CS)))
def test_fuzz_cs_corrupted_npy_bytes(edits, cut):
    data = bytearray(VALID_CS)
    for pos, new in edits:  # overwrite bytes: header dict text, shape, dtype descr, or data
        data[pos:pos + len(new)] = new
    data = bytes(data[:cut]) if cut < len(data) and cut % 3 == 0 else bytes(data)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.cs")
        with open(path, "wb") as f:
            f.write(data)
        use_metadata(input_error_or_success(read_particles, path, tolerate=_known_cs_field_bug))


def test_cs_pickled_object_array_is_refused_not_unpickled(tmp_path):
    """A .cs holding a pickled object array is never unpickled (allow_pickle=False): InputError."""
    path = tmp_path / "evil.cs"
    _save_cs(path, np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InputError, match="not a cryoSPARC"):
        read_particles(str(path))


# ================================================================================ MRC
def _valid_mrc_bytes(kind: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.mrc")
        data = np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32)
        if kind == "map":
            write_map(path, np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32), 1.5)
        else:
            write_stack(path, data, 1.5)
        with open(path, "rb") as f:
            return f.read()


VALID_MRC = {k: _valid_mrc_bytes(k) for k in ("map", "stack")}
# header words (4 bytes each) the readers interpret: nx ny nz mode nxstart.. mx my mz cella(3) cellb(3)
# mapc mapr maps dmin dmax dmean ispg nsymbt ... map id (208) machst (212)
HEADER_WORDS = list(range(0, 24 * 4, 4)) + [208, 212, 216, 220]
WORD_VALUES = [0, 1, 2, 3, 4, 6, 12, 16, 101, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 31, 6, 7, 1024, 10 ** 6]


def _huge_nsymbt(data: bytes) -> bool:
    """The header's extended-header size (either byte order) is far beyond the file."""
    if len(data) < 96:
        return False
    sizes = [int(np.frombuffer(data, dtype=e, count=1, offset=92)[0]) for e in ("<i4", ">i4")]
    return any(v > max(len(data), 1 << 26) for v in sizes)


def _read_all_ways(path: str) -> None:
    with open(path, "rb") as f:
        assume(not (KNOWN_BUG_HUGE_NSYMBT and _huge_nsymbt(f.read(1024))))
    vol = input_error_or_success(read_map, path)
    if vol is not None:
        arr, apix = vol
        assert arr.ndim == 3 and len(set(arr.shape)) == 1 and np.isfinite(arr).all() and apix > 0
    vol = input_error_or_success(read_map, path, apix=1.0)
    stack = input_error_or_success(open_stack, path)
    if stack is not None:
        assert stack.ndim == 3 and stack.shape[1] == stack.shape[2]
        with no_hang():
            np.asarray(stack[-1:], dtype=np.float32)  # the memory map is readable to its end
        del stack
    input_error_or_success(stack_apix, path)


@FUZZ
@given(st.sampled_from(["map", "stack"]),
       st.lists(st.tuples(st.sampled_from(HEADER_WORDS),
                          st.one_of(st.sampled_from(WORD_VALUES), st.integers(-2 ** 31, 2 ** 31 - 1))), max_size=5),
       st.sampled_from(["<i4", "<f4", ">i4"]))
def test_fuzz_mrc_header_words(kind, edits, fmt):
    data = bytearray(VALID_MRC[kind])
    for offset, value in edits:
        if fmt == "<f4":
            word = np.array([value], dtype="<f4").tobytes()
        else:
            word = np.array([value & 0xFFFFFFFF], dtype="<u4").astype(fmt.replace("i", "u")).tobytes()
        data[offset:offset + 4] = word
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.mrcs")
        with open(path, "wb") as f:
            f.write(bytes(data))
        _read_all_ways(path)


@FUZZ
@given(st.sampled_from(["map", "stack"]), st.integers(0, 2000), st.binary(max_size=1100), st.integers(0, 2))
def test_fuzz_mrc_truncated_and_random_headers(kind, cut, noise, how):
    valid = VALID_MRC[kind]
    if how == 0:  # truncated anywhere
        data = valid[: min(cut, len(valid) - 1)]
    elif how == 1:  # random header bytes over a valid data block
        data = (noise + valid[len(noise):]) if len(noise) <= 1024 else noise
    else:  # random bytes of any length
        data = noise
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.mrc")
        with open(path, "wb") as f:
            f.write(data)
        _read_all_ways(path)


# ================================================================================ known bugs (regressions)
def test_known_bug_image_locations_of_empty_table(tmp_path):
    """Fixed: image_locations() of 0 particles is two empty arrays (it raised KeyError), so
    write_particles of an empty subset works."""
    path = tmp_path / "empty.star"
    path.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n"
                    "data_particles\nloop_\n_rlnImageName\n")
    meta = read_particles(str(path))
    paths, idx = meta.image_locations()
    assert paths.shape == (0,) and idx.shape == (0,) and idx.dtype == np.int64
    from scipion_gmmhet.engine.io.metadata import write_particles

    out = tmp_path / "empty_out.star"
    write_particles(str(out), meta.subset(np.zeros(0, dtype=np.int64)))
    again = read_particles(str(out))
    assert len(again) == 0 and again.apix == 1.0


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nsymbt", [2 ** 28, -1024])
def test_known_bug_huge_extended_header_is_refused_without_allocating(tmp_path, order, nsymbt):
    """Fixed: nsymbt (either byte order) is checked against the file size before mrcfile
    allocates the extended header."""
    import tracemalloc

    data = bytearray(VALID_MRC["stack"])
    if order == ">":  # the same stack, big-endian (machine stamp 0x11 0x11)
        hdr = np.frombuffer(bytes(data[:1024]), dtype="<i4").byteswap()
        data[:1024] = hdr.tobytes()
        data[208:212] = b"MAP "
        data[212:216] = b"\x11\x11\x00\x00"
        data[1024:] = np.frombuffer(bytes(data[1024:]), dtype="<f4").astype(">f4").tobytes()
        assert stack_apix_ok(tmp_path, bytes(data))
    data[92:96] = np.array([nsymbt], dtype=order + "i4").tobytes()  # nsymbt: 256 MiB, or negative
    path = tmp_path / "x.mrcs"
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="truncated or not an MRC file"):
            stack_apix(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2 ** 20, f"reading a 2 KB file allocated {peak / 2 ** 20:.0f} MiB"


def _cs_with(fields, values, n=2):
    a = np.zeros(n, dtype=[("blob/path", "S12"), ("blob/idx", "<u4")] + fields)
    a["blob/path"], a["blob/idx"] = b"J1/a.mrcs", np.arange(n)
    for k, v in values.items():
        a[k] = v
    return a


@pytest.mark.parametrize("case", ["idx_text", "psize_text", "pose_2", "shape_empty"])
def test_known_bug_cs_fields_of_wrong_type(tmp_path, case):
    """Fixed: a field of the wrong dtype/shape is an InputError naming the file and the field
    (it was a ValueError); an empty file with a well-formed blob/shape reads as 0 particles."""
    if case == "idx_text":
        a = np.zeros(2, dtype=[("blob/path", "S12"), ("blob/idx", "S3")])
        a["blob/path"], a["blob/idx"] = b"J1/a.mrcs", b"x"
    elif case == "psize_text":
        a = _cs_with([("blob/psize_A", "S3")], {"blob/psize_A": b"J1/"})
    elif case == "pose_2":
        a = _cs_with([("blob/psize_A", "<f4"), ("alignments3D/pose", "<f4", (2,)), ("alignments3D/shift", "<f4", (2,))],
                     {"blob/psize_A": 1.0})
    else:
        a = _cs_with([("blob/psize_A", "<f4"), ("blob/shape", "<u4", (2,))], {}, n=0)
    path = tmp_path / "p.cs"
    _save_cs(path, a)
    if case == "shape_empty":  # well-formed and empty: read like an empty star, refused by validate
        meta = read_particles(str(path))
        assert len(meta) == 0 and meta.image_locations()[1].shape == (0,)
        with pytest.raises(InputError, match="no particles"):
            meta.validate(require_alignment=False, require_ctf=False)
        return
    field = {"idx_text": "blob/idx", "psize_text": "blob/psize_A", "pose_2": "alignments3D/pose"}[case]
    with pytest.raises(InputError) as e:
        read_particles(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: field {field} has dtype"), msg
    assert "export the particles again from cryoSPARC" in msg


@pytest.mark.parametrize("spec,fragment", [
    (("blob/shape", "<u4"), "field blob/shape has dtype uint32/shape (2,)"),
    (("blob/shape", "<u4", (3,)), "field blob/shape has dtype uint32/shape (2, 3)"),
    (("alignments3D/shift", "<f4", (3,)), "field alignments3D/shift"),
    (("ctf/df1_A", "S3"), "field ctf/df1_A has dtype |S3"),
    (("ctf/exp_group_id", "<f4", (2,)), "field ctf/exp_group_id"),
])
def test_cs_field_checks_name_the_field(tmp_path, spec, fragment):
    fields = [("blob/psize_A", "<f4"), spec]
    if spec[0] == "alignments3D/shift":
        fields.append(("alignments3D/pose", "<f4", (3,)))
    a = _cs_with(fields, {"blob/psize_A": 1.0})
    path = tmp_path / "p.cs"
    _save_cs(path, a)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        read_particles(str(path))


def test_cs_fractional_or_nan_blob_idx_is_refused(tmp_path):
    for bad in (0.5, np.nan, -1.0):
        a = np.zeros(2, dtype=[("blob/path", "S12"), ("blob/idx", "<f8"), ("blob/psize_A", "<f4")])
        a["blob/path"], a["blob/idx"], a["blob/psize_A"] = b"J1/a.mrcs", [0.0, bad], 1.0
        path = tmp_path / "p.cs"
        _save_cs(path, a)
        with pytest.raises(InputError, match="blob/idx"):
            read_particles(str(path))
    a["blob/idx"] = [0.0, 3.0]  # whole numbers stored as floats are fine
    _save_cs(path, a)
    assert read_particles(str(path)).particles["rlnImageName"].tolist() == ["000001@J1/a.mrcs", "000004@J1/a.mrcs"]


def test_cs_real_export_fields_pass_the_checks(real_metadata_dir):
    """The real cryoSPARC export (ctf/type is text, ctf/tetra_A has 4 values) is not refused for
    fields the reader never reads: only for its 2D-only alignments."""
    real = str(real_metadata_dir / "cryosparc_J2_particles_exported.cs")
    if not os.path.exists(real):
        pytest.skip("real cryoSPARC export not available here")
    from scipion_gmmhet.engine.io.cryosparc import CS_NUMERIC, cs_field

    cs = np.load(real)
    checked = [name for name in CS_NUMERIC if name in cs.dtype.names]
    assert {"blob/idx", "blob/shape", "ctf/df1_A", "ctf/exp_group_id"} <= set(checked)
    for name in checked:
        assert len(cs_field(cs, name, real)) == len(cs)
    assert cs_field(cs, "blob/shape", real).shape == (len(cs), 2)
    with pytest.raises(InputError, match="only 2D alignments"):
        read_particles(real)


def stack_apix_ok(tmp_path, data: bytes) -> bool:
    """The (unmodified) file reads as a stack with the right pixel size."""
    p = tmp_path / "ok.mrcs"
    p.write_bytes(data)
    return abs(stack_apix(str(p)) - 1.5) < 1e-6 and np.asarray(open_stack(str(p))).shape == (4, 6, 6)
