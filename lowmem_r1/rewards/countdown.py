"""Countdown: the <answer> equation uses each given number once and reaches the target.

The equation is evaluated by a small parser of our own over exact fractions, never `eval`: only ASCII
digits, + - * / and parentheses exist in its grammar (so `9**9**9` is a syntax error, not a hang), the
text and its nesting are capped, and the iterative shunting-yard needs no recursion.
"""

from __future__ import annotations

import re
from fractions import Fraction

from lowmem_r1.rewards.extract import answer_tag, batch, column
from lowmem_r1.rewards.registry import register

MAX_EQUATION_CHARS = 200
MAX_DEPTH = 50

_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3}


class _Invalid(Exception):
    pass


def tokenize(equation: str) -> list[int | str]:
    tokens: list[int | str] = []
    pos, end = 0, len(equation.rstrip())
    while pos < end:
        m = _TOKEN.match(equation, pos)
        if not m:
            raise _Invalid(f"unexpected character {equation[pos]!r}")
        tokens.append(int(m.group(1)) if m.group(1) else m.group(2))
        pos = m.end()
    return tokens


def evaluate(equation: str) -> tuple[Fraction, list[int]]:
    """(value, numbers used) of an arithmetic expression; raises ValueError when it is not one."""
    if not isinstance(equation, str) or len(equation) > MAX_EQUATION_CHARS:
        raise ValueError("not a short equation")
    try:
        return _evaluate(tokenize(equation))
    except (_Invalid, ZeroDivisionError, IndexError) as e:
        raise ValueError(str(e) or type(e).__name__) from None


def _evaluate(tokens: list[int | str]) -> tuple[Fraction, list[int]]:
    values: list[Fraction] = []
    ops: list[str] = []
    numbers: list[int] = []
    expect_operand = True
    depth = 0

    def apply(op: str) -> None:
        if op == "neg":
            values.append(-values.pop())
            return
        b, a = values.pop(), values.pop()
        values.append(a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b)

    for tok in tokens:
        if isinstance(tok, int):
            if not expect_operand:
                raise _Invalid("two numbers in a row")
            values.append(Fraction(tok))
            numbers.append(tok)
            expect_operand = False
        elif tok == "(":
            if not expect_operand:
                raise _Invalid("'(' after an operand")
            depth += 1
            if depth > MAX_DEPTH:
                raise _Invalid("nested too deeply")
            ops.append("(")
        elif tok == ")":
            if expect_operand:
                raise _Invalid("')' without an operand")
            while ops and ops[-1] != "(":
                apply(ops.pop())
            if not ops:
                raise _Invalid("unbalanced ')'")
            ops.pop()
            depth -= 1
        elif expect_operand:
            if tok == "-":
                ops.append("neg")
            elif tok != "+":
                raise _Invalid(f"operator {tok!r} without a left operand")
        else:
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[tok]:
                apply(ops.pop())
            ops.append(tok)
            expect_operand = True
    if expect_operand or depth:
        raise _Invalid("incomplete expression")
    while ops:
        apply(ops.pop())
    if len(values) != 1:
        raise _Invalid("malformed expression")
    return values[0], numbers


def _as_ints(nums) -> list[int] | None:
    if isinstance(nums, str):
        nums = re.findall(r"-?[0-9]+", nums[:1000])
    try:
        return sorted(int(n) for n in nums)
    except (TypeError, ValueError):
        return None


def _as_fraction(target) -> Fraction | None:
    try:
        return Fraction(str(target).strip()[:50])
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def equation_score(text: str, nums, target) -> float | None:
    numbers, goal = _as_ints(nums), _as_fraction(target)
    if numbers is None or goal is None:
        return None
    equation = answer_tag(text)
    if equation is None:
        return 0.0
    try:
        value, used = evaluate(equation)
    except ValueError:
        return 0.0
    return 1.0 if sorted(used) == numbers and value == goal else 0.0


@register(
    "countdown_equation",
    "1 if the <answer> equation uses exactly the numbers in `nums` (each once), only + - * / and "
    "parentheses, and evaluates to `target` (exact arithmetic, safe parser, no eval).",
    columns=("nums", "target"),
    best=1.0,
)
def countdown_equation():
    def reward(prompts=None, completions=None, **kwargs):
        texts, _ = batch(prompts, completions)
        n = len(texts)
        return [
            equation_score(t, nums, target)
            for t, nums, target in zip(texts, column(kwargs, "nums", n), column(kwargs, "target", n))
        ]

    return reward
