"""vLLM's importance-sampling correction from the loss's own forward (training/grpo/correction.py): the same ratio, loss
and metrics as TRL's extra no-grad forward, one forward fewer; TRL's path wherever that is not exact."""

import math

import pytest
import torch

from lowmem_r1.training.grpo.correction import OnPolicyCorrection, importance_ratio

NAN = float("nan")


def test_ratio_per_token_truncated_and_masked():
    trainer = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    sampler = torch.tensor([[0.0, -2.0, -1.0, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    truncated = importance_ratio(trainer, sampler, mask, "token_truncate", None, 2.0)
    assert truncated[0].tolist() == pytest.approx([1.0, 2.0, math.exp(-1), 1.0])  # e^1 capped; NaN -> 1
    masked = importance_ratio(trainer, sampler, mask, "token_mask", 0.5, 2.0)
    assert masked[0].tolist() == [1.0, 0.0, 0.0, 1.0]  # e^1 > 2 and e^-1 < 0.5 zeroed


def test_ratio_per_sequence_ignores_padding():
    trainer = torch.tensor([[-1.0, -1.0, -9.0]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert importance_ratio(trainer, sampler, mask, "sequence_truncate", None, 3.0).item() == pytest.approx(
        math.exp(0.5))
    assert importance_ratio(trainer, sampler, mask, "sequence_mask", None, 1.5).tolist() == [[0.0]]


@pytest.fixture(scope="module")
def trainer(base_model_dir, tmp_path_factory):
    """TRL's GRPOTrainer with the mixin on the embedded model, made to believe vLLM generated: its
    `_generate_single_turn` returns fixed completions with log probs that differ from the trainer's."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lowmem_r1.training.grpo.compat import patch_trl_for_cpu

    patch_trl_for_cpu()  # what train() does on a CPU
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    config = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=4,
                        num_generations=2, max_completion_length=6, report_to=[], use_cpu=True, bf16=False,
                        loss_type="dapo", save_strategy="no")
    cls = type("T", (OnPolicyCorrection, GRPOTrainer), {})
    data = Dataset.from_list([{"prompt": f"{i} plus {i} is"} for i in range(8)])

    def reward(completions, **kw):
        return [float(len(c) % 3) for c in completions]

    t = cls(model=model, processing_class=tok, reward_funcs=reward, args=config, train_dataset=data)
    t.use_vllm = True  # after __init__: no engine is started; generation is replaced below
    t.vllm_importance_sampling_correction = True
    t._last_loaded_step = t.state.global_step
    t.current_gradient_accumulation_steps = 1  # set by the training loop
    completions = [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for text in (" 2", " two", " 4 and more", " it is 6")]

    def fake_vllm(prompt_ids, images, multimodal_fields, num_generations):
        gen = torch.Generator().manual_seed(0)
        logprobs = [[-0.5 - torch.rand(1, generator=gen).item() for _ in ids] for ids in completions]
        logprobs[1][0] = None  # a token vLLM could not score
        return [completions[i % 4] for i in range(len(prompt_ids))], logprobs[:len(prompt_ids)]

    t._generate_single_turn = fake_vllm
    t.model.train()
    return t


def _forwards(model):
    counter = {"n": 0}

    def hook(module, args, kwargs):
        counter["n"] += 1

    return counter, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("mode,clip_min,clip_max", [("sequence_mask", None, 3.0), ("token_truncate", None, 1.2)])
def test_same_ratio_loss_and_metrics_as_trl_with_one_forward_fewer(trainer, mode, clip_min, clip_max):
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip_min, clip_max
    rows = [dict(trainer.train_dataset[i]) for i in (0, 0, 1, 1)]
    results = {}
    for name in ("trl", "reuse"):
        trainer._metrics["train"].clear()
        if name == "trl":
            trainer._correction_from_loss_forward = lambda: False
        else:
            del trainer._correction_from_loss_forward
        counter, handle = _forwards(trainer.model)
        try:
            batch = trainer._generate_and_score_completions(rows)
            generation_forwards = counter["n"]
            inputs = dict(batch)
            loss = trainer._compute_loss(trainer.model, inputs).item()
        finally:
            handle.remove()
        results[name] = (batch, inputs, loss, generation_forwards, dict(trainer._metrics["train"]))
    trl_batch, trl_inputs, trl_loss, trl_forwards, trl_metrics = results["trl"]
    batch, inputs, loss, forwards, metrics = results["reuse"]
    assert "old_per_token_logps" in trl_batch and "importance_sampling_ratio" in trl_batch
    assert "old_per_token_logps" not in batch and "importance_sampling_ratio" not in batch
    assert (trl_forwards, forwards) == (1, 0)
    assert torch.allclose(inputs["importance_sampling_ratio"], trl_batch["importance_sampling_ratio"], atol=1e-5)
    assert not torch.all(inputs["importance_sampling_ratio"] == 1.0)  # the fake sampler really disagrees
    assert loss == pytest.approx(trl_loss, abs=1e-6)
    for key in ("sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/min",
                "sampling/importance_sampling_ratio/max", "sampling/sampling_logp_difference/mean",
                "sampling/sampling_logp_difference/max"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key


def test_trl_path_kept_when_not_on_policy(trainer):
    trainer.num_iterations = 2
    try:
        assert not trainer._correction_from_loss_forward()
    finally:
        trainer.num_iterations = 1
    trainer.loss_type = "vespo"
    try:
        assert not trainer._correction_from_loss_forward()
    finally:
        trainer.loss_type = "dapo"
    assert trainer._correction_from_loss_forward()

    from trl import GRPOTrainer

    def patched_trainer(module):
        patched = type("Patched", (GRPOTrainer,), {"compute_loss": lambda self, model, inputs, **kw: 0.0})
        patched.__module__ = module
        view = object.__new__(type("T", (OnPolicyCorrection, patched), {}))
        for key in ("use_vllm", "vllm_importance_sampling_correction", "loss_type", "num_iterations", "args"):
            setattr(view, key, getattr(trainer, key))
        return view

    assert not patched_trainer("unsloth_compiled_cache.UnslothGRPOTrainer")._correction_from_loss_forward()
    assert patched_trainer("trl.trainer.grpo_trainer")._correction_from_loss_forward()
