"""Issue 8, bad input: every bad input is refused before any GPU time, with one line naming the
input and the fix -- through the shared checks (engine/io/validate.py, metadata, mrc, star) and,
where a command exists, through ``gmmhet`` (exit status 2, one stderr line, no traceback).

The table in docs/reliability.md points at the tests here. Data are tiny (box 16, 6 particles).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from scipion_gmmhet.engine.io import validate
from scipion_gmmhet.engine.cli import main
from scipion_gmmhet.engine.io.data import ParticleImages
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.io.metadata import read_particles
from scipion_gmmhet.engine.io.mrc import open_stack, read_map, write_map, write_stack
from scipion_gmmhet.engine.io.star import read_star, write_star

BOX, APIX, N = 16, 2.0, 6


# ----------------------------------------------------------------------------- data helpers
def blob_map(box=BOX, sigma_px=2.5, shift=(0, 0, 0)):
    z, y, x = np.indices((box, box, box)) - box // 2
    r2 = (x - shift[0]) ** 2 + (y - shift[1]) ** 2 + (z - shift[2]) ** 2
    return np.exp(-r2 / (2 * sigma_px ** 2)).astype(np.float32)


def optics_table(box=BOX, apix=APIX, ctf=True):
    t = {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [apix],
         "rlnImageSize": [box], "rlnImageDimensionality": [2]}
    if ctf:
        t.update(rlnVoltage=[300.0], rlnSphericalAberration=[2.7], rlnAmplitudeContrast=[0.1])
    return pd.DataFrame(t)


def particle_table(names, align=True, ctf=True, groups=None):
    n = len(names)
    rng = np.random.default_rng(1)
    t = {"rlnImageName": names}
    if align:
        t.update(rlnAngleRot=rng.uniform(-180, 180, n), rlnAngleTilt=rng.uniform(0, 180, n),
                 rlnAnglePsi=rng.uniform(-180, 180, n))
    t.update(rlnOriginXAngst=np.zeros(n), rlnOriginYAngst=np.zeros(n))
    if ctf:
        t.update(rlnDefocusU=np.full(n, 15000.0), rlnDefocusV=np.full(n, 14000.0), rlnDefocusAngle=np.zeros(n))
    t["rlnOpticsGroup"] = groups if groups is not None else [1] * n
    return pd.DataFrame(t)


def names(n=N, stack="parts.mrcs"):
    return [f"{i:06d}@{stack}" for i in range(1, n + 1)]


def make_stack(folder, n=N, box=BOX, nan_rows=(), name="parts.mrcs"):
    imgs = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    for r in nan_rows:
        imgs[r, 3, 4] = np.nan
    write_stack(str(folder / name), imgs, APIX)
    return str(folder / name)


def make_star(folder, particles=None, optics=None, name="parts.star"):
    particles = particle_table(names()) if particles is None else particles
    optics = optics_table() if optics is None else optics
    path = str(folder / name)
    write_star(path, {"optics": optics, "particles": particles})
    return path


@pytest.fixture
def good(tmp_path):
    """A valid set: 6 particles (box 16, 2 A/px) with 3D alignment and CTF, a map, a GMM."""
    make_stack(tmp_path)
    star = make_star(tmp_path)
    write_map(str(tmp_path / "map.mrc"), blob_map(), APIX)
    GMM(np.array([[0, 0, 0], [4, 0, 0], [-4, 2, 0]]), np.ones(3), np.full(3, 3.0), BOX, APIX,
        {"resolution_A": 8.0}).save(str(tmp_path / "gmm.npz"))
    return tmp_path, star


def run_cli(argv, capsys):
    """(exit code, stderr) of ``gmmhet ARGV``; the error must be one line without a traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if rc == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert "Traceback" not in err and lines[0].startswith(f"gmmhet {argv[0]}: error: "), err
    return rc, err


def assert_refused(argv, capsys, *fragments):
    rc, err = run_cli(argv, capsys)
    assert rc == 2, f"expected exit 2, got {rc}; stderr: {err}"
    for f in fragments:
        assert f in err, (f, err)
    return err


