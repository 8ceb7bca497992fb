"""Training-health signals: labels, warnings with their likely cause, shown live and by `report`."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from lowmem_r1.config.recipe import recipe_from_dict, recipe_to_toml
from lowmem_r1.runs import health
from lowmem_r1.runs.rundir import RunDir

RECIPE = {
    "name": "h",
    "model": {"name": "builtin:smollm2-135m-instruct"},
    "data": {"source": "builtin:arithmetic", "task": "arithmetic"},
    "rewards": [{"name": "answer_match", "extract": "last_number"}, {"name": "brevity", "max_chars": 40}],
}


def rows(n, correct=0.0, grad=0.5):
    return [{"step": s, "reward": 0.3, "rewards/answer_match/mean": correct, "rewards/brevity/mean": 0.3,
             "grad_norm": grad, "loss": 0.0003, "reward_std": 0.1, "frac_reward_zero_std": 0.5,
             "clip_ratio/region_mean": 0.02} for s in range(1, n + 1)]


def test_only_answer_checking_rewards_count_as_correctness():
    assert health.correctness_keys(recipe_from_dict(RECIPE)) == ["rewards/answer_match/mean"]


def test_correctness_stuck_at_zero_warns_once_after_n_steps_and_names_the_fix():
    watch = health.HealthWatch(["rewards/answer_match/mean"], zero_steps=3)
    out = [watch.update(r) for r in rows(5)]
    assert out[0] == out[1] == [] and len(out[2]) == 1 and out[3] == out[4] == []
    assert "exactly 0 for 3 steps" in out[2][0] and "lowmem-r1 rewards check" in out[2][0]
    assert "format" in out[2][0] and "extraction" in out[2][0]


def test_a_nonzero_step_resets_the_count():
    watch = health.HealthWatch(["rewards/answer_match/mean"], zero_steps=3)
    seq = rows(2) + rows(1, correct=0.1) + rows(2)
    assert not any(watch.update(r) for r in seq)


def test_zero_grad_norm_warns_with_its_cause():
    watch = health.HealthWatch([])
    [w] = watch.update({**rows(1, correct=0.5, grad=0.0)[0], "frac_reward_zero_std": 1.0})
    assert "grad norm is 0" in w and "same reward" in w
    assert watch.update(rows(1, grad=0.0)[0]) == []  # once


def test_loss_near_zero_is_labelled_normal_only_with_beta_zero():
    assert "normal with beta = 0" in health.loss_label(0.0003, 0.0)
    assert "normal" not in health.loss_label(0.0003, 0.04)
    assert "normal" not in health.loss_label(0.8, 0.0)


def test_signal_rows_show_vllm_correction_only_when_logged():
    labels = [label for label, _ in health.signal_rows(rows(1)[0])]
    assert labels[:2] == ["grad norm", "reward std"] and "clipped (ratio)" in labels
    assert not any("IS" in x for x in labels)
    vllm = {**rows(1)[0], "sampling/importance_sampling_ratio/mean": 0.98, "sampling/importance_sampling_ratio/min": 0.5}
    assert "vLLM IS ratio (mean)" in [label for label, _ in health.signal_rows(vllm)]


def test_live_display_prints_signals_and_warnings(tmp_path):
    from lowmem_r1.training.progress import TrainingDisplay

    out = io.StringIO()
    recipe = recipe_from_dict(RECIPE)
    display = TrainingDisplay(recipe, RunDir(tmp_path), Console(file=out, force_terminal=False, width=200))
    display.watch.zero_steps = 2
    for r in rows(2):
        display.on_log(None, type("S", (), {"global_step": r["step"]})(), None, logs=r)
    text = out.getvalue()
    assert "grad 0.5" in text and "rewards check" in text
    panel = Console(file=io.StringIO(), width=200)
    panel.print(display._render(2))
    shown = panel.file.getvalue()
    assert "grad norm" in shown and "normal with beta = 0" in shown and "rewards check" in shown


def test_report_shows_signals_and_warnings(tmp_path):
    from lowmem_r1.runs.report import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(recipe_to_toml(recipe_from_dict(RECIPE)))
    (run / "run.json").write_text(json.dumps({"status": "completed", "global_step": 8, "max_steps": 8}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(8, grad=0.0)))
    out = io.StringIO()
    summary = report(run, console=Console(file=out, width=200))
    metrics = {m["metric"] for m in summary["metrics"]}
    assert {"grad_norm", "reward_std", "frac_reward_zero_std", "clip_ratio/region_mean", "loss"} <= metrics
    assert any("rewards check" in w for w in summary["warnings"])
    assert any("grad norm is 0" in w for w in summary["warnings"])
    text = out.getvalue()
    assert "normal for GRPO with beta = 0" in text and "warning: reward answer_match" in text
    assert (Path(run) / "report" / "grad_norm.png").is_file()


def test_zero_correctness_names_the_reward_that_carries_the_signal_and_a_length_rewards_failure():
    # Seen on the sample-efficiency bench: answers at 0, overlong_penalty the only varying reward, and
    # replies collapsed to one digit or nothing within 10 steps.
    watch = health.HealthWatch(["rewards/answer_match/mean"], zero_steps=2)
    step = {"rewards/answer_match/mean": 0.0, "rewards/answer_match/std": 0.0,
            "rewards/overlong_penalty/mean": -0.4, "rewards/overlong_penalty/std": 0.3}
    [w] = [x for _ in range(2) for x in watch.update(step)]
    assert "overlong_penalty carries all the signal" in w and "shortens replies until they are empty" in w
    assert "answer_match carries" not in w


def test_zero_correctness_with_a_format_reward_varying_names_it_without_the_length_hint():
    watch = health.HealthWatch(["rewards/answer_match/mean"], zero_steps=1)
    [w] = watch.update({"rewards/answer_match/mean": 0.0, "rewards/think_format/std": 0.4})
    assert "think_format carries all the signal" in w and "length reward" not in w
    watch = health.HealthWatch(["rewards/answer_match/mean"], zero_steps=1)
    [w] = watch.update({"rewards/answer_match/mean": 0.0, "rewards/think_format/std": 0.0})
    assert "carries all the signal" not in w  # nothing varies: no signal to name


def test_every_completion_truncated_for_n_steps_warns_once_with_the_fix():
    # Seen on the sample-efficiency bench with numeric_closeness: by step 29 every reply ran past the 12-token
    # cap ("89 - 82 equals 1.\n8"), the stray last digit was scored, and held-out accuracy fell 0.203 -> 0.062.
    watch = health.HealthWatch([], zero_steps=3)
    steps = [{"completions/clipped_ratio": c} for c in (1.0, 1.0, 0.9, 1.0, 1.0)]
    assert not any(watch.update(s) for s in steps)  # a step with an ended reply resets the count
    [w] = watch.update({"completions/clipped_ratio": 1.0})
    assert "max_completion_length for 3 steps" in w and "mask_truncated_completions = true" in w
    assert watch.update({"completions/clipped_ratio": 1.0}) == []  # once
    masked = health.HealthWatch.for_recipe(recipe_from_dict({**RECIPE, "training": {"mask_truncated_completions": True}}))
    masked.zero_steps = 1
    [w] = masked.update({"completions/clipped_ratio": 1.0})
    assert "raise it: with training.mask_truncated_completions on" in w and "= true" not in w
