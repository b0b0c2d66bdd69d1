"""The packages import without circles: the layers stay `node/ → ai/ → storage/`, and no
two modules import each other, directly or round a longer loop, counting the imports made
inside functions (a deferred import hides a circle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "ai", "storage")
# What each top-level package may import of the others: nothing imports upward.
MAY_IMPORT = {"node": {"node", "ai", "storage"}, "ai": {"ai", "storage"}, "storage": {"storage"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    }


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that `name` imports anywhere in its file. `from a import b`
    counts `a.b` when that is a module, else `a`; relative imports are resolved."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # The innermost project module the import names.
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
                break
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            # A package's __init__ importing its own modules is not a loop through them.
            if module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_finder_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "a.x": {"a"}}) is None
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from .y import z\n    import p.q\n")
    assert imported_modules("p.m", module, {"p", "p.y", "p.q", "p.m"}) == {"p.y", "p.q"}


def test_no_import_cycle_between_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_upward(package: str) -> None:
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in MAY_IMPORT[package]
    )
    assert not upward, "\n".join(upward)


# The harness that drives a real node from outside (tests and bench/ use it).
HARNESS = "node.testing"


def in_harness(module: str) -> bool:
    return module == HARNESS or module.startswith(HARNESS + ".")


def test_the_product_never_imports_the_test_harness() -> None:
    users = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if not in_harness(name)
        for target in targets
        if in_harness(target)
    )
    assert not users, "\n".join(users)


def imports_pytest(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        if any(name.split(".")[0] == "pytest" for name in names):
            return True
    return False


def test_the_harness_runs_without_pytest() -> None:
    """bench/ imports node.testing and runs without pytest installed."""
    modules = project_modules().items()
    users = sorted(name for name, path in modules if in_harness(name) and imports_pytest(path))
    assert not users, f"these import pytest: {users}"
