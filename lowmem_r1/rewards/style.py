"""Style rewards on the reasoning itself: visible steps, no loops, one language."""

from __future__ import annotations

import re

from lowmem_r1.rewards.extract import batch, prompt_text
from lowmem_r1.rewards.registry import register

MAX_STYLE_CHARS = 100_000
"""Style is judged on the first this-many characters: a longer text changes the score little and
would only cost time."""

_STEPS = re.compile(r"Step [0-9]+:|^[0-9]+\.|\n-|\n\*|First,|Second,|Next,|Finally,", re.M)


@register(
    "reasoning_steps",
    "min(1, steps/3) where steps counts 'Step N:', numbered lines ('1.'), bullets (- or *) and "
    "First, / Second, / Next, / Finally, (open-r1).",
    best=None,
)
def reasoning_steps():
    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        out = []
        for t in texts:
            count = 0
            for _ in _STEPS.finditer(t, 0, MAX_STYLE_CHARS):
                count += 1
                if count >= 3:
                    break
            out.append(min(1.0, count / 3))
        return out

    return reward


@register(
    "repetition_penalty",
    "N-gram repetition penalty (open-r1, Appendix C.2 of arXiv:2502.03373): (1 - distinct/total n-grams of "
    "lower-cased words) * max_penalty; 0 for texts shorter than ngram_size words.",
    best=None,
)
def repetition_penalty(ngram_size=3, max_penalty=-1.0):
    ngram_size, max_penalty = int(ngram_size), float(max_penalty)
    if ngram_size < 1:
        raise ValueError("ngram_size must be at least 1")
    if max_penalty > 0:
        raise ValueError(f"max_penalty {max_penalty} should not be positive")

    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        out = []
        for t in texts:
            words = t[:MAX_STYLE_CHARS].lower().split()
            total = len(words) - ngram_size + 1
            if total <= 0:
                out.append(0.0)
                continue
            distinct = len(set(zip(*(words[i:] for i in range(ngram_size)))))
            out.append((1 - distinct / total) * max_penalty + 0.0)
        return out

    return reward


# Scripts, counted in words: a run of letters for alphabetic scripts, one character for CJK ideographs
# and kana (one character is about a word there), so English and Chinese text weigh alike.
_SCRIPTS = {
    "latin": re.compile(r"[A-Za-z\u00C0-\u024F]+"),
    "cjk": re.compile(r"[\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF]"),
    "hangul": re.compile(r"[\uAC00-\uD7AF\u1100-\u11FF]+"),
    "cyrillic": re.compile(r"[\u0400-\u04FF]+"),
    "arabic": re.compile(r"[\u0600-\u06FF]+"),
    "devanagari": re.compile(r"[\u0900-\u097F]+"),
    "greek": re.compile(r"[\u0370-\u03FF]+"),
}
_SAMPLE_CHARS = 20_000


def script_counts(text: str) -> dict[str, int]:
    sample = text[:_SAMPLE_CHARS]
    if sample.isascii():  # the common case: only Latin words can be there
        counts = dict.fromkeys(_SCRIPTS, 0)
        counts["latin"] = len(_SCRIPTS["latin"].findall(sample))
        return counts
    return {name: len(rx.findall(sample)) for name, rx in _SCRIPTS.items()}


def dominant_script(text: str) -> str | None:
    counts = script_counts(text)
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def _reasoning(text: str) -> str:
    """The reasoning: inside <think>/<reasoning> when present, else the whole text."""
    for open_, close in (("<think>", "</think>"), ("<reasoning>", "</reasoning>")):
        i = text.find(open_)
        if i >= 0:
            j = text.find(close, i)
            return text[i + len(open_) : j if j >= 0 else len(text)]
    return text


@register(
    "language_consistency",
    "Share of the reasoning's words written in the target script (language='auto': the dominant script of "
    "the prompt's user turns, else the reasoning's own; set it for string prompts, which include the chat "
    "template; or latin, cjk, hangul, cyrillic, arabic, devanagari, greek). "
    "1 = no language mixing; texts without words score 1.",
    best=1.0,
)
def language_consistency(language="auto"):
    if language != "auto" and language not in _SCRIPTS:
        raise ValueError(f"language must be auto or one of {', '.join(_SCRIPTS)}")

    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        plist = (
            prompts
            if isinstance(prompts, (list, tuple)) and len(prompts) == len(texts)
            else [None] * len(texts)
        )
        out, cache = [], {}
        for t, p, prompt in zip(texts, prefixes, plist):
            target = language
            if target == "auto":
                # The question's language: user turns only (a system prompt is often English regardless).
                ptext = prompt_text(prompt, roles=("user",))[-_SAMPLE_CHARS:]
                if ptext not in cache:
                    cache[ptext] = dominant_script(ptext)
                target = cache[ptext]
            counts = script_counts(_reasoning(p + t))
            total = sum(counts.values())
            if total == 0:
                out.append(1.0)
            else:  # without a prompt to judge by, consistency with the reasoning's own main script
                out.append((counts[target] if target else max(counts.values())) / total)
        return out

    return reward
