"""Correctness rewards that compare the completion's extracted answer with a dataset column."""

from __future__ import annotations

import math
import re

from lowmem_r1.rewards.extract import (
    EXTRACT_MODES,
    answer_tag,
    answers_equal,
    batch,
    column,
    extract_answer,
    last_boxed,
    parse_number,
)
from lowmem_r1.rewards.registry import register

_INTEGER = re.compile(r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)")


def _check_mode(extract: str) -> str:
    if extract not in EXTRACT_MODES:
        raise ValueError(f"extract must be one of {', '.join(EXTRACT_MODES)}, not {extract!r}")
    return extract


@register(
    "integer_answer",
    '1 if the extracted answer is an integer ("42", "-7", "1,000"); GSM8K GRPO int reward (the seed '
    "scores it 0.5: use weight = 0.5). extract: auto | tag | boxed | last_number.",
    best=1.0,
)
def integer_answer(extract: str = "tag"):
    extract = _check_mode(extract)

    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        out = []
        for t, p in zip(texts, prefixes):
            ans = extract_answer(p + t, extract)
            out.append(1.0 if ans is not None and _INTEGER.fullmatch(ans.strip()) else 0.0)
        return out

    return reward


@register(
    "answer_match",
    "1 if the extracted answer equals the `answer` column: as numbers when both are numbers (1,000 = $1000 = "
    "1000.00), else as normalised text. extract: auto (tag, else \\boxed, else last number) | tag | boxed | "
    "last_number.",
    columns=("answer",),
    best=1.0,
)
def answer_match(extract: str = "auto"):
    extract = _check_mode(extract)

    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        golds = column(kwargs, "answer", len(texts))
        return [
            None if g is None else 1.0 if answers_equal(extract_answer(p + t, extract), g) else 0.0
            for t, p, g in zip(texts, prefixes, golds)
        ]

    return reward


@register(
    "boxed_match",
    "1 if the last non-empty \\boxed{...} (nested braces handled) equals the `answer` column (numbers "
    "compared as numbers, else normalised text).",
    columns=("answer",),
    best=1.0,
)
def boxed_match():
    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        golds = column(kwargs, "answer", len(texts))
        return [
            None if g is None else 1.0 if answers_equal(last_boxed(t), g) else 0.0
            for t, g in zip(texts, golds)
        ]

    return reward


@register(
    "numeric_closeness",
    "Partial credit for a numeric answer: exp(-|answer - gold| / (tolerance x |gold| + 1)), 1 when equal, 0 "
    "without a number; None when the `answer` column is not a number. For tasks where exact answers are "
    "rare at the start, so groups still differ. extract: auto | tag | boxed | last_number.",
    columns=("answer",),
    best=1.0,
)
def numeric_closeness(extract: str = "auto", tolerance: float = 0.05):
    extract = _check_mode(extract)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a number >= 0, not {tolerance!r}")
    tolerance = float(tolerance)

    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        golds = column(kwargs, "answer", len(texts))
        out = []
        for t, p, g in zip(texts, prefixes, golds):
            gold = parse_number(g)
            if gold is None:
                out.append(None)
                continue
            got = parse_number(extract_answer(p + t, extract))
            out.append(0.0 if got is None else math.exp(-abs(got - gold) / (tolerance * abs(gold) + 1.0)))
        return out

    return reward


def after_think(text: str) -> str:
    """What follows the last </think> (the whole text when there is none); the answer inside <answer>
    tags when present."""
    i = text.rfind("</think>")
    rest = text[i + len("</think>") :] if i >= 0 else text
    tagged = answer_tag(rest)
    return (tagged if tagged is not None else rest).strip()


@register(
    "levenshtein",
    "Normalised Levenshtein similarity in [0, 1] (rapidfuzz) between the text after </think> and the "
    "`solution` column; texts longer than max_chars are cut to it first.",
    columns=("solution",),
    best=None,
)
def levenshtein(max_chars: int = 20000):
    max_chars = int(max_chars)
    if max_chars <= 0:
        raise ValueError("max_chars must be positive")

    def reward(prompts=None, completions=None, **kwargs):
        from rapidfuzz.distance import Levenshtein

        texts, _ = batch(prompts, completions)
        golds = column(kwargs, "solution", len(texts))
        out = []
        for t, g in zip(texts, golds):
            if g is None:
                out.append(None)
                continue
            out.append(
                float(
                    Levenshtein.normalized_similarity(after_think(t)[:max_chars], str(g).strip()[:max_chars])
                )
            )
        return out

    return reward