def one_line(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ============================================================================ particles
def test_particles_without_3d_alignment(good, capsys):
    d, _ = good
    star = make_star(d, particle_table(names(), align=False), name="noalign.star")
    with pytest.raises(InputError) as e:
        validate.check_particles(read_particles(star))
    one_line(e, "noalign.star", "no 3D alignment", "rlnAngleRot", "3D refinement")
    assert_refused(["reconstruct", "--particles", star, "--out", d / "r.mrc"], capsys, "no 3D alignment")
    assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--out", d / "t"], capsys,
                   "no 3D alignment")


def test_particles_without_ctf(good, capsys, caplog):
    d, _ = good
    star = make_star(d, particle_table(names(), ctf=False), optics_table(ctf=False), name="noctf.star")
    meta = read_particles(star)
    with pytest.raises(InputError) as e:
        validate.check_particles(meta, need_ctf=True)
    one_line(e, "noctf.star", "no CTF parameters", "rlnDefocusU", "--ctf none")
    validate.check_particles(meta, need_ctf=False)  # a caller that ignores the CTF
    # issue 18: every command refuses unless the user says --ctf none; "auto" never ignores the CTF silently
    for ctf in ([], ["--ctf", "auto"], ["--ctf", "full"], ["--ctf", "ctf"]):
        assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", *ctf, "--out", d / "t"],
                       capsys, "noctf.star: no CTF parameters", "--ctf none")
    assert_refused(["reconstruct", "--particles", star, "--out", d / "r.mrc", "--no-mask"], capsys,
                   "noctf.star: no CTF parameters", "--ctf-mode none")
    rc, _ = run_cli(["reconstruct", "--particles", star, "--out", d / "r.mrc", "--no-mask", "--ctf-mode", "none"],
                    capsys)
    assert rc == 0 and (d / "r.mrc").exists()
    from scipion_gmmhet.engine.io.data import Particles
    assert Particles.from_star(star, ctf_mode="none").ctf is None  # the explicit choice is accepted


def test_ctf_choice_resolution():
    """resolve_ctf_mode: auto picks full/premultiplied with CTF; without CTF only 'none' passes."""
    assert validate.resolve_ctf_mode(True, "auto", "p") == "full"
    assert validate.resolve_ctf_mode(True, None, "p", premultiplied=True) == "premultiplied"
    assert validate.resolve_ctf_mode(True, "phase_flipped", "p") == "phase_flipped"
    assert validate.resolve_ctf_mode(False, "none", "p") == "none"
    for mode in ("auto", None, "full", "phase_flipped", "premultiplied"):
        with pytest.raises(InputError) as e:
            validate.resolve_ctf_mode(False, mode, "p.star")
        one_line(e, "p.star: no CTF parameters", "--ctf none", "CTF = none")


def test_empty_particle_set(good, capsys):
    d, _ = good
    star = make_star(d, particle_table([]), name="empty.star")
    with pytest.raises(InputError) as e:
        validate.check_particles(read_particles(star))
    one_line(e, "empty.star", "no particles")
    for cmd in (["convert", star, "--out", d / "o.star"],
                ["reconstruct", "--particles", star, "--out", d / "r.mrc"],
                ["train", "--particles", star, "--gmm", d / "gmm.npz", "--out", d / "t"]):
        assert_refused(cmd, capsys, "empty.star", "no particles")


def test_too_few_particles(good, capsys):
    d, _ = good
    star = make_star(d, particle_table(names(1)), name="one.star")
    with pytest.raises(InputError) as e:
        validate.check_particles(read_particles(star), min_particles=2, purpose="training")
    one_line(e, "one.star", "1 particle(s) but training needs at least 2", "larger particle set")
    assert_refused(["reconstruct", "--particles", star, "--out", d / "r.mrc"], capsys, "at least 2")
    assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--out", d / "t"], capsys,
                   "at least 2")


def _star_with(d, name, **kw):
    return make_star(d, particle_table(kw.pop("image_names", names()), **kw), name=name)


