"""Dynamic sampling (training/grpo/dynamic_sampling.py) on a stand-in for TRL's generation hook, and the GRPO controls' recipe checks."""

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.training.grpo.dynamic_sampling import (
    DynamicSampling,
    groups_with_signal,
    merge_batches,
    refill_indices,
)
from lowmem_r1.training.grpo.settings import GRPOExtensions

G = 2


@dataclass
class Args(GRPOExtensions):  # the fields of LowmemGRPOConfig the mixin reads
    seed: int = 0
    steps_per_generation: int = 1


class FakeGRPO:
    """What DynamicSampling needs from GRPOTrainer: `_generate` and `_generate_and_score_completions`
    returning TRL's batch dict. Prompt i has reward spread iff i is even; prompt width grows with i."""

    def _generate(self, prompts):
        return None, [[7] * 3 for _ in prompts]

    def _generate_and_score_completions(self, inputs):
        self._generate([x["prompt"] for x in inputs])
        self.calls.append([x["i"] for x in inputs[::G]])
        n = len(inputs)
        width = 1 + max(x["i"] for x in inputs) % 3
        adv = torch.tensor([(1.0 if k % 2 else -1.0) if x["i"] % 2 == 0 else 0.0 for k, x in enumerate(inputs)])
        mask = torch.ones(n, 3, dtype=torch.long)
        return {
            "prompt_ids": torch.tensor([[x["i"]] * width for x in inputs]),
            "prompt_mask": torch.ones(n, width, dtype=torch.long),
            "completion_ids": torch.full((n, 3), 7),
            "completion_mask": mask,
            "advantages": adv,
            "num_items_in_batch": mask.sum(),
            "old_per_token_logps": None,
        }


class Trainer(DynamicSampling, FakeGRPO):
    def __init__(self, mode, draws=4, steps_per_generation=1, step=0, seed=0):
        self.num_generations = G
        self.model = SimpleNamespace(training=True)
        self.args = Args(seed=seed, steps_per_generation=steps_per_generation, dynamic_sampling=mode,
                         max_refill_draws=draws)
        self.state = SimpleNamespace(global_step=step)
        self.train_dataset = [{"prompt": f"p{i}", "i": i} for i in range(100)]
        self._metrics = {"train": defaultdict(list)}
        self.calls = []


def batch(ids):
    return [{"prompt": f"p{i}", "i": i} for i in ids for _ in range(G)]


def test_off_changes_nothing_but_counts_generated_tokens():
    t = Trainer("off")
    out = t._generate_and_score_completions(batch([1, 2, 3, 4]))
    assert out["advantages"].shape[0] == 8 and len(t.calls) == 1
    assert t._metrics["train"]["tokens/generated"] == [24.0]


def test_skip_drops_groups_without_signal():
    t = Trainer("skip")
    out = t._generate_and_score_completions(batch([1, 2, 3, 4]))
    assert out["prompt_ids"][:, -1].tolist() == [2, 2, 4, 4]
    assert out["num_items_in_batch"].item() == 4 * 3
    assert len(t.calls) == 1
    assert t._metrics["train"]["dynamic/skipped_groups"] == [2.0]
    assert t._metrics["train"]["dynamic/extra_generations"] == [0.0]


def test_refill_fills_the_batch_with_groups_that_have_signal():
    t = Trainer("refill", step=3)
    out = t._generate_and_score_completions(batch([1, 2, 3, 4]))
    assert len(t.calls) >= 2
    assert out["advantages"].shape[0] == 8
    assert all(groups_with_signal(out["advantages"], G))
    assert all(i % 2 == 0 for i in out["prompt_ids"][:, -1].tolist())
    # prompts of different widths were merged: left padding, masks follow
    assert out["prompt_ids"].shape == out["prompt_mask"].shape
    assert (out["prompt_mask"].sum(1) >= 1).all() and out["old_per_token_logps"] is None
    extra = t._metrics["train"]["dynamic/extra_generations"][0]
    assert extra == G * sum(len(c) for c in t.calls[1:])
    assert t._metrics["train"]["tokens/generated"] == [3.0 * (8 + extra)]


def test_refill_draws_depend_only_on_seed_and_step():
    a, b, c = Trainer("refill", step=5), Trainer("refill", step=5), Trainer("refill", step=6)
    for t in (a, b, c):
        t._generate_and_score_completions(batch([1, 3, 5, 7]))
    assert a.calls == b.calls and a.calls != c.calls
    assert refill_indices(0, 5, 0, 100, 4) == refill_indices(0, 5, 0, 100, 4)


