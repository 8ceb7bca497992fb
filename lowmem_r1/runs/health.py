"""Training-health signals a user can act on, read from TRL's logged metrics (one dict per step).

Shared by the live panel (training/progress.py) and `lowmem-r1 report`: which numbers to show, how to label them,
and the warnings that name a likely cause and the fix.
"""

from __future__ import annotations

import math

from lowmem_r1 import rewards as reward_registry
from lowmem_r1.config.recipe import Recipe

ZERO_STEPS = 5
"""Steps in a row with a correctness reward of exactly 0 (or every completion truncated) before warning."""

# (metric key, label) in display order; a row is shown only when the metric was logged.
SIGNALS = [
    ("grad_norm", "grad norm"),
    ("reward_std", "reward std"),
    ("frac_reward_zero_std", "groups w/o signal"),
    ("dynamic/skipped_groups", "groups skipped"),
    ("dynamic/extra_generations", "extra generations"),
    ("clip_ratio/region_mean", "clipped (ratio)"),
    ("clip_ratio/low_mean", "  clipped low"),
    ("clip_ratio/high_mean", "  clipped high"),
    ("completions/clipped_ratio", "truncated completions"),
    ("entropy", "entropy"),
    ("sampling/importance_sampling_ratio/mean", "vLLM IS ratio (mean)"),
    ("sampling/importance_sampling_ratio/min", "  IS ratio min"),
    ("sampling/importance_sampling_ratio/max", "  IS ratio max"),
    ("sampling/sampling_logp_difference/mean", "vLLM-trainer logp diff"),
]


def number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def loss_label(loss, beta: float) -> str:
    """GRPO's loss with beta = 0 is the advantage-weighted ratio at ratio 1: about 0 by construction."""
    v = number(loss)
    if v is None:
        return "n/a"
    if beta == 0 and abs(v) < 0.05:
        return f"{v:.4f} (near 0 is normal with beta = 0: watch reward and grad norm)"
    return f"{v:.4f}"


def signal_rows(logs: dict) -> list[tuple[str, str]]:
    return [(label, f"{number(logs[key]):.3f}") for key, label in SIGNALS if number(logs.get(key)) is not None]


def correctness_keys(recipe: Recipe) -> list[str]:
    """Metric keys of the rewards that check answers (those reading a dataset column such as `answer`)."""
    keys = []
    for entry in recipe.rewards:
        try:
            columns = reward_registry.check(entry.name, entry.params).columns
        except Exception:  # a user reward that cannot be inspected here: not a known correctness reward
            continue
        if columns:
            keys.append(f"rewards/{entry.name.split(':')[-1]}/mean")
    return keys


class HealthWatch:
    """Feed it each logged step; it returns warnings (each once) that name the likely cause."""

    def __init__(self, correctness: list[str], zero_steps: int = ZERO_STEPS, masked: bool = False):
        self.correctness, self.zero_steps = correctness, zero_steps
        self.masked = masked  # training.mask_truncated_completions: cut replies already teach nothing
        self.zero_run: dict[str, int] = {}
        self.truncated_run = 0
        self.given: set[str] = set()

    @classmethod
    def for_recipe(cls, recipe: Recipe | None) -> HealthWatch:
        if recipe is None:
            return cls([])
        return cls(correctness_keys(recipe), masked=recipe.training.mask_truncated_completions)

    def update(self, logs: dict) -> list[str]:
        out = []
        for key in self.correctness:
            v = number(logs.get(key))
            if v is None:
                continue
            self.zero_run[key] = self.zero_run.get(key, 0) + 1 if v == 0 else 0
            if self.zero_run[key] >= self.zero_steps and key not in self.given:
                self.given.add(key)
                name = key.split("/")[1]
                out.append(
                    f"reward {name} has been exactly 0 for {self.zero_run[key]} steps: the model may never write "
                    f"the answer format the reward expects, or the answer extraction does not match the gold "
                    f"answers; run `lowmem-r1 rewards check RECIPE` and look at a sample completion"
                    + self.only_signal(logs)
                )
        grad = number(logs.get("grad_norm"))
        if grad == 0 and "grad_norm" not in self.given:
            self.given.add("grad_norm")
            zero_std = number(logs.get("frac_reward_zero_std"))
            cause = ("every group scored the same reward (no advantage)" if zero_std == 1
                     else "no trainable parameter received a gradient (check lora.target_modules, or all "
                          "completions masked by mask_truncated_completions)")
            out.append(f"grad norm is 0: nothing was learned this step; likely {cause}")
        out += self.truncation(logs)
        return out

    def truncation(self, logs: dict) -> list[str]:
        """Every reply cut at the length cap, step after step: the model no longer ends its replies. Seen on the
        sample-efficiency bench: replies like "89 - 82 equals 1.\\n8", where an answer read as the last number
        is the stray digit after the cut, and a partial-credit reward paid for it."""
        clipped = number(logs.get("completions/clipped_ratio"))
        if clipped is None:
            return []
        self.truncated_run = self.truncated_run + 1 if clipped >= 1 else 0
        if self.truncated_run < self.zero_steps or "truncated" in self.given:
            return []
        self.given.add("truncated")
        fix = ("raise it: with training.mask_truncated_completions on, cut replies teach nothing" if self.masked
               else "raise it, or set training.mask_truncated_completions = true so cut replies teach nothing")
        return [f"every completion hit generation.max_completion_length for {self.truncated_run} steps: replies "
                f"no longer end, and text after the answer (a stray number) can be scored as the answer; {fix}"]

    def only_signal(self, logs: dict) -> str:
        """While answers score 0, the rewards that still vary carry every advantage (group scaling makes any
        weight full size): name them, and the length rewards' known failure."""
        stds = {k[len("rewards/"):-len("/std")]: number(v) for k, v in logs.items()
                if k.startswith("rewards/") and k.endswith("/std")}
        varying = sorted(n for n, std in stds.items()
                         if (std or 0) > 0 and f"rewards/{n}/mean" not in self.correctness)
        if not varying:
            return ""
        text = f"; meanwhile {', '.join(varying)} carries all the signal, so training teaches that, not answers"
        if any(is_length_reward(n) for n in varying):
            text += (" (a length reward alone shortens replies until they are empty, whatever its weight: add it "
                     "once answers score, e.g. in a later stage after cold-start SFT)")
        return text


def is_length_reward(name: str) -> bool:
    """A reward from rewards/length.py: it scores how long a reply is, not whether it is right."""
    spec = reward_registry.REGISTRY.get(name)
    return spec is not None and spec.factory.__module__.endswith(".length")


def scan(rows: list[dict], recipe: Recipe | None) -> list[str]:
    """All warnings a run's metrics.jsonl deserves (for `report`)."""
    watch = HealthWatch.for_recipe(recipe)
    return [w for r in rows for w in watch.update(r)]
