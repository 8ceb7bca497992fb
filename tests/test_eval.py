"""eval: strict/lenient accuracy, pass@k and majority vote on hand-written completions; real runs on a
few GSM8K rows (when the full set lies beside the repository) and on a run directory with --baseline."""

from __future__ import annotations

import json
import shutil

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.generation.engine import Completion
from lowmem_r1.generation.evaluate import (
    EvalSettings,
    correctness_rewards,
    evaluate,
    lenient_correct,
    resolve_target,
    score,
)


def gsm8k_rows(gsm8k_dir, n):
    """The first n GSM8K test rows as the data pipeline builds them (prompt + reward columns)."""
    from lowmem_r1.data import load_splits

    r = recipe_from_dict({"name": "t", "data": {"task": "gsm8k", "source": str(gsm8k_dir / "test.jsonl"),
                                                "shuffle": False, "limit": n},
                          "rewards": [{"name": "answer_match"}]})
    return [dict(row) for row in load_splits(r).train]


def recipe(task="gsm8k", rewards=None):
    return recipe_from_dict({"name": "t", "data": {"task": task, "source": "test/x"},
                             "rewards": rewards or [{"name": "answer_match", "extract": "tag"}]})


def completions(*texts):
    return [Completion(t, len(t.split()), False, list(range(len(t.split())))) for t in texts]


def test_strict_and_lenient_on_hand_written_completions(gsm8k_dir):
    rows = gsm8k_rows(gsm8k_dir, 4)  # gold answers: 18, 3, 70000, 540
    outs = [
        completions("<think>16-3-4=9, 9*2=18</think> <answer>18</answer>"),  # strict and lenient
        completions("It takes 2 + 1 = 3 bolts."),  # lenient only: no <answer> tag
        completions("The profit is \\boxed{70,000} dollars, not 5."),  # lenient: the boxed value
        completions("<answer>541</answer> (I think 540?)"),  # strict wrong; lenient via last number
    ]
    s = score(recipe(), rows, outs, "model")
    assert [r["strict"] for r in s.records] == [True, False, False, False]
    assert [r["lenient"] for r in s.records] == [True, True, True, True]
    assert s.metrics["accuracy"] == 0.25
    assert s.metrics["accuracy_lenient"] == 1.0
    assert s.metrics["rewards/answer_match"] == 0.25
    assert s.metrics["completion_length"] == sum(c[0].tokens for c in outs) / 4
    assert not lenient_correct("nothing numeric here", "#### 18")
    assert not lenient_correct("18 then 19", "18")  # the last number decides, not any number


def test_weights_and_total_reward(gsm8k_dir):
    rows = gsm8k_rows(gsm8k_dir, 2)
    r = recipe(rewards=[{"name": "answer_match", "extract": "tag", "weight": 2.0},
                        {"name": "integer_answer", "extract": "tag"}])
    s = score(r, rows, [completions("<answer>18</answer>"), completions("<answer>2.5</answer>")], "m")
    assert s.metrics["rewards/answer_match"] == 0.5 and s.metrics["rewards/integer_answer"] == 0.5
    assert s.metrics["reward"] == pytest.approx((2.0 + 1.0 + 0.0 + 0.0) / 2)
    assert correctness_rewards(r) == [("answer_match", 1.0)]  # integer_answer reads no gold column


