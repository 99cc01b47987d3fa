"""A plain ``pip install`` gives the standalone engine without Scipion: setup.py's
install_requires hold no Scipion package (they are the ``[scipion]`` extra, present anyway in
the environment ``scipion3 installp`` installs into), and the engine and its command run with
pyworkflow and pwem unimportable."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]
BLOCK = """
import sys
class _NoScipion:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('pyworkflow', 'pwem'):
            raise ImportError('blocked: ' + name, name=name.split('.')[0])
sys.meta_path.insert(0, _NoScipion())
"""


def test_install_requires_have_no_scipion(monkeypatch):
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    reqs = " ".join(seen["install_requires"])
    assert "scipion" not in reqs and "torch" in reqs
    assert {r.split(">")[0] for r in seen["extras_require"]["scipion"]} == {"scipion-pyworkflow", "scipion-em"}
    assert "scipion_gmmhet = scipion_gmmhet" in seen["entry_points"]["pyworkflow.plugin"]
    assert "gmmhet = scipion_gmmhet.engine.cli:main" in seen["entry_points"]["console_scripts"]


def test_engine_runs_without_scipion():
    code = BLOCK + """
from scipion_gmmhet.engine.cli import build_parser
build_parser().format_help()
import scipion_gmmhet
try:
    scipion_gmmhet.Plugin
except ImportError as exc:
    print('PLUGIN:', exc)
assert not [m for m in sys.modules if m.split('.')[0] in ('pyworkflow', 'pwem')]
print('ENGINE OK')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ENGINE OK" in out.stdout
    assert "scipion3 installp" in out.stdout and "[scipion]" in out.stdout
