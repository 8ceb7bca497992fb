"""`lowmem-r1 merge`: a LoRA adapter merged into its base, optionally exported as GGUF (+ an Ollama Modelfile)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowmem_r1.export.command import merge as run_merge


def merge(
    target: Optional[str] = typer.Argument(
        None, help="Run directory or adapter folder (default: the newest run in runs/)."
    ),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the one the run recorded)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/merged)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32, or bfloat16 | float16 | float32 (default: the base's dtype)."),
    gguf: Optional[List[str]] = typer.Option(
        None, "--gguf", help="Also write GGUF files: f16,bf16,f32,q8_0,q4_0,q4_1,q5_0,q5_1 (pure Python); "
        "q2_k,q3_k_m,q4_k_s,q4_k_m,q5_k_s,q5_k_m,q6_k need llama-quantize on PATH. Comma-separated or repeated."
    ),
    ollama: bool = typer.Option(False, "--ollama", help="Write an Ollama Modelfile next to the GGUF."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Merge a LoRA adapter into its 16-bit base (verified against peft), optionally export GGUF + Modelfile."""
    result = run_merge(target, base=base, out=out, dtype=dtype, gguf=gguf, ollama=ollama, force=force)
    print("\n".join(result.next_steps()))
