"""The import graph follows the data, one layer per sub-package:
errors < config < files < core < batch < run < report < cli.

Read from the source (ast), not by importing: a module may import from its own sub-package or a lower
one, never from one above; the engine computes only; the report side never reaches the run or the
compute layers; no folder holds more than 12 modules and no module more than 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path


PKG = Path(__file__).resolve().parents[1] / "nst_batch"

# Lowest first. `errors` is everyone's; `config` is torch-free, so the manifest is checked without torch.
LAYERS = ["errors", "config", "files", "core", "batch", "run", "report", "cli"]
LEVEL = {name: i for i, name in enumerate(LAYERS)}
LEVEL.update({"__main__": LEVEL["cli"], "__init__": LEVEL["cli"]})


def unit_of(path: Path) -> str:
    """The layer a file belongs to: its sub-package, or its own name at the top of the package."""
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports_of(path: Path, pkg: Path = PKG) -> set[str]:
    """The package modules `path` imports (dotted, under nst_batch), at the top or inside a function."""
    here = path.relative_to(pkg).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = list(here[:len(here) - (node.level - 1)])
            mod = base + (node.module.split(".") if node.module else [])
            if node.module:
                found.add(".".join(mod))
            else:  # from . import a, b
                found.update(".".join(mod + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nst_batch"):
            parts = node.module.split(".")[1:]
            found.update([".".join(parts)] if parts else [a.name for a in node.names])
    return found


def _layer(dotted: str) -> str:
    return dotted.split(".")[0]


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_every_module_has_a_layer():
    units = {unit_of(p) for p in modules()}
    assert units <= set(LEVEL), f"place these in LAYERS: {units - set(LEVEL)}"


def test_no_module_imports_one_above_it():
    upward = [f"{p.relative_to(PKG)} imports {dep}" for p in modules() for dep in imports_of(p)
              if LEVEL[_layer(dep)] > LEVEL[unit_of(p)]]
    assert not upward, upward


def test_report_never_reaches_the_run_or_the_compute_layers():
    for p in (PKG / "report").rglob("*.py"):
        deps = {_layer(d) for d in imports_of(p)}
        assert not deps & {"run", "core"}, (p.name, deps)


def test_the_engine_computes_only():
    """No image files, no ledger, no plan: tensors and settings in, images and loss rows out."""
    engine = PKG / "core" / "engine.py"
    deps = imports_of(engine)
    assert not {d for d in deps if _layer(d) in ("batch", "run", "files")}, deps
    tree = ast.parse(engine.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(n == "PIL" or n.startswith("PIL.") for n in names), names


def test_sizes():
    """Small enough to read in one sitting: folders of at most 12 modules, modules of at most 400 lines,
    functions of at most 80, classes of at most 300."""
    crowded = [str(d.relative_to(PKG)) for d in [PKG, *PKG.rglob("*")] if d.is_dir()
               and len([p for p in d.glob("*.py") if p.name != "__init__.py"]) > 12]
    long = []
    for p in modules():
        text = p.read_text()
        if (n := len(text.splitlines())) > 400:
            long.append(f"{p.relative_to(PKG)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            limit = 300 if isinstance(node, ast.ClassDef) else 80
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    (n := node.end_lineno - node.lineno + 1) > limit:
                long.append(f"{p.relative_to(PKG)}:{node.name}: {n} lines")
    assert not crowded and not long, (crowded, long)


def test_the_checker_sees_an_upward_import(tmp_path):
    (tmp_path / "batch").mkdir()
    bad = tmp_path / "batch" / "plan.py"
    bad.write_text("from ..run.runner import run\ndef f():\n    from ..core import engine\n    from . import shards\n")
    assert imports_of(bad, tmp_path) == {"run.runner", "core", "batch.shards"}
