"""Benchmark `lowmem-r1 merge` and the GGUF export on the embedded SmolLM2-135M.

Each measurement runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Reported:
- merge time and peak RSS, as ratios to the model's size on disk, to its 16-bit size, and to a plain
  `torch.load` + `torch.save` of the same weights measured in the same run;
- GGUF F16 export time as a ratio to a plain safetensors copy (load_file + save_file) of the same tensors,
  each with its library imported beforehand (a "cold" row also times gguf's own import, ~0.1 s).
Goals: merge peak RSS <= 1.5x the 16-bit model size; GGUF F16 no slower than 2x the copy.
Peak RSS (VmHWM) includes the interpreter with torch imported; "above imports" subtracts that floor.
BENCH_THREADS=1 pins torch to one thread in every case (useful on a busy shared machine).

    python scripts/bench_export.py [--repeat 2] [--json out.json] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Every child: import what it needs, note RSS, do the work, print time and peak RSS as JSON.
CHILD = textwrap.dedent("""
    import json, os, sys, time, psutil
    import torch
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    {imports}
    floor = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    {work}
    secs = time.perf_counter() - t0
    # VmHWM is this process's own high-water mark (ru_maxrss would carry the parent's over fork+exec)
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    print(json.dumps({{"seconds": secs, "peak_rss": peak, "floor_rss": floor}}))
""")

CASES = {
    "torch.load+save (fp32)": ("", "sd = torch.load(A['pt'], weights_only=True); torch.save(sd, A['out'] + '.pt')"),
    "safetensors copy (fp32)": (
        "from safetensors.torch import load_file, save_file",
        "save_file(load_file(A['st']), A['out'] + '.safetensors', metadata={'format': 'pt'})"),
    "merge fp32 (stream)": (
        "from lowmem_r1.export.merge_lora import merge_weights, read_adapter; from pathlib import Path",
        "Path(A['out']).mkdir(); merge_weights(Path(A['base']), read_adapter(Path(A['adapter'])), Path(A['out']), 'float32')"),
    "merge bf16 (stream)": (
        "from lowmem_r1.export.merge_lora import merge_weights, read_adapter; from pathlib import Path",
        "Path(A['out']).mkdir(); merge_weights(Path(A['base']), read_adapter(Path(A['adapter'])), Path(A['out']), 'bfloat16')"),
    "merge bf16 + parity check": (
        "from lowmem_r1.export.command import merge",
        "merge(A['run'], out=A['out'], dtype='bf16', log=lambda s: None)"),
    # gguf and tokenizers imported up front, as safetensors is for the copy: both time the work alone
    "GGUF F16 export": (
        "import gguf, tokenizers; from lowmem_r1.export.gguf import export; from pathlib import Path",
        "export(Path(A['base']), Path(A['out'] + '.gguf'), 'f16', verify=False, log=lambda s: None)"),
    "GGUF F16 export, cold": (  # the same, with `import gguf` (~0.1 s, once per process) inside the timing
        "from lowmem_r1.export.gguf import export; from pathlib import Path",
        "export(Path(A['base']), Path(A['out'] + '.gguf'), 'f16', verify=False, log=lambda s: None)"),
    "GGUF Q8_0 export": (
        "import gguf, tokenizers; from lowmem_r1.export.gguf import export; from pathlib import Path",
        "export(Path(A['base']), Path(A['out'] + '.gguf'), 'q8_0', verify=False, log=lambda s: None)"),
}


def make_adapter(base: Path, run: Path) -> None:
    """A random non-zero LoRA (r=16, all linear layers) in a run directory, like a trained one."""
    code = textwrap.dedent(f"""
        import json, torch
        from pathlib import Path
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.manual_seed(0)
        run = Path({str(run)!r}); base = {str(base)!r}
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=16, lora_alpha=32,
            target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n: p.mul_(0.02)
        m.save_pretrained(run / "adapter"); AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")
        (run / "run.json").write_text(json.dumps({{"base_model": base, "model_name": base, "backend": "hf"}}))
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def run_case(name: str, args: dict) -> dict:
    imports, work = CASES[name]
    code = CHILD.format(imports=f"A = {args!r}\n" + imports, work=work)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is kept")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct",
                    help="a model name or folder with one model.safetensors (default: the embedded model)")
    opts = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from lowmem_r1.models.names import resolve_model

    base = Path(resolve_model(opts.model))
    disk = (base / "model.safetensors").stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sd = load_file(str(base / "model.safetensors"))
        n_params = sum(t.numel() for t in sd.values())
        torch.save(sd, tmp / "weights.pt")
        del sd
        size16 = 2 * n_params
        make_adapter(base, tmp / "run")
        results = {}
        for name in CASES:
            best = None
            for i in range(opts.repeat):
                out = tmp / f"out-{len(results)}-{i}"
                r = run_case(name, {"pt": str(tmp / "weights.pt"), "st": str(base / "model.safetensors"),
                                    "base": str(base), "adapter": str(tmp / "run" / "adapter"),
                                    "run": str(tmp / "run"), "out": str(out)})
                best = r if best is None or r["seconds"] < best["seconds"] else best
                subprocess.run(["rm", "-rf", str(out), f"{out}.pt", f"{out}.safetensors", f"{out}.gguf"], check=True)
            results[name] = best

    base_t = results["torch.load+save (fp32)"]
    copy_t = results["safetensors copy (fp32)"]
    print(f"{opts.model}: {n_params / 1e6:.1f}M params, {disk / 1e6:.0f} MB on disk (fp32), "
          f"16-bit size {size16 / 1e6:.0f} MB; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"best of {opts.repeat}")
    print(f"{'case':28} {'time s':>7} {'x load+save':>11} {'x st copy':>9} {'peak RSS MB':>11} "
          f"{'x 16-bit':>8} {'x disk':>6} {'above imports MB':>16} {'x 16-bit':>8}")
    for name, r in results.items():
        above = r["peak_rss"] - r["floor_rss"]
        print(f"{name:28} {r['seconds']:7.2f} {r['seconds'] / base_t['seconds']:11.2f} "
              f"{r['seconds'] / copy_t['seconds']:9.2f} {r['peak_rss'] / 1e6:11.0f} {r['peak_rss'] / size16:8.2f} "
              f"{r['peak_rss'] / disk:6.2f} {above / 1e6:16.0f} {above / size16:8.2f}")
        r.update(ratio_time_load_save=r["seconds"] / base_t["seconds"], ratio_time_copy=r["seconds"] / copy_t["seconds"],
                 ratio_rss_16bit=r["peak_rss"] / size16, ratio_rss_disk=r["peak_rss"] / disk)
    merge_rss = results["merge bf16 (stream)"]["peak_rss"] / size16
    gguf_ratio = results["GGUF F16 export"]["seconds"] / copy_t["seconds"]
    print(f"goal merge peak RSS <= 1.5x 16-bit size: {merge_rss:.2f}x -> {'met' if merge_rss <= 1.5 else 'NOT met'}")
    cold_ratio = results["GGUF F16 export, cold"]["seconds"] / copy_t["seconds"]
    print(f"goal GGUF F16 export <= 2x safetensors copy: {gguf_ratio:.2f}x -> {'met' if gguf_ratio <= 2 else 'NOT met'}"
          f" ({cold_ratio:.2f}x counting gguf's import)")
    if opts.json:
        opts.json.write_text(json.dumps({"n_params": n_params, "disk_bytes": disk, "size16_bytes": size16,
                                         "cases": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