STAR_CASES = {
    # name: (particle-table change, fragment of the message)
    "unknown_optics_group": (dict(groups=[1, 1, 1, 7, 1, 1]), "rlnOpticsGroup [7]"),
    "duplicate_particles": (dict(image_names=names(5) + ["000002@parts.mrcs"]), "duplicate particle image"),
    "missing_stack": (dict(image_names=names(5) + ["000001@gone.mrcs"]), "gone.mrcs not found"),
    "index_past_end": (dict(image_names=names(5) + ["000009@parts.mrcs"]), "past the end of the stack (6 images)"),
}


@pytest.mark.parametrize("case", sorted(STAR_CASES))
def test_star_content_errors(good, capsys, case):
    d, _ = good
    change, fragment = STAR_CASES[case]
    star = _star_with(d, f"{case}.star", **change)
    with pytest.raises(InputError) as e:
        validate.check_particles(read_particles(star))
    one_line(e, f"{case}.star", fragment)
    assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--out", d / "t"], capsys, fragment)
    if case != "duplicate_particles":  # convert and reconstruct accept repeats (symmetry-expanded stars)
        assert_refused(["convert", star, "--out", d / "o.star"], capsys, fragment)
        assert_refused(["reconstruct", "--particles", star, "--out", d / "r.mrc"], capsys, fragment)


@pytest.mark.parametrize("column", ["rlnImageName", "rlnImagePixelSize"])
def test_star_missing_columns(good, capsys, column):
    d, _ = good
    particles, optics = particle_table(names()), optics_table()
    if column in particles:
        particles = particles.drop(columns=[column])
    else:
        optics = optics.drop(columns=[column])
    star = make_star(d, particles, optics, name=f"no_{column}.star")
    with pytest.raises(InputError) as e:
        read_particles(star)
    one_line(e, f"no_{column}.star", column)
    assert_refused(["convert", star, "--out", d / "o.star"], capsys, column)
    assert_refused(["reconstruct", "--particles", star, "--out", d / "r.mrc"], capsys, column)


def test_star_syntax_errors(good, capsys):
    d, _ = good
    text = open(make_star(d)).read()
    bad = d / "truncated.star"
    bad.write_text(text[: text.rindex("\n", 0, len(text) - 3) - 12])  # last row cut in the middle
    with pytest.raises(InputError) as e:
        read_star(str(bad))
    one_line(e, "truncated.star", "truncated or corrupt")
    assert_refused(["convert", bad, "--out", d / "o.star"], capsys, "truncated or corrupt")
    binary = d / "binary.star"
    binary.write_bytes(b"\x00\x01MRC" * 50)
    assert_refused(["convert", binary, "--out", d / "o.star"], capsys, "binary data")


# ============================================================================ images
def test_nan_pixels_in_stack(tmp_path, capsys):
    make_stack(tmp_path, nan_rows=(4,))
    star = make_star(tmp_path)
    meta = read_particles(star)
    images = ParticleImages(meta)
    with pytest.raises(InputError) as e:
        validate.check_images_finite(images, sample=None, name=meta.source)
    one_line(e, "parts.star", "NaN or Inf", "particle row 5", "000005@" + str(tmp_path / "parts.mrcs"))
    batch = images.get([3, 4])  # the per-batch form, numpy and torch
    with pytest.raises(InputError) as e:
        validate.check_images_finite(batch, name="batch", rows=[3, 4])
    one_line(e, "particle row 5")
    with pytest.raises(InputError):
        validate.check_images_finite(torch.as_tensor(batch).masked_fill(torch.ones(1, dtype=torch.bool), np.inf))
    validate.check_images_finite(images.get([0, 1, 2]))  # finite: no error


def test_nan_sample_is_bounded_and_hits_first_and_last(tmp_path):
    make_stack(tmp_path, n=300, nan_rows=(299,))
    meta = read_particles(make_star(tmp_path, particle_table(names(300))))
    calls = []

    class Counting(ParticleImages):
        def get(self, rows):
            calls.append(len(rows))
            return super().get(rows)

    with pytest.raises(InputError, match="particle row 300"):
        validate.check_images_finite(Counting(meta), sample=16)
    assert sum(calls) <= 18  # first + last + 16 random, never the whole stack


