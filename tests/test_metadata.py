"""Canonical particle metadata: real RELION/cryoSPARC files, golden values, conventions, errors."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from scipion_gmmhet.engine import conventions
from scipion_gmmhet.engine.errors import InputError
from scipion_gmmhet.engine.io.metadata import ParticleMetadata, read_particles, write_particles
from scipion_gmmhet.engine.io.mrc import write_stack


# ------------------------------------------------------------------ helpers
def make_stack(path, n, box=8, seed=0):
    imgs = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    write_stack(str(path), imgs, 1.25)
    return imgs


RELION30 = """
# RELION 3.0 style: no optics table, origins in pixels
data_

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginX #5
_rlnOriginY #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnVoltage #10
_rlnSphericalAberration #11
_rlnAmplitudeContrast #12
_rlnMagnification #13
_rlnDetectorPixelSize #14
_rlnClassNumber #15
000001@stack.mrcs  10.0 20.0 30.0  1.5 -2.0 10000.0 9000.0 45.0 300.0 2.7 0.1 40000.0 5.0 1
000002@stack.mrcs -10.0 90.0 -30.0 0.0  4.0 15000.0 14000.0 5.0 200.0 2.7 0.1 40000.0 5.0 2
000003@stack.mrcs  0.0 45.0 170.0 -3.0  0.5 20000.0 19000.0 -5.0 300.0 2.7 0.1 40000.0 5.0 1
"""


def relion31_text(names, groups=None, extra_optics=""):
    groups = groups or [1] * len(names)
    rows = "\n".join(f"{n} {10.0 * i} {5.0 + i} {-20.0 * i} {0.5 * i} {-0.25 * i} {10000 + 100 * i} "
                     f"{9000 + 100 * i} 12.5 {g}" for i, (n, g) in enumerate(zip(names, groups)))
    return f"""# version 30001
