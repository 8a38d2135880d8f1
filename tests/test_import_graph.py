"""No import cycle in the ``latentsync`` package, between modules or between packages.

The graph is grimp's (``grimp.build_graph``, the library under ``lint-imports``), built from the
source without importing it. Every import counts: at module level, inside functions (grimp reads
the whole syntax tree) and under ``if TYPE_CHECKING:`` (grimp keeps those unless asked with
``exclude_type_checking_imports=True``, which this test does not). A function-level import that
only hides a cycle at run time is therefore still a cycle here.

A cycle is reported as a chain ``a -> b -> a`` with the import statements that make it; every
module (or package) in a strongly connected component appears in at least one reported chain.
"""

from __future__ import annotations

from collections import deque

import grimp
import pytest

ROOT = "latentsync"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(ROOT, cache_dir=None)


def module_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """Every module -> the modules of the package it imports directly."""
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def package_of(module: str, packages: set[str]) -> str:
    """The package a module belongs to: itself for a package (its ``__init__``), else its parent.

    ``latentsync.media.video`` -> ``latentsync.media``, ``latentsync.media`` -> ``latentsync.media``,
    ``latentsync.config`` -> ``latentsync``.
    """
    return module if module in packages else module.rpartition(".")[0]


def package_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """Every package -> the other packages its modules import (a package's own modules collapse into it)."""
    packages = {m for m in graph.modules if graph.find_children(m)} | {ROOT}
    edges: dict[str, set[str]] = {}
    for importer, imported in module_edges(graph).items():
        source = package_of(importer, packages)
        edges.setdefault(source, set())
        for target in imported:
            if (dest := package_of(target, packages)) != source:
                edges[source].add(dest)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def shortest_cycle(edges: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest chain ``start -> ... -> start`` through nodes of ``within`` (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(edges.get(node, ())):
            if succ not in within:
                continue
            if succ == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return [*reversed(chain), start]
            if succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Chains covering every node of every cycle: per component, shortest cycles until all are in one."""
    chains = []
    for component in strongly_connected(edges):
        members, covered = set(component), set()
        for node in component:
            if node not in covered:
                chain = shortest_cycle(edges, node, members)
                covered.update(chain)
                chains.append(chain)
    return chains


def describe(chain: list[str], why) -> str:
    """``a -> b -> a`` and, under it, each import statement (or the modules' imports) that makes a link."""
    lines = [" -> ".join(chain)]
    for a, b in zip(chain, chain[1:], strict=False):
        lines.append(f"    {a} -> {b}: {why(a, b)}")
    return "\n".join(lines)


def test_no_module_imports_itself_back(graph):
    def why(a: str, b: str) -> str:
        details = graph.get_import_details(importer=a, imported=b)
        return "; ".join(f"line {d['line_number']}: {d['line_contents']}" for d in details)

    found = cycles(module_edges(graph))
    assert not found, f"{len(found)} import cycle(s) between modules:\n" + "\n".join(describe(c, why) for c in found)


def test_no_package_imports_itself_back(graph):
    packages = {m for m in graph.modules if graph.find_children(m)} | {ROOT}

    def why(a: str, b: str) -> str:
        links = sorted(
            f"{importer} -> {imported}"
            for importer in graph.modules
            if package_of(importer, packages) == a
            for imported in graph.find_modules_directly_imported_by(importer)
            if package_of(imported, packages) == b
        )
        return ", ".join(links)

    found = cycles(package_edges(graph))
    assert not found, f"{len(found)} import cycle(s) between packages:\n" + "\n".join(describe(c, why) for c in found)


def test_cycles_are_found_and_reported_as_chains():
    edges = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    # d reaches the cycle but is not on it; a self-import is no cycle
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert cycles(edges) == [["a", "b", "a"], ["c", "a", "b", "c"]]
    assert package_of("latentsync.media.video", {"latentsync", "latentsync.media"}) == "latentsync.media"
    assert package_of("latentsync.media", {"latentsync", "latentsync.media"}) == "latentsync.media"
    assert package_of("latentsync.config", {"latentsync", "latentsync.media"}) == "latentsync"
