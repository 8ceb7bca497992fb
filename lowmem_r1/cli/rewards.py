"""`lowmem-r1 rewards ...`: the reward library (list), one completion scored (score), gold answers checked
against the recipe's rewards (check)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from lowmem_r1.cli.options import SetOpt
from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.preflight.rewards_check import (
    check_gold,
    parse_columns,
    read_completion,
    reward_table,
    score_completion,
)

app = typer.Typer(help="The reward library: list, score, check.", no_args_is_help=True)


@app.command("list")
def rewards_list() -> None:
    """Every builtin reward: parameters (defaults), dataset columns, full marks, what it scores."""
    Console().print(reward_table())


@app.command("score")
def rewards_score(
    recipe: Path = typer.Argument(..., help="Recipe TOML file (its rewards, weights and dataset)."),
    text: Optional[str] = typer.Argument(None, help="The completion to score (\\n for newlines), or use --file."),
    file: Optional[str] = typer.Option(None, "--file", "-f", help="Read the completion from a file ('-': stdin)."),
    row: int = typer.Option(0, "--row", help="Dataset row whose prompt and columns to score against."),
    column: Optional[List[str]] = typer.Option(None, "--column", "-c", help="Override a column: name=value."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Score one completion with the recipe's rewards: each reward, its weight, the weighted total."""
    r = load_recipe(recipe, set_ or [])
    report = score_completion(r, read_completion(text, file), row_index=row, columns=parse_columns(column))
    Console().print(report.render())


@app.command("check")
def rewards_check(
    recipe: Path = typer.Argument(..., help="Recipe TOML file."),
    limit: int = typer.Option(200, "--limit", help="How many dataset rows to check."),
    min_share: float = typer.Option(0.9, "--min-share", help="Fail when fewer gold answers get full marks."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Score the dataset's gold answers (in the recipe's answer format): correct answers must get full marks."""
    report = check_gold(load_recipe(recipe, set_ or []), limit=limit, min_share=min_share)
    Console().print(report.render())
    for line in report.explain():
        print(line)
    if not report.ok:
        print(f"FAIL: {', '.join(c.name for c in report.failures)}: gold answers do not get full marks; fix the "
              f"reward parameters or the prompt's answer format before training")
        raise typer.Exit(1)
    print("ok: every reward with full marks gives them to the gold answers")
