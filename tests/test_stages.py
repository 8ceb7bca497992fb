"""Stages as a registry: every kind config/stages.py names has a trainer in training/stages.py, an unknown kind
is refused by --dry-run in one line before anything exists, and each kind's own checks and numbers apply."""

import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.config.stages import STAGES
from lowmem_r1.core.errors import UserError
from lowmem_r1.pipeline.multistage import KINDS, load_pipeline
from lowmem_r1.training.stages import TRAINERS

REPO = Path(__file__).resolve().parent.parent


def test_every_stage_kind_has_a_trainer_and_a_headline():
    assert set(TRAINERS) == set(STAGES) == {"grpo", "sft"}
    assert {k.headline for k in STAGES.values()} == {"reward", "loss"}
    assert set(KINDS) == {*STAGES, "sample"}  # a pipeline takes every training kind, plus its sample step


def test_unknown_stage_is_refused_at_dry_run_in_one_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'stage = "ppo"\n[output]\ndir = "{tmp_path / "run"}"\n[[rewards]]\nname = "answer_match"\n')
    out = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(recipe), "--dry-run"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert f"{recipe}: stage: stage = 'ppo' is not a kind of stage; use one of: grpo, sft" in line
    assert not (tmp_path / "run").exists()


def test_unknown_stage_in_a_pipeline_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[rewards]]\nname = "answer_match"\n[[stages]]\nname = "one"\nstage = "ppo"\n')
    with pytest.raises(UserError, match=r"stages\[0\] \(one\): stage = 'ppo'; use one of grpo, sft, sample"):
        load_pipeline(path)


def test_each_kind_checks_what_it_needs():
    with pytest.raises(UserError, match="no \\[\\[rewards\\]\\]"):
        recipe_from_dict({"stage": "grpo"})
    assert recipe_from_dict({"stage": "sft"}).stage == "sft"  # SFT trains on data, not rewards
    uneven = {"training": {"per_device_train_batch_size": 6, "num_generations": 4}}
    with pytest.raises(UserError, match="num_generations"):
        recipe_from_dict({**uneven, "rewards": [{"name": "answer_match"}]})
    assert recipe_from_dict({**uneven, "stage": "sft"}).training.num_generations == 4  # no groups in SFT


def test_each_kind_shows_its_own_numbers():
    grpo = dict(TRAINERS["grpo"].plan_rows(recipe_from_dict({"rewards": [{"name": "answer_match"}]})))
    sft = dict(TRAINERS["sft"].plan_rows(recipe_from_dict({"stage": "sft"})))
    assert grpo["generations per prompt"] == "8" and "generations per prompt" not in sft
    assert sft["examples per optimizer step"] == "8" and "examples per optimizer step" not in grpo
