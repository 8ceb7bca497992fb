"""Generation that prefills each distinct prompt once (inference.generate_sharing_prompts): the same
tokens as plain `generate`, and the GRPO trainer's transformers path goes through it."""

import pytest

from lowmem_r1.inference import generate_sharing_prompts
from lowmem_r1.recipe import recipe_from_dict


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


def test_grpo_generation_prefills_each_prompt_once(tmp_path, base_model_dir, monkeypatch):
    """One real GRPO step on the embedded model: TRL's generate call goes through the shared prefill, with
    its num_generations copies of each prompt (2 prompts x 4)."""
    from lowmem_r1 import inference
    from lowmem_r1.train import train

    seen = []

    def recording(generate, model, **kw):
        distinct = len({tuple(r) for r in kw["input_ids"].tolist()})
        seen.append((len(kw["input_ids"]), distinct))
        return generate_sharing_prompts(generate, model, **kw)

    monkeypatch.setattr(inference, "generate_sharing_prompts", recording)
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
    assert seen == [(8, 2)]
