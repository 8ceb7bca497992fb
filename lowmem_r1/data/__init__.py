"""Datasets: sources (hub, local files, generators), task adapters and prompt formats.

    load_splits(recipe, tokenizer=None) -> Splits(train, eval, dropped)
    gold_completion(row, recipe) -> str

Modules: sources (where rows come from), generators (arithmetic, countdown), tasks (row -> reward columns),
formats (system presets, user template, answer formats), splits (the pipeline), preview (`data preview`).
Importing this package is cheap: `datasets` and `transformers` load inside the functions that use them.
"""

from __future__ import annotations

TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("question", "answer"),
    "gsm8k": ("question", "answer", "solution"),
    "countdown": ("nums", "target"),
    "math": ("problem", "solution", "answer"),
}
"""Columns each task gives the rewards besides `prompt` (gsm8k `solution`: the worked solution without the
#### line and calculator annotations; math `answer`: the last \\boxed{} of the solution)."""


def task_columns(data) -> set[str] | None:
    """Columns a task gives the rewards (besides `prompt`); None when unknown before loading."""
    if data.task == "generic":
        return set(data.columns) or None
    return set(TASK_COLUMNS[data.task])


RAW_COLUMNS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("question", "answer"),
    "gsm8k": ("question", "answer"),
    "countdown": ("nums", "target"),
    "math": ("problem", "solution"),
}
"""Columns the rows of each task's usual source have (its hub dataset, its generator)."""


def check_prompt(recipe, source: str = "<recipe>") -> None:
    """Fail at validation time, not at data loading, on a user template naming a column a generated task
    lacks. Instant: no data is read; files and hub datasets may have more columns, so they are checked
    when loaded."""
    from .formats import check_template

    if recipe.prompt.user is None or not recipe.data.source.startswith("builtin:") or recipe.data.task == "generic":
        return
    fields = sorted(set(RAW_COLUMNS[recipe.data.task]) | set(TASK_COLUMNS[recipe.data.task]))
    try:
        check_template(recipe.prompt.user, fields)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


from ..errors import UserError  # noqa: E402
from .formats import SYSTEM_PRESETS, answer_format, gold_completion  # noqa: E402
from .splits import Splits, load_splits  # noqa: E402

__all__ = ["TASK_COLUMNS", "RAW_COLUMNS", "task_columns", "check_prompt", "SYSTEM_PRESETS", "answer_format", "gold_completion", "Splits",
           "load_splits"]
