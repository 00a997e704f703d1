"""pdserve's modules import one way: no module is imported, directly or through others, by a
module it imports. Imports inside functions count (grimp reads every import statement), so
a cycle cannot hide in a function-local import. `lint-imports` (.ci/run) checks the same
between sibling packages and the layers; this test keeps the module rule in a plain pytest run."""

from __future__ import annotations

import grimp


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    cycles.append(sorted(component))
    return cycles


def test_strongly_connected_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_module_import_cycles_in_pdserve():
    g = grimp.build_graph("pdserve", cache_dir=None)
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    cycles = strongly_connected(graph)
    details = []
    for cycle in cycles:
        members = set(cycle)
        for importer in cycle:
            for imported in sorted(graph[importer] & members):
                for d in g.get_import_details(importer=importer, imported=imported):
                    details.append(f"{importer}:{d['line_number']} {d['line_contents']}")
    assert not cycles, "import cycles:\n" + "\n".join(details)
