"""The trainer of each stage kind that config/stages.py names: how it is built and what --dry-run shows.

Every entry's `build(recipe, run, backend, model, tokenizer, callbacks, console, checkpoint, display)` returns
a TRL trainer whose checkpoints are staged (training/checkpoints.py); training/run.py does the rest (model,
run directory, status, adapter) the same for every kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lowmem_r1.training import sft
from lowmem_r1.training.grpo import stage as grpo


@dataclass(frozen=True)
class StageTrainer:
    build: Callable
    plan_rows: Callable[[object], list[tuple[str, str]]]
    """The numbers --dry-run shows for a recipe of this kind, as (label, value) rows."""


TRAINERS: dict[str, StageTrainer] = {
    "grpo": StageTrainer(grpo.build_trainer, grpo.plan_rows),
    "sft": StageTrainer(sft.build_trainer, sft.plan_rows),
}
