"""The Unsloth backend, verified as far as a machine without a GPU can.

1. Every keyword the backend passes to Unsloth and TRL on the GPU path is checked against the installed
   source (ast: the GPU modules cannot be imported here), so a renamed or removed argument fails here,
   not on a user's first GPU run.
2. Unsloth's CPU backend really loads the embedded model through UnslothBackend (fast, subprocess:
   `import unsloth` patches libraries process-wide), and a slow test trains two GRPO steps through
   `lowmem_r1.training.run`, saves the adapter and a merged_16bit copy with Unsloth's save_pretrained_merged.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.models.backends import unsloth as ub

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("unsloth") is None or importlib.util.find_spec("unsloth_zoo") is None,
    reason="unsloth / unsloth_zoo not installed (make install-dev installs them --no-deps)",
)

GPU_RECIPES = [
    {"model": {"name": "Qwen/Qwen2.5-3B-Instruct", "load_in_4bit": True, "fast_inference": True,
               "max_lora_rank": 32, "gpu_memory_utilization": 0.6, "vllm_standby": True},
     "lora": {"r": 32, "alpha": 64}, "training": {"optim": "adamw_8bit"}},
    {"model": {"name": "Qwen/Qwen2.5-1.5B-Instruct", "load_in_4bit": False, "dtype": "bfloat16"},
     "generation": {"use_vllm": True}, "training": {"optim": "adamw_torch_fused"}},
    {"model": {"name": "builtin:smollm2-135m-instruct"}, "lora": {"target_modules": "all-linear"}},
]


def recipe(raw: dict):
    base = {"rewards": [{"name": "brevity"}], "model": {"backend": "unsloth"}}
    merged = {**base, **raw, "model": {**base["model"], **raw.get("model", {})}}
    return recipe_from_dict(merged, check_rewards=False)


# --------------------------------------------------------------------------------------------------
# Keyword checks against the installed source


def source(module: str, relative: str) -> ast.Module:
    root = Path(importlib.util.find_spec(module).submodule_search_locations[0])
    return ast.parse((root / relative).read_text(encoding="utf-8"))


def method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not found in the installed source: the API moved")


def named_params(fn: ast.FunctionDef) -> set[str]:
    """Parameters a caller can name (not what **kwargs would swallow silently)."""
    a = fn.args
    return {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}


def forwarded(fn: ast.FunctionDef, callee_attr: str) -> list[set[str]]:
    """Keyword names of each `<x>.<callee_attr>(...)` call inside fn."""
    out = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == callee_attr:
            out.append({k.arg for k in node.keywords if k.arg})
    return out


@pytest.fixture(scope="module")
def gpu_sources():
    return {
        "loader": method(source("unsloth", "models/loader.py"), "FastLanguageModel", "from_pretrained"),
        "llama": method(source("unsloth", "models/llama.py"), "FastLlamaModel", "from_pretrained"),
        "peft": method(source("unsloth", "models/llama.py"), "FastLlamaModel", "get_peft_model"),
        "cpu_load": method(source("unsloth_zoo", "cpu/loader.py"), "FastCPUModel", "from_pretrained"),
        "cpu_peft": method(source("unsloth_zoo", "cpu/loader.py"), "FastCPUModel", "get_peft_model"),
    }


@pytest.mark.parametrize("raw", GPU_RECIPES)
def test_from_pretrained_keywords_exist_on_the_gpu_path(raw, gpu_sources):
    kwargs = ub.from_pretrained_kwargs(recipe(raw), cuda=True)
    assert {"fast_inference", "max_lora_rank", "gpu_memory_utilization", "load_in_4bit", "max_seq_length"} <= set(kwargs)
    missing = set(kwargs) - named_params(gpu_sources["loader"])
    assert not missing, f"unsloth FastLanguageModel.from_pretrained no longer takes {missing}"
    # The loader hands them on to the per-architecture loader (FastLlamaModel / FastQwen2Model ...).
    assert not set(kwargs) - named_params(gpu_sources["llama"])
    dispatch = [kw for kw in forwarded(gpu_sources["loader"], "from_pretrained") if "fast_inference" in kw]
    assert dispatch, "the loader no longer forwards fast_inference to the model loader"
    vllm_keys = {"fast_inference", "max_lora_rank", "gpu_memory_utilization", "max_seq_length", "load_in_4bit"}
    assert any(vllm_keys <= kw for kw in dispatch)


@pytest.mark.parametrize("raw", GPU_RECIPES)
def test_get_peft_model_keywords_exist_on_the_gpu_path(raw, gpu_sources):
    kwargs = ub.peft_kwargs(recipe(raw), cuda=True)
    assert kwargs["use_gradient_checkpointing"] == "unsloth"
    missing = set(kwargs) - named_params(gpu_sources["peft"])
    assert not missing, f"unsloth get_peft_model no longer takes {missing}"


def test_cpu_path_takes_the_same_keywords(gpu_sources):
    """On CPU the GPU-only ones are left out by the backend; the rest are named parameters there too."""
    r = recipe(GPU_RECIPES[2])
    load = set(ub.from_pretrained_kwargs(r, cuda=False))
    assert not {"fast_inference", "max_lora_rank", "gpu_memory_utilization"} & load
    # random_state is not named by FastCPUModel.from_pretrained, which pops it from **kwargs explicitly.
    assert not load - named_params(gpu_sources["cpu_load"]) - {"random_state"}
    assert not set(ub.peft_kwargs(r, cuda=False)) - named_params(gpu_sources["cpu_peft"])


def grpo_fields() -> set[str]:
    from trl import GRPOConfig

    return {f.name for f in dataclasses.fields(GRPOConfig)}


@pytest.mark.parametrize("raw", GPU_RECIPES)
@pytest.mark.parametrize("bf16", [True, False])
def test_grpo_overrides_are_grpoconfig_fields(raw, bf16, tmp_path):
    from trl import GRPOConfig

    r = recipe(raw)
    out = ub.gpu_grpo_overrides(r, torch.bfloat16 if bf16 else torch.float16)
    assert set(out) <= grpo_fields(), set(out) - grpo_fields()
    assert out["bf16"] is bf16 and out["fp16"] is (not bf16)
    if r.model.fast_inference:
        assert out["use_vllm"] and out["vllm_mode"] == "colocate"
        assert out["vllm_gpu_memory_utilization"] == r.model.gpu_memory_utilization
        assert out["vllm_enable_sleep_mode"] is r.model.vllm_standby
    assert "optim" not in out  # the recipe's training.optim decides (training/run.py passes it)
    if not bf16:  # GRPOConfig validates bf16 against the device, fp16 it accepts here: check the values
        config = GRPOConfig(output_dir=str(tmp_path), **out)
        assert config.fp16 and config.use_vllm == out.get("use_vllm", False)


COLOCATE_SCRIPT = r"""
import json, sys
import datasets
from lowmem_r1.config.recipe import recipe_from_dict
r = recipe_from_dict({"model": {"name": "builtin:smollm2-135m-instruct", "backend": "unsloth", "max_seq_length": 128},
                      "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                      "rewards": [{"name": "brevity"}]})
from lowmem_r1.models.backends.select import select as select_backend
b = select_backend(r)
model, tok = b.load(r)
import trl
from lowmem_r1.training.grpo.trainer import trainer_class
cls = trainer_class()
cfg = trl.GRPOConfig(output_dir=sys.argv[1], use_vllm=False, per_device_train_batch_size=2, num_generations=2,
                     max_steps=1)
model.vllm_engine = object()  # what FastLanguageModel.from_pretrained(fast_inference=True) attaches
try:  # the engine is a stand-in: the trainer fails once it uses it, after deciding how to generate
    cls(model=model, processing_class=tok, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=cfg, train_dataset=datasets.Dataset.from_list([{"prompt": "hi"}] * 4))
except Exception:
    pass
print(json.dumps({"bases": [c.__module__ for c in cls.__mro__[1:3]], "use_vllm": cfg.use_vllm,
                  "mode": cfg.vllm_mode}))
"""


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="Unsloth patches TRL's trainer on CUDA only")
def test_unsloths_trainer_reuses_the_models_vllm_engine(base_model_dir, tmp_path):
    """On a GPU, training/run.py's trainer is Unsloth's GRPOTrainer (looked up after select()), which switches a
    model that carries a vLLM engine (fast_inference) to colocated vLLM generation."""
    out = run_script(COLOCATE_SCRIPT, str(tmp_path))
    assert any("unsloth" in m.lower() for m in out["bases"]), out
    assert out["use_vllm"] and out["mode"] == "colocate"


def test_train_imports_trl_only_inside_functions():
    """Unsloth rebinds trl.GRPOTrainer / GRPOConfig on import; a module-level `from trl import ...` in the
    trainer would keep TRL's unpatched classes."""
    from lowmem_r1.training import run as train_mod
    from lowmem_r1.training.grpo import stage, trainer

    for module in (train_mod, stage, trainer):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [getattr(n, "module", None) or n.names[0].name for n in top]
        assert not [m for m in names if m and m.split(".")[0] in ("trl", "transformers", "peft", "unsloth")]


def test_train_lets_backend_overrides_reach_grpoconfig(tmp_path):
    """GRPOConfig gets the recipe's settings and the backend's overrides; a key in both (optim here) is the
    backend's, not a TypeError on the first GPU run."""
    from types import SimpleNamespace

    from lowmem_r1.runs.rundir import RunDir
    from lowmem_r1.training.grpo import stage as grpo_stage

    r = recipe(GPU_RECIPES[1])  # fp16 below: GRPOConfig refuses bf16 on a machine without it
    overrides = {**ub.gpu_grpo_overrides(r, torch.float16), "optim": "adamw_torch", "logging_steps": 3}
    assert r.training.optim != "adamw_torch"
    backend = SimpleNamespace(name="unsloth", grpo_overrides=lambda _: overrides)
    config = grpo_stage.grpo_config(r, RunDir(tmp_path), [1.0], backend)
    assert config.fp16 and not config.bf16 and config.use_vllm and config.logging_steps == 3
    assert str(getattr(config.optim, "value", config.optim)) == "adamw_torch"
    assert config.learning_rate == r.training.learning_rate and config.reward_weights == [1.0]


# --------------------------------------------------------------------------------------------------
# Unsloth's CPU backend, for real (subprocesses)

LOAD_SCRIPT = r"""
import json, sys
from lowmem_r1.config.recipe import recipe_from_dict
r = recipe_from_dict({"model": {"name": "builtin:smollm2-135m-instruct", "backend": "unsloth", "max_seq_length": 128,
                                "vllm_standby": True},
                      "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                      "rewards": [{"name": "brevity"}]})
import lowmem_r1.training.run, lowmem_r1.preflight.plan  # what `lowmem-r1 train` imports before choosing the backend
early = [m for m in ("trl", "transformers", "peft") if m in sys.modules]
from lowmem_r1.models.backends.select import select as select_backend
b = select_backend(r)
model, tok = b.load(r)
from trl import GRPOConfig
cfg = GRPOConfig(output_dir=sys.argv[1], optim="adamw_8bit", **b.grpo_overrides(r))
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
import os
print(json.dumps({"early": early, "backend": b.name, "unsloth": "unsloth" in sys.modules,
                  "standby": os.environ.get("UNSLOTH_VLLM_STANDBY"),
                  "peft": type(model).__name__, "trainable": trainable, "overrides": b.grpo_overrides(r),
                  "optim": str(getattr(cfg.optim, "value", cfg.optim)), "pad": tok.pad_token is not None}))
"""


def run_script(script: str, *args: str, timeout: int = 600) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_unsloth_backend_loads_on_cpu(base_model_dir, tmp_path):
    out = run_script(LOAD_SCRIPT, str(tmp_path))
    assert out["early"] == [], "recipe loading imported trl/transformers/peft before unsloth"
    assert out["backend"] == "unsloth" and out["unsloth"] and out["peft"] == "PeftModelForCausalLM"
    # r x (in + out) for q_proj (576 -> 576) and v_proj (576 -> 192) in 30 layers
    assert out["trainable"] == 30 * 4 * ((576 + 576) + (576 + 192))
    assert out["overrides"] == {"use_cpu": True} and out["pad"]
    assert out["standby"] == "1"  # set before `import unsloth`, which reads it
    # Unsloth's CPU patches reached the GRPOConfig the trainer imports: 8-bit AdamW has no CPU kernels.
    assert out["optim"] in ("adamw_torch_fused", "adamw_torch")


TRAIN_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from lowmem_r1.config.recipe import recipe_from_dict
out = Path(sys.argv[1])
r = recipe_from_dict({
    "name": "unsloth-cpu", "model": {"name": "builtin:smollm2-135m-instruct", "backend": "unsloth", "max_seq_length": 128},
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "data": {"source": "builtin:arithmetic", "task": "arithmetic", "max_prompt_length": 64, "generator": {"n": 16, "seed": 0}},
    "rewards": [{"name": "brevity", "max_chars": 40}],
    "training": {"max_steps": 2, "per_device_train_batch_size": 2, "num_generations": 2, "save_steps": 50,
                 "learning_rate": 1e-2},
    "generation": {"max_completion_length": 8},
    "logging": {"sample_every": 0},
    "output": {"dir": str(out / "run")},
})
from lowmem_r1.models.backends.select import select as select_backend
backend = select_backend(r)
from lowmem_r1.training.run import train
code = train(r)
run = out / "run"
info = json.loads((run / "run.json").read_text())
metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]

# Unsloth's own merged save of the trained adapter (loads base + adapter, merges, writes 16-bit).
from unsloth import FastLanguageModel
model, tok = FastLanguageModel.from_pretrained(model_name=str(run / "adapter"), max_seq_length=128, load_in_4bit=False)
model.save_pretrained_merged(str(out / "merged"), tok, save_method="merged_16bit")
from transformers import AutoModelForCausalLM
from peft import PeftModel
from lowmem_r1.models.names import resolve_model
base_path = resolve_model("builtin:smollm2-135m-instruct")
merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype="auto")
merged_dtype = str(merged.dtype)
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
ids = tok("What is 3 + 5?", return_tensors="pt").input_ids
rel = lambda x, y: ((x - y).abs().mean() / x.abs().mean()).item()
with torch.no_grad():
    c = base(input_ids=ids).logits.float()
    reference = PeftModel.from_pretrained(base, str(run / "adapter"))  # fp32 base + adapter, plain peft
    a = reference(input_ids=ids).logits.float()
    b = merged.float()(input_ids=ids).logits.float()
    # What `chat` / `eval` load with the unsloth engine: the run's adapter on its base, inference mode.
    from lowmem_r1.generation.engine import load_generator, resolve_ref
    d = load_generator(resolve_ref(str(run)), "unsloth").model(input_ids=ids).logits.float()
