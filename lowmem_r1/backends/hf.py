"""transformers + peft (+ bitsandbytes NF4) + TRL's GRPOTrainer: the path that runs everywhere."""

from __future__ import annotations

import importlib.util

from ..errors import UserError
from ..models import resolve_model
from . import lora_kwargs


def torch_dtype(name: str, cuda: bool):
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (CPU half math is slow)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only batched generation
    return tok


class HFBackend:
    name = "hf"
    why = ""  # set by select(): why this backend was chosen

    def prepare(self):
        """Nothing to import first (UnslothBackend.prepare imports unsloth before trl)."""

    def load(self, recipe):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        m, lora = recipe.model, recipe.lora
        cuda = torch.cuda.is_available()
        path = resolve_model(m.name)
        dtype = torch_dtype(m.dtype, cuda)
        kwargs = dict(dtype=dtype, revision=m.revision, trust_remote_code=m.trust_remote_code)
        if m.load_in_4bit:
            kwargs["quantization_config"] = nf4_config(dtype)
        tok = load_tokenizer(path, m.revision, m.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if m.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=recipe.training.gradient_checkpointing
            )
        config = LoraConfig(**lora_kwargs(lora), task_type="CAUSAL_LM")
        return get_peft_model(model, config), tok

    def grpo_overrides(self, recipe) -> dict:
        import torch

        cuda = torch.cuda.is_available()
        g = recipe.generation
        out: dict = {"use_cpu": not cuda}
        if cuda:
            dtype = torch_dtype(recipe.model.dtype, cuda)
            out["bf16"] = dtype == torch.bfloat16
            out["fp16"] = dtype == torch.float16
        # fast_inference without unsloth: TRL's vLLM. CUDA and vllm are required by backends.requirements(),
        # which select() checks before anything loads.
        if g.use_vllm or recipe.model.fast_inference:
            out.update(
                use_vllm=True,
                vllm_mode=g.vllm_mode,
                vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
            )
        return out


def nf4_config(compute_dtype):
    """QLoRA's NF4 with double quantization (bitsandbytes; runs on CPU too since 0.45)."""
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
    )
