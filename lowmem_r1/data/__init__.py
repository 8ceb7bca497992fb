"""Datasets: sources (hub, local files, generators), task adapters and prompt formats.

Importing this package is cheap: `datasets` loads inside the functions that read data.
"""

from __future__ import annotations

TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("answer",),
    "gsm8k": ("question", "answer"),
    "countdown": ("nums", "target"),
    "math": ("problem", "solution", "answer"),
}


def task_columns(data) -> set[str] | None:
    """Columns a task gives the rewards (besides `prompt`); None when unknown before loading."""
    if data.task == "generic":
        return set(data.columns) or None
    return set(TASK_COLUMNS[data.task])
