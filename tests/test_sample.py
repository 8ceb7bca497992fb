"""`lowmem-r1 sample`: real generation from the embedded model, a filter whose every kept row passes when
scored again, pass rates, resume, and a filter that keeps nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict, recipe_to_toml
from lowmem_r1.runs.rundir import read_jsonl

MODEL = "builtin:smollm2-135m-instruct"


def recipe_dict() -> dict:
    return {
        "name": "sample-test",
        "model": {"name": MODEL, "backend": "hf"},
        "data": {"source": "builtin:arithmetic", "task": "arithmetic", "generator": {"n": 40, "seed": 1}},
        "rewards": [{"name": "answer_match", "extract": "last_number"}, {"name": "brevity", "max_chars": 60,
                                                                         "weight": 0.5}],
        "generation": {"max_completion_length": 20},
        "training": {"per_device_train_batch_size": 4, "num_generations": 4},
    }


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, base_model_dir):
    from lowmem_r1.generation.rejection import SampleSettings, sample

    out = tmp_path_factory.mktemp("sample") / "out"
    s = SampleSettings(k=4, keep=2, limit=6, temperature=1.0, batch_size=24, grpo_prompts=True)
    result = sample(MODEL, recipe_from_dict(recipe_dict()), out, s)
    return out, result, s


def test_every_kept_row_passes_when_scored_again(sampled):
    from lowmem_r1.rewards import build

    out, result, s = sampled
    rows = read_jsonl(out / "samples.jsonl")
    assert result.kept == len(rows) > 0 and result.generated == 6 * 4
    correct = build("answer_match", extract="last_number")
    for row in rows:
        prompt, completion = row["messages"][:-1], row["messages"][-1]
        assert completion["role"] == "assistant" and prompt[-1]["role"] == "user"
        score = correct(prompts=[prompt], completions=[[completion]], answer=[row["answer"]])[0]
        assert score == 1.0, row
    per_prompt = {}
    for row in rows:
        per_prompt.setdefault(row["source_index"], []).append(" ".join(row["messages"][-1]["content"].split()))
    assert all(len(v) <= s.keep and len(set(v)) == len(v) for v in per_prompt.values())  # at most n, deduped


def test_pass_rates_and_grpo_prompts(sampled):
    out, result, _ = sampled
    rates = read_jsonl(out / "pass_rates.jsonl")
    assert len(rates) == 6 and all(r["k"] == 4 and r["pass_rate"] == r["passed"] / 4 for r in rates)
    log = read_jsonl(out / "generations.jsonl")
    for r in rates:  # the pass rate is the share of that prompt's samples with full correctness marks
        assert r["passed"] == sum(1 for g in log if g["index"] == r["index"] and g["strict"])
    grpo = read_jsonl(out / "grpo_prompts.jsonl")
    assert len(grpo) == sum(1 for r in rates if 0 < r["pass_rate"] < 1)
    assert all(0 < g["pass_rate"] < 1 and "prompt" in g and "answer" in g for g in grpo)
    assert json.loads((out / "sample.json").read_text())["kept"] == result.kept
    assert sum(int(line.split(":")[1].split()[0]) for line in result.histogram(4)) == 6


def test_rerun_skips_done_prompts_and_refilters(sampled, monkeypatch):
    """A rerun generates nothing for prompts already sampled (the model is not even loaded) and applies
    the new filter to the saved scores."""
    import lowmem_r1.generation.rejection as sample_mod

    out, result, s = sampled
    monkeypatch.setattr(sample_mod, "load_generator", lambda *a, **k: pytest.fail("generated again"))
    again = sample_mod.sample(MODEL, recipe_from_dict(recipe_dict()), out,
                              sample_mod.SampleSettings(**{**vars(s), "keep": 1}))
    assert again.generated == result.generated and again.kept <= result.kept
    assert again.kept == sum(1 for r in read_jsonl(out / "pass_rates.jsonl") if r["passed"])


def test_filter_that_keeps_nothing_writes_nothing(tmp_path, base_model_dir):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(recipe_dict())))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "sample", MODEL, "-r", str(recipe), "-o",
                           str(out), "-k", "2", "--limit", "2", "--min-reward", "99", "--max-new-tokens", "4"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "kept nothing" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "samples.jsonl").exists() and not (out / "sample.json").exists()


def test_out_folder_not_ours_is_refused(tmp_path):
    from lowmem_r1.core.errors import UserError
    from lowmem_r1.generation.rejection import SampleSettings, sample

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by"):
        sample(MODEL, recipe_from_dict(recipe_dict()), out, SampleSettings())
    assert (out / "notes.txt").read_text() == "keep me"


def test_sft_stage_trains_on_samples_rows(sampled):
    """samples.jsonl is SFT data as it is: messages rows, split at the assistant turn."""
    from datasets import Dataset

    from lowmem_r1.data.sft import to_prompt_completion

    out, _, _ = sampled
    raw = Dataset.from_list(read_jsonl(out / "samples.jsonl"))
    cfg = {**recipe_dict(), "stage": "sft", "data": {"source": str(out / "samples.jsonl"), "task": "arithmetic"}}
    ds = to_prompt_completion(raw, recipe_from_dict(cfg))
    assert len(ds) == len(raw) and ds[0]["completion"][0]["role"] == "assistant"
    assert Path(out / "samples.jsonl").is_file()


def test_a_model_that_cannot_resolve_leaves_no_output_folder(tmp_path):
    from lowmem_r1.core.errors import UserError
    from lowmem_r1.generation.rejection import SampleSettings, sample

    out = tmp_path / "samples"
    with pytest.raises(UserError, match="nonexistent"):
        sample(str(tmp_path / "nonexistent"), recipe_from_dict(recipe_dict()), out, SampleSettings(k=2))
    assert not out.exists()


def test_teacher_with_another_tokenizer_is_said_once(tmp_path, base_model_dir):
    """A teacher whose tokenizer differs from the recipe's model (the student): fine for text SFT, one note."""
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (teacher / name).symlink_to(base_model_dir / name)
    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    tok.add_tokens(["<teacher-only>"])
    tok.save_pretrained(str(teacher))
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(recipe_dict())))
    done = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "sample", str(teacher), "-r", str(recipe), "-o",
                           str(tmp_path / "out"), "-k", "1", "--limit", "2", "--min-reward", "-99",
                           "--max-new-tokens", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr[-2000:]
    said = (done.stdout + done.stderr).count("have different tokenizers")
    assert said == 1, done.stdout + done.stderr
    assert len(read_jsonl(tmp_path / "out" / "samples.jsonl")) == 2

    same = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "sample", str(base_model_dir), "-r", str(recipe),
                           "-o", str(tmp_path / "out2"), "-k", "1", "--limit", "1", "--min-reward", "-99",
                           "--max-new-tokens", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert same.returncode == 0 and "different tokenizers" not in same.stdout + same.stderr
