"""Dynamic sampling: no GRPO step wasted on groups that teach nothing.

A group whose completions all score the same has no advantage spread, so it adds nothing to the policy
gradient but still costs a training forward/backward and dilutes the token-level loss normaliser.
`training.dynamic_sampling`:

- "skip": drop those groups from the update (cheap: no extra generation);
- "refill" (DAPO's dynamic sampling): also generate for further prompts, at most `max_refill_draws` extra
  rounds, until the step has as many groups with signal as it was configured for.

A group has signal when its advantages differ, or, with `training.dynamic_sampling_reward`, when that one
reward's scores differ (DAPO judges by accuracy, so a partial-credit or length reward alone keeps nothing).

It sits on TRL's own hook: `_generate_and_score_completions` is called once per generation round with
the sampler's rows; this mixin calls it again for refill rows and stitches the kept groups into one batch.
Refill prompts are drawn with a generator seeded by (training.seed, global step), so a resumed run draws
the same prompts at the same step; sampling randomness comes from torch's RNG, which checkpoints keep.
Single process only (this toolkit trains on one device).
"""

from __future__ import annotations

import math
import random

from lowmem_r1.training.grpo.settings import extensions

MODES = ("off", "skip", "refill")


def refill_indices(seed: int, step: int, draw: int, dataset_size: int, count: int) -> list[int]:
    """Which dataset rows refill round `draw` of optimizer step `step` uses: a function of its arguments
    alone, so a resume reproduces it."""
    rng = random.Random(f"lowmem-r1 refill {seed} {step} {draw}")
    return rng.sample(range(dataset_size), min(count, dataset_size))


def groups_with_signal(advantages, num_generations: int, scores=None) -> list[bool]:
    """Per group: do its advantages differ? (A zero-variance group has one advantage for all its rows:
    0 with sum_then_normalize, a shared batch-level value with normalize_then_sum.) With `scores`, one
    reward's column (NaN where it does not apply): do that reward's scores differ? DAPO keeps a group by
    its accuracy's spread, so a length or partial-credit reward alone does not keep it."""
    grouped = (advantages if scores is None else scores).detach().float().view(-1, num_generations)
    nan = grouped.isnan()
    high = grouped.masked_fill(nan, -math.inf).max(dim=1).values
    spread = high - grouped.masked_fill(nan, math.inf).min(dim=1).values
    return [bool(x > 1e-6) for x in spread.tolist()]


def merge_batches(parts: list[tuple[dict, list[int]]], pad_token_id: int = 0) -> dict:
    """Rows `rows` of each TRL generation batch, as one batch: token-dim tensors padded to the widest part
    (prompt tensors on the left, like TRL), per-row tensors concatenated, the loss normaliser recomputed."""
    import torch

    first = parts[0][0]
    out: dict = {}
    for key, value in first.items():
        if key == "num_items_in_batch" or value is None:
            continue
        if isinstance(value, torch.Tensor) and value.ndim == 2:
            width = max(p[key].shape[1] for p, _ in parts)
            pieces = []
            for p, rows in parts:
                t = p[key][rows]
                missing = width - t.shape[1]
                if missing:
                    fill = pad_token_id if key.endswith("_ids") else 0
                    pad = torch.full((t.shape[0], missing), fill, dtype=t.dtype, device=t.device)
                    t = torch.cat([pad, t] if key.startswith("prompt") else [t, pad], dim=1)
                pieces.append(t)
            out[key] = torch.cat(pieces)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1:
            out[key] = torch.cat([p[key][rows] for p, rows in parts])
        elif isinstance(value, list):
            out[key] = [p[key][i] for p, rows in parts for i in rows]
        else:
            out[key] = value
    if "num_items_in_batch" in first:
        mask = out["completion_mask"]
        if out.get("tool_mask") is not None:
            mask = mask * out["tool_mask"]
        out["num_items_in_batch"] = mask.sum()
    for key in first:
        out.setdefault(key, None)
    return out


def _rows(groups: list[int], g: int) -> list[int]:
    """Batch rows of the given groups (TRL lays a group's num_generations completions side by side)."""
    return [r for i in groups for r in range(i * g, (i + 1) * g)]


