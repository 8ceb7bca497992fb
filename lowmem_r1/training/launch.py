"""Several processes (GPUs, nodes) for one recipe, on the ecosystem's launchers - never a home-made one.

`lowmem-r1 train RECIPE --nproc N` (or `distributed.nproc = N`) re-runs the same command as N processes:
under torch.distributed's launcher (torchrun) for DDP, under accelerate's for DeepSpeed ZeRO / FSDP2, with
the strategy's config file from lowmem_r1/configs/accelerate/. The plain forms do the same:

    torchrun --nproc_per_node N -m lowmem_r1 train RECIPE
    accelerate launch --config_file lowmem_r1/configs/accelerate/zero2.yaml -m lowmem_r1 train RECIPE

Inside, every process reads who it is from the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE);
only the main process (global rank 0) writes the run directory. This module also holds the settings that
cannot run together on several processes, refused before anything loads (--dry-run too).
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

from lowmem_r1.config.stages import STAGES
from lowmem_r1.core.distributed import DEEPSPEED, SHARDED, batch_problem
from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_write_json
from lowmem_r1.runs.rundir import RunDir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
STRATEGY_CONFIG = {"ddp": "ddp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml", "fsdp2": "fsdp2.yaml"}
# Seconds torchrun lets the processes finish a step and checkpoint after Ctrl-C (its default, 30, is short).
SHUTDOWN_TIMEOUT = 600
















# --------------------------------------------------------------------------------------------------
# What several processes cannot run (refused in --dry-run too)




def problems(recipe, world_size: int, backend: str, machine: bool = True) -> list[str]:
    """Why `recipe` cannot run as `world_size` processes on backend `backend`: one line each, naming the key
    and the way out. `machine`: also what this machine lacks (DeepSpeed, CUDA), asked at run time and by
    --dry-run on a CUDA machine."""
    d, m = recipe.distributed, recipe.model
    out = []
    why = batch_problem(recipe.training, world_size)
    if why and STAGES[recipe.stage].rewarded:
        out.append(f"training.num_generations: {why}")
    if world_size <= 1:
        return out
    s = d.strategy
    if recipe.training.dynamic_sampling != "off":
        out.append(f"training.dynamic_sampling = '{recipe.training.dynamic_sampling}': one process only (each "
                   f"process would drop or refill its own groups and the processes' collectives would fall out of "
                   f"step; lowmem_r1/training/grpo/dynamic_sampling.py); --set training.dynamic_sampling=off, or train on one process")
    if m.load_in_4bit and s in SHARDED and not m.bnb_4bit_quant_storage:
        out.append(f"model.bnb_4bit_quant_storage: distributed.strategy = '{s}' shards 4-bit weights only when "
                   f"they are stored in the compute dtype; --set model.bnb_4bit_quant_storage=bfloat16 (or the "
                   f"model's dtype), or --set distributed.strategy=ddp")
    if backend == "unsloth" and m.fast_inference:
        out.append("model.fast_inference: Unsloth's colocated vLLM engine hangs or fails with several processes "
                   "(unslothai/unsloth#4559); --set model.backend=hf (TRL's vLLM), or --set model.fast_inference=false "
                   "with generation.use_vllm=true and generation.vllm_mode='server' (vLLM on its own GPUs)")
    if backend == "unsloth" and s in SHARDED:
        out.append(f"distributed.strategy = '{s}': Unsloth documents multi-GPU training with DDP only "
                   f"(unsloth.ai/docs/basics/multi-gpu-training-with-unsloth); --set distributed.strategy=ddp, "
                   f"or --set model.backend=hf")
    if machine and s != "ddp":
        import torch

        if not torch.cuda.is_available():
            out.append(f"distributed.strategy = '{s}': DeepSpeed and FSDP need CUDA GPUs and this machine has none; "
                       f"--set distributed.strategy=ddp (gloo on CPU)")
        elif s in DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
            out.append(f"distributed.strategy = '{s}': deepspeed is not installed; pip install deepspeed, or --set "
                       f"distributed.strategy=fsdp2 (PyTorch's own sharding) or ddp")
    return out


def check(recipe, world_size: int, backend: str, machine: bool = True, source: str | None = None) -> None:
    found = problems(recipe, world_size, backend, machine)
    if found:
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{source}: " * bool(source) + found[0] + more)


# --------------------------------------------------------------------------------------------------
# `train --nproc N`: this command again, as N processes


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without --nproc N / --nproc=N (the children are already N)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def command(recipe, nproc: int, argv: list[str]) -> list[str]:
    """The launcher command line: torchrun for DDP (gloo on CPU, NCCL on GPUs; a free port on this node),
    accelerate's launcher with the strategy's config file for DeepSpeed / FSDP2."""
    args = ["-m", "lowmem_r1", *strip_nproc(argv)]
    strategy = recipe.distributed.strategy
    if strategy == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                f"--shutdown_timeout={SHUTDOWN_TIMEOUT}", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(CONFIGS / STRATEGY_CONFIG[strategy]), f"--num_processes={nproc}", *args]


def run(recipe, nproc: int, argv: list[str], run_dir: Path, resume_hint: str) -> int:
    """Run the launcher as a child and return its exit code. Ctrl-C: this parent ignores it; torchrun (whose
    workers sit in sessions of their own, out of the terminal's reach) passes it on to every process once,
    and they stop together at the end of the step with a checkpoint, within SHUTDOWN_TIMEOUT. When the main
    process died without saying so (run.json still `running`), this says it once, with the resume command;
    otherwise the main process already did."""
    cmd = command(recipe, nproc, argv)
    print(f"launching {nproc} processes: {' '.join(cmd)}", flush=True)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = subprocess.call(cmd)
    finally:
        signal.signal(signal.SIGINT, previous)
    if code != 0:
        code = report_stop(run_dir, code, resume_hint)
    return code


def report_stop(run_dir: Path, code: int, resume_hint: str) -> int:
    run = RunDir(run_dir)
    try:
        info = run.info() if run.exists() else None
    except UserError:
        info = None
    if info is not None and info.get("status") == "interrupted":
        return 130  # Ctrl-C: the main process checkpointed and said how to resume
    if info is not None and info.get("status") == "running":
        info.update(status="failed", error=f"a training process died (launcher exit code {code})")
        atomic_write_json(run.info_file, info)
        print(f"error: a training process died (launcher exit code {code}) at step {info.get('global_step', 0)} or "
              f"later; run.json marked failed; resume from the last complete checkpoint with: {resume_hint}",
              file=sys.stderr)
    return code if code > 0 else 1


def describe(recipe, nproc: int, argv: list[str]) -> list[str]:
    """What --dry-run says about the launch."""
    d, t = recipe.distributed, recipe.training
    total = t.per_device_train_batch_size * t.gradient_accumulation_steps * nproc
    lines = [f"processes: {nproc} (distributed.strategy = '{d.strategy}'), {total} completions per step "
             f"({total // t.num_generations} prompts x {t.num_generations} generations) across them",
             f"would launch: {' '.join(command(recipe, nproc, [a for a in argv if a != '--dry-run']))}"]
    if d.strategy in DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
        lines.append("note: deepspeed is not installed here; the launch stops until it is (pip install deepspeed)")
    return lines
