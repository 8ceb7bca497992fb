"""Tasks: everything the toolkit knows about one kind of problem, in one class (nanochat's tasks/ is the
model), and the registry every other module looks a task up in.

A task owns the columns it gives the rewards, the columns its usual source has, the adapter from a raw
row to those columns, the default user message, how a correct completion is made of a row (the gold
answer), which column holds the single right answer, and the rewards `eval --task` scores by default.

Adding a task: write a subclass of Task below and add an instance to TASKS. The recipe's accepted
`data.task` values and the CLI help come from TASKS.

An adapter returns None for a row it cannot use (a math solution without \\boxed{}, a GSM8K answer
without a number); such rows are skipped and counted, never passed on with a wrong answer.
"""

from __future__ import annotations

import ast
import re
from typing import Callable

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.generators import solve_countdown
from lowmem_r1.rewards.extract import last_boxed


class Task:
    name: str = ""
    columns: tuple[str, ...] = ()
    """Columns the task gives the rewards besides `prompt`."""
    raw_columns: tuple[str, ...] = ()
    """Columns the rows of the task's usual source have (its hub dataset, its generator)."""
    user: str | None = None
    """The user message when the recipe sets no prompt.user: the question as it is. Format instructions
    belong to the system prompt (or to a custom template), so the same default works with every preset."""
    gold_column: str | None = "answer"
    """The column holding the single right answer (None: many answers are right)."""
    rewards: tuple[str, ...] = ("answer_match",)
    """Rewards scored when a model is evaluated on --data/--task without a recipe."""

    def adapt(self, row: dict) -> dict | None:
        """One raw row -> the columns the rewards read; None for a row the task cannot use."""
        raise NotImplementedError

    def gold(self, row: dict) -> tuple[str, str]:
        """(reasoning, final answer) of a prepared row, as a correct completion would contain them."""
        return "", str(row["answer"])

    # What a recipe's [data] section can change (only `generic` uses it).

    def reward_columns(self, data) -> set[str] | None:
        """Columns the rewards get besides `prompt`; None when unknown before loading."""
        return set(self.columns)

    def adapter(self, data) -> Callable[[dict], dict | None]:
        return self.adapt

    def user_template(self, dataset_columns: list[str]) -> str:
        return self.user


class Arithmetic(Task):
    """builtin:arithmetic: "What is 3 + 5?" -> 8."""

    name = "arithmetic"
    columns = raw_columns = ("question", "answer")
    user = "{question}"

    def adapt(self, row: dict) -> dict | None:
        if row.get("question") is None or row.get("answer") is None:
            return None
        return {"question": str(row["question"]), "answer": str(row["answer"])}

    def gold(self, row: dict) -> tuple[str, str]:
        expr = re.fullmatch(r"\s*What is (.+?)\?\s*", row["question"])
        return (f"{expr.group(1)} = {row['answer']}" if expr else "", str(row["answer"]))


_CALC = re.compile(r"<<[^<>]*>>")


class GSM8K(Task):
    """openai/gsm8k. `answer`: the number after ####, without thousands separators and dollar signs;
    `solution`: the worked solution without the #### line and calculator annotations."""

    name = "gsm8k"
    columns = ("question", "answer", "solution")
    raw_columns = ("question", "answer")
    user = "{question}"

    def adapt(self, row: dict) -> dict | None:
        raw = str(row.get("answer") or "")
        if "####" not in raw:
            return None
        work, final = raw.rsplit("####", 1)
        answer = final.replace(",", "").replace("$", "").strip().rstrip(".")
        try:
            float(answer)
        except ValueError:
            return None
        return {"question": str(row["question"]), "answer": answer, "solution": _CALC.sub("", work).strip()}

    def gold(self, row: dict) -> tuple[str, str]:
        return row.get("solution") or "", str(row["answer"])


class Countdown(Task):
    """builtin:countdown or a file of {nums, target}: reach the target with + - * /, each number once. Many
    expressions are right, so there is no gold column; the gold answer is one the solver finds."""

    name = "countdown"
    columns = raw_columns = ("nums", "target")
    user = ("Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
            "operations (+, -, *, /) and each number can only be used once.")
    gold_column = None
    rewards = ("countdown_equation",)

    def adapt(self, row: dict) -> dict | None:
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

    def gold(self, row: dict) -> tuple[str, str]:
        equation = solve_countdown(row["nums"], row["target"])
        if equation is None:
            raise UserError(f"countdown row {row['nums']} -> {row['target']} has no solution")
        return f"Using {row['nums']} to reach {row['target']}: {equation} = {row['target']}", equation


class Math(Task):
    """MATH / NuminaMath rows {problem, solution}; `answer`: the row's own, else the solution's last \\boxed{}."""

    name = "math"
    columns = ("problem", "solution", "answer")
    raw_columns = ("problem", "solution")
    user = "{problem}"
    rewards = ("math_accuracy",)

    def adapt(self, row: dict) -> dict | None:
        problem, solution = row.get("problem"), row.get("solution")
        if not problem or not solution:
            return None
        answer = row.get("answer") or last_boxed(str(solution))
        if not answer:
            return None
        return {"problem": str(problem), "solution": str(solution), "answer": str(answer)}

    def gold(self, row: dict) -> tuple[str, str]:
        return row["solution"], str(row["answer"])


class Generic(Task):
    """Any dataset: data.columns maps reward column -> dataset column (e.g. answer = "label")."""

    name = "generic"

    def reward_columns(self, data) -> set[str] | None:
        return set(data.columns) or None

    def adapter(self, data) -> Callable[[dict], dict | None]:
        mapping = dict(data.columns)

        def generic(row: dict) -> dict | None:
            missing = [src for src in mapping.values() if src not in row]
            if missing:
                raise UserError(f"data.columns: dataset has no column {missing[0]!r}; its columns: {sorted(row)}")
            return {dst: row[src] for dst, src in mapping.items()}

        return generic

    def user_template(self, dataset_columns: list[str]) -> str:
        for name in ("prompt", "question", "problem", "input", "instruction"):
            if name in dataset_columns:
                return "{" + name + "}"
        raise UserError(f"prompt.user: task 'generic' needs a user template, e.g. user = \"{{{dataset_columns[0]}}}\" "
                        f"(dataset columns: {dataset_columns})")

    def gold(self, row: dict) -> tuple[str, str]:
        if "answer" not in row:
            raise UserError("task 'generic': a gold answer needs an `answer` column; map one in data.columns "
                            "(answer = \"<your column>\")")
        return "", str(row["answer"])


TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), GSM8K(), Countdown(), Math(), Generic())}
"""Every task by its `data.task` name; the recipe accepts exactly these."""


def get_task(data) -> Task:
    """The task of a recipe's [data] section."""
    return TASKS[data.task]
