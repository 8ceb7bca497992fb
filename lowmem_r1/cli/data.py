"""`lowmem-r1 data ...`: generate task files, preview prompts as the model sees them."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowmem_r1.cli.options import SetOpt
from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.data.generators import write_countdown
from lowmem_r1.data.preview import preview

app = typer.Typer(help="Datasets: generate tasks, preview prompts.", no_args_is_help=True)


@app.command("countdown")
def data_countdown(
    n: int = typer.Option(5000, "--n", help="Number of puzzles."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl file (rows: nums, target, solution)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same file)."),
    min_numbers: int = typer.Option(3, "--min-numbers", help="Fewest numbers per puzzle."),
    max_numbers: int = typer.Option(4, "--max-numbers", help="Most numbers per puzzle."),
    max_number: int = typer.Option(99, "--max-number", help="Largest number drawn (from 1)."),
    max_target: int = typer.Option(100, "--max-target", help="Largest target."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Generate solvable Countdown puzzles (use as data.source with task = "countdown")."""
    count = write_countdown(out, n=n, seed=seed, force=force, min_numbers=min_numbers, max_numbers=max_numbers,
                            max_number=max_number, max_target=max_target)
    print(f"wrote {count} puzzles to {out}")


@app.command("preview")
def data_preview(
    recipe: Path = typer.Argument(..., help="Recipe TOML file."),
    n: int = typer.Option(3, "-n", help="How many prompts to show."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Show prompts exactly as the model will see them, their reward columns and token lengths."""
    print(preview(load_recipe(recipe, set_ or []), n=n))
