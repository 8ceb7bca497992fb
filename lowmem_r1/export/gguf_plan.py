"""What goes into a GGUF file: the types a user can ask for, the model's shape, and the tensor plan -
each tensor's GGUF name, shape, ggml type and where its bytes are - made from the safetensors headers
alone, before anything is written.

The layout is the one llama.cpp's convert_hf_to_gguf.py writes for llama, qwen2 and qwen3: tensor names
from gguf's TensorNameMap; an output layer tied to the embeddings is not written; llama only: q_proj and
k_proj rows permuted to llama.cpp's rotary layout; 1-D tensors and norms stay F32, everything else in
the file type, falling back to F16 for rows that do not divide into quantization blocks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.export.safetensors_io import checkpoint_shards, file_order, read_header

# Written in pure Python (gguf's quantizers reproduce ggml's reference rounding for these).
PURE_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0",
              "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}
# Made by llama.cpp's llama-quantize from the F16 file.
LLAMA_QUANTIZE_TYPES = {"q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S",
                        "q6_k": "Q6_K", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}
BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5, "q5_0": 5.5, "q5_1": 6,
        "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q4_k_m": 4.9, "q4_k_s": 4.6, "q3_k_m": 3.9, "q2_k": 3.4}

ARCHS = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA",
         "Qwen2ForCausalLM": "QWEN2", "Qwen3ForCausalLM": "QWEN3"}


def parse_types(spec: list[str] | str | None) -> list[str]:
    """`--gguf f16,q8_0` -> ["f16", "q8_0"]; unknown types and k-quants without llama-quantize fail here,
    before any work is done."""
    if not spec:
        return []
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    types = [t.strip().lower() for item in items for t in str(item).split(",") if t.strip()]
    for t in types:
        if t not in PURE_TYPES and t not in LLAMA_QUANTIZE_TYPES:
            raise UserError(f"--gguf {t}: unknown GGUF type; use {', '.join(PURE_TYPES)} "
                            f"or, with llama.cpp's llama-quantize on PATH, {', '.join(LLAMA_QUANTIZE_TYPES)}")
        if t in LLAMA_QUANTIZE_TYPES and llama_quantize() is None:
            raise UserError(
                f"--gguf {t}: k-quants are made by llama.cpp's `llama-quantize`, which is not on PATH. Install "
                "llama.cpp (e.g. `brew install llama.cpp`, a release from github.com/ggml-org/llama.cpp/releases, "
                "or build it: cmake -B build && cmake --build build -t llama-quantize) and put llama-quantize "
                f"on PATH (or set LLAMA_QUANTIZE=/path/to/llama-quantize); or pick a pure-Python type: "
                f"{', '.join(PURE_TYPES)}")
    return list(dict.fromkeys(types))


def llama_quantize() -> str | None:
    return os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")


def estimate_size(model_bytes: int, dtype: str, qtype: str) -> int:
    """Rough GGUF size from the merged model's size, for the free-space check."""
    per = {"float32": 32, "bfloat16": 16, "float16": 16}[dtype]
    return int(model_bytes * BITS[qtype] / per) + (16 << 20)


@dataclass(frozen=True)
class ModelSpec:
    """The parts of config.json the layout depends on."""
    hf_arch: str
    arch: str  # gguf.MODEL_ARCH member name: LLAMA, QWEN2, QWEN3
    n_layers: int
    n_head: int
    n_kv: int
    head_dim: int
    tied: bool

    @property
    def is_llama(self) -> bool:
        return self.arch == "LLAMA"


def read_spec(model_dir: Path) -> tuple[dict, ModelSpec]:
    """(config.json, its ModelSpec), refusing an architecture this exporter does not lay out."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hf_arch = (cfg.get("architectures") or ["?"])[0]
    if hf_arch not in ARCHS:
        raise UserError(f"{model_dir}/config.json: architecture {hf_arch}; GGUF export supports "
                        f"{', '.join(sorted(set(ARCHS)))}")
    n_head = cfg["num_attention_heads"]
    return cfg, ModelSpec(hf_arch, ARCHS[hf_arch], cfg["num_hidden_layers"], n_head,
                          cfg.get("num_key_value_heads", n_head), cfg.get("head_dim") or cfg["hidden_size"] // n_head,
                          bool(cfg.get("tie_word_embeddings", False)))


@dataclass
class PlannedTensor:
    """One tensor of the GGUF file: from a checkpoint shard (shard, hf_name, entry) or computed (data)."""
    name: str  # GGUF name
    shape: list[int]
    ttype: object  # gguf.GGMLQuantizationType
    shard: Path | None = None
    hf_name: str | None = None
    entry: dict | None = None  # its safetensors header entry
    data: object = None  # a torch tensor, for tensors made here (rope_freqs)
    permute_heads: int | None = None  # llama q/k: rows permuted to GGML's rotary layout, this many heads


@dataclass
class TensorPlan:
    tensors: list[PlannedTensor] = field(default_factory=list)  # computed ones first, then file order
    starts: dict[Path, int] = field(default_factory=dict)  # shard -> byte offset of its data
    n_params: int = 0

    def types(self) -> dict[str, str]:
        """GGUF name -> ggml type name: what the read-back check expects."""
        return {t.name: t.ttype.name for t in self.tensors}

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.ttype.name for t in self.tensors))


def tensor_type(gguf, gname: str, shape: list[int], qtype: str):
    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return T.F32
    want = getattr(T, PURE_TYPES[qtype])
    block = gguf.GGML_QUANT_SIZES[want][0]
    if shape[-1] % block != 0:
        return T.F16  # llama.cpp falls back the same way
    return want


def plan_tensors(gguf, model_dir: Path, spec: ModelSpec, qtype: str, extra: list) -> TensorPlan:
    """Every tensor of the file, from the shard headers (no tensor data read); `extra` are the
    (gguf name, tensor) pairs computed from the config, written first."""
    tname = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.arch), spec.n_layers)
    plan = TensorPlan()
    for gname, t in extra:
        plan.tensors.append(PlannedTensor(gname, list(t.shape), gguf.GGMLQuantizationType.F32, data=t))
    for shard in checkpoint_shards(model_dir):
        header, plan.starts[shard] = read_header(shard)
        for hf_name, entry in file_order(header):
            if hf_name.endswith("rotary_emb.inv_freq") or (spec.tied and hf_name == "lm_head.weight"):
                continue
            gname = tname.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UserError(f"{shard.name}: tensor {hf_name} has no GGUF name for {spec.hf_arch}; not exportable")
            shape = entry["shape"]
            plan.tensors.append(PlannedTensor(gname, shape, tensor_type(gguf, gname, shape, qtype), shard, hf_name,
                                              entry, permute_heads=_permute_heads(spec, hf_name)))
            plan.n_params += math.prod(shape)
    return plan


def _permute_heads(spec: ModelSpec, hf_name: str) -> int | None:
    """HF stores the two rotary halves of llama's q/k apart, GGML interleaves them (qwen needs nothing)."""
    if spec.is_llama and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return spec.n_head
    if spec.is_llama and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return spec.n_kv
    return None


def announce(writer, gguf, plan: TensorPlan) -> None:
    """Each tensor's name, shape and type into the writer's tensor-info table."""
    import numpy as np

    T = gguf.GGMLQuantizationType
    for t in plan.tensors:
        if t.ttype == T.F32:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), 4 * math.prod(t.shape))
        elif t.ttype == T.F16:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float16), 2 * math.prod(t.shape))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.ttype)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t.ttype)
