"""Issue 8: outputs and checkpoints are written atomically; a kill or a full disk never leaves a
half-written file that looks complete, and a full disk gives one clear line.

- SIGKILL in the middle of a write (a child process stopped at a known point inside the write,
  and a child killed at random moments while rewriting a checkpoint-sized file): the
  destination is absent or the previous complete version.
- An exception in the middle of a write: the old file stays, the temporary file is removed.
- Disk full: a real 64 KiB tmpfs when this machine lets us mount one (root), and always a
  simulated ENOSPC: InputError('<path>: disk full while writing ...'), old file intact.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.io import atomic, star
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.io.mrc import open_stack, read_map, write_map, write_stack
from scipion_gmmhet.engine.io.star import read_star, write_star

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================ the helper
def test_helpers_write_exact_paths(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "hello\n")
    atomic.save_npy(tmp_path / "z.npy.part", np.arange(5))  # no '.npy' appended to the name
    atomic.torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    atomic.atomic_write(tmp_path / "g.npz", lambda tmp: np.savez(tmp, a=np.ones(2)), suffix=".tmp.npz")
    with atomic.atomic_open(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert np.load(tmp_path / "z.npy.part").tolist() == [0, 1, 2, 3, 4]
    assert torch.load(tmp_path / "m.pt")["w"].tolist() == [0, 1, 2]
    assert np.load(tmp_path / "g.npz")["a"].tolist() == [1.0, 1.0]
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "g.npz", "m.pt", "z.npy.part"]  # no .tmp left
    with pytest.raises(ValueError, match="write mode"):
        with atomic.atomic_open(tmp_path / "a.txt", "r"):
            pass


def test_exception_midway_keeps_old_file_and_removes_tmp(tmp_path):
    path = tmp_path / "out.txt"
    atomic.write_text(path, "old complete\n")
    with pytest.raises(KeyError):
        with atomic.atomic_open(path, "w") as f:
            f.write("new, half")
            raise KeyError("writer failed")
    assert path.read_text() == "old complete\n" and os.listdir(tmp_path) == ["out.txt"]
    with pytest.raises(ZeroDivisionError):
        atomic.atomic_write(tmp_path / "never.bin", lambda tmp: (open(tmp, "wb").write(b"x"), 1 / 0))
    assert os.listdir(tmp_path) == ["out.txt"]  # absent, and no temporary file either
    with pytest.raises(RuntimeError, match="did not create"):
        atomic.atomic_write(tmp_path / "nothing.bin", lambda tmp: None)


def test_simulated_enospc_is_one_clear_line(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic.torch_save({"epoch": 1}, path)
    for exc in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
                RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                             "file data/0: No space left on device")):
        with pytest.raises(InputError) as e:
            with atomic.atomic_open(path, "wb") as f:
                f.write(b"partial checkpoint bytes")
                raise exc
        msg = str(e.value)
        assert msg.startswith(f"{path}: disk full while writing (")
        assert msg.endswith("; free space or choose another output folder")
        assert "\n" not in msg
        assert torch.load(path)["epoch"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]
    # an errno-less failure counts as disk full only when the folder really is (nearly) full
    vague = OSError("50000 requested and 8176 written")
    with pytest.raises(OSError, match="requested"):
        atomic.atomic_write(path, lambda tmp: (open(tmp, "wb").close(), (_ for _ in ()).throw(vague)))
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 4096)
    with pytest.raises(InputError, match="disk full"):
        atomic.atomic_write(path, lambda tmp: (open(tmp, "wb").close(), (_ for _ in ()).throw(vague)))
    assert torch.load(path)["epoch"] == 1
    # other errors are not disguised as a full disk
    with pytest.raises(OSError) as e:
        with atomic.atomic_open(path, "wb"):
            raise OSError(errno.EACCES, "Permission denied")
    assert not isinstance(e.value, InputError)


# ============================================================================ SIGKILL mid-write
_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import numpy as np, pandas as pd
    from scipion_gmmhet.engine.io import atomic, mrc, star
    import mrcfile.mrcfile

    what, dest, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    real_open = open

    class Stalling:
        '''A file whose write stores half of the data, tells the parent, and waits to be killed.'''
        def __init__(self, f):
            self.f = f
        def write(self, data):
            data = data if isinstance(data, str) else bytes(memoryview(data).cast("B"))
            self.f.write(data[: len(data) // 2]); self.f.flush()
            real_open(marker, "w").close()
            time.sleep(60)
        def __getattr__(self, name):
            if name == "f":
                raise AttributeError(name)
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *a):
            self.f.close()

    def stalling_open(name, mode="r", *a, **k):
        f = real_open(name, mode, *a, **k)
        return Stalling(f) if str(name).endswith(".tmp") and "w" in mode else f

    if what == "star":
        star.open = stalling_open
        names = ["%06d@s.mrcs" % i for i in range(1, 2001)]
        star.write_star(dest, {{"particles": pd.DataFrame({{"rlnImageName": names}})}})
    elif what == "mrc":
        mrcfile.mrcfile.open = stalling_open
        mrc.write_map(dest, np.full((32, 32, 32), 2.0, np.float32), 1.5)
    elif what == "helper":
        with atomic.atomic_open(dest, "wb") as f:
            Stalling(f).write(np.full(100000, 2.0).tobytes())
""")


