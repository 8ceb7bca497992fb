"""Task adapters: one raw row -> the columns the rewards read, plus what a gold answer is made of.

Each adapter returns None for a row it cannot use (a math solution without \\boxed{}, a GSM8K answer
without a number); such rows are skipped and counted, never passed on with a wrong answer.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Callable

from ..errors import UserError

DEFAULT_USER: dict[str, str] = {
    "arithmetic": "{question}",
    "gsm8k": "{question}",
    "countdown": ("Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
                  "operations (+, -, *, /) and each number can only be used once."),
    "math": "{problem}",
}
"""The user message when the recipe sets no prompt.user: the question as it is. Format instructions
belong to the system prompt (or to a custom template), so the same default works with every preset."""

_CALC = re.compile(r"<<[^<>]*>>")


def _number_text(s: str) -> str | None:
    """GSM8K's final answer: the text after ####, without thousands separators and dollar signs."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        float(s)
    except ValueError:
        return None
    return s


def gsm8k(row: dict) -> dict | None:
    raw = str(row.get("answer") or "")
    if "####" not in raw:
        return None
    work, final = raw.rsplit("####", 1)
    answer = _number_text(final)
    if answer is None:
        return None
    solution = _CALC.sub("", work).strip()
    return {"question": str(row["question"]), "answer": answer, "solution": solution}


def countdown(row: dict) -> dict | None:
    nums, target = row.get("nums"), row.get("target")
    if isinstance(nums, str):  # csv files store the list as text
        try:
            nums = ast.literal_eval(nums)
        except (ValueError, SyntaxError):
            return None
    try:
        return {"nums": [int(x) for x in nums], "target": int(target)}
    except (TypeError, ValueError):
        return None


def math(row: dict) -> dict | None:
    from ..rewards.extract import last_boxed

    problem, solution = row.get("problem"), row.get("solution")
    if not problem or not solution:
        return None
    answer = row.get("answer") or last_boxed(str(solution))
    if not answer:
        return None
    return {"problem": str(problem), "solution": str(solution), "answer": str(answer)}


def arithmetic(row: dict) -> dict | None:
    if row.get("question") is None or row.get("answer") is None:
        return None
    return {"question": str(row["question"]), "answer": str(row["answer"])}


ADAPTERS: dict[str, Callable[[dict], dict | None]] = {
    "arithmetic": arithmetic, "gsm8k": gsm8k, "countdown": countdown, "math": math,
}


def adapter(data) -> Callable[[dict], dict | None]:
    """The adapter of `data.task`; `generic` copies the columns named in data.columns."""
    if data.task != "generic":
        return ADAPTERS[data.task]
    mapping = dict(data.columns)

    def generic(row: dict) -> dict | None:
        missing = [src for src in mapping.values() if src not in row]
        if missing:
            raise UserError(f"data.columns: dataset has no column {missing[0]!r}; its columns: {sorted(row)}")
        return {dst: row[src] for dst, src in mapping.items()}

    return generic


def default_user_template(data, columns: list[str]) -> str:
    if data.task in DEFAULT_USER:
        return DEFAULT_USER[data.task]
    for name in ("prompt", "question", "problem", "input", "instruction"):
        if name in columns:
            return "{" + name + "}"
    raise UserError(f"prompt.user: task 'generic' needs a user template, e.g. user = \"{{{columns[0]}}}\" "
                    f"(dataset columns: {columns})")


# --------------------------------------------------------------------------------------------------
# Gold answers (for `rewards check`, `data preview` and the tests)


def gold_parts(row: dict, data) -> tuple[str, str]:
    """(reasoning, final answer) of a prepared row, as a correct completion would contain them."""
    task = data.task
    if task == "arithmetic":
        expr = re.fullmatch(r"\s*What is (.+?)\?\s*", row["question"])
        return (f"{expr.group(1)} = {row['answer']}" if expr else "", str(row["answer"]))
    if task == "gsm8k":
        return row.get("solution") or "", str(row["answer"])
    if task == "math":
        return row["solution"], str(row["answer"])
    if task == "countdown":
        from .generators import solve_countdown

        equation = solve_countdown(row["nums"], row["target"])
        if equation is None:
            raise UserError(f"countdown row {row['nums']} -> {row['target']} has no solution")
        return f"Using {row['nums']} to reach {row['target']}: {equation} = {row['target']}", equation
    if "answer" not in row:
        raise UserError("task 'generic': a gold answer needs an `answer` column; map one in data.columns "
                        "(answer = \"<your column>\")")
    return "", str(row["answer"])


def describe_value(value: Any, width: int = 160) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."