def test_nan_pixels_refused_by_reconstruct_cli(tmp_path, capsys):
    make_stack(tmp_path, nan_rows=(2,))
    star = make_star(tmp_path)
    assert_refused(["reconstruct", "--particles", star, "--out", tmp_path / "r.mrc", "--no-mask"], capsys,
                   "NaN or Inf")


def test_nan_pixels_refused_by_train_cli(good, capsys):
    d, _ = good
    make_stack(d, nan_rows=(2,))
    star = make_star(d, name="nan.star")
    assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--epochs", 1, "--hidden", 16,
                    "--layers", 1, "--device", "cpu", "--out", d / "t"], capsys, "NaN or Inf")


# ============================================================================ maps and masks
def test_non_cubic_map(good, capsys):
    d, _ = good
    vol = np.random.default_rng(0).normal(size=(16, 16, 20)).astype(np.float32)
    with pytest.raises(InputError) as e:
        validate.check_map(vol, APIX, "rect.mrc")
    one_line(e, "rect.mrc", "non-cubic map 20 x 16 x 16", "pad or crop")
    write_map(str(d / "rect.mrc"), vol, APIX)
    with pytest.raises(InputError, match="non-cubic"):
        read_map(str(d / "rect.mrc"))
    assert_refused(["build", "--map", d / "rect.mrc", "--resolution", 8, "--out", d / "b"], capsys, "non-cubic")


@pytest.mark.parametrize("value,fragment", [(0.0, "all zeros"), (3.5, "same value")])
def test_empty_or_all_zero_map(good, capsys, value, fragment):
    d, _ = good
    vol = np.full((BOX,) * 3, value, np.float32)
    with pytest.raises(InputError) as e:
        validate.check_map(vol, APIX, "empty.mrc")
    one_line(e, "empty.mrc", fragment, "give the consensus map")
    write_map(str(d / "empty.mrc"), vol, APIX)
    # the command runs validate.check_map right after read_map: the message names the file
    assert_refused(["build", "--map", d / "empty.mrc", "--resolution", 8, "--out", d / "b"], capsys,
                   f"gmmhet build: error: {d / 'empty.mrc'}: ", fragment, "give the consensus map")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_in_map(good, capsys, bad):
    d, _ = good
    vol = blob_map()
    vol[1, 2, 3] = bad
    with pytest.raises(InputError) as e:
        validate.check_map(vol, APIX, "nan.mrc")
    one_line(e, "nan.mrc", "1 NaN or Inf voxel(s)", "regenerate")
    write_map(str(d / "nan.mrc"), vol, APIX)
    with pytest.raises(InputError, match="NaN or Inf"):
        read_map(str(d / "nan.mrc"))
    assert_refused(["build", "--map", d / "nan.mrc", "--resolution", 8, "--out", d / "b"], capsys, "NaN or Inf")


def test_map_other_shapes_and_pixel_size():
    with pytest.raises(InputError, match="2D array"):
        validate.check_map(np.ones((16, 16)), APIX, "img")
    with pytest.raises(InputError, match="too small"):
        validate.check_map(blob_map(4), APIX, "tiny")
    for apix in (0.0, -1.0, float("nan"), None):
        with pytest.raises(InputError, match="pixel size"):
            validate.check_map(blob_map(), apix, "m")
    validate.check_map(blob_map(), APIX, "ok")  # a good map passes


