"""Training that survives: Ctrl-C, kill -9 at exact moments (mid-generation, mid-optimizer-step,
mid-checkpoint-save), then --resume. Faults are injected with LOWMEM_R1_FAULT (lowmem_r1/core/faults.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict, recipe_to_toml
from lowmem_r1.runs.rundir import RunDir, read_jsonl

STEPS = 4


def write_recipe(tmp_path: Path, run: Path) -> Path:
    cfg = {
        "name": "resume",
        "model": {"name": "builtin:smollm2-135m-instruct", "backend": "hf"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "builtin:arithmetic", "task": "arithmetic", "generator": {"n": 64, "seed": 0}},
        "rewards": [{"name": "answer_match", "extract": "last_number"}, {"name": "brevity", "max_chars": 40}],
        "training": {"max_steps": STEPS, "per_device_train_batch_size": 4, "num_generations": 2,
                     "learning_rate": 1e-3, "save_steps": 1, "save_total_limit": 2, "seed": 7},
        "generation": {"max_completion_length": 6},
        "output": {"dir": str(run)},
    }
    path = tmp_path / f"{run.name}.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(cfg)))
    return path


def train(recipe: Path, *args, fault: str | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LOWMEM_R1_FAULT", None)
    if fault:
        env["LOWMEM_R1_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(recipe), *args],
                          capture_output=True, text=True, env=env, cwd=recipe.parent, timeout=900)


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def check_finished(run: RunDir) -> None:
    info = run.info()
    assert info["status"] == "completed" and info["global_step"] == STEPS
    steps = [r["step"] for r in read_jsonl(run.metrics)]
    assert steps == list(range(1, STEPS + 1)), steps
    comp_steps = sorted({r["step"] for r in read_jsonl(run.completions)})
    assert comp_steps == list(range(1, STEPS + 1))
    counts = [sum(1 for r in read_jsonl(run.completions) if r["step"] == s) for s in comp_steps]
    assert set(counts) == {4}, counts  # each step's completions exactly once
    check_checkpoints_load(run)


def check_checkpoints_load(run: RunDir) -> None:
    import torch

    for ckpt in run.checkpoint_dirs():
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == int(ckpt.name.split("-")[1])
        adapter_tensors(ckpt)
        torch.load(ckpt / "optimizer.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_model_dir):
    tmp = tmp_path_factory.mktemp("ref")
    run = tmp / "ref"
    out = train(write_recipe(tmp, run))
    assert out.returncode == 0, out.stderr[-3000:]
    check_finished(RunDir(run))
    return adapter_tensors(run / "adapter")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ctrl_c_checkpoints_then_resume_matches_uninterrupted(tmp_path, reference):
    run = tmp_path / "int"
    recipe = write_recipe(tmp_path, run)
    out = train(recipe, fault="step_end:2:SIGINT")
    assert out.returncode == 130, out.stderr[-3000:]
    assert "--resume" in out.stdout + out.stderr
    r = RunDir(run)
    assert r.info()["status"] == "interrupted" and r.info()["global_step"] == 2
    assert [p.name for p in r.checkpoint_dirs()][-1] == "checkpoint-2"
    assert (r.adapter / "adapter_model.safetensors").is_file()
    out = train(recipe, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    check_finished(r)
    # CPU training with fixed seeds and restored RNG state is deterministic
    assert max_diff(adapter_tensors(run / "adapter"), reference) < 1e-6


def tear_last_lines(run: RunDir) -> None:
    """What a kill mid-write leaves: a last line cut inside a UTF-8 character."""
    for path in (run.metrics, run.completions):
        with open(path, "ab") as f:
            f.write('{"step": 99, "completion": "caf\u00e9 \u8ba1'.encode()[:-1])


def test_sigterm_marks_failed_then_resume_past_a_torn_line(tmp_path, reference):
    run = tmp_path / "term"
    recipe = write_recipe(tmp_path, run)
    out = train(recipe, fault="generation:2:SIGTERM")
    assert out.returncode == 143, out.stderr[-3000:]
    assert "SIGTERM" in out.stderr and f"--resume {run}" in out.stderr and "Traceback" not in out.stderr
    r = RunDir(run)
    assert r.info()["status"] == "failed" and "--resume" in r.info()["resume"]
    tear_last_lines(r)
    report = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "report", str(run), "--samples", "0"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    out = train(recipe, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    check_finished(r)
    assert max_diff(adapter_tensors(run / "adapter"), reference) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["generation:2:SIGKILL", "optimizer:3:SIGKILL", "save:2:SIGKILL",
                                   "generation:3:SIGINT,generation:3:SIGINT", "optimizer:3:SIGTERM",
                                   "save:2:SIGTERM"])
def test_kill_anywhere_then_resume(tmp_path, reference, fault):
    run = tmp_path / "kill"
    recipe = write_recipe(tmp_path, run)
    out = train(recipe, fault=fault)
    assert out.returncode in (-9, 130, 143), (out.returncode, out.stderr[-3000:])
    assert RunDir(run).info()["status"] != "running" or out.returncode == -9
    tear_last_lines(RunDir(run))
    r = RunDir(run)
    check_checkpoints_load(r)  # whatever is left behind loads
    out = train(recipe, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    check_finished(r)
    assert max_diff(adapter_tensors(run / "adapter"), reference) < 1e-6


def test_refuses_existing_run_and_changed_recipe(tmp_path, reference):
    run = tmp_path / "exists"
    recipe = write_recipe(tmp_path, run)
    run.mkdir()
    (run / "run.json").write_text("{}")
    out = train(recipe)
    assert out.returncode == 2 and "--resume" in out.stderr and "--force" in out.stderr
    (run / "recipe.toml").write_text(recipe.read_text().replace("learning_rate = 0.001", "learning_rate = 0.01"))
    out = train(recipe, "--resume")
    assert out.returncode == 2 and "training.learning_rate" in out.stderr
