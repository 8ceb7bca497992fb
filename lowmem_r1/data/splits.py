"""From a recipe's [data] and [prompt] to the train and eval datasets GRPOTrainer consumes.

Order (all deterministic with data.seed): load -> shuffle -> hold out eval rows -> limit -> adapt each row
to the task's columns -> render the prompt -> drop prompts longer than data.max_prompt_length tokens
(TRL 1.x no longer truncates prompts itself).

A prompt is conversational (a list of messages) so TRL applies the model's own chat template. With an
assistant prefix it is a plain string instead, rendered here with `continue_final_message=True`: TRL 1.15
always adds a generation prompt to conversational prompts, which would close the prefix's turn.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.formats import build_messages, check_template, fill_template
from lowmem_r1.data.sources import load_file, load_source
from lowmem_r1.data.tasks import get_task

log = logging.getLogger(__name__)


class Splits(NamedTuple):
    train: Any
    """datasets.Dataset: `prompt` + the task's reward columns."""
    eval: Any | None
    """Held-out rows of the same shape (data.eval_split or data.eval_size), or None."""
    dropped: int
    """Prompts (train + eval) removed for being longer than data.max_prompt_length tokens."""


def load_splits(recipe, tokenizer=None) -> Splits:
    """Train and eval rows for a recipe. With a tokenizer, prompts over data.max_prompt_length tokens
    (chat template applied) are dropped and counted; an assistant prefix needs the tokenizer."""
    train, eval_ = prepare(recipe, tokenizer)
    dropped = 0
    if tokenizer is not None:
        limit = recipe.data.max_prompt_length
        train, d_train = drop_long(train, tokenizer, limit)
        dropped += d_train
        if eval_ is not None:
            eval_, d_eval = drop_long(eval_, tokenizer, limit)
            dropped += d_eval
        if dropped:
            log.warning("data: dropped %d prompt(s) longer than data.max_prompt_length = %d tokens", dropped, limit)
    return Splits(train, eval_, dropped)


def prepare(recipe, tokenizer=None):
    """(train, eval) rows with prompts rendered, before the length filter."""
    data, prompt = recipe.data, recipe.prompt
    if prompt.assistant_prefix and tokenizer is None:
        raise UserError("prompt.assistant_prefix: rendering a prefixed prompt needs the model's tokenizer; "
                        "pass one to load_splits (train and `data preview` do)")
    raw = load_source(data, data.split)
    if data.shuffle:
        raw = raw.shuffle(seed=data.seed, keep_in_memory=True)
    raw_eval = None
    if data.eval_split:
        from pathlib import Path

        is_file = Path(data.eval_split).expanduser().is_file()
        if data.source.startswith("builtin:") and not is_file:
            raise UserError(f"data.eval_split: {data.source} has no named splits; hold out rows with data.eval_size")
        raw_eval = load_file(data.eval_split) if is_file else load_source(data, data.eval_split)
        if data.shuffle:
            raw_eval = raw_eval.shuffle(seed=data.seed, keep_in_memory=True)
        if data.eval_size:
            raw_eval = raw_eval.select(range(min(data.eval_size, len(raw_eval))))
    elif data.eval_size:
        if data.eval_size >= len(raw):
            raise UserError(f"data.eval_size: {data.eval_size} is not less than the {len(raw)} rows of the source; "
                            f"lower it")
        raw_eval = raw.select(range(data.eval_size))
        raw = raw.select(range(data.eval_size, len(raw)))
    if data.limit:
        raw = raw.select(range(min(data.limit, len(raw))))
    train = to_prompts(raw, recipe, tokenizer, "train")
    eval_ = to_prompts(raw_eval, recipe, tokenizer, "eval") if raw_eval is not None else None
    return train, eval_