@pytest.mark.parametrize("kind", ["box", "apix"])
def test_mask_of_another_box_or_sampling(good, capsys, kind):
    d, star = good
    mask_box, mask_apix = (24, APIX) if kind == "box" else (BOX, 1.5)
    with pytest.raises(InputError) as e:
        validate.check_mask_matches((mask_box,) * 3, mask_apix, (BOX,) * 3, APIX, "mask.mrc")
    one_line(e, "mask.mrc", "box 24 x 24 x 24 differs" if kind == "box" else "pixel size 1.5 A differs",
             "resample the mask")
    write_map(str(d / "mask.mrc"), (blob_map(mask_box) > 0.1).astype(np.float32), mask_apix)
    assert_refused(["build", "--map", d / "map.mrc", "--resolution", 8, "--mask", d / "mask.mrc", "--out", d / "b"],
                   capsys, "mask.mrc", "resample the mask")
    # issue 18: train (focus mask), refine (focus mask) and analyze (domain mask) refuse it too, same text
    gmm_msg = validate.mask_grid_message("x", (mask_box,) * 3, mask_apix, (BOX,) * 3, APIX, "the Gaussian model")
    err = assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--mask", d / "mask.mrc",
                          "--epochs", 1, "--out", d / "t"], capsys, f"--mask {d / 'mask.mrc'}: ")
    assert err.strip().endswith(gmm_msg.split(": ", 1)[1]), (err, gmm_msg)
    from scipion_gmmhet.engine.training.features import focus_mask_gaussians
    with pytest.raises(InputError) as e:
        focus_mask_gaussians(GMM.load(str(d / "gmm.npz")), str(d / "mask.mrc"))
    assert str(e.value).split(": ", 1)[1] == gmm_msg.split(": ", 1)[1]
    validate.check_mask_matches((BOX,) * 3, APIX * (1 + 1e-5), (BOX,) * 3, APIX)  # header rounding is fine
    validate.check_mask_matches((BOX,) * 3, None, (BOX,) * 3, APIX)  # no pixel size in the mask: box only


# ============================================================================ particles vs map
def test_particles_and_map_of_different_sampling(good, capsys, caplog):
    d, star = good
    meta = read_particles(star)
    assert validate.check_particles_vs_map(meta, BOX, APIX) is None  # same sampling
    assert validate.check_particles_vs_map(meta, BOX, APIX * (1 + 1e-4)) is None  # header rounding
    with pytest.raises(InputError) as e:  # default: refuse, naming both samplings and the fix
        validate.check_particles_vs_map(meta, 24, 1.5, map_name="map.mrc")
    one_line(e, "parts.star", "particles are 16 px at 2 A/px but map.mrc is 24 px at 1.5 A/px",
             "--rescale_angpix 2 --new_box 16", "rebuild the GMM")
    # allowed resampling: accepted with a logged note when the particle box (32 A) holds the model
    caplog.set_level(logging.INFO)
    note = validate.check_particles_vs_map(meta, 20, 1.5, allow_resample=True)
    assert "projected at the particles' sampling" in note and note in caplog.text
    gmm = GMM.load(str(d / "gmm.npz"))
    extent = validate.gmm_extent_A(gmm.centers_A, gmm.sigmas_A)
    assert extent == pytest.approx(2 * (np.hypot(4, 2) + 9))
    assert validate.check_particles_vs_map(meta, 64, 1.0, allow_resample=True, model_extent_A=extent)
    with pytest.raises(InputError) as e:  # ... and refused when the model does not fit in the particle box
        validate.check_particles_vs_map(meta, 64, 1.0, allow_resample=True)
    one_line(e, "does not fit in the particle box", "at least 32 px")
    # the command: a GMM built on another grid than the particles is refused
    GMM(gmm.centers_A, gmm.amplitudes, gmm.sigmas_A, 24, 1.5).save(str(d / "gmm24.npz"))
    assert_refused(["train", "--particles", star, "--gmm", d / "gmm24.npz", "--out", d / "t"], capsys,
                   "box 24 at 1.5 A/px", "box 16 at 2 A/px", "--rescale_angpix 2 --new_box 16", "rebuild the GMM")


