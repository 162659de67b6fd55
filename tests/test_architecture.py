"""The import graph follows the data: manifest -> plan -> ledger -> engine -> runner -> status/report -> cli.

Read from the source (ast), not by importing: a module may import another only from its own layer or
a lower one, and the report side never reaches the runner or the engine."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nst_batch"

# Lowest first. Helpers anyone may use sit at the bottom (no torch there but in vgg/losses); the
# engine's own parts (the VGG, the objective, one scale, the pyramid) sit under the engine.
LAYERS = [
    {"errors", "files", "names", "progress"},
    {"images"},
    {"objective"},
    {"vgg"},
    {"losses", "colors"},
    {"manifest"},
    {"plan"},
    {"shards"},
    {"ledger"},
    {"optimize"},
    {"pyramid"},
    {"memory"},
    {"network"},
    {"engine"},
    {"losslog"},
    {"lifecycle"},
    {"training"},
    {"runner"},
    {"cluster"},
    {"status"},
    {"report"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def imports_of(path: Path) -> set[str]:
    """Package modules `path` imports, at the top or inside a function alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import a, b
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nst_batch"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PKG.glob("*.py")}
    assert modules == set(LEVEL), f"place these in LAYERS: {modules ^ set(LEVEL)}"


def test_no_module_imports_one_above_it():
    upward = []
    for path in PKG.glob("*.py"):
        for dep in imports_of(path):
            if LEVEL[dep] > LEVEL[path.stem]:
                upward.append(f"{path.stem} imports {dep}")
    assert not upward, upward


def test_status_and_report_never_reach_the_runner_or_the_engine():
    for name in ("status", "report", "losslog"):
        deps = imports_of(PKG / f"{name}.py")
        assert not deps & {"runner", "engine", "lifecycle", "optimize", "pyramid", "vgg", "losses"}, (name, deps)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "plan.py"
    bad.write_text("from .runner import run\ndef f():\n    from . import engine\n")
    assert imports_of(bad) == {"runner", "engine"}
