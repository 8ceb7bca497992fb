"""The GRPO trainer's one home (training/grpo/trainer.py): every private TRL method its extensions replace is
listed with the release it was read against, and their settings come from LowmemGRPOConfig."""

import dataclasses
import importlib
import pickle
from types import SimpleNamespace

import transformers
import trl

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.runs.rundir import RunDir
from lowmem_r1.training.grpo import stage, trainer
from lowmem_r1.training.grpo.settings import GRPOExtensions


def overridden(cls: type) -> set[str]:
    """The methods `cls` defines that a TRL / transformers trainer also has."""
    return {name for name, value in vars(cls).items()
            if callable(value) and hasattr(trl.GRPOTrainer, name) and not name.startswith("__")}


def test_the_checked_releases_are_the_installed_ones():
    assert trl.__version__ == trainer.TRL_CHECKED, "read OVERRIDES' methods in this TRL, then set TRL_CHECKED"
    assert transformers.__version__ == trainer.TRANSFORMERS_CHECKED, "read OVERRIDES, then TRANSFORMERS_CHECKED"


def test_every_override_is_listed_and_exists_upstream():
    cls = trainer.trainer_class()
    owners = {}
    for klass in cls.__mro__:
        if klass.__module__.startswith("lowmem_r1."):
            for name in overridden(klass):
                owners.setdefault(name, []).append(klass.__name__)
    listed = {name: tuple(("Staged" if n.startswith("Lowmem") else n) for n in who) for name, who in owners.items()}
    assert listed == trainer.OVERRIDES
    for name in trainer.OVERRIDES:  # still a method of TRL's trainer (a rename upstream fails here)
        assert callable(getattr(trl.GRPOTrainer, name)), name
    for dotted in trainer.PATCHED:
        module, attr = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), attr), dotted


def test_the_trainer_is_trls_under_the_mixins():
    cls = trainer.trainer_class()
    assert issubclass(cls, trl.GRPOTrainer) and all(issubclass(cls, m) for m in trainer.MIXINS)


def test_settings_come_from_the_config_class(tmp_path):
    r = recipe_from_dict({
        "rewards": [{"name": "answer_match"}, {"name": "brevity"}],
        "training": {"dynamic_sampling": "refill", "max_refill_draws": 3, "dynamic_sampling_reward": "brevity"},
    })
    for backend, shared in (("hf", True), ("unsloth", False)):
        fake = SimpleNamespace(name=backend, grpo_overrides=lambda _: {"use_cpu": True})
        config = stage.grpo_config(r, RunDir(tmp_path), [1.0, 0.5], fake)
        assert isinstance(config, trl.GRPOConfig) and isinstance(config, GRPOExtensions)
        assert (config.dynamic_sampling, config.max_refill_draws, config.signal_reward) == ("refill", 3, 1)
        assert config.share_prompts is shared and config.reward_weights == [1.0, 0.5]


def test_the_config_pickles_as_the_trainer_saves_it(tmp_path):
    config = trainer.config_class()(output_dir=str(tmp_path), use_cpu=True, dynamic_sampling="skip")
    back = pickle.loads(pickle.dumps(config))
    assert type(back) is trainer.LowmemGRPOConfig and back.dynamic_sampling == "skip"


def test_the_base_configs_own_init_still_runs(tmp_path):
    """Unsloth's GRPOConfig has a hand-written __init__ that adjusts settings: the toolkit's config class must
    not replace it with a generated one."""

    @dataclasses.dataclass
    class Patched(trl.GRPOConfig):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.epsilon_high = 0.28

    config = trainer._config_class(Patched)(output_dir=str(tmp_path), use_cpu=True, max_refill_draws=2)
    assert config.epsilon_high == 0.28 and config.max_refill_draws == 2 and config.dynamic_sampling == "off"
    assert {"dynamic_sampling", "signal_reward"} <= set(config.to_dict())
