"""Merged Hugging Face folder -> GGUF, in pure Python (the `gguf` package), then read back and checked.

No compiler, no network: llama.cpp's own converter needs a checkout of llama.cpp, and Unsloth's
`save_pretrained_gguf` builds llama.cpp at run time. This file writes the same layout that llama.cpp's
convert_hf_to_gguf.py writes for the llama, qwen2 and qwen3 architectures:

- tensor names from gguf's TensorNameMap; an output layer tied to the embeddings is not written;
- llama only: q_proj/k_proj rows permuted to llama.cpp's rotary layout (HF stores the two rotary
  halves apart, GGML interleaves them); qwen2 has q/k/v biases; qwen3 has q_norm/k_norm;
- 1-D tensors and norms stay F32; everything else in the file type, falling back to F16 for rows that
  do not divide into quantization blocks (as llama.cpp does);
- metadata: architecture hyperparameters, general.size_label, key/value length, file type, and the
  tokenizer (BPE vocab, merges, token types, special ids, add_bos/add_eos, pre-tokenizer id, the chat
  template - transformers 5 keeps it in chat_template.jinja).

Tensors stream: the header is written from the shapes alone, then each tensor is converted a few rows
at a time from the memory-mapped shard and appended (see _pieces), so memory stays at one chunk. k-quants (q4_k_m, ...) come from llama.cpp's `llama-quantize`
applied to the F16 file, only when it is on PATH.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import mmap
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path

from .errors import UserError

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

# llama.cpp names the BPE pre-tokenizer by hashing the token ids of this text (its
# convert_hf_to_gguf_update.py); the hashes of the tokenizers this toolkit trains are listed here.
_CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


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


# --------------------------------------------------------------------------------------------------
# layout


def _permute(w, n_head: int):
    """HF rotary layout -> GGML's: within each head, interleave the two halves of the rotary dims."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(gguf, gname: str, shape: list[int], qtype: str):
    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return T.F32
    want = getattr(T, PURE_TYPES[qtype])
    block = gguf.GGML_QUANT_SIZES[want][0]
    if shape[-1] % block != 0:
        return T.F16  # llama.cpp falls back the same way
    return want


# Source bytes converted per piece: small enough that a chunk is still in the CPU cache between being
# read, converted and written (SmolLM2's 538 MB to F16: 0.15 s, against 0.26 s a whole tensor at a time).
CHUNK_BYTES = 4 << 20


def _to_ggml(gguf, src, ttype, buffers: dict):
    """Whole rows of a tensor -> a 1-D numpy byte array in ggml type `ttype`. F32/F16/BF16 go into a
    buffer reused from call to call: write the result before the next call. Rows are independent in
    every type written here (quantization blocks never cross a row), so chunks of rows give the bytes of
    converting the whole tensor at once."""
    import torch

    T = gguf.GGMLQuantizationType
    out_dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}.get(ttype)
    if out_dtype is None:
        return gguf.quants.quantize(src.to(torch.float32).numpy(), ttype)
    if src.dtype == out_dtype:
        return src.reshape(-1).view(torch.uint8).numpy()
    nbytes = src.numel() * out_dtype.itemsize
    if buffers.get("out") is None or buffers["out"].numel() < nbytes:
        buffers["out"] = torch.empty(nbytes, dtype=torch.uint8)
    out = buffers["out"][:nbytes].view(out_dtype)
    out.copy_(src.reshape(-1))  # rounds to nearest even, as numpy's astype and ggml's fp32->bf16 do
    return out.view(torch.uint8).numpy()


