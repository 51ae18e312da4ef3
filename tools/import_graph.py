"""The import graph of jaxpost: which subpackage imports which, every cycle, and every import against the layer
order (an upward import). Reads the source with `ast` (no module is imported), function-level imports included.

    python tools/import_graph.py              # the graph between subpackages, cycles, upward imports (exit 1 if any)
    python tools/import_graph.py --modules    # module-level edges as well

Layers, lowest first: a module may import its own layer and the layers below it. `config` holds the configs (it
reads the loss registries to validate names); `sharding`, `batch` and `checkpoint` are the array plumbing every
higher layer uses; `tokenizers`, `ops` and `models` know nothing of data or training; `data` and `rollout` feed
`train`; `inference` (test-time search) runs the sampler's model; `recipes` compose everything into jobs; `cli`
parses configs for the experiments.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxpost")

LAYERS: tuple[tuple[str, ...], ...] = (
    ("losses",),
    ("config",),
    ("sharding", "batch", "checkpoint", "cli"),
    ("tokenizers", "ops"),
    ("models",),
    ("data",),
    ("rollout",),
    ("inference",),
    ("train",),
    ("recipes",),
)


def unit_of(module: str) -> str:
    """`jaxpost.train.step` -> "train"; `jaxpost` -> "" (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise KeyError(f"jaxpost.{unit} is in no layer of tools/import_graph.py: add it to LAYERS")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def module_edges(root: str = ROOT) -> dict[str, set[str]]:
    """{module: the jaxpost modules it imports}, from every `import` / `from ... import` in its source."""
    paths = {module_name(os.path.join(d, f)): os.path.join(d, f)
             for d, _, files in os.walk(root) for f in files if f.endswith(".py")}
    edges: dict[str, set[str]] = {}
    for mod, path in sorted(paths.items()):
        edges[mod] = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` imports the submodule, not the package's __init__
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                         for a in node.names]
            else:
                continue
            edges[mod].update(n for n in names if n == "jaxpost" or n.startswith("jaxpost."))
    return edges


def unit_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for mod, targets in edges.items():
        for t in targets:
            if unit_of(t) and unit_of(t) != unit_of(mod):
                out[unit_of(mod)].add(unit_of(t))
        out.setdefault(unit_of(mod), set())
    return dict(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (or a self-loop): each is an import circle."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, imported module) pairs where the import goes to a higher layer."""
    bad = []
    for mod, targets in sorted(edges.items()):
        if not unit_of(mod):
            continue
        for t in sorted(targets):
            if unit_of(t) and layer_of(unit_of(t)) > layer_of(unit_of(mod)):
                bad.append((mod, t))
    return bad


def report(show_modules: bool = False) -> int:
    edges = module_edges()
    units = unit_edges(edges)
    print("subpackage imports (layer: unit -> imports):")
    for unit in sorted((u for u in units if u), key=lambda u: (layer_of(u), u)):
        print(f"  {layer_of(unit)}: {unit:11} -> {', '.join(sorted(units[unit])) or '-'}")
    if show_modules:
        for mod in sorted(edges):
            print(f"  {mod} -> {', '.join(sorted(edges[mod])) or '-'}")
    module_cycles = cycles(edges)
    unit_cycles = cycles({u: v for u, v in units.items() if u})
    up = upward_imports(edges)
    print(f"module cycles: {module_cycles or 'none'}")
    print(f"subpackage cycles: {unit_cycles or 'none'}")
    print(f"upward imports: {up or 'none'}")
    return 1 if module_cycles or unit_cycles or up else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="print module-level edges too")
    sys.exit(report(ap.parse_args().modules))
