"""`lowmem-r1 data preview`: the prompts exactly as the model will read them, before any training.

Shows n rendered prompts (chat template applied, as TRL will render them) beside their reward columns
and a gold completion in the recipe's answer format, then the prompt length distribution in tokens and
how many prompts data.max_prompt_length would drop.
"""

from __future__ import annotations

import statistics
from typing import Any

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.formats import answer_format, gold_completion
from lowmem_r1.data.splits import prepare, prompt_lengths, prompt_texts
from lowmem_r1.models.names import resolve_model


def describe_value(value: Any, width: int = 160) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def load_tokenizer(model):
    """The tokenizer of recipe.model (a builtin alias, a local folder, a .gguf file or a hub id)."""
    from transformers import AutoTokenizer

    path = resolve_model(model.name)
    try:
        return AutoTokenizer.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception as e:
        raise UserError(f"model.name {model.name}: cannot load its tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                        f"download the model once or pass --set model.name=<local folder>") from None


def preview(recipe, n: int = 3, tokenizer=None) -> str:
    """The preview as plain text (no markup: prompts may contain brackets and tags)."""
    if n < 0:
        raise UserError("-n: must be 0 or more")
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    train, eval_ = prepare(recipe, tokenizer)
    texts = prompt_texts(train.select(range(min(n, len(train)))), tokenizer)
    lengths = prompt_lengths(train, tokenizer)
    data, limit = recipe.data, recipe.data.max_prompt_length
    fmt = answer_format(recipe.prompt)
    kind = "plain string (assistant prefix)" if recipe.prompt.assistant_prefix else "conversational (chat template)"
    out = [
        f"source: {data.source}" + (f" ({data.config})" if data.config else "") + f"  split: {data.split}  "
        f"task: {data.task}  answer format: {fmt}  prompts: {kind}",
        f"rows: {len(train)} train, {len(eval_) if eval_ is not None else 0} eval",
    ]
    for i, text in enumerate(texts):
        row = train[i]
        out.append(f"\n=== prompt {i + 1} of {len(texts)} ({lengths[i]} tokens) " + "=" * 30)
        out.append(text)
        out.append("--- reward columns ---")
        out.extend(f"{k}: {describe_value(v)}" for k, v in row.items() if k != "prompt")
        out.append(f"--- a correct completion ({fmt}) ---")
        try:
            out.append(gold_completion(row, recipe))
        except UserError as e:
            out.append(f"(none: {e})")
    out.append("\n=== prompt length (tokens, chat template applied) " + "=" * 20)
    out.extend(length_summary(lengths, limit))
    return "\n".join(out)


def length_summary(lengths: list[int], limit: int, bins: int = 8, width: int = 40) -> list[str]:
    if not lengths:
        return ["no prompts"]
    q = sorted(lengths)

    def pct(p: float) -> int:
        return q[min(len(q) - 1, int(p * (len(q) - 1) + 0.5))]

    over = sum(1 for x in lengths if x > limit)
    lines = [
        f"min {q[0]}  median {int(statistics.median(q))}  p90 {pct(0.9)}  p99 {pct(0.99)}  max {q[-1]}",
        f"over data.max_prompt_length = {limit}: {over} of {len(q)} ({100 * over / len(q):.1f}%) "
        + ("would be dropped" if over else "(none dropped)"),
    ]
    lo, hi = q[0], q[-1]
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for x in q:
        counts[min(bins - 1, (x - lo) // step)] += 1
    top = max(counts)
    for b, c in enumerate(counts):
        if lo + b * step > hi:
            break
        bar = "#" * (round(width * c / top) if top else 0)
        lines.append(f"{lo + b * step:>6}-{lo + (b + 1) * step - 1:<6} {c:>7}  {bar}")
    return lines
