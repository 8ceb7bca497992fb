"""LoRA adapter + 16-bit base -> one merged Hugging Face folder, checked against peft.

The merge streams: each base shard is read one tensor at a time, the LoRA delta `B @ A * scaling` is
added in float32 where the adapter targets that weight, and the tensor is written straight into the
output shard. Peak memory is one tensor, not one model, so a 3B merge fits in modest RAM.

Always onto the base as stored on disk (16/32-bit), never onto a dequantized 4-bit copy: a run trained
with `load_in_4bit` learned its adapter against NF4 weights, but the adapter is a correction to the
*real* weights, and merging into rounded 4-bit weights would bake the rounding in. A checkpoint that is
itself pre-quantized (bnb-4bit hub repos) is refused with the name of the 16-bit original to use.

Unsloth backend: the same streaming merge is used. Unsloth's `save_pretrained_merged(..., "merged_16bit")`
computes the same W + B@A*s onto the 16-bit weights (it also reloads them from disk when trained in
4-bit), but it needs the model loaded in memory (a GPU session) and on CPU it is plain peft anyway;
this path needs neither and is verified against peft below.

Why not `safetensors.safe_open`: it memory-maps the shard, and every page read stays resident, so RSS
grows to the shard's size. The safetensors format is an 8-byte length, a JSON header and raw bytes;
reading each tensor with a plain `readinto` keeps exactly one tensor in memory.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# Files of a model folder that are copied as they are (tokenizer, chat template, generation settings).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PROBES = (
    "What is 3 + 5?",
    "The capital of France is",
    "def fibonacci(n):\n    ",
)


# --------------------------------------------------------------------------------------------------
# safetensors, one tensor at a time

ST_DTYPES = {  # safetensors dtype -> (torch dtype name, bytes per element)
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
TORCH_TO_ST = {v[0]: k for k, v in ST_DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries by name, byte offset where the data starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_rows(f, start: int, entry: dict, r0: int = 0, r1: int | None = None):
    """Rows r0:r1 of one tensor (the whole tensor by default), read with one readinto."""
    import torch

    shape = entry["shape"]
    rows = shape[0] if shape else 1
    r1 = rows if r1 is None else r1
    row_bytes = (entry["data_offsets"][1] - entry["data_offsets"][0]) // max(rows, 1)
    buf = torch.empty((r1 - r0) * row_bytes, dtype=torch.uint8)
    f.seek(start + entry["data_offsets"][0] + r0 * row_bytes)
    f.readinto(memoryview(buf.numpy()))
    t = buf.view(getattr(torch, ST_DTYPES[entry["dtype"]][0]))
    return t.reshape([r1 - r0, *shape[1:]]) if shape else t.reshape(shape)


def iter_entries(path: Path):
    """Yield (name, header entry, read) in file order; read(r0, r1) returns those rows (default: all)."""
    from functools import partial

    header, start = read_header(path)
    with open(path, "rb") as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            yield name, entry, partial(read_rows, f, start, entry)


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:  # noqa: F821
    """Yield (name, tensor) in file order, reading each tensor's bytes once."""
    for name, _, read in iter_entries(path):
        yield name, read()


class ShardWriter:
    """Write a safetensors file piece by piece: the header is fixed up front from the planned
    (name, dtype, shape) list, then each tensor's bytes are appended in that order (in row chunks if
    wanted), and every tensor is checked to have received exactly its size."""

    def __init__(self, path: Path, plan: list[tuple[str, str, list[int]]]):
        header, offset = {}, 0
        self.sizes = []
        for name, dtype, shape in plan:
            size = ST_DTYPES[dtype][1]
            for d in shape:
                size *= d
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes.append(size)
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self.order = [name for name, _, _ in plan]
        self.total = offset
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.index, self.written = -1, 0

    def write(self, name: str, tensor) -> None:
        import torch

        if self.index < 0 or self.order[self.index] != name:
            self._check_done()
            self.index += 1
            if self.order[self.index] != name:
                raise RuntimeError(f"shard writer: expected {self.order[self.index]}, got {name}")
            self.written = 0
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.write(data)
        self.written += data.nbytes

    def _check_done(self) -> None:
        if self.index >= 0 and self.written != self.sizes[self.index]:
            raise RuntimeError(f"shard writer: {self.order[self.index]} got {self.written} of "
                               f"{self.sizes[self.index]} bytes")

    def close(self) -> None:
        self.f.close()
        self._check_done()
        if self.index != len(self.order) - 1:
            raise RuntimeError(f"shard writer: wrote {self.index + 1} of {len(self.order)} tensors")


