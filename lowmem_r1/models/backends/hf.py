"""transformers + peft (+ bitsandbytes NF4) + TRL's GRPOTrainer: the path that runs everywhere."""

from __future__ import annotations

from lowmem_r1.core.distributed import SHARDED, world
from lowmem_r1.models.backends import lora_kwargs, vllm_server_kwargs
from lowmem_r1.models.names import load_tokenizer, resolve_model
from lowmem_r1.models.precision import nf4_config, torch_dtype, trainer_flags


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
            kwargs["quantization_config"] = nf4_config(dtype, m.bnb_4bit_quant_storage)
            if cuda and world().size > 1 and recipe.distributed.strategy not in SHARDED:
                kwargs["device_map"] = {"": world().local_rank}  # each process's 4-bit copy on its own GPU
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
            out.update(trainer_flags(torch_dtype(recipe.model.dtype, cuda)))
        # fast_inference without unsloth: TRL's vLLM. CUDA and vllm are required by backends.requirements(),
        # which select() checks before anything loads.
        if g.use_vllm or recipe.model.fast_inference:
            out.update(
                use_vllm=True,
                vllm_mode=g.vllm_mode,
                vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                # without it vLLM sizes its KV cache for the model's whole context (32k for Qwen2.5)
                vllm_max_model_length=recipe.data.max_prompt_length + g.max_completion_length,
                **vllm_server_kwargs(g),  # vllm_mode = "server": where `lowmem-r1 serve` listens
            )
        return out
