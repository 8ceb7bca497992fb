"""End to end on CPU: the embedded model trains for real, and the run directory holds what it should."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.runs.rundir import RunDir, read_jsonl

REPO = Path(__file__).resolve().parent.parent


def tiny(run_dir: Path, **training) -> dict:
    """The demo's task at the smallest size that still learns something per step."""
    return {
        "name": "tiny",
        "model": {"name": "builtin:smollm2-135m-instruct", "backend": "hf"},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "builtin:arithmetic", "task": "arithmetic", "generator": {"n": 64, "seed": 0}},
        "rewards": [{"name": "answer_match", "extract": "last_number"}, {"name": "brevity", "max_chars": 40}],
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2,
                     "learning_rate": 1e-3, "save_steps": 1, "save_total_limit": 2, **training},
        "generation": {"max_completion_length": 8},
        "output": {"dir": str(run_dir)},
    }


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, base_model_dir):
    from lowmem_r1.training.run import train

    run = tmp_path_factory.mktemp("train") / "tiny"
    code = train(recipe_from_dict(tiny(run)))
    assert code == 0
    return RunDir(run)


def test_run_directory_layout(trained_run):
    run = trained_run
    assert run.recipe.is_file() and "builtin:smollm2-135m-instruct" in run.recipe.read_text()
    info = run.info()
    assert info["status"] == "completed" and info["global_step"] == 2 and info["backend"] == "hf"
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert (run.adapter / "tokenizer_config.json").is_file()
    # save_total_limit=2 and save_steps=1: exactly the two newest checkpoints, complete, no staging left
    assert [p.name for p in run.checkpoint_dirs()] == ["checkpoint-1", "checkpoint-2"]
    assert not (run.checkpoints / ".staging").exists()
    for ckpt in run.checkpoint_dirs():
        assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()


def test_metrics_have_each_step_once(trained_run):
    rows = read_jsonl(trained_run.metrics)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/answer_match/mean",
                "rewards/brevity/mean", "completions/mean_length", "learning_rate", "step_time"):
        assert key in rows[0], key


def test_completions_log_every_sample(trained_run):
    rows = read_jsonl(trained_run.completions)
    assert len(rows) == 2 * 4  # 2 steps x 4 completions
    assert {r["step"] for r in rows} == {1, 2}
    first = rows[0]
    assert first["prompt"].startswith("What is") and set(first["rewards"]) == {"answer_match", "brevity"}
    assert first["reward"] == pytest.approx(sum(v for v in first["rewards"].values() if v is not None))


def test_adapter_changes_the_model(trained_run, base_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    ids = tok("What is 3 + 5?", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, trained_run.adapter)
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-4


def test_existing_run_is_kept_without_force(trained_run):
    from lowmem_r1.training.run import Start, prepare_run_dir

    recipe = recipe_from_dict(tiny(trained_run.path))
    with pytest.raises(UserError, match="--resume") as e:
        prepare_run_dir(recipe, Start.new(recipe))
    assert str(trained_run.path) in str(e.value)
    assert trained_run.adapter.is_dir()


def test_resume_refuses_changed_recipe(trained_run):
    from lowmem_r1.training.run import Start, prepare_run_dir

    changed = recipe_from_dict(tiny(trained_run.path, learning_rate=5e-4))
    with pytest.raises(UserError, match="training.learning_rate"):
        prepare_run_dir(changed, Start.resume(changed))


def test_resume_with_nothing_to_resume(tmp_path):
    from lowmem_r1.training.run import Start, prepare_run_dir

    with pytest.raises(UserError, match="no run to resume"):
        prepare_run_dir(recipe_from_dict(tiny(tmp_path / "none")), Start("resume", tmp_path / "none"))


def test_failing_user_reward_stops_cleanly(tmp_path, base_model_dir):
    """The error names the reward, shows the completion and the user's traceback; a checkpoint is left."""
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def explode(prompts, completions, **kwargs):\n    return [1 / 0 for _ in completions]\n")
    run = tmp_path / "run"
    cfg = tiny(run, max_steps=1)
    cfg["rewards"].append({"name": f"{bad}:explode"})
    recipe_file = tmp_path / "r.toml"
    from lowmem_r1.config.recipe import recipe_to_toml

    recipe_file.write_text(recipe_to_toml(recipe_from_dict(cfg)))
    out = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(recipe_file)],
                         text=True, capture_output=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "reward 'explode' raised ZeroDivisionError" in out.stderr
    assert "completion:" in out.stderr and "bad_reward.py" in out.stderr
    assert "--resume" in out.stderr
    assert RunDir(run).info()["status"] == "failed"
    assert RunDir(run).checkpoint_dirs(), "a checkpoint is left to resume from"

    # with on_error = "skip" the same reward is counted, not fatal
    cfg["rewards"][-1]["on_error"] = "skip"
    recipe_file.write_text(recipe_to_toml(recipe_from_dict(cfg)))
    out = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(recipe_file), "--force"],
                         text=True, capture_output=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[-1]["reward_errors/explode"] == 1.0
    comp = read_jsonl(run / "completions.jsonl")
    assert all(r["rewards"]["explode"] is None for r in comp)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_out_of_memory_advice_names_the_settings_to_lower():
    import torch

    from lowmem_r1.training.run import _is_out_of_memory, out_of_memory_advice, resume_command

    assert _is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not _is_out_of_memory(ValueError("x"))
    recipe = recipe_from_dict(tiny(Path("runs/x")))
    text = out_of_memory_advice(recipe, 4, None, RunDir(Path("runs/x")), resume_command("r.toml", RunDir(Path("runs/x"))))
    for key in ("training.num_generations = 2", "generation.max_completion_length = 8",
                "gpu_memory_utilization", "--resume runs/x"):
        assert key in text, key


def test_a_start_that_failed_before_training_does_not_block_the_next(tmp_path):
    from lowmem_r1.training.run import Start, prepare_run_dir

    recipe = recipe_from_dict(tiny(tmp_path / "r"))
    prepare_run_dir(recipe, Start.new(recipe))  # e.g. then the data path turned out wrong
    prepare_run_dir(recipe, Start.new(recipe))  # the retry is not asked for --force
    (tmp_path / "r" / "run.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(recipe, Start.new(recipe))
