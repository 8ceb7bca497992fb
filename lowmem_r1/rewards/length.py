"""Length rewards: shorter when right (cosine), no runaway lengths (DAPO overlong), plain brevity."""

from __future__ import annotations

import math

from lowmem_r1.rewards.extract import batch, column, token_lengths
from lowmem_r1.rewards.math_equivalence import _timeout, score_batch
from lowmem_r1.rewards.registry import register


@register(
    "cosine_length",
    "Length scaled by correctness (open-r1 cosine): correct answers get max_value_correct at length 0 down "
    "to min_value_correct at max_len; wrong ones get min_value_wrong at length 0 up to max_value_wrong at "
    "max_len. Correctness by math-verify against `solution`; length in characters, capped at max_len.",
    columns=("solution",),
    best=None,
)
def cosine_length(
    min_value_wrong=-1.0,
    max_value_wrong=-0.5,
    min_value_correct=0.5,
    max_value_correct=1.0,
    max_len=1000,
    timeout=0.5,
):
    lo_w, hi_w, lo_c, hi_c = (
        float(v) for v in (min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
    )
    max_len = int(max_len)
    if max_len <= 0:
        raise ValueError("max_len must be positive")
    timeout = _timeout(timeout)

    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        correct = score_batch(column(kwargs, "solution", len(texts)), texts, timeout)
        out = []
        for t, ok in zip(texts, correct):
            if ok is None:
                out.append(None)
                continue
            cosine = math.cos(min(1.0, len(t) / max_len) * math.pi)
            # Wrong answers: the swap makes longer ones less negative (open-r1 / Kimi 1.5 length scaling).
            lo, hi = (lo_c, hi_c) if ok else (hi_w, lo_w)
            out.append(lo + 0.5 * (hi - lo) * (1.0 + cosine))
        return out

    return reward


@register(
    "overlong_penalty",
    "DAPO soft overlong punishment: 0 up to max_length - cache_length, then linearly down to -1 at "
    "max_length, -1 beyond. Tokens when TRL passes completion_ids, else characters.",
    best=None,
)
def overlong_penalty(max_length=1024, cache_length=256):
    max_length, cache_length = int(max_length), int(cache_length)
    if max_length <= 0 or not 0 < cache_length <= max_length:
        raise ValueError("need max_length > 0 and 0 < cache_length <= max_length")
    free = max_length - cache_length

    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        out = []
        for t, n in zip(texts, token_lengths(kwargs, len(texts))):
            length = len(t) if n is None else n
            if length <= free:
                out.append(0.0)
            elif length <= max_length:
                out.append((free - length) / cache_length)
            else:
                out.append(-1.0)
        return out

    return reward


@register(
    "brevity",
    "1 - length/max_chars clipped to [0, 1]; with max_tokens set and completion_ids passed by TRL, "
    "1 - tokens/max_tokens instead. A reward a tiny model can move (the CPU demo).",
    best=None,
)
def brevity(max_chars=80, max_tokens=None):
    max_chars = int(max_chars)
    max_tokens = None if max_tokens is None else int(max_tokens)
    if max_chars <= 0 or (max_tokens is not None and max_tokens <= 0):
        raise ValueError("max_chars and max_tokens must be positive")

    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        ids = token_lengths(kwargs, len(texts)) if max_tokens else [None] * len(texts)
        out = []
        for t, n in zip(texts, ids):
            share = len(t) / max_chars if n is None else n / max_tokens
            out.append(min(1.0, max(0.0, 1.0 - share)))
        return out

    return reward
