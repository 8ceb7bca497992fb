"""LoRA adapter + 16-bit base checkpoint -> merged safetensors, streamed one tensor at a time.

Each base shard is read a few rows at a time, the LoRA delta `B @ A * scaling` is added in float32 where
the adapter targets that weight, and the rows are written straight into the output shard. Peak memory is
one chunk, not one model, so a 3B merge fits in modest RAM. The adapter's own settings are read the way
peft reads them (`get_pattern_key` for alpha_pattern; scaling and delta as LoraLayer computes them), and
the result is checked against peft's merge_and_unload (parity.py).

Unsloth backend: the same streaming merge is used. Unsloth's `save_pretrained_merged(..., "merged_16bit")`
computes the same W + B@A*s onto the 16-bit weights (it also reloads them from disk when trained in
4-bit), but it needs the model loaded in memory (a GPU session) and on CPU it is plain peft anyway.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lowmem_r1.core.errors import UserError
from lowmem_r1.export.safetensors_io import (
    TORCH_TO_ST,
    ShardWriter,
    checkpoint_shards,
    file_order,
    iter_entries,
    one_torch_thread,
    read_header,
)

# Files of a model folder that are copied as they are (tokenizer, chat template, generation settings).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
# Settings whose merge this streaming path does not implement.
UNSUPPORTED = {
    "use_dora": "DoRA adapters (merge them with peft's merge_and_unload)",
    "lora_bias": "LoRA bias terms",
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "layer_replication": "layer replication",
}
CHUNK_BYTES = 16 << 20  # rows of a tensor read, merged and written at a time


# --------------------------------------------------------------------------------------------------
# the adapter


class Delta(NamedTuple):
    """One LoRA pair for one base weight: delta = B @ A * scaling, transposed for embeddings and
    fan_in_fan_out layers (peft's get_delta_weight, computed a few rows at a time)."""
    a: torch.Tensor  # noqa: F821
    b: torch.Tensor  # noqa: F821
    scaling: float
    transpose: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[1], self.b.shape[0]) if self.transpose else (self.b.shape[0], self.a.shape[1])

    def rows(self, r0: int = 0, r1: int | None = None):
        """Rows r0:r1 of the delta in float32, in peft's order of operations (product, then scale)."""
        if self.transpose:  # delta = (B @ A).T: its rows are columns of A
            return (self.b.float() @ self.a[:, r0:r1].float()).T * self.scaling
        return (self.b[r0:r1].float() @ self.a.float()) * self.scaling


@dataclass
class Lora:
    """Deltas keyed by the base checkpoint's tensor name; full replacements from modules_to_save."""
    deltas: dict[str, Delta] = field(default_factory=dict)
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # noqa: F821
    config: dict = field(default_factory=dict)


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """As peft's LoraLayer.update_layer sets it: alpha / sqrt(r) with rsLoRA, alpha / r otherwise."""
    return alpha / (r ** 0.5) if rslora else alpha / r


def module_alpha(cfg: dict, module: str) -> float:
    """lora_alpha of one module: its alpha_pattern entry, matched by peft's own rule (get_pattern_key, as
    LoraModel._create_and_replace does), else lora_alpha. peft (which loads transformers: ~4 s, ~180 MB)
    is imported only when there is a pattern to match."""
    default = cfg.get("lora_alpha", 8)
    patterns = cfg.get("alpha_pattern") or {}
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(patterns.keys(), module), default)


