"""Export: a trained adapter -> merged Hugging Face folder -> GGUF files + Ollama Modelfile.

Dependencies run one way (each module imports only those below it; nothing here imports torch,
transformers, peft or gguf at its top - gguf_writer, which subclasses gguf's writer, is itself imported
lazily by gguf.py):

    command.py        `lowmem-r1 merge`: prepare -> merge and check -> GGUF -> Modelfile -> merge_info.json
      source.py       what to merge: run directory / adapter folder -> adapter, 16-bit base, default output
      merge_lora.py   adapter parsing (peft's pattern rules) + the streaming LoRA merge
      gguf.py         merged folder -> GGUF file, read back and checked (k-quants via llama-quantize)
        gguf_plan.py      types, model spec, the tensor plan from the headers alone
        gguf_metadata.py  hyperparameters and tokenizer metadata
        gguf_stream.py    tensor bytes, a few rows at a time
        gguf_writer.py    gguf's GGUFWriter with bulk-packed arrays and piecewise tensors
      ollama.py       the Modelfile
      parity.py       probe prompts; merged vs base+adapter vs peft vs GGUF; ReferenceOutputs
      safetensors_io.py  safetensors headers, rows and shard writer; one_torch_thread
"""
