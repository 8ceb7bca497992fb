"""The sample-efficiency benchmark builds recipes the toolkit accepts, for its arms and for a `--best` arm
that adds rewards or changes generation (benchmarks are not run here: they are minutes long)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_sample_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sample_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = argparse.Namespace(op="-", operands=[10, 99], eval_size=64, lr=5e-4, prompts=4, generations=8, seed=42, max_tokens=12)


def test_both_default_arms_are_valid_recipes_that_differ_only_in_their_controls(bench, tmp_path):
    plain = recipe_from_dict(bench.recipe(tmp_path / "plain", bench.PLAIN, ARGS))
    best = recipe_from_dict(bench.recipe(tmp_path / "best", bench.BEST, ARGS))
    assert (plain.training.dynamic_sampling, best.training.dynamic_sampling) == ("off", "refill")
    assert plain.rewards == best.rewards and plain.generation == best.generation
    assert plain.training.seed == best.training.seed == 42


def test_a_best_arm_can_add_rewards_and_change_generation_without_touching_the_defaults(bench, tmp_path):
    arm = {"dynamic_sampling": "skip", "rewards": [{"name": "overlong_penalty", "max_length": 12, "cache_length": 8}],
           "generation": {"temperature": 0.7}}
    r = recipe_from_dict(bench.recipe(tmp_path / "best", arm, ARGS))
    assert [e.name for e in r.rewards] == ["answer_match", "overlong_penalty"]
    assert r.generation.temperature == 0.7 and r.generation.max_completion_length == 12
    assert "rewards" in arm and "generation" in arm  # the caller's dict is not consumed
    plain = recipe_from_dict(bench.recipe(tmp_path / "plain", bench.PLAIN, ARGS))
    assert [e.name for e in plain.rewards] == ["answer_match"] and plain.generation.temperature == 1.0


def test_the_gain_s_standard_error_shrinks_with_more_questions(bench):
    half = {"accuracy": 0.5}
    assert bench.gain_error(half, half, 100) == pytest.approx(100 * (0.5 / 100) ** 0.5)  # 7.1 points
    plain, best = {"accuracy": 0.15}, {"accuracy": 0.25}
    assert bench.gain_error(plain, best, 128) == pytest.approx(bench.gain_error(plain, best, 64) / 2 ** 0.5, rel=0.05)
    assert 2.0 < bench.gain_error({"accuracy": 0.0}, {"accuracy": 0.0}, 64) < 3.0  # no answers right: still noise


def test_several_seeds_are_summarised_by_their_means_and_a_seed_that_never_reached_counts(bench):
    assert bench.summarise([(0.5, 20.0), (0.3, -6.0), (0.4, 4.0)]) == pytest.approx((0.4, 6.0))
    assert bench.summarise([(0.5, 20.0), (float("inf"), -6.0)])[0] == float("inf")


def test_a_best_arm_with_a_bad_control_is_refused_by_the_recipe_schema(bench, tmp_path):
    with pytest.raises(UserError, match="dynamic_sampling"):
        recipe_from_dict(bench.recipe(tmp_path / "best", {"dynamic_sampling": "sometimes"}, ARGS))


@pytest.mark.parametrize("args, message", [
    (["--operands", "50", "10"], "MIN must not exceed MAX"),
    (["--best", '{"dynamic_sampling": "sometimes"}'], "--best: training.dynamic_sampling"),
    (["--best", "[1, 2]"], "a JSON object"),
])
def test_a_bad_task_or_arm_is_refused_in_one_line_before_any_arm_runs(args, message, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
