"""The GRPO trainer's one home: the class, its config, and every private TRL method it overrides.

The class is TRL's GRPOTrainer (Unsloth's patched one when unsloth was imported first) under the toolkit's
extensions, each a mixin in its own module, with checkpoints staged and renamed into place:

- dynamic_sampling.DynamicSampling: groups whose rewards all agree are left out, or refilled (DAPO);
- correction.OnPolicyCorrection: vLLM's importance-sampling correction from the loss's own forward;
- shared_prompts.SharedPrompts: each group's prompt runs through the model once (generation and loss).

Their settings are fields of LowmemGRPOConfig, TRL's GRPOConfig plus settings.GRPOExtensions, so a run's
whole configuration is one object, saved by the Trainer with the checkpoint like any TrainingArguments.

Upgrading TRL: OVERRIDES lists every TRL/transformers method the class replaces, by name, with the module
that replaces it; each was read against TRL_CHECKED (and transformers TRANSFORMERS_CHECKED). Read those
methods in the new release, then change the two versions: tests/test_grpo_trainer.py fails until then.
"""

from __future__ import annotations

import functools

from lowmem_r1.training.checkpoints import staged_trainer
from lowmem_r1.training.grpo.correction import OnPolicyCorrection
from lowmem_r1.training.grpo.dynamic_sampling import DynamicSampling
from lowmem_r1.training.grpo.settings import GRPOExtensions
from lowmem_r1.training.grpo.shared_prompts import SharedPrompts

TRL_CHECKED = "1.15.0"
TRANSFORMERS_CHECKED = "5.17.0"
MIXINS = (DynamicSampling, OnPolicyCorrection, SharedPrompts)

# private method -> the toolkit's classes that override it, outermost first (the MRO's order)
OVERRIDES: dict[str, tuple[str, ...]] = {
    # trl.GRPOTrainer
    "_generate": ("DynamicSampling",),
    "_calculate_rewards": ("DynamicSampling",),
    "_generate_and_score_completions": ("DynamicSampling", "OnPolicyCorrection"),
    "_compute_loss": ("OnPolicyCorrection",),
    "_get_per_token_logps_and_entropies": ("OnPolicyCorrection", "SharedPrompts"),
    "_generate_single_turn": ("SharedPrompts",),
    # transformers.Trainer (training/checkpoints.py)
    "_save_checkpoint": ("Staged",),
    "_load_optimizer_and_scheduler": ("Staged",),
}
# TRL functions replaced outright on a CPU (compat.py), checked against the same release
PATCHED = {"trl.trainer.utils._ChunkedLogProbFunction": "compat.patch_trl_for_cpu: a torch fallback for the fused "
                                                         "log-prob head"}


def trainer_class():
    """TRL's GRPOTrainer as imported now (Unsloth's when unsloth patched trl first) under the extensions."""
    from trl import GRPOTrainer

    return staged_trainer(type("GRPOTrainer", (*MIXINS, GRPOTrainer), {}))


def config_class():
    """LowmemGRPOConfig for the GRPOConfig trl exports now (Unsloth's patched one after `import unsloth`)."""
    from trl import GRPOConfig

    return _config_class(GRPOConfig)


@functools.cache
def _config_class(base):
    from dataclasses import dataclass, fields

    own = [(f.name, f.default) for f in fields(GRPOExtensions)]

    @dataclass(init=False)  # the fields of both, for to_dict() and the saved args; the base's own __init__
    class LowmemGRPOConfig(base, GRPOExtensions):
        """TRL's GRPOConfig and the toolkit's GRPO settings (settings.py), read by the extensions."""

        def __init__(self, *args, **kwargs):
            # The base's __init__ runs as it is: Unsloth's GRPOConfig has one of its own, which adjusts
            # settings (a generated dataclass __init__ would skip it) and drops keys it does not know.
            for name, default in own:
                setattr(self, name, kwargs.pop(name, default))
            super().__init__(*args, **kwargs)

    LowmemGRPOConfig.__module__, LowmemGRPOConfig.__qualname__ = __name__, "LowmemGRPOConfig"
    return LowmemGRPOConfig


def __getattr__(name: str):
    """`trainer.LowmemGRPOConfig`: built on first use (trl is heavy), found here by pickle when the Trainer
    saves or loads its training arguments."""
    if name == "LowmemGRPOConfig":
        return config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
