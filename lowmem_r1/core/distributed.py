"""Who this process is in a job of several (torchrun, accelerate launch) and the few collectives the toolkit
needs: one process is rank 0 of 1 and every call here is then a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import gcd

from lowmem_r1.core.errors import UserError

DEEPSPEED = ("zero2", "zero3")


SHARDED = ("zero3", "fsdp2")  # the weights themselves are split across processes


@dataclass(frozen=True)
class World:
    """This process's place in the job, as the launcher set it (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    env = os.environ
    try:
        return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    except ValueError:
        raise UserError(f"RANK/LOCAL_RANK/WORLD_SIZE = {env.get('RANK')}/{env.get('LOCAL_RANK')}/"
                        f"{env.get('WORLD_SIZE')}: not integers; start the job with torchrun or accelerate launch") from None


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ


def init_process_group() -> None:
    """Join the job's process group now (a no-op for one process), the way the Trainer would later
    (accelerate's PartialState: gloo on CPU, NCCL on GPUs, DeepSpeed's when accelerate launched it); the
    Trainer then reuses it. Early, so that the main process can prepare the run directory while the
    others wait at a barrier."""
    if world().size <= 1:
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every process (nothing to wait for with one)."""
    if world().size <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """The main process's `obj`, on every process."""
    if world().size <= 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def any_process(flag: bool, device=None) -> bool:
    """True on every process when `flag` is True on any (a Ctrl-C that reached one process stops all at
    the same step instead of leaving the others waiting in the next step's all-reduce)."""
    if world().size <= 1:
        return flag
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def batch_problem(training, world_size: int) -> str | None:
    """TRL 1.15's GRPOConfig check: the generation batch, per_device_train_batch_size x
    gradient_accumulation_steps x processes, must hold whole groups of num_generations. With the valid
    values listed."""
    t = training
    per = t.per_device_train_batch_size * t.gradient_accumulation_steps
    total = per * world_size
    if total % t.num_generations == 0:
        return None
    generations = [n for n in range(2, total + 1) if total % n == 0]
    step = t.num_generations // gcd(t.num_generations, t.gradient_accumulation_steps * world_size)
    sizes = ", ".join(str(step * i) for i in range(1, 4))
    procs = f" x {world_size} processes" if world_size > 1 else ""
    return (f"per_device_train_batch_size {t.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{t.gradient_accumulation_steps}{procs} = {total} completions per step cannot be split into groups of "
            f"num_generations = {t.num_generations}; valid num_generations: {', '.join(map(str, generations)) or 'none'}; "
            f"or make per_device_train_batch_size a multiple of {step} ({sizes}, ...)")
