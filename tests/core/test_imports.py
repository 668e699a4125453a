"""The package structure: no import cycle anywhere under gpud/, lazy imports and type-only
(TYPE_CHECKING) imports included: a loop through annotations is still two modules that each
need the other to be understood or moved."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gpud"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """gpud modules that ``path`` imports anywhere: module level, inside functions, or under
    ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from gpud import log` imports the module gpud.log.
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return {name for name in found if name in modules and name != me}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    root = package.parent
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports_of(p, modules, root) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None (iterative DFS)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_cycle_under_gpud() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "gpud"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from gpud import b\n")
    (pkg / "b.py").write_text("def f():\n    from gpud.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gpud.a\n"
    )
    graph = import_graph(pkg)
    assert graph["gpud.d"] == {"gpud.a"}  # type-only imports count
    assert find_cycle(graph) == ["gpud.a", "gpud.b", "gpud.sub.c", "gpud.a"]


def test_the_cycle_finder_counts_type_only_imports(tmp_path: Path) -> None:
    # config -> secret at run time, secret -> config only to annotate: still a loop.
    pkg = tmp_path / "gpud"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from gpud.secret import key\n")
    (pkg / "secret.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gpud.config import Config\n"
    )
    graph = import_graph(pkg)
    assert graph["gpud.secret"] == {"gpud.config"}
    assert find_cycle(graph) == ["gpud.config", "gpud.secret", "gpud.config"]


@pytest.mark.parametrize("edges", [{"x": {"y"}, "y": set()}, {"x": set()}])
def test_no_cycle_in_a_dag(edges: dict[str, set[str]]) -> None:
    assert find_cycle(edges) is None


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in tests/harness/ (or a conftest), never in a test module: a test
    module imported by another runs its fixtures and marks twice and cannot be moved alone."""
    offenders = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.split(".")[-1].startswith("test_") for n in names if n.startswith("tests")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_tests_mirror_the_package() -> None:
    """Test modules live in a folder per package (tests/<package>/, tests/core/ for gpud's
    top-level modules), the namespace tier (tests/netns/) or systemd (tests/systemd/), each a
    package so that two folders may hold modules of the same name."""
    assert sorted(p.name for p in (ROOT / "tests").glob("test_*.py")) == []
    folders = {p.parent for p in (ROOT / "tests").rglob("test_*.py")}
    assert all((folder / "__init__.py").exists() for folder in folders), folders
