"""Backend selection and its error paths: what `auto` picks, and the one-line refusals or logged fallbacks
for GPU-only settings. The GPU is simulated by monkeypatching the probes; nothing here imports unsloth."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.models import backends
from lowmem_r1.models.backends.select import select as select_backend


def make(model=None, generation=None, **extra):
    raw = {"rewards": [{"name": "brevity"}], "model": model or {}, "generation": generation or {}, **extra}
    return recipe_from_dict(raw, check_rewards=False)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine with compute capability 8.6 and vllm + bitsandbytes installed (unsloth as given)."""
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "compute_capability", lambda: (8, 6))
    real = backends.installed
    monkeypatch.setattr(backends, "installed", lambda p: True if p in ("vllm", "bitsandbytes") else real(p))
    return monkeypatch


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    return monkeypatch


def test_auto_picks_unsloth_only_with_cuda_and_unsloth(monkeypatch):
    for cuda, unsloth, want in [(True, True, "unsloth"), (True, False, "hf"), (False, True, "hf"), (False, False, "hf")]:
        monkeypatch.setattr(backends, "cuda_available", lambda c=cuda: c)
        monkeypatch.setattr(backends, "unsloth_installed", lambda u=unsloth: u)
        name, why = backends.choose("auto")
        assert name == want, (cuda, unsloth)
        assert why.startswith("auto:")
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_installed", lambda: False)
    assert 'pip install "lowmem-r1[gpu]"' in backends.choose("auto")[1]
    assert backends.choose("hf")[0] == "hf" and backends.choose("unsloth")[0] == "unsloth"


@pytest.mark.parametrize("key,section", [("fast_inference", "model")])  # use_vllm on CPU: test_vllm_cpu.py
def test_vllm_on_cpu_is_one_clear_line(cpu, key, section):
    recipe = make(**{section: {key: True}})
    with pytest.raises(UserError) as e:
        select_backend(recipe)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{section}.{key}" in msg and "CUDA" in msg and f"--set {section}.{key}=false" in msg


def test_vllm_not_installed_on_gpu(gpu):
    gpu.setattr(backends, "installed", lambda p: p == "bitsandbytes")
    with pytest.raises(UserError, match=r'model.fast_inference: vllm is not installed; pip install "lowmem-r1\[gpu\]"'):
        select_backend(make(model={"fast_inference": True, "backend": "hf"}))


def test_old_gpu_cannot_run_vllm(gpu):
    gpu.setattr(backends, "compute_capability", lambda: (6, 1))
    with pytest.raises(UserError, match=r"compute capability 6.1.*--set generation.use_vllm=false"):
        select_backend(make(model={"backend": "hf"}, generation={"use_vllm": True}))


def test_4bit_without_bitsandbytes(cpu):
    cpu.setattr(backends, "installed", lambda p: False)
    with pytest.raises(UserError, match=r"model.load_in_4bit: bitsandbytes is not installed.*--set model.load_in_4bit=false"):
        select_backend(make(model={"load_in_4bit": True, "backend": "hf"}))


def test_unsloth_asked_for_but_missing(cpu):
    cpu.setattr(backends, "unsloth_installed", lambda: False)
    with pytest.raises(UserError, match=r'unsloth is not installed; pip install "lowmem-r1\[gpu\]", or --set model.backend=hf'):
        select_backend(make(model={"backend": "unsloth"}))


def test_several_problems_name_the_first_and_count_the_rest(cpu):
    cpu.setattr(backends, "installed", lambda p: False)
    with pytest.raises(UserError, match=r"\(\+2 more: run `lowmem-r1 doctor RECIPE`\)$"):
        select_backend(make(model={"load_in_4bit": True, "fast_inference": True, "backend": "hf"}))


def test_unsloth_4bit_with_trl_vllm_is_refused_before_training(gpu):
    """Unsloth raises mid-run when TRL's own vLLM would get 4-bit weights: say so before loading."""
    gpu.setattr(backends, "unsloth_installed", lambda: True)
    recipe = make(model={"backend": "unsloth", "load_in_4bit": True}, generation={"use_vllm": True})
    assert any("--set model.fast_inference=true" in p for p in backends.requirements(recipe))


def test_hf_on_gpu_falls_back_to_trls_vllm_out_loud(gpu, caplog):
    """fast_inference on a GPU without unsloth: hf + TRL's colocated vLLM, and the log says so."""
    gpu.setattr(backends, "unsloth_installed", lambda: False)
    recipe = make(model={"fast_inference": True, "load_in_4bit": False})
    with caplog.at_level(logging.WARNING, logger="lowmem_r1"):
        backend = select_backend(recipe)
    assert backend.name == "hf"
    assert "TRL's colocated vLLM" in caplog.text


def test_gpu_without_vllm_says_generation_is_slow(gpu):
    gpu.setattr(backends, "unsloth_installed", lambda: True)
    notes = backends.fallbacks(make(), "unsloth")
    assert any("--set model.fast_inference=true" in n for n in notes)
    assert any("--set generation.use_vllm=true" in n for n in backends.fallbacks(make(), "hf"))


def test_unsloth_on_cpu_is_logged_not_silent(cpu):
    assert any("CPU backend" in n for n in backends.fallbacks(make(model={"backend": "unsloth"}), "unsloth"))


def test_cpu_recipe_has_no_problems(cpu):
    assert backends.requirements(make()) == []
    assert select_backend(make()).name == "hf"


def _grpo_fields() -> set[str]:
    from trl import GRPOConfig

    return {f.name for f in dataclasses.fields(GRPOConfig)}


def test_hf_on_gpu_uses_trls_colocated_vllm(monkeypatch, tmp_path):
    """The hf backend's GPU overrides are real GRPOConfig fields with values GRPOConfig accepts."""
    import importlib.util

    import torch
    from trl import GRPOConfig

    from lowmem_r1.models.backends.hf import HFBackend

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    recipe = make(model={"fast_inference": True, "backend": "hf"}, data={"max_prompt_length": 100},
                  generation={"max_completion_length": 28})
    out = HFBackend().grpo_overrides(recipe)
    assert set(out) <= _grpo_fields()
    assert out["use_vllm"] is True and out["vllm_mode"] == "colocate" and out["fp16"] is True
    assert out["vllm_max_model_length"] == 128  # not the model's whole context
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # GRPOConfig validates fp16 against the device
    config = GRPOConfig(output_dir=str(tmp_path), **out)
    assert config.use_vllm and config.vllm_mode == "colocate"


def test_train_refuses_a_gpu_recipe_on_cpu_with_exit_2(tmp_path):
    """The CLI path: one line on stderr, exit 2, no traceback (this machine has no CUDA)."""
    recipe = tmp_path / "gpu.toml"
    recipe.write_text(
        '[model]\nname = "builtin:smollm2-135m-instruct"\nfast_inference = true\n\n'
        f'[output]\ndir = "{tmp_path / "run"}"\n\n[[rewards]]\nname = "brevity"\n'
    )
    done = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(recipe)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "model.fast_inference" in lines[0] and "Traceback" not in done.stderr