# ============================================================================ files
def test_truncated_or_corrupt_mrc(good, capsys):
    d, star = good
    stack = str(d / "parts.mrcs")
    full = open(stack, "rb").read()
    for name, data, fragment in [("short.mrcs", full[:-100], "truncated or not an MRC file"),
                                 ("header_only.mrcs", full[:1024], "truncated or not an MRC file"),
                                 ("tiny.mrcs", full[:200], "truncated or not an MRC file (200 bytes)"),
                                 ("garbage.mrcs", b"\xff" * 4096, "truncated or not an MRC file")]:
        (d / name).write_bytes(data)
        with pytest.raises(InputError) as e:
            open_stack(str(d / name))
        one_line(e, name, fragment, "re-export or re-copy")
        with pytest.raises(InputError):
            read_map(str(d / name))
    # a star pointing at a truncated stack, through the commands
    with open(stack, "r+b") as f:
        f.truncate(len(full) - 100)
    assert_refused(["convert", star, "--out", d / "o.star"], capsys, "truncated or not an MRC file")
    assert_refused(["reconstruct", "--particles", star, "--out", d / "r.mrc"], capsys, "truncated")
    # a truncated map through build
    (d / "map_cut.mrc").write_bytes(open(d / "map.mrc", "rb").read()[:3000])
    assert_refused(["build", "--map", d / "map_cut.mrc", "--resolution", 8, "--out", d / "b"], capsys, "truncated")


def _cs(path, align3d: bool, n=4):
    fields = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
              ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4")]
    fields += ([("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))] if align3d else
               [("alignments2D/pose", "<f4"), ("alignments2D/shift", "<f4", (2,))])
    a = np.zeros(n, dtype=fields)
    a["blob/path"], a["blob/idx"], a["blob/shape"], a["blob/psize_A"] = b"parts.mrcs", np.arange(n), BOX, APIX
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"], a["ctf/df1_A"], a["ctf/df2_A"] = 300, 2.7, .1, 1e4, 1e4
    with open(path, "wb") as f:
        np.save(f, a)
    return str(path)


def test_cryosparc_with_only_2d_alignments(good, capsys):
    d, _ = good
    cs = _cs(d / "J2_2d.cs", align3d=False)
    with pytest.raises(InputError) as e:
        read_particles(cs)
    one_line(e, "J2_2d.cs", "only 2D alignments", "run a 3D refinement")
    assert_refused(["convert", cs, "--out", d / "o.star"], capsys, "only 2D alignments")
    assert_refused(["reconstruct", "--particles", cs, "--out", d / "r.mrc"], capsys, "only 2D alignments")
    # the same file with 3D alignments is accepted (so the refusal is about the 2D-only case)
    validate.check_particles(read_particles(_cs(d / "J3_3d.cs", align3d=True)))


# ============================================================================ settings
@pytest.mark.parametrize("k", [0, -1, 1.5, "x", True, float("nan"), None])
def test_latent_dimension_below_one(good, capsys, k):
    with pytest.raises(InputError) as e:
        validate.check_zdim(k)
    one_line(e, "--zdim", "whole number >= 1")
    if isinstance(k, int) and not isinstance(k, bool):
        d, star = good
        assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--zdim", k, "--out", d / "t"], capsys,
                       f"--zdim {k}", "at least 1")


@pytest.mark.parametrize("value", ["0", "1", "gpu", "cuda", "cuda:0", "GPU"])
def test_device_gpu_numbers_without_a_gpu(good, capsys, value, monkeypatch):
    """A bare GPU number (RELION's ``--gpu 0``) and ``gpu`` mean CUDA; without one: one line that
    echoes the value (the CPU-only CI machine; the same path on a GPU machine maps ``0`` to cuda:0)."""
    from scipion_gmmhet.engine.device import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError) as e:
        resolve_device(value)
    one_line(e, f"--device {value}", "no CUDA device", "--device cpu")
    d, star = good
    assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--device", value, "--out", d / "t"],
                   capsys, f"--device {value}", "--device cpu")


@pytest.mark.parametrize("value", ["cuda,0", "cuda:x", "tpu", "0,1", "-1"])
def test_device_not_a_device(value):
    from scipion_gmmhet.engine.device import resolve_device
    with pytest.raises(InputError) as e:
        resolve_device(value)
    one_line(e, f"--device {value}", "cpu, auto, cuda, cuda:N or a GPU number")


