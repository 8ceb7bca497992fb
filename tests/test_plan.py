"""`lowmem-r1 plan`: the memory estimate from config only. Every bundled recipe fits a 24 GiB card,
Unsloth's published GRPO figures reproduced, and the config sources (built-in table, local folder, offline hub id)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import load_recipe, recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.preflight import plan as P

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def planning_machine(monkeypatch):
    """Plan as from a machine without a GPU but with unsloth installed (so `auto` plans unsloth)."""
    from lowmem_r1.models import backends

    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    monkeypatch.setattr(backends, "unsloth_installed", lambda: True)


def _single_stage_recipes():
    from lowmem_r1.pipeline.multistage import is_pipeline_file

    return sorted(p for p in (REPO / "recipes").glob("*.toml") if not is_pipeline_file(p))  # one stage each


@pytest.mark.parametrize("path", _single_stage_recipes(), ids=lambda p: p.name)
def test_every_bundled_recipe_fits_a_24gb_card(path):
    """The card the project is for: every bundled recipe fits it, its breakdown adds up to the total, the
    largest settings the plan suggests are at least the recipe's own, and shorter completions never cost more."""
    recipe = load_recipe(path)
    plan = P.make_plan(recipe, gpu_memory=24)
    assert plan.knobs.backend == "unsloth"
    assert plan.fits and 0 < plan.total <= 24 * P.GiB
    assert plan.total == pytest.approx(sum(value for _, value, _ in plan.rows))
    assert plan.max_generations >= recipe.training.num_generations
    assert plan.max_completion >= recipe.generation.max_completion_length
    shorter = load_recipe(path, [f"generation.max_completion_length={recipe.generation.max_completion_length // 2}"])
    assert P.make_plan(shorter, gpu_memory=24).total <= plan.total  # equal when vLLM reserves a fixed share


def test_the_flagship_fits_a_24gb_card_with_unsloth_but_not_plain_trl_without_checkpointing():
    """Qwen2.5-3B GRPO on one 24 GiB card: Unsloth (4-bit, shared vLLM, offloaded checkpointing, chunked
    loss) fits; the same run with plain transformers, 16-bit and no checkpointing does not."""
    raw = {"rewards": [{"name": "brevity"}],
           "model": {"name": "Qwen/Qwen2.5-3B-Instruct", "load_in_4bit": True, "fast_inference": True,
                     "backend": "unsloth", "max_seq_length": 1024},
           "training": {"per_device_train_batch_size": 8, "num_generations": 8, "optim": "adamw_8bit"},
           "generation": {"max_completion_length": 768}}
    fast = P.make_plan(recipe_from_dict(raw, check_rewards=False), gpu_memory=24)
    assert fast.fits
    slow = P.make_plan(recipe_from_dict(raw, overrides=["model.backend=hf", "model.load_in_4bit=false",
                                                        "model.fast_inference=false"], check_rewards=False),
                       gpu_memory=24)
    assert not slow.fits and slow.total > 2 * fast.total


def test_unsloths_published_grpo_figures_are_reproduced():
    """unsloth.ai/blog/grpo: Llama 3.1 8B, 8 generations, 20K context, vocabulary 128256: Unsloth's loss
    9.8GB, KV cache 2.5GB. (Its "standard GRPO" 78.3GB - full logits and their gradient - is no longer what
    TRL does: 1.15 scores through a chunked LM head, so the hf term is a tile, not B x C x V.)"""
    llama8b = P.ModelShape(4096, 14336, 32, 32, 8, 128256, False)
    k = P.Knobs(backend="unsloth", load_in_4bit=False, weight_bytes=2, fast_inference=False, use_vllm=False,
                standby=False, vllm_share=0.5, max_seq_length=20480, lora_r=16, lora_targets=["q_proj"],
                optim_8bit=False, checkpointing=True, batch=8, accumulation=1, generations=8, prompt=0,
                completion=20480)
    assert P.estimate(llama8b, k, 80 * P.GiB).logits.bytes / P.GiB == pytest.approx(9.8, abs=0.05)
    assert llama8b.kv_bytes_per_token() * 20480 / P.GiB == pytest.approx(2.5, abs=0.01)
    full_logits = 2 * 8 * 20480 * 128256 * 2  # the post's 78.3GB
    assert full_logits / P.GiB == pytest.approx(78.3, abs=0.05)
    hf = P.estimate(llama8b, replace(k, backend="hf"), 80 * P.GiB).logits.bytes
    assert hf == 4096 * 32768 * 2 + 8 * 20480 * 4096 * 4 and hf < full_logits / 20


