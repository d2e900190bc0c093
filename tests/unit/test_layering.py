"""memvirt's packages depend on each other one way: no import cycle between them, counting the
imports hidden inside functions too (a function-level import hides a cycle from Python, not from
the reader). The CLI sits on top and nothing below imports it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "memvirt"


def _unit(module: str) -> str:
    """``memvirt.qemu.vm`` -> ``qemu``; top-level modules (``memvirt.errors``) are their own unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "memvirt"


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit -> ["file:line", ...]} over every ``memvirt`` import in the package."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = _unit(module)
        edges = graph.setdefault(src, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("memvirt.") and _unit(name) != src:
                    target = _unit(name)
                    if (PACKAGE / target).is_dir() or (PACKAGE / f"{target}.py").exists():
                        edges.setdefault(target, []).append(f"{rel}.py:{node.lineno}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages() -> None:
    graph = import_graph()
    found = cycles(graph)
    detail = [
        f"{a} -> {b} ({', '.join(graph[a][b][:3])})"
        for comp in found
        for a in comp
        for b in comp
        if b in graph.get(a, {})
    ]
    assert not found, "import cycles between packages:\n" + "\n".join(detail)


def test_nothing_below_the_cli_imports_it() -> None:
    graph = import_graph()
    users = sorted(
        f"{u} ({', '.join(e['cli'][:2])})" for u, e in graph.items() if u not in ("cli", "__main__") and "cli" in e
    )
    assert not users, users


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": []}, "b": {}}) == []
