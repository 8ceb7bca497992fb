"""Number formats, decided once: the compute dtype, the trainer's bf16/fp16 flags and the 4-bit config.

Training (both backends), chat/eval and doctor all ask here, so a T4 never trains in bf16 on one path and
fp16 on another. `torch.cuda.is_bf16_supported()` counts emulation (True on a T4, where bf16 is slow and
Unsloth refuses it), so the card's native support is asked for (`including_emulation=False`).
"""

from __future__ import annotations

import importlib.util
import logging

from lowmem_r1.core.errors import UserError

log = logging.getLogger("lowmem_r1")


def bf16_supported() -> bool:
    """True when a CUDA card computes bf16 natively (Ampere and newer); False without CUDA."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def torch_dtype(name: str, cuda: bool):
    """The dtype the model is loaded in. `auto`: bf16 on cards that have it, fp16 on older cards, fp32 on
    CPU (CPU half math is slow). `bfloat16` on a card without it becomes fp16, out loud."""
    import torch

    if name == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if bf16_supported() else torch.float16
    if name == "bfloat16" and cuda and not bf16_supported():
        log.warning("model.dtype = bfloat16: this GPU has no native bf16; loading and training in float16")
        return torch.float16
    return getattr(torch, name)


def trainer_flags(dtype) -> dict:
    """GRPOConfig's mixed-precision flags for a model loaded in `dtype` (fp32: neither, full precision)."""
    import torch

    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def nf4_config(compute_dtype, quant_storage: str | None = None):
    """QLoRA's NF4 with double quantization, for training and for chat/eval alike (an adapter is read
    back against the same base weights it was trained on). bitsandbytes runs it on CPU too (0.45+).
    `quant_storage` (model.bnb_4bit_quant_storage): the dtype the packed weights are stored in; ZeRO-3 and
    FSDP2 need it equal to the compute dtype to shard them (the quantized values are the same)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            'model.load_in_4bit: bitsandbytes is not installed; pip install "lowmem-r1[gpu]" or '
            "--set model.load_in_4bit=false"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage else {}),
    )
