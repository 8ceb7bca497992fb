"""Every module of the package imports without loading a heavy library: `--help` and `--dry-run` stay
instant, and Unsloth can still patch trl before anything imports it. Each module is imported in a fresh
interpreter, so one module cannot hide another's import."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import lowmem_r1

HEAVY = ("torch", "transformers", "trl", "peft", "unsloth", "vllm", "datasets")
MODULES = sorted(m.name for m in pkgutil.walk_packages(lowmem_r1.__path__, "lowmem_r1."))

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, str]:
    """Module -> the heavy libraries importing it loaded (JSON), or its error. A few interpreters run side
    by side: a probe mostly waits on the disk."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(MODULES, pool.map(probe, MODULES)))


def probe(module: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, module, *HEAVY], capture_output=True, text=True,
                          timeout=300)
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else f"error: {done.stderr[-2000:]}"


def test_the_walk_finds_the_package_and_the_probe_sees_a_heavy_import():
    assert probe("torch.nn") == '["torch"]'
    assert {"lowmem_r1.cli", "lowmem_r1.training.run", "lowmem_r1.rewards.registry", "lowmem_r1.data.tasks"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_no_heavy_library(loaded, module):
    assert loaded[module] == "[]", f"importing {module} loaded {loaded[module]}"
