"""Rewards as the trainer calls them: guarded against failing user code, and recorded to
completions.jsonl.

A reward that raises either stops the run cleanly (the default: the error names the reward, shows the
completion that broke it and the user's traceback) or, with `on_error = "skip"`, scores that call None
(TRL: not applicable) and counts the failure in the metrics as `reward_errors/<name>`.
"""

from __future__ import annotations

import json
import math
import random
import traceback
from pathlib import Path

from .faults import maybe_fault
from .rewards import build
from .rewards.extract import completion_text
from .rewards.extract import prompt_text as _prompt_text


class RewardFailure(Exception):
    """A reward raised during training; the message is ready to show the user."""


class BadRewardValues(ValueError):
    """A reward returned something that is not one finite number (or None) per completion."""


def prompt_text(prompt) -> str:
    """The user's words (the last user turn of a conversation), for completions.jsonl."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return _prompt_text(users[-1:] or prompt)
    return _prompt_text(prompt)


def _short(text: str, n: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def guard_rewards(recipe, recorder: "RewardRecorder"):
    """Build the recipe's rewards as guarded, recorded TRL reward functions, and their weights."""
    names = unique_names([e.name for e in recipe.rewards])
    recorder.names = names
    recorder.weights = weights = [e.weight for e in recipe.rewards]
    funcs = [
        _guard(build(e.name, **e.params), name, e.on_error, recorder, i)
        for i, (e, name) in enumerate(zip(recipe.rewards, names))
    ]
    return funcs, weights


def unique_names(refs: list[str]) -> list[str]:
    """Metric names: the registry name, or a user function's name; repeats get _2, _3."""
    out, seen = [], {}
    for ref in refs:
        base = ref.rsplit(":", 1)[-1]
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def _guard(func, name: str, on_error: str, recorder: "RewardRecorder", index: int):
    def reward(prompts=None, completions=None, **kwargs):
        n = len(completions or [])
        try:
            values = check_values(func(prompts=prompts, completions=completions, **kwargs), n)
        except Exception as error:
            if on_error == "skip":
                log = kwargs.get("log_metric")
                if callable(log):
                    log(f"reward_errors/{name}", 1.0)
                recorder.errors[name] = recorder.errors.get(name, 0) + 1
                values = [None] * n
            else:
                raise RewardFailure(_describe(name, func, error, prompts, completions, kwargs)) from error
        else:
            log = kwargs.get("log_metric")
            if on_error == "skip" and callable(log):
                log(f"reward_errors/{name}", 0.0)
        state = kwargs.get("trainer_state")
        recorder.add(index, values, prompts, completions, state)
        if state is not None:
            maybe_fault("generation", state.global_step + 1)
        return values

    reward.__name__ = name
    return reward


def check_values(result, n: int) -> list:
    """A reward's result as TRL needs it: a list of n finite numbers (None: not applicable); anything
    else (strings, NaN, a wrong length, a bare number) is the reward's error."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise BadRewardValues(f"returned {type(result).__name__} {_short(repr(result), 60)}; a reward returns a list "
                        f"with one float per completion")
    values = list(result)
    if len(values) != n:
        raise BadRewardValues(f"returned {len(values)} values for {n} completions (TRL needs one per completion)")
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            ok = not isinstance(v, (str, bytes)) and math.isfinite(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise BadRewardValues(f"value {i} is {_short(repr(v), 60)}; each value must be a finite number (or None)")
        values[i] = float(v)
    return values


def _describe(name, func, error, prompts, completions, kwargs) -> str:
    """Find the first completion that breaks the reward on its own, to show it."""
    if isinstance(error, BadRewardValues):
        return (f"reward '{name}' {error}; make it return a list of floats, one per completion (None: not "
                f"applicable), or set on_error = \"skip\" on it")
    culprit = None
    for i in range(min(len(completions or []), 64)):
        one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
        try:
            func(prompts=[prompts[i]] if prompts else None, completions=[completions[i]], **one)
        except Exception:
            culprit = completion_text(completions[i])
            break
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-6:]).rstrip()
    shown = f"\n  completion: {_short(culprit)!r}" if culprit is not None else ""
    return f"reward '{name}' raised {type(error).__name__}: {error}{shown}\n  traceback (last frames):\n{tb}"


class RewardRecorder:
    """Collects every reward's values for a batch and, once the last reward has scored it, appends one
    line per (sampled) completion to completions.jsonl."""

    def __init__(self, path: Path, recipe, start_step: int = 0):
        self.path = Path(path)
        self.fraction = recipe.output.completions_fraction
        self.rng = random.Random(recipe.training.seed + start_step)
        self.names: list[str] = []
        self.weights: list[float] = []
        self.pending: dict[int, list] = {}
        self.errors: dict[str, int] = {}
        self.last_rows: list[dict] = []

    def add(self, index: int, values, prompts, completions, state) -> None:
        self.pending[index] = values
        if len(self.pending) < len(self.names):
            return
        step = (state.global_step + 1) if state is not None else 0
        rows = []
        for i, completion in enumerate(completions or []):
            scores = {name: self.pending[j][i] for j, name in enumerate(self.names)}
            total = sum(w * v for w, v in zip(self.weights, scores.values()) if v is not None)
            rows.append({
                "step": step,
                "prompt": prompt_text(prompts[i]) if prompts else "",
                "completion": completion_text(completion),
                "rewards": scores,
                "reward": total,
            })
        self.pending = {}
        self.last_rows = rows
        kept = [r for r in rows if self.fraction >= 1 or self.rng.random() < self.fraction]
        if kept:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
                f.flush()
