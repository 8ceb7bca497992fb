"""SFT data: every source as TRL's prompt-completion rows (a `messages` or ShareGPT `conversations` column,
`prompt` + `completion` columns, or a task's gold answers written in the recipe's answer format)."""

from __future__ import annotations

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.formats import after_prefix, gold_completion
from lowmem_r1.data.sources import load_source, peek_rows
from lowmem_r1.data.splits import to_prompts
from lowmem_r1.data.tasks import get_task

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def data_kind(columns) -> str:
    """`messages`, `conversations`, `prompt_completion` or `task` (gold answers of data.task)."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "conversations"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    return "task"


def split_messages(messages, where: str) -> dict:
    """{"prompt": turns before the last assistant turn, "completion": [that turn]}."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"{where}: `messages` must be a list of {{role, content}} turns")
    turns = [_chatml(m) for m in messages]
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: a conversation with no assistant turn; SFT learns the assistant's answer, so "
                        f"every row needs one (drop such rows or fix the data)")
    if last == 0:
        raise UserError(f"{where}: the conversation starts with the assistant turn; give it a user turn first")
    return {"prompt": turns[:last], "completion": [turns[last]]}


def _chatml(m: dict) -> dict:
    if "role" in m:
        return {"role": m["role"], "content": m.get("content") or ""}
    role = SHAREGPT_ROLES.get(str(m.get("from")), str(m.get("from")))
    return {"role": role, "content": m.get("value") or ""}


def to_prompt_completion(raw, recipe, tokenizer=None, name: str = "train"):
    """Rows in TRL's prompt-completion format (plus the task's columns when the rows have them)."""
    import datasets

    kind = data_kind(raw.column_names)
    if kind in ("messages", "conversations"):
        rows = []
        for i, row in enumerate(raw):
            rows.append(split_messages(row[kind], f"data.source {recipe.data.source}: {name} row {i}"))
        return datasets.Dataset.from_list(rows)
    if kind == "prompt_completion":
        return raw.select_columns(["prompt", "completion"])
    if recipe.data.task == "generic":
        raise UserError(_no_columns(recipe, raw.column_names))
    prompts = to_prompts(raw, recipe, tokenizer, name)
    out = []
    for row in prompts:
        text = gold_completion(row, recipe)
        if isinstance(row["prompt"], str):  # an assistant prefix: the prompt is rendered text, left open
            out.append({"prompt": row["prompt"], "completion": after_prefix(text, recipe.prompt.assistant_prefix)})
        else:
            out.append({"prompt": row["prompt"], "completion": [{"role": "assistant", "content": text}]})
    return datasets.Dataset.from_list(out)


def _no_columns(recipe, columns) -> str:
    return (f"data.source {recipe.data.source}: an SFT stage needs a `messages` column, `prompt` + `completion` "
            f"columns, or data.task with gold answers (arithmetic, gsm8k, math, countdown); it has columns "
            f"{sorted(columns)}")


def load_sft_splits(recipe, tokenizer):
    """(train, eval) prompt-completion datasets: load -> shuffle -> hold out -> limit -> convert."""
    data = recipe.data
    raw = load_source(data, data.split)
    if data.shuffle:
        raw = raw.shuffle(seed=data.seed, keep_in_memory=True)
    if data.eval_size and not data.eval_split:
        if data.eval_size >= len(raw):
            raise UserError(f"data.eval_size: {data.eval_size} is not less than the {len(raw)} rows of the source")
        raw = raw.select(range(data.eval_size, len(raw)))  # the same rows `eval` holds out
    if data.limit:
        raw = raw.select(range(min(data.limit, len(raw))))
    train = to_prompt_completion(raw, recipe, tokenizer)
    if len(train) == 0:
        raise UserError(f"data.source {data.source}: no SFT rows")
    return train


def drop_long(ds, tokenizer, max_length: int):
    """(rows whose prompt + completion fit in max_length tokens, how many were dropped). TRL would cut the
    others at max_length, and a cut answer teaches the model never to end its turn."""
    def length(row) -> int:
        if isinstance(row["prompt"], str):
            return len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1  # + the EOS TRL adds
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
        return len(ids["input_ids"])

    keep = [i for i, row in enumerate(ds) if length(row) <= max_length]
    return (ds, 0) if len(keep) == len(ds) else (ds.select(keep), len(ds) - len(keep))


def check_sft_data(recipe, source: str = "<recipe>") -> None:
    """What --dry-run can check without loading anything heavy: a local JSON Lines / JSON file's columns
    and that every conversation has an assistant turn. Builtin generators always have gold answers; hub
    datasets and other formats are checked when loaded."""
    rows = peek_rows(recipe.data.source, source)
    if rows is None:
        return
    kind = data_kind(rows[0])
    if kind == "task" and recipe.data.task == "generic":
        raise UserError(f"{source}: {_no_columns(recipe, rows[0])}")
    if kind == "task":
        need = get_task(recipe.data).raw_columns
        missing = [c for c in need if c not in rows[0]]
        if missing:
            raise UserError(f"{source}: {_no_columns(recipe, rows[0])}; task '{recipe.data.task}' also lacks "
                            f"{missing}")
    if kind in ("messages", "conversations"):
        for i, row in enumerate(rows):
            split_messages(row.get(kind), f"{source}: data.source {recipe.data.source} row {i}")
