"""Datasets: sources (hub, local files, generators), task adapters and prompt formats.

    load_splits(recipe, tokenizer=None) -> Splits(train, eval, dropped)
    gold_completion(row, recipe) -> str

Modules: sources (where rows come from), generators (arithmetic, countdown), tasks (the task registry:
columns, row adapter, default prompt, gold answer and default rewards of each task),
formats (system presets, user template, answer formats), splits (the pipeline), preview (`data preview`).
Importing this package is cheap: `datasets` and `transformers` load inside the functions that use them.
"""

from __future__ import annotations

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.formats import SYSTEM_PRESETS, answer_format, check_template, gold_completion
from lowmem_r1.data.splits import Splits, load_splits
from lowmem_r1.data.tasks import TASKS, Task, get_task


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


def check_task_rows(recipe, rows: list[dict], where: str) -> None:
    """Rows the recipe's task can use, judged by the task's own adapter (what loading does), on the first
    rows of a local file: a source whose columns the task cannot read fails at --dry-run, in one line."""
    task = get_task(recipe.data)
    adapt = task.adapter(recipe.data)
    try:
        usable = any(_adapts(adapt, row) for row in rows[:100])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if not usable:
        need = f" (it reads {list(task.raw_columns)})" if task.raw_columns else ""
        raise UserError(f"{where}: data.source {recipe.data.source}: no row that task '{task.name}'{need} can use; the "
                        f"rows have columns {sorted(rows[0])}: set data.task (or map data.columns) to match the data")


def _adapts(adapt, row: dict) -> bool:
    try:
        return adapt(row) is not None
    except (KeyError, TypeError, ValueError):
        return False


__all__ = ["TASKS", "Task", "get_task", "check_prompt", "check_task_rows", "SYSTEM_PRESETS", "answer_format",
           "gold_completion", "Splits", "load_splits"]
