"""Sample efficiency of GRPO on CPU: plain settings against the toolkit's best ones, same seed, same budget.

Task: two-digit subtractions ("What is 82 - 29?", answer with the number only) that the embedded
SmolLM2-135M gets right 3% of the time before training, so most of plain GRPO's groups score 0 throughout
and teach nothing (the case dynamic sampling is for). `--op + --operands 10 99` is the two-digit addition
task of the first runs (base 28%). Both runs train for the same training wall time (held-out evaluation is
paused out of the clock); every `--eval-every` seconds the adapter answers the same held-out questions
greedily. Curves: held-out accuracy against generated completion tokens and against training wall time
(PNG, both runs). 128 held-out questions: on 64, one figure's standard error is ~4.5 points at 15% accuracy
(plain's final adapter scored 0.078 on the bench's 64 and 0.164 on 256 fresh questions), so the line before
the last gives the standard error of the final gain.

    plain: loss_type grpo, epsilon 0.2, no overlong filtering, no dynamic sampling
    best:  loss_type dapo, clip-higher (epsilon_high 0.28), dynamic sampling refill (no overlong filtering:
           replies cut at --max-tokens still hold their answer, and masking them drops the rare right ones)

Goal: best reaches plain's final held-out accuracy with <= 0.6x its generated tokens, and ends
>= 10 points higher at equal wall time. Last line: `tokens_ratio=<x> accuracy_gain_points=<y>`.

    .venv/bin/python scripts/bench_sample_efficiency.py [--budget 330] [--out bench-out] [--clock cpu] [--quick]
        [--seed 42 7 1]   # several seeds: per-seed lines, then the means (one seed's last point is a swing)
        [--op - --operands 10 99]   # the task: + - or *, operands drawn from MIN..MAX
        [--best JSON]   # another best arm: its [training] controls, e.g. {"dynamic_sampling": "skip", "num_iterations": 2};
                        # "rewards": [tables added to answer_match], "generation": {e.g. "temperature": 0.7}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lowmem_r1.core import allocator  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowmem_r1.config.recipe import recipe_from_dict  # noqa: E402
from lowmem_r1.core.errors import UserError  # noqa: E402
from lowmem_r1.training.callbacks import Callback  # noqa: E402

PLAIN = {"loss_type": "grpo", "epsilon": 0.2, "mask_truncated_completions": False, "dynamic_sampling": "off"}
BEST = {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "mask_truncated_completions": False,
        "dynamic_sampling": "refill", "max_refill_draws": 3}


def recipe(run_dir: Path, controls: dict, a) -> dict:
    controls = dict(controls)
    extra_rewards = controls.pop("rewards", [])  # reward shaping the arm adds to answer_match
    generation = {"max_completion_length": a.max_tokens, "temperature": 1.0, **controls.pop("generation", {})}
    return {
        "name": run_dir.name,
        "model": {"name": "builtin:smollm2-135m-instruct", "backend": "hf"},
        "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"source": "builtin:arithmetic", "task": "arithmetic", "eval_size": a.eval_size,
                 "generator": {"n": 3000, "seed": 0, "min_operand": a.operands[0], "max_operand": a.operands[1],
                               "ops": [a.op]}},
        "prompt": {"user": "{question} Reply with only the number."},
        "rewards": [{"name": "answer_match", "extract": "last_number"}, *extra_rewards],
        "training": {"max_steps": 100000, "learning_rate": a.lr, "per_device_train_batch_size": a.prompts * a.generations,
                     "num_generations": a.generations, "save_steps": 100000, "save_total_limit": 1,
                     "seed": a.seed, **controls},
        "generation": generation,
        "logging": {"sample_every": 0},
        "output": {"dir": str(run_dir)},
    }


class HeldOut(Callback):
    """Greedy held-out accuracy every `every` seconds of training time (its own time excluded), and a stop
    when the training time reaches the budget."""

    def __init__(self, rows, tokenizer, budget: float, every: float, max_tokens: int, clock: str = "wall"):
        from lowmem_r1 import rewards

        self.rows, self.tok, self.budget, self.every, self.max_tokens = rows, tokenizer, budget, every, max_tokens
        self.score = rewards.build("answer_match", extract="last_number")
        self.points: list[dict] = []
        self.tokens = 0.0
        self.paused = 0.0
        self.start = None
        self.next_eval = 0.0
        self.now = time.perf_counter if clock == "wall" else _cpu_seconds

    def clock(self) -> float:
        return self.now() - self.start - self.paused

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = self.now()
        self.measure(model, state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        if not logs or "tokens/generated" not in logs:
            return
        self.tokens += float(logs["tokens/generated"])
        done = self.clock() >= self.budget
        if done or self.clock() >= self.next_eval:
            self.measure(model, state.global_step)
        if done:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, model=None, **kw):
        """An arm whose max_steps ends it before the budget still gets its final point."""
        if model is not None and self.points and self.points[-1]["step"] != state.global_step:
            self.measure(model, state.global_step)

    def measure(self, model, step: int) -> None:
        import torch

        t0 = self.now()
        seconds = self.clock()
        was_training = model.training
        model.eval()
        self.tok.padding_side = "left"
        correct = 0
        for i in range(0, len(self.rows), 64):  # 64 a batch: 1.1x faster than 32 on 2 cores
            chunk = self.rows[i:i + 64]
            texts = [self.tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in chunk]
            batch = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=self.max_tokens, do_sample=False,
                                     pad_token_id=self.tok.pad_token_id)
            answers = self.tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            scores = self.score(prompts=[r["prompt"] for r in chunk],
                                completions=[[{"role": "assistant", "content": t}] for t in answers],
                                answer=[r["answer"] for r in chunk])
            correct += sum(1 for s in scores if s == 1.0)
        if was_training:
            model.train()
        acc = correct / len(self.rows)
        self.points.append({"step": step, "seconds": round(seconds, 1), "tokens": self.tokens, "accuracy": acc})
        print(f"    step {step:4d}  train {seconds:6.0f}s  tokens {self.tokens:8.0f}  held-out {acc:.3f}", flush=True)
        self.paused += self.now() - t0
        self.next_eval = seconds + self.every


def _cpu_seconds() -> float:
    """This process's CPU time over the cores torch uses: the wall time the work would take on an idle
    machine (for a shared one, where wall time measures the neighbours)."""
    import torch

    return time.process_time() / max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def run_arm(name: str, controls: dict, a, out: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from lowmem_r1.data import load_splits
    from lowmem_r1.models.names import resolve_model
    from lowmem_r1.training.run import Start, train

    r = recipe_from_dict(recipe(out / name, controls, a))
    tok = AutoTokenizer.from_pretrained(resolve_model(r.model.name))
    held = [dict(x) for x in load_splits(r, tok).eval]
    cb = HeldOut(held, tok, a.budget, a.eval_every, a.max_tokens, a.clock)
    print(f"== {name}: {json.dumps(controls)}", flush=True)
    from rich.console import Console

    code = train(r, start=Start.new(r, force=True), console=Console(file=open(os.devnull, "w")), callbacks=(cb,))
    if code != 0:
        raise SystemExit(f"{name}: training exited with {code}")
    return cb.points


def check_arms(ap: argparse.ArgumentParser, a) -> None:
    """Refuse a bad task or --best arm in one line (exit 2) before the first arm spends minutes."""
    if a.operands[0] > a.operands[1]:
        ap.error(f"--operands {a.operands[0]} {a.operands[1]}: MIN must not exceed MAX")
    if not isinstance(a.best, dict):
        ap.error(f"--best: a JSON object of [training] controls, not {a.best!r}")
    for name, controls in (("plain", PLAIN), ("--best", a.best)):
        try:
            recipe_from_dict(recipe(Path(name), controls, a), source=name)
        except UserError as e:
            ap.error(str(e))


def gain_error(plain: dict, best: dict, n: int) -> float:
    """Standard error (points) of the difference of two held-out accuracies on n questions each (binomial),
    so a reader can tell a gain from a swing. Each accuracy is taken as (right + 1) / (n + 2), so two
    figures of 0 do not claim no noise."""
    shrunk = [(p["accuracy"] * n + 1) / (n + 2) for p in (plain, best)]
    return 100 * (sum(q * (1 - q) for q in shrunk) / n) ** 0.5


def first_reaching(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["accuracy"] >= target - 1e-9), None)


def plot(curves: dict, out: Path, task: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label in (("tokens", "generated completion tokens"), ("seconds", "training wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in curves.items():
            ax.plot([p[key] for p in points], [100 * p["accuracy"] for p in points], marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{task}, SmolLM2-135M: accuracy vs {label}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"accuracy_vs_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def summarise(results: list[tuple[float, float]]) -> tuple[float, float]:
    """Over seeds: the mean token ratio (inf when any seed never reached plain's final) and the mean gain."""
    ratios, gains = zip(*results)
    return sum(ratios) / len(ratios), sum(gains) / len(gains)


def compare(a, out: Path) -> tuple[float, float]:
    """Both arms on one seed: curves and points under `out`, the figures printed; (tokens ratio, gain)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    curves = {"plain": run_arm("plain", PLAIN, a, out), "best": run_arm("best", a.best, a, out)}
    plain, best = curves["plain"], curves["best"]
    final_plain, final_best = plain[-1], best[-1]
    hit = first_reaching(best, final_plain["accuracy"])
    ratio = hit["tokens"] / final_plain["tokens"] if hit and final_plain["tokens"] else float("inf")
    gain = 100 * (final_best["accuracy"] - final_plain["accuracy"])
    pngs = plot(curves, out, f"a {a.op} b for a, b in {a.operands[0]}..{a.operands[1]}")
    (out / "points.json").write_text(json.dumps(curves, indent=2) + "\n")
    print(f"seed {a.seed}")
    print(f"plain: held-out {plain[0]['accuracy']:.3f} -> {final_plain['accuracy']:.3f} in {final_plain['seconds']:.0f}s, "
          f"{final_plain['tokens']:.0f} tokens, {final_plain['step']} steps")
    print(f"best:  held-out {best[0]['accuracy']:.3f} -> {final_best['accuracy']:.3f} in {final_best['seconds']:.0f}s, "
          f"{final_best['tokens']:.0f} tokens, {final_best['step']} steps")
    print(f"curves: {', '.join(str(p) for p in pngs)}; total {time.time() - started:.0f}s, "
          f"load average {os.getloadavg()[0]:.1f}")
    if final_plain["accuracy"] <= plain[0]["accuracy"]:
        print(f"note: plain ended where it started or below ({plain[0]['accuracy']:.3f} -> {final_plain['accuracy']:.3f}), "
              f"so reaching its final accuracy takes no training: the token ratio says nothing on this seed")
    print(f"noise: the gain's standard error is {gain_error(final_plain, final_best, a.eval_size):.1f} points "
          f"({a.eval_size} held-out questions)")
    return ratio, gain


def main() -> None:
    print(f"allocator: {allocator.for_benchmark()}", flush=True)  # the toolkit's, inherited by child processes
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=330, help="training seconds per run")
    ap.add_argument("--eval-every", type=float, default=55, help="training seconds between held-out evaluations")
    ap.add_argument("--eval-size", type=int, default=128, help="held-out questions (the noise: see the docstring)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--op", choices=["+", "-", "*"], default="-", help="the task's operation")
    ap.add_argument("--operands", type=int, nargs=2, default=[10, 99], metavar=("MIN", "MAX"))
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, nargs="+", default=[42],
                    help="one or more seeds; with several, each runs both arms (~15 min a seed on 2 cores) and "
                         "the last line gives the means over seeds")
    ap.add_argument("--out", type=Path, default=None, help="where curves and points go (default: a temp dir)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="budget in wall seconds, or in CPU seconds / threads (fair on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 45 s per arm, 16 held-out questions")
    ap.add_argument("--best", type=json.loads, default=BEST,
                    help='the best arm as JSON: [training] controls, plus optional "rewards" (tables added to '
                         'answer_match) and "generation" (e.g. {"temperature": 0.7})')
    a = ap.parse_args()
    seeds, a.seed = a.seed, a.seed[0]
    check_arms(ap, a)
    if a.quick:
        a.budget, a.eval_every, a.eval_size = 45, 20, 16
    out = a.out or Path(tempfile.mkdtemp(prefix="bench-sample-eff-"))
    results = []
    for seed in seeds:
        run = argparse.Namespace(**{**vars(a), "seed": seed})
        results.append(compare(run, out / f"seed-{seed}" if len(seeds) > 1 else out))
    if len(seeds) > 1:
        for seed, (ratio, gain) in zip(seeds, results):
            print(f"seed {seed}: tokens_ratio={ratio:.2f} accuracy_gain_points={gain:.1f}")
    ratio, gain = summarise(results)
    print(f"tokens_ratio={ratio:.2f} accuracy_gain_points={gain:.1f}")


if __name__ == "__main__":
    main()
