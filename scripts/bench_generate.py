"""Tokens/s of `lowmem-r1 chat --prompt` and `lowmem-r1 eval` generation against a bare transformers
`generate` loop, on the same loaded model and the same prompts, in the same process. Goal: >= 0.95x.

    .venv/bin/python scripts/bench_generate.py [--model RUN_DIR_OR_MODEL] [--prompts 8] [--max-new-tokens 32]

Both sides decode greedily, so they produce the same tokens (checked); the order alternates each repeat
so that load from other processes hits both alike; the best of the repeats is compared (medians in
brackets). Model loading is excluded: it is the same code on both sides.

`chat` streams from the calling thread (a callback streamer): an earlier version generated in a helper
thread behind transformers' TextIteratorStreamer, and this benchmark caught it at 0.57x on an idle
2-core machine - a second thread computing gives torch's OpenMP runtime a second worker team, and libgomp
then stops spin-waiting at its barriers.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lowmem_r1.core import allocator  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def count_tokens(row: list[int], stops: set[int]) -> int:
    for i, t in enumerate(row):
        if t in stops:
            return i + 1
    return len(row)


def main() -> int:
    print(f"allocator: {allocator.for_benchmark()}", flush=True)  # the toolkit's, inherited by child processes
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from rich.console import Console

    from lowmem_r1.generation.chat import ChatOptions, Conversation, _one_shot
    from lowmem_r1.generation.engine import Decoding, load_generator, resolve_ref
    from lowmem_r1.generation.evaluate import generate_all

    gen = load_generator(resolve_ref(args.model), "hf")
    model, tok = gen.model, gen.tokenizer
    stops = gen.stop_ids
    questions = [f"What is {a} + {b}?" for a, b in zip([3, 7, 2, 9, 4, 6, 8, 5] * 8, [5, 1, 8, 2, 4, 3, 9, 7] * 8)]
    questions = questions[: args.prompts]
    messages = [[{"role": "user", "content": q}] for q in questions]
    sampling = Decoding(temperature=0.0, max_new_tokens=args.max_new_tokens)
    devnull = Console(file=io.StringIO())

    # --- bare transformers -------------------------------------------------------------------------
    def bare_single(q_msgs):
        inputs = tok.apply_chat_template(q_msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        row = out[0, inputs["input_ids"].shape[1]:].tolist()
        n = count_tokens(row, stops)
        return n, tok.decode(row[:n], skip_special_tokens=True)

    def bare_batch():
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
        inputs = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        rows = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [count_tokens(r, stops) for r in rows], [tok.decode(r[:count_tokens(r, stops)],
                                                                   skip_special_tokens=True) for r in rows]

    # --- ours --------------------------------------------------------------------------------------
    def ours_chat(q):
        conv = Conversation(gen)
        out = io.StringIO()
        _one_shot(conv, q, ChatOptions(sampling, think=False), out, devnull)  # exactly what `chat --prompt` runs
        return gen.extra["last_completion"].tokens, gen.extra["last_completion"].text

    def ours_eval():
        ids = [gen.encode(m) for m in messages]
        outs = generate_all(gen, ids, sampling, 1, batch_size=len(ids))
        return [o[0].tokens for o in outs], [o[0].text for o in outs]

    def timed(fn):
        t = time.perf_counter()
        value = fn()
        return time.perf_counter() - t, value

    bare_single(messages[0])  # warm-up (first-call allocations)
    results = {"chat": {"bare": [], "ours": []}, "eval": {"bare": [], "ours": []}}
    for rep in range(args.repeats):
        for name, bare_fn, ours_fn in (
            ("chat", lambda: [bare_single(m) for m in messages], lambda: [ours_chat(q) for q in questions]),
            ("eval", bare_batch, ours_eval),
        ):
            if rep % 2:  # alternate who goes first, so drifting load from other processes hits both alike
                to, vo = timed(ours_fn)
                tb, vb = timed(bare_fn)
            else:
                tb, vb = timed(bare_fn)
                to, vo = timed(ours_fn)
            if name == "chat":
                nb, texts_b = sum(n for n, _ in vb), [t for _, t in vb]
                no, texts_o = sum(n for n, _ in vo), [t for _, t in vo]
            else:
                nb, texts_b = sum(vb[0]), vb[1]
                no, texts_o = sum(vo[0]), vo[1]
            if texts_b != texts_o or nb != no:
                print(f"MISMATCH on the {name} path: the same greedy decoding gave different text", file=sys.stderr)
                return 1
            results[name]["bare"].append(nb / tb)
            results[name]["ours"].append(no / to)

    print(f"model {args.model}, {len(questions)} prompts, greedy, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} (median in brackets)")
    ok = True
    for name, label in (("chat", "chat --prompt (batch 1, streamed)"), ("eval", f"eval (batch {len(questions)})")):
        b, o = max(results[name]["bare"]), max(results[name]["ours"])
        mb, mo = statistics.median(results[name]["bare"]), statistics.median(results[name]["ours"])
        ratio = o / b
        ok &= ratio >= 0.95
        print(f"{label:36s} bare {b:7.1f} tok/s [{mb:.1f}]   ours {o:7.1f} tok/s [{mo:.1f}]   "
              f"ratio {ratio:.3f}x [{mo / mb:.3f}x]")
    print("goal >= 0.95x:", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