def test_device_numbers_map_to_cuda(monkeypatch):
    from scipion_gmmhet.engine.device import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("1") == torch.device("cuda:1") and resolve_device("gpu") == torch.device("cuda")
    assert resolve_device(" CPU ") == torch.device("cpu") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError) as e:
        resolve_device("2")
    one_line(e, "--device 2", "2 CUDA device(s)", "0 to 1")


def test_latent_dimension_valid():
    assert validate.check_zdim(4) == 4 and validate.check_zdim("2") == 2 and validate.check_zdim(np.int64(1)) == 1


def test_focus_mask_selects_no_gaussian(good, capsys):
    d, star = good
    with pytest.raises(InputError) as e:
        validate.check_focus_selects(0, "corner.mrc", n_total=3)
    one_line(e, "corner.mrc", "selects none of the 3 Gaussians", "covers the region")
    validate.check_focus_selects(1, "ok.mrc")
    mask = np.zeros((BOX,) * 3, np.float32)
    mask[:3, :3, :3] = 1.0  # a corner far from every Gaussian centre
    write_map(str(d / "corner.mrc"), mask, APIX)
    assert_refused(["train", "--particles", star, "--gmm", d / "gmm.npz", "--mask", d / "corner.mrc", "--epochs", 1,
                    "--out", d / "t"], capsys, "corner.mrc", "selects none of the 3 Gaussians")


# ============================================================================ output folders (issue 18)
def test_convert_creates_its_output_folder(good, capsys):
    """gmmhet convert IN.star --out NEWDIR/sub/out.star creates the folders (was a traceback)."""
    d, star = good
    out = d / "new" / "sub" / "out.star"
    rc, err = run_cli(["convert", star, "--out", out], capsys)
    assert rc == 0, err
    assert out.is_file() and len(read_particles(str(out))) == N
    assert not list((d / "new" / "sub").glob("*.tmp"))


def test_commands_say_when_the_output_folder_cannot_be_made(good, capsys):
    """An output under a regular file: every command refuses in one line, before any work."""
    d, star = good
    blocker = d / "a_file"
    blocker.write_text("not a folder")
    for argv in (["convert", star, "--out", blocker / "out.star"],
                 ["reconstruct", "--particles", star, "--out", blocker / "r.mrc", "--no-mask"],
                 ["build", "--map", d / "map.mrc", "--resolution", 8, "--out", blocker],
                 ["build", "--map", d / "map.mrc", "--resolution", 8, "--out", blocker / "b"],
                 ["simulate", "--out", blocker / "sim", "--kind", "homogeneous", "--n", 4, "--box", 16]):
        assert_refused(argv, capsys, str(blocker), "cannot create the output folder")
    with pytest.raises(InputError) as e:
        from scipion_gmmhet.engine.io.atomic import make_output_dir
        make_output_dir(blocker)
    one_line(e, "a file of that name exists")


def _star_with_subsets(d, subsets, name):
    parts = particle_table(names())
    parts["rlnRandomSubset"] = subsets
    return make_star(d, parts, name=name)


@pytest.mark.parametrize("subsets, says", [([1] * N, "every particle in subset 1 (no subset 2"),
                                           ([2] * N, "every particle in subset 2 (no subset 1"),
                                           ([1, 2, 3, 1, 2, 3], "other than 1 and 2 (3 in 2 rows)"),
                                           ([1, 2, 1, 2, 1, 2], None)])
def test_random_subset_warning_says_what_is_wrong(good, caplog, subsets, says):
    """analyze --even-odd on one half (only 1s) used to warn 'values other than 1 and 2'."""
    from scipion_gmmhet.engine.analysis.reconstruct import half_assignment
    d, _ = good
    meta = read_particles(_star_with_subsets(d, subsets, "halves.star"))
    caplog.set_level(logging.WARNING)
    h = half_assignment(meta, seed=0)
    assert sorted(set(h.tolist())) == [1, 2]
    if says is None:
        assert h.tolist() == subsets and "rlnRandomSubset" not in caplog.text
    else:
        assert says in caplog.text and "seeded random split" in caplog.text, caplog.text
        assert "other than 1 and 2" not in caplog.text or 3 in subsets
