"""Getting text, columns and answers out of whatever TRL hands a reward function.

Every helper here is total: any input (None, bytes, nested junk, megabyte strings) gives a value, never an
exception, and runs in time linear in a bounded slice of the text. Rewards build on these so that the
safety argument lives in one place.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

MAX_ANSWER_CHARS = 2000
"""An extracted answer longer than this is not an answer (and would make comparisons slow)."""

OPEN_TAGS = ("<think>", "<reasoning>", "<answer>")
"""Tags an assistant prefix may leave open at the end of the prompt."""


# --------------------------------------------------------------------------------------------------
# Completions, prompts and columns


def completion_text(completion: Any) -> str:
    """The completion as one string: TRL gives a str (standard) or a list of messages (conversational)."""
    if type(completion) is list and len(completion) == 1:  # the common conversational case, fast
        m = completion[0]
        if type(m) is dict and type(m.get("content")) is str and m.get("role", "assistant") == "assistant":
            return m["content"]
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (bytes, bytearray)):
        return bytes(completion).decode("utf-8", errors="replace")
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        # Conversational: the assistant's turn(s) of this completion; usually exactly one message.
        parts = [
            _content_text(m.get("content"))
            for m in completion
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        ]
        if parts:
            return "".join(parts)
        return "".join(completion_text(m) for m in completion if isinstance(m, (str, dict)))
    return ""


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, bytearray)):
        return bytes(content).decode("utf-8", errors="replace")
    if isinstance(content, (list, tuple)):  # multimodal parts: [{"type": "text", "text": ...}]
        return "".join(
            p.get("text") or ""
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            if isinstance(p, str)
            else ""
            for p in content
        )
    return ""


def prompt_text(prompt: Any, roles: tuple[str, ...] | None = None) -> str:
    """The text of a prompt (a str, or the contents of its messages, only those of `roles` if given)."""
    if isinstance(prompt, (list, tuple)):
        return "\n".join(
            _content_text(m.get("content"))
            for m in prompt
            if isinstance(m, dict) and (roles is None or m.get("role") in roles)
        )
    return completion_text(prompt)


def assistant_prefix(prompt: Any) -> str:
    """The opened tag the prompt ends with, to be judged as part of the completion.

    Recipes that start the assistant turn for the model ("...step by step.\\n<think>") render the prompt
    as a plain string ending in that tag, or (conversational) end it with an assistant message. The
    model then never writes `<think>` itself, so format rewards must prepend it. Only a tag at the very
    end (trailing whitespace allowed) counts: a tag mentioned in the instructions is not a prefix.
    """
    if isinstance(prompt, (list, tuple)):
        last = prompt[-1] if prompt else None
        if not isinstance(last, dict) or last.get("role") != "assistant":
            return ""
        tail = _content_text(last.get("content"))[-200:]
    elif isinstance(prompt, str):
        tail = prompt[-200:]
    else:
        return ""
    stripped = tail.rstrip()
    for tag in OPEN_TAGS:
        if stripped.endswith(tag):
            return tag + tail[len(stripped) :]
    return ""


def batch(prompts: Any, completions: Any) -> tuple[list[str], list[str]]:
    """(texts, prefixes), one per completion; prefixes are the prompts' opened tags (or "").

    Hot path of every reward: GRPO repeats each prompt G times in a batch, so each distinct prompt object
    is looked at once."""
    if not isinstance(completions, (list, tuple)):
        return [], []
    texts = [completion_text(c) for c in completions]
    if not isinstance(prompts, (list, tuple)) or len(prompts) != len(texts):
        return texts, [""] * len(texts)
    seen: dict[int, str] = {}
    prefixes = []
    for p in prompts:
        v = seen.get(id(p))
        if v is None:
            v = seen[id(p)] = assistant_prefix(p)
        prefixes.append(v)
    return texts, prefixes


def column(kwargs: dict, name: str, n: int) -> list:
    """Dataset column `name` as a list of length n (None where absent), whatever TRL passed."""
    values = kwargs.get(name)
    if isinstance(values, str):  # one value for the whole batch
        return [values] * n
    if values is None or isinstance(values, bytes) or not hasattr(values, "__len__"):
        return [None] * n
    values = list(values)[:n]
    return values + [None] * (n - len(values))


def token_lengths(kwargs: dict, n: int) -> list[int | None]:
    """Lengths of `completion_ids` when TRL passed them (one list of ids per completion)."""
    ids = kwargs.get("completion_ids")
    if not isinstance(ids, (list, tuple)) or len(ids) != n:
        return [None] * n
    return [len(x) if hasattr(x, "__len__") else None for x in ids]


# --------------------------------------------------------------------------------------------------
# Answers


def answer_tag(text: str) -> str | None:
    """Content of the last complete <answer>...</answer> (stripped), or None."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")


def last_boxed(text: str, max_candidates: int = 16) -> str | None:
    """Content of the last non-empty \\boxed{...} (nested braces balanced), or None.

    Looks at the last `max_candidates` openings only, each scanned at most MAX_ANSWER_CHARS forward, so the
    cost is bounded whatever the text.
    """
    has_boxed, has_fbox = "\\boxed" in text, "\\fbox" in text
    if not (has_boxed or has_fbox):
        return None
    pos = len(text)
    for _ in range(max_candidates):  # from the last opening backwards; usually the first one is it
        i = max(
            text.rfind("\\boxed", 0, pos) if has_boxed else -1,
            text.rfind("\\fbox", 0, pos) if has_fbox else -1,
        )
        if i < 0:
            break
        pos = i
        m = _BOXED.match(text, i, i + 40)
        if not m:
            continue
        depth = 1
        for b in _BRACE.finditer(text, m.end(), min(len(text), m.end() + MAX_ANSWER_CHARS)):
            depth += 1 if b.group() == "{" else -1
            if depth == 0:
                content = text[m.end() : b.start()].strip()
                if content:
                    return content
                break
    return None


