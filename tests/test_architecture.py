"""Structure rules of the code base (issue 17), checked on the source with ``ast``:

- no engine module over 600 lines and no engine function over 120 lines;
- every result file name (``latent.npy``, ``fsc.csv``, ``model.pt``, ...) is spelled in the
  outputs module (:mod:`scipion_gmmhet.engine.io.outputs`) only, so a result folder's layout
  has one owner; docstrings and messages may mention names, code that builds paths may not;
- the outputs module imports without torch (protocols and viewers read results through it);
- the engine's modules import each other without cycles at import time (module level).
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scipion_gmmhet"
ENGINE = PACKAGE / "engine"
OUTPUTS = ENGINE / "io" / "outputs.py"

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 120

#: result file names owned by engine/io/outputs.py
RESULT_FILES = ("latent.npy", "model.pt", "config.json", "loss.csv", "gmm.npz", "gmm_map.mrc", "fsc.csv",
                "summary.json", "feature_stats.npz", "features.f16", "features.json", "labels.npy",
                "centers.npy", "pose_changes.csv", "rounds.csv", "reproducibility.json",
                "chimerax_clusters.cxc", "centering.csv", "particle_keys.txt", "_fsc.csv", "_half1.mrc", "_half2.mrc", "epoch_*.pt")


def _engine_files() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _path_literals(path: Path) -> list[tuple[int, str]]:
    """String constants of ``path`` (not docstrings) that name a result file as a path would:
    the whole string, or its last path component, or a suffix of a built name."""
    tree = ast.parse(path.read_text())
    docs = _docstring_nodes(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value.strip()
            for name in RESULT_FILES:
                if text == name or text.endswith(("/" + name, "\\" + name)) or (
                        name.startswith("_") and text.endswith(name) and " " not in text):
                    hits.append((node.lineno, name))
    return hits


def test_engine_files_and_functions_are_small():
    too_long_files, too_long_functions = [], []
    for path in _engine_files():
        rel = path.relative_to(ROOT)
        text = path.read_text()
        n_lines = len(text.splitlines())
        if n_lines > MAX_FILE_LINES:
            too_long_files.append(f"{rel}: {n_lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long_files, f"engine files over {MAX_FILE_LINES} lines: {too_long_files}"
    assert not too_long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {too_long_functions}"


def test_result_file_names_are_spelled_in_the_outputs_module_only():
    assert _path_literals(OUTPUTS), "the outputs module should define the result file names"
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        if path == OUTPUTS or "tests" in path.relative_to(ROOT).parts:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line} {name!r}" for line, name in _path_literals(path)]
    assert not offenders, ("result file names outside engine/io/outputs.py (use its folder classes): "
                           f"{offenders}")


def test_outputs_module_imports_without_torch():
    code = ("import sys, scipion_gmmhet.engine.io.outputs; "
            "print(sorted(m for m in ('torch', 'pyworkflow', 'pwem') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _module_level_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Engine modules that ``path`` imports at module level (not inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != module}
    return out


def test_engine_modules_import_without_cycles():
    files = {_module_name(p): p for p in _engine_files()}
    graph = {m: {d for d in _module_level_imports(p, m, set(files)) if not m.startswith(d + ".")}
             for m, p in files.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles between engine modules: {cycles}"


def test_no_absolute_machine_path_in_the_code():
    """Data are found through conftest fixtures or paths relative to the checkout."""
    roots = ("/work/", "/home/", "/root/", "/Users/", "/scratch/")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + \
            sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        docs = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and node.value.startswith(roots) and node.value not in roots:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, f"absolute machine paths: {offenders}"


def test_no_machine_path_in_committed_results_and_docs():
    """Benchmark result files and docs name paths relative to the repository (benchmarks/common.portable)."""
    pattern = re.compile(r"(?<![\w.$])/(?:work|home|root|Users|scratch|tmp)/\S")
    offenders = []
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*")) + sorted((ROOT / "docs").rglob("*.md")) + \
            [ROOT / "README.md"]:
        if path.is_file() and path.suffix in (".md", ".json", ".csv", ".txt"):
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert not offenders, f"machine paths in committed files: {offenders[:20]}"
