"""`stage = "sft"`: supervised fine-tuning on reasoning traces (cold start, rejection-sampled or distilled
data) with TRL's SFTTrainer, through the same backends, run directory, checkpoints and display as GRPO.

Every source becomes TRL's *prompt-completion* format, so the loss falls on the assistant's answer only
(TRL's completion_only_loss; the prompt's labels are -100). Not assistant_only_loss: that needs a chat
template with `{% generation %}` markers, and most templates (SmolLM2's, Qwen2.5's) have none.

Where rows come from (the recipe's [data], loaded like GRPO's):
- a `messages` column (or ShareGPT `conversations`): everything before the last assistant turn is the
  prompt, the last assistant turn the completion;
- `prompt` + `completion` columns, as they are;
- otherwise a task with gold answers (arithmetic, gsm8k, math, countdown): the GRPO prompt and the gold
  answer written in the recipe's answer format (`data.gold_completion`) - generated worked traces.
"""

from __future__ import annotations

from .data import get_task
from .data.formats import after_prefix, gold_completion
from .data.sources import load_source, peek_rows
from .data.splits import to_prompts
from .errors import UserError
from .rundir import staged_trainer

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


# --------------------------------------------------------------------------------------------------
# Data


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
    if recipe.stage != "sft":
        return
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


# --------------------------------------------------------------------------------------------------
# Trainer


def sft_kwargs(recipe, run) -> dict:
    """The recipe's [training] section as SFTConfig keyword arguments (what GRPO-only keys mean nothing
    here: num_generations, beta, loss_type, ... are ignored)."""
    return dict(
        **recipe.trainer_args(run.checkpoints),
        max_length=recipe.model.max_seq_length,
        completion_only_loss=True,  # labels -100 on the prompt: learn the answers, not the questions
        packing=False,
        dataset_num_proc=None,
    )


def build_trainer(recipe, run, backend, model, tokenizer, callbacks, console):
    """SFTTrainer (checkpoints staged and renamed like GRPO's) on the recipe's data."""
    from trl import SFTConfig, SFTTrainer

    train_ds, dropped = drop_long(load_sft_splits(recipe, tokenizer), tokenizer, recipe.model.max_seq_length)
    if dropped:
        console.print(f"[yellow]sft:[/] dropped {dropped} example(s) longer than model.max_seq_length = "
                      f"{recipe.model.max_seq_length} tokens (TRL would cut their answers off)")
    if len(train_ds) == 0:
        raise UserError(f"model.max_seq_length = {recipe.model.max_seq_length}: every SFT example is longer; raise it")
    console.print(f"[bold]sft:[/] {len(train_ds)} training rows, loss on the completion (assistant) tokens only")
    overrides = {k: v for k, v in backend.grpo_overrides(recipe).items() if not k.startswith("vllm") and k != "use_vllm"}
    config = SFTConfig(**{**sft_kwargs(recipe, run), **overrides})
    return staged_trainer(SFTTrainer)(
        model=model, processing_class=tokenizer, args=config, train_dataset=train_ds, callbacks=callbacks,
    )