def test_hf_logits_tile_is_trls_chunk():
    """The hf term's vocabulary chunk is the one the installed TRL uses (its token chunk lives in a Triton
    module that does not import without a GPU toolchain)."""
    import trl.trainer.utils as trl_utils

    assert P.TRL_VOCAB_CHUNK == trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def test_parameter_counts_match_the_published_sizes():
    shapes = P.BUILTIN_SHAPES
    assert shapes["builtin:smollm2-135m-instruct"].params() == 134_515_008  # exact (no biases)
    # Qwen2.5 has q/k/v biases (a few 10k parameters), not counted.
    assert shapes["Qwen/Qwen2.5-3B-Instruct"].params() == pytest.approx(3_085_938_688, rel=1e-4)
    assert shapes["Qwen/Qwen2.5-0.5B-Instruct"].params() == pytest.approx(494_032_768, rel=1e-4)
    assert shapes["Qwen/Qwen2.5-1.5B-Instruct"].params() == pytest.approx(1_543_714_304, rel=1e-4)
    assert shapes["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"].params() == pytest.approx(1_777_088_000, rel=1e-4)


def test_builtin_table_agrees_with_the_real_config(base_model_dir):
    assert P.model_shape(str(base_model_dir)) == replace(P.BUILTIN_SHAPES["builtin:smollm2-135m-instruct"],
                                                         source=str(base_model_dir / "config.json"))


def test_local_folder_config_is_read(tmp_path):
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": cfg}))
    shape = P.model_shape(str(tmp_path))
    assert (shape.hidden, shape.kv_heads, shape.d, shape.vocab) == (64, 2, 16, 1000)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(UserError, match="missing"):
        P.model_shape(str(tmp_path))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        P.model_shape("someone/not-in-the-table")
    with pytest.raises(UserError, match="GGUF"):
        P.model_shape("model.Q4_K_M.gguf")


def test_largest_settings_are_the_boundary():
    r = load_recipe(REPO / "recipes" / "gsm8k.toml") if (REPO / "recipes" / "gsm8k.toml").is_file() else None
    if r is None:
        pytest.skip("recipes/gsm8k.toml is not bundled")
    card = 16 * P.GiB
    plan = P.make_plan(r, gpu_memory=16)
    k, shape = plan.knobs, plan.shape
    c = plan.max_completion
    seq = lambda n: max(k.max_seq_length, k.prompt + n)  # noqa: E731
    assert P._fits(shape, replace(k, completion=c, max_seq_length=seq(c)), card)
    assert not P._fits(shape, replace(k, completion=c + 1, max_seq_length=seq(c + 1)), card)
    g = plan.max_generations
    assert P._fits(shape, replace(k, generations=g, batch=g), card)
    assert not P._fits(shape, replace(k, generations=g + 1, batch=g + 1), card)


def test_small_card_does_not_fit_and_says_what_would():
    r = recipe_from_dict({"rewards": [{"name": "brevity"}],
                          "model": {"name": "Qwen/Qwen2.5-3B-Instruct", "load_in_4bit": True,
                                    "fast_inference": True, "backend": "unsloth"}}, check_rewards=False)
    plan = P.make_plan(r, gpu_memory=3)  # vLLM half of 3 GiB cannot hold the 1.9 GiB weights
    assert not plan.fits
    assert P.make_plan(r, gpu_memory=24).fits
    with pytest.raises(UserError, match="--gpu-memory"):
        P.make_plan(r, gpu_memory=0)


def test_standby_share_follows_unsloth_tiers():
    assert P.standby_share(24 * P.GiB) == pytest.approx(0.825 * 0.95)
    assert P.standby_share(80 * P.GiB) == pytest.approx(0.925 * 0.95)
    assert P.standby_share(15 * P.GiB) == pytest.approx(0.8 * 0.95)


def test_warn_if_not_fit_only_on_a_gpu(monkeypatch):
    from lowmem_r1.models import backends

    r = recipe_from_dict({"rewards": [{"name": "brevity"}],
                          "model": {"name": "Qwen/Qwen2.5-3B-Instruct", "backend": "hf"},
                          "training": {"per_device_train_batch_size": 16, "num_generations": 16},
                          "generation": {"max_completion_length": 2048}}, check_rewards=False)
    assert P.warn_if_not_fit(r) is None  # no GPU: train runs on CPU, nothing to warn about
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(P, "card_memory", lambda gpu_memory: (24 * P.GiB, "test card"))
    message = P.warn_if_not_fit(r)
    assert message and "does not fit" in message and "num_generations" in message
    small = recipe_from_dict({"rewards": [{"name": "brevity"}]}, check_rewards=False)
    assert P.warn_if_not_fit(small) is None


def test_plan_command_prints_breakdown_and_verdict(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "Qwen/Qwen2.5-3B-Instruct"\nload_in_4bit = true\n\n[[rewards]]\nname = "brevity"\n')
    done = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "plan", str(recipe), "--gpu-memory", "4"],
                          capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr
    for word in ("base weights (4-bit)", "LoRA", "activations", "loss logits", "verdict: does not fit",
                 "largest that fits"):
        assert word in done.stdout


# --- several GPUs: what each strategy shards, and the trainer / vLLM server split ------------------------


def _hf_recipe(*overrides):
    raw = {"model": {"name": "Qwen/Qwen2.5-3B-Instruct", "backend": "hf"}, "rewards": [{"name": "brevity"}]}
    return recipe_from_dict(raw, overrides=list(overrides), check_rewards=False)


