"""GRPO step time with and without TRL's colocated vLLM (vLLM's CPU build) on the embedded model.

Same recipe, prompts, seeds and LoRA in both modes; every completion is forced to exactly L tokens
(min_new_tokens / min_tokens = max_completion_length), so both modes generate the same amount. Each run
is a fresh process (`lowmem-r1 train`'s code, in-process) that times TRL's generation call per step:

    steady      median step time over the steps after the first (the engine is warm)
    end to end  process wall time / steps (start-up included: model load, vLLM engine start)
    gen tok/s   generated tokens / seconds inside the generation call (weight sync included for vLLM;
                the sync alone: its own column)
    train half  step time - generation time (what vLLM's thread settings could starve), and the same less
                TRL's no-grad importance-sampling forward (vLLM only, and only where the toolkit cannot
                take the ratio from the loss's own forward: lowmem_r1/training/grpo/correction.py)
    engine start  seconds inside vLLM's LLM(...) (compiled: vllm-compile row)

Needs `make install-vllm-cpu`. The machine may be shared: the load average is printed with the figures.
Last line: steady_step_speedup_256=<steady step without vLLM / with vLLM at 256 tokens>.

    python scripts/bench_vllm_cpu.py [--lengths 32,128,256] [--steps 4] [--prompts 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lowmem_r1.core import allocator  # noqa: E402

RECIPE = """
name = "bench-vllm"
[model]
name = "builtin:smollm2-135m-instruct"
[lora]
r = 16
alpha = 32
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[data]
source = "builtin:arithmetic"
task = "arithmetic"
max_prompt_length = 128
generator = {{ n = 200, seed = 0 }}
[prompt]
system = "none"
[[rewards]]
name = "answer_match"
extract = "last_number"
[training]
max_steps = {steps}
learning_rate = 5e-4
per_device_train_batch_size = {batch}
num_generations = 4
save_steps = 1000
seed = 42
[generation]
max_completion_length = {length}
use_vllm = {vllm}
[output]
dir = "{run}"
"""


def timed(fn, into: list, when=lambda: True, before=lambda: None):
    """`fn`, appending each call's seconds to `into` (only the calls where `when()` holds)."""

    def wrapper(*a, **k):
        before()
        if not when():
            return fn(*a, **k)
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into.append(time.perf_counter() - t0)

    return wrapper


