"""GRPO's generation on CPU without vLLM: TRL's regular path (`model.generate` on a left-padded batch)
against transformers' continuous batching (`model.generate_batch`, what GRPOConfig's
`use_transformers_continuous_batching=True` calls), on the embedded model, same prompts, sampling as in
training. Prints completion tokens/s of each, best of the repeats (alternating order against noise).

    .venv/bin/python scripts/bench_cb_generation.py [--prompts 32] [--max-new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lowmem_r1 import allocator  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    print(f"allocator: {allocator.for_benchmark()}", flush=True)  # the toolkit's, inherited by child processes
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from lowmem_r1.models import resolve_model

    path = resolve_model("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i + 10} + {2 * i + 13}?"}],
                                     tokenize=False, add_generation_prompt=True) for i in range(a.prompts)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def regular() -> int:
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, generation_config=cfg)
        new = out[:, batch["input_ids"].shape[1]:]
        return int(((new != tok.pad_token_id) | (new == tok.eos_token_id)).sum())

    def continuous() -> int:
        with torch.no_grad():
            outs = model.generate_batch(ids, generation_config=cfg, continuous_batching_config=ContinuousBatchingConfig(),
                                        progress_bar=False)
        return sum(len(o.generated_tokens) for o in outs.values())

    best = {"regular": 0.0, "continuous": 0.0}
    best_cpu = dict(best)
    for r in range(a.repeats):
        order = [("regular", regular), ("continuous", continuous)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            torch.manual_seed(r)
            t, c = time.perf_counter(), time.process_time()
            n = fn()
            rate, cpu_rate = n / (time.perf_counter() - t), n / (time.process_time() - c)
            best[name] = max(best[name], rate)
            best_cpu[name] = max(best_cpu[name], cpu_rate)
            print(f"repeat {r} {name}: {n} tokens, {rate:.1f} tokens/s wall, {cpu_rate:.1f} per CPU-second "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    # On a shared machine wall time measures the neighbours; tokens per CPU-second (all threads) does not.
    print(f"regular={best['regular']:.1f} continuous={best['continuous']:.1f} tokens/s wall "
          f"ratio={best['continuous'] / best['regular']:.2f}; per CPU-second: regular={best_cpu['regular']:.1f} "
          f"continuous={best_cpu['continuous']:.1f} ratio={best_cpu['continuous'] / best_cpu['regular']:.2f} "
          f"(load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
