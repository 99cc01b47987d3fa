"""`gmmhet convert`: real RELION files and a cryoSPARC export to the canonical star, exit codes."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from scipion_gmmhet.engine.cli import main
from scipion_gmmhet.engine.io.metadata import read_particles
from scipion_gmmhet.engine.io.mrc import write_stack
from scipion_gmmhet.engine.io.star import read_star


def _same(a, b):
    np.testing.assert_array_equal(a.euler_deg(), b.euler_deg())
    np.testing.assert_array_equal(a.origins_A(), b.origins_A())
    ca, cb = a.ctf_params(), b.ctf_params()
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    np.testing.assert_array_equal(a.image_locations()[0], b.image_locations()[0])
    np.testing.assert_array_equal(a.image_locations()[1], b.image_locations()[1])


def test_convert_relion31(tmp_path, real_metadata_dir, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "canon.star"
    assert main(["convert", str(real_metadata_dir / "relion31.star"), "--out", str(out)]) == 0
    logged = caplog.text
    assert "5 particles" in logged and "2.806 A/px" in logged and "box: 256" in logged
    assert set(read_star(out)) == {"optics", "particles"}
    _same(read_particles(real_metadata_dir / "relion31.star"), read_particles(out))


def test_convert_relion5_and_six_groups(tmp_path, real_metadata_dir):
    src = real_metadata_dir / "relion5.star"
    root = str(real_metadata_dir / "toy_datadir")
    # its toy stacks are 30 px while its optics say 448: refused unless images are not checked
    assert main(["convert", str(src), "--images-root", root, "--out", str(tmp_path / "a.star")]) == 2
    assert not (tmp_path / "a.star").exists()
    out = tmp_path / "b.star"
    assert main(["convert", str(src), "--images-root", root, "--skip-image-check", "--out", str(out)]) == 0
    _same(read_particles(src, images_root=root), read_particles(out))
    back = read_star(out)
    assert back["optics"]["rlnCtfDataAreCtfPremultiplied"].tolist() == [0]
    six = real_metadata_dir / "relion31.6opticsgroups.star"
    out6 = tmp_path / "six.star"
    assert main(["convert", str(six), "--skip-image-check", "--out", str(out6)]) == 0
    _same(read_particles(six), read_particles(out6))
    assert len(read_star(out6)["optics"]) == 6


def test_convert_cryosparc(tmp_path, real_metadata_dir, capsys):
    assert main(["convert", str(real_metadata_dir / "cryosparc_J2_particles_exported.cs"),
                 "--out", str(tmp_path / "x.star")]) == 2
    assert "only 2D alignments" in capsys.readouterr().err
    write_stack(str(tmp_path / "st.mrcs"), np.ones((2, 8, 8), np.float32), 2.0)
    a = np.zeros(2, dtype=[("blob/path", "S20"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                           ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
                           ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
                           ("ctf/df_angle_rad", "<f4"), ("alignments3D/pose", "<f4", (3,)),
                           ("alignments3D/shift", "<f4", (2,))])
    a["blob/path"], a["blob/idx"], a["blob/shape"], a["blob/psize_A"] = b">st.mrcs", [1, 0], 8, 2.0
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300, 2.7, 0.1
    a["ctf/df1_A"], a["ctf/df2_A"], a["ctf/df_angle_rad"] = 15000, 14000, np.pi / 4
    a["alignments3D/pose"] = [[0, 0, np.pi / 2], [0, 0, 0]]
    a["alignments3D/shift"] = [[1.0, -2.0], [0, 0]]
    with open(tmp_path / "p.cs", "wb") as f:
        np.save(f, a)
    out = tmp_path / "cs.star"
    assert main(["convert", str(tmp_path / "p.cs"), "--out", str(out)]) == 0
    star = read_star(out)["particles"]
    assert star["rlnImageName"].tolist() == ["000002@st.mrcs", "000001@st.mrcs"]
    np.testing.assert_allclose(star[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()[0], [90, 0, 0],
                               atol=1e-5)
    np.testing.assert_allclose(star[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[0], [2.0, -4.0])
    np.testing.assert_allclose(star["rlnDefocusAngle"], 45.0, rtol=1e-6)
    _same(read_particles(tmp_path / "p.cs"), read_particles(out))


def test_convert_bad_input_exit_code(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.star"), "--out", str(tmp_path / "o.star")]) == 2
    err = capsys.readouterr().err
    assert "missing.star: no such file" in err and "Traceback" not in err
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\nloop_\n_rlnAngleRot\n10\n")
    assert main(["convert", str(bad), "--out", str(tmp_path / "o.star")]) == 2
    assert "rlnImageName" in capsys.readouterr().err
    assert main(["convert", str(bad), "--out", str(bad)]) == 2
    assert not os.path.exists(tmp_path / "o.star")


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "gmmhet convert" in capsys.readouterr().out
