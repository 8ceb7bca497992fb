"""Overhead of `lowmem-r1 train` over a plain hand-written TRL script, same tiny GRPO configuration.

Both run the embedded SmolLM2-135M on the same generated additions with the same two rewards, LoRA,
batch and generation length; runs alternate (A B A B ...) in one invocation so machine noise hits both.
Each run reports TRL's own per-step `step_time`; the first step (warm-up) is dropped. Printed: the
median step time of each and the ratio lowmem-r1 / plain TRL (goal <= 1.03).

    python scripts/bench_overhead.py [--rounds 3] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lowmem_r1.core import allocator  # noqa: E402

CONFIG = dict(steps=6, batch=8, generations=4, completion=16, lr=5e-4, r=8, seed=0)

PLAIN = r'''
import json, random, re, sys, time
cfg = json.loads(sys.argv[1]); out = sys.argv[2]
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from lowmem_r1.training.grpo.compat import patch_trl_for_cpu  # TRL 1.15 cannot run GRPO on a CPU without it
from lowmem_r1.models.names import resolve_model
patch_trl_for_cpu()
path = resolve_model("builtin:smollm2-135m-instruct")
rng = random.Random(cfg["seed"])
rows = []
for _ in range(200):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)})
def answer_match(prompts=None, completions=None, answer=None, **kw):
    out = []
    for c, a in zip(completions, answer):
        nums = re.findall(r"-?\d+", c[-1]["content"])
        out.append(1.0 if nums and nums[-1] == a else 0.0)
    return out
def brevity(prompts=None, completions=None, **kw):
    return [max(0.0, 1 - len(c[-1]["content"]) / 80) for c in completions]
tok = AutoTokenizer.from_pretrained(path); tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(path)
times = []
class T(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **k):
        if logs and "step_time" in logs: times.append(logs["step_time"])
args = GRPOConfig(output_dir=out, max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
    num_generations=cfg["generations"], max_completion_length=cfg["completion"], learning_rate=cfg["lr"],
    beta=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=42,
    gradient_checkpointing=False, disable_tqdm=True, reward_weights=[1.0, 0.5], optim="adamw_torch")
trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[answer_match, brevity], args=args,
    train_dataset=Dataset.from_list(rows), callbacks=[T()],
    peft_config=LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
trainer.train()
print("STEP_TIMES " + json.dumps(times))
'''


def recipe(cfg: dict, run_dir: str) -> str:
    return f'''
name = "bench"
[model]
name = "builtin:smollm2-135m-instruct"
backend = "hf"
[lora]
r = {cfg["r"]}
alpha = {2 * cfg["r"]}
target_modules = ["q_proj", "v_proj"]
[data]
source = "builtin:arithmetic"
task = "arithmetic"
generator = {{ n = 200, seed = {cfg["seed"]} }}
[[rewards]]
name = "answer_match"
extract = "last_number"
[[rewards]]
name = "brevity"
max_chars = 80
weight = 0.5
[training]
max_steps = {cfg["steps"]}
per_device_train_batch_size = {cfg["batch"]}
num_generations = {cfg["generations"]}
learning_rate = {cfg["lr"]}
save_steps = 100000
seed = 42
[generation]
max_completion_length = {cfg["completion"]}
[output]
dir = "{run_dir}"
'''


def run_lowmem(cfg: dict, tmp: Path) -> list[float]:
    run_dir = tmp / "lowmem"
    r = tmp / "bench.toml"
    r.write_text(recipe(cfg, str(run_dir)))
    out = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(r), "--force"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"lowmem-r1 train failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows if "step_time" in r]


def run_plain(cfg: dict, tmp: Path) -> list[float]:
    out = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(cfg), str(tmp / "plain")],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"plain TRL script failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("STEP_TIMES ")][-1]
    return json.loads(line[len("STEP_TIMES "):])


def main() -> None:
    print(f"allocator: {allocator.for_benchmark()}", flush=True)  # the toolkit's, inherited by child processes
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=CONFIG["steps"])
    args = ap.parse_args()
    cfg = {**CONFIG, "steps": args.steps}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lowmem, plain = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            order = [("lowmem", run_lowmem), ("plain", run_plain)]
            if i % 2:
                order.reverse()
            for name, fn in order:
                times = fn(cfg, Path(d))[1:]  # drop the warm-up step
                (lowmem if name == "lowmem" else plain).extend(times)
                print(f"round {i + 1} {name:7s} median step {statistics.median(times):.3f} s", flush=True)
    a, b = statistics.median(lowmem), statistics.median(plain)
    print(f"lowmem-r1 train: median step {a:.3f} s over {len(lowmem)} steps")
    print(f"plain TRL      : median step {b:.3f} s over {len(plain)} steps")
    print(f"ratio lowmem-r1 / plain TRL = {a / b:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
