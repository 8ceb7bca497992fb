"""`lowmem-r1 report`: a run's curves plotted and summarized (a multi-stage run's stages, each)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowmem_r1.pipeline.command import report_command


def report(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest in runs/)."),
    samples: int = typer.Option(2, "--samples", min=0, help="Sample completions shown from the start and the end."),
) -> None:
    """Plot a run's curves to RUN_DIR/report/*.png and summarize it (works while training runs)."""
    report_command(run_dir, per_end=samples)
