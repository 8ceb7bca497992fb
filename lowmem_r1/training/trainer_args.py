"""Recipe keys -> the TRL config of a stage, without a hand-written line per key.

A key of [training], [generation] or [logging] whose name is a field of the stage's config class (GRPO:
LowmemGRPOConfig, TRL's GRPOConfig plus the toolkit's extensions; SFT: the fields every transformers
TrainingArguments has, so that GRPO-only keys such as loss_type mean nothing there) reaches it as it is.
Only the keys in SPELLED_OUT are renamed, derived or read elsewhere; the other sections belong to the toolkit
(TOOLKIT_SECTIONS). tests/test_trainer_args.py holds every recipe key to one of these three.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

SECTIONS = ("training", "generation", "logging")

# recipe key -> where it goes instead of a config field of the same name
SPELLED_OUT = {
    "training.warmup_ratio": "warmup_steps (transformers 5 reads a float below 1 there as a share of max_steps)",
    "training.dynamic_sampling_reward": "signal_reward, the reward's index (training/grpo/stage.py)",
    "generation.continuous_batching": "use_transformers_continuous_batching, on only when 'on' (grpo/stage.py)",
    "generation.use_vllm": "the backend's GRPO overrides, with the engine it builds (models/backends/)",
    "generation.vllm_mode": "the backend's GRPO overrides (models/backends/)",
    "generation.vllm_gpu_memory_utilization": "the backend's GRPO overrides (models/backends/)",
    "generation.vllm_server_host": "the backend's GRPO overrides in server mode, and `lowmem-r1 serve`",
    "generation.vllm_server_port": "the backend's GRPO overrides in server mode, and `lowmem-r1 serve`",
    "generation.vllm_server_timeout": "the backend's GRPO overrides in server mode, and the wait before step 1",
    "generation.vllm_tensor_parallel_size": "`lowmem-r1 serve --tp`: the server's GPUs, not the trainer's",
    "logging.report_to": "report_to, 'none' when the list is empty",
    "logging.sample_every": "the live display (training/progress.py)",
}

# sections no TRL config reads, and who does
TOOLKIT_SECTIONS = {
    "name": "the run directory's default name",
    "description": "shown by --dry-run",
    "stage": "which trainer runs (config/stages.py, training/stages.py)",
    "model": "the backend that loads the model (models/backends/)",
    "lora": "the backend's LoRA (peft LoraConfig)",
    "data": "the datasets (data/)",
    "prompt": "the prompt formats (data/formats.py)",
    "rewards": "the reward functions and their weights (rewards/)",
    "output": "the run directory (runs/)",
    "eval": "`lowmem-r1 eval` (generation/evaluate.py)",
    "distributed": "the launcher (training/launch.py)",
}


def field_names(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def trainer_kwargs(recipe, fields: set[str], output_dir: Path) -> dict:
    """The recipe's keys that name one of `fields`, as they are, then the spelled-out common ones."""
    out = {}
    for section in SECTIONS:
        for key, value in getattr(recipe, section):
            if f"{section}.{key}" not in SPELLED_OUT and key in fields:
                out[key] = value
    return {
        **out,
        "output_dir": str(output_dir),
        "warmup_steps": recipe.training.warmup_ratio,
        "report_to": list(recipe.logging.report_to) or "none",
        "save_strategy": "steps",
        "disable_tqdm": True,
    }
