"""One CTF vocabulary for every command (engine/ctf_modes.py): full, phase_flipped,
premultiplied, none (+ auto); the version 0.1 spellings ctf/flipped are still accepted with a
deprecation line."""
from __future__ import annotations

import logging

import pytest

from scipion_gmmhet.engine.cli import build_parser
from scipion_gmmhet.engine.ctf_modes import CTF_MODES, ctf_mode
from scipion_gmmhet.engine.errors import InputError


def test_modes_and_old_spellings(caplog):
    assert CTF_MODES == ("full", "phase_flipped", "premultiplied", "none")
    for m in CTF_MODES + ("auto",):
        assert ctf_mode(m) == m
    assert ctf_mode(None) == "auto" and ctf_mode(" Full ") == "full"
    caplog.set_level(logging.WARNING)
    assert ctf_mode("ctf", "--ctf") == "full" and ctf_mode("flipped", "--ctf") == "phase_flipped"
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["--ctf ctf is deprecated: write full", "--ctf flipped is deprecated: write phase_flipped"]
    caplog.clear()
    assert ctf_mode("flipped", quiet=True) == "phase_flipped" and not caplog.records


def test_unknown_mode_is_one_clear_line():
    with pytest.raises(InputError) as e:
        ctf_mode("wiener", "--ctf-mode")
    msg = str(e.value)
    assert msg.startswith("--ctf-mode 'wiener': give one of auto, full, phase_flipped") and "\n" not in msg


@pytest.mark.parametrize("command,option", [("train", "--ctf"), ("refine", "--ctf"), ("reconstruct", "--ctf-mode")])
def test_every_command_takes_the_same_names(command, option):
    required = {"train": ["--particles", "p.star", "--gmm", "g", "--out", "o"],
                "refine": ["--train", "t", "--particles", "p.star", "--out", "o"],
                "reconstruct": ["--particles", "p.star", "--out", "o.mrc"]}[command]
    for name in ("full", "phase_flipped", "premultiplied", "none", "ctf", "flipped"):
        args = build_parser().parse_args([command, *required, option, name])
        assert args.ctf_mode == name