def checkpoint_shards(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded or not), or a UserError saying what is there."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    if list(model_dir.glob("*.bin")):
        raise UserError(f"{model_dir}: only PyTorch .bin weights; re-save the base with safetensors "
                        "(model.save_pretrained(dir, safe_serialization=True)) and pass it with --base")
    raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; not a model folder")


# --------------------------------------------------------------------------------------------------
# where the adapter and base are


@dataclass
class MergeSource:
    adapter: Path
    base: str  # a local folder or a hub id
    run_dir: Path | None = None
    backend: str = "hf"
    load_in_4bit: bool = False
    default_out: Path = field(default_factory=Path)


def resolve_source(target: str | Path | None = None, base: str | None = None) -> MergeSource:
    """A run directory (its final adapter, or its newest checkpoint) or an adapter folder; no target:
    the newest run in runs/. --base overrides the base model recorded with the adapter."""
    from .models import resolve_model
    from .rundir import RunDir, newest_run

    path = Path(target) if target else newest_run()
    if not path.exists():
        raise UserError(f"{path}: no such run directory or adapter folder")
    run = RunDir(path)
    if run.exists():
        info = run.info()
        adapter = run.latest_adapter()
        return MergeSource(adapter, resolve_model(base or run.base_model()), path, info.get("backend", "hf"),
                           bool(info.get("load_in_4bit")), path / "merged")
    if (path / "adapter_config.json").is_file():
        if base is None:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise UserError(f"{path}/adapter_config.json: no base_model_name_or_path; pass --base MODEL")
        return MergeSource(path, resolve_model(base), None, "hf", False, path.with_name(path.name + "-merged"))
    raise UserError(f"{path}: neither a run directory (run.json) nor an adapter folder (adapter_config.json); "
                    "point at runs/<name> or at a folder holding adapter_config.json")


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


# --------------------------------------------------------------------------------------------------
# the adapter


@dataclass
class Lora:
    """Deltas keyed by the base checkpoint's tensor name; full replacements from modules_to_save."""
    deltas: dict[str, tuple] = field(default_factory=dict)  # name -> (A, B, scaling, transpose)
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # noqa: F821
    config: dict = field(default_factory=dict)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern: a key matches a module name suffix (regex allowed)."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> Lora:
    from safetensors.torch import load_file

    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; not a LoRA adapter folder")
    cfg = json.loads(cfg_file.read_text())
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: adapter_model.safetensors is missing; the adapter was not saved completely")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    unsupported = {
        "use_dora": "DoRA adapters (merge them with peft's merge_and_unload)",
        "lora_bias": "LoRA bias terms",
        "target_parameters": "LoRA on raw parameters (MoE experts)",
        "layer_replication": "layer replication",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise UserError(f"{cfg_file}: {key} is set; merging {what} is not supported here")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{cfg_file}: bias={cfg['bias']!r}; only adapters trained with bias='none' can be merged")

    tensors = load_file(str(weights))  # adapters are small; fine to hold
    lora = Lora(config=cfg)
    alpha, rslora = cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
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
    for module, p in pairs.items():
        embedding = "lora_embedding_A" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if embedding else (p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None:
            raise UserError(f"{weights}: {module} has only one of its LoRA A/B matrices; the adapter is damaged")
        r = a.shape[0]
        mod_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        scaling = mod_alpha / (r ** 0.5) if rslora else mod_alpha / r
        # Embedding LoRA is stored as A (r, vocab), B (dim, r): delta = (B @ A).T, like fan_in_fan_out.
        lora.deltas[f"{module}.weight"] = (a, b, scaling, embedding or fan_in_fan_out)
    if not lora.deltas and not lora.replace:
        raise UserError(f"{weights}: no LoRA weights found")
    return lora


def lora_delta(a, b, scaling: float, transpose: bool, r0: int = 0, r1: int | None = None):
    """Rows r0:r1 of B @ A * scaling in float32, in peft's order of operations (product, then scale)."""
    if transpose:  # delta = (B @ A).T: its rows are columns of A
        return (b.float() @ a[:, r0:r1].float()).T * scaling
    return (b[r0:r1].float() @ a.float()) * scaling


def delta_shape(a, b, transpose: bool) -> tuple[int, int]:
    return (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])


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


