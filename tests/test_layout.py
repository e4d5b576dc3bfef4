"""The layout keeps its promises: small modules and functions, no import cycle, nothing
cited from outside the repository, every exported name real, every script runnable from
the repository root."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import diffdensity as dd

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffdensity"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def test_modules_are_small():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_are_small():
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _module_level_imports(name: str, path: Path) -> set[str]:
    """diffdensity modules imported when ``name`` is imported (not inside functions or TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for sub in getattr(node, field, []) or []:
                        visit(sub.body if isinstance(sub, ast.ExceptHandler) else [sub])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("diffdensity"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not mod.startswith("diffdensity"):
                    continue
                found.add(mod)
                for a in node.names:  # from . import x  (x a submodule)
                    if f"{mod}.{a.name}" in MODULES:
                        found.add(f"{mod}.{a.name}")

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle():
    graph = {name: _module_level_imports(name, path) for name, path in MODULES.items()}
    # importing a module imports its packages first: a package may import its children
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a child importing its own package
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if state.get(name) is None and (cycle := dfs(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


OUTSIDE = re.compile(r"MATH\.md|DESIGN\.md|STYLE\.md|\.\./shared|/work/")


def test_nothing_cites_a_file_outside_the_repository():
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in ("src", "docs", "tests", "benchmarks", "tools", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".md", "", ".txt", ".toml", ".json")]
    hits = []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits[:20])


def test_every_exported_name_resolves():
    for name in dd.__all__:
        assert getattr(dd, name) is not None, name
    for name in MODULES:
        if name.endswith("__main__"):
            continue
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", []):
            assert hasattr(mod, attr), f"{name}.__all__ names {attr!r}, which does not exist"


SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tools").glob("*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_run_from_the_repository_root(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


def test_importing_the_package_and_the_cli_help_import_no_torch():
    code = (
        "import sys, contextlib, io\n"
        "import diffdensity\n"
        "from diffdensity.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'numpy', 'matplotlib')))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_result_objects_print_short():
    from diffdensity._repr import short_repr
    from diffdensity.alignment import ScoreAlignmentResult
    from diffdensity.consistency import ConsistencyReport
    from diffdensity.likelihood import BitsPerDimResult, LikelihoodResult
    from diffdensity.mode_tracking import ModeTrackingResult
    from diffdensity.scoring.result import EvaluationResult

    for cls in (LikelihoodResult, BitsPerDimResult, ScoreAlignmentResult, ConsistencyReport, ModeTrackingResult, EvaluationResult):
        assert cls.__repr__ is short_repr, cls
    import torch

    big = torch.randn(1000, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = LikelihoodResult(big[:, 0, 0, 0], big[:, 0, 0, 1], big[:, 0, 0, 2], big, dd.NFE(jvp=3), 24, {"solver": "rk4"})
    text = repr(res)
    assert len(text) < 400 and "tensor(" not in text and "<1000x3x16x16 float64" in text
    short = repr(dd.sample(dd.GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64), schedule=dd.VP()), 5, steps=2))
    assert short.startswith("SampleResult('pf-ode'") and "tensor(" not in short
