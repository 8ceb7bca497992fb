"""Debugging a recipe's rewards before spending GPU hours: list them, score one completion, check that the
dataset's gold answers get full marks.

    reward_table()                         -> the registry as a table (`lowmem-r1 rewards list`)
    score_completion(recipe, text, row)    -> each reward and the weighted total (`rewards score`)
    check_gold(recipe, limit)              -> how many gold answers get full marks (`rewards check`)

Rewards are called through RecipeRewards (as in training and eval), except that a reward that raises is
reported in the table, whatever its on_error: this is a debugging tool.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem_r1.config.recipe import _parse_value
from lowmem_r1.core.errors import UserError
from lowmem_r1.data import gold_completion, load_splits
from lowmem_r1.data.preview import load_tokenizer
from lowmem_r1.rewards import REGISTRY, REQUIRED
from lowmem_r1.rewards.recipe_rewards import RecipeRewards, Reward, RewardError


def reward_table():
    """`lowmem-r1 rewards list`: name, dataset columns, full marks, parameters with defaults, description."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=escape("Rewards: in a recipe, [[rewards]] name = ..., weight = ..., <parameter> = ..."),
        show_lines=True,
        expand=True,
    )
    # Name, columns and full marks share the first column so the description keeps its width on an
    # 80-column terminal (or a pipe, which rich treats as one).
    table.add_column("reward", no_wrap=True)
    table.add_column("parameters (defaults)", no_wrap=True)
    table.add_column("what it scores", ratio=1)
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        params = "\n".join(
            f"{k}={'<required>' if v is REQUIRED else repr(v)}" for k, v in spec.params.items()
        )
        best = spec.full_marks()
        about = [f"[bold]{name}[/bold]"]
        if spec.columns:
            about.append(f"[dim]columns:[/dim] {', '.join(spec.columns)}")
        if best is not None:
            about.append(f"[dim]full marks:[/dim] {best:g}")
        table.add_row("\n".join(about), escape(params) or "-", escape(spec.description))
    return table


# --------------------------------------------------------------------------------------------------
# Building a recipe's rewards and calling them like TRL does


def _call(rewards: RecipeRewards, reward: Reward, prompts: list, completions: list, columns: dict,
          completion_ids=None) -> list:
    """One TRL-style call; a reward that raises is reported (`error: ...` strings), not fatal."""
    try:
        return rewards.call(reward, prompts, completions, on_error="raise", completion_ids=completion_ids,
                            **columns)[0]
    except RewardError as e:
        return [f"error: {e}"] * len(completions)


def _rows(recipe, tokenizer=None):
    return load_splits(recipe, tokenizer).train


def _tokenizer_if_needed(recipe):
    """The model's tokenizer when prompts need it (an assistant prefix is rendered with the chat template);
    then lengths are also measured in tokens. Otherwise None: lengths in characters, no model files read."""
    if not recipe.prompt.assistant_prefix:
        return None
    return load_tokenizer(recipe.model)


def _columns(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "prompt"}


def _ids(tokenizer, texts: list[str]):
    if tokenizer is None:
        return None
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# rewards score


@dataclass
class ScoreReport:
    row: dict
    prompt: Any
    completion: str
    scores: list[tuple[str, float, Any]]
    """(reward name, weight, score: float, None for not applicable, or an error string)."""
    rewards: RecipeRewards

    @property
    def total(self) -> float:
        """TRL's total: the weighted sum of the rewards that apply (None and errors are skipped)."""
        return self.rewards.total(s if _is_number(s) else None for _, _, s in self.scores)

    def render(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="Reward scores", show_footer=True)
        table.add_column("reward", footer="weighted total")
        table.add_column("score", justify="right")
        table.add_column("weight", justify="right")
        table.add_column("weighted", justify="right", footer=f"{self.total:.4g}")
        for name, w, s in self.scores:
            if _is_number(s):
                table.add_row(escape(name), f"{s:.4g}", f"{w:g}", f"{w * s:.4g}")
            else:
                table.add_row(
                    escape(name), "n/a (None)" if s is None else escape(str(s)[:120]), f"{w:g}", "-"
                )
        from rich.console import Group
        from rich.text import Text

        prompt = (
            self.prompt
            if isinstance(self.prompt, str)
            else "\n".join(
                f"[{m.get('role')}] {m.get('content')}" for m in self.prompt or [] if isinstance(m, dict)
            )
        )
        cols = ", ".join(f"{k}={_short(v)}" for k, v in self.row.items() if k != "prompt")
        return Group(
            Text(
                f"prompt:\n{_short(prompt, 600)}\ncolumns: {cols}\n"
                f"completion:\n{_short(self.completion, 600)}\n"
            ),
            table,
        )


def _short(v: Any, width: int = 120) -> str:
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= width else s[:width] + f"... ({len(s)} chars)"


def score_completion(recipe, completion: str, row_index: int = 0, columns: dict | None = None) -> ScoreReport:
    """Score one completion against the recipe's rewards and dataset row `row_index` (its prompt and reward
    columns; `columns` overrides or adds column values)."""
    tokenizer = _tokenizer_if_needed(recipe)
    rows = _rows(recipe, tokenizer)
    if not 0 <= row_index < len(rows):
        raise UserError(f"--row {row_index}: the training split has {len(rows)} rows; use 0..{len(rows) - 1}")
    row = dict(rows[row_index])
    row.update(columns or {})
    prompt = row.get("prompt")
    rewards = RecipeRewards.from_recipe(recipe)
    scores = []
    for r in rewards:
        out = _call(
            rewards,
            r,
            [prompt],
            [rewards.wrap(completion, prompt)],
            {k: [v] for k, v in _columns(row).items()},
            _ids(tokenizer, [completion]),
        )
        scores.append((r.name, r.weight, out[0]))
    return ScoreReport(row, prompt, completion, scores, rewards)