_NUMBER = re.compile(r"[-+−]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|[-+−]?\.[0-9]+")


def last_number(text: str) -> str | None:
    """The last number in the text ("1,000", "-3.5", ".5"), as written, or None.

    Finds the last digit with str.rfind (fast even on megabytes), then reads the number that ends there
    from a short window (64 characters) before it."""
    tail = max(0, len(text) - 512)  # usually the number is near the end: look there first
    end = max(map(text.rfind, "0123456789", (tail,) * 10))
    if end < 0 and tail:
        end = max(map(text.rfind, "0123456789"))
    if end < 0:
        return None
    last = None
    for last in _NUMBER.finditer(text, max(0, end - 64), end + 1):  # numbers are short
        pass
    return last.group() if last is not None else None


EXTRACT_MODES = ("auto", "tag", "boxed", "last_number")


def extract_answer(text: Any, mode: str = "auto") -> str | None:
    """The answer a completion gives.

    - "tag": the last <answer>...</answer>
    - "boxed": the last non-empty \\boxed{...}
    - "last_number": the last number anywhere
    - "auto": the tag (its \\boxed{} if it holds one), else the last \\boxed{}, else the last number
    """
    text = completion_text(text)
    if mode == "tag":
        ans = answer_tag(text)
    elif mode == "boxed":
        ans = last_boxed(text)
    elif mode == "last_number":
        ans = last_number(text)
    elif mode == "auto":
        ans = answer_tag(text)
        if ans is not None:
            ans = last_boxed(ans) or ans
        else:
            ans = last_boxed(text)
            if ans is None:
                ans = last_number(text)
    else:
        raise ValueError(f"extract must be one of {', '.join(EXTRACT_MODES)}, not {mode!r}")
    if ans is not None and len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans


# --------------------------------------------------------------------------------------------------
# Normalisation


_NUM_TEXT = re.compile(
    r"(?P<sign>[-+−])?\s*(?:\\?\$|[€£])?\s*(?P<sign2>[-+−])?\s*"
    r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?(?P<frac>\.[0-9]*)?\s*(?:\\?%|\\?\$)?\.?"
)
_WRAPPERS = re.compile(r"^\\(?:text|textbf|mathrm|boxed|fbox)\{(.*)\}$", re.S)
_SIMPLE_FRAC = re.compile(r"(?:\\d?frac\{\s*(-?[0-9]+)\s*\}\{\s*(-?[0-9]+)\s*\}|(-?[0-9]+)\s*/\s*(-?[0-9]+))")


def _unwrap(s: str) -> str:
    s = s.strip()
    for _ in range(4):
        if len(s) >= 2 and s[0] == s[-1] == "$":
            s = s[1:-1].strip()
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        m = _WRAPPERS.match(s)
        if not m:
            break
        s = m.group(1).strip()
    return s


def parse_number(s: Any) -> float | None:
    """A number written the ways GSM8K answers are: "1,000", "$1000", "1000.00", "1000.", "-5", "50%",
    "\\frac{1}{2}", "3/4". Anything else (words, units, expressions) gives None."""
    if isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return float(s) if math.isfinite(s) else None
    if not isinstance(s, str) or not s or len(s) > 100:
        return None
    return _parse_number_text(s)


@functools.lru_cache(maxsize=16384)
def _parse_number_text(s: str) -> float | None:
    # Cached: GRPO compares G completions with one gold, and short answers repeat.
    s = _unwrap(s)
    if "####" in s:  # raw GSM8K answer column: the final number follows ####
        s = s.rsplit("####", 1)[1].strip()
    m = _NUM_TEXT.fullmatch(s)
    if m and (m.group("int") or (m.group("frac") and len(m.group("frac")) > 1)):
        if m.group("sign") and m.group("sign2"):
            return None
        digits = (m.group("int") or "0").replace(",", "") + (m.group("frac") or "")
        value = float(digits.rstrip(".") or "0")
        sign = m.group("sign") or m.group("sign2")
        return -value if sign in ("-", "−") else value
    f = _SIMPLE_FRAC.fullmatch(s)
    if f:
        num, den = (f.group(1), f.group(2)) if f.group(1) is not None else (f.group(3), f.group(4))
        if int(den) != 0:
            return int(num) / int(den)
    return None


def numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


_SPACES = re.compile(r"\s+")


def normalize_text(s: Any) -> str:
    """Lower-case, unwrapped ($...$, \\text{}), single-spaced, without a final period."""
    if not isinstance(s, str):
        s = "" if s is None else str(s)
    s = _unwrap(s[: MAX_ANSWER_CHARS * 2])
    s = _SPACES.sub(" ", s).strip().lower()
    return s.rstrip(".").strip()


def answers_equal(pred: Any, gold: Any) -> bool:
    """As numbers when both are numbers, else as normalised text."""
    if pred is None or gold is None:
        return False
    if type(pred) is str and pred == gold and pred.strip():
        return True
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        return numbers_equal(p, g)
    if isinstance(gold, str) and "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    pn, gn = normalize_text(pred), normalize_text(gold)
    return bool(pn) and pn == gn
