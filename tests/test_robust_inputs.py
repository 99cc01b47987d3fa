"""Real-world input variants found by the CLI audit: each must give one clear InputError or the
same result as the canonical input (never a traceback, never a silent wrong result).

1. NaN/Inf in any CTF column (particle table: phase shift, B-factor, scale factor; optics:
   voltage, Cs, amplitude contrast) is refused by ``validate`` naming column, row and count.
2. Unnormalised images (a large mean per image) reconstruct to the same map as normalised ones
   (background mean removed before back-projection); normalised images are unchanged.
3. Mixed ``rlnCtfDataAreCtfPremultiplied`` optics groups: each particle's model image gets its
   own group's CTF form (CTF or CTF^2), as with single-mode stars.
4. Stacks stored with another axis order (``mapc = 2, mapr = 1``) are read as ``[y, x]``, lazily.
5. Xmipp-style type suffixes on image names (``000001@particles.mrcs:mrcs``) are stripped.
"""
from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest
import torch

from scipion_gmmhet.engine.analysis import reconstruct as rc
from scipion_gmmhet.engine.conventions import ctf_2d, fourier_grid, fourier_to_image, image_to_fourier
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.data import ParticleImages, Particles
from scipion_gmmhet.engine.io.loader import read_rows
from scipion_gmmhet.engine.io.metadata import read_particles, write_particles
from scipion_gmmhet.engine.io.mrc import open_stack, write_stack
from scipion_gmmhet.engine.model.fourier import fsc_table
from scipion_gmmhet.engine.model.gmm import GMM, project

BOX, APIX = 16, 4.0


def _star(path, names, extra_particle=None, optics_extra=None, groups=None, optics_rows=None):
    """A RELION 3.1 star with aligned, CTF-carrying particles ``names``; ``extra_particle``:
    {column: values}; ``optics_rows``: list of dicts (default one 300 kV group)."""
    n = len(names)
    rng = np.random.default_rng(1)
    cols = {"rlnImageName": names, "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
            "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": np.zeros(n), "rlnOriginYAngst": np.zeros(n),
            "rlnDefocusU": rng.uniform(9000, 20000, n), "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnOpticsGroup": groups if groups is not None else [1] * n}
    cols["rlnDefocusV"] = cols["rlnDefocusU"] - 300.0
    cols.update(extra_particle or {})
    optics_rows = optics_rows or [dict(rlnOpticsGroup=1, rlnOpticsGroupName="og1", rlnVoltage=300.0,
                                       rlnSphericalAberration=2.7, rlnAmplitudeContrast=0.1)]
    okeys = list(optics_rows[0]) + ["rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
    lines = ["# version 30001", "data_optics", "loop_"] + [f"_{k}" for k in okeys]
    for o in optics_rows:
        lines.append(" ".join(str(v) for v in list(o.values()) + [APIX, BOX, 2]))
    lines += ["", "# version 30001", "data_particles", "loop_"] + [f"_{k}" for k in cols]
    for i in range(n):
        lines.append(" ".join(str(cols[k][i]) for k in cols))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _stack(path, n, seed=0):
    imgs = np.random.default_rng(seed).normal(size=(n, BOX, BOX)).astype(np.float32)
    write_stack(str(path), imgs, APIX)
    return imgs


# ------------------------------------------------------------------ 1. non-finite CTF values
@pytest.mark.parametrize("column,default", [("rlnPhaseShift", 0.0), ("rlnCtfBfactor", 0.0),
                                            ("rlnCtfScalefactor", 1.0), ("rlnDefocusAngle", None)])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nonfinite_particle_ctf_column_is_refused_naming_column_row_and_count(tmp_path, column, default, bad):
    _stack(tmp_path / "s.mrcs", 5)
    names = [f"{i:06d}@s.mrcs" for i in range(1, 6)]
    values = [default if default is not None else 10.0] * 5
    values[2], values[4] = bad, bad
    path = _star(tmp_path / "p.star", names, {column: values})
    with pytest.raises(InputError) as exc:
        read_particles(path).validate()
    msg = str(exc.value)
    assert "\n" not in msg and path in msg and column in msg
    assert "2 particle(s)" in msg and "row 3 " in msg and "000003@s.mrcs" in msg and "remove or fix" in msg
    # without CTF (e.g. --ctf none) those columns are not used, so not checked
    read_particles(path).validate(require_ctf=False)


@pytest.mark.parametrize("column,bad", [("rlnVoltage", "nan"), ("rlnVoltage", "0"),
                                        ("rlnSphericalAberration", "inf"), ("rlnAmplitudeContrast", "nan")])
def test_nonfinite_optics_ctf_value_is_refused_naming_the_group(tmp_path, column, bad):
    _stack(tmp_path / "s.mrcs", 4)
    good = dict(rlnOpticsGroup=1, rlnOpticsGroupName="krios", rlnVoltage=300.0, rlnSphericalAberration=2.7,
                rlnAmplitudeContrast=0.1)
    broken = dict(good, rlnOpticsGroup=2, rlnOpticsGroupName="glacios")
    broken[column] = bad
    path = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in range(1, 5)], groups=[1, 2, 2, 1],
                 optics_rows=[good, broken])
    with pytest.raises(InputError) as exc:
        read_particles(path).validate()
    msg = str(exc.value)
    assert "\n" not in msg and path in msg and column in msg and "glacios" in msg and "row 2 of the optics" in msg
    assert "2 particle(s)" in msg and "data_optics" in msg
    # an unused optics group with a bad value is harmless
    ok = _star(tmp_path / "ok.star", [f"{i}@s.mrcs" for i in range(1, 5)], groups=[1, 1, 1, 1],
               optics_rows=[good, broken])
    read_particles(ok).validate()


