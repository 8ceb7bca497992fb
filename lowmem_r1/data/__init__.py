"""Datasets: sources (hub, local files, generators), task adapters and prompt formats.

    load_splits(recipe, tokenizer=None) -> Splits(train, eval, dropped)
    gold_completion(row, recipe) -> str

Modules: sources (where rows come from), generators (arithmetic, countdown), tasks (the task registry:
columns, row adapter, default prompt, gold answer and default rewards of each task),
formats (system presets, user template, answer formats), splits (the pipeline), preview (`data preview`).
Importing this package is cheap: `datasets` and `transformers` load inside the functions that use them.
"""

from __future__ import annotations

from ..errors import UserError
from .formats import SYSTEM_PRESETS, answer_format, check_template, gold_completion
from .splits import Splits, load_splits
from .tasks import TASKS, Task, get_task


def check_prompt(recipe, source: str = "<recipe>") -> None:
    """Fail at validation time, not at data loading, on a user template naming a column a generated task
    lacks. Instant: no data is read; files and hub datasets may have more columns, so they are checked
    when loaded."""
    task = get_task(recipe.data)
    if recipe.prompt.user is None or not recipe.data.source.startswith("builtin:") or task.name == "generic":
        return
    fields = sorted(set(task.raw_columns) | set(task.columns))
    try:
        check_template(recipe.prompt.user, fields)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


__all__ = ["TASKS", "Task", "get_task", "check_prompt", "SYSTEM_PRESETS", "answer_format", "gold_completion", "Splits",
           "load_splits"]
