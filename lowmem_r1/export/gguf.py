"""Merged Hugging Face folder -> GGUF, in pure Python (the `gguf` package), then read back and checked.

No compiler, no network: llama.cpp's own converter needs a checkout of llama.cpp, and Unsloth's
`save_pretrained_gguf` builds llama.cpp at run time. The file is written in three steps, one module
each: the plan (gguf_plan: names, types, shapes from the headers alone), the metadata (gguf_metadata:
hyperparameters and tokenizer) and the stream (gguf_stream: tensor bytes, a few rows at a time), through
gguf_writer's faster GGUFWriter. k-quants (q4_k_m, ...) come from llama.cpp's `llama-quantize` applied
to the F16 file, only when it is on PATH.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.export.gguf_metadata import chat_template, model_metadata, rope_metadata, vocab_metadata
from lowmem_r1.export.gguf_plan import (
    LLAMA_QUANTIZE_TYPES,
    announce,
    llama_quantize,
    parse_types,
    plan_tensors,
    read_spec,
)
from lowmem_r1.export.gguf_stream import write_tensors
from lowmem_r1.export.parity import ReferenceOutputs, check_setup, probe_outputs
from lowmem_r1.export.safetensors_io import one_torch_thread

# Max |logit diff| vs the merged model, and the share of probe positions whose top token must agree.
GGUF_TOL = {"f32": (1e-3, 1.0), "f16": (0.5, 0.95), "bf16": (1.5, 0.9), "q8_0": (2.0, 0.9)}
DEFAULT_TOL = (8.0, 0.6)  # 4-6 bit types: a sanity bound, not a quality claim


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
           log: Callable[[str], None] = print, name: str | None = None,
           reference: ReferenceOutputs | None = None) -> GGUFReport:
    """One GGUF file of `qtype` from a merged (plain) Hugging Face folder; `name` goes into general.name.
    `reference` holds the merged model's outputs across checks (one is made if not given)."""
    qtype = parse_types(qtype)[0]
    if qtype in LLAMA_QUANTIZE_TYPES:
        return _export_kquant(model_dir, out_path, qtype, verify, log, name, reference)
    with _gc_paused():
        report, expected = _write(Path(model_dir), Path(out_path), qtype, log, name)
    if verify:
        report.check = verify_gguf(out_path, model_dir, qtype, expected=expected, reference=reference)
        log(f"  {report.check}")
    return report


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


def _write(model_dir: Path, out_path: Path, qtype: str, log, name: str | None) -> tuple[GGUFReport, dict]:
    """The file itself; also returns the tensor types it should hold, for the read-back check."""
    import gguf

    from lowmem_r1.export.gguf_writer import (
        GGUFWriter,  # imports gguf at its top: loaded here, not with this module
    )

    t0 = time.perf_counter()
    cfg, spec = read_spec(model_dir)
    writer = GGUFWriter(None, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.arch)])
    extra = rope_metadata(writer, gguf, cfg)
    plan = plan_tensors(gguf, model_dir, spec, qtype, extra)  # pass 1: headers only
    announce(writer, gguf, plan)
    model_metadata(writer, gguf, cfg, spec, plan.n_params, qtype, name or Path(model_dir).resolve().name)
    vocab = vocab_metadata(writer, gguf, model_dir, cfg, spec.is_llama, log)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    with one_torch_thread():  # memory-bound streaming: see safetensors_io.one_torch_thread
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            write_tensors(writer, gguf, plan)  # pass 2: the bytes, in plan order
            writer.close()
            os.replace(tmp, out_path)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    counts = plan.type_counts()
    report = GGUFReport(out_path, qtype, len(plan.tensors), out_path.stat().st_size, time.perf_counter() - t0, counts)
    log(f"wrote {out_path.name}: {len(plan.tensors)} tensors {counts}, {report.bytes / 1e6:.0f} MB in "
        f"{report.seconds:.1f}s (pre-tokenizer {vocab['pre']})")
    return report, plan.types()


def _export_kquant(model_dir: Path, out_path: Path, qtype: str, verify: bool, log, name,
                   reference: ReferenceOutputs | None) -> GGUFReport:
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
        report.check = verify_gguf(out_path, model_dir, qtype, reference=reference)
        log(f"  {report.check}")
    return report


# --------------------------------------------------------------------------------------------------
# verification


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


def verify_gguf(path: Path, model_dir: Path, qtype: str, expected: dict | None = None,
                reference: ReferenceOutputs | None = None) -> str:
    """Read the file back (names, types, metadata) and run it through transformers' GGUF loader:
    logits and greedy tokens against the merged model. Raises on a mismatch; returns a summary line."""
    path, model_dir = Path(path), Path(model_dir)
    info = read_back(path)
    _check_read_back(path, model_dir, info, expected)
    compute, ctx = check_setup(model_dir, "bfloat16")
    with ctx:
        ref, ref_greedy = (reference or ReferenceOutputs()).get(model_dir, compute)  # one run per merged model
        got, got_greedy = _gguf_outputs(path, model_dir, compute)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got)) / sum(a.shape[0] for a in ref)
    tol, min_agree = GGUF_TOL.get(qtype, DEFAULT_TOL)
    line = (f"GGUF check: {len(info['tensors'])} tensors read back; transformers' GGUF loader vs merged model: "
            f"max |logit diff| {diff:.2e} (tolerance {tol:g}), top-1 agreement {agree:.0%}, greedy tokens "
            f"{'identical' if got_greedy == ref_greedy else 'differ'}")
    if diff > tol or agree < min_agree or (qtype == "f32" and got_greedy != ref_greedy):
        raise UserError(f"{path}: {line}", exit_code=1)
    return line


def _check_read_back(path: Path, model_dir: Path, info: dict, expected: dict | None) -> None:
    """Names, types, tied output, chat template and vocabulary size as read back from the file."""
    cfg = json.loads((model_dir / "config.json").read_text())
    problems = []
    if expected is not None and info["tensors"] != expected:
        missing = set(expected) - set(info["tensors"])
        wrong = {k for k in expected if k in info["tensors"] and info["tensors"][k] != expected[k]}
        problems.append(f"tensors differ (missing {sorted(missing)[:3]}, wrong type {sorted(wrong)[:3]})")
    if cfg.get("tie_word_embeddings") and "output.weight" in info["tensors"]:
        problems.append("output.weight written although the embeddings are tied")
    tcfg_file = model_dir / "tokenizer_config.json"
    template = chat_template(model_dir, json.loads(tcfg_file.read_text(encoding="utf-8")) if tcfg_file.is_file() else {})
    if isinstance(template, list):  # named templates: the default one is tokenizer.chat_template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and info["chat_template"] != template:
        problems.append("tokenizer.chat_template differs from the model's chat template")
    if info["n_tokens"] != cfg["vocab_size"]:
        problems.append(f"{info['n_tokens']} tokens, config vocab_size {cfg['vocab_size']}")
    if problems:
        raise UserError(f"{path}: GGUF read-back failed: {'; '.join(problems)}", exit_code=1)


def _gguf_outputs(path: Path, model_dir: Path, compute: str) -> tuple[list, list[int]]:
    """probe_outputs of the GGUF file loaded by transformers (dequantized), with the merged tokenizer."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF loader's per-tensor progress bar (plain tqdm) would flood the merge log: silence it here only.
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, compute))
    finally:
        gguf_utils.tqdm = bar
    outputs = probe_outputs(model.eval(), AutoTokenizer.from_pretrained(str(model_dir)))
    del model
    gc.collect()
    return outputs
