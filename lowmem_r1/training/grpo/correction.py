"""vLLM's importance-sampling correction without TRL's extra forward pass.

vLLM samples with slightly different probabilities than the trainer computes, so TRL weighs each token's
loss by exp(trainer logp - vLLM logp) (`vllm_importance_sampling_correction`). To get the trainer's log
probs it runs a no-grad forward over the whole generation batch right after generating - a third of a
step's training half on a CPU (scripts/bench_vllm_cpu.py). When the step is on-policy (one iteration per
generation, and generation aligned with the optimizer step: TRL's own test for skipping that forward
without vLLM) the weights have not moved between that forward and the loss's forward, which computes the
same log probs with grad. This mixin takes them from there, detached: the same ratio, truncation or mask,
and metrics, one forward fewer. Off-policy settings, the `vespo` loss (which folds the ratio in its own
way) and trainers whose loss TRL did not write (Unsloth's patched one) keep TRL's path unchanged.
"""

from __future__ import annotations

import math


def importance_ratio(trainer_logps, sampling_logps, mask, mode: str, clip_min, clip_max):
    """exp(trainer - sampler) log probs per token (`token_*` modes) or per sequence (`sequence_*`), then
    clamped (`*_truncate`) or zeroed outside [clip_min, clip_max] (`*_mask`). Tokens vLLM could not score
    (NaN) count as agreeing: ratio 1."""
    import torch

    diff = torch.nan_to_num((trainer_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def owner_below(trainer, mixin: type, name: str) -> type:
    """The class that implements `name` for `mixin`'s super() in the trainer's MRO: TRL's own, this toolkit's
    next mixin, or a patched trainer's (Unsloth's), which the mixins leave alone."""
    mro = type(trainer).__mro__
    return next(c for c in mro[mro.index(mixin) + 1:] if name in vars(c))


# What this mixin relies on TRL's own code for (or this toolkit's mixins, which keep its contract: shared
# prompts); a patched trainer (Unsloth's) that replaces any of them keeps TRL's extra forward.
_TRL_METHODS = ("compute_loss", "_compute_loss", "_get_per_token_logps_and_entropies",
                "_generate_and_score_completions")


class OnPolicyCorrection:
    """GRPOTrainer mixin (trainer.py): see the module docstring."""

    def _correction_from_loss_forward(self) -> bool:
        if not (self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo"):
            return False
        if self.num_iterations != 1 or self.args.gradient_accumulation_steps % self.args.steps_per_generation:
            return False
        owners = [owner_below(self, OnPolicyCorrection, name) for name in _TRL_METHODS]
        return all(c.__module__.startswith(("trl.", "lowmem_r1.")) for c in owners)  # ours keep TRL's contract

    def _generate_and_score_completions(self, inputs):
        if not (self.model.training and self._correction_from_loss_forward()):
            return super()._generate_and_score_completions(inputs)
        # TRL skips its no-grad forward (and the ratio) when the correction is off; vLLM's log probs stay
        # in the batch (`sampling_per_token_logps`) for the loss step below.
        self.vllm_importance_sampling_correction = False
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self.vllm_importance_sampling_correction = True

    def _compute_loss(self, model, inputs):
        if ("importance_sampling_ratio" in inputs or inputs.get("sampling_per_token_logps") is None
                or not self._correction_from_loss_forward()):
            return super()._compute_loss(model, inputs)
        self._ratio_for = inputs  # filled in by the loss's own forward, before TRL reads it
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._ratio_for = None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs = getattr(self, "_ratio_for", None)
        if inputs is not None:
            self._ratio_for = None
            inputs["importance_sampling_ratio"] = self._ratio_and_metrics(result[0].detach(), inputs)
        return result

    def _ratio_and_metrics(self, trainer_logps, inputs):
        """The ratio, and the metrics TRL logs with it (same names: the panel and `report` read them)."""
        import torch

        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        sampling = inputs["sampling_per_token_logps"]
        mode = self.vllm_importance_sampling_mode
        ratio = importance_ratio(trainer_logps, sampling, mask, mode, self.vllm_importance_sampling_clip_min,
                                 self.vllm_importance_sampling_clip_max)
        metrics = self._metrics["train"]
        delta = torch.abs(trainer_logps - sampling)[mask.bool()]
        delta = delta[~torch.isnan(delta)]
        flat = ratio.flatten() if mode.startswith("sequence") else ratio[mask.bool()]
        gather = self.accelerator.gather
        for name, values, reduce in (("sampling/sampling_logp_difference/mean", delta, torch.mean),
                                     ("sampling/sampling_logp_difference/max", delta, torch.max),
                                     ("sampling/importance_sampling_ratio/min", flat, torch.min),
                                     ("sampling/importance_sampling_ratio/mean", flat, torch.mean),
                                     ("sampling/importance_sampling_ratio/max", flat, torch.max)):
            value = reduce(values) if values.numel() else torch.tensor(0.0, device=ratio.device)
            across = gather(value.reshape(1).float())
            combine = {"max": torch.max, "min": torch.min}.get(name.rsplit("/", 1)[1], torch.mean)
            metrics[name].append(combine(across).item())
        return ratio
