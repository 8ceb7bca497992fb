"""math-verify equivalence, bounded in time, with each gold parsed once.

Why not call math_verify.parse/verify with their own timeout: it uses `signal.alarm`, which takes whole
seconds (a 64-completion batch could then stall for minutes) and raises in any thread but the main one.
Here one sub-second `setitimer` deadline covers parsing and verifying one completion, and math-verify's
own alarm is switched off so the two never fight over SIGALRM. Outside the main thread (a trainer that
scores rewards in a worker thread) the batch runs in a child process whose main thread can take signals,
and the parent waits with a timeout and kills the child if it must.

GRPO scores G completions against the same gold, so golds are parsed once (LRU cache); completions are
cut to the region that holds the answer (the last \\boxed{}, else the <answer> tag, else the tail) before
math-verify sees them; a bare integer or fraction compared with an Integer/Rational gold is decided exactly
without math-verify (which would compare the two Rationals exactly as well).
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
from fractions import Fraction
from typing import Any

from lowmem_r1.rewards.extract import MAX_ANSWER_CHARS, answer_tag, batch, column, last_boxed
from lowmem_r1.rewards.registry import register

TAIL_CHARS = 1000
"""Without a \\boxed{} or <answer> tag, math-verify reads only this many final characters."""


class _Deadline(BaseException):
    """Raised by our timer; a BaseException so math-verify's `except Exception` does not swallow it."""


class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify():
    """math-verify, imported and warmed once, outside any deadline: its first parse imports sympy and
    latex2sympy and builds parser tables, which can take seconds on a loaded machine."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _QuietTimeoutWarning) for f in log.filters):
            log.addFilter(_QuietTimeoutWarning())
    math_verify.verify(
        math_verify.parse("$\\frac{1}{2}$", parsing_timeout=None),
        math_verify.parse("\\boxed{0.5}", parsing_timeout=None),
        timeout_seconds=None,
    )
    return math_verify


class _deadline:
    """`with _deadline(seconds):` raises _Deadline inside the block when time runs out (main thread only)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        def on_alarm(signum, frame):
            raise _Deadline()

        self.old_handler = signal.signal(signal.SIGALRM, on_alarm)
        self.old_timer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, self.old_handler)
        if self.old_timer[0] > 0:  # someone else's timer was running: give it back what is left
            signal.setitimer(
                signal.ITIMER_REAL, max(1e-3, self.old_timer[0] - self.seconds), self.old_timer[1]
            )
        return False


@functools.lru_cache(maxsize=8192)
def parse_gold(gold: str) -> tuple:
    """The gold solution parsed by math-verify ((): unparseable). Cached: one parse per distinct gold."""
    mv = _math_verify()
    from math_verify import LatexExtractionConfig

    try:
        # LaTeX first (open-r1's gold parse), then plain expressions ("1/2", "3.5"); never the raw string.
        common = dict(extraction_mode="first_match", fallback_mode="no_fallback", parsing_timeout=None)
        parsed = mv.parse(gold, extraction_config=[LatexExtractionConfig()], **common)
        if not parsed:
            parsed = mv.parse(gold, **common)
    except Exception:
        return ()
    return tuple(parsed)


@functools.lru_cache(maxsize=1)
def _pred_config():
    """open-r1's prediction config: LaTeX found by its anchors (\\boxed first, "final answer is", ...)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]


def answer_region(text: str) -> tuple[str, str | None]:
    """(the part of a completion that holds its answer, small enough to parse quickly; that answer itself,
    None when only the tail could be taken). An <answer> tag's content is read as if it were boxed."""
    boxed = last_boxed(text)
    if boxed is None:
        boxed = answer_tag(text)
        if boxed is not None and len(boxed) > MAX_ANSWER_CHARS:
            boxed = None
    if boxed is not None:
        return f"\\boxed{{{boxed}}}", boxed
    return text[-TAIL_CHARS:], None


_PLAIN = re.compile(
    r"\s*(?:(-?[0-9]{1,400})(?:\s*/\s*([0-9]{1,400}))?|\\[dt]?frac\{\s*(-?[0-9]{1,400})\s*\}\{\s*([0-9]{1,400})\s*\})\s*"
)


def plain_fraction(answer: str) -> Fraction | None:
    """An answer that is a bare integer or fraction ("42", "-3", "45/58", "\\frac{1}{2}"), exactly."""
    m = _PLAIN.fullmatch(answer)
    if not m:
        return None
    num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    den = int(den) if den is not None else 1
    return Fraction(int(num), den) if den else None


def _gold_fraction(gold_parsed: tuple) -> Fraction | None:
    """The gold as an exact fraction when math-verify parsed it to an Integer or Rational."""
    from sympy import Rational

    value = gold_parsed[0]
    if isinstance(value, Rational):  # Integer is a Rational; Float and percentages are not
        return Fraction(int(value.p), int(value.q))
    return None


