"""Step time of the demo with 1 and with 2 processes (torchrun, gloo), same global batch.

Both runs go through lowmem-r1's own `train()` (the code `lowmem-r1 train --nproc N` runs), with the demo recipe
shrunk to a few steps; the 2-process run gives each process half the per-device batch, so every step trains on
the same number of completions. Reported: the median of TRL's per-step `step_time` (first step dropped, it
warms up), their ratio 2-proc / 1-proc, and the share of a 2-process step spent in DDP's gradient
all-reduce (timed with a DDP communication hook that all-reduces synchronously - on gloo/CPU DDP barely
overlaps it with the backward pass anyway - and divided by the step time; TRL's own gathers of rewards and
completions are not counted).

On a 2-core machine this mostly shows the overhead of the distributed path (two processes share the same two
cores: no speed-up is possible), not the scaling one would see with a GPU per process.

    python scripts/bench_scaling.py [--steps 5] [--batch 16] [--completion 16] [--threads N]

Last line: step_time_ratio_2p_over_1p=<x> allreduce_share=<y>
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

DEMO = REPO / "recipes" / "demo.toml"

WORKER = r'''
import json, sys, time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.training.run import Start, train

out, overrides = Path(sys.argv[1]), sys.argv[2:]
spent = [0.0]


def timed_allreduce(state, bucket):
    """DDP's gradient all-reduce (sum / world size), timed; synchronous so that the time is its own."""
    tensor = bucket.buffer()
    start = time.perf_counter()
    dist.all_reduce(tensor)
    tensor.div_(dist.get_world_size())
    spent[0] += time.perf_counter() - start
    fut = torch.futures.Future()
    fut.set_result(tensor)
    return fut


init = DistributedDataParallel.__init__
def patched(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.register_comm_hook(None, timed_allreduce)
DistributedDataParallel.__init__ = patched


class Measure:
    def __init__(self):
        self.rows = []
    def __getattr__(self, name):
        return lambda *a, **k: None
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "step_time" in logs:
            self.rows.append({"step": state.global_step, "step_time": float(logs["step_time"]), "allreduce": spent[0]})
            spent[0] = 0.0
    def on_train_end(self, args, state, control, **kwargs):
        if args.process_index == 0:
            out.write_text(json.dumps(self.rows))


measure = Measure()
recipe = load_recipe(overrides[0], overrides[1:])
sys.exit(train(recipe, None, Start.new(recipe, force=True), callbacks=(measure,)))
'''


def run(nproc: int, steps: int, batch: int, completion: int, tmp: Path, threads: int | None = None) -> list[dict]:
    out = tmp / f"measure-{nproc}.json"
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    overrides = [str(DEMO), f"training.max_steps={steps}", f"training.per_device_train_batch_size={batch // nproc}",
                 "training.num_generations=4", f"generation.max_completion_length={completion}", "training.save_steps=1000",
                 f"output.dir={tmp / f'run-{nproc}'}", "logging.sample_every=0"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    # Default: the same cores in both runs (each of 2 processes half of them, one process all). On a shared,
    # loaded machine several threads per process wait on each other; --threads 1 gives every process one.
    env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 2) // nproc))
    done = subprocess.run([*launcher, str(worker), str(out), *overrides], env=env, cwd=tmp, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"{nproc}-process run failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    print(f"allocator: {allocator.for_benchmark()}", flush=True)  # the toolkit's, inherited by child processes
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="completions per step, over all processes")
    parser.add_argument("--completion", type=int, default=16, help="max tokens per completion")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        one = run(1, a.steps, a.batch, a.completion, Path(d), a.threads)
        two = run(2, a.steps, a.batch, a.completion, Path(d), a.threads)
    t1 = statistics.median(r["step_time"] for r in one[1:])
    t2 = statistics.median(r["step_time"] for r in two[1:])
    share = statistics.median(r["allreduce"] / r["step_time"] for r in two[1:])
    print(f"global batch {a.batch} completions of up to {a.completion} tokens, {a.steps} steps (first dropped), "
          f"threads per process {a.threads or 'cores / processes'}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"1 process:   median step {t1:.2f} s")
    print(f"2 processes: median step {t2:.2f} s, of which DDP all-reduce "
          f"{statistics.median(r['allreduce'] for r in two[1:]):.3f} s")
    print(f"step_time_ratio_2p_over_1p={t2 / t1:.3f} allreduce_share={share:.4f}")


if __name__ == "__main__":
    main()
