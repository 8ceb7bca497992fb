"""`stage = "grpo"`: the recipe's prompts, guarded rewards and settings -> the GRPO trainer (trainer.py)."""

from __future__ import annotations

from lowmem_r1.core.errors import UserError
from lowmem_r1.data import load_splits
from lowmem_r1.models import vllm_cpu
from lowmem_r1.rewards.guard import RewardRecorder, guard_rewards
from lowmem_r1.runs.rundir import checkpoint_step
from lowmem_r1.training.grpo.trainer import config_class, trainer_class
from lowmem_r1.training.trainer_args import field_names, trainer_kwargs


def build_trainer(recipe, run, backend, model, tokenizer, callbacks, console, checkpoint, display):
    """GRPOTrainer on the recipe's prompts, with guarded, recorded rewards."""
    splits = load_splits(recipe, tokenizer)
    if splits.dropped:
        console.print(
            f"[yellow]data:[/] dropped {splits.dropped} prompt(s) longer than data.max_prompt_length = "
            f"{recipe.data.max_prompt_length} tokens"
        )
    if len(splits.train) == 0:
        raise UserError("data: no training rows left after filtering; raise data.max_prompt_length or check data.source")
    recorder = RewardRecorder(run.completions, recipe, start_step=checkpoint_step(checkpoint))
    reward_funcs, weights = guard_rewards(recipe, recorder)
    display.recorder = recorder

    config = grpo_config(recipe, run, weights, backend)
    with vllm_cpu.engine_options(config):  # TRL builds its colocated engine here
        trainer = trainer_class()(
            model=model,
            processing_class=tokenizer,
            reward_funcs=reward_funcs,
            args=config,
            train_dataset=splits.train,
            callbacks=callbacks,
        )
    vllm_cpu.attach(trainer)  # vLLM-CPU's layers take a layer-wise weight sync; GPU engines keep TRL's
    return trainer


def grpo_config(recipe, run, reward_weights: list[float], backend):
    """LowmemGRPOConfig: the recipe's settings, then the backend's overrides (a key in both: the backend's)."""
    return config_class()(**{**grpo_kwargs(recipe, run, reward_weights), **backend.grpo_overrides(recipe),
                             "share_prompts": backend.name == "hf"})


def grpo_kwargs(recipe, run, reward_weights: list[float]) -> dict:
    """The recipe as LowmemGRPOConfig keyword arguments: every key named like a config field (trainer_args.py),
    and the few derived here."""
    by = recipe.training.dynamic_sampling_reward
    return dict(
        **trainer_kwargs(recipe, field_names(config_class()), run.checkpoints),
        use_transformers_continuous_batching=continuous_batching(recipe),
        signal_reward=[e.name for e in recipe.rewards].index(by) if by else None,
        reward_weights=reward_weights,
        log_completions=False,
    )


def continuous_batching(recipe) -> bool:
    """Whether generation without vLLM goes through transformers' continuous batching: only when asked
    for ("on"). "auto" stays off everywhere: on an idle 2-core CPU it made 0.47x the tokens/s of the
    padded-batch `generate` (scripts/bench_cb_generation.py, 32 prompts x 48 tokens; the 3x once recorded
    came from a machine at load 26), and it has not been measured on a GPU."""
    g = recipe.generation
    if g.use_vllm or recipe.model.fast_inference:
        return False
    return g.continuous_batching == "on"


def plan_rows(recipe) -> list[tuple[str, str]]:
    """The numbers `train --dry-run` shows for a GRPO stage."""
    t = recipe.training
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    rows = [
        ("prompts per optimizer step", str(recipe.prompts_per_step())),
        ("generations per prompt", str(t.num_generations)),
        ("completions per step", str(per_step * recipe.distributed.nproc)),
        ("steps", str(t.max_steps)),
        ("prompts seen in total", str(recipe.prompts_per_step() * t.max_steps * t.num_iterations)),
        ("max tokens per completion", str(recipe.generation.max_completion_length)),
    ]
    if t.dynamic_sampling != "off":
        rows.append(("groups without reward spread", "left out of the update" + (
            f", refilled from up to {t.max_refill_draws} extra generation rounds per step"
            if t.dynamic_sampling == "refill" else "")
            + (f"; spread judged by {t.dynamic_sampling_reward}" if t.dynamic_sampling_reward else "")))
    return rows
