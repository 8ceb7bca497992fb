"""Task generators: data that needs no download, seeded and reproducible.

`arithmetic` makes the single-digit sums a 135M model can learn on a CPU in minutes (the demo).
`countdown` makes Countdown puzzles (reach a target from 3-4 numbers with + - * /, each number used once),
the R1-Zero "aha moment" task of TinyZero. Every puzzle is built from a random expression over its
numbers, so it is solvable by construction; the expression is kept as `solution`.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from itertools import combinations
from pathlib import Path
from typing import Any

from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_write_text, refuse_existing

ARITHMETIC_DEFAULTS: dict[str, Any] = {"n": 1000, "seed": None, "min_operand": 1, "max_operand": 9, "ops": ["+"]}
COUNTDOWN_DEFAULTS: dict[str, Any] = {
    "n": 5000, "seed": None, "min_numbers": 3, "max_numbers": 4, "min_number": 1, "max_number": 99,
    "min_target": 1, "max_target": 100, "ops": ["+", "-", "*", "/"],
}
_OPS = ("+", "-", "*", "/")


def _params(kind: str, defaults: dict, given: dict, seed: int) -> dict:
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise UserError(
            f"data.generator.{unknown[0]}: builtin:{kind} has no parameter {unknown[0]!r}; "
            f"its parameters: {', '.join(defaults)}"
        )
    p = {**defaults, **given}
    if p["seed"] is None:
        p["seed"] = seed
    if not isinstance(p["n"], int) or p["n"] <= 0:
        raise UserError(f"data.generator.n: must be a positive integer (got {p['n']!r})")
    bad = [op for op in p["ops"] if op not in _OPS]
    if bad or not p["ops"]:
        raise UserError(f"data.generator.ops: {bad or p['ops']!r} not allowed; use a list from {list(_OPS)}")
    return p


# --------------------------------------------------------------------------------------------------
# Arithmetic


def arithmetic(n: int = 1000, seed: int = 0, min_operand: int = 1, max_operand: int = 9,
               ops: list[str] = ("+",)) -> list[dict]:
    """Rows {question: "What is 3 + 5?", answer: "8"}. Subtractions keep the larger operand first and
    divisions are exact, so every answer is a whole number."""
    if min_operand > max_operand:
        raise UserError("data.generator: min_operand must not exceed max_operand")
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
        op = rng.choice(list(ops))
        if op == "-" and a < b:
            a, b = b, a
        if op == "/":
            if b == 0:
                continue
            a = a * b  # exact division: (a*b) / b
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(value)})
    return rows


# --------------------------------------------------------------------------------------------------
# Countdown


def countdown(n: int = 5000, seed: int = 0, min_numbers: int = 3, max_numbers: int = 4, min_number: int = 1,
              max_number: int = 99, min_target: int = 1, max_target: int = 100,
              ops: list[str] = _OPS) -> list[dict]:
    """Rows {nums: [..], target: int, solution: "(a + b) * c"}; every target is reached by its solution.

    Intermediate results stay non-negative whole numbers (the game's rules), so the solution is also a
    valid answer for the stricter reward implementations."""
    if not 2 <= min_numbers <= max_numbers:
        raise UserError("data.generator: need 2 <= min_numbers <= max_numbers")
    if min_number > max_number or min_target > max_target:
        raise UserError("data.generator: min_number/min_target must not exceed max_number/max_target")
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        nums = [rng.randint(min_number, max_number) for _ in range(rng.randint(min_numbers, max_numbers))]
        for _ in range(50):  # a few random expressions over these numbers; new numbers if none fits
            found = _random_expression(nums, rng, list(ops))
            if found and min_target <= found[0] <= max_target:
                rows.append({"nums": nums, "target": found[0], "solution": found[1]})
                break
    return rows


def _random_expression(nums: list[int], rng: random.Random, ops: list[str]) -> tuple[int, str] | None:
    """Combine all numbers pairwise in random order with random operators; None if a step is not a
    non-negative whole number."""
    items = [(v, str(v), True) for v in nums]
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ta, atom_a), (b, tb, atom_b) = items[i], items[j]
        op = rng.choice(ops)
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            if b == 0 or a % b:
                return None
            value = a // b
        if value < 0:
            return None
        text = f"{ta if atom_a else f'({ta})'} {op} {tb if atom_b else f'({tb})'}"
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(value, text, False)]
    return items[0][0], items[0][1]


def solve_countdown(nums: list[int], target: int) -> str | None:
    """An expression using every number exactly once that equals `target` (exact rational arithmetic),
    or None. Used to write gold answers for puzzles that come without one (the hub dataset)."""
    target = Fraction(target)
    seen: set = set()

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        key = tuple(sorted(v for v, _ in items))
        if key in seen:
            return None
        seen.add(key)
        for i, j in combinations(range(len(items)), 2):
            (a, ta), (b, tb) = items[i], items[j]
            rest = [x for k, x in enumerate(items) if k not in (i, j)]
            wrap = (lambda t: t if t.lstrip("-").isdigit() else f"({t})")
            candidates = [(a + b, f"{wrap(ta)} + {wrap(tb)}"), (a * b, f"{wrap(ta)} * {wrap(tb)}"),
                          (a - b, f"{wrap(ta)} - {wrap(tb)}"), (b - a, f"{wrap(tb)} - {wrap(ta)}")]
            if b:
                candidates.append((a / b, f"{wrap(ta)} / {wrap(tb)}"))
            if a:
                candidates.append((b / a, f"{wrap(tb)} / {wrap(ta)}"))
            for value, text in candidates:
                found = search(rest + [(value, text)])
                if found:
                    return found
        return None

    return search([(Fraction(int(v)), str(int(v))) for v in nums])


# --------------------------------------------------------------------------------------------------
# Entry points


def generate(source: str, params: dict, seed: int) -> list[dict]:
    """Rows of a builtin generator source (`builtin:arithmetic`, `builtin:countdown`)."""
    kind = source.split(":", 1)[1]
    if kind == "arithmetic":
        return arithmetic(**_params(kind, ARITHMETIC_DEFAULTS, params, seed))
    if kind == "countdown":
        return countdown(**_params(kind, COUNTDOWN_DEFAULTS, params, seed))
    raise UserError(f"data.source: unknown generator {source!r}; use builtin:arithmetic or builtin:countdown")


def write_countdown(out: Path, n: int, seed: int = 0, force: bool = False, **params) -> int:
    """`lowmem-r1 data countdown`: write puzzles as JSON lines (usable as data.source with task countdown)."""
    out = Path(out)
    refuse_existing(out, force, "countdown data")
    rows = countdown(**_params("countdown", COUNTDOWN_DEFAULTS, {"n": n, "seed": seed, **params}, seed))
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