def test_reconstruct_cli_refuses_nan_phase_shift(tmp_path):
    from scipion_gmmhet.engine.cli import main
    _stack(tmp_path / "s.mrcs", 6)
    ps = [0.0, "nan", 0.0, 0.0, "nan", 0.0]
    path = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in range(1, 7)], {"rlnPhaseShift": ps})
    assert main(["reconstruct", "--particles", path, "--out", str(tmp_path / "r.mrc"), "--no-mask"]) == 2
    assert not os.path.exists(tmp_path / "r.mrc")


# ------------------------------------------------------------------ 2. unnormalised images
def _projections(n=160, seed=0):
    rng = np.random.default_rng(seed)
    from scipy.spatial.transform import Rotation
    g = GMM(rng.normal(size=(20, 3)) * np.array([8.0, 5.0, 4.0]), rng.uniform(0.5, 1.5, 20), np.full(20, 4.0),
            BOX, APIX)
    R = torch.tensor(Rotation.random(n, random_state=seed).as_matrix(), dtype=torch.float32)
    du = rng.uniform(8000, 20000, n)
    params = dict(defocus_u_A=du, defocus_v_A=du - 200.0, defocus_angle_deg=rng.uniform(0, 180, n),
                  voltage_kv=np.full(n, 300.0), cs_mm=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1))
    ky, kx = fourier_grid(BOX, APIX)
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()}
    ctf = ctf_2d(ky, kx, t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"], t["voltage_kv"],
                 t["cs_mm"], t["amplitude_contrast"])
    c, a, s = g.tensors()
    imgs = fourier_to_image(project(c, a, s, R, BOX, APIX, None, ctf), BOX)
    imgs = imgs + 0.05 * imgs.std() * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(seed))
    return g.render(), imgs, R, params


def _reconstruct(imgs, R, params):
    bp = rc.Backprojector(BOX, APIX)
    F, ctf = rc.prepare_batch(imgs, None, params, APIX)
    bp.insert(F, R, ctf, "full")
    return bp.reconstruct()


def test_offset_images_give_the_normalised_map():
    truth, imgs, R, params = _projections()
    ref = _reconstruct(imgs, R, params)
    scale = float(imgs.std())
    for offset in (20.0 * scale, torch.linspace(-30, 30, len(imgs))[:, None, None] * scale):
        vol = _reconstruct(imgs + offset, R, params)
        assert np.abs(vol - ref).max() < 1e-3 * np.abs(ref).max()  # float32 rounding of the offset only
    # the same offsets without the background subtraction: the bowl the audit measured
    bowl = rc.Backprojector(BOX, APIX)
    F, ctf = rc.prepare_batch(imgs, None, params, APIX)
    F = F + image_to_fourier(torch.full_like(imgs, 20.0 * scale))
    bowl.insert(F, R, ctf, "full")
    assert np.abs(bowl.reconstruct() - ref).max() > 0.5 * np.abs(ref).max()


