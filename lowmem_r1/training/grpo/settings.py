"""The toolkit's GRPO settings beyond TRL's, as a dataclass TRL's config class can inherit from.

`LowmemGRPOConfig` (trainer.py) is TRL's GRPOConfig plus these fields, so the trainer's extensions read their
settings from `self.args` like TRL's own code does. Kept apart from trainer.py and free of heavy imports so
that the extensions can import it and still run under a trainer given a plain GRPOConfig (defaults apply).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GRPOExtensions:
    dynamic_sampling: str = field(default="off", metadata={"help": "off | skip | refill: groups whose rewards "
                                                                   "all agree teach nothing (DAPO)."})
    max_refill_draws: int = field(default=4, metadata={"help": "refill: extra generation rounds per step, at most."})
    signal_reward: int | None = field(default=None, metadata={
        "help": "Index of the reward whose spread decides which groups have signal; None: the advantages."})
    share_prompts: bool = field(default=False, metadata={
        "help": "Run each group's prompt through the model once, in generation and in the loss forward."})


DEFAULTS = GRPOExtensions()


def extensions(args) -> GRPOExtensions:
    """The extension settings of a trainer's args: its own when it is a LowmemGRPOConfig, else the defaults."""
    return args if isinstance(args, GRPOExtensions) else DEFAULTS
