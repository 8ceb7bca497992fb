"""Format rewards: does the completion have the shape the recipe asked for?

`think_format` is the R1-Zero form (<think>..</think><answer>..</answer>, countdown and NuminaMath seeds);
`boxed_format` the R1-distilled one (</think>, then one \boxed{} answer); the `xml_*` rewards are the
<reasoning>/<answer> family of the GSM8K GRPO recipes. Shapes are checked with str methods (startswith,
count, find: linear, C speed) instead of a whole-string regex with lazy `.*?` groups, which backtracks
quadratically on texts full of tags.
"""

from __future__ import annotations

from lowmem_r1.rewards.extract import batch, last_boxed
from lowmem_r1.rewards.registry import register


def _shape(text: str, first: str, second: str, newlines: bool) -> bool:
    """text == <first>A</first> ws <second>B</second> (surrounding whitespace allowed), each tag exactly
    once; with `newlines`, each tag on its own line as the strict seeds write it. Only str methods (C
    speed, linear): no regex that could backtrack."""
    o1, c1, o2, c2 = f"<{first}>", f"</{first}>", f"<{second}>", f"</{second}>"
    s = text.strip()
    if not (s.startswith(o1) and s.endswith(c2)):
        return False
    if s.count(o1) != 1 or s.count(c1) != 1 or s.count(o2) != 1 or s.count(c2) != 1:
        return False
    i, j = s.find(c1), s.find(o2)
    if not len(o1) <= i < j <= len(s) - len(c2) - len(o2) or s[i + len(c1) : j].strip():
        return False
    if newlines:
        return (
            text.startswith(o1)
            and _lines(s, len(o1), i)
            and s[i + len(c1) : j] == "\n"
            and _lines(s, j + len(o2), len(s) - len(c2))
        )
    return True


def _lines(s: str, start: int, end: int) -> bool:
    """s[start:end] is newline, text, newline: the tags sit on their own lines."""
    return end - start >= 2 and s[start] == "\n" and s[end - 1] == "\n"


@register(
    "think_format",
    "1 if the completion is exactly <think>...</think> then <answer>...</answer> (R1-Zero). A prompt ending "
    "in an opened <think> (assistant prefix) counts as part of the completion. newlines=true demands each "
    "tag on its own line (open-r1 NuminaMath form).",
    best=1.0,
)
def think_format(newlines: bool = False):
    newlines = bool(newlines)

    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [
            1.0 if _shape(p + t if p else t, "think", "answer", newlines) else 0.0
            for t, p in zip(texts, prefixes)
        ]

    return reward


@register(
    "xml_strict_format",
    "1 if the completion is exactly '<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n' "
    "(newline-exact, GSM8K GRPO strict format; the seed scores it 0.5: use weight = 0.5).",
    best=1.0,
)
def xml_strict_format():
    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [1.0 if _strict_xml(p + t if p else t) else 0.0 for t, p in zip(texts, prefixes)]

    return reward


def _strict_xml(text: str) -> bool:
    # The seed's `^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$`, with multi-line reasoning
    # allowed (the seed forgot re.DOTALL, so it never matched real multi-line reasoning).
    return (
        text.startswith("<reasoning>\n")
        and text.endswith("\n</answer>\n")
        and _shape(text, "reasoning", "answer", True)
    )


@register(
    "xml_soft_format",
    "1 if the completion is <reasoning>...</reasoning> then <answer>...</answer>, whitespace-tolerant "
    "(GSM8K GRPO soft format; the seed scores it 0.5: use weight = 0.5).",
    best=1.0,
)
def xml_soft_format():
    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [
            1.0 if _shape(p + t if p else t, "reasoning", "answer", False) else 0.0
            for t, p in zip(texts, prefixes)
        ]

    return reward


def _count_xml(text: str) -> float:
    # The GSM8K GRPO seed's count_xml, verbatim in meaning: 0.125 per well-placed tag, minus 0.001 per
    # character after the closing answer tag.
    if "<" not in text:
        return 0.0
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= _after_last(text, "\n</answer>\n") * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (_after_last(text, "\n</answer>") - 1) * 0.001
    return count


def _after_last(text: str, sep: str) -> int:
    """len(text.split(sep)[-1]) without copying the text."""
    i = text.rfind(sep)
    return len(text) if i < 0 else len(text) - i - len(sep)


@register(
    "xml_count",
    "0.125 per well-placed <reasoning>/<answer> tag (max 0.5), minus 0.001 per character after </answer> "
    "(GSM8K GRPO xmlcount).",
    best=0.5,
)
def xml_count():
    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [_count_xml(p + t if p else t) for t, p in zip(texts, prefixes)]

    return reward


def _boxed_shape(text: str, think: bool) -> bool:
    """One non-empty \\boxed{} as the final answer; with `think`, after a closed reasoning block. The
    opening <think> may be absent: R1-distilled chat templates put it in the prompt."""
    if think:
        close = text.find("</think>")
        if close < 0 or text.count("</think>") != 1 or text.count("<think>") > 1:
            return False
        opened = text.find("<think>")
        if opened > close:
            return False
        text = text[close + len("</think>"):]
    return text.count("\\boxed") == 1 and last_boxed(text) is not None


@register(
    "boxed_format",
    "1 if the completion ends its reasoning with </think> (the opening <think> may be in the prompt, as "
    "R1-distilled chat templates put it) and then gives exactly one non-empty \\boxed{} answer. "
    "think=false: exactly one non-empty \\boxed{} anywhere. Scores shape, not correctness (boxed_match).",
    best=1.0,
)
def boxed_format(think: bool = True):
    think = bool(think)

    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [1.0 if _boxed_shape(p + t if p else t, think) else 0.0 for t, p in zip(texts, prefixes)]

    return reward
