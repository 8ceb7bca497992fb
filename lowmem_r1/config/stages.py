"""The kinds of training stage a recipe's `stage` may name, and what each asks of the recipe.

Validated with the schema (so `--dry-run` refuses an unknown kind, or a stage's unreadable data, before
anything loads). The trainer of each kind is in lowmem_r1/training/stages.py under the same name.
Adding a stage: one StageKind here, one module with its trainer, one entry there (docs/development.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lowmem_r1.data import check_task_rows
from lowmem_r1.data.sft import check_sft_data
from lowmem_r1.data.sources import peek_rows


@dataclass(frozen=True)
class StageKind:
    name: str
    headline: str
    """The number each step is judged by in the live display ("reward" or "loss")."""
    rewarded: bool
    """Trains on [[rewards]] with groups of num_generations completions per prompt (GRPO): needs a reward,
    whole groups per batch, and [generation] applies."""
    check_data: Callable[[object, str], None]
    """(recipe, source) -> None, or a one-line UserError: the data checks that need nothing heavy."""


def check_prompt_rows(recipe, source: str) -> None:
    """A local file GRPO's task cannot read fails here."""
    rows = peek_rows(recipe.data.source, source, limit=100)
    if rows is not None:
        check_task_rows(recipe, rows, source)


STAGES: dict[str, StageKind] = {
    kind.name: kind for kind in (
        # GRPO: completions sampled in groups and scored by [[rewards]]
        StageKind("grpo", headline="reward", rewarded=True, check_data=check_prompt_rows),
        # SFT on traces: cold start, rejection-sampled or distilled data
        StageKind("sft", headline="loss", rewarded=False, check_data=check_sft_data),
    )
}