def test_pass_at_k_and_majority_vote(gsm8k_dir):
    rows = gsm8k_rows(gsm8k_dir, 2)
    outs = [
        completions("<answer>17</answer>", "<answer>18</answer>", "<answer>17</answer>"),  # pass, majority wrong
        completions("<answer>3</answer>", "so 3", "<answer>4</answer>"),  # pass, majority right (3, 3, 4)
    ]
    s = score(recipe(), rows, outs, "m")
    assert s.metrics["pass@3"] == 1.0
    assert s.metrics["maj@3"] == 0.5
    assert s.metrics["accuracy"] == pytest.approx(2 / 6)
    assert [(r["index"], r["sample"]) for r in s.records][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_countdown_has_no_lenient_accuracy():
    rows = [{"prompt": [{"role": "user", "content": "use 1 2 3 to make 6"}], "nums": [1, 2, 3], "target": 6}]
    s = score(recipe("countdown", [{"name": "countdown_equation"}]), rows,
              [completions("<think>x</think><answer>1 + 2 + 3</answer>")], "m")
    assert s.metrics["accuracy_lenient"] is None
    assert s.metrics["accuracy"] == 1.0


def test_eval_gsm8k_file_with_a_model(gsm8k_dir, base_model_dir, tmp_path):
    """`lowmem-r1 eval MODEL --data test.jsonl --task gsm8k` on 2 real GSM8K rows with the embedded model."""
    out = tmp_path / "ev"
    res = evaluate(str(base_model_dir), EvalSettings(limit=2, max_new_tokens=8, out=out),
                   data=str(gsm8k_dir / "test.jsonl"), task="gsm8k")
    assert res["prompts"] == 2 and res["task"] == "gsm8k" and res["strict_reward"] == "answer_match"
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 and all(g["tokens"] <= 8 for g in gens)
    assert gens[0]["gold"] == "18" and "Janet" in json.dumps(gens[0]["prompt"])
    m = res["metrics"]
    assert 0 < m["completion_length"] <= 8 and m["accuracy"] in (0.0, 0.5, 1.0)
    with pytest.raises(UserError, match="already exists"):
        evaluate(str(base_model_dir), EvalSettings(limit=1, max_new_tokens=2, out=out),
                 data=str(gsm8k_dir / "test.jsonl"), task="gsm8k")


@pytest.fixture()
def eval_run(lora_run_dir, tmp_path):
    """The fixture run with held-out prompts in its recipe (as the demo recipe has)."""
    run = tmp_path / "run"
    shutil.copytree(lora_run_dir, run)
    (run / "recipe.toml").write_text(
        'name = "fixture"\n\n[model]\nname = "builtin:smollm2-135m-instruct"\n\n'
        '[data]\nsource = "builtin:arithmetic"\ntask = "arithmetic"\neval_size = 4\n\n'
        '[eval]\nsize = 3\nmax_new_tokens = 6\n\n'
        '[[rewards]]\nname = "answer_match"\nextract = "last_number"\n\n[[rewards]]\nname = "brevity"\n'
    )
    return run


def test_cli_eval_run_dir_with_baseline(eval_run):
    """What `make demo` runs: `lowmem-r1 eval RUN_DIR --baseline`, nothing else."""
    from typer.testing import CliRunner

    from lowmem_r1.cli import app

    result = CliRunner().invoke(app, ["eval", str(eval_run), "--baseline"])
    assert result.exit_code == 0, result.output
    assert "difference" in result.output and "accuracy (strict: answer_match)" in result.output
    (folder,) = (eval_run / "eval").iterdir()
    res = json.loads((folder / "results.json").read_text())
    assert res["prompts"] == 3 and res["sampling"]["max_new_tokens"] == 6 and res["sampling"]["temperature"] == 0
    base, tuned = res["baseline"]["metrics"], res["metrics"]
    for key, diff in res["difference"].items():
        assert diff == pytest.approx(tuned[key] - base[key])
    gens = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
    assert sorted({g["model"] for g in gens}) == ["base", "tuned"] and len(gens) == 6
    assert all(set(g["rewards"]) == {"answer_match", "brevity"} for g in gens)


def test_eval_errors(eval_run, lora_run_dir, base_model_dir, tmp_path):
    with pytest.raises(UserError, match="--data FILE --task TASK"):
        resolve_target(str(base_model_dir))
    with pytest.raises(UserError, match="go together"):
        resolve_target(str(eval_run), data="x.jsonl")
    with pytest.raises(UserError, match="x.jsonl not found"):  # a missing file, before any model loads
        evaluate(str(base_model_dir), EvalSettings(), data="x.jsonl", task="arithmetic")
    (tmp_path / "x.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(UserError, match="has no adapter"):
        evaluate(str(base_model_dir), EvalSettings(baseline=True), data=str(tmp_path / "x.jsonl"), task="arithmetic")
    with pytest.raises(UserError, match="data.eval_size"):  # the plain fixture recipe holds no prompts out
        evaluate(str(lora_run_dir), EvalSettings(limit=1, max_new_tokens=2))
    with pytest.raises(UserError, match="needs sampling"):
        evaluate(str(eval_run), EvalSettings(samples=2, temperature=0.0, max_new_tokens=2))
