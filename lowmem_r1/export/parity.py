"""Does the exported model behave like the trained one? Logits on a few probe prompts and a few greedy
tokens, compared between the merged folder, the base with the adapter attached (peft), peft's own
merge_and_unload, and (gguf.py) the GGUF file loaded back by transformers.

The merged folder's outputs are the reference of every check after the merge: a ReferenceOutputs made
once per merge computes them on first use and hands the same outputs to the merge check and to the check
of every GGUF type, so the merged model is loaded once.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from lowmem_r1.export.safetensors_io import checkpoint_shards, count_params, one_torch_thread

PROBES = (
    "What is 3 + 5?",
    "The capital of France is",
    "def fibonacci(n):\n    ",
)

# Allowed max |logit difference| between the merged model and base+adapter, per stored dtype: the merged
# weights are rounded once to that dtype, the reference is not. Measured on SmolLM2-135M with a random
# LoRA (logits up to ~25): fp32 4e-5, fp16 0.04, bf16 0.19. The second check (vs peft's merge_and_unload
# rounded the same way) has no such excuse: fp16 6e-4, bf16 6e-3. Both scale with the logits' magnitude
# beyond LOGIT_SCALE (bigger models have bigger logits).
LOGIT_TOL = {"float32": 1e-3, "float16": 0.2, "bfloat16": 1.0}
MERGE_EXACT_TOL = {"float32": 1e-3, "float16": 0.02, "bfloat16": 0.1}
LOGIT_SCALE = 25.0
SMALL_MODEL = 1_000_000_000  # parameters; up to this size checks compute in float32 on one thread


@dataclass
class ParityReport:
    max_diff: float  # merged vs base+adapter
    peft_diff: float  # merged vs peft merge_and_unload, rounded to the same dtype
    adapter_effect: float  # base vs base+adapter (shows the adapter matters)
    tol: float
    compute_dtype: str
    ok: bool

    def line(self) -> str:
        return (f"parity ({self.compute_dtype} compute, {len(PROBES)} probe prompts): max |logit diff| merged vs "
                f"base+adapter {self.max_diff:.2e} (tolerance {self.tol:.3g}), vs peft merge_and_unload "
                f"{self.peft_diff:.2e}; adapter effect {self.adapter_effect:.2e}")


def probe_inputs(tokenizer) -> list:
    return [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROBES]


def _logits(model, inputs) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits.float()[0] for ids in inputs]


def max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def probe_outputs(model, tok) -> tuple[list, list[int]]:
    """Logits on the probe prompts and 8 greedy tokens answering a chat question, with generation
    settings taken from the tokenizer (a GGUF-loaded model rebuilds its generation_config from metadata)."""
    import torch
    from transformers import GenerationConfig

    inputs = probe_inputs(tok)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 5?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"] \
        if tok.chat_template else inputs[0]
    gen = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with torch.no_grad():
        greedy = model.generate(chat, generation_config=gen)[0, chat.shape[1]:].tolist()
    return _logits(model, inputs), greedy


class ReferenceOutputs:
    """probe_outputs of a merged folder, computed on first use and kept for the next check of the same
    folder, compute dtype and files (sizes and mtimes: a folder written again is probed again)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._outputs: tuple[list, list[int]] | None = None

    def get(self, model_dir: Path, compute: str) -> tuple[list, list[int]]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        key = (str(model_dir.resolve()), compute,
               *[(s.stat().st_size, s.stat().st_mtime_ns) for s in checkpoint_shards(model_dir)])
        if key != self._key:
            self._key, self._outputs = None, None  # never two models in memory
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, compute)).eval()
            self._outputs = probe_outputs(model, AutoTokenizer.from_pretrained(str(model_dir)))
            self._key = key
            del model
            gc.collect()
        return self._outputs


def check_setup(model_dir: Path, big_dtype: str):
    """(compute dtype, context) for a check of this model: a small model in float32 on one thread (a few
    probe tokens gain nothing from more, and spinning threads collapse on a busy CPU); a big one in its
    16-bit dtype (half the memory) on all threads."""
    if count_params(model_dir) <= SMALL_MODEL:
        return "float32", one_torch_thread()
    return (big_dtype if big_dtype != "float32" else "bfloat16"), nullcontext()


def verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: str,
                 reference: ReferenceOutputs | None = None) -> ParityReport:
    """Logits of the merged folder vs the base with the adapter attached (peft), on a few probe prompts.
    One model in memory at a time."""
    compute, ctx = check_setup(merged_dir, dtype)
    with ctx:
        ref, plain, peft_ref = _peft_logits(base_dir, adapter_dir, merged_dir, dtype, compute)
        got, _ = (reference or ReferenceOutputs()).get(merged_dir, compute)
    diff, peft_diff = max_diff(got, ref), max_diff(got, peft_ref)
    scale = max(1.0, max(float(x.abs().max()) for x in ref) / LOGIT_SCALE)
    tol = LOGIT_TOL[dtype] * scale
    ok = diff <= tol and peft_diff <= MERGE_EXACT_TOL[dtype] * scale
    return ParityReport(diff, peft_diff, max_diff(plain, ref), tol, compute, ok)


def _peft_logits(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: str, compute: str):
    """(base + adapter, base alone, peft's merge_and_unload rounded to `dtype`) logits on the probes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cdt = getattr(torch, compute)
    inputs = probe_inputs(AutoTokenizer.from_pretrained(str(merged_dir)))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=cdt)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    ref = _logits(model, inputs)
    with model.disable_adapter():
        plain = _logits(model, inputs)
    peft_merged = model.merge_and_unload()
    with torch.no_grad():  # round like the merged file, compute like the reference; one tensor at a time
        for p in peft_merged.parameters():
            p.data = p.data.to(getattr(torch, dtype)).to(cdt)
    peft_ref = _logits(peft_merged, inputs)
    del base, model, peft_merged
    gc.collect()
    return ref, plain, peft_ref
