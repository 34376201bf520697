"""The package's shape: no import cycle between its modules, no module grown too large."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "skipgpt"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, modules: set[str]) -> set[str]:
    """Every skipgpt module ``path`` imports, at any depth of the file (function-level too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # "from . import x" imports module x
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
    files = list(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): internal_imports(f, modules) for f in files}
    # A package imports its own __init__ implicitly; only edges written in the code count here.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if nxt not in state and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), f"import cycle: {' -> '.join(cycle)}"


def test_no_module_over_the_size_limit():
    sizes = {str(f.relative_to(REPO)): len(f.read_text().splitlines()) for f in PACKAGE.rglob("*.py")}
    assert not {f: n for f, n in sizes.items() if n > MAX_LINES}


# Which subpackages each may import: routing holds everything a routed forward runs (the skipping
# engine included); inference, training and evaluation build on it; baselines reuse training and
# evaluation; the CLI uses everything.
ALLOWED = {
    "routing": set(),
    "inference": {"routing"},
    "training": {"routing"},
    "evaluation": {"routing"},
    "baselines": {"routing", "training", "evaluation"},
    "cli": {"routing", "inference", "training", "evaluation", "baselines"},
}


def test_subpackages_depend_one_way():
    files = list(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    wrong = []
    for f in files:
        parts = module_name(f).split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED:
            continue
        for imported in internal_imports(f, modules):
            other = imported.split(".")[1] if imported.count(".") else None
            if other in ALLOWED and other != parts[1] and other not in ALLOWED[parts[1]]:
                wrong.append(f"{module_name(f)} -> {imported}")
    assert not wrong, wrong
