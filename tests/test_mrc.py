"""MRC maps and stacks: round trips, memory maps, RELION-written stacks, bad files."""
from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest

from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.mrc import open_stack, read_map, stack_apix, write_map, write_stack

# mrcfile itself warns about the bad files these tests write on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _vol(d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(d, d, d)).astype(np.float32)


def test_map_round_trip(tmp_path):
    vol = _vol()
    path = str(tmp_path / "m.mrc")
    write_map(path, vol.astype(np.float64), 1.7)
    assert not os.path.exists(path + ".tmp")
    back, apix = read_map(path)
    assert back.dtype == np.float32 and back.shape == (16, 16, 16)
    np.testing.assert_array_equal(back, vol)
    assert apix == pytest.approx(1.7, rel=1e-6)
    with mrcfile.open(path) as m:
        assert m.header.mode == 2 and m.is_volume()
    assert read_map(path, apix=2.5)[1] == 2.5


def test_map_axis_order_from_header(tmp_path):
    vol = _vol(8)
    path = str(tmp_path / "perm.mrc")
    with mrcfile.new(path) as m:  # sections along x, rows y, columns z
        m.set_data(np.ascontiguousarray(vol.transpose(2, 1, 0)))
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1
        m.voxel_size = 1.0
    np.testing.assert_array_equal(read_map(path)[0], vol)


def test_map_errors(tmp_path):
    d = tmp_path
    with pytest.raises(InputError, match="no such file"):
        read_map(str(d / "missing.mrc"))
    with mrcfile.new(str(d / "rect.mrc")) as m:
        m.set_data(np.zeros((8, 8, 10), np.float32))
        m.voxel_size = 1.0
    with pytest.raises(InputError, match="non-cubic"):
        read_map(str(d / "rect.mrc"))
    write_stack(str(d / "img.mrc"), np.zeros((1, 8, 8), np.float32), 1.0)
    with pytest.raises(InputError, match="2D image"):
        read_map(str(d / "img.mrc"))
    for bad, name in ((np.nan, "nan.mrc"), (np.inf, "inf.mrc")):
        vol = _vol(8)
        vol[1, 2, 3] = bad
        with mrcfile.new(str(d / name)) as m:
            m.set_data(vol)
            m.voxel_size = 1.0
        with pytest.raises(InputError, match="NaN or Inf"):
            read_map(str(d / name))
    write_map(str(d / "ok.mrc"), _vol(8), 1.0)
    raw = open(d / "ok.mrc", "rb").read()
    (d / "trunc.mrc").write_bytes(raw[:-100])
    with pytest.raises(InputError, match="truncated"):
        read_map(str(d / "trunc.mrc"))
    (d / "tiny.mrc").write_bytes(raw[:500])
    with pytest.raises(InputError, match="truncated"):
        read_map(str(d / "tiny.mrc"))
    (d / "garbage.mrc").write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(InputError):
        read_map(str(d / "garbage.mrc"))
    with mrcfile.new(str(d / "nopix.mrc")) as m:
        m.set_data(_vol(8))
    with pytest.raises(InputError, match="no pixel size"):
        read_map(str(d / "nopix.mrc"))
    assert read_map(str(d / "nopix.mrc"), apix=1.2)[1] == 1.2


def test_stack_round_trip_and_memmap(tmp_path):
    imgs = np.random.default_rng(2).normal(size=(7, 12, 12)).astype(np.float32)
    path = str(tmp_path / "s.mrcs")
    write_stack(path, imgs, 2.25)
    with mrcfile.open(path) as m:
        assert m.header.ispg == 0 and m.is_image_stack()
    st = open_stack(path)
    assert isinstance(st, np.memmap) and st.shape == (7, 12, 12) and not st.flags.writeable
    np.testing.assert_array_equal(np.asarray(st[[4, 1]]), imgs[[4, 1]])
    assert stack_apix(path) == pytest.approx(2.25)
    single = str(tmp_path / "one.mrc")
    write_stack(single, imgs[0], 1.0)
    assert open_stack(single).shape == (1, 12, 12)


def test_stack_errors(tmp_path):
    path = str(tmp_path / "s.mrcs")
    write_stack(path, np.zeros((4, 8, 8), np.float32), 1.0)
    raw = open(path, "rb").read()
    (tmp_path / "t.mrcs").write_bytes(raw[:-4])
    with pytest.raises(InputError, match="truncated"):
        open_stack(str(tmp_path / "t.mrcs"))
    with mrcfile.new(str(tmp_path / "rect.mrcs")) as m:
        m.set_data(np.zeros((3, 8, 6), np.float32))
    with pytest.raises(InputError, match="not square"):
        open_stack(str(tmp_path / "rect.mrcs"))
    with pytest.raises(InputError, match="no such file"):
        open_stack(str(tmp_path / "missing.mrcs"))


def test_relion_written_stack_without_map_id(real_metadata_dir):
    """RELION 3.1's stack has no 'MAP ' id and a zero machine stamp: it must still open."""
    path = str(real_metadata_dir / "relion31.mrcs")
    st = open_stack(path)
    assert st.shape == (5, 256, 256) and st.dtype == np.float32
    with mrcfile.open(path, permissive=True) as m:
        np.testing.assert_array_equal(np.asarray(st[3]), m.data[3])
    assert open_stack(str(real_metadata_dir / "toy_datadir" / "toy_images_b.mrcs")).shape == (900, 30, 30)


@pytest.mark.parametrize("big_endian", [False, True])
def test_extended_header_that_fits_is_read_and_one_past_the_file_is_refused(tmp_path, big_endian):
    """nsymbt is checked against the file size from the raw header (in the byte order mrcfile
    uses) before mrcfile reads it: a real extended header still reads, an impossible one is
    refused with the 'truncated' message."""
    vol = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    path = str(tmp_path / "ext.mrc")
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(vol.astype(">f4") if big_endian else vol)
        m.set_extended_header(np.zeros(256, dtype="V1"))
        m.voxel_size = 1.5
    raw = open(path, "rb").read()
    assert (raw[212] == 0x11) == big_endian and len(raw) == 1024 + 256 + vol.nbytes
    got, apix = read_map(path)
    assert np.array_equal(got, vol) and apix == pytest.approx(1.5)
    assert np.array_equal(np.asarray(open_stack(path)), vol)
    bad = bytearray(raw)
    bad[92:96] = np.array([len(raw)], dtype=">i4" if big_endian else "<i4").tobytes()  # 1024 + nsymbt > size
    open(path, "wb").write(bytes(bad))
    for reader in (read_map, open_stack, stack_apix):
        with pytest.raises(InputError, match="truncated or not an MRC file: header says .* bytes of extended header"):
            reader(path)