def read_adapter(adapter_dir: Path) -> Lora:
    """adapter_config.json + adapter_model.safetensors -> a Lora, refusing what cannot be merged here."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    lora = Lora(config=cfg)
    pairs = _split_tensors(load_file(str(weights)), lora, weights)  # adapters are small; fine to hold
    for module, p in pairs.items():
        embedding = "lora_embedding_A" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if embedding else (p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None:
            raise UserError(f"{weights}: {module} has only one of its LoRA A/B matrices; the adapter is damaged")
        scaling = lora_scaling(module_alpha(cfg, module), a.shape[0], bool(cfg.get("use_rslora")))
        # Embedding LoRA is stored as A (r, vocab), B (dim, r): delta = (B @ A).T, like fan_in_fan_out.
        lora.deltas[f"{module}.weight"] = Delta(a, b, scaling, embedding or bool(cfg.get("fan_in_fan_out")))
    if not lora.deltas and not lora.replace:
        raise UserError(f"{weights}: no LoRA weights found")
    return lora


def read_adapter_config(adapter_dir: Path) -> dict:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; not a LoRA adapter folder")
    cfg = json.loads(cfg_file.read_text())
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter_dir}: adapter_model.safetensors is missing; the adapter was not saved completely")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise UserError(f"{cfg_file}: {key} is set; merging {what} is not supported here")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{cfg_file}: bias={cfg['bias']!r}; only adapters trained with bias='none' can be merged")
    return cfg


def _split_tensors(tensors: dict, lora: Lora, weights: Path) -> dict[str, dict]:
    """LoRA A/B pairs by module name; modules_to_save weights go straight into lora.replace."""
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.")
        m = re.match(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_magnitude_vector" in name:
            raise UserError(f"{weights}: holds DoRA magnitudes; DoRA merge is not supported here")
        else:  # modules_to_save: peft stores the full trained weight under the module's own name
            lora.replace[name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")] = t
    return pairs


# --------------------------------------------------------------------------------------------------
# the merge


@dataclass
class MergeReport:
    out: Path
    dtype: str
    tensors: int
    merged: int
    seconds: float
    bytes: int


def merge_weights(base_dir: Path, lora: Lora, out_dir: Path, dtype: str,
                  log: Callable[[str], None] = lambda s: None) -> MergeReport:
    """Stream every base shard into out_dir with the LoRA deltas applied; floating tensors in `dtype`."""
    t0 = time.perf_counter()
    shards = checkpoint_shards(base_dir)
    headers = {s: read_header(s)[0] for s in shards}
    _check_targets(base_dir, lora, {n for h in headers.values() for n in h})
    weight_map, total, merged, count = {}, 0, 0, 0
    with one_torch_thread():
        for shard in shards:
            plan = _shard_plan(headers[shard], lora, dtype)
            total += _write_shard(shard, out_dir / shard.name, plan, lora, dtype)
            merged += sum(name in lora.deltas for name, _, _ in plan)
            count += len(plan)
            weight_map.update({name: shard.name for name, _, _ in plan})
            log(f"  {shard.name}: {len(plan)} tensors")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if merged != len(lora.deltas):
        raise RuntimeError(f"merged {merged} of {len(lora.deltas)} LoRA deltas")
    return MergeReport(out_dir, dtype, count, merged, time.perf_counter() - t0, total)


def _check_targets(base_dir: Path, lora: Lora, names: set[str]) -> None:
    cfg = json.loads((base_dir / "config.json").read_text())
    for name in list(lora.deltas) + list(lora.replace):
        if name not in names:
            tied = cfg.get("tie_word_embeddings") and name == "lm_head.weight"
            raise UserError(
                f"adapter targets {name}, which the base checkpoint {base_dir} does not have"
                + (" (its output layer is tied to the embeddings)" if tied else "")
                + "; is --base the model this adapter was trained on?"
            )


def _shard_plan(header: dict, lora: Lora, dtype: str) -> list[tuple[str, str, list[int]]]:
    """(name, safetensors dtype, shape) of every output tensor, in the shard's file order; floating
    tensors become `dtype`, a modules_to_save weight takes its replacement's shape."""
    plan = []
    for name, entry in file_order(header):
        shape = entry["shape"]
        if name in lora.replace:
            shape = list(lora.replace[name].shape)
        elif name in lora.deltas and tuple(shape) != lora.deltas[name].shape:
            raise UserError(
                f"adapter delta for {name} has shape {lora.deltas[name].shape} but the base weight "
                f"is {tuple(shape)}; the adapter was trained on a different base model - pass the right one "
                "with --base"
            )
        floating = entry["dtype"] in ("F32", "F16", "BF16", "F64")
        plan.append((name, TORCH_TO_ST[dtype] if floating else entry["dtype"], shape))
    return plan


def _write_shard(shard: Path, out: Path, plan: list, lora: Lora, dtype: str) -> int:
    """One output shard, in row chunks: memory stays at CHUNK_BYTES whatever the tensor's size."""
    import torch

    target = getattr(torch, dtype)
    writer = ShardWriter(out, plan)
    try:
        for name, entry, read in iter_entries(shard):
            if name in lora.replace:
                t = lora.replace[name]
                writer.write(name, t.to(target) if t.is_floating_point() else t)
                continue
            shape = entry["shape"]
            rows = shape[0] if shape else 1
            nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
            step = max(1, CHUNK_BYTES * rows // max(nbytes, 1))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                t = read(r0, r1) if shape else read()
                if name in lora.deltas:
                    t = t.float() + lora.deltas[name].rows(r0, r1)
                writer.write(name, t.to(target) if t.is_floating_point() else t)
    except BaseException:
        writer.f.close()
        raise
    writer.close()
    return writer.total


def copy_model_files(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str) -> None:
    """config (with the new dtype), generation config, and the tokenizer + chat template. The adapter's
    copy of the tokenizer wins: training may have changed it (pad token, chat template)."""
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, out_dir / name)
