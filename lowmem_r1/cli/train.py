"""`lowmem-r1 train` and `lowmem-r1 serve` (the vLLM server a training run generates on)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lowmem_r1.cli.options import SetOpt
from lowmem_r1.generation.serve import SERVER_GPU_MEMORY_UTILIZATION, ServeSettings, parse_gpus
from lowmem_r1.generation.serve import serve as run_serve
from lowmem_r1.pipeline.command import train_command


def train(
    recipe: Path = typer.Argument(..., help="Recipe TOML file (see recipes/)."),
    run_dir: Optional[str] = typer.Argument(None, help="With --resume: the run directory (default: the recipe's)."),
    set_: Optional[List[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print the resolved recipe and exit."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last complete checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start a new run over an existing run directory."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="Processes (GPUs) on this node: runs this command under torchrun (DDP) or "
        "accelerate (distributed.strategy). Default: distributed.nproc."),
) -> None:
    """Train a recipe (GRPO, or stage = "sft"), or every stage of a [[stages]] pipeline; writes run directories."""
    raise typer.Exit(train_command(recipe, run_dir, set_ or [], dry_run=dry_run, resume=resume, force=force,
                                   nproc=nproc, argv=sys.argv[1:]))


def serve(
    recipe: Path = typer.Argument(..., help="Recipe TOML file, or a run directory (its recipe, for --resume)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPUs for the server, e.g. 0 or 0,1 "
                                       "(CUDA_VISIBLE_DEVICES; default: all this process sees)."),
    tp: Optional[int] = typer.Option(None, "--tp", min=1, help="Tensor-parallel GPUs (default: "
                                     "generation.vllm_tensor_parallel_size)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default: "
                                       "generation.vllm_server_host; 0.0.0.0 for every interface)."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                       help="Port (default: generation.vllm_server_port)."),
    gpu_memory_utilization: float = typer.Option(
        SERVER_GPU_MEMORY_UTILIZATION, "--gpu-memory-utilization",
        help="Share of each server GPU for vLLM's weights + KV cache (TRL's vllm-serve default)."),
    set_: Optional[List[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check, print the server's command and exit."),
) -> None:
    """Start TRL's vLLM server (trl vllm-serve) for the recipe's model on GPUs of its own, for
    generation.vllm_mode = "server": training then generates there and pushes its weights to it."""
    settings = ServeSettings(gpus=parse_gpus(gpus), tp=tp, host=host, port=port,
                             gpu_memory_utilization=gpu_memory_utilization)
    raise typer.Exit(run_serve(recipe, settings, set_ or [], dry_run=dry_run))
