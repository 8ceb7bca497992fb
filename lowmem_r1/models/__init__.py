"""Models: name resolution (hub id, folder, GGUF, builtin), number formats, the training backends
(transformers+peft, Unsloth) and vLLM's CPU build."""
