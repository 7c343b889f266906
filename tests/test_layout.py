"""The house rules, checked on the source (docs/architecture.md): no import cycle, dependencies that point down the
module map, modules a newcomer reads at once, SQL only in the ledger (and its connections), no private member imported
across modules, long functions say why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_REASON = "# long:"  # a function over MAX_FUNCTION_LINES states why in a comment starting with this


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "dataward").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The dataward modules ``name`` imports, anywhere in it (deferred imports too: a cycle is a cycle)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != "dataward" and target != name:  # importing a submodule runs the package's __init__: not a design edge
                out.add(target)
    return out


def _cycles() -> list[list[str]]:
    graph = {name: _imports(name, path) for name, path in MODULES.items() if name != "dataward"}
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from dataward.b import f\n")
    b.write_text("def f():\n    from dataward.a import g\n")
    monkeypatch.setattr(f"{__name__}.MODULES", {"dataward": SRC / "dataward" / "__init__.py", "dataward.a": a, "dataward.b": b})
    assert _cycles() == [["dataward.a", "dataward.b", "dataward.a"]]


# docs/architecture.md's module map as layers, bottom first: a module imports its own layer or the layers below it,
# never one above. A name covers the module and everything under it; every module belongs to exactly one layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("dataward.errors", "dataward.interrupts", "dataward.numerics", "dataward.openmp", "dataward.progress",
                    "dataward.config", "dataward.shapes", "dataward.benchmark_data", "dataward.npzfile", "dataward.data", "dataward.defaults",
                    "dataward.plots", "dataward.captions", "dataward.imagefiles")),
    ("store", ("dataward.store",)),
    ("diffusion", ("dataward.diffusion",)),
    ("models", ("dataward.models",)),
    ("training", ("dataward.training", "dataward.text")),
    ("facade", ("dataward.ward", "dataward.changes", "dataward.forgetting", "dataward.public_base", "dataward.assignment", "dataward.sampling",
                "dataward.certificate", "dataward.ward_status", "dataward.pictures")),
    ("audit", ("dataward.audit",)),
    ("app", ("dataward.app",)),
)
# Upward imports that are genuinely needed, each with its reason: (importer, imported) -> why. Keep it short.
UPWARD_ALLOWED: dict[tuple[str, str], str] = {}


def _layer(name: str) -> int | None:
    found = [i for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if name == p or name.startswith(p + ".")]
    return found[0] if len(found) == 1 else None


def _upward_imports() -> list[str]:
    out = []
    for name, path in MODULES.items():
        if name == "dataward":  # the package: the public API names every layer (imported lazily)
            continue
        for target in sorted(_imports(name, path)):
            if _layer(target) > _layer(name) and (name, target) not in UPWARD_ALLOWED:
                out.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    return out


def test_every_module_has_one_layer():
    assert [name for name in MODULES if name != "dataward" and _layer(name) is None] == []


def test_dependencies_point_down_the_module_map():
    assert _upward_imports() == []


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
    low, high = tmp_path / "low.py", tmp_path / "high.py"
    low.write_text("def f():\n    from dataward.training.loop import TrainState\n")  # deferred imports count too
    high.write_text("from dataward.config import TrainConfig\n")
    monkeypatch.setattr(f"{__name__}.MODULES", {"dataward.config": low, "dataward.training.loop": high})
    assert _upward_imports() == ["dataward.config (foundation) imports dataward.training.loop (training)"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[name]} has {lines} lines"


def test_long_functions_say_why():
    unexplained = []
    for path in MODULES.values():
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                body = source[node.lineno - 1:node.end_lineno]
                if not any(line.strip().startswith(LONG_REASON) for line in body):
                    unexplained.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({len(body)} lines)")
    assert unexplained == []


def test_sql_only_in_the_ledger():
    ledger = {SRC / "dataward" / "store" / "ledger.py", SRC / "dataward" / "store" / "database.py"}
    outside = [f"{p.relative_to(SRC)}:{i}" for p in MODULES.values() if p not in ledger
               for i, line in enumerate(p.read_text().splitlines(), 1) if ".execute(" in line or ".executemany(" in line]
    assert outside == []


def test_no_private_member_imported_across_modules():
    private = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dataward"):
                private += [f"{name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert private == []
