"""Every bundled recipe validates, prints with --dry-run, names its source, and its rewards give full marks
to a correct answer written in its own prompt format (on local stand-ins for its hub dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem_r1.cli import app
from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.data import gold_completion, load_splits
from lowmem_r1.pipeline.multistage import is_pipeline_file
from lowmem_r1.rewards import REGISTRY, build

RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.toml")
                 if not is_pipeline_file(p))  # [[stages]] recipes: tests/test_pipeline.py
GPU_RECIPES = [p for p in RECIPES if p.stem != "demo"]

# Rewards with full marks for any correct, well-formed answer. The others measure something a gold answer
# need not have (similarity to the reference text, step markers, n-gram variety, length).
CORRECTNESS = {"answer_match", "boxed_match", "math_accuracy", "countdown_equation", "integer_answer",
               "think_format", "xml_strict_format", "xml_soft_format"}

NUMINA_LIKE = [  # NuminaMath-TIR rows (problem, solution with \boxed{}), written here: no hub in tests
    {"problem": "What is the coefficient of $x^2y^6$ in the expansion of $\\left(\\frac{3}{5}x-\\frac{y}{2}\\right)^8$?",
     "solution": "By the binomial theorem the term is $\\binom{8}{6}\\left(\\frac{3}{5}x\\right)^2\\left(-\\frac{y}{2}"
                 "\\right)^6 = 28 \\cdot \\frac{9}{25} \\cdot \\frac{1}{64} x^2y^6$. So the coefficient is "
                 "$\\boxed{\\frac{63}{400}}$."},
    {"problem": "Find the sum of the roots of $x^2 - 5x + 6 = 0$.",
     "solution": "By Vieta's formulas the sum of the roots is $5$.\n\nThe answer is $\\boxed{5}$."},
    {"problem": "Solve $\\sqrt{x} = 3$.", "solution": "Squaring both sides, $x = \\boxed{9}$."},
]


def test_the_bundled_recipes_are_all_there():
    assert {p.stem for p in RECIPES} >= {"demo", "gsm8k", "countdown", "numina-math", "boxed-qlora"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_dry_runs(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.rewards
    res = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "the run will use" in res.output and f"runs/{path.stem}" in res.output


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_gpu_recipe_names_its_source_and_vram(path):
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines()[:20] if line.startswith("#"))
    assert "Source" in header and "VRAM" in header and "24 GB" in header
    r = load_recipe(path)
    assert r.model.load_in_4bit and r.model.fast_inference and r.generation.use_vllm
    assert r.lora.r <= r.model.max_lora_rank
    assert r.model.max_seq_length >= r.data.max_prompt_length + r.generation.max_completion_length
    assert any(e.name in CORRECTNESS - {"overlong_penalty"} for e in r.rewards)


def _local_data(recipe, gsm8k_dir: Path, tmp_path: Path) -> None:
    """Point a recipe's hub dataset at a local stand-in with the same columns."""
    d = recipe.data
    if d.task == "gsm8k":
        d.source, d.split, d.eval_split, d.limit = str(gsm8k_dir), "test", None, 40
    elif d.task == "math":
        path = tmp_path / "numina.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in NUMINA_LIKE))
        d.source, d.eval_split = str(path), None
    elif d.source.startswith("builtin:"):
        d.generator = {**d.generator, "n": 60}
        d.eval_size = min(d.eval_size, 10)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_gold_answers_get_full_marks_from_the_recipes_rewards(path, gsm8k_dir, base_model_dir, tmp_path):
    from transformers import AutoTokenizer

    recipe = load_recipe(path)
    _local_data(recipe, gsm8k_dir, tmp_path)
    tok = AutoTokenizer.from_pretrained(base_model_dir)  # ChatML, like the Qwen models of the recipes
    rows = list(load_splits(recipe, tok).train)
    assert rows
    judged = [e for e in recipe.rewards if e.name in CORRECTNESS]
    assert judged
    for entry in judged:
        func = build(entry.name, **entry.params)
        best = REGISTRY[entry.name].full_marks(entry.params)
        for row in rows:
            prompt = row["prompt"]
            gold = gold_completion(row, recipe)
            comp = [{"role": "assistant", "content": gold}] if isinstance(prompt, list) else gold
            cols = {k: [v] for k, v in row.items() if k != "prompt"}
            got = func(prompts=[prompt], completions=[comp], **cols)[0]
            assert got == best, f"{path.stem}: {entry.name} gave {got} (best {best}) to:\n{gold}"