def test_strategies_shard_what_they_say_per_gpu():
    r = _hf_recipe()
    one = P.make_plan(r, gpu_memory=80, gpus=1).breakdown
    b = {s: P.make_plan(r, gpu_memory=80, gpus=4, strategy=s).breakdown for s in P.STRATEGIES}
    # ddp: nothing sharded, a whole copy per GPU
    assert b["ddp"].total == pytest.approx(one.total)
    # every process trains its own micro-batch: activations and logits never shrink
    for s in P.STRATEGIES:
        assert (b[s].activations.bytes, b[s].logits.bytes) == (one.activations.bytes, one.logits.bytes)
    # zero2: the frozen base weights stay whole; LoRA grads + AdamW states (4 + 8 bytes) split 4 ways
    assert b["zero2"].weights.bytes == one.weights.bytes
    lora_params = one.lora.bytes / 16
    assert b["zero2"].lora.bytes == pytest.approx(lora_params * (4 + 12 / 4))
    # zero3 / fsdp2: the weights too, plus two layers gathered whole
    shape = P.model_shape("Qwen/Qwen2.5-3B-Instruct")
    assert b["zero3"].weights.bytes == pytest.approx(one.weights.bytes * (1 / 4 + 2 / shape.layers))
    assert b["zero3"].lora.bytes == pytest.approx(one.lora.bytes / 4)
    assert b["fsdp2"].total == pytest.approx(b["zero3"].total)
    assert one.total > b["zero2"].total > b["zero3"].total
    # more GPUs, smaller shards
    assert P.make_plan(r, gpu_memory=80, gpus=8, strategy="zero3").total < b["zero3"].total


def test_gpus_and_strategy_default_to_the_recipes_distributed_section():
    plan = P.make_plan(_hf_recipe("distributed.nproc=2", "distributed.strategy=fsdp2"), gpu_memory=80)
    assert (plan.knobs.world, plan.knobs.strategy) == (2, "fsdp2")
    assert any("2 training process(es), fsdp2" in n for n in plan.notes)
    with pytest.raises(UserError, match="--gpus 0"):
        P.make_plan(_hf_recipe(), gpus=0)
    with pytest.raises(UserError, match="--strategy 'zero1'"):
        P.make_plan(_hf_recipe(), strategy="zero1")


def test_unsloths_shared_engine_keeps_whole_weights():
    raw = {"model": {"name": "Qwen/Qwen2.5-3B-Instruct", "backend": "unsloth", "load_in_4bit": True,
                     "fast_inference": True}, "rewards": [{"name": "brevity"}]}
    r = recipe_from_dict(raw, check_rewards=False)
    one, four = (P.make_plan(r, gpu_memory=24, gpus=n, strategy="zero3") for n in (1, 4))
    assert four.breakdown.weights.bytes == one.breakdown.weights.bytes
    assert any("cannot shard them" in n for n in four.notes)


def test_server_mode_moves_generation_to_the_servers_gpus():
    colocated = P.make_plan(_hf_recipe("generation.use_vllm=true"), gpu_memory=80)
    r = _hf_recipe("generation.use_vllm=true", "generation.vllm_mode=server")
    plan = P.make_plan(r, gpu_memory=80)
    assert plan.breakdown.generation.bytes == 0 and plan.breakdown.kv_room is None
    assert colocated.breakdown.generation.bytes == pytest.approx(0.3 * 80 * P.GiB)
    assert plan.total == pytest.approx(colocated.total - colocated.breakdown.generation.bytes)
    sv = plan.server
    shape = P.model_shape("Qwen/Qwen2.5-3B-Instruct")
    assert sv.reserved == pytest.approx(0.9 * 80 * P.GiB)  # serve.SERVER_GPU_MEMORY_UTILIZATION of its card
    assert sv.weights == pytest.approx(shape.params() * 2)  # 16-bit, tp = 1
    assert sv.fits and plan.fits and sv.sequences > 100
    tp2 = P.make_plan(_hf_recipe("generation.use_vllm=true", "generation.vllm_mode=server",
                                 "generation.vllm_tensor_parallel_size=2"), gpu_memory=80).server
    assert tp2.weights == pytest.approx(sv.weights / 2) and tp2.kv_token == pytest.approx(sv.kv_token / 2)
    tp4 = P.server_plan(shape, plan.knobs, 80 * P.GiB, tp=4)  # 2 KV heads: replicated beyond tp = 2
    assert tp4.kv_token == tp2.kv_token and tp4.weights == pytest.approx(sv.weights / 4)
    tiny = P.server_plan(shape, plan.knobs, 6 * P.GiB, tp=1)  # 5.4 GiB share < 5.75 GiB of weights
    assert not tiny.fits


def test_plan_cli_takes_gpus_and_strategy():
    out = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "plan", str(REPO / "recipes" / "gsm8k.toml"),
                          "--gpus", "2", "--strategy", "zero2", "--set", "generation.use_vllm=true", "--set",
                          "generation.vllm_mode=server", "--set", "model.fast_inference=false"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env={"COLUMNS": "250", "PATH": "/usr/bin",
                                                                                     "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "per GPU: 2 x zero2" in out.stdout and "vLLM server (`lowmem-r1 serve`, 1 GPU(s)" in out.stdout