def to_prompts(raw, recipe, tokenizer=None, name: str = "train"):
    """Adapt every raw row and render its prompt; rows the task cannot use are skipped and logged."""
    import datasets

    data, prompt = recipe.data, recipe.prompt
    task = get_task(data)
    adapt = task.adapter(data)
    template = prompt.user or task.user_template(raw.column_names)
    out_columns = sorted(task.reward_columns(data) or ())
    check_template(template, sorted(set(raw.column_names) | set(out_columns)))
    rows, skipped = [], 0
    for row in raw:
        adapted = adapt(row)
        if adapted is None:
            skipped += 1
            continue
        fields = {**row, **adapted}
        rows.append({"prompt": render_prompt(fill_fields(template, fields), prompt, tokenizer), **adapted})
    if skipped:
        log.warning("data: skipped %d %s row(s) that task '%s' cannot use (no usable answer)", skipped, name, data.task)
    if not rows:
        raise UserError(f"data: no usable {name} rows in {data.source} for task '{data.task}'; check data.task, "
                        f"data.columns and the source")
    return datasets.Dataset.from_list(rows)


def fill_fields(template: str, fields: dict):
    """The user turn; a template that is exactly one field holding a list of messages uses them as is."""
    stripped = template.strip()
    if stripped.startswith("{") and stripped.endswith("}") and isinstance(fields.get(stripped[1:-1]), list):
        return fields[stripped[1:-1]]
    return fill_template(template, fields)


def render_prompt(user, prompt, tokenizer=None):
    """Conversational messages; a plain string (chat template applied, prefix left open) with a prefix."""
    if isinstance(user, list):
        messages = [dict(m) for m in user]
        if prompt.system != "none" and messages[0].get("role") != "system":
            messages = build_messages("", prompt)[:1] + messages
        if prompt.assistant_prefix:
            messages.append({"role": "assistant", "content": prompt.assistant_prefix})
    else:
        messages = build_messages(user, prompt)
    if not prompt.assistant_prefix:
        return messages
    return continue_assistant(messages[:-1], prompt.assistant_prefix, tokenizer)


def continue_assistant(messages: list[dict], prefix: str, tokenizer) -> str:
    """The conversation plus an assistant turn opened with `prefix`, as the text the model continues
    (chat template applied, exactly one BOS once tokenized). Training and `chat` both render this way."""
    turn = {"role": "assistant", "content": prefix}
    return _strip_double_bos(_chat_template(tokenizer, [*messages, turn], continue_final_message=True), tokenizer)


def _chat_template(tokenizer, messages, **kwargs) -> str | list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("model.name: its tokenizer has no chat template; use an Instruct/chat model, or set "
                        "tokenizer.chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _strip_double_bos(text: str, tokenizer) -> str:
    """TRL tokenizes string prompts with special tokens; if the template already wrote the BOS token and the
    tokenizer adds one too (Llama, DeepSeek-R1-Distill), drop the written one so there is exactly one."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("x")["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            return text[len(bos):]
    return text


def prompt_texts(ds, tokenizer) -> list[str]:
    """The prompts exactly as the model will read them (what TRL renders for each)."""
    prompts = ds["prompt"]
    if prompts and isinstance(prompts[0], str):
        return list(prompts)
    return [_chat_template(tokenizer, p, add_generation_prompt=True) for p in prompts]


def prompt_lengths(ds, tokenizer) -> list[int]:
    """Prompt lengths in tokens, counted the way TRL 1.15 tokenizes them (strings with special tokens,
    conversations through the chat template without)."""
    prompts = ds["prompt"]
    texts = prompt_texts(ds, tokenizer)
    special = bool(prompts) and isinstance(prompts[0], str)
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []
    return [len(x) for x in ids]


def drop_long(ds, tokenizer, max_length: int):
    """(rows whose prompt fits in max_length tokens, how many were dropped)."""
    lengths = prompt_lengths(ds, tokenizer)
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    if len(keep) == len(ds):
        return ds, 0
    return ds.select(keep), len(ds) - len(keep)
