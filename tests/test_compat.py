"""The CPU stand-in for TRL 1.15's Triton log-prob kernel computes what TRL's own kernel computes."""

import torch

from lowmem_r1.training.grpo.compat import TorchChunkedLogProb, patch_trl_for_cpu


def test_matches_plain_log_softmax_with_temperature_softcap_and_grad():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50)
    targets = torch.randint(0, 50, (37,))
    out = TorchChunkedLogProb.apply(hidden, weight, bias, targets, 0.7, 8, 30.0, 0.5,
                                    ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    logp, entropy, log_sum_sq, mean_logits, top1 = out

    z = (hidden @ weight.T + bias) * 0.5
    z = 30.0 * torch.tanh(z / 30.0) / 0.7
    ref = torch.log_softmax(z, -1)
    p = ref.exp()
    assert torch.allclose(logp, ref.gather(-1, targets[:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(entropy, -(p * ref).sum(-1), atol=1e-5)
    assert torch.allclose(log_sum_sq, torch.log((p * p).sum(-1)), atol=1e-5)
    assert torch.allclose(mean_logits, z.mean(-1), atol=1e-5)
    assert torch.equal(top1, z.argmax(-1) == targets)
    logp.sum().backward()  # gradients flow to the backbone and the head
    assert hidden.grad is not None and weight.grad is not None and hidden.grad.abs().sum() > 0


def test_outputs_not_asked_for_are_none():
    out = TorchChunkedLogProb.apply(torch.randn(3, 4), torch.randn(5, 4), None, torch.tensor([0, 1, 2]), 1.0, 8)
    assert out[0].shape == (3,) and all(x is None for x in out[1:])


def test_patch_applies_only_without_an_accelerator():
    import trl.trainer.utils as trl_utils

    assert patch_trl_for_cpu() is True  # no CUDA here
    assert trl_utils._ChunkedLogProbFunction is TorchChunkedLogProb


def test_an_all_masked_micro_batch_gives_empty_tensors_not_none():
    """mask_truncated_completions can mask every token of a micro-batch; TRL then scatters empty outputs."""
    weight = torch.randn(11, 4, requires_grad=True)
    log_probs, entropy, *_ = TorchChunkedLogProb.apply(
        torch.randn(0, 4), weight, None, torch.zeros(0, dtype=torch.long), 1.0, 64, None, 1.0, ("log_probs", "entropy"))
    assert log_probs.shape == (0,) and entropy.shape == (0,)
