"""The package layout stays acyclic: no facescale or launcher module imports, even lazily inside a function,
a module that imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the in-repo modules it imports anywhere in its body (`from a.b import c` counts a.b and,
    when it is a module, a.b.c)."""
    files = [*ROOT.glob("facescale/**/*.py"), *ROOT.glob("launcher/**/*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_sees_a_lazy_two_module_loop() -> None:
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"d"}}
    assert cycles(graph) == [["a", "b"]]


def test_no_import_cycles_between_modules() -> None:
    graph = import_graph()
    assert "facescale.config.load" in graph and "facescale.parallel.partition" in graph
    assert cycles(graph) == []


def test_no_package_named_like_build_output() -> None:
    """`dist/`, `build/` are what packaging tools write and ignore files drop."""
    names = {p.name for p in (ROOT / "facescale").iterdir() if p.is_dir()}
    assert not names & {"dist", "build", "out"}


def test_the_mode_independent_core_imports_no_mode():
    """Trainer, step skeleton, checkpoint manager/reshard, validation and plan reach a training mode only
    through the registry (`facescale.modes`), never by importing Partial FC's or F2C's packages."""
    graph = import_graph()
    core = [m for m in graph if m.startswith(("facescale.train", "facescale.checkpoint", "facescale.plan"))]
    core += ["facescale.config.validate", "facescale.modes.registry", "facescale.modes.base"]
    modes = ("facescale.f2c", "facescale.partial_fc", "facescale.heads")
    for module in core:
        assert not [m for m in graph[module] if m.startswith(modes)], module
