"""GPU smoke test for maintainers: `plan --measure` of recipes/gsm8k.toml (Qwen2.5-3B-shaped config from
plan's table, random weights) on each installed backend, on any CUDA machine, offline. Writes one JSON:
per backend the estimate term by term, the measured peak (device and torch.cuda.max_memory_reserved), step
times, completion lengths; and the versions of everything involved.

    python scripts/gpu_smoke.py [--out gpu_smoke.json] [--backends hf,unsloth] [--set key=value ...]

Needs torch (CUDA build), transformers, peft, accelerate, trl, datasets and this repository (put on
sys.path, no install); bitsandbytes for 4-bit, unsloth/unsloth_zoo and vllm for the Unsloth path when
they are installed. Nothing is downloaded: the model is built from its config with random weights.

Backends: `unsloth` runs the recipe as it is (4-bit, Unsloth's shared vLLM engine, standby); `hf` runs
the closest combination the hf backend accepts (4-bit with transformers generate(): 4-bit + vLLM is
refused on hf). Each backend runs in its own process (unsloth must be imported first; peaks are per run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RECIPE = REPO / "recipes" / "gsm8k.toml"
VERSIONS = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth",
            "unsloth_zoo", "vllm", "xformers", "triton")


def backend_overrides(name: str) -> list[str]:
    has = importlib.util.find_spec
    if name == "unsloth":
        out = ["model.backend=unsloth"]
        if has("vllm") is None:
            out += ["model.fast_inference=false", "generation.use_vllm=false", "model.vllm_standby=false"]
        return out
    out = ["model.backend=hf", "model.fast_inference=false", "generation.use_vllm=false", "model.vllm_standby=false"]
    if has("bitsandbytes") is None:
        out += ["model.load_in_4bit=false", "training.optim=adamw_torch"]
    return out


def one(name: str, extra: list[str], out: Path) -> None:
    """Child process: plan + measure for one backend, as JSON."""
    from lowmem_r1.config.recipe import load_recipe
    from lowmem_r1.preflight.plan import GiB, make_plan
    from lowmem_r1.training.measure import comparison, measure_recipe

    overrides = backend_overrides(name) + extra
    recipe = load_recipe(RECIPE, overrides)
    plan = make_plan(recipe, search=False)
    started = time.time()
    m = measure_recipe(recipe)
    out.write_text(json.dumps({
        "backend": m.backend, "overrides": overrides, "seconds": round(time.time() - started, 1),
        "estimate_gib": {t.what: round(t.bytes / GiB, 3) for t in plan.rows} | {"peak": round(plan.total / GiB, 3)},
        "measured_gib": {"device_peak": round(m.peak / GiB, 3), "before_load": round(m.runtime / GiB, 3),
                         "weights_lora_loaded": round(m.loaded / GiB, 3),
                         "torch_max_reserved": round((m.torch_reserved or 0) / GiB, 3)},
        "comparison_gib": [[w, round(e, 3), None if g is None else round(g, 3)] for w, e, g in comparison(plan, m)],
        "step_seconds": m.step_seconds, "completion_lengths": m.completion_tokens,
    }, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_smoke.json")
    ap.add_argument("--backends", default="hf,unsloth")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra recipe override")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--one-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.extra, Path(args.one_out))
        return 0
    try:
        import torch
    except ImportError:
        print("gpu_smoke: torch is not installed; install your CUDA build of torch 2.13 first", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here (this script measures a GPU run); run it on a CUDA machine",
              file=sys.stderr)
        return 2
    from lowmem_r1.preflight.doctor import version_of

    result = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2),
        "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "versions": {p: version_of(p) for p in VERSIONS}, "runs": {}, "errors": {},
    }
    for name in args.backends.split(","):
        if name == "unsloth" and importlib.util.find_spec("unsloth") is None:
            result["errors"][name] = "unsloth is not installed"
            continue
        part = Path(f"{args.out}.{name}.part")
        cmd = [sys.executable, __file__, "--one", name, "--one-out", str(part)] + [f"--set={e}" for e in args.extra]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0 and part.is_file():
            result["runs"][name] = json.loads(part.read_text())
            part.unlink()
        else:
            result["errors"][name] = (done.stdout[-2000:] + done.stderr[-4000:]).strip()
        print(f"gpu_smoke: {name}: {'ok' if name in result['runs'] else 'FAILED'}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"gpu_smoke: wrote {args.out}")
    return 0 if result["runs"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
