"""The README's ``gmmhet`` examples, run as written (at a small size), and the command line's
conventions a newcomer relies on: ``-o``, one ``--device`` default, negative latent points,
a top-level help for users, embedding-only ``analyze``, per-cluster row files for
``reconstruct --indices`` and a missing-stack message that names a command that fixes it."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from scipion_gmmhet.engine.cli import COMMANDS, build_parser, main, normalise_argv

README = Path(__file__).resolve().parents[1] / "README.md"
# the README's sizes -> test sizes (same commands, seconds instead of minutes on 2 CPU cores)
SMALL = [("--n 5000", "--n 120"), ("--box 64", "--box 32"), ("--epochs 30", "--epochs 1"),
         ("--clusters 4", "--clusters 2"), ("--max-angle 6", "--max-angle 2")]


def _readme_blocks() -> list[list[str]]:
    """The ```bash blocks of the README's "The `gmmhet` command" section, as lists of lines."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The `gmmhet` command"):]
    section = section[:section.index("\n## ", 5)]
    return [[ln.strip() for ln in block.strip().splitlines() if ln.strip().startswith("gmmhet ")]
            for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runnable = _readme_blocks()[0]
    assert [ln.split()[1] for ln in runnable][:3] == ["simulate", "build", "train"]
    for line in runnable:
        for big, small in SMALL:
            line = line.replace(big, small)
        argv = shlex.split(line)[1:]
        assert main(argv) == 0, line
    assert Path("state.mrc").is_file() and Path("other_state.mrc").is_file()
    assert Path("class00.mrc").is_file()
    rows = np.loadtxt("analysis/cluster_00_rows.txt", dtype=np.int64, ndmin=1)
    labels = np.load("analysis/labels.npy")
    assert rows.tolist() == np.nonzero(labels == 0)[0].tolist()


def test_readme_real_data_examples_parse():
    """The second block needs real data or a GPU: every line must at least be a valid command."""
    blocks = _readme_blocks()
    assert len(blocks) >= 2 and blocks[1]
    parser = build_parser()
    for line in blocks[1]:
        args = parser.parse_args(normalise_argv(shlex.split(line)[1:]))
        assert args.command == line.split()[1]


def test_every_command_takes_short_o_and_one_device_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in COMMANDS:
        p = sub.choices[name]
        assert "-o" in p._option_string_actions, name
        dev = [a for a in p._actions if a.dest == "device"]
        for a in dev:
            assert a.default == "auto", name


def test_command_help_has_no_source_markup(capsys):
    """--help is for users: no Sphinx roles or double backquotes from the developer docs."""
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        for role in (":class:", ":mod:", ":func:", ":data:", "``"):
            assert role not in out, (name, role)
        assert "--threads" in out, name


def test_threads_option_sets_torch_and_logs_the_load(tmp_path, capsys, caplog):
    import logging

    import torch
    before = torch.get_num_threads()
    caplog.set_level(logging.INFO)
    try:
        assert main(["simulate", "--kind", "conformational", "--n", "4", "--box", "32", "--threads", "1",
                     "-o", str(tmp_path / "sim")]) == 0
        assert torch.get_num_threads() == 1
        assert "CPU threads: 1 of" in caplog.text and "load average" in caplog.text
    finally:
        torch.set_num_threads(before)
    assert main(["simulate", "--kind", "conformational", "--n", "4", "--threads", "-1",
                 "-o", str(tmp_path / "bad")]) == 2
    assert "--threads -1: give 0" in capsys.readouterr().err


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "heterogeneity" in out and "a typical run" in out and "-o" in out
    assert "sub-command per module" not in out and "commands/" not in out


@pytest.mark.parametrize("argv,expected", [
    (["eval", "--z", "-1,0,0,0"], "--z=-1,0,0,0"),
    (["eval", "--z", "-1", "0", "0.5", "-2e-3"], "--z=-1,0,0.5,-2e-3"),
    (["eval", "--z=-1,0"], "--z=-1,0"),
])
def test_negative_latent_points(argv, expected):
    assert normalise_argv(argv)[1] == expected
    args = build_parser().parse_args(normalise_argv(argv + ["--train", "t", "-o", "x.mrc"]))
    assert args.z == expected.split("=", 1)[1]


def test_missing_stack_message_names_a_command_that_fixes_it(tmp_path, capsys):
    from scipion_gmmhet.engine.simulation.simulate import simulate
    sim = simulate(str(tmp_path / "sim"), "homogeneous", n=20, box=24, apix=4.0, snr=1.0, seed=0)
    assert main(["build", "--map", sim["consensus"], "--resolution", "12", "--steps", "10",
                 "-o", str(tmp_path / "gmm")]) == 0
    moved = tmp_path / "moved"
    os.rename(tmp_path / "sim", moved)
    star = moved / "particles.star"
    text = star.read_text().replace("particles.mrcs", str(tmp_path / "gone" / "particles.mrcs"))
    star.write_text(text)
    assert main(["train", "--particles", str(star), "--gmm", str(tmp_path / "gmm"), "--epochs", "1",
                 "-o", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "gmmhet convert" in err and "--images-root" in err
    assert sim["star"]


def test_real_data_guide_commands_parse_and_numbers_match_the_benchmark():
    """docs/real_data.md: every gmmhet command line is a valid command, and its time per 100k
    particles is the benchmark's measured rate (results/training_throughput_1thread.json)."""
    import json
    root = README.parent
    guide = (root / "docs" / "real_data.md").read_text(encoding="utf-8")
    parser = build_parser()
    # full command lines (with options), inline or indented
    lines = [m.strip() for m in re.findall(r"`(gmmhet [^`]+)`", guide) if " -" in m]
    lines += [ln.strip() for ln in guide.splitlines() if ln.startswith("    gmmhet ")]
    assert len(lines) >= 2
    for line in lines:
        parser.parse_args(normalise_argv(shlex.split(line)[1:]))
    bench = json.loads((root / "benchmarks" / "results" / "training_throughput_1thread.json").read_text())
    for row in bench["training"]:
        per100k_min = 1e5 / row["epoch_rate"] / 60
        cells = "| %d | %d | %.1f min (" % (row["box"], row["n_gauss"], per100k_min)
        assert cells in guide, cells


def test_make_gui_opens_a_project_with_the_venv_first_on_path():
    """`make gui` (the README's way to open the demo) runs Scipion from the .venv with the
    .venv's bin first on PATH (the protocols it launches take the first python3 there), with -O so
    that Scipion opens the window in this process instead of relaunching itself detached (make
    would return at once, and under xvfb-run the display would go with it); the GUI itself is
    opened by scipion_gmmhet/tests/test_gui_newcomer.py."""
    import shutil
    import subprocess
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = README.parent
    out = subprocess.run(["make", "-n", "-o", ".venv/.gmmhet-installed", "gui", "PROJECT=my_project"],
                         cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "/.venv/bin/python -O -m scipion project my_project" in out.stdout
    makefile = (root / "Makefile").read_text()
    assert "export PATH := $(VENV)/bin:$(PATH)" in makefile
