"""Pick and build the backend for a recipe. Apart from the package's checks (lowmem_r1/models/backends/
__init__.py) because it imports both backends, and they import the package: kept one way, no cycle.
The checks are called through the package so that tests can replace a machine probe in one place."""

from __future__ import annotations

from lowmem_r1.models import backends
from lowmem_r1.models.backends.hf import HFBackend
from lowmem_r1.models.backends.unsloth import UnslothBackend


def select(recipe):
    """The backend object for a recipe, after checking this machine can run it (one-line UserError with
    the fix if not) and logging every fallback. Imports unsloth here (backend.prepare()), before anything
    imports trl - and before anything initialises CUDA (the capability probe in backends.requirements()
    does), since unsloth sets the allocator's environment on import."""
    name, why = backends.choose(recipe.model.backend)
    if name == "unsloth" and backends.unsloth_installed():
        backend = UnslothBackend(standby=recipe.model.vllm_standby)
        backends.refuse(backends.combination_problems(recipe, name))  # machine-independent: before the import
        backend.prepare()
    else:
        backend = HFBackend()
    backends.refuse(backends.requirements(recipe, name))
    for note in backends.fallbacks(recipe, name):
        backends.log.warning(note)
    backend.why = why  # said on the run's first line
    return backend