@pytest.mark.parametrize("what", ["helper", "star", "mrc"])
@pytest.mark.parametrize("old", [True, False])
def test_sigkill_mid_write_leaves_old_or_nothing(tmp_path, what, old):
    dest = str(tmp_path / {"helper": "x.npy", "star": "p.star", "mrc": "m.mrc"}[what])
    if old:  # the previous complete version
        if what == "helper":
            atomic.save_npy(dest, np.full(10, 1.0))
        elif what == "star":
            write_star(dest, {"particles": pd.DataFrame({"rlnImageName": ["000001@old.mrcs"]})})
        else:
            write_map(dest, np.full((8, 8, 8), 1.0, np.float32), 1.5)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=REPO))
    marker = str(tmp_path / "midway")
    proc = subprocess.Popen([sys.executable, str(script), what, dest, marker])
    try:
        t0 = time.time()
        while not os.path.exists(marker):
            assert proc.poll() is None, f"child exited with {proc.returncode} before the write"
            assert time.time() - t0 < 60, "child never reached the middle of the write"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.getsize(dest + ".tmp") > 0  # the kill did land in the middle of a write
    if not old:
        assert not os.path.exists(dest)
    elif what == "helper":
        assert np.load(dest).tolist() == [1.0] * 10
    elif what == "star":
        assert read_star(dest)["particles"]["rlnImageName"].tolist() == ["000001@old.mrcs"]
    else:
        vol, apix = read_map(dest)
        assert vol.shape == (8, 8, 8) and (vol == 1.0).all() and apix == 1.5


_LOOP = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import numpy as np, torch
    from scipion_gmmhet.engine.io import atomic, mrc
    ckpt, stack, ready = sys.argv[1], sys.argv[2], sys.argv[3]
    k = 0
    while True:
        k += 1
        # a checkpoint-sized state dict (4 MiB) and a 1 MiB stack, every value = the version number
        atomic.torch_save({{"epoch": k, "w": torch.full((1 << 20,), float(k))}}, ckpt)
        mrc.write_stack(stack, np.full((64, 64, 64), float(k), np.float32), 1.0)
        if k == 1:
            open(ready, "w").close()