@functools.lru_cache(maxsize=8192)
def _parse_pred(region: str) -> tuple:
    mv = _math_verify()
    try:
        return tuple(
            mv.parse(
                region, extraction_config=_pred_config(), extraction_mode="first_match", parsing_timeout=None
            )
        )
    except Exception:
        return ()


_TOWER = re.compile(r"(?:\*\*|\^)\s*\{?\s*(?:[0-9]{5,}|[0-9a-z.]{1,12}\s*\}?\s*(?:\*\*|\^))")
"""A power tower or a huge exponent (9**9**9, 10^{10^{10}}, 2^{123456}): sympy would try to evaluate it and
only the deadline would stop it. Such an answer is judged wrong at once unless the gold has one too."""

_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")


def _answer_like(answer: str, gold: str) -> bool:
    """Whether an extracted answer is worth parsing: short next to the gold and not a sentence. A sentence or
    a kilobyte of brackets parses to nonsense that cannot equal the gold, and costs ANTLR milliseconds;
    "5 dollars", "\\text{(B)}" or "x^2+1" still go to math-verify."""
    return len(answer) <= max(100, 4 * len(gold)) and len(_WORD.findall(answer)) <= 2


GOLD_TIMEOUT = 2.0
"""Seconds allowed for parsing one gold (once per batch; the per-completion `timeout` may be shorter)."""


def _verify_one(gold: Any, text: str, timeout: float, slow_golds: set) -> float | None:
    if not isinstance(gold, str) or not gold.strip() or gold in slow_golds:
        return None
    mv = _math_verify()
    try:
        with _deadline(max(GOLD_TIMEOUT, timeout)):
            gold_parsed = parse_gold(gold)
    except _Deadline:
        # Not applicable for the rest of this batch; tried again in the next one (the machine may be busy).
        slow_golds.add(gold)
        return None
    if not gold_parsed:
        return None
    try:
        with _deadline(timeout):
            region, answer = answer_region(text)
            if answer is not None:
                # Exact numbers on both sides (most GRPO math answers): math-verify would compare the two
                # Rationals exactly too, so decide here without parsing and verifying.
                gold_value, value = _gold_fraction(gold_parsed), plain_fraction(answer)
                if gold_value is not None and value is not None:
                    return 1.0 if value == gold_value else 0.0
            if answer is not None and not _answer_like(answer, gold):
                return 0.0
            if _TOWER.search(region) and not _TOWER.search(gold):
                return 0.0
            pred = _parse_pred(region)
            if not pred:
                return 0.0
            return 1.0 if mv.verify(list(gold_parsed), list(pred), timeout_seconds=None) else 0.0
    except _Deadline:
        return 0.0
    except Exception:
        return 0.0


def score_batch(golds: list, texts: list[str], timeout: float) -> list[float | None]:
    """1.0 / 0.0 per completion, None where the gold cannot be parsed. Main thread: inline with a
    per-completion deadline; other threads: in a child process (see module docstring)."""
    if threading.current_thread() is threading.main_thread():
        slow_golds: set = set()
        return [_verify_one(g, t, timeout, slow_golds) for g, t in zip(golds, texts)]
    return _in_child(golds, texts, timeout)


_POOL = None
_POOL_LOCK = threading.Lock()


def _close_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.terminate()
        _POOL.join()
        _POOL = None


def _in_child(golds: list, texts: list[str], timeout: float) -> list[float | None]:
    import multiprocessing

    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            import atexit

            _POOL = multiprocessing.get_context("spawn").Pool(1)
            atexit.register(_close_pool)
        pool = _POOL
        job = pool.apply_async(score_batch, (list(golds), list(texts), timeout))
        try:
            # Each completion is bounded by its own deadline in the child; the slack covers starting the
            # child (imports of math-verify and sympy, slow on a loaded machine).
            return job.get(timeout=timeout * (len(texts) + 1) + 120)
        except Exception as e:
            logging.getLogger(__name__).warning(
                "math-verify worker failed (%s: %s); this batch scores 0", type(e).__name__, e
            )
            pool.terminate()
            _POOL = None
            return [0.0 if isinstance(g, str) and g.strip() else None for g in golds]


# --------------------------------------------------------------------------------------------------


def _timeout(value: Any) -> float:
    value = float(value)
    if not 0 < value <= 60:
        raise ValueError("timeout must be in (0, 60] seconds")
    return value


@register(
    "math_accuracy",
    "1 if math-verify finds the completion's answer (last \\boxed{}, else <answer>, else the tail) "
    "equivalent to the `solution` column (LaTeX); None when the gold cannot be parsed. timeout: seconds "
    "per completion.",
    columns=("solution",),
    best=1.0,
)
def math_accuracy(timeout: float = 0.5):
    timeout = _timeout(timeout)

    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        return score_batch(column(kwargs, "solution", len(texts)), texts, timeout)

    return reward