def child(args) -> None:
    """One run: train in this process, time TRL's generation call, print one JSON line."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    from lowmem_r1.config.recipe import load_recipe
    from lowmem_r1.training.grpo import stage as T

    length, vllm = args.length, args.mode.startswith("vllm")
    kwargs = T.grpo_kwargs

    def forced_length(recipe, run, weights):  # every completion exactly `length` tokens, both modes
        out = kwargs(recipe, run, weights)
        out["generation_kwargs"] = {"min_tokens": length} if vllm else {"min_new_tokens": length}
        return out

    T.grpo_kwargs = forced_length
    import torch
    from trl import GRPOTrainer

    gen_times, threads, old_logps, engine_start, syncs = [], {}, [], [], []

    def note_threads(*keys_values):
        for key, value in keys_values:
            threads.setdefault(key, value)

    GRPOTrainer._generate_single_turn = timed(
        GRPOTrainer._generate_single_turn, gen_times,
        before=lambda: note_threads(("torch_threads_in_step", torch.get_num_threads())))
    # without grad: the importance-sampling forward TRL adds beside vLLM
    GRPOTrainer._get_per_token_logps_and_entropies = timed(
        GRPOTrainer._get_per_token_logps_and_entropies, old_logps, when=lambda: not torch.is_grad_enabled(),
        before=lambda: note_threads(("torch_threads_in_train_half", torch.get_num_threads()),
                                    ("cores_in_train_half", len(os.sched_getaffinity(0)))))
    if vllm:
        from trl.generation import vllm_generation

        vllm_generation.LLM = timed(vllm_generation.LLM, engine_start)
        from lowmem_r1.models import vllm_cpu

        vllm_cpu.layerwise_sync = timed(vllm_cpu.layerwise_sync, syncs)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    recipe_path = tmp / "r.toml"
    recipe_path.write_text(RECIPE.format(steps=args.steps, batch=args.prompts * 4, length=length,
                                         vllm=str(vllm).lower(), run=tmp / "run"))
    threads["torch_threads_before"] = torch.get_num_threads()
    recipe = load_recipe(recipe_path)
    code = T.train(recipe, recipe_path, T.Start.new(recipe, force=True))
    wall = time.perf_counter() - started
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_time"] for r in rows]
    tokens = [r["completions/mean_length"] * args.prompts * 4 for r in rows]
    print(json.dumps({
        "mode": args.mode, "length": length, "code": code, "steps": steps, "gen": gen_times, "tokens": tokens,
        "wall": wall, "startup": wall - sum(steps), "engine_start": sum(engine_start), "old_logps": old_logps,
        "syncs": syncs,
        **threads,
        "torch_threads_after": torch.get_num_threads(),
    }))


def summarise(r: dict) -> dict:
    steady = r["steps"][1:] or r["steps"]
    gen = r["gen"][1:] or r["gen"]
    return {
        "steady": statistics.median(steady),
        "e2e": r["wall"] / len(r["steps"]),
        "startup": r["startup"],
        "gen_tps": sum(r["tokens"][1:] or r["tokens"]) / sum(gen),
        "train_half": statistics.median(s - g for s, g in zip(steady, gen)),
        # the train half less TRL's no-grad importance-sampling forward (vLLM only): forward/backward/optimizer
        "fwd_bwd_opt": statistics.median(s - g - o for s, g, o in zip(steady, gen, _pad(r.get("old_logps", [])[1:], len(steady)))),
        "sync": statistics.median(r.get("syncs", [])[1:] or r.get("syncs") or [0.0]),
        "mean_len": statistics.mean(r["tokens"]) / (r["prompts"] * 4),
    }


def _pad(xs: list, n: int) -> list:
    return list(xs) + [0.0] * (n - len(xs))


def main() -> None:
    print(f"allocator: {allocator.for_benchmark()}", flush=True)  # the toolkit's, inherited by child processes
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32,128,256")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (x4 generations)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled-engine run")
    p.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.mode, args.length = args.one[0], int(args.one[1])
        return child(args)
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        sys.exit("vLLM is not installed: make install-vllm-cpu")
    results = {}
    lengths = [int(x) for x in args.lengths.split(",")]
    for length in lengths:
        # vllm-compile: the same engine with torch.compile (enforce_eager off), at the shortest length only
        for mode in ("hf", "vllm") + (("vllm-compile",) if length == lengths[0] and args.compile else ()):
            load = os.getloadavg()[0]
            env = {**os.environ, "VLLM_CPU_ENFORCE_EAGER": "0" if mode == "vllm-compile" else "1"}
            done = subprocess.run([sys.executable, __file__, "--one", mode, str(length), "--steps", str(args.steps),
                                   "--prompts", str(args.prompts)], check=False, capture_output=True, text=True, cwd=REPO, env=env)
            line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("{")), None)
            if done.returncode or line is None:
                sys.exit(f"{mode} L={length} failed:\n{done.stderr[-3000:]}")
            r = {**json.loads(line), "prompts": args.prompts, "load": (load + os.getloadavg()[0]) / 2}
            results[(mode, length)] = r
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"GRPO on the embedded SmolLM2-135M, {args.prompts * 4} completions/step, {args.steps} steps, "
          f"{os.cpu_count()} cores")
    print("| L | mode | steady step s | end-to-end s/step | start-up s | engine start s | gen tok/s | sync s | train half s | "
          "of which fwd/bwd/opt s | torch threads | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, length), r in results.items():
        s = summarise(r)
        print(f"| {length} | {mode} | {s['steady']:.1f} | {s['e2e']:.1f} | {s['startup']:.0f} | "
              f"{r.get('engine_start', 0):.0f} | {s['gen_tps']:.0f} | {s['sync']:.1f} | {s['train_half']:.1f} | {s['fwd_bwd_opt']:.1f} | "
              f"{r.get('torch_threads_in_train_half')} | {r['load']:.1f} |")
    for length in sorted({k[1] for k in results}):
        if ("hf", length) in results and ("vllm", length) in results:
            hf, vl = summarise(results[("hf", length)]), summarise(results[("vllm", length)])
            print(f"steady_step_speedup_{length}={hf['steady'] / vl['steady']:.2f} "
                  f"end_to_end_speedup_{length}={hf['e2e'] / vl['e2e']:.2f} gen_speedup_{length}={vl['gen_tps'] / hf['gen_tps']:.1f}")
    if ("hf", 256) in results and ("vllm", 256) in results:
        hf, vl = summarise(results[("hf", 256)]), summarise(results[("vllm", 256)])
        print(f"steady_step_speedup_256={hf['steady'] / vl['steady']:.2f}")


if __name__ == "__main__":
    main()
