"""Prefill each distinct prompt once and copy its key/value cache to every row that repeats it (a GRPO
group, `eval -k`, `sample -k`): same tokens as plain `generate`, less compute. The GRPO loss forward
reuses `prefill` (lowmem_r1/training/grpo/shared_prompts.py)."""

from __future__ import annotations

from collections.abc import Callable


def distinct_rows(ids, mask):
    """(distinct rows of ids|mask, each row's index among them), or None when no row repeats."""
    import torch

    distinct, rows = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(ids):
        return None
    width = ids.shape[1]
    return distinct[:, :width], distinct[:, width:], rows


def prefill(run: Callable, config, ids, mask, rows):
    """`run(input_ids, attention_mask, past_key_values)` on the distinct rows, then their cache copied to
    every row; None when the model's cache is not plain full attention or was not filled."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not bool(mask.any(dim=1).all()):  # a row of padding alone: nothing to cache
        return None
    cache = DynamicCache(config=config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding windows, linear attention
        return None
    run(ids, mask, cache)
    if cache.get_seq_length() != ids.shape[1]:  # e.g. gradient checkpointing turned caching off
        return None
    cache.batch_select_indices(rows.to(ids.device))
    return cache


def generate_sharing_prompts(generate: Callable, model, input_ids, attention_mask, **kwargs):
    """`generate(input_ids=..., attention_mask=..., **kwargs)` with each distinct prompt row prefilled once
    (SmolLM2-135M on 2 cores, 32 rows of a 47-token prompt, 12 new tokens: the prefill was 2.0 of 3.9 s).
    Plain `generate` when there is nothing to share or the call is not the plain left-padded kind."""
    import torch

    config = kwargs.get("generation_config")
    shared = None
    if not (kwargs.keys() - {"generation_config"} or input_ids.shape[1] < 2
            or (getattr(config, "num_return_sequences", None) or 1) != 1
            or (getattr(config, "num_beams", None) or 1) != 1
            or getattr(config, "cache_implementation", None) is not None):
        shared = distinct_rows(input_ids, attention_mask)
    if shared is not None:
        ids, mask, rows = shared
        ids, mask = ids[:, :-1], mask[:, :-1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows

        def run(i, m, cache):
            with torch.no_grad():
                model(input_ids=i, attention_mask=m, position_ids=positions, past_key_values=cache, use_cache=True)

        cache = prefill(run, model.config, ids, mask, rows)
        if cache is not None:
            return generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **kwargs)
    return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
