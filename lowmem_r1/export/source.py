"""What to merge: the adapter (a run directory's, or an adapter folder), the 16-bit base it goes onto,
and where the result goes by default. Run directories and adapter folders are read through
rundir.find_trained (the resolver chat and eval share), model names
through models.resolve_model: this module only decides which of them a merge uses.

Always onto the base as stored on disk (16/32-bit), never onto a dequantized 4-bit copy: a run trained
with `load_in_4bit` learned its adapter against NF4 weights, but the adapter is a correction to the
*real* weights, and merging into rounded 4-bit weights would bake the rounding in. A checkpoint that is
itself pre-quantized (bnb-4bit hub repos) is refused with the name of the 16-bit original to use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.models.names import is_hub_id, resolve_model
from lowmem_r1.runs.rundir import find_trained, newest_run

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class MergeSource:
    adapter: Path
    base: str  # a local folder or a hub id
    run_dir: Path | None = None
    backend: str = "hf"
    load_in_4bit: bool = False
    default_out: Path = field(default_factory=Path)

    def export_name(self) -> str:
        """general.name of the GGUF files: the base's name, plus the run's."""
        return Path(str(self.base)).name + (f"-{self.run_dir.name}" if self.run_dir else "")


def resolve_source(target: str | Path | None = None, base: str | None = None) -> MergeSource:
    """A run directory (its final adapter, or its newest checkpoint) or an adapter folder; no target:
    the newest run in runs/. --base overrides the base model recorded with the adapter."""
    path = Path(target) if target else newest_run()
    if not path.exists():
        raise UserError(f"{path}: no such run directory or adapter folder")
    found = find_trained(path)
    if found is None:
        raise UserError(f"{path}: neither a run directory (run.json) nor an adapter folder (adapter_config.json); "
                        "point at runs/<name> or at a folder holding adapter_config.json")
    if not (base or found.base):
        raise UserError(f"{path}/adapter_config.json: no base_model_name_or_path; pass --base MODEL")
    out = path / "merged" if found.run_dir else path.with_name(path.name + "-merged")
    return MergeSource(found.adapter, resolve_model(base or found.base), found.run_dir, found.backend,
                       found.load_in_4bit, out)


def use_16bit_original(src: MergeSource, log: Callable[[str], None]) -> None:
    """A run that loaded a pre-quantized hub repo (NAME-bnb-4bit) is merged into its 16-bit original NAME."""
    m = re.match(r"(.+?)-(unsloth-)?bnb-4bit$", src.base)
    if m and is_hub_id(src.base):
        log(f"{src.base} is stored in 4-bit; merging into its 16-bit original {m.group(1)}")
        src.base = m.group(1)


def local_model_dir(base: str) -> Path:
    """A local folder for `base`; a hub id is downloaded (weights, config, tokenizer only)."""
    if Path(base).is_dir():
        return Path(base)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt",
                                                            "tokenizer.model"]))
    except Exception as e:
        raise UserError(f"base {base}: cannot download ({type(e).__name__}: {e}); "
                        "download it once with network, or pass a local folder with --base") from None


def check_base(base_dir: Path) -> dict:
    """config.json of the base, refusing a pre-quantized checkpoint (the merge must be onto 16-bit)."""
    cfg_file = base_dir / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{base_dir}: no config.json; pass a Hugging Face model folder with --base")
    cfg = json.loads(cfg_file.read_text())
    q = cfg.get("quantization_config")
    if q:
        hint = re.sub(r"[-_](bnb|unsloth-bnb)[-_]4bit$", "", base_dir.name)
        raise UserError(f"{cfg_file}: the base is stored quantized ({q.get('quant_method', '?')}); merging into "
                        f"it would bake the 4-bit rounding in. Pass its 16-bit original with --base "
                        f"(for unsloth/*-bnb-4bit repos, the same name without -bnb-4bit, e.g. {hint})")
    return cfg


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES and dtype not in DTYPES.values():
        raise UserError(f"--dtype {dtype}: unknown; use one of {', '.join(DTYPES)}")


def default_dtype(cfg: dict) -> str:
    """The base's own dtype (merging never changes precision unless asked)."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES.values() else "float32"


def target_dtype(dtype: str | None, cfg: dict) -> str:
    """--dtype as a torch dtype name (bf16 -> bfloat16), else the base's own."""
    return DTYPES.get(dtype, dtype) if dtype else default_dtype(cfg)