def _pieces(gguf, shard: Path, m, start: int, entry: dict, ttype, buffers: dict, transform=None):
    """One tensor of a memory-mapped safetensors file as ggml byte pieces, a few rows at a time (all rows
    when `transform`, the q/k permutation, needs them). The mapping is mmap'd, not read: no copy into a
    read buffer; each chunk's pages are dropped from the mapping once written (MADV_DONTNEED: the page
    cache keeps them), so resident memory stays at one chunk, not the file."""
    import torch

    from .merge import ST_DTYPES

    shape = entry["shape"]
    rows = shape[0] if shape else 1
    a, b = entry["data_offsets"]
    if start + b > len(m):
        raise UserError(f"{shard}: file ends inside tensor data; the checkpoint is truncated (merge it again)")
    row_bytes = (b - a) // max(rows, 1)
    dtype = getattr(torch, ST_DTYPES[entry["dtype"]][0])
    step = rows if transform else max(1, CHUNK_BYTES // max(row_bytes, 1))
    pos = start + a
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        src = torch.frombuffer(m, dtype=dtype, count=n * row_bytes // dtype.itemsize, offset=pos)
        src = src.reshape([n, *shape[1:]]) if shape else src.reshape(shape)
        yield _to_ggml(gguf, transform(src) if transform else src, ttype, buffers)
        del src
        if hasattr(m, "madvise"):  # not on Windows
            lo = pos - pos % mmap.PAGESIZE
            m.madvise(mmap.MADV_DONTNEED, lo, pos + n * row_bytes - lo)
        pos += n * row_bytes


def _rope_metadata(writer, gguf, cfg: dict) -> list:
    """RoPE scaling keys; llama3-type scaling becomes a rope_freqs tensor (as llama.cpp writes it)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    rtype = (rope.get("rope_type") or rope.get("type") or "default").lower()
    extra = []
    if rtype in ("default", "none"):
        pass
    elif rtype == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rtype == "llama3":
        import torch

        dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        freqs = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old = rope.get("original_max_position_embeddings", 8192)
        factors = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        extra.append(("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32)))
    else:
        raise UserError(f"config.json rope type {rtype!r}: not supported by this GGUF exporter "
                        "(default, linear, yarn, llama3 are)")
    return extra


def _special(cfg: dict, key: str):
    v = cfg.get(key)
    return v.get("content") if isinstance(v, dict) else v


@contextmanager
def _gc_paused():
    """Writing a GGUF makes ~300k small objects (tokenizer.json, the token and merge lists, a tensor view
    per chunk), which sets off Python's cyclic GC again and again, each full pass walking every object
    torch has loaded (parsing SmolLM2's tokenizer.json: 0.11 s with it, 0.03 s without). None of these
    objects form cycles; the collector runs again afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Special tokens llama.cpp has a key for (tokenizer.ggml.<type>_token_id).
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")


def _vocab(writer, gguf, model_dir: Path, cfg: dict, is_llama: bool, log) -> dict:
    """Tokens, token types, merges, special ids, add_bos/add_eos and the chat template, from
    tokenizer.json parsed once (no transformers import on this path). Not gguf's SpecialVocab: it parses
    tokenizer.json a second time, converts merges a character at a time (~0.3 s together for a 49k
    vocabulary, more than writing the model's tensors) and guesses add_bos from the post-processor
    template, where this reads what the tokenizer really does."""
    from tokenizers import Tokenizer

    vocab_size = cfg["vocab_size"]
    tok_json = model_dir / "tokenizer.json"
    text = tok_json.read_text(encoding="utf-8") if tok_json.is_file() else ""
    data = json.loads(text) if text else {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers (tokenizer.json, as "
                        "SmolLM2, Llama 3 and Qwen use); this model's tokenizer is not one")
    tok = Tokenizer.from_str(text)
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    vocab = {**model["vocab"], **{a["content"]: i for i, a in added.items()}}
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"{model_dir}: tokenizer has ids up to {max(vocab.values())} but the model's vocab_size "
                        f"is {vocab_size}; the embedding was not resized to the tokenizer")
    TT = gguf.TokenType
    tokens: list = [None] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    types = [TT.NORMAL] * vocab_size
    for i in [i for i, t in enumerate(tokens) if t is None]:
        tokens[i], types[i] = f"[PAD{i}]", TT.UNUSED
    for i, a in added.items():  # like llama.cpp: special, or looks like <|...|>, is a control token
        t = a["content"]
        types[i] = TT.CONTROL if a.get("special") or (t.startswith("<|") and t.endswith("|>")) else TT.USER_DEFINED

    chkhsh = hashlib.sha256(str(tok.encode(_CHKTXT).ids).encode()).hexdigest()
    pre = _PRE_BY_HASH.get(chkhsh)
    if pre is None:
        pre = "default"
        log(f"  warning: pre-tokenizer not recognised (hash {chkhsh[:12]}); wrote 'default' - llama.cpp may "
            "split some text differently from transformers")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tcfg_file = model_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text(encoding="utf-8")) if tcfg_file.is_file() else {}
    if is_llama and tcfg.get("add_prefix_space") is not None:  # llama.cpp's llama converter writes it
        writer.add_add_space_prefix(bool(tcfg["add_prefix_space"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = _merges(model)
    if merges:
        writer.add_token_merges(merges)
    else:
        log("  warning: tokenizer.json has no BPE merges; llama.cpp will tokenize character by character")

    # Special ids: the tokenizer's own (tokenizer_config.json), else config.json's. The tokenizer's eos is
    # the end-of-turn token of chat models, which is what generation must stop at.
    ids = {}
    for typ in SPECIAL_TYPES:
        tid = vocab.get(_special(tcfg, f"{typ}_token"))
        if tid is None and isinstance(cfg.get(f"{typ}_token_id"), int):
            tid = cfg[f"{typ}_token_id"]
        if tid is not None and 0 <= tid < vocab_size:
            ids[typ] = tid
            getattr(writer, f"add_{typ}_token_id")(tid)
    enc = tok.encode("a").ids  # whether BOS/EOS are added: what the tokenizer does, not a guess
    writer.add_add_bos_token("bos" in ids and enc[:1] == [ids["bos"]])
    writer.add_add_eos_token("eos" in ids and enc[-1:] == [ids["eos"]])

    template = _chat_template(model_dir, tcfg)
    if template is None:
        log("  warning: no chat template found; llama.cpp and Ollama will fall back to a guess")
    else:
        writer.add_chat_template(template)
    return {"pre": pre, "chat_template": template, "eos": ids.get("eos")}


def _chat_template(model_dir: Path, tcfg: dict):
    """tokenizer_config.json's template, else chat_template.jinja (transformers 5; with any named
    templates in additional_chat_templates/), else chat_template.json. A list means named templates."""
    if isinstance(tcfg.get("chat_template"), (str, list)):
        return tcfg["chat_template"]
    jinja, as_json = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
        named = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if named:
            return [{"name": "default", "template": template}] + [
                {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in named]
        return template
    if as_json.is_file():
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return None


def _merges(model: dict) -> list[str] | None:
    """The BPE merges as llama.cpp stores them, "left right". tokenizer.json has them as such strings or
    (since tokenizers 0.20) as [left, right] pairs; a space inside a part is written as chr(32 + 256),
    as llama.cpp's converter does."""
    merges = model.get("merges")
    if not isinstance(merges, list) or not merges:
        return None
    if isinstance(merges[0], str):
        return merges
    if any(" " in a or " " in b for a, b in merges):
        return [f"{a.translate(_SPACE)} {b.translate(_SPACE)}" for a, b in merges]
    return [f"{a} {b}" for a, b in merges]


_SPACE = {ord(" "): ord(" ") + 256}


@dataclass
class GGUFReport:
    path: Path
    qtype: str
    tensors: int
    bytes: int
    seconds: float
    types: dict = field(default_factory=dict)  # ggml type name -> count
    check: str = ""


def export(model_dir: Path, out_path: Path, qtype: str = "f16", verify: bool = True,
           log: Callable[[str], None] = print, name: str | None = None) -> GGUFReport:
    """One GGUF file of `qtype` from a merged (plain) Hugging Face folder; `name` goes into general.name."""
    qtype = parse_types(qtype)[0]
    if qtype in LLAMA_QUANTIZE_TYPES:
        return _export_kquant(model_dir, out_path, qtype, verify, log, name)
    with _gc_paused():
        report, expected = _write(Path(model_dir), Path(out_path), qtype, log, name)
    if verify:
        report.check = verify_gguf(out_path, model_dir, qtype, expected=expected)
        log(f"  {report.check}")
    return report


def _write(model_dir: Path, out_path: Path, qtype: str, log, name: str | None) -> tuple[GGUFReport, dict]:
    """The file itself; also returns the tensor types it should hold, for the read-back check."""
    import gguf
    import numpy as np

    from .gguf_writer import GGUFWriter
    from .merge import checkpoint_shards, one_torch_thread, read_header

    t0 = time.perf_counter()
    cfg = json.loads((model_dir / "config.json").read_text())
    hf_arch = (cfg.get("architectures") or ["?"])[0]
    if hf_arch not in ARCHS:
        raise UserError(f"{model_dir}/config.json: architecture {hf_arch}; GGUF export supports "
                        f"{', '.join(sorted(set(ARCHS)))}")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[hf_arch])
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    tname = gguf.get_tensor_name_map(arch, n_layers)
    tied = bool(cfg.get("tie_word_embeddings", False))
    is_llama = ARCHS[hf_arch] == "LLAMA"

    writer = GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    extra = _rope_metadata(writer, gguf, cfg)

    # Pass 1, headers only: what goes into the file, with which type and size.
    plan = []  # (gguf name, shard, hf name - or the tensor itself for extras, shape, ggml type, header entry)
    starts = {}  # shard -> byte offset of its data
    n_params = 0
    for gname, t in extra:
        plan.append((gname, None, t, list(t.shape), gguf.GGMLQuantizationType.F32, None))
    for shard in checkpoint_shards(model_dir):
        header, starts[shard] = read_header(shard)
        for hf_name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            gname = tname.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UserError(f"{shard.name}: tensor {hf_name} has no GGUF name for {hf_arch}; not exportable")
            shape = entry["shape"]
            plan.append((gname, shard, hf_name, shape, _tensor_type(gguf, gname, shape, qtype), entry))
            n_params += math.prod(shape)
    for gname, _, _, shape, ttype, _ in plan:
        if ttype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(gname, shape, np.dtype(np.float32), 4 * math.prod(shape))
        elif ttype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor_info(gname, shape, np.dtype(np.float16), 2 * math.prod(shape))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, ttype)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=ttype)

    # Metadata, as llama.cpp's converter writes it.
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(model_dir).resolve().name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    writer.add_block_count(n_layers)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype]))
    if is_llama:
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    vocab_info = _vocab(writer, gguf, model_dir, cfg, is_llama, log)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # Pass 2: stream the tensors in plan order.
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    counts = dict(Counter(p[4].name for p in plan))
    with one_torch_thread():  # memory-bound streaming: see merge.one_torch_thread
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            buffers: dict = {}
            for _, shard, t, _, ttype, _ in plan:  # extra tensors (rope_freqs) come first
                if shard is None:
                    writer.write_tensor_pieces([_to_ggml(gguf, t, ttype, buffers)])
            for shard, items in groupby((p for p in plan if p[1] is not None), key=lambda p: p[1]):
                # ACCESS_COPY: a private mapping is writable, which torch.frombuffer wants; nothing writes to it
                with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
                    for _, _, hf_name, _, ttype, entry in items:  # file order, as planned
                        transform = None
                        if is_llama and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                            transform = partial(_permute, n_head=n_head)
                        elif is_llama and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                            transform = partial(_permute, n_head=n_kv)
                        writer.write_tensor_pieces(
                            _pieces(gguf, shard, m, starts[shard], entry, ttype, buffers, transform))
            writer.close()
            os.replace(tmp, out_path)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    report = GGUFReport(out_path, qtype, len(plan), out_path.stat().st_size, time.perf_counter() - t0, counts)
    log(f"wrote {out_path.name}: {len(plan)} tensors {counts}, {report.bytes / 1e6:.0f} MB in {report.seconds:.1f}s"
        f" (pre-tokenizer {vocab_info['pre']})")
    return report, {p[0]: p[4].name for p in plan}