name = "model.layers.0.self_attn.q_proj.weight"
delta = (merged.state_dict()[name].float() - AutoModelForCausalLM.from_pretrained(base_path).state_dict()[name]).abs().max().item()
print(json.dumps({
    "code": code, "status": info["status"], "backend": info["backend"], "step": info["global_step"],
    "steps_logged": len(metrics),
    "adapter": sorted(p.name for p in (run / "adapter").iterdir()),
    "merged_files": sorted(p.name for p in (out / "merged").iterdir()),
    "merged_dtype": merged_dtype, "q_delta": delta,
    "merged_vs_adapter": rel(a, b), "base_vs_adapter": rel(a, c), "inference_vs_adapter": rel(a, d),
}))
"""


@pytest.mark.slow
def test_unsloth_backend_trains_and_saves_merged_16bit_on_cpu(base_model_dir, tmp_path):
    out = run_script(TRAIN_SCRIPT, str(tmp_path))
    assert out["code"] == 0 and out["status"] == "completed" and out["backend"] == "unsloth"
    assert out["step"] == 2 and out["steps_logged"] >= 2
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(out["adapter"])
    assert "config.json" in out["merged_files"] and any(f.endswith(".safetensors") for f in out["merged_files"])
    assert out["merged_dtype"] in ("torch.bfloat16", "torch.float16")  # merged_16bit really is 16-bit
    assert out["q_delta"] > 0  # the trained LoRA is in the merged weights
    # Training moved the model, and the merged copy and the backend's inference loader compute what base +
    # adapter computes (up to bf16 rounding): mean relative logit differences.
    assert out["base_vs_adapter"] > 0.01
    assert out["merged_vs_adapter"] < 0.3 * out["base_vs_adapter"]
    assert out["inference_vs_adapter"] < 0.3 * out["base_vs_adapter"]