def test_refill_is_bounded_and_keeps_one_no_op_group_when_nothing_has_signal():
    t = Trainer("refill", draws=2)
    t.train_dataset = [{"prompt": f"p{i}", "i": i} for i in range(1, 100, 2)]  # odd: never any signal
    out = t._generate_and_score_completions(batch([1, 3, 5, 7]))
    assert len(t.calls) == 3  # the batch + 2 refill rounds
    # one zero-advantage group is kept so TRL still has a (no-op) batch; no backward pass on the rest
    assert out["advantages"].tolist() == [0.0] * G
    assert t._metrics["train"]["dynamic/groups_with_signal"] == [0.0]


def test_skip_keeps_micro_batches_equal():
    t = Trainer("skip", steps_per_generation=4)
    out = t._generate_and_score_completions(batch([2, 3, 5, 7]))  # one group with signal (2 rows), 4 chunks
    assert out["prompt_ids"][:, -1].tolist() == [2, 2, 3, 3]  # topped up with a zero-signal group


class ScoredGRPO(FakeGRPO):
    """Two rewards: correctness (column 0) differs within a group only for prompts divisible by 4, partial
    credit (column 1) for every prompt, so the weighted total's advantages always differ."""

    def _calculate_rewards(self, inputs):
        return torch.tensor([[float(k % 2) if x["i"] % 4 == 0 else 0.0, k % 2 + 0.1 * x["i"]]
                             for k, x in enumerate(inputs)])

    def _generate_and_score_completions(self, inputs):
        self._calculate_rewards(inputs)
        out = super()._generate_and_score_completions(inputs)
        out["advantages"] = torch.tensor([1.0 if k % 2 else -1.0 for k in range(len(inputs))])
        return out


class ScoredTrainer(DynamicSampling, ScoredGRPO):
    __init__ = Trainer.__init__


def test_one_reward_can_decide_which_groups_have_signal():
    t = ScoredTrainer("skip")
    out = t._generate_and_score_completions(batch([1, 2, 4, 8]))
    assert out["prompt_ids"][:, -1].tolist() == [1, 1, 2, 2, 4, 4, 8, 8]  # by the total, every group
    t = ScoredTrainer("skip")
    t.args.signal_reward = 0
    out = t._generate_and_score_completions(batch([1, 2, 4, 8]))
    assert out["prompt_ids"][:, -1].tolist() == [4, 4, 8, 8]  # partial credit alone keeps no group
    t = ScoredTrainer("refill", step=2)
    t.args.signal_reward = 0
    out = t._generate_and_score_completions(batch([1, 2, 4, 8]))
    assert len(t.calls) >= 2 and all(i % 4 == 0 for i in out["prompt_ids"][:, -1].tolist())
    nan = float("nan")
    scores = torch.tensor([nan, nan, 1.0, nan, 0.0, 1.0])
    assert groups_with_signal(torch.ones(6), G, scores) == [False, False, True]


