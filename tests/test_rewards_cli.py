"""`lowmem-r1 rewards list | score | check` on the bundled recipes and local data."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem_r1.cli import app
from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.preflight.rewards_check import check_gold, score_completion
from lowmem_r1.rewards import REGISTRY

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.toml"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_list_shows_every_reward():
    res = run("rewards", "list")
    assert res.exit_code == 0, res.output
    for name in REGISTRY:
        assert name in res.output
    assert "extract='auto'" in res.output and "columns: nums, target" in res.output


def test_list_keeps_descriptions_readable_at_80_columns():
    res = runner.invoke(app, ["rewards", "list"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    row = next(line for line in res.output.splitlines() if "answer_match" in line)
    assert "1 if the extracted answer" in row  # the description column is not squeezed to a few letters


def test_score_text_with_column_override():
    res = run("rewards", "score", str(DEMO), "3 + 5 = 8", "--column", "answer=8")
    assert res.exit_code == 0, res.output
    assert "answer_match" in res.output and "brevity" in res.output
    # answer_match 1 x 1.0 + brevity (1 - 9/80) x 0.5
    assert f"{1 + 0.5 * (1 - 9 / 80):.4g}" in res.output


def test_score_file_and_row(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("I think it is 7")
    recipe = load_recipe(DEMO)
    report = score_completion(recipe, f.read_text(), row_index=3)
    gold = report.row["answer"]
    assert dict((n, s) for n, _, s in report.scores)["answer_match"] == (1.0 if str(gold) == "7" else 0.0)
    res = run("rewards", "score", str(DEMO), "--file", str(f), "--row", "3")
    assert res.exit_code == 0, res.output
    assert "What is" in res.output  # the row's prompt is shown


def test_score_needs_exactly_one_completion_source():
    res = run("rewards", "score", str(DEMO))
    assert res.exit_code != 0


def test_check_demo_gold_answers_get_full_marks():
    report = check_gold(load_recipe(DEMO), limit=40)
    assert report.ok
    by = {c.name: c for c in report.checks}
    assert by["answer_match"].at_full == by["answer_match"].scored == 40
    assert by["brevity"].full_marks is None
    res = run("rewards", "check", str(DEMO), "--limit", "20")
    assert res.exit_code == 0, res.output
    assert "20/20" in res.output


def test_check_catches_a_reward_that_cannot_score():
    # The demo writes plain answers ("The answer is 8."): an <answer>-tag extraction never matches them.
    res = run("rewards", "check", str(DEMO), "--limit", "10", "--set", "rewards.0.extract=tag")
    assert res.exit_code == 1
    assert "FAIL" in res.output and "answer_match" in res.output and "0/10" in res.output


def test_check_gsm8k_recipe_on_local_data(gsm8k_dir):
    recipe = load_recipe(REPO / "recipes" / "gsm8k.toml", [f"data.source={gsm8k_dir}"])
    report = check_gold(recipe, limit=200)
    assert report.ok, [(c.name, c.at_full, c.scored) for c in report.checks]
    assert {c.name for c in report.checks} >= {
        "answer_match",
        "integer_answer",
        "xml_strict_format",
        "xml_count",
    }
    assert all(c.at_full == c.scored == 200 for c in report.checks)


def test_check_countdown_recipe_with_assistant_prefix(base_model_dir):
    """The countdown recipe opens <think> in the assistant turn: the gold completions lack it, the prompt
    ends with it, and think_format must still give full marks."""
    recipe = load_recipe(
        REPO / "recipes" / "countdown.toml",
        [
            "model.name=builtin:smollm2-135m-instruct",
            "data.source=builtin:countdown",
            "data.generator.n=64",
            "data.eval_size=0",
        ],
    )
    report = check_gold(recipe, limit=64)
    assert report.ok, report.explain()
    assert all(c.at_full == c.scored == 64 for c in report.checks)


def test_read_completion(tmp_path):
    from lowmem_r1.core.errors import UserError
    from lowmem_r1.preflight.rewards_check import parse_columns, read_completion

    assert (
        read_completion("<think>a</think>\\n<answer>苹果</answer>", None)
        == "<think>a</think>\n<answer>苹果</answer>"
    )
    f = tmp_path / "c.txt"
    f.write_text("line1\nline2\n")
    assert read_completion(None, str(f)) == "line1\nline2\n"
    with pytest.raises(UserError):
        read_completion("a", str(f))
    with pytest.raises(UserError, match="not found"):
        read_completion(None, str(tmp_path / "missing.txt"))
    assert parse_columns(["answer=8", "nums=[1, 2, 3]", "solution=x + 1"]) == {
        "answer": 8,
        "nums": [1, 2, 3],
        "solution": "x + 1",
    }
