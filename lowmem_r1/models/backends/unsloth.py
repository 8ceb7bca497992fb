"""Unsloth: 4-bit QLoRA with fused kernels and a vLLM engine that shares the model's weights.

This is the path that makes Qwen2.5-3B GRPO fit one 24 GB card. `import unsloth` rewrites TRL's
GRPOTrainer / GRPOConfig in trl's own namespaces, so it must run before trl, transformers or peft are
imported in the process: `prepare()` does it (select() calls it), and the trainer imports `trl` after.

Without a GPU, Unsloth (2026.10+) selects its CPU backend on import: FastLanguageModel is then plain
transformers + PEFT, GPU-only keywords (fast_inference, max_lora_rank, gpu_memory_utilization) are
dropped or refused, `adamw_8bit` becomes fused AdamW and TRL's trainer is left unpatched. The tests run
this file end to end there; the keyword arguments of the GPU path are checked against the installed
Unsloth and TRL source, because nothing here can execute it.
"""

from __future__ import annotations

import logging
import os
import sys

from lowmem_r1.core.errors import UserError
from lowmem_r1.models import backends
from lowmem_r1.models.backends import lora_kwargs, vllm_server_kwargs
from lowmem_r1.models.names import resolve_model
from lowmem_r1.models.precision import torch_dtype, trainer_flags

log = logging.getLogger("lowmem_r1")

# Imported before unsloth, they would miss its patches (Unsloth warns; TRL's trainer may stay unpatched).
MUST_COME_AFTER = ("trl", "transformers", "peft")


def prepare(standby: bool = False):
    """Import unsloth (once), first. UNSLOTH_VLLM_STANDBY is read at import time, so it is set here."""
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    if standby:
        os.environ["UNSLOTH_VLLM_STANDBY"] = "1"
    early = [m for m in MUST_COME_AFTER if m in sys.modules]
    if early and _cuda():
        log.warning(
            "unsloth: %s already imported before unsloth; Unsloth's patches may be incomplete "
            "(import lowmem_r1.models.backends and call select() first)", ", ".join(early)
        )
    try:
        import unsloth  # noqa: F401  (patches trl / transformers / peft in place)
    except ImportError as e:
        raise UserError(
            f'model.backend = "unsloth": unsloth cannot be imported ({e}); pip install "lowmem-r1[gpu]", '
            f"or --set model.backend=hf"
        ) from None
    return sys.modules["unsloth"]


def _cuda() -> bool:
    return backends.cuda_available()  # looked up per call: tests patch it


# --------------------------------------------------------------------------------------------------
# The keyword arguments, as pure functions: the tests check each name against the installed signatures.


def dtype_arg(name: str, cuda: bool):
    """On a GPU the dtype the trainer is told too (precision.torch_dtype: bf16 only where the card has it
    natively, else fp16 - Unsloth would load fp16 and then refuse a bf16 trainer). On CPU, `auto` lets
    Unsloth's CPU backend choose."""
    if cuda:
        return torch_dtype(name, cuda)
    if name == "auto":
        return None
    import torch

    return getattr(torch, name)


def from_pretrained_kwargs(recipe, cuda: bool) -> dict:
    """FastLanguageModel.from_pretrained(**...). vLLM settings only on a GPU (the CPU backend refuses
    fast_inference; select() already turned a CPU run with fast_inference into a clear error)."""
    m = recipe.model
    kwargs = dict(
        model_name=resolve_model(m.name),
        max_seq_length=m.max_seq_length,
        dtype=dtype_arg(m.dtype, cuda),
        load_in_4bit=m.load_in_4bit,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        random_state=recipe.training.seed,
    )
    if cuda:
        kwargs.update(
            fast_inference=m.fast_inference,
            max_lora_rank=m.max_lora_rank,
            gpu_memory_utilization=m.gpu_memory_utilization,
        )
    return kwargs


def peft_kwargs(recipe, cuda: bool) -> dict:
    """FastLanguageModel.get_peft_model(model, **...). On a GPU always Unsloth's offloaded gradient
    checkpointing (activations go to host RAM: the largest saving after 4-bit); on CPU as the recipe says."""
    lora, t = recipe.lora, recipe.training
    checkpointing = "unsloth" if (cuda or t.gradient_checkpointing) else False
    return dict(**lora_kwargs(lora), use_gradient_checkpointing=checkpointing, random_state=t.seed)


def gpu_grpo_overrides(recipe, dtype) -> dict:
    """GRPOConfig settings on a CUDA card for a model loaded in `dtype` (dtype_arg): colocated vLLM
    (Unsloth's engine when fast_inference, which its patched trainer reuses), the same mixed precision as
    the hf backend (precision.trainer_flags: bf16, fp16, or neither for float32). Only keys the trainer's common
    arguments do not set (training/run.py spreads both into GRPOConfig): 8-bit AdamW is the recipe's
    `training.optim = "adamw_8bit"` (the GPU recipes set it; bitsandbytes runs it on CPU too)."""
    m, g = recipe.model, recipe.generation
    out: dict = trainer_flags(dtype)
    if m.fast_inference:
        out.update(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=m.gpu_memory_utilization,
            vllm_enable_sleep_mode=m.vllm_standby,
        )
    elif g.use_vllm:
        out.update(
            use_vllm=True,
            vllm_mode=g.vllm_mode,
            vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
            **vllm_server_kwargs(g),  # vllm_mode = "server": where `lowmem-r1 serve` listens
        )
    return out


# --------------------------------------------------------------------------------------------------


class UnslothBackend:
    name = "unsloth"
    why = ""  # set by select(): why this backend was chosen

    def __init__(self, standby: bool = False):
        self.standby = standby

    def prepare(self):
        return prepare(self.standby)

    def load(self, recipe):
        cuda = _cuda()
        unsloth = prepare(recipe.model.vllm_standby)
        fast = unsloth.FastLanguageModel
        try:
            model, tok = fast.from_pretrained(**from_pretrained_kwargs(recipe, cuda))
        except NotImplementedError as e:  # e.g. fast_inference on Unsloth's CPU backend
            raise UserError(f"model: unsloth cannot load this recipe here ({e}); see `lowmem-r1 doctor RECIPE`") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = fast.get_peft_model(model, **peft_kwargs(recipe, cuda))
        return model, tok

    def grpo_overrides(self, recipe) -> dict:
        if not _cuda():
            return {"use_cpu": True}
        return gpu_grpo_overrides(recipe, dtype_arg(recipe.model.dtype, cuda=True))

