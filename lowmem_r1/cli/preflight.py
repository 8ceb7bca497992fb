"""`lowmem-r1 plan` (will it fit: memory from the model's config, or measured) and `lowmem-r1 doctor` (can it
run here)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowmem_r1.cli.options import SetOpt
from lowmem_r1.pipeline.command import plan_command
from lowmem_r1.preflight.doctor import doctor as run_doctor


def plan(
    recipe: Path = typer.Argument(..., help="Recipe TOML file."),
    gpu_memory: Optional[float] = typer.Option(
        None, "--gpu-memory", help="Card memory in GiB (default: the detected GPU, else 24)."
    ),
    set_: Optional[List[str]] = SetOpt,
    measure: bool = typer.Option(
        False, "--measure", help="Also run two GRPO steps on random weights here and print the measured peak."
    ),
    gpus: Optional[int] = typer.Option(
        None, "--gpus", help="Training processes (GPUs): memory per GPU (default: distributed.nproc); a vLLM "
        "server's GPUs come on top."),
    strategy: Optional[str] = typer.Option(
        None, "--strategy", help="ddp | zero2 | zero3 | fsdp2: what is sharded over --gpus (default: "
        "distributed.strategy)."),
) -> None:
    """Estimate peak GPU memory from the model's config (no weights downloaded): breakdown, verdict, and
    the largest num_generations / max_completion_length that fit; --measure measures it on this machine.
    With --gpus/--strategy per GPU of a sharded run; with vllm_mode = "server" the server's GPUs too."""
    plan_command(recipe, set_ or [], gpu_memory, measure=measure, gpus=gpus, strategy=strategy)


def doctor(
    recipe: Optional[Path] = typer.Argument(None, help="Also check that this recipe can run here."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Check Python, torch, the GPU, library versions, backend choice and disk; exit 1 if something is red."""
    raise typer.Exit(run_doctor(str(recipe) if recipe else None, set_ or []))
