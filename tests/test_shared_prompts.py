"""Each prompt of a GRPO group run once (training/grpo/shared_prompts.py): generation gives the same tokens as plain
`generate`, the loss forward the same log probs, entropies and gradients as TRL's, and a real GRPO step
goes through both."""

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.generation import shared_prefill
from lowmem_r1.generation.shared_prefill import generate_sharing_prompts
from lowmem_r1.training.grpo import shared_prompts
from lowmem_r1.training.grpo.settings import GRPOExtensions
from lowmem_r1.training.grpo.shared_prompts import SharedPrompts


@dataclass
class Args(GRPOExtensions):  # what SharedPrompts reads of LowmemGRPOConfig
    world_size: int = 1


@pytest.fixture(scope="module")
def model_and_tokenizer(base_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(base_model_dir), tok


def batch(tok, questions, copies):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions for _ in range(copies)]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


class Spy:
    """Stands in for `model.generate`, recording the cache the wrapper passed on (length, rows) or None."""

    def __init__(self, model):
        self.model, self.caches = model, []

    def __call__(self, **kw):
        cache = kw.get("past_key_values")
        self.caches.append(cache and (cache.get_seq_length(), cache.layers[0].keys.shape[0]))
        return self.model.generate(**kw)


@pytest.mark.parametrize("sample", [False, True])
def test_same_tokens_as_plain_generate_with_each_prompt_prefilled_once(model_and_tokenizer, one_torch_thread, sample):
    import torch
    from transformers import GenerationConfig

    model, tok = model_and_tokenizer
    inputs = batch(tok, ["What is 82 - 29?", "Hi", "What is 7 * 8? Reply with only the number."], copies=3)
    config = GenerationConfig(max_new_tokens=6, do_sample=sample, temperature=1.0 if sample else None,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    plain = model.generate(**inputs, generation_config=config)
    spy = Spy(model)
    torch.manual_seed(0)
    shared = generate_sharing_prompts(spy, model, **inputs, generation_config=config)
    assert torch.equal(plain, shared)
    # 3 distinct prompts ran once, all but their last token; the cache was copied to all 9 rows
    assert spy.caches == [(inputs["input_ids"].shape[1] - 1, 9)]


def test_nothing_to_share_is_plain_generate(model_and_tokenizer, one_torch_thread):
    from transformers import GenerationConfig

    model, tok = model_and_tokenizer
    spy = Spy(model)
    config = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    generate_sharing_prompts(spy, model, **batch(tok, ["a", "b"], copies=1), generation_config=config)
    config.do_sample, config.num_return_sequences = True, 2  # rows generate expands itself: left to it
    generate_sharing_prompts(spy, model, **batch(tok, ["a"], copies=2), generation_config=config)
    assert spy.caches == [None, None]


def test_loss_forward_matches_trl_with_each_prompt_run_once(base_model_dir, one_torch_thread, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from lowmem_r1.training.grpo.compat import patch_trl_for_cpu

    patch_trl_for_cpu()  # TRL's fused head runs a Triton kernel; training swaps in the torch one on a CPU
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    add_fused_lm_head(base, temperature=0.9, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))

    class Trainer(SharedPrompts, GRPOTrainer):  # only what the forward reads, not a whole trainer
        pass

    trainer = object.__new__(Trainer)
    trainer.args = Args(share_prompts=True)
    trainer.is_deepspeed_enabled = trainer.is_fsdp_enabled = False
    trainer.accelerator = SimpleNamespace(autocast=contextlib.nullcontext, unwrap_model=lambda m: m,
                                          is_main_process=True)

    # 3 prompts (3, 5 and 6 tokens, left-padded) x 3 completions (right-padded, some ended early)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (n,), generator=g) for n in (3, 5, 6)]
    rows = [p for p in prompts for _ in range(3)]
    prompt_ids = torch.stack([torch.cat([torch.zeros(6 - len(p), dtype=torch.long), p]) for p in rows])
    prompt_mask = torch.stack([torch.cat([torch.zeros(6 - len(p)), torch.ones(len(p))]).long() for p in rows])
    completion_ids = torch.randint(100, 5000, (9, 5), generator=g)
    completion_mask = torch.ones(9, 5, dtype=torch.long)
    completion_mask[1, 3:] = completion_mask[4, 1:] = completion_mask[8, 4:] = 0
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)

    prefills, real = [], shared_prompts.prefill
    monkeypatch.setattr(shared_prompts, "prefill", lambda *a: prefills.append(a[2].shape) or real(*a))
    results = {}
    for name, forward in (("trl", lambda: GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, 5,
                                                                                          compute_entropy=True)),
                          ("shared", lambda: trainer._get_per_token_logps_and_entropies(model, ids, mask, 5,
                                                                                       compute_entropy=True))):
        model.zero_grad()
        logps, entropy, _ = forward()
        (logps * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (logps.detach(), entropy.detach(), grads)
    assert prefills == [torch.Size([3, 5])]  # the shared run prefilled 3 distinct prompts, all but their last token
    (lt, et, gt), (ls, es, gs) = results["trl"], results["shared"]
    keep = completion_mask.bool()
    assert torch.allclose(lt[keep], ls[keep], atol=1e-4)
    assert torch.allclose(et[keep], es[keep], atol=1e-4)
    assert gt.keys() == gs.keys() and len(gt) == 2 * 30 * 2  # LoRA A and B on q and v in 30 layers
    worst = max(((gt[n] - gs[n]).norm() / gt[n].norm()).item() for n in gt)
    assert worst < 1e-4  # float rounding: the sums run in another order


def test_a_grpo_step_runs_each_prompt_once_in_generation_and_in_the_loss(tmp_path, base_model_dir, monkeypatch):
    """One real GRPO step on the embedded model, 2 prompts x 4 completions: TRL's generate call and its loss
    forward both go through the shared prefill (without grad, then with)."""
    import torch

    from lowmem_r1.training.run import train

    seen = []
    real = shared_prompts.prefill

    def recording(run, config, ids, mask, rows):
        seen.append((torch.is_grad_enabled(), len(ids), len(rows)))
        return real(run, config, ids, mask, rows)

    monkeypatch.setattr(shared_prefill, "prefill", recording)  # generation
    monkeypatch.setattr(shared_prompts, "prefill", recording)  # the loss forward
    recipe = recipe_from_dict({
        "name": "shared", "model": {"name": "builtin:smollm2-135m-instruct", "backend": "hf"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "builtin:arithmetic", "task": "arithmetic", "generator": {"n": 16, "seed": 0}},
        "rewards": [{"name": "answer_match", "extract": "last_number"}],
        "training": {"max_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4, "save_steps": 1},
        "generation": {"max_completion_length": 4},
        "output": {"dir": str(tmp_path / "shared")},
    })
    assert train(recipe) == 0
    assert seen == [(False, 2, 8), (True, 2, 8)]
