"""How the package hangs together: no import circles, and a read side that needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scalestudy"


def module_imports() -> dict[str, set[str]]:
    """Each module's scalestudy imports, anywhere in it (an import deferred into a function still
    makes the two modules depend on each other), plus the parent package each import runs."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("scalestudy"):
                    deps.add(target)
                    parent = target.rpartition(".")[0]
                    if parent in modules and not name.startswith(parent + ".") and parent != name:
                        deps.add(parent)  # importing a.b runs a/__init__ first
        graph[name] = deps - {name}
    return graph


def test_no_module_imports_itself_back_through_a_circle():
    graph = module_imports()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_read_side_and_the_cli_import_without_torch():
    # status, report and dashboard read files: importing torch would cost them a second or more.
    code = ("import sys, scalestudy.cli, scalestudy.store, scalestudy.analysis.report, "
            "scalestudy.dashboard.server; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