class DynamicSampling:
    """GRPOTrainer mixin (trainer.py); its settings are LowmemGRPOConfig's `dynamic_sampling`,
    `max_refill_draws` and `signal_reward` (settings.py)."""

    _scores = None  # the last round's scores per reward (TRL's rewards_per_func), taken by _signal

    def _generate(self, prompts):
        """TRL's generation, counting the completion tokens it made (TRL returns (prompt_ids, completion_ids, ...))."""
        result = super()._generate(prompts)
        try:
            self._round_tokens = getattr(self, "_round_tokens", 0) + sum(len(ids) for ids in result[1])
        except (TypeError, IndexError):  # a patched trainer with another return shape: no count
            pass
        return result

    def _calculate_rewards(self, *args, **kwargs):
        """TRL's scores per reward function, kept for the signal check when one reward decides it."""
        self._scores = super()._calculate_rewards(*args, **kwargs)
        return self._scores

    def _signal(self, out) -> list[bool]:
        scores, self._scores = self._scores, None
        by = extensions(self.args).signal_reward
        if by is None or scores is None or scores.shape[0] != out["advantages"].shape[0]:
            return groups_with_signal(out["advantages"], self.num_generations)
        return groups_with_signal(out["advantages"], self.num_generations, scores[:, by])

    def _generate_and_score_completions(self, inputs):
        self._round_tokens, self._scores = 0, None  # no stale scores from a round TRL did not score
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        metrics = self._metrics["train"]
        if extensions(self.args).dynamic_sampling != "off":
            out = self._keep_groups_with_signal(inputs, out, metrics)
        metrics["tokens/generated"].append(float(self._round_tokens))
        return out

    def _keep_groups_with_signal(self, inputs, out, metrics):
        g = self.num_generations
        wanted = len(inputs) // g
        signal = self._signal(out)
        parts = [(out, _rows([i for i, s in enumerate(signal) if s], g))]
        spare = _rows([i for i, s in enumerate(signal) if not s], g)
        kept, generated, with_signal = sum(signal), len(signal), sum(signal)
        extra = draws = 0
        settings = extensions(self.args)
        while settings.dynamic_sampling == "refill" and kept < wanted and draws < settings.max_refill_draws:
            rate = max(with_signal / generated, 1 / wanted)  # observed share of groups with signal
            count = min(wanted, math.ceil((wanted - kept) / rate))
            rows = refill_indices(self.args.seed, self.state.global_step, draws, len(self.train_dataset), count)
            batch = [dict(self.train_dataset[i]) for i in rows for _ in range(g)]
            more = super()._generate_and_score_completions(batch)
            draws, extra = draws + 1, extra + len(batch)
            more_signal = self._signal(more)
            generated, with_signal = generated + len(more_signal), with_signal + sum(more_signal)
            take = [i for i, s in enumerate(more_signal) if s][: wanted - kept]
            kept += len(take)
            parts.append((more, _rows(take, g)))
        metrics["dynamic/skipped_groups"].append(float(generated - with_signal))
        metrics["dynamic/extra_generations"].append(float(extra))
        metrics["dynamic/groups_with_signal"].append(float(kept))
        # TRL splits the batch into steps_per_generation equal micro-batches: keep the row count divisible,
        # topping up with zero-signal groups (their advantage spread is 0: they move nothing) or trimming.
        chunks = self.args.steps_per_generation
        total = sum(len(r) for _, r in parts)
        topped: list[int] = []
        while (total == 0 or total % chunks) and spare:
            topped, spare, total = topped + spare[:g], spare[g:], total + g
        while total % chunks and parts:
            last, rows = parts[-1]
            parts[-1] = (last, rows[:-g])
            parts = [(p, r) for p, r in parts if r]
            total -= g
        parts = [(p, r) for p, r in parts + [(out, topped)] if r]
        if not parts or (len(parts) == 1 and parts[0][1] == list(range(len(inputs)))):
            return out
        pad = getattr(getattr(self, "_tokenizer", None), "pad_token_id", None) or 0
        return merge_batches(parts, pad)
