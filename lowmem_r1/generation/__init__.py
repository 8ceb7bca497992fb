"""Generation from a trained (or any) model: engines, shared prefill, eval, chat, rejection sampling,
and TRL's vLLM server."""