data_optics
loop_
_rlnOpticsGroup
_rlnOpticsGroupName
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
_rlnImageSize
_rlnImageDimensionality
1 opticsGroup1 300.0 2.7 0.1 1.25 8 2
{extra_optics}
# version 30001
data_particles
loop_
_rlnImageName
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnOriginXAngst
_rlnOriginYAngst
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnOpticsGroup
{rows}
"""


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def make_cs(path, poses, shifts, psize=1.5, box=8, paths=None, idx=None, align3d=True,
            align_psize=None, exp_group=None):
    n = len(poses)
    fields = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
              ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
              ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/exp_group_id", "<u4")]
    if align3d:
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                   ("alignments3D/psize_A", "<f4"), ("alignments3D/split", "<u4")]
    else:
        fields += [("alignments2D/pose", "<f4"), ("alignments2D/shift", "<f4", (2,))]
    a = np.zeros(n, dtype=fields)
    a["uid"] = np.arange(n) + 1000
    a["blob/path"] = paths if paths is not None else [b">J7/extract/stack.mrcs"] * n
    a["blob/idx"] = idx if idx is not None else np.arange(n)
    a["blob/shape"] = box
    a["blob/psize_A"] = psize
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300.0, 2.7, 0.07
    a["ctf/df1_A"] = 12000.0 + 250.0 * np.arange(n)
    a["ctf/df2_A"] = 11000.0 + 250.0 * np.arange(n)
    a["ctf/df_angle_rad"] = 0.5
    a["ctf/phase_shift_rad"] = np.pi / 2
    a["ctf/exp_group_id"] = exp_group if exp_group is not None else 0
    if align3d:
        a["alignments3D/pose"] = poses
        a["alignments3D/shift"] = shifts
        a["alignments3D/psize_A"] = align_psize if align_psize is not None else 0.0
        a["alignments3D/split"] = np.arange(n) % 2
    with open(path, "wb") as f:  # np.save(path) would append .npy
        np.save(f, a)
    return str(path)


# ------------------------------------------------------------------ real files
def test_relion31_real(real_metadata_dir):
    meta = read_particles(real_metadata_dir / "relion31.star")
    assert len(meta) == 5 and meta.box == 256
    # the optics table says rlnImagePixelSize 2.806 (rlnMicrographOriginalPixelSize 1.403)
    assert meta.apix == 2.806
    np.testing.assert_array_equal(meta.euler_deg()[0], [-102.30296, 82.318041, 124.706463])
    # the file has rlnOriginXAngst/YAngst (the README says "no origins": it has them)
    np.testing.assert_array_equal(meta.origins_A()[0], [0.019324, -0.64686])
    np.testing.assert_array_equal(meta.origins_A()[4], [-0.33773, 0.385262])
    ctf = meta.ctf_params()
    assert ctf["defocus_u_A"][0] == 13108.082418 and ctf["defocus_v_A"][0] == 12845.582418
    assert ctf["defocus_angle_deg"][0] == -160.39 and ctf["voltage_kv"][0] == 300.0
    assert ctf["cs_mm"][0] == 0.01 and ctf["amplitude_contrast"][0] == 0.1
    assert ctf["scale"][0] == 1.0 and ctf["phase_shift_deg"][0] == 0.0
    assert not meta.ctf_premultiplied().any()
    assert meta.has_alignment_3d() and meta.has_ctf()
    paths, idx = meta.image_locations()
    assert paths[0] == str(real_metadata_dir / "relion31.mrcs") and idx.tolist() == [0, 1, 2, 3, 4]
    meta.validate()
    A = meta.rotation_matrices()
    np.testing.assert_allclose(A[0], conventions.euler_to_matrix(-102.30296, 82.318041, 124.706463))
    assert meta.particles["rlnOpticsGroup"].dtype == np.int64
    assert meta.particles["rlnClassNumber"].tolist() == [1] * 5  # other columns kept


def test_six_optics_groups(real_metadata_dir):
    meta = read_particles(real_metadata_dir / "relion31.6opticsgroups.star")
    assert len(meta) == 139 and len(meta.optics) == 6
    with pytest.raises(InputError) as exc:
        meta.apix
    msg = str(exc.value)
    for name in ("opticsGroup1", "opticsGroup3", "opticsGroup4"):
        assert name in msg
    assert "1.24" in msg and "1.25" in msg
    assert meta.box == 196
    ctf = meta.ctf_params()
    group = meta.particles["rlnOpticsGroup"].to_numpy()
    # optics group 4 (opticsGroup1) has Cs 2.6, the others 2.7
    np.testing.assert_array_equal(ctf["cs_mm"], np.where(group == 4, 2.6, 2.7))
    assert (ctf["voltage_kv"] == 200.0).all()
    assert ctf["defocus_u_A"][0] == 10352.805929
    np.testing.assert_array_equal(meta.origins_A()[0], [13.284554, -3.21701])
    meta.validate(check_images=False)
    sub = meta.subset(np.flatnonzero(group == 2))
    assert sub.apix == 1.24 and len(sub) == int((group == 2).sum())


def test_relion5_real(real_metadata_dir):
    meta = read_particles(real_metadata_dir / "relion5.star", images_root=real_metadata_dir / "toy_datadir")
    assert len(meta) == 17 and meta.apix == 0.89 and meta.box == 448
    np.testing.assert_array_equal(meta.origins_A()[:2], [[-3.12578, -1.41031], [1.259694, 2.626956]])
    np.testing.assert_array_equal(meta.euler_deg()[0], [111.508618, 36.742536, 141.158035])
    assert not meta.ctf_premultiplied().any()
    ctf = meta.ctf_params()
    assert ctf["voltage_kv"][0] == 100.0 and ctf["cs_mm"][0] == 1.6
    paths, idx = meta.image_locations()
    assert paths[1] == str(real_metadata_dir / "toy_datadir" / "toy_images_b.mrcs") and idx[1] == 1
    # the file repeats two images, and its toy stacks are 30 px while the optics say 448
    with pytest.raises(InputError, match="duplicate"):
        meta.validate()
    with pytest.raises(InputError, match="30 x 30 px images but the optics table says rlnImageSize 448"):
        meta.validate(allow_duplicates=True)
    meta.validate(allow_duplicates=True, check_images=False)
    # without images_root the stacks are not found
    with pytest.raises(InputError, match="not found"):
        read_particles(real_metadata_dir / "relion5.star").validate(allow_duplicates=True)


def test_cryosparc_real_2d_only(real_metadata_dir):
    with pytest.raises(InputError, match="only 2D alignments; run a 3D refinement"):
        read_particles(real_metadata_dir / "cryosparc_J2_particles_exported.cs")


# ------------------------------------------------------------------ cryoSPARC convention
def test_cryosparc_3d_golden(tmp_path):
    poses = np.array([[0, 0, np.pi / 6], [0, np.pi / 4, 0], [np.pi / 2, 0, 0], [0.3, -1.1, 2.0]])
    shifts = np.array([[2.0, -3.0], [0.5, 0.25], [0, 0], [-1.0, 1.0]])
    os.makedirs(tmp_path / "J7" / "extract")
    make_stack(tmp_path / "J7" / "extract" / "stack.mrcs", 4)
    cs = make_cs(tmp_path / "J9.cs", poses, shifts,
                 align_psize=np.array([0, 0, 0, 3.0]))
    meta = read_particles(cs)
    meta.validate()
    e = meta.euler_deg()
    # hand-computed: A = Rodrigues(pose).T; rotation by 30 deg about z is RELION rot=30
    np.testing.assert_allclose(e[0], [30, 0, 0], atol=1e-5)
    np.testing.assert_allclose(e[1], [0, 45, 0], atol=1e-5)  # about y: tilt
    np.testing.assert_allclose(e[2], [-90, 90, 90], atol=1e-5)  # about x: A = [[1,0,0],[0,0,1],[0,-1,0]]
    np.testing.assert_allclose(meta.rotation_matrices()[2], [[1, 0, 0], [0, 0, 1], [0, -1, 0]], atol=1e-6)
    R = Rotation.from_rotvec(poses.astype(np.float32).astype(np.float64)).as_matrix()
    np.testing.assert_allclose(meta.rotation_matrices(), np.transpose(R, (0, 2, 1)), atol=1e-9)
    # origin (A) = shift (px) * pixel size; alignments3D/psize_A wins when set
    np.testing.assert_allclose(meta.origins_A(), [[3.0, -4.5], [0.75, 0.375], [0, 0], [-3.0, 3.0]])
    ctf = meta.ctf_params()
    np.testing.assert_allclose(ctf["defocus_u_A"], [12000, 12250, 12500, 12750])
    np.testing.assert_allclose(ctf["defocus_v_A"], [11000, 11250, 11500, 11750])
    np.testing.assert_allclose(ctf["defocus_angle_deg"], np.degrees(0.5), rtol=1e-6)
    np.testing.assert_allclose(ctf["phase_shift_deg"], 90.0, rtol=1e-6)
    assert ctf["amplitude_contrast"][0] == 0.07 and ctf["cs_mm"][0] == 2.7  # float32 -> clean decimals
    assert meta.apix == 1.5 and meta.box == 8
    assert meta.particles["rlnImageName"].tolist()[:2] == ["000001@J7/extract/stack.mrcs",
                                                           "000002@J7/extract/stack.mrcs"]
    assert meta.particles["rlnRandomSubset"].tolist() == [1, 2, 1, 2]
    paths, idx = meta.image_locations()
    assert paths[0] == str(tmp_path / "J7" / "extract" / "stack.mrcs") and idx.tolist() == [0, 1, 2, 3]


def test_cryosparc_root_search_and_groups(tmp_path):
    """Blob paths are relative to the cryoSPARC project: found from an exports/ subfolder."""
    project = tmp_path / "P1"
    os.makedirs(project / "J3")
    os.makedirs(project / "exports" / "jobs" / "J9")
    make_stack(project / "J3" / "a.mrcs", 3)
    cs = make_cs(project / "exports" / "jobs" / "J9" / "p.cs", np.zeros((3, 3)), np.zeros((3, 2)),
                 paths=[b"J3/a.mrcs"] * 3, idx=[2, 0, 1], exp_group=np.array([0, 1, 0]))
    meta = read_particles(cs)
    assert meta.root == str(project)
    assert len(meta.optics) == 2 and meta.particles["rlnOpticsGroup"].tolist() == [1, 2, 1]
    assert meta.image_locations()[1].tolist() == [2, 0, 1]
    meta.validate()
    other = tmp_path / "elsewhere"
    os.makedirs(other / "J3")
    make_stack(other / "J3" / "a.mrcs", 3)
    assert read_particles(cs, images_root=str(other)).image_locations()[0][0] == str(other / "J3" / "a.mrcs")


def test_cryosparc_2d_synthetic_and_garbage(tmp_path):
    cs = make_cs(tmp_path / "p2d.cs", np.zeros((2, 3)), np.zeros((2, 2)), align3d=False)
    with pytest.raises(InputError, match="only 2D alignments"):
        read_particles(cs)
    (tmp_path / "junk.cs").write_bytes(b"not numpy at all")
    with pytest.raises(InputError, match="not a cryoSPARC"):
        read_particles(tmp_path / "junk.cs")
    with open(tmp_path / "plain.cs", "wb") as f:
        np.save(f, np.arange(5))
    with pytest.raises(InputError, match="not a cryoSPARC particle file"):
        read_particles(tmp_path / "plain.cs")


# ------------------------------------------------------------------ RELION 3.0
def test_relion30_origins_pixels_to_angstrom(tmp_path):
    make_stack(tmp_path / "stack.mrcs", 3)
    meta = read_particles(write_text(tmp_path / "r30.star", RELION30))
    assert meta.apix == 1.25  # 5 um detector pixel / 40000x
    np.testing.assert_allclose(meta.origins_A(), [[1.875, -2.5], [0.0, 5.0], [-3.75, 0.625]])
    assert "rlnOriginX" not in meta.particles.columns and "rlnVoltage" not in meta.particles.columns
    assert len(meta.optics) == 2 and meta.particles["rlnOpticsGroup"].tolist() == [1, 2, 1]
    ctf = meta.ctf_params()
    np.testing.assert_array_equal(ctf["voltage_kv"], [300, 200, 300])
    assert meta.box == 8  # from the stack header
    assert meta.particles["rlnClassNumber"].tolist() == [1, 2, 1]
    meta.validate()
    over = read_particles(tmp_path / "r30.star", apix=2.0)
    assert over.apix == 2.0
    np.testing.assert_allclose(over.origins_A()[0], [3.0, -4.0])


def test_relion30_without_pixel_size(tmp_path):
    text = "data_images\nloop_\n_rlnImageName\n_rlnOriginX\n_rlnOriginY\n1@s.mrcs 1 2\n"
    path = write_text(tmp_path / "np.star", text)
    with pytest.raises(InputError, match="--apix"):
        read_particles(path)
    meta = read_particles(path, apix=1.1)
    np.testing.assert_allclose(meta.origins_A(), [[1.1, 2.2]])
    assert not meta.has_ctf() and not meta.has_alignment_3d()
    with pytest.raises(InputError, match="no 3D alignment"):
        meta.validate(check_images=False)
    with pytest.raises(InputError, match="no CTF"):
        meta.validate(require_alignment=False, check_images=False)
    with pytest.raises(InputError, match="image size"):
        meta.box


# ------------------------------------------------------------------ round trip
def test_write_read_round_trip(tmp_path, real_metadata_dir):
    meta = read_particles(real_metadata_dir / "relion31.star")
    out = tmp_path / "canon.star"
    write_particles(out, meta)
    back = read_particles(out)
    np.testing.assert_array_equal(back.euler_deg(), meta.euler_deg())
    np.testing.assert_array_equal(back.origins_A(), meta.origins_A())
    for k, v in meta.ctf_params().items():
        np.testing.assert_array_equal(back.ctf_params()[k], v)
    np.testing.assert_array_equal(back.image_locations()[0], meta.image_locations()[0])
    assert back.apix == meta.apix and back.box == meta.box
    assert os.path.isabs(back.particles["rlnImageName"][0].split("@")[1])  # stack outside out dir
    back.validate()


def test_write_relative_inside_and_poses(tmp_path):
    make_stack(tmp_path / "s.mrcs", 4)
    names = [f"{i + 1:06d}@s.mrcs" for i in range(4)]
    meta = read_particles(write_text(tmp_path / "in.star", relion31_text(names)))
    rng = np.random.default_rng(3)
    e = rng.uniform(-180, 180, (4, 3))
    e[:, 1] = rng.uniform(0, 180, 4)
    o = rng.normal(size=(4, 2)) * 3
    moved = meta.with_poses(e, o)
    assert (meta.euler_deg() != moved.euler_deg()).all()  # original untouched
    os.makedirs(tmp_path / "out")
    write_particles(tmp_path / "canon.star", moved)
    back = read_particles(tmp_path / "canon.star")
    assert back.particles["rlnImageName"].tolist() == names  # inside the output dir: relative
    np.testing.assert_array_equal(back.euler_deg(), e)
    np.testing.assert_array_equal(back.origins_A(), o)
    sub = back.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub.euler_deg(), e[[3, 1]])
    assert sub.particles.index.tolist() == [0, 1]
    with pytest.raises(ValueError):
        meta.with_poses(e[:2], None)


# ------------------------------------------------------------------ bad input
def test_validate_bad_inputs(tmp_path):
    make_stack(tmp_path / "s.mrcs", 3)
    ok = [f"{i}@s.mrcs" for i in (1, 2, 3)]

    def load(text, name="b.star"):
        return read_particles(write_text(tmp_path / name, text))

    load(relion31_text(ok)).validate()
    cases = [
        (relion31_text(ok, groups=[1, 1, 5]), "rlnOpticsGroup [5]"),
        (relion31_text(["1@s.mrcs", "2@s.mrcs", "000001@s.mrcs"]), "duplicate"),
        (relion31_text(["1@s.mrcs", "2@gone.mrcs", "3@s.mrcs"]), "gone.mrcs not found"),
        (relion31_text(["1@s.mrcs", "2@s.mrcs", "4@s.mrcs"]), "past the end of the stack (3 images)"),
        (relion31_text(["1@s.mrcs", "2@s.mrcs", "0@s.mrcs"]), "below 1"),
        (relion31_text(ok).replace("-20.0", "nan", 1), "not a finite number"),
        (relion31_text(ok).replace("_rlnAngleTilt\n", "_rlnSomethingElse\n"), "missing rlnAngleTilt"),
        (relion31_text(ok).replace("1.25 8 2", "1.25 16 2"), "rlnImageSize 16"),
        (relion31_text([]), "no particles"),
    ]
    for i, (text, fragment) in enumerate(cases):
        path = str(tmp_path / f"bad{i}.star")
        with pytest.raises(InputError) as exc:
            read_particles(write_text(path, text)).validate()
        assert fragment in str(exc.value) and path in str(exc.value), (fragment, str(exc.value))


def test_read_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_particles(tmp_path / "missing.star")
    path = write_text(tmp_path / "mics.star", "data_micrographs\nloop_\n_rlnMicrographName\na.mrc\n")
    with pytest.raises(InputError, match="no particle table"):
        read_particles(path)
    text = relion31_text(["1@s.mrcs"], extra_optics="2 opticsGroup2 300.0 2.7 0.1 1.25 8 2")
    text = text.replace("_rlnOpticsGroup\n1", "_rlnFoo\n1").replace("12.5 1\n", "12.5\n")
    text = text.replace("_rlnDefocusAngle\n_rlnFoo", "_rlnDefocusAngle")
    with pytest.raises(InputError, match="no rlnOpticsGroup"):
        read_particles(write_text(tmp_path / "nog.star", text))
    with pytest.raises(InputError, match="not positive"):
        read_particles(write_text(tmp_path / "ok.star", relion31_text(["1@s.mrcs"])), apix=-1.0)


def test_dataclass_direct_construction(tmp_path):
    particles = pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnOpticsGroup": [1],
                              "rlnOriginXAngst": [0.0], "rlnOriginYAngst": [0.0]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g"], "rlnImagePixelSize": [1.0],
                           "rlnImageSize": [8], "rlnImageDimensionality": [2]})
    meta = ParticleMetadata(particles, optics, str(tmp_path))
    assert len(meta) == 1 and meta.apix == 1.0 and meta.box == 8
    assert meta.image_locations()[0][0] == str(tmp_path / "a.mrcs")


# ------------------------------------------------------------------ fuzzing
_FUZZ_BASE = [relion31_text(["1@s.mrcs", "2@s.mrcs", "3@s.mrcs"]), RELION30]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1), st.lists(st.tuples(
    st.integers(0, 1500), st.integers(0, 8),
    st.sampled_from(["", " ", "\n", "#", "_", "x", "@", "1@", "nan", "-", "0", "1e999", "data_", "loop_\n",
                     "_rlnOpticsGroup\n"])), max_size=8))
def test_fuzz_mutated_stars_give_input_error_or_metadata(which, edits):
    text = _FUZZ_BASE[which]
    for pos, cut, ins in edits:
        pos = min(pos, len(text))
        text = text[:pos] + ins + text[pos + cut:]
    with tempfile.TemporaryDirectory() as d:
        path = write_text(os.path.join(d, "f.star"), text)
        try:
            meta = read_particles(path)
            meta.validate(check_images=False, allow_duplicates=True)
            meta.ctf_params(), meta.origins_A(), meta.euler_deg(), meta.apix, meta.box
            write_particles(os.path.join(d, "o.star"), meta)
            np.testing.assert_array_equal(read_particles(os.path.join(d, "o.star")).euler_deg(), meta.euler_deg())
        except InputError as exc:
            assert "\n" not in str(exc)


def test_missing_origins_default_to_zero(tmp_path):
    text = relion31_text(["1@s.mrcs", "2@s.mrcs"])
    text = text.replace("_rlnOriginXAngst\n_rlnOriginYAngst\n", "")
    text = "\n".join(" ".join(t for j, t in enumerate(line.split()) if j not in (4, 5))
                     if "@s.mrcs" in line else line for line in text.splitlines())
    meta = read_particles(write_text(tmp_path / "noorig.star", text))
    np.testing.assert_array_equal(meta.origins_A(), np.zeros((2, 2)))
    assert meta.euler_deg()[1].tolist() == [10.0, 6.0, -20.0]
