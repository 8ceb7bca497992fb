"""`stage = "sft"`: supervised fine-tuning on reasoning traces (cold start, rejection-sampled or distilled
data) with TRL's SFTTrainer, through the same backends, run directory, checkpoints and display as GRPO.

Every source becomes TRL's *prompt-completion* format, so the loss falls on the assistant's answer only
(TRL's completion_only_loss; the prompt's labels are -100). Not assistant_only_loss: that needs a chat
template with `{% generation %}` markers, and most templates (SmolLM2's, Qwen2.5's) have none.

Where rows come from (the recipe's [data], loaded like GRPO's):
- a `messages` column (or ShareGPT `conversations`): everything before the last assistant turn is the
  prompt, the last assistant turn the completion;
- `prompt` + `completion` columns, as they are;
- otherwise a task with gold answers (arithmetic, gsm8k, math, countdown): the GRPO prompt and the gold
  answer written in the recipe's answer format (`data.gold_completion`) - generated worked traces.
"""

from __future__ import annotations

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.sft import drop_long, load_sft_splits
from lowmem_r1.training.checkpoints import staged_trainer
from lowmem_r1.training.trainer_args import field_names, trainer_kwargs


def sft_kwargs(recipe, run) -> dict:
    """The recipe as SFTConfig keyword arguments: the keys every TrainingArguments has (trainer_args.py; GRPO-only
    keys - num_generations, beta, loss_type, ... - mean nothing here), then SFT's own."""
    from transformers import TrainingArguments

    return dict(
        **trainer_kwargs(recipe, field_names(TrainingArguments), run.checkpoints),
        max_length=recipe.model.max_seq_length,
        completion_only_loss=True,  # labels -100 on the prompt: learn the answers, not the questions
        packing=False,
        dataset_num_proc=None,
    )


def build_trainer(recipe, run, backend, model, tokenizer, callbacks, console, checkpoint=None, display=None):
    """SFTTrainer (checkpoints staged and renamed like GRPO's) on the recipe's data."""
    from trl import SFTConfig, SFTTrainer

    train_ds, dropped = drop_long(load_sft_splits(recipe, tokenizer), tokenizer, recipe.model.max_seq_length)
    if dropped:
        console.print(f"[yellow]sft:[/] dropped {dropped} example(s) longer than model.max_seq_length = "
                      f"{recipe.model.max_seq_length} tokens (TRL would cut their answers off)")
    if len(train_ds) == 0:
        raise UserError(f"model.max_seq_length = {recipe.model.max_seq_length}: every SFT example is longer; raise it")
    console.print(f"[bold]sft:[/] {len(train_ds)} training rows, loss on the completion (assistant) tokens only")
    overrides = {k: v for k, v in backend.grpo_overrides(recipe).items() if not k.startswith("vllm") and k != "use_vllm"}
    config = SFTConfig(**{**sft_kwargs(recipe, run), **overrides})
    return staged_trainer(SFTTrainer)(
        model=model, processing_class=tokenizer, args=config, train_dataset=train_ds, callbacks=callbacks,
    )


def plan_rows(recipe) -> list[tuple[str, str]]:
    """The numbers `train --dry-run` shows for an SFT stage."""
    t = recipe.training
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    return [
        ("stage", "sft: loss on the assistant (completion) tokens only"),
        ("examples per optimizer step", str(per_step)),
        ("steps", str(t.max_steps)),
        ("examples seen in total", str(per_step * t.max_steps)),
        ("max tokens per example", str(recipe.model.max_seq_length)),
    ]
