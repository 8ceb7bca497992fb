"""Recipe validation: every error is one line naming the file, the key and the fix; overrides work."""

import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import apply_override, load_recipe, recipe_from_dict, recipe_to_toml
from lowmem_r1.core.errors import UserError
from lowmem_r1.pipeline.multistage import is_pipeline_file

REPO = Path(__file__).resolve().parent.parent
MIN = {"rewards": [{"name": "answer_match"}]}


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def err(tmp_path, text: str, overrides=None) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, text), overrides or [])
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(tmp_path / "r.toml") in msg or "--set" in msg, msg
    return msg


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(write(tmp_path, '[[rewards]]\nname = "answer_match"\n'))
    assert r.name == "r"
    assert r.model.name == "builtin:smollm2-135m-instruct"
    assert r.run_dir() == Path("runs/r")
    assert r.prompts_per_step() == 1  # 8 completions / 8 generations


def test_unknown_key_suggests_the_right_one(tmp_path):
    msg = err(tmp_path, '[training]\nlearning_rat = 1e-5\n[[rewards]]\nname = "answer_match"\n')
    assert "training.learning_rat" in msg and "learning_rate" in msg


def test_unknown_section(tmp_path):
    msg = err(tmp_path, '[trainig]\nmax_steps = 1\n[[rewards]]\nname = "answer_match"\n')
    assert "trainig" in msg and "training" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = err(tmp_path, '[training]\nmax_steps = "many"\n[[rewards]]\nname = "answer_match"\n')
    assert "training.max_steps" in msg and "'many'" in msg


def test_out_of_range(tmp_path):
    msg = err(tmp_path, '[training]\nnum_generations = 1\n[[rewards]]\nname = "answer_match"\n')
    assert "training.num_generations" in msg


def test_batch_not_divisible_by_generations(tmp_path):
    msg = err(tmp_path, '[training]\nper_device_train_batch_size = 6\nnum_generations = 4\n'
                        '[[rewards]]\nname = "answer_match"\n')
    assert "num_generations" in msg and "multiple of 4" in msg


def test_lora_rank_above_vllm_max(tmp_path):
    msg = err(tmp_path, '[model]\nfast_inference = true\nmax_lora_rank = 16\n[lora]\nr = 32\n'
                        '[[rewards]]\nname = "answer_match"\n')
    assert "lora.r" in msg and "max_lora_rank" in msg


def test_no_rewards(tmp_path):
    assert "[[rewards]]" in err(tmp_path, "[training]\nmax_steps = 1\n")


def test_unknown_reward_and_bad_param(tmp_path):
    assert "rewards[0]" in err(tmp_path, '[[rewards]]\nname = "answer_mach"\n')
    assert "no parameter" in err(tmp_path, '[[rewards]]\nname = "answer_match"\nbogus = 1\n')


def test_reward_needs_missing_column(tmp_path):
    msg = err(tmp_path, '[data]\ntask = "arithmetic"\n[[rewards]]\nname = "countdown_equation"\n')
    assert "nums" in msg or "target" in msg


def test_bad_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in err(tmp_path, "[training\n")
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_types_and_lists():
    raw = {"rewards": [{"name": "answer_match"}, {"name": "brevity"}]}
    apply_override(raw, "training.learning_rate=1e-5")
    apply_override(raw, "model.load_in_4bit=true")
    apply_override(raw, "model.name=Qwen/Qwen2.5-0.5B-Instruct")
    apply_override(raw, "rewards.1.weight=0.25")
    apply_override(raw, "lora.target_modules=['q_proj', 'v_proj']")
    r = recipe_from_dict(raw)
    assert r.training.learning_rate == 1e-5
    assert r.model.load_in_4bit is True
    assert r.model.name == "Qwen/Qwen2.5-0.5B-Instruct"
    assert r.rewards[1].weight == 0.25
    assert r.lora.target_modules == ["q_proj", "v_proj"]


def test_override_errors():
    with pytest.raises(UserError, match="section.key=value"):
        apply_override({}, "training.max_steps")
    with pytest.raises(UserError, match="not an index"):
        apply_override({"rewards": [{}]}, "rewards.3.weight=1")
    with pytest.raises(UserError, match="training.max_steps"):
        recipe_from_dict(MIN, overrides=["training.max_steps=-1"])


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe_from_dict({**MIN, "name": "x", "rewards": [{"name": "answer_match", "extract": "last_number"}]})
    p = tmp_path / "x.toml"
    p.write_text(recipe_to_toml(r))
    again = load_recipe(p)
    assert again.model_dump() == r.model_dump()
    assert again.rewards[0].params == {"extract": "last_number"}


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "lowmem_r1.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path):
    p = write(tmp_path, '[training]\nlearning_rat = 1\n[[rewards]]\nname = "answer_match"\n')
    out = cli("train", str(p), "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "learning_rate" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_dry_run_prints_numbers_fast(tmp_path):
    out = cli("train", "recipes/demo.toml", "--dry-run", "--set", "training.max_steps=7")
    assert out.returncode == 0, out.stderr
    assert "prompts per optimizer step" in out.stdout and "7" in out.stdout
    # nothing heavy imported for a dry run
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from lowmem_r1.cli import app; from lowmem_r1.config.recipe import load_recipe;"
         "load_recipe('recipes/demo.toml'); print(sorted(m for m in ('torch','trl','transformers','datasets','peft')"
         " if m in sys.modules))"], capture_output=True, text=True, cwd=REPO)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


@pytest.mark.parametrize("recipe", sorted(p for p in (REPO / "recipes").glob("*.toml") if not is_pipeline_file(p)),
                         ids=lambda p: p.name)
def test_bundled_recipes_validate(recipe):
    assert load_recipe(recipe).rewards


def test_generator_parameters_need_a_builtin_source(tmp_path):
    msg = err(tmp_path, '[data]\nsource = "x.jsonl"\ntask = "gsm8k"\ngenerator = { n = 5 }\n'
                        '[[rewards]]\nname = "answer_match"\n')
    assert "data.generator" in msg and "x.jsonl" in msg


def test_model_name_that_cannot_resolve_fails_at_validation(tmp_path):
    """A typo in model.name fails before any run directory is made; hub ids pass (checked at download)."""
    rw = '[[rewards]]\nname = "answer_match"\n'
    assert "model.name" in err(tmp_path, f'[model]\nname = "./no-such-model"\n{rw}')
    assert "unknown builtin alias" in err(tmp_path, f'[model]\nname = "builtin:smollm3"\n{rw}')
    assert "GGUF file not found" in err(tmp_path, f'[model]\nname = "x.gguf"\n{rw}')
    (tmp_path / "folder").mkdir()
    assert "no config.json" in err(tmp_path, f'[model]\nname = "{tmp_path / "folder"}"\n{rw}')
    assert load_recipe(write(tmp_path, f'[model]\nname = "Qwen/Qwen2.5-3B-Instruct"\n{rw}')).model.name


def test_cli_train_with_bad_model_leaves_no_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(REPO / "recipes" / "demo.toml"),
                           "--set", "model.name=./nope", "--set", f"output.dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "model.name" in proc.stderr
    assert not (tmp_path / "runs").exists()
