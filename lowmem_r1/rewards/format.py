"""Format rewards: does the completion have the shape the recipe asked for?

`think_format` is the R1-Zero form (<think>..</think><answer>..</answer>, countdown and NuminaMath seeds);
the `xml_*` rewards are the <reasoning>/<answer> family of the GSM8K GRPO recipes. Shapes are checked by
tokenising the tags with one linear scan instead of a whole-string regex with lazy `.*?` groups, which
backtracks quadratically on texts full of tags.
"""

from __future__ import annotations

import re

from .extract import batch
from .registry import register

_THINK_TAGS = re.compile(r"</?(?:think|answer)>")
_XML_TAGS = re.compile(r"</?(?:reasoning|answer)>")


def _shape(text: str, tag_re: re.Pattern, first: str, second: str, newlines: bool) -> bool:
    """text == <first>A</first> ws <second>B</second> ws, with no other such tags inside; with `newlines`,
    each tag sits on its own line exactly as the strict seeds write it."""
    tags = []
    for m in tag_re.finditer(text):
        tags.append(m)
        if len(tags) > 4:
            return False
    want = [f"<{first}>", f"</{first}>", f"<{second}>", f"</{second}>"]
    if [m.group() for m in tags] != want:
        return False
    o1, c1, o2, c2 = tags
    if text[:o1.start()].strip() or text[c1.end():o2.start()].strip() or text[c2.end():].strip():
        return False
    if newlines:
        return o1.start() == 0 and _lines(text, o1, c1) and text[c1.end():o2.start()] == "\n" and _lines(text, o2, c2)
    return True


def _lines(text: str, open_: re.Match, close: re.Match) -> bool:
    """`<tag>\n...\n</tag>`: newline after the opening and before the closing tag (two distinct ones)."""
    return (close.start() - open_.end() >= 2 and text[open_.end()] == "\n"
            and text[close.start() - 1] == "\n")


@register(
    "think_format",
    "1 if the completion is exactly <think>...</think> then <answer>...</answer> (R1-Zero). A prompt ending "
    "in an opened <think> (assistant prefix) counts as part of the completion. newlines=true demands each "
    "tag on its own line (open-r1 NuminaMath form).",
    best=1.0,
    newlines=False,
)
def think_format(newlines: bool = False):
    newlines = bool(newlines)

    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [1.0 if _shape(p + t, _THINK_TAGS, "think", "answer", newlines) else 0.0
                for t, p in zip(texts, prefixes)]

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
        return [1.0 if _strict_xml(p + t) else 0.0 for t, p in zip(texts, prefixes)]

    return reward


def _strict_xml(text: str) -> bool:
    # Exactly the seed's `^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$`, with multi-line
    # reasoning allowed (the seed forgot re.DOTALL, so it never matched real multi-line reasoning).
    if not text.startswith("<reasoning>\n") or not text.endswith("\n</answer>\n"):
        return False
    tags = []
    for m in _XML_TAGS.finditer(text):
        tags.append(m)
        if len(tags) > 4:
            return False
    if [m.group() for m in tags] != ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]:
        return False
    o1, c1, o2, c2 = tags
    return (o1.start() == 0 and _lines(text, o1, c1) and text[c1.end():o2.start()] == "\n"
            and _lines(text, o2, c2) and c2.end() == len(text) - 1)


@register(
    "xml_soft_format",
    "1 if the completion is <reasoning>...</reasoning> then <answer>...</answer>, whitespace-tolerant "
    "(GSM8K GRPO soft format; the seed scores it 0.5: use weight = 0.5).",
    best=1.0,
)
def xml_soft_format():
    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [1.0 if _shape(p + t, _XML_TAGS, "reasoning", "answer", False) else 0.0
                for t, p in zip(texts, prefixes)]

    return reward


def _count_xml(text: str) -> float:
    # The GSM8K GRPO seed's count_xml, verbatim in meaning: 0.125 per well-placed tag, minus 0.001 per
    # character after the closing answer tag.
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.rsplit("\n</answer>\n", 1)[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.rsplit("\n</answer>", 1)[-1]) - 1) * 0.001
    return count


@register(
    "xml_count",
    "0.125 per well-placed <reasoning>/<answer> tag (max 0.5), minus 0.001 per character after </answer> "
    "(GSM8K GRPO xmlcount).",
    best=None,
)
def xml_count():
    def reward(prompts=None, completions=None, **kwargs):
        texts, prefixes = batch(prompts, completions)
        return [_count_xml(p + t) for t, p in zip(texts, prefixes)]

    return reward
