"""The commands that run a model: `lowmem-r1 chat` (talk to it), `lowmem-r1 eval` (score it on held-out
prompts), `lowmem-r1 sample` (rejection sampling / distillation data)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from lowmem_r1.cli.options import EngineOpt, SetOpt
from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.data import TASKS
from lowmem_r1.generation.chat import ChatOptions
from lowmem_r1.generation.chat import chat as run_chat
from lowmem_r1.generation.engine import Decoding
from lowmem_r1.generation.evaluate import EvalSettings
from lowmem_r1.generation.rejection import SampleSettings, print_result
from lowmem_r1.generation.rejection import sample as run_sample
from lowmem_r1.pipeline.command import evaluate_command


def chat(
    model: Optional[str] = typer.Argument(
        None, help="Run directory, merged folder, .gguf file, hub id or builtin alias (default: the newest in runs/)."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer once and exit: the answer alone on stdout."),
    compare: Optional[str] = typer.Option(
        None, "--compare", help="Ask a second model too, side by side; `base` = the run's base model.",
    ),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the run's trained one)."),
    think: bool = typer.Option(True, "--think/--no-think", help="Show the <think>/<reasoning> part (dimmed)."),
    temperature: float = typer.Option(0.6, "--temperature", "-t", min=0, help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p", min=0, max=1),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1),
    seed: Optional[int] = typer.Option(None, "--seed"),
    engine: str = EngineOpt,
) -> None:
    """Talk to a model: tokens stream as generated, reasoning dimmed and apart. /reset /system /think /exit."""
    opts = ChatOptions(Decoding(temperature, top_p, max_new_tokens, seed), system=system, think=think, engine=engine)
    raise typer.Exit(run_chat(model, opts, prompt=prompt, compare=compare))


def eval_(
    target: str = typer.Argument(..., help="Run directory, recipe .toml, or a model (with --data and --task)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also score the base model; print the difference."),
    model: Optional[str] = typer.Option(None, "--model", help="Model to score on a recipe's eval split."),
    data: Optional[str] = typer.Option(None, "--data", help="Eval file (jsonl/json/parquet/csv) or hub dataset."),
    task: Optional[str] = typer.Option(None, "--task", help=" | ".join(TASKS) + "."),
    reward: Optional[List[str]] = typer.Option(None, "--reward", help="Score these rewards instead (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Prompts to score (default: eval.size)."),
    samples: int = typer.Option(1, "--samples", "-k", min=1, help="Samples per prompt: pass@k and maj@k."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0, help="Default: greedy (k=1)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Completions per batch."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: RUN_DIR/eval/<time>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    engine: str = EngineOpt,
) -> None:
    """Score a model on held-out prompts: strict and lenient accuracy, each reward, length (+ base model)."""
    settings = EvalSettings(samples=samples, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, baseline=baseline, engine=engine, out=out,
                            force=force)
    evaluate_command(target, settings, model=model, data=data, task=task, rewards=reward or None)


def sample(
    model: str = typer.Argument(..., help="Model to sample from: run directory, merged folder, hub id or builtin alias."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe whose prompts (data, prompt) and rewards are used."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (samples.jsonl, pass_rates.jsonl, ...)."),
    k: int = typer.Option(4, "-k", min=1, help="Completions generated per prompt."),
    keep: int = typer.Option(1, "--keep", min=1, help="At most this many kept (deduplicated) completions per prompt."),
    min_reward: Optional[float] = typer.Option(
        None, "--min-reward", help="Keep completions whose weighted reward total reaches this (default: full marks on "
        "the correctness reward)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Prompts to sample (default: all)."),
    split: str = typer.Option("train", "--split", help="train | eval: which of the recipe's splits."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.01),
    top_p: float = typer.Option(0.95, "--top-p", min=0, max=1),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Completions per generation batch."),
    seed: int = typer.Option(0, "--seed"),
    grpo_prompts: bool = typer.Option(False, "--grpo-prompts", help="Also write grpo_prompts.jsonl: the prompts "
                                      "some but not all samples solved (groups that give GRPO a learning signal)."),
    force: bool = typer.Option(False, "--force", help="Start over in an --out folder sampled with other settings."),
    set_: Optional[List[str]] = SetOpt,
    engine: str = EngineOpt,
) -> None:
    """Rejection sampling / distillation data: k completions per prompt, scored by the recipe's rewards; keeps
    those that pass as SFT-ready JSONL. Resumable: a rerun skips prompts already sampled."""
    settings = SampleSettings(k=k, keep=keep, min_reward=min_reward, limit=limit, split=split, temperature=temperature,
                              top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                              engine=engine, grpo_prompts=grpo_prompts, force=force)
    result = run_sample(model, load_recipe(recipe, set_ or []), out, settings)
    print_result(result, k, Console())
