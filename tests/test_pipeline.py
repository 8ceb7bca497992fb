"""Multi-stage recipes: every stage resolved at --dry-run, one-line errors, and a two-stage pipeline killed
in stage 2 that resumes there (stage 1 skipped)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.core.errors import UserError
from lowmem_r1.pipeline.multistage import load_pipeline
from lowmem_r1.runs.rundir import RunDir, read_jsonl

BASE = """
name = "two"
[model]
name = "builtin:smollm2-135m-instruct"
backend = "hf"
max_seq_length = 128
[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]
[data]
source = "builtin:arithmetic"
task = "arithmetic"
eval_size = 4
generator = { n = 48, seed = 0 }
[[rewards]]
name = "answer_match"
extract = "last_number"
[training]
per_device_train_batch_size = 4
num_generations = 2
learning_rate = 1e-3
save_steps = 1
save_total_limit = 3
[generation]
max_completion_length = 8
[eval]
size = 4
max_new_tokens = 8
[pipeline]
eval = false
"""

STAGES = """
[[stages]]
name = "cold"
stage = "sft"
training = { max_steps = 1 }

[[stages]]
name = "rl"
training = { max_steps = 3 }
"""


def write(tmp_path: Path, stages: str = STAGES, extra: str = "") -> Path:
    path = tmp_path / "two.toml"
    path.write_text(BASE.replace('name = "two"', f'name = "two"\n{extra}\n[output]\ndir = "{tmp_path / "p"}"', 1)
                    + stages)
    return path


def cli(path: Path, *args, fault: str | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("LOWMEM_R1_FAULT", None)
    if fault:
        env["LOWMEM_R1_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(path), *args], capture_output=True,
                          text=True, env=env, cwd=path.parent, timeout=1200)


def test_stages_resolve_over_the_shared_base(tmp_path):
    p = load_pipeline(write(tmp_path))
    cold, rl = p.stages
    assert (cold.kind, cold.start, cold.recipe.stage) == ("sft", "base", "sft")
    assert (rl.kind, rl.start, rl.recipe.stage) == ("grpo", "cold", "grpo")
    assert rl.recipe.model.adapter == str(tmp_path / "p" / "cold")  # the adapter is continued
    assert cold.recipe.model.adapter is None
    assert (cold.recipe.training.max_steps, rl.recipe.training.max_steps) == (1, 3)
    assert rl.recipe.training.learning_rate == 1e-3  # untouched keys come from the base
    assert rl.dir == tmp_path / "p" / "rl" and Path(rl.recipe.output.dir) == rl.dir


def test_dry_run_shows_every_stage(tmp_path):
    done = cli(write(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "cold" in done.stdout and "rl" in done.stdout and "adapter continued" in done.stdout
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("stages, message", [
    ('[[stages]]\nname = "a"\nstage = "sft"\n[[stages]]\nname = "b"\nfrom = "nope"\n',
     "from = 'nope' is not an earlier stage"),
    ('[[stages]]\nname = "a"\nstage = "sft"\ndata = { source = "stage:missing" }\n',
     "no earlier sample stage 'missing'"),
    ('[[stages]]\nname = "a"\nstage = "sft"\n[[stages]]\nname = "b"\nlora = { r = 8 }\n',
     "[lora] or model.name differs from stage 'a'"),
    ('[[stages]]\nname = "a"\nstage = "dpo"\n', "stage = 'dpo'"),
])
def test_bad_stage_references_fail_in_one_line(tmp_path, stages, message):
    done = cli(write(tmp_path, stages), "--dry-run")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="stages"):
        load_pipeline(write(tmp_path, stages))


@pytest.mark.parametrize("kind, rows, message", [
    ("grpo", [{"text": "hi"}], "no row that task 'arithmetic' (it reads ['question', 'answer']) can use"),
    ("sft", [{"text": "hi"}], "an SFT stage needs a `messages` column"),
    ("sft", [{"messages": [{"role": "user", "content": "hi"}]}], "a conversation with no assistant turn"),
])
def test_stage_data_its_trainer_cannot_use_fails_at_dry_run(tmp_path, kind, rows, message):
    """A stage's own data.source (the base's generator parameters do not follow it) is checked like a recipe's."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = STAGES + f'[[stages]]\nname = "c"\nstage = "{kind}"\ndata = {{ source = {json.dumps(str(data))} }}\n'
    done = cli(write(tmp_path, stages), "--dry-run")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "stages[2] (c)" in done.stderr and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_a_stage_on_its_own_file_drops_the_base_generator(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 2?", "answer": "3"}) + "\n")
    p = load_pipeline(write(tmp_path, STAGES + f'[[stages]]\nname = "c"\ndata = {{ source = {json.dumps(str(data))} }}\n'))
    assert p.stages[0].recipe.data.generator and not p.stages[2].recipe.data.generator


def test_a_sample_stage_that_keeps_nothing_says_so_and_writes_nothing(tmp_path, base_model_dir):
    stages = '[[stages]]\nname = "s"\nstage = "sample"\nsample = { k = 1, limit = 2, min_reward = 99, max_new_tokens = 4 }\n'
    done = cli(write(tmp_path, stages))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "stage s:" in done.stderr and "kept nothing" in done.stderr and "sample.min_reward" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    out = tmp_path / "p" / "s"
    assert not (out / "samples.jsonl").exists() and not (out / "sample.json").exists()


@pytest.mark.slow
def test_two_stage_pipeline_killed_in_stage_two_resumes_there(tmp_path, base_model_dir):
    path = write(tmp_path)
    root = tmp_path / "p"
    # Stage 1 has one step, so only stage 2 reaches the end of step 2: killed there, after its checkpoint.
    killed = cli(path, fault="step_end:2:SIGKILL")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert RunDir(root / "cold").info()["status"] == "completed"
    assert RunDir(root / "rl").info()["status"] == "running"

    refused = cli(path)  # an interrupted stage is continued only when asked
    assert refused.returncode == 2 and "--resume" in refused.stderr

    cold_adapter = (root / "cold" / "adapter" / "adapter_model.safetensors").read_bytes()
    done = cli(path, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cold (sft): done, skipped" in done.stdout
    assert (root / "cold" / "adapter" / "adapter_model.safetensors").read_bytes() == cold_adapter
    info = RunDir(root / "rl").info()
    assert info["status"] == "completed" and info["global_step"] == 3
    assert [r["step"] for r in read_jsonl(root / "rl" / "metrics.jsonl")] == [1, 2, 3]
    state = json.loads((root / "pipeline.json").read_text())
    assert state["order"] == ["cold", "rl"] and set(state["stages"]) == {"cold", "rl"}

    again = cli(path)  # everything done: both skipped, nothing trained
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2

    # the stage continued the cold-start adapter: its first GRPO checkpoint is not a fresh LoRA
    from safetensors.torch import load_file

    rl = load_file(str(root / "rl" / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in rl.items() if "lora_B" in k)

    report = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "report", str(root)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert report.returncode == 0, report.stderr
    assert "stage cold" in report.stdout and "stage rl" in report.stdout


@pytest.mark.parametrize("name", ["pipeline-demo", "r1-pipeline", "distill"])
def test_bundled_pipelines_dry_run(name):
    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.toml"
    p = load_pipeline(path)
    assert p.name == name and len(p.stages) >= 2
    kinds = [s.kind for s in p.stages]
    assert "sample" in kinds and "sft" in kinds
    for s in p.stages:
        if s.recipe.data.source.endswith("samples.jsonl"):  # stage:<name> became that stage's output file
            assert Path(s.recipe.data.source).parent.name in [x.name for x in p.stages if x.kind == "sample"]
    with pytest.raises(UserError, match="multi-stage recipe"):  # single-stage commands say what to do
        from lowmem_r1.config.recipe import load_recipe

        load_recipe(path)