""")


def test_sigkill_at_random_moments_never_leaves_a_broken_file(tmp_path):
    """A child rewrites a checkpoint (engine/io/atomic.py) and a stack (mrc.write_stack) in a loop;
    killed at random moments, each file on disk is always one complete version."""
    script = tmp_path / "loop.py"
    script.write_text(_LOOP.format(repo=REPO))
    ckpt, stack = str(tmp_path / "ckpt.pt"), str(tmp_path / "s.mrcs")
    rng = np.random.default_rng(0)
    for trial in range(2):
        ready = str(tmp_path / f"ready{trial}")
        proc = subprocess.Popen([sys.executable, str(script), ckpt, stack, ready])
        try:
            t0 = time.time()
            while not os.path.exists(ready):
                assert proc.poll() is None and time.time() - t0 < 60
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0.05, 0.5)))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        ck = torch.load(ckpt)
        assert ck["w"].shape == (1 << 20,) and bool((ck["w"] == ck["epoch"]).all())
        s = np.asarray(open_stack(stack))
        assert s.shape == (64, 64, 64) and (s == s[0, 0, 0]).all() and s[0, 0, 0] >= 1


# ============================================================================ the existing writers
def _failing_open(real_open):
    """open() whose files for '*.tmp' fail with ENOSPC after writing half of the first write."""
    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            data = bytes(memoryview(data).cast("B")) if not isinstance(data, str) else data
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            if name == "f":
                raise AttributeError(name)
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake(name, mode="r", *a, **k):
        f = real_open(name, mode, *a, **k)
        return Full(f) if str(name).endswith(".tmp") and "w" in mode else f
    return fake


def test_existing_writers_keep_the_old_file_on_a_failed_write(tmp_path, monkeypatch):
    import builtins
    import mrcfile.mrcfile

    write_star(tmp_path / "p.star", {"particles": pd.DataFrame({"rlnImageName": ["000001@old.mrcs"]})})
    write_map(str(tmp_path / "m.mrc"), np.full((8, 8, 8), 1.0, np.float32), 1.5)
    monkeypatch.setattr(star, "open", _failing_open(builtins.open), raising=False)
    monkeypatch.setattr(mrcfile.mrcfile, "open", _failing_open(builtins.open), raising=False)
    with pytest.raises(InputError, match="disk full"):
        write_star(tmp_path / "p.star", {"particles": pd.DataFrame({"rlnImageName": ["000001@new.mrcs"] * 99})})
    with pytest.raises(InputError, match="disk full"):
        write_map(str(tmp_path / "m.mrc"), np.full((16, 16, 16), 2.0, np.float32), 1.5)
    monkeypatch.undo()
    assert read_star(tmp_path / "p.star")["particles"]["rlnImageName"].tolist() == ["000001@old.mrcs"]
    vol, _ = read_map(str(tmp_path / "m.mrc"))
    assert vol.shape == (8, 8, 8) and (vol == 1.0).all()
    assert sorted(os.listdir(tmp_path)) == ["m.mrc", "p.star"]  # no '*.tmp' left behind


def test_existing_writers_report_disk_full_as_input_error(tmp_path, monkeypatch):
    """write_star, write_map, write_stack and GMM.save go through engine/io/atomic.py: a full disk
    is the one-line InputError and no '*.tmp' is left behind."""
    import builtins
    import mrcfile.mrcfile

    monkeypatch.setattr(star, "open", _failing_open(builtins.open), raising=False)
    with pytest.raises(InputError) as e:
        write_star(tmp_path / "p.star", {"particles": pd.DataFrame({"rlnImageName": ["000001@new.mrcs"] * 99})})
    assert str(e.value) == (f"{tmp_path / 'p.star'}: disk full while writing (No space left on device); "
                            "free space or choose another output folder")
    monkeypatch.setattr(mrcfile.mrcfile, "open", _failing_open(builtins.open), raising=False)
    with pytest.raises(InputError, match="disk full"):
        write_map(str(tmp_path / "m.mrc"), np.full((16, 16, 16), 2.0, np.float32), 1.5)
    with pytest.raises(InputError, match="disk full"):
        write_stack(str(tmp_path / "s.mrcs"), np.ones((3, 16, 16), np.float32), 1.5)
    monkeypatch.undo()

    def savez_full(file, *args, **kwargs):  # np.savez on a full disk: half a file, then ENOSPC
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez_full)
    with pytest.raises(InputError, match="gmm.npz: disk full"):
        GMM(np.zeros((4, 3)), np.ones(4), np.ones(4), 16, 1.5).save(str(tmp_path / "gmm.npz"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_gmm_save_writes_exact_path_atomically(tmp_path):
    """GMM.save through atomic_write(suffix='.tmp.npz'): the exact name, readable, no leftovers."""
    g = GMM(np.arange(12, dtype=np.float32).reshape(4, 3), np.ones(4, np.float32), np.full(4, 2.0, np.float32), 16,
            1.5, {"n_gauss": 4})
    g.save(str(tmp_path / "gmm.npz"))
    g.save(str(tmp_path / "gmm.npz"))  # overwrite
    assert os.listdir(tmp_path) == ["gmm.npz"]
    back = GMM.load(str(tmp_path / "gmm.npz"))
    assert np.array_equal(back.centers_A, g.centers_A) and back.box == 16 and back.info == {"n_gauss": "4"}


# ============================================================================ a real full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (needs root / CAP_SYS_ADMIN; skipped with the reason otherwise)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no 'mount' command: cannot make a size-limited folder; the simulated ENOSPC test covers it")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the simulated ENOSPC test covers disk full")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_real_disk_full_gives_input_error_and_keeps_old_checkpoint(small_disk):
    ckpt = small_disk / "epoch_0001.pt"
    atomic.torch_save({"epoch": 1, "w": torch.ones(100)}, ckpt)  # a small old checkpoint fits
    for name, write in [("epoch_0001.pt", lambda p: atomic.torch_save({"epoch": 2, "w": torch.ones(50000)}, p)),
                        ("latent.npy", lambda p: atomic.save_npy(p, np.ones((50000, 4), np.float32))),
                        ("loss.csv", lambda p: atomic.write_text(p, "epoch,loss\n" * 20000)),
                        ("gmm.npz", lambda p: atomic.atomic_write(p, lambda t: np.savez(t, c=np.ones(50000)),
                                                                  suffix=".tmp.npz"))]:
        with pytest.raises(InputError) as e:
            write(small_disk / name)
        msg = str(e.value)
        assert msg == (f"{small_disk / name}: disk full while writing (No space left on device); "
                       "free space or choose another output folder"), msg
        assert sorted(os.listdir(small_disk)) == ["epoch_0001.pt"]  # nothing half-written left behind
    ck = torch.load(ckpt)
    assert ck["epoch"] == 1 and ck["w"].shape == (100,)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # np.savez's leaked ZipFile
def test_real_disk_full_existing_writers_keep_old_files(small_disk):
    import gc
    import traceback

    write_map(str(small_disk / "m.mrc"), np.full((8, 8, 8), 1.0, np.float32), 1.5)
    with pytest.raises(InputError, match="disk full"):
        write_map(str(small_disk / "m.mrc"), np.full((32, 32, 32), 2.0, np.float32), 1.5)
    with pytest.raises(InputError, match="disk full"):
        write_stack(str(small_disk / "s.mrcs"), np.ones((20, 32, 32), np.float32), 1.5)
    with pytest.raises(InputError, match="disk full") as e:
        GMM(np.zeros((20000, 3)), np.ones(20000), np.ones(20000), 32, 1.5).save(str(small_disk / "gmm.npz"))
    traceback.clear_frames(e.value.__traceback__)  # np.savez leaves its ZipFile open: finalise it here
    del e
    gc.collect()
    with pytest.raises(InputError, match="disk full"):
        write_star(small_disk / "p.star", {"particles": pd.DataFrame({"rlnImageName": ["000001@new.mrcs"] * 9999})})
    vol, _ = read_map(str(small_disk / "m.mrc"))
    assert vol.shape == (8, 8, 8) and (vol == 1.0).all()
    assert sorted(os.listdir(small_disk)) == ["m.mrc"]  # no new file, no '*.tmp' left behind


def test_real_disk_full_in_the_simulator_is_one_clear_line(small_disk):
    """simulate.py writes its memory-mapped stack through atomic.py after reserving its blocks:
    a full disk is the one-line InputError (not a SIGBUS) and no '*.tmp' is left."""
    from scipion_gmmhet.engine.simulation.simulate import simulate

    out = small_disk / "sim"
    with pytest.raises(InputError) as e:
        simulate(str(out), "homogeneous", n=64, box=32, snr=1.0, seed=0)  # a 256 KiB stack on a 64 KiB disk
    assert str(e.value) == (f"{out / 'particles.mrcs'}: disk full while writing (No space left on device); "
                            "free space or choose another output folder"), str(e.value)
    assert not [f for _, _, fs in os.walk(small_disk) for f in fs]


def test_reconstruct_and_analysis_writers_report_disk_full_in_one_line(tmp_path, monkeypatch, capsys):
    """`gmmhet reconstruct` (its FSC csv) and the analysis writers (.cmm/.bild, npy, json, csv)
    go through engine/io/atomic.py: a full disk is exit status 2 with one line naming the file,
    and no '*.tmp' is left."""
    import builtins

    from scipion_gmmhet.engine.io import chimerax
    from scipion_gmmhet.engine.cli import main
    from scipion_gmmhet.engine.commands import analyze
    from scipion_gmmhet.engine.io import outputs
    from scipion_gmmhet.engine.simulation.simulate import simulate

    sim = tmp_path / "sim"
    simulate(str(sim), "homogeneous", n=64, box=32, snr=10.0, seed=0)
    out = tmp_path / "rec"
    monkeypatch.setattr(atomic, "open", _failing_open(builtins.open), raising=False)  # text writers: ENOSPC
    capsys.readouterr()
    assert main(["reconstruct", "--particles", str(sim / "particles.star"), "--out", str(out / "map.mrc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gmmhet reconstruct: error: {out / 'map_fsc.csv'}: disk full while writing "
                   "(No space left on device); free space or choose another output folder"], err
    assert not (out / "map_fsc.csv").exists()
    centers = np.zeros((3, 3))
    with pytest.raises(InputError, match=r"g\.cmm: disk full"):
        chimerax.displacement_cmm(centers, centers + 1, str(out / "g.cmm"), 32, 2.0)
    with pytest.raises(InputError, match=r"g\.bild: disk full"):
        chimerax.displacement_bild(centers, centers + 1, str(out / "g.bild"), 32, 2.0)
    with pytest.raises(InputError, match=r"s\.json: disk full"):
        outputs.write_json(str(out / "s.json"), {"a": 1.0})
    with pytest.raises(InputError, match=r"l\.npy: disk full"):
        analyze._write_npy(str(out / "l.npy"), np.arange(1000))
    monkeypatch.undo()
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, path, **k: _failing_open(builtins.open)(path, "w")
                        .write("row\n" * 100))
    with pytest.raises(InputError, match=r"pose_changes\.csv: disk full"):
        outputs.write_csv(str(out / "pose_changes.csv"), pd.DataFrame({"row": np.arange(5)}))
    monkeypatch.undo()
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if ".tmp" in f]
    assert sorted(os.listdir(out)) == ["map.mrc", "map_half1.mrc", "map_half2.mrc", "map_mask.mrc"]
