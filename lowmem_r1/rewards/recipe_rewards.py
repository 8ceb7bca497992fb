"""A recipe's rewards as one object: the callables, their weights, the on_error policy, completions as TRL
passes them, and the weighted total. Training (reward_guard), `rewards score/check` (reward_debug) and
`eval` all call rewards through it, so they agree on names, failures and totals.

    rewards = RecipeRewards.from_recipe(recipe)
    values = rewards.score_all(prompts, completions, completion_ids=ids, **columns)  # name -> scores
    rewards.total([values[name][i] for name in rewards.names])

The rewards themselves stay plain TRL-style callables (lowmem_r1.rewards); this module only reads the
recipe's [[rewards]] tables.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any

from lowmem_r1.rewards import RewardFunc, RewardSpec, build, check
from lowmem_r1.rewards.extract import completion_text

GOLD_COLUMNS = {"answer", "target", "solution", "nums"}
"""Dataset columns that hold what a right answer is (a reward reading one judges correctness)."""


@dataclass(frozen=True)
class Reward:
    name: str
    """Metric name: the registry name or a user function's name; repeats get _2, _3 (as TRL logs it)."""
    ref: str
    """As the recipe names it: a registry name, module:function or file.py:function."""
    weight: float
    on_error: str
    params: dict
    spec: RewardSpec
    func: RewardFunc

    @property
    def full_marks(self) -> float | None:
        return self.spec.full_marks(self.params)


class BadRewardValues(ValueError):
    """A reward returned something that is not one finite number (or None) per completion."""


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


class RewardError(Exception):
    """A reward raised, or returned other than one value per completion. str(): `Type: message`;
    describe(): the message the trainer shows (the first completion that breaks it, the user's traceback)."""

    def __init__(self, reward: Reward, error: Exception, prompts, completions, kwargs: dict):
        super().__init__(f"{type(error).__name__}: {error}")
        self.reward, self.error = reward, error
        self._call = (prompts, completions, kwargs)

    def describe(self) -> str:
        if isinstance(self.error, BadRewardValues):
            return (f"reward '{self.reward.name}' {self.error}; make it return a list of floats, one per completion "
                    f"(None: not applicable), or set on_error = \"skip\" on it")
        prompts, completions, kwargs = self._call
        culprit = None
        for i in range(min(len(completions or []), 64)):
            one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
            try:
                self.reward.func(prompts=[prompts[i]] if prompts else None, completions=[completions[i]], **one)
            except Exception:
                culprit = completion_text(completions[i])
                break
        error = self.error
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-6:]).rstrip()
        shown = f"\n  completion: {_short(culprit)!r}" if culprit is not None else ""
        return f"reward '{self.reward.name}' raised {self}{shown}\n  traceback (last frames):\n{tb}"


def _short(text: str, n: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def unique_names(refs: list[str]) -> list[str]:
    """Metric names: the registry name, or a user function's name; repeats get _2, _3."""
    out, seen = [], {}
    for ref in refs:
        base = ref.rsplit(":", 1)[-1]
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


class RecipeRewards:
    def __init__(self, rewards: list[Reward]):
        self.rewards = rewards

    @classmethod
    def from_recipe(cls, recipe) -> "RecipeRewards":
        entries = list(recipe.rewards)
        names = unique_names([e.name for e in entries])
        return cls([
            Reward(name, e.name, e.weight, e.on_error, e.params, check(e.name, e.params), build(e.name, **e.params))
            for name, e in zip(names, entries)
        ])

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.rewards]

    def __iter__(self):
        return iter(self.rewards)

    def correctness(self) -> Reward | None:
        """The reward that judges the answer (eval's strict accuracy): the first that reads a gold column
        and has full marks."""
        return next((r for r in self.rewards if set(r.spec.columns) & GOLD_COLUMNS and r.full_marks is not None),
                    None)

    @staticmethod
    def wrap(text: str, prompt: Any) -> Any:
        """The completion as TRL passes it: a str for string prompts, else an assistant message list."""
        return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

    def call(self, reward: Reward, prompts, completions, on_error: str | None = None,
             **kwargs) -> tuple[list, RewardError | None]:
        """One TRL-style call under the reward's on_error policy (or `on_error` given here): "raise" raises
        RewardError; "skip" scores every completion None (TRL: not applicable) and returns the error too,
        for the caller to count."""
        n = len(completions or [])
        try:
            values = check_values(reward.func(prompts=prompts, completions=completions, **kwargs), n)
        except Exception as e:  # noqa: BLE001  (user code; the policy decides)
            error = RewardError(reward, e, prompts, completions, kwargs)
            if (on_error or reward.on_error) != "skip":
                raise error from e
            return [None] * n, error
        return values, None

    def score_all(self, prompts, completions, **kwargs) -> dict[str, list]:
        """Every reward on the same completions: metric name -> one score per completion."""
        return {r.name: self.call(r, prompts, completions, **kwargs)[0] for r in self.rewards}

    def total(self, scores) -> float:
        """TRL's total for one completion (`scores` in reward order): the weighted sum of the rewards that
        apply (None is skipped)."""
        return sum(r.weight * v for r, v in zip(self.rewards, scores) if v is not None)