# --------------------------------------------------------------------------------------------------
# rewards check


@dataclass
class RewardCheck:
    name: str
    full_marks: float | None
    scored: int = 0
    not_applicable: int = 0
    at_full: int = 0
    total: float = 0.0
    errors: int = 0
    example: dict | None = None
    """The first gold answer that did not get full marks: row index, gold completion, score."""

    @property
    def share(self) -> float | None:
        return self.at_full / self.scored if self.scored else None

    @property
    def mean(self) -> float | None:
        return self.total / self.scored if self.scored else None


@dataclass
class CheckReport:
    rows: int
    min_share: float
    checks: list[RewardCheck] = field(default_factory=list)

    @property
    def failures(self) -> list[RewardCheck]:
        """Rewards with full marks that too few gold answers reach (errors always fail)."""
        return [
            c
            for c in self.checks
            if c.errors or (c.full_marks is not None and c.scored and (c.share or 0.0) < self.min_share)
        ]

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"Gold answers of {self.rows} row(s), written in the recipe's answer format")
        for col in ("reward", "full marks", "at full marks", "mean", "n/a", "verdict"):
            table.add_column(
                col, justify="left" if col in ("reward", "verdict") else "right", no_wrap=col != "verdict"
            )
        failing = {id(c) for c in self.failures}
        for c in self.checks:
            share = "-" if c.share is None else f"{c.at_full}/{c.scored} ({100 * c.share:.0f}%)"
            verdict = (
                "FAIL"
                if id(c) in failing
                else "ok"
                if c.full_marks is not None and c.scored
                else "shaping reward (no full marks)"
                if c.full_marks is None
                else "nothing to score"
            )
            table.add_row(
                escape(c.name),
                "-" if c.full_marks is None else f"{c.full_marks:g}",
                share if c.full_marks is not None else "-",
                "-" if c.mean is None else f"{c.mean:.4g}",
                str(c.not_applicable),
                verdict,
            )
        return table

    def explain(self) -> list[str]:
        """One paragraph per failing reward: what the gold looked like and what it scored."""
        lines = []
        for c in self.failures:
            if c.example is None:
                continue
            ex = c.example
            lines.append(
                f"{c.name}: row {ex['row']} scored {ex['score']!r} (full marks {c.full_marks}); "
                f"columns {ex['columns']}; gold completion:\n{ex['completion']}"
            )
        return lines


def check_gold(recipe, limit: int = 200, min_share: float = 0.9) -> CheckReport:
    """Score each row's gold answer (written by lowmem_r1.data.gold_completion in the recipe's answer format,
    after its assistant prefix) with every reward, in batches as TRL would, and count full marks."""
    if limit <= 0:
        raise UserError("--limit: must be positive")
    if not 0 <= min_share <= 1:
        raise UserError("--min-share: must be between 0 and 1")
    tokenizer = _tokenizer_if_needed(recipe)
    rows = _rows(recipe, tokenizer)
    n = min(limit, len(rows))
    rows = [dict(rows[i]) for i in range(n)]
    golds = [gold_completion(row, recipe) for row in rows]
    prompts = [row.get("prompt") for row in rows]
    rewards = RecipeRewards.from_recipe(recipe)
    completions = [rewards.wrap(g, p) for g, p in zip(golds, prompts)]
    columns = {k: [row.get(k) for row in rows] for k in (_columns(rows[0]) if rows else {})}
    ids = _ids(tokenizer, golds)
    report = CheckReport(n, min_share)
    for r in rewards:
        best = r.full_marks
        c = RewardCheck(r.name, best)
        for start in range(0, n, 64):
            end = min(n, start + 64)
            out = _call(
                rewards,
                r,
                prompts[start:end],
                completions[start:end],
                {k: v[start:end] for k, v in columns.items()},
                None if ids is None else ids[start:end],
            )
            for i, s in enumerate(out, start):
                if s is None:
                    c.not_applicable += 1
                    continue
                if not _is_number(s):
                    c.errors += 1
                    s_ok = False
                else:
                    c.scored += 1
                    c.total += s
                    s_ok = best is None or s >= best - 1e-9
                    c.at_full += int(best is not None and s_ok)
                if not s_ok and c.example is None:
                    c.example = {
                        "row": i,
                        "score": s,
                        "completion": golds[i][:600],
                        "columns": {k: v[i] for k, v in columns.items()},
                    }
        report.checks.append(c)
    return report


# --------------------------------------------------------------------------------------------------
# Command-line inputs


def read_completion(text: str | None, file: str | None) -> str:
    """The completion to score: the TEXT argument, or the contents of --file (`-`: standard input)."""
    if (text is None) == (file is None):
        raise UserError("rewards score: give the completion as TEXT or --file PATH (one of them)")
    if text is not None:
        return text.replace("\\n", "\n").replace("\\t", "\t")
    path = Path(file)
    if file != "-" and path.is_dir():
        raise UserError(f"--file {file}: a folder; pass a text file holding one completion")
    if file != "-" and not path.is_file():
        raise UserError(f"--file {file}: not found; pass a text file holding one completion")
    stdin = getattr(sys.stdin, "buffer", None)
    data = (stdin.read() if stdin else sys.stdin.read().encode()) if file == "-" else path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise UserError(f"--file {'stdin' if file == '-' else file}: binary data, not UTF-8 text; pass a text file "
                        f"holding one completion")
    return text


def parse_columns(items: list[str] | None) -> dict:
    """`--column answer=8 --column nums=[1,2,3]`: values as TOML literals when they parse, else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--column {item!r}: expected name=value, e.g. --column answer=8")
        out[key.strip()] = _parse_value(value.strip())
    return out
