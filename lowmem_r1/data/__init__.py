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


from .formats import SYSTEM_PRESETS, answer_format, gold_completion  # noqa: E402
from .splits import Splits, load_splits  # noqa: E402

__all__ = ["TASK_COLUMNS", "task_columns", "SYSTEM_PRESETS", "answer_format", "gold_completion", "Splits",
           "load_splits"]