def _export_kquant(model_dir: Path, out_path: Path, qtype: str, verify: bool, log, name) -> GGUFReport:
    """F16 file (temporary unless it already exists beside) -> llama-quantize -> qtype."""
    exe = llama_quantize()
    if exe is None:
        parse_types(qtype)  # raises the install message
    t0 = time.perf_counter()
    f16 = out_path.with_name("model-f16.gguf")
    made = not f16.is_file()
    if made:
        export(model_dir, f16, "f16", verify=False, log=log, name=name)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        proc = subprocess.run([exe, str(f16), str(tmp), LLAMA_QUANTIZE_TYPES[qtype]], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise UserError(f"llama-quantize {LLAMA_QUANTIZE_TYPES[qtype]} failed (exit {proc.returncode}): "
                            f"{proc.stderr.strip()[-400:]}", exit_code=1)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        if made:
            f16.unlink(missing_ok=True)
    report = GGUFReport(out_path, qtype, 0, out_path.stat().st_size, time.perf_counter() - t0)
    log(f"wrote {out_path.name} with llama-quantize, {report.bytes / 1e6:.0f} MB in {report.seconds:.1f}s")
    if verify:
        report.check = verify_gguf(out_path, model_dir, qtype)
        log(f"  {report.check}")
    return report


# --------------------------------------------------------------------------------------------------
# verification

# Max |logit diff| vs the merged model, and the share of probe positions whose top token must agree.
GGUF_TOL = {"f32": (1e-3, 1.0), "f16": (0.5, 0.95), "bf16": (1.5, 0.9), "q8_0": (2.0, 0.9)}
DEFAULT_TOL = (8.0, 0.6)  # 4-6 bit types: a sanity bound, not a quality claim


def read_back(path: Path) -> dict:
    """What the gguf reader sees: tensor names -> type names, metadata values we care about."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def value(key):
        f = r.get_field(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    return {
        "tensors": {t.name: t.tensor_type.name for t in r.tensors},
        "arch": arch,
        "chat_template": value("tokenizer.chat_template"),
        "eos": value("tokenizer.ggml.eos_token_id"),
        "bos": value("tokenizer.ggml.bos_token_id"),
        "add_bos": value("tokenizer.ggml.add_bos_token"),
        "n_tokens": len(value("tokenizer.ggml.tokens") or []),
        "size_label": value("general.size_label"),
        "key_length": value(f"{arch}.attention.key_length"),
        "value_length": value(f"{arch}.attention.value_length"),
    }


def verify_gguf(path: Path, model_dir: Path, qtype: str, expected: dict | None = None) -> str:
    """Read the file back (names, types, metadata) and run it through transformers' GGUF loader:
    logits and greedy tokens against the merged model. Raises on a mismatch; returns a summary line."""
    from .merge import check_setup

    compute, ctx = check_setup(Path(model_dir), "bfloat16")
    with ctx:
        return _verify_gguf(path, model_dir, qtype, expected, compute)


def _verify_gguf(path: Path, model_dir: Path, qtype: str, expected: dict | None, compute: str) -> str:
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .merge import merged_outputs, probe_outputs

    path, model_dir = Path(path), Path(model_dir)
    info = read_back(path)
    cfg = json.loads((model_dir / "config.json").read_text())
    problems = []
    if expected is not None and info["tensors"] != expected:
        missing = set(expected) - set(info["tensors"])
        wrong = {k for k in expected if k in info["tensors"] and info["tensors"][k] != expected[k]}
        problems.append(f"tensors differ (missing {sorted(missing)[:3]}, wrong type {sorted(wrong)[:3]})")
    if cfg.get("tie_word_embeddings") and "output.weight" in info["tensors"]:
        problems.append("output.weight written although the embeddings are tied")
    tcfg_file = model_dir / "tokenizer_config.json"
    template = _chat_template(model_dir, json.loads(tcfg_file.read_text(encoding="utf-8")) if tcfg_file.is_file() else {})
    if isinstance(template, list):  # named templates: the default one is tokenizer.chat_template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and info["chat_template"] != template:
        problems.append("tokenizer.chat_template differs from the model's chat template")
    if info["n_tokens"] != cfg["vocab_size"]:
        problems.append(f"{info['n_tokens']} tokens, config vocab_size {cfg['vocab_size']}")
    if problems:
        raise UserError(f"{path}: GGUF read-back failed: {'; '.join(problems)}", exit_code=1)

    ref, ref_greedy = merged_outputs(model_dir, compute)  # one reference run per merged model
    # The GGUF loader's per-tensor progress bar (plain tqdm) would flood the merge log: silence it here only.
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        g_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                       dtype=getattr(torch, compute))
    finally:
        gguf_utils.tqdm = bar
    got, got_greedy = probe_outputs(g_model.eval(), AutoTokenizer.from_pretrained(str(model_dir)))
    del g_model
    gc.collect()

    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got)) / sum(a.shape[0] for a in ref)
    tol, min_agree = GGUF_TOL.get(qtype, DEFAULT_TOL)
    line = (f"GGUF check: {len(info['tensors'])} tensors read back; transformers' GGUF loader vs merged model: "
            f"max |logit diff| {diff:.2e} (tolerance {tol:g}), top-1 agreement {agree:.0%}, greedy tokens "
            f"{'identical' if got_greedy == ref_greedy else 'differ'}")
    if diff > tol or agree < min_agree or (qtype == "f32" and got_greedy != ref_greedy):
        raise UserError(f"{path}: {line}", exit_code=1)
    return line
