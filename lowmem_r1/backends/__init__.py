"""Backends load the model + tokenizer + LoRA and say which trainer settings differ. Selection lives here.

    hf       transformers + peft (+ bitsandbytes NF4 when model.load_in_4bit) + TRL's GRPOTrainer.
    unsloth  Unsloth's FastLanguageModel (4-bit, fused kernels, colocated vLLM) + TRL's GRPOTrainer.
    auto     unsloth when CUDA and unsloth are both present, else hf - and it says so.

A backend is any object with:
    name: str
    load(recipe) -> (peft_model, tokenizer)
    grpo_overrides(recipe) -> dict        extra GRPOConfig keyword arguments
    load_for_inference(base, adapter=None) -> (model, tokenizer)

Unsloth must be imported before trl/transformers/peft in a process, so `select` is called before the
trainer imports anything heavy.
"""

from __future__ import annotations

import importlib.util

from ..errors import UserError


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def choose(backend: str) -> tuple[str, str]:
    """The backend name to use and why, without importing it."""
    if backend == "hf":
        return "hf", "asked for in the recipe (model.backend = 'hf')"
    if backend == "unsloth":
        return "unsloth", "asked for in the recipe (model.backend = 'unsloth')"
    cuda, unsloth = cuda_available(), unsloth_installed()
    if cuda and unsloth:
        return "unsloth", "auto: CUDA and unsloth are present"
    if cuda:
        return "hf", 'auto: CUDA is present but unsloth is not installed (pip install "lowmem-r1[gpu]")'
    return "hf", "auto: no CUDA device, training on CPU with transformers + peft + TRL"


def select(recipe):
    """The backend object for a recipe."""
    name, _why = choose(recipe.model.backend)
    if name == "unsloth":
        from .unsloth import UnslothBackend

        return UnslothBackend()
    from .hf import HFBackend

    return HFBackend()


__all__ = ["choose", "select", "cuda_available", "unsloth_installed", "UserError"]