CHUNK_BYTES = 16 << 20  # rows of a tensor read, merged and written at a time


@contextmanager
def one_torch_thread():
    """Streaming tensors is memory-bound: one thread is as fast, and it does not collapse when the CPU is
    shared (torch's spinning worker threads slowed a 2-core machine under load by 2-5x)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _abt(spec: tuple) -> tuple:
    a, b, _, transpose = spec
    return a, b, transpose


def merge_weights(base_dir: Path, lora: Lora, out_dir: Path, dtype: str,
                  log: Callable[[str], None] = lambda s: None) -> MergeReport:
    """Stream every base shard into out_dir with the LoRA deltas applied; floating tensors in `dtype`."""
    import time

    import torch

    t0 = time.perf_counter()
    target = getattr(torch, dtype)
    shards = checkpoint_shards(base_dir)
    headers = {s: read_header(s)[0] for s in shards}
    names = {n for h in headers.values() for n in h}
    cfg = json.loads((base_dir / "config.json").read_text())
    for name in list(lora.deltas) + list(lora.replace):
        if name not in names:
            tied = cfg.get("tie_word_embeddings") and name == "lm_head.weight"
            raise UserError(
                f"adapter targets {name}, which the base checkpoint {base_dir} does not have"
                + (" (its output layer is tied to the embeddings)" if tied else "")
                + "; is --base the model this adapter was trained on?"
            )

    def out_dtype(entry_dtype: str) -> str:
        return TORCH_TO_ST[dtype] if entry_dtype in ("F32", "F16", "BF16", "F64") else entry_dtype

    with one_torch_thread():
        return _stream_merge(shards, headers, lora, out_dir, target, out_dtype, dtype, t0, log)


def _stream_merge(shards, headers, lora, out_dir, target, out_dtype, dtype, t0, log) -> MergeReport:
    import time

    weight_map, total, merged, count = {}, 0, 0, 0
    for shard in shards:
        header = headers[shard]
        ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        plan = []
        for name, entry in ordered:
            shape = entry["shape"]
            if name in lora.replace:
                shape = list(lora.replace[name].shape)
            elif name in lora.deltas and tuple(shape) != delta_shape(*_abt(lora.deltas[name])):
                raise UserError(
                    f"adapter delta for {name} has shape {delta_shape(*_abt(lora.deltas[name]))} but the base weight "
                    f"is {tuple(shape)}; the adapter was trained on a different base model - pass the right one "
                    "with --base"
                )
            plan.append((name, out_dtype(entry["dtype"]), shape))
        writer = ShardWriter(out_dir / shard.name, plan)
        try:
            for name, entry, read in iter_entries(shard):
                if name in lora.replace:
                    t = lora.replace[name]
                    writer.write(name, t.to(target) if t.is_floating_point() else t)
                else:  # row chunks: memory stays at CHUNK_BYTES whatever the tensor's size
                    shape = entry["shape"]
                    rows = shape[0] if shape else 1
                    nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
                    step = max(1, CHUNK_BYTES * rows // max(nbytes, 1))
                    for r0 in range(0, rows, step):
                        r1 = min(rows, r0 + step)
                        t = read(r0, r1) if shape else read()
                        if name in lora.deltas:
                            t = t.float() + lora_delta(*lora.deltas[name], r0, r1)
                        writer.write(name, t.to(target) if t.is_floating_point() else t)
                    merged += name in lora.deltas
                weight_map[name] = shard.name
                count += 1
        except BaseException:
            writer.f.close()
            raise
        writer.close()
        total += writer.total
        log(f"  {shard.name}: {len(plan)} tensors")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if merged != len(lora.deltas):
        raise RuntimeError(f"merged {merged} of {len(lora.deltas)} LoRA deltas")
    return MergeReport(out_dir, dtype, count, merged, time.perf_counter() - t0, total)


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


# --------------------------------------------------------------------------------------------------
# parity with peft


# Allowed max |logit difference| between the merged model and base+adapter, per stored dtype: the merged
# weights are rounded once to that dtype, the reference is not. Measured on SmolLM2-135M with a random
# LoRA (logits up to ~25): fp32 4e-5, fp16 0.04, bf16 0.19. The second check (vs peft's merge_and_unload
# rounded the same way) has no such excuse: fp16 6e-4, bf16 6e-3. Both scale with the logits' magnitude
# beyond LOGIT_SCALE (bigger models have bigger logits).
LOGIT_TOL = {"float32": 1e-3, "float16": 0.2, "bfloat16": 1.0}
MERGE_EXACT_TOL = {"float32": 1e-3, "float16": 0.02, "bfloat16": 0.1}
LOGIT_SCALE = 25.0


@dataclass
class ParityReport:
    max_diff: float  # merged vs base+adapter
    peft_diff: float  # merged vs peft merge_and_unload, rounded to the same dtype
    adapter_effect: float  # base vs base+adapter (shows the adapter matters)
    tol: float
    compute_dtype: str
    ok: bool

    def line(self) -> str:
        return (f"parity ({self.compute_dtype} compute, {len(PROBES)} probe prompts): max |logit diff| merged vs "
                f"base+adapter {self.max_diff:.2e} (tolerance {self.tol:.3g}), vs peft merge_and_unload "
                f"{self.peft_diff:.2e}; adapter effect {self.adapter_effect:.2e}")


def probe_inputs(tokenizer) -> list:
    return [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROBES]


def _logits(model, inputs) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits.float()[0] for ids in inputs]


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def probe_outputs(model, tok) -> tuple[list, list[int]]:
    """Logits on the probe prompts and 8 greedy tokens answering a chat question, with generation
    settings taken from the tokenizer (a GGUF-loaded model rebuilds its generation_config from metadata)."""
    import torch
    from transformers import GenerationConfig

    inputs = probe_inputs(tok)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 5?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"] \
        if tok.chat_template else inputs[0]
    gen = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with torch.no_grad():
        greedy = model.generate(chat, generation_config=gen)[0, chat.shape[1]:].tolist()
    return _logits(model, inputs), greedy


_MERGED_OUTPUTS: dict = {}


def merged_outputs(model_dir: Path, compute: str) -> tuple[list, list[int]]:
    """probe_outputs of a merged folder, computed once per folder and dtype: the merge check and the
    check of every GGUF type compare against the same outputs, so the merged model is loaded once."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    key = (str(model_dir.resolve()), compute,
           *[(s.stat().st_size, s.stat().st_mtime_ns) for s in checkpoint_shards(model_dir)])
    if key not in _MERGED_OUTPUTS:
        _MERGED_OUTPUTS.clear()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, compute)).eval()
        _MERGED_OUTPUTS[key] = probe_outputs(model, AutoTokenizer.from_pretrained(str(model_dir)))
        del model
        gc.collect()
    return _MERGED_OUTPUTS[key]


