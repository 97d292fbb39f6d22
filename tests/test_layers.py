"""The package's structure: every module imports, and no two modules import each other, directly or
through others (type-only imports under `if TYPE_CHECKING:` included: a cycle there is still a knot)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pagedllama"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def intra_package_imports(path: Path) -> set[str]:
    """The pagedllama modules `path` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pagedllama")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("pagedllama"):
                continue
            for alias in node.names:  # `from . import x` imports module x; `from .m import f`, module m
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else target)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): intra_package_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_imports():
    for name in import_graph():
        importlib.import_module(name)


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and all(deps <= set(graph) for deps in graph.values()), "the graph is the package's"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_engine_layer_does_its_bookkeeping_without_tensors():
    """The block manager and the scheduler decide in plain Python: a dry run needs no KV tensors."""
    graph = import_graph()
    for name in ("pagedllama.engine.block_manager", "pagedllama.engine.scheduler", "pagedllama.engine.swap"):
        assert "torch" not in (PACKAGE.parent / name.replace(".", "/")).with_suffix(".py").read_text(), name
        assert not any(dep.startswith("pagedllama.model") for dep in graph[name]), name
