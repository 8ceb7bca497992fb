"""Make TRL 1.15's GRPOTrainer run on a CPU.

TRL 1.15 (the newest release Unsloth 2026.10.9 accepts) always scores completions through a fused LM
head whose log-prob kernel is written in Triton, which runs on CUDA/XPU only: on a CPU the trainer
fails at the first loss ("'NoneType' object has no attribute 'apply'" without triton, a Triton pointer
error with it). TRL 1.16 falls back to plain torch off-GPU; this module gives 1.15 the same fallback:
the same per-token outputs (log-probs, entropy, ...) computed with ordinary torch ops and autograd.

It is applied only when no CUDA device is present, and only to the pinned TRL, so a GPU run uses
TRL's own kernel untouched.
"""

from __future__ import annotations

TOKEN_CHUNK = 1024


class TorchChunkedLogProb:
    """Drop-in for trl.kernels.ChunkedLogProbFunction: `.apply(hidden, weight, bias, targets,
    temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)` ->
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] or None."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        import torch

        parts: dict[str, list] = {k: [] for k in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")}
        # max(.., 1): an all-masked micro-batch (mask_truncated_completions) still yields empty tensors, not None
        for start in range(0, max(hidden.shape[0], 1), TOKEN_CHUNK):
            h = hidden[start:start + TOKEN_CHUNK]
            t = targets[start:start + TOKEN_CHUNK]
            z = torch.nn.functional.linear(h, weight, bias).float() * logit_scale
            if final_logit_softcapping is not None:
                z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
            z = z / temperature
            log_z = torch.logsumexp(z, dim=-1)
            parts["log_probs"].append(z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - log_z)
            if "entropy" in outputs:
                p = torch.softmax(z, dim=-1)
                parts["entropy"].append(log_z - (p * z).sum(-1))
            if "log_sum_sq_probs" in outputs:
                parts["log_sum_sq_probs"].append(torch.logsumexp(2 * (z - log_z.unsqueeze(-1)), dim=-1).detach())
            if "mean_logits" in outputs:
                parts["mean_logits"].append(z.mean(-1).detach())
            if "is_top1" in outputs:
                parts["is_top1"].append(z.argmax(-1) == t)
        return tuple(torch.cat(v) if v else None for v in parts.values())


def patch_trl_for_cpu() -> bool:
    """Install the torch fallback when TRL's Triton kernel cannot run here. Returns True if patched."""
    import torch

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return False
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        return False  # a TRL without the fused head (older) or with its own fallback (newer)
    trl_utils._ChunkedLogProbFunction = TorchChunkedLogProb
    return True
