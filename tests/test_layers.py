"""The package's architecture, enforced: each domain package imports only from the layers below it, no module
imports back into a module that imports it (no cycle, not even through an import inside a function), and
the package's top level stays a hallway, not a room (at most 6 modules).

To add a package, put it in LAYERS where it belongs; an import that breaks the order means the code is in
the wrong room (move it down) or the dependency should be turned around (pass the value in)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lowmem_r1

PKG = Path(lowmem_r1.__file__).parent

# Lowest first: a package may import from itself and from the packages before it, never after.
LAYERS = [
    "core",        # errors, file safety, faults, allocator, distributed helpers
    "rewards",     # pure reward functions, answer extraction, the weighted recipe rewards
    "models",      # name resolution, precision, backends, vLLM's CPU build
    "data",        # sources, generators, tasks, prompt formats, splits, SFT data
    "config",      # the recipe schema
    "runs",        # run directory, health, report
    "generation",  # engines, shared prefill, eval, chat, rejection sampling, serve
    "preflight",   # plan, doctor, rewards check
    "training",    # the run, stages, grpo/, sft, progress, launch, measure
    "pipeline",    # multi-stage recipes
    "export",      # merge, GGUF, Ollama
    "cli",         # the command line
]
TOP_LEVEL = {"__init__", "__main__"}  # the package's own modules: the hallway


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, modules) -> set[str]:
    """Every lowmem_r1 module `name` imports, at the top or inside a function (`from X import y` counts as
    X.y when y is a module, else X)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<top>"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in graph.items():
        a = layer_of(src)
        if a not in LAYERS:
            continue
        for dst in targets:
            b = layer_of(dst)
            if b == "<top>" or b not in LAYERS or LAYERS.index(b) > LAYERS.index(a):
                out.append(f"{src} -> {dst} ({a} may not import {b})")
    return sorted(out)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_package_is_a_known_layer():
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), f"packages not in LAYERS (or gone): {packages ^ set(LAYERS)}"


def test_the_top_level_holds_at_most_six_modules():
    top = {p.stem for p in PKG.glob("*.py")}
    assert len(top) <= 6 and top >= TOP_LEVEL, sorted(top)


def test_imports_follow_the_layers():
    graph = import_graph()
    assert "lowmem_r1.core.errors" in graph["lowmem_r1.config.recipe"]  # the graph is really read
    assert layer_violations(graph) == []


def test_no_import_cycle_anywhere():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_function_local_imports_count():
    graph = import_graph()
    # export.gguf imports its writer inside a function only
    assert "lowmem_r1.export.gguf_writer" in graph["lowmem_r1.export.gguf"]


@pytest.mark.parametrize("edge", [("lowmem_r1.core.errors", "lowmem_r1.core.fsutil"),
                                  ("lowmem_r1.data.tasks", "lowmem_r1.data.splits")])
def test_an_added_cycle_is_found(edge):
    """The checks can fail: one back edge added to the real graph makes a cycle (and, across packages, a
    layer violation)."""
    graph = import_graph()
    src, dst = edge
    assert find_cycle(graph) is None
    graph[src] = graph[src] | {dst}
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and src in cycle and dst in cycle


def test_an_upward_import_is_a_violation():
    graph = import_graph()
    graph["lowmem_r1.rewards.registry"] = graph["lowmem_r1.rewards.registry"] | {"lowmem_r1.training.run"}
    assert layer_violations(graph) == ["lowmem_r1.rewards.registry -> lowmem_r1.training.run "
                                       "(rewards may not import training)"]