def test_background_subtraction_leaves_normalised_images_unchanged(monkeypatch):
    truth, imgs, R, params = _projections(seed=1)
    out = rc.subtract_background(imgs + 7.0)
    r = np.hypot(*np.meshgrid(np.arange(BOX) - BOX // 2, np.arange(BOX) - BOX // 2, indexing="ij"))
    assert torch.allclose(out[:, torch.as_tensor(r > BOX / 2)].mean(1), torch.zeros(len(imgs)), atol=1e-4)
    new = _reconstruct(imgs, R, params)
    monkeypatch.setattr(rc, "subtract_background", lambda x: x)  # the reconstruction before the fix
    old = _reconstruct(imgs, R, params)
    f_new, f_old = fsc_table(new, truth, APIX)["fsc"], fsc_table(old, truth, APIX)["fsc"]
    assert np.abs(f_new[1:] - f_old[1:]).max() < 0.01, (f_new, f_old)
    assert np.corrcoef(new.ravel(), old.ravel())[0, 1] > 0.999


# ------------------------------------------------------------------ 3. mixed premultiplied groups
def test_mixed_premultiplied_groups_model_each_particle_with_its_own_ctf_form(tmp_path):
    n = 8
    raw = _stack(tmp_path / "raw.mrcs", n)
    write_stack(str(tmp_path / "pre.mrcs"), raw, APIX)  # pixels do not matter here, only the CTF form
    og = dict(rlnOpticsGroup=1, rlnOpticsGroupName="raw", rlnVoltage=300.0, rlnSphericalAberration=2.7,
              rlnAmplitudeContrast=0.1, rlnCtfDataAreCtfPremultiplied=0)
    op = dict(og, rlnOpticsGroup=2, rlnOpticsGroupName="premult", rlnCtfDataAreCtfPremultiplied=1)
    pre_rows = np.arange(n) % 2 == 1
    names = [f"{i + 1}@{'pre' if p else 'raw'}.mrcs" for i, p in enumerate(pre_rows)]
    mixed = _star(tmp_path / "mixed.star", names, groups=[2 if p else 1 for p in pre_rows], optics_rows=[og, op])
    all_raw = _star(tmp_path / "raw.star", names, optics_rows=[og])
    all_pre = _star(tmp_path / "pre.star", names, optics_rows=[dict(op, rlnOpticsGroup=1)])
    pm, pr, pp = (Particles.from_star(s) for s in (mixed, all_raw, all_pre))
    assert (pm.ctf_mode, pr.ctf_mode, pp.ctf_mode) == ("full", "full", "premultiplied")
    assert pm.premultiplied.dtype == torch.bool and pm.premultiplied.device == pm.device
    assert pr.premultiplied is None and pp.premultiplied is None
    rng = np.random.default_rng(0)
    g = GMM(rng.normal(size=(10, 3)) * 6.0, np.ones(10), np.full(10, 4.0), BOX, APIX)
    c, a, s = g.tensors()
    items = np.array([5, 0, 3, 2, 7, 6])  # any order: the flags follow the rows
    models = {}
    for name, p in (("mixed", pm), ("raw", pr), ("pre", pp)):
        b = p.batch(items)
        models[name] = project(c, a, s, b.rotations, BOX, APIX, b.origins_A, b.ctf)
    want = torch.where(torch.as_tensor(pre_rows[items])[:, None, None], models["pre"], models["raw"])
    torch.testing.assert_close(models["mixed"], want, rtol=0, atol=0)
    assert not torch.allclose(models["raw"], models["pre"])
    # an explicit mode is kept: 'premultiplied' for all
    assert Particles.from_star(mixed, ctf_mode="premultiplied").premultiplied is None


# ------------------------------------------------------------------ 4. stack axis order
def test_transposed_stack_is_read_in_image_order_lazily(tmp_path):
    imgs = np.random.default_rng(2).normal(size=(6, BOX, BOX)).astype(np.float32)
    path = str(tmp_path / "t.mrcs")
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(imgs.transpose(0, 2, 1)))
        m.set_image_stack()
        m.voxel_size = APIX
        m.header.mapc, m.header.mapr = 2, 1
    stack = open_stack(path)
    assert isinstance(stack, np.memmap) and stack.shape == imgs.shape  # still a map of the file
    np.testing.assert_array_equal(np.asarray(stack), imgs)
    write_stack(str(tmp_path / "n.mrcs"), imgs, APIX)
    path_star = _star(tmp_path / "t.star", [f"{i}@t.mrcs" for i in range(1, 7)])
    meta = read_particles(path_star)
    meta.validate()
    images = ParticleImages(meta)
    rows = np.array([4, 0, 1, 2, 5])
    np.testing.assert_array_equal(images.get(rows), imgs[rows])
    np.testing.assert_array_equal(read_rows(images, rows), imgs[rows])


# ------------------------------------------------------------------ 5. ':mrcs' type suffix
def test_xmipp_type_suffix_is_stripped_from_image_names(tmp_path):
    os.makedirs(tmp_path / "stk")
    os.makedirs(tmp_path / "star")
    imgs = _stack(tmp_path / "stk" / "s.mrcs", 3)
    names = ["000001@stk/s.mrcs:mrcs", "2@stk/s.mrcs:mrc", "000003@stk/s.mrcs:MRCS"]
    path = _star(tmp_path / "star" / "p.star", names)  # names relative to the parent: root search too
    meta = read_particles(path)
    meta.validate()
    paths, idx = meta.image_locations()
    assert set(paths) == {str(tmp_path / "stk" / "s.mrcs")} and idx.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(ParticleImages(meta).get([2, 0]), imgs[[2, 0]])
    out = str(tmp_path / "star" / "clean.star")
    write_particles(out, meta)
    assert not any(":" in n for n in read_particles(out).particles["rlnImageName"])
    # a name that is not 'index@stack' after the suffix is still refused clearly
    bad = _star(tmp_path / "star" / "bad.star", ["x@stk/s.mrcs:mrcs"])
    with pytest.raises(InputError, match="is not 'index@stack'"):
        read_particles(bad).image_locations()
