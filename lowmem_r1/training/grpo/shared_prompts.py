"""A GRPO group is one prompt `num_generations` times: run the prompt through the model once, not once per copy.

TRL builds each step's batch as rows of prompt + completion, the prompt repeated for every completion of its
group. On a small model with short completions the prompt is most of the tokens (the sample-efficiency
bench: 47 prompt tokens, 12 completion tokens, 8 copies), so most of the compute goes into the same
prompt again and again:

- generation: `generate` prefills every copy. `generate_sharing_prompts` prefills each distinct prompt once,
  all but its last token, copies the key/value cache to the prompt's rows and lets `generate` continue
  from there (as it does from any cached prefix). `eval -k` and `sample -k` use it for their k samples too.
- the loss: TRL's forward runs prompt + completion for every row. `SharedPrompts` runs each distinct prompt
  once with grad, copies its cache to the rows (an index, so gradients from every copy add up in the
  prompt's forward) and runs only the completions on top, with TRL's fused log-prob head.

Both give the same logits up to float rounding (the tests compare tokens, log probs and gradients with
TRL's own path). What they cannot share keeps TRL's path: vLLM, continuous batching, images, several
processes (DDP/DeepSpeed/FSDP), gradient checkpointing (which drops the cache), caches other than plain
full attention, chunked loss forwards (`batch_size` below the batch), MoE aux losses, the unsloth backend
(its models patch their own forward and generate) and trainers whose method is not TRL's own.
"""

from __future__ import annotations

from lowmem_r1.generation.shared_prefill import distinct_rows, generate_sharing_prompts, prefill
from lowmem_r1.training.grpo.correction import owner_below
from lowmem_r1.training.grpo.settings import extensions


def _trl_owns(trainer, name: str) -> bool:
    """Is the `name` method below SharedPrompts TRL's own (not a patched trainer's)?"""
    return owner_below(trainer, SharedPrompts, name).__module__.startswith("trl.")


class SharedPrompts:
    """GRPOTrainer mixin (trainer.py): generation and the loss forward run each prompt once."""

    def _sharing(self) -> bool:
        """On for this run (LowmemGRPOConfig.share_prompts: the hf backend; Unsloth's models bring their own
        forward and generate), in one process."""
        distributed = self.args.world_size > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled
        return extensions(self.args).share_prompts and not distributed

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        args = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if (self.use_vllm or self.use_transformers_continuous_batching or images is not None or multimodal_fields
                or not self._sharing() or not _trl_owns(self, "_generate_single_turn")):
            return super()._generate_single_turn(*args)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        original, own = model.generate, vars(model).get("generate")
        model.generate = lambda **kw: generate_sharing_prompts(original, model, **kw)
        try:  # TRL calls model.generate inside; the wrapper is in place only for this call
            return super()._generate_single_turn(*args)
        finally:
            if own is None:
                del model.generate
            else:
                model.generate = own

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        args = (model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss)
        width = input_ids.shape[1] - logits_to_keep  # TRL's rows: left-padded prompt, then the completion
        unwrapped = self.accelerator.unwrap_model(model)
        inner = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        shared = None
        if (width >= 2 and (batch_size or len(input_ids)) >= len(input_ids) and not compute_aux_loss
                and not any(v is not None for v in multimodal.values()) and self._sharing()
                and not getattr(inner, "is_gradient_checkpointing", False)
                and _trl_owns(self, "_get_per_token_logps_and_entropies")):
            shared = distinct_rows(input_ids[:, :width - 1], attention_mask[:, :width - 1])
        cache = None
        if shared is not None:
            ids, mask, rows = shared
            backbone = inner.base_model  # the decoder stack without the LM head (PEFT's LoRA layers sit inside)

            def run(i, m, c):  # positions as TRL's forward numbers them: 0.. from the left edge, pads included
                backbone(input_ids=i, attention_mask=m, past_key_values=c, use_cache=True)

            with self.accelerator.autocast():
                cache = prefill(run, inner.config, ids, mask, rows)
        if cache is None:
            return super()._get_per_token_logps_and_entropies(*args, **multimodal)
        tail = input_ids[:, width - 1:]  # the prompt's last token predicts the first completion token
        labels = tail.masked_fill(attention_mask[:, width - 1:] == 0, -100)
        labels[:, 0] = -100
        with self.accelerator.autocast():
            out = model(input_ids=tail, attention_mask=attention_mask, past_key_values=cache, labels=labels,
                        fused_lm_head=True)
        logps = out.log_probs[:, -logits_to_keep:]
        return logps, (out.entropy[:, -logits_to_keep:] if compute_entropy else None), None
