"""The arithmetic and Countdown generators: seeded, reproducible, and every Countdown task solvable."""

from __future__ import annotations

import ast
import json
import operator
from fractions import Fraction
from itertools import combinations

import pytest
from typer.testing import CliRunner

from lowmem_r1.cli import app
from lowmem_r1.data.generators import arithmetic, countdown, solve_countdown


def reachable(nums: list[int]) -> set[Fraction]:
    """Every value reachable using all of `nums` once with + - * / (brute force over all expression trees)."""
    values = [Fraction(n) for n in nums]
    memo: dict[tuple, set] = {}

    def go(idx: tuple[int, ...]) -> set:
        if len(idx) == 1:
            return {values[idx[0]]}
        if idx in memo:
            return memo[idx]
        out = set()
        rest = idx[1:]
        for k in range(len(rest) + 1):  # split idx into two non-empty parts (first element on the left)
            for right in combinations(rest, k):
                left = (idx[0],) + tuple(i for i in rest if i not in right)
                if not right:
                    continue
                for a in go(left):
                    for b in go(tuple(right)):
                        out |= {a + b, a - b, b - a, a * b}
                        if b:
                            out.add(a / b)
                        if a:
                            out.add(b / a)
        memo[idx] = out
        return out

    return go(tuple(range(len(values))))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an equation and the numbers it uses."""
    used: list[int] = []

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"not an equation: {expr}")

    return ev(ast.parse(expr, mode="eval").body), used


def test_countdown_tasks_are_all_solvable():
    rows = countdown(n=300, seed=7)
    assert len(rows) == 300
    assert {len(r["nums"]) for r in rows} == {3, 4}
    for r in rows:
        assert all(1 <= x <= 99 for x in r["nums"]) and 1 <= r["target"] <= 100
        assert Fraction(r["target"]) in reachable(r["nums"]), r  # independent brute force
        value, used = evaluate(r["solution"])
        assert value == r["target"] and sorted(used) == sorted(r["nums"]), r


def test_countdown_is_seeded():
    assert countdown(n=50, seed=3) == countdown(n=50, seed=3)
    assert countdown(n=50, seed=3) != countdown(n=50, seed=4)
    small = countdown(n=40, seed=1, min_numbers=4, max_numbers=4, max_number=10, max_target=20)
    assert all(len(r["nums"]) == 4 and max(r["nums"]) <= 10 and r["target"] <= 20 for r in small)


def test_solver_agrees_with_brute_force():
    cases = [([44, 19, 35], 98), ([63, 95, 96], 64), ([2, 3, 4], 14), ([1, 1, 1], 7), ([3, 3, 8, 8], 24)]
    for nums, target in cases:
        found = solve_countdown(nums, target)
        if Fraction(target) in reachable(nums):
            value, used = evaluate(found)
            assert value == target and sorted(used) == sorted(nums)
        else:
            assert found is None
    assert solve_countdown([1, 1, 1], 7) is None
    assert evaluate(solve_countdown([3, 3, 8, 8], 24))[0] == 24  # needs a fraction: 8 / (3 - 8 / 3)


def test_arithmetic_answers_are_right_and_seeded():
    rows = arithmetic(n=200, seed=5, ops=["+", "-", "*"])
    assert rows == arithmetic(n=200, seed=5, ops=["+", "-", "*"])
    for r in rows:
        expr = r["question"].removeprefix("What is ").removesuffix("?")
        assert str(int(evaluate(expr)[0])) == r["answer"] and int(r["answer"]) >= 0
    assert all(r["question"].count("+") == 1 for r in arithmetic(n=20, seed=0))


def test_cli_writes_puzzles_and_keeps_existing_files(tmp_path):
    out = tmp_path / "cd.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "countdown", "--n", "25", "--out", str(out), "--seed", "3"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == countdown(n=25, seed=3)
    res = runner.invoke(app, ["data", "countdown", "--n", "5", "--out", str(out)])
    assert res.exit_code != 0 and len(out.read_text().splitlines()) == 25
    res = runner.invoke(app, ["data", "countdown", "--n", "5", "--out", str(out), "--force"])
    assert res.exit_code == 0 and len(out.read_text().splitlines()) == 5


@pytest.mark.parametrize("bad", [{"ops": ["^"]}, {"n": 0}, {"min_numbers": 5, "max_numbers": 4}])
def test_bad_generator_parameters_are_user_errors(bad):
    from lowmem_r1.core.errors import UserError
    from lowmem_r1.data.generators import generate

    with pytest.raises(UserError):
        generate("builtin:countdown", bad, 0)