def test_merge_pads_prompts_left_and_completions_right():
    a = {"prompt_ids": torch.tensor([[5, 6]]), "completion_ids": torch.tensor([[1]]), "advantages": torch.tensor([1.0]),
         "completion_mask": torch.tensor([[1]]), "num_items_in_batch": torch.tensor(1)}
    b = {"prompt_ids": torch.tensor([[7]]), "completion_ids": torch.tensor([[2, 3]]), "advantages": torch.tensor([2.0]),
         "completion_mask": torch.tensor([[1, 1]]), "num_items_in_batch": torch.tensor(2)}
    out = merge_batches([(a, [0]), (b, [0])], pad_token_id=9)
    assert out["prompt_ids"].tolist() == [[5, 6], [9, 7]]
    assert out["completion_ids"].tolist() == [[1, 9], [2, 3]]
    assert out["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert out["num_items_in_batch"].item() == 3


def controls(**training):
    return {
        "model": {"name": "builtin:smollm2-135m-instruct"},
        "data": {"source": "builtin:arithmetic", "task": "arithmetic"},
        "rewards": [{"name": "answer_match", "extract": "last_number"}],
        "training": training,
    }


def test_grpo_controls_validate():
    r = recipe_from_dict(controls(epsilon_high=0.28, importance_sampling_level="sequence", loss_type="luspo",
                                  top_entropy_quantile=0.2, dynamic_sampling="refill", delta=1.5))
    assert r.training.epsilon_high == 0.28 and r.training.dynamic_sampling == "refill"
    assert recipe_from_dict(controls(dynamic_sampling="skip", dynamic_sampling_reward="answer_match"))
    for bad, key in [
        ({"loss_type": "luspo"}, "importance_sampling_level"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
        ({"delta": 1.1}, "training.delta"),
        ({"importance_sampling_level": "group"}, "importance_sampling_level"),
        ({"dynamic_sampling": "always"}, "dynamic_sampling"),
        ({"max_refill_draws": 0}, "max_refill_draws"),
        ({"dynamic_sampling_reward": "answer_match"}, "needs training.dynamic_sampling"),
        ({"dynamic_sampling": "skip", "dynamic_sampling_reward": "answer_mach"}, "not one of this recipe's rewards"),
    ]:
        with pytest.raises(UserError, match=key):
            recipe_from_dict(controls(**bad))
    with pytest.raises(UserError, match="clip_min"):
        recipe_from_dict({**controls(), "generation": {"vllm_importance_sampling_clip_min": 4.0}})
    with pytest.raises(UserError, match="clip_max"):
        recipe_from_dict({**controls(), "generation": {"vllm_importance_sampling_mode": "token_truncate",
                                                        "vllm_importance_sampling_clip_max": None}})


def test_grpo_controls_reach_trl_config(tmp_path):
    """Every control is a real GRPOConfig field with the recipe's value (both backends share grpo_kwargs)."""

    from lowmem_r1.runs.rundir import RunDir
    from lowmem_r1.training.grpo.stage import grpo_kwargs
    from lowmem_r1.training.grpo.trainer import config_class

    r = recipe_from_dict(controls(epsilon_high=0.28, delta=1.6, importance_sampling_level="sequence",
                                  top_entropy_quantile=0.2, multi_objective_aggregation="normalize_then_sum",
                                  mask_truncated_completions=True, per_device_train_batch_size=8))
    config = config_class()(**grpo_kwargs(r, RunDir(tmp_path), [1.0]), use_cpu=True)
    assert (config.epsilon_high, config.delta, config.importance_sampling_level) == (0.28, 1.6, "sequence")
    assert config.top_entropy_quantile == 0.2 and config.multi_objective_aggregation == "normalize_then_sum"
    assert config.mask_truncated_completions and config.vllm_importance_sampling_correction
    assert config.vllm_importance_sampling_clip_max == 3.0


def _train(recipe, *args, fault=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LOWMEM_R1_FAULT", None)
    if fault:
        env["LOWMEM_R1_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(recipe), *args],
                          capture_output=True, text=True, env=env, cwd=recipe.parent, timeout=1800)


@pytest.mark.slow
def test_refill_trains_on_cpu_and_resumes_exactly(tmp_path, base_model_dir):
    """Real TRL on the embedded model: refill generates extra groups, logs them, and a run interrupted
    after step 1 and resumed ends with the same adapter as one that was not."""
    from safetensors.torch import load_file

    from lowmem_r1.config.recipe import recipe_to_toml
    from lowmem_r1.runs.rundir import read_jsonl

    def recipe(run):
        cfg = {**controls(dynamic_sampling="refill", max_refill_draws=2, epsilon_high=0.28, max_steps=3,
                          per_device_train_batch_size=8, num_generations=2, learning_rate=1e-3, save_steps=1,
                          seed=7),
               "name": run.name,
               "model": {"name": "builtin:smollm2-135m-instruct", "backend": "hf"},
               "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
               "data": {"source": "builtin:arithmetic", "task": "arithmetic", "generator": {"n": 64, "seed": 0}},
               "generation": {"max_completion_length": 8},
               "output": {"dir": str(run)}}
        path = tmp_path / f"{run.name}.toml"
        path.write_text(recipe_to_toml(recipe_from_dict(cfg)))
        return path

    ref = tmp_path / "ref"
    out = _train(recipe(ref))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_jsonl(ref / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("dynamic/extra_generations" in r and r["tokens/generated"] > 0 for r in rows)
    assert sum(r["dynamic/extra_generations"] for r in rows) > 0  # 2 generations of a 135M model often tie

    run = tmp_path / "int"
    path = recipe(run)
    assert _train(path, fault="step_end:1:SIGINT").returncode == 130
    out = _train(path, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = load_file(str(ref / "adapter" / "adapter_model.safetensors")), load_file(
        str(run / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert [r["dynamic/extra_generations"] for r in read_jsonl(run / "metrics.jsonl")] == [
        r["dynamic/extra_generations"] for r in rows]


def test_continuous_batching_setting_resolves_and_never_applies_with_vllm(monkeypatch):
    import torch

    from lowmem_r1.training.grpo.stage import continuous_batching

    def r(value, **generation):
        return recipe_from_dict({**controls(), "generation": {"continuous_batching": value, **generation}})

    assert continuous_batching(r("on")) and not continuous_batching(r("off"))
    for cuda in (False, True):  # auto: measured slower than the padded-batch generate (0.47x on a CPU)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert not continuous_batching(r("auto"))
    assert not continuous_batching(recipe_from_dict({**controls(), "generation": {"continuous_batching": "on"},
                                                     "model": {"name": "builtin:smollm2-135m-instruct",
                                                               "fast_inference": True}}))
