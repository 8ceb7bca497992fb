"""The export package's import graph: dependencies run one way (no cycle, not even through imports
inside functions), every module imports alone in a fresh interpreter, and importing one loads no heavy
library (`lowmem-r1 merge --help` and bad-input errors stay instant)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import lowmem_r1.export as pkg

PKG_DIR = Path(pkg.__file__).parent
MODULES = sorted(m.name for m in pkgutil.iter_modules([str(PKG_DIR)]))
HEAVY = ("torch", "transformers", "peft", "gguf", "safetensors", "tokenizers", "numpy")


def _local_imports(name: str) -> set[str]:
    """Sibling modules `name` imports anywhere in its source (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse((PKG_DIR / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowmem_r1.export"):
            rest = node.module[len("lowmem_r1.export"):].lstrip(".")
            if rest:
                found.add(rest.split(".")[0])
            else:  # from lowmem_r1.export import x
                found.update(a.name for a in node.names)
    return found & set(MODULES)


def test_export_import_graph_has_no_cycle():
    graph = {m: _local_imports(m) for m in MODULES}
    assert graph["command"] and not graph["safetensors_io"]  # the graph is really read
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join((*path, m))}"
        if m not in done:
            for dep in sorted(graph[m]):
                visit(dep, (*path, m))
            done.add(m)

    for m in MODULES:
        visit(m, ())
    assert not any("command" in deps for deps in graph.values())  # nothing reaches back up


def test_each_export_module_imports_alone_without_heavy_libraries():
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    for name in MODULES:
        proc = subprocess.run([sys.executable, "-c", code, f"lowmem_r1.export.{name}"],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-800:]}"
        loaded = json.loads(proc.stdout)
        # gguf_writer subclasses gguf's writer, so it alone loads gguf (and numpy); gguf.py imports it lazily
        assert loaded == (["gguf", "numpy"] if name == "gguf_writer" else []), name
