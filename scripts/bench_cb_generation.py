"""GRPO's generation on CPU without vLLM: TRL's regular path (`model.generate` on a left-padded batch)
against the toolkit's shared prefill (`shared_prompts.generate_sharing_prompts`: each distinct prompt prefilled
once, what training uses) and transformers' continuous batching (`model.generate_batch`, what GRPOConfig's
`use_transformers_continuous_batching=True` calls), on the embedded model, same prompts, sampling as in
training, each prompt `--generations` times side by side as GRPO lays out a group. Prints completion
tokens/s of each, best of the repeats (alternating order against noise), and each one's ratio to regular.

    .venv/bin/python scripts/bench_cb_generation.py [--prompts 32] [--generations 1] [--max-new-tokens 32] [--repeats 3]
    .venv/bin/python scripts/bench_cb_generation.py --prompts 4 --generations 8 --max-new-tokens 12   # the sample-efficiency bench's step
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lowmem_r1.core import allocator  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    print(f"allocator: {allocator.for_benchmark()}", flush=True)  # the toolkit's, inherited by child processes
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--generations", type=int, default=1, help="copies of each prompt (GRPO's group size)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    for name in ("prompts", "generations", "max_new_tokens", "repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least 1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from lowmem_r1.generation.shared_prefill import generate_sharing_prompts
    from lowmem_r1.models.names import resolve_model

    path = resolve_model("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i + 10} + {2 * i + 13}?"}],
                                     tokenize=False, add_generation_prompt=True)
             for i in range(a.prompts) for _ in range(a.generations)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def padded(generate) -> int:
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = generate(**batch, generation_config=cfg)
        new = out[:, batch["input_ids"].shape[1]:]
        return int(((new != tok.pad_token_id) | (new == tok.eos_token_id)).sum())

    def continuous() -> int:
        with torch.no_grad():
            outs = model.generate_batch(ids, generation_config=cfg, continuous_batching_config=ContinuousBatchingConfig(),
                                        progress_bar=False)
        return sum(len(o.generated_tokens) for o in outs.values())

    methods = [("regular", lambda: padded(model.generate)),
               ("shared", lambda: padded(lambda **kw: generate_sharing_prompts(model.generate, model, **kw))),
               ("continuous", continuous)]
    best = {name: 0.0 for name, _ in methods}
    best_cpu = dict(best)
    for r in range(a.repeats):
        for name, fn in (methods if r % 2 == 0 else methods[::-1]):
            torch.manual_seed(r)
            t, c = time.perf_counter(), time.process_time()
            n = fn()
            rate, cpu_rate = n / (time.perf_counter() - t), n / (time.process_time() - c)
            best[name] = max(best[name], rate)
            best_cpu[name] = max(best_cpu[name], cpu_rate)
            print(f"repeat {r} {name}: {n} tokens, {rate:.1f} tokens/s wall, {cpu_rate:.1f} per CPU-second "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    # On a shared machine wall time measures the neighbours; tokens per CPU-second (all threads) does not.
    for label, rates in (("tokens/s wall", best), ("per CPU-second", best_cpu)):
        print(f"{label}: " + " ".join(f"{k}={v:.1f}" for k, v in rates.items()) + "; ratio to regular: "
              + " ".join(f"{k}={v / rates['regular']:.2f}" for k, v in rates.items() if k != "regular"))
    print(f"shared_ratio={best['shared'] / best['regular']:.2f} continuous_ratio="
          f"{best['continuous'] / best['regular']:.2f} (wall, load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
