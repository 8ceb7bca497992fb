"""Recipe keys reach TRL's config without a hand-written line: every key is a field of the stage's config
class (and arrives with the recipe's value), or is spelled out, or belongs to a toolkit-only section."""

import dataclasses

from pydantic import BaseModel
from transformers import TrainingArguments

from lowmem_r1.config.recipe import Recipe, recipe_from_dict
from lowmem_r1.runs.rundir import RunDir
from lowmem_r1.training.grpo.stage import grpo_kwargs
from lowmem_r1.training.grpo.trainer import config_class
from lowmem_r1.training.sft import sft_kwargs
from lowmem_r1.training.trainer_args import (
    SECTIONS,
    SPELLED_OUT,
    TOOLKIT_SECTIONS,
    field_names,
    trainer_kwargs,
)

GRPO_FIELDS = field_names(config_class())
COMMON = field_names(TrainingArguments)


def section_keys() -> dict[str, object]:
    r = recipe_from_dict({"rewards": [{"name": "answer_match"}]})
    return {f"{s}.{k}": v for s in SECTIONS for k, v in getattr(r, s)}


def test_every_recipe_key_is_accounted_for():
    assert set(Recipe.model_fields) == set(SECTIONS) | set(TOOLKIT_SECTIONS)
    unplaced = [k for k in section_keys() if k not in SPELLED_OUT and k.split(".")[1] not in GRPO_FIELDS]
    assert unplaced == [], "a recipe key no config reads: name it after a TRL field, or add it to SPELLED_OUT"
    assert set(SPELLED_OUT) <= set(section_keys()), "SPELLED_OUT names a key the schema no longer has"


def test_grpo_gets_every_field_named_key_with_the_recipes_value(tmp_path):
    r = recipe_from_dict({"rewards": [{"name": "answer_match"}],
                          "training": {"beta": 0.04, "top_entropy_quantile": 0.2, "dynamic_sampling": "skip"},
                          "generation": {"top_k": 7, "repetition_penalty": 1.1}, "logging": {"logging_steps": 3}})
    kwargs = grpo_kwargs(r, RunDir(tmp_path), [1.0])
    for key, value in section_keys().items():
        section, name = key.split(".")
        if key not in SPELLED_OUT:
            assert kwargs[name] == getattr(getattr(r, section), name), key
    assert (kwargs["beta"], kwargs["top_k"], kwargs["logging_steps"], kwargs["dynamic_sampling"]) == (0.04, 7, 3, "skip")
    assert config_class()(**kwargs, use_cpu=True).top_entropy_quantile == 0.2  # and TRL takes them all


def test_sft_gets_only_the_keys_every_trainer_has(tmp_path):
    r = recipe_from_dict({"stage": "sft", "training": {"learning_rate": 3e-5}})
    kwargs = sft_kwargs(r, RunDir(tmp_path))
    assert kwargs["learning_rate"] == 3e-5 and kwargs["completion_only_loss"] is True
    assert "loss_type" not in kwargs and "num_generations" not in kwargs  # GRPO's, meaningless to SFT


def test_a_new_key_named_like_a_field_needs_no_line_of_code(tmp_path):
    """The mechanism, on a section with a key the schema does not have yet (adam_beta2)."""

    class Training(BaseModel):
        max_steps: int = 5
        adam_beta2: float = 0.95
        warmup_ratio: float = 0.1

    class Generation(BaseModel):
        pass

    class Logging(BaseModel):
        report_to: list = []

    fake = type("R", (), {"training": Training(), "generation": Generation(), "logging": Logging()})()
    out = trainer_kwargs(fake, COMMON, tmp_path)
    assert out["adam_beta2"] == 0.95 and out["max_steps"] == 5 and out["warmup_steps"] == 0.1
    assert "warmup_ratio" not in out and out["report_to"] == "none"
    assert {f.name for f in dataclasses.fields(TrainingArguments)} >= set(out)