SMALL_MODEL = 1_000_000_000  # parameters; up to this size checks compute in float32 on one thread


def check_setup(model_dir: Path, big_dtype: str):
    """(compute dtype, context) for a check of this model: a small model in float32 on one thread (a few
    probe tokens gain nothing from more, and spinning threads collapse on a busy CPU); a big one in its
    16-bit dtype (half the memory) on all threads."""
    from contextlib import nullcontext

    n = sum(math.prod(e["shape"]) for s in checkpoint_shards(model_dir) for e in read_header(s)[0].values())
    if n <= SMALL_MODEL:
        return "float32", one_torch_thread()
    return (big_dtype if big_dtype != "float32" else "bfloat16"), nullcontext()


def verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: str) -> ParityReport:
    """Logits of the merged folder vs the base with the adapter attached (peft), on a few probe prompts.
    One model in memory at a time."""
    compute, ctx = check_setup(merged_dir, dtype)
    with ctx:
        return _verify_merge(base_dir, adapter_dir, merged_dir, dtype, compute)


def _verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: str, compute: str) -> ParityReport:
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cdt = getattr(torch, compute)
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    inputs = probe_inputs(tok)

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=cdt)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    ref = _logits(model, inputs)
    with model.disable_adapter():
        plain = _logits(model, inputs)
    peft_merged = model.merge_and_unload()
    with torch.no_grad():  # round like the merged file, compute like the reference; one tensor at a time
        for p in peft_merged.parameters():
            p.data = p.data.to(getattr(torch, dtype)).to(cdt)
    peft_ref = _logits(peft_merged, inputs)
    del base, model, peft_merged
    gc.collect()

    got, _ = merged_outputs(merged_dir, compute)

    max_diff, peft_diff = _max_diff(got, ref), _max_diff(got, peft_ref)
    scale = max(1.0, max(float(x.abs().max()) for x in ref) / LOGIT_SCALE)
    tol = LOGIT_TOL[dtype] * scale
    ok = max_diff <= tol and peft_diff <= MERGE_EXACT_TOL[dtype] * scale
    return ParityReport(max_diff, peft_diff, _max_diff(plain, ref), tol, compute, ok)


