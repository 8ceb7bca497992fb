"""Rewards as the trainer calls them: guarded against failing user code, and recorded to
completions.jsonl.

A reward that raises either stops the run cleanly (the default: the error names the reward, shows the
completion that broke it and the user's traceback) or, with `on_error = "skip"`, scores that call None
(TRL: not applicable) and counts the failure in the metrics as `reward_errors/<name>`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lowmem_r1.core import distributed
from lowmem_r1.core.faults import maybe_fault
from lowmem_r1.rewards.extract import completion_text
from lowmem_r1.rewards.extract import prompt_text as _prompt_text
from lowmem_r1.rewards.recipe_rewards import BadRewardValues, RecipeRewards, Reward, RewardError, check_values  # noqa: F401


class RewardFailure(Exception):
    """A reward raised during training; the message is ready to show the user."""


def prompt_text(prompt) -> str:
    """The user's words (the last user turn of a conversation), for completions.jsonl."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return _prompt_text(users[-1:] or prompt)
    return _prompt_text(prompt)


def guard_rewards(recipe, recorder: "RewardRecorder"):
    """Build the recipe's rewards as guarded, recorded TRL reward functions, and their weights."""
    rewards = RecipeRewards.from_recipe(recipe)
    recorder.rewards = rewards
    funcs = [_guard(rewards, r, recorder, i) for i, r in enumerate(rewards)]
    return funcs, rewards.weights


def _guard(rewards: RecipeRewards, r: Reward, recorder: "RewardRecorder", index: int):
    """The one place TRL calls a reward through."""

    def reward(prompts=None, completions=None, **kwargs):
        try:
            values, error = rewards.call(r, prompts, completions, **kwargs)
        except RewardError as e:
            raise RewardFailure(e.describe()) from e.error
        log = kwargs.get("log_metric")
        if r.on_error == "skip" and callable(log):
            log(f"reward_errors/{r.name}", 1.0 if error else 0.0)
        if error:
            recorder.errors[r.name] = recorder.errors.get(r.name, 0) + 1
        state = kwargs.get("trainer_state")
        recorder.add(index, values, prompts, completions, state)
        if state is not None:
            maybe_fault("generation", state.global_step + 1)
        return values

    reward.__name__ = r.name
    return reward


class RewardRecorder:
    """Collects every reward's values for a batch and, once the last reward has scored it, appends one
    line per (sampled) completion to completions.jsonl."""

    def __init__(self, path: Path, recipe, start_step: int = 0):
        self.path = Path(path)
        self.fraction = recipe.output.completions_fraction
        self.rng = random.Random(recipe.training.seed + start_step)
        self.rewards = RecipeRewards([])
        self.pending: dict[int, list] = {}
        self.errors: dict[str, int] = {}
        self.last_rows: list[dict] = []
        self.main = distributed.world().main  # with several processes each scores its own share; the main one's is kept

    def add(self, index: int, values, prompts, completions, state) -> None:
        self.pending[index] = values
        if len(self.pending) < len(self.rewards.rewards):
            return
        step = (state.global_step + 1) if state is not None else 0
        rows = []
        for i, completion in enumerate(completions or []):
            scores = {name: self.pending[j][i] for j, name in enumerate(self.rewards.names)}
            total = self.rewards.total(scores.values())
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
        if kept and self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
                f.flush()