# --------------------------------------------------------------------------------------------------
# the command


@dataclass
class MergeResult:
    out: Path
    merge: MergeReport
    parity: ParityReport | None
    ggufs: list = field(default_factory=list)  # export_gguf.GGUFReport
    modelfile: Path | None = None

    def next_steps(self) -> list[str]:
        """Where the outputs are and the commands that run them."""
        lines = [f"merged model: {self.out}"]
        lines += [f"GGUF: {g.path}  (llama.cpp: llama-cli -m {g.path} --jinja)" for g in self.ggufs]
        if self.modelfile:
            from .ollama import model_name

            name = model_name(self.out)
            lines.append(f"Ollama: cd {self.out} && ollama create {name} -f Modelfile && ollama run {name}")
        return lines


def default_dtype(cfg: dict) -> str:
    """The base's own dtype (merging never changes precision unless asked)."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES.values() else "float32"


def merge(target: str | Path | None = None, base: str | None = None, out: Path | None = None,
          dtype: str | None = None, gguf: list[str] | str | None = None, ollama: bool = False,
          force: bool = False, verify: bool = True, log: Callable[[str], None] = print) -> MergeResult:
    """`lowmem-r1 merge`: adapter + base -> merged folder (+ GGUF files, + Modelfile), all verified.
    Everything is written into a temporary folder and renamed into place at the end."""
    from . import export_gguf
    from .fsutil import atomic_dir, check_free_space, refuse_existing
    from .models import is_hub_id

    if dtype is not None and dtype not in DTYPES and dtype not in DTYPES.values():
        raise UserError(f"--dtype {dtype}: unknown; use one of {', '.join(DTYPES)}")
    gguf_types = export_gguf.parse_types(gguf)  # unknown types / missing llama-quantize fail before any work
    gguf_types.sort(key=lambda t: t in export_gguf.LLAMA_QUANTIZE_TYPES)  # k-quants reuse the F16 file
    if ollama and not gguf_types:
        gguf_types = ["f16"]
    src = resolve_source(target, base)
    m = re.match(r"(.+?)-(unsloth-)?bnb-4bit$", src.base)
    if m and is_hub_id(src.base):  # the run loaded a pre-quantized repo: merge into its 16-bit original
        log(f"{src.base} is stored in 4-bit; merging into its 16-bit original {m.group(1)}")
        src.base = m.group(1)
    out = Path(out) if out else src.default_out
    refuse_existing(out, force, "merged model")
    base_dir = local_model_dir(src.base)
    cfg = check_base(base_dir)
    dtype = DTYPES.get(dtype, dtype) if dtype else default_dtype(cfg)
    lora = read_adapter(src.adapter)

    base_bytes = sum(s.stat().st_size for s in checkpoint_shards(base_dir))
    src_dtype = default_dtype(cfg)
    est = base_bytes * {"float32": 4}.get(dtype, 2) // {"float32": 4}.get(src_dtype, 2)
    needed = est + sum(export_gguf.estimate_size(est, dtype, t) for t in gguf_types)
    check_free_space(out.parent, int(needed * 1.05) + (64 << 20),
                     "the merged model and GGUF files")

    log(f"merging {src.adapter} into {src.base} ({dtype}) -> {out}")
    if src.backend == "unsloth":
        log("  unsloth run: merged with the same streaming 16-bit merge (equivalent to merged_16bit)")
    if src.load_in_4bit:
        log("  trained on a 4-bit base: merging onto the 16-bit weights from disk, not the 4-bit copy")
    with atomic_dir(out, force) as tmp:
        report = merge_weights(base_dir, lora, tmp, dtype, log)
        copy_model_files(base_dir, src.adapter, tmp, dtype)
        log(f"merged {report.merged} LoRA weights into {report.tensors} tensors in {report.seconds:.1f}s")
        parity = None
        if verify:
            parity = verify_merge(base_dir, src.adapter, tmp, dtype)
            log(parity.line())
            if not parity.ok:
                raise UserError(f"merge check failed: {parity.line()}; the output was not written. "
                                "Is --base the model this adapter was trained on?", exit_code=1)
        result = MergeResult(out, report, parity)
        name = Path(str(src.base)).name + (f"-{src.run_dir.name}" if src.run_dir else "")
        kquants = [t for t in gguf_types if t in export_gguf.LLAMA_QUANTIZE_TYPES]
        scratch_f16 = bool(kquants) and "f16" not in gguf_types
        if scratch_f16:  # llama-quantize starts from F16; make it once for all k-quants, drop it after
            export_gguf.export(tmp, tmp / "model-f16.gguf", "f16", verify=False, log=log, name=name)
        for t in gguf_types:
            rep = export_gguf.export(tmp, tmp / f"model-{t}.gguf", t, verify=verify, log=log, name=name)
            rep.path = out / rep.path.name
            result.ggufs.append(rep)
        if scratch_f16:
            (tmp / "model-f16.gguf").unlink()
        if ollama:
            from .ollama import write_modelfile

            chosen = result.ggufs[-1].path.name
            result.modelfile = out / write_modelfile(tmp, chosen).name
            log(f"wrote Modelfile (FROM ./{chosen})")
        (tmp / "merge_info.json").write_text(json.dumps({
            "adapter": str(src.adapter), "base": str(src.base), "dtype": dtype, "backend": src.backend,
            "parity": None if parity is None else parity.__dict__,
            "gguf": [{"file": g.path.name, "type": g.qtype} for g in result.ggufs],
        }, indent=2, default=str) + "\n")
    return result
