"""`lowmem-r1 merge`: adapter + 16-bit base -> merged folder (+ GGUF files, + Modelfile), all verified.

The command is a list of steps, each a function of the modules below it: decide what to do and refuse
bad input before any work (prepare), merge the weights and check them against peft (merge_lora,
parity), write and check each GGUF type (gguf), write the Modelfile (ollama) and merge_info.json.
Everything is written into a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_dir, check_free_space, refuse_existing
from lowmem_r1.export import gguf as gguf_export
from lowmem_r1.export.gguf_plan import LLAMA_QUANTIZE_TYPES, estimate_size, parse_types
from lowmem_r1.export.merge_lora import Lora, MergeReport, copy_model_files, merge_weights, read_adapter
from lowmem_r1.export.ollama import model_name, write_modelfile
from lowmem_r1.export.parity import ParityReport, ReferenceOutputs, verify_merge
from lowmem_r1.export.safetensors_io import checkpoint_shards
from lowmem_r1.export.source import (
    MergeSource,
    check_base,
    check_dtype,
    default_dtype,
    local_model_dir,
    resolve_source,
    target_dtype,
    use_16bit_original,
)


@dataclass
class MergeResult:
    out: Path
    merge: MergeReport
    parity: ParityReport | None
    ggufs: list[gguf_export.GGUFReport] = field(default_factory=list)
    modelfile: Path | None = None

    def next_steps(self) -> list[str]:
        """Where the outputs are and the commands that run them."""
        lines = [f"merged model: {self.out}"]
        lines += [f"GGUF: {g.path}  (llama.cpp: llama-cli -m {g.path} --jinja)" for g in self.ggufs]
        if self.modelfile:
            name = model_name(self.out)
            lines.append(f"Ollama: cd {self.out} && ollama create {name} -f Modelfile && ollama run {name}")
        return lines


@dataclass
class MergeJob:
    """Everything the command decided before writing anything."""
    src: MergeSource
    base_dir: Path
    lora: Lora
    out: Path
    dtype: str  # torch dtype name of the merged weights
    gguf_types: list[str]  # pure-Python types first: the k-quants reuse the F16 file


def merge(target: str | Path | None = None, base: str | None = None, out: Path | None = None,
          dtype: str | None = None, gguf: list[str] | str | None = None, ollama: bool = False,
          force: bool = False, verify: bool = True, log: Callable[[str], None] = print) -> MergeResult:
    """`lowmem-r1 merge`: adapter + base -> merged folder (+ GGUF files, + Modelfile), all verified.
    Everything is written into a temporary folder and renamed into place at the end."""
    job = prepare(target, base, out, dtype, gguf, ollama, force, log)
    reference = ReferenceOutputs()  # the merged model's probe outputs, shared by every check below
    with atomic_dir(job.out, force, "merged model", inputs=(job.src.adapter, job.src.base)) as tmp:
        result = merge_and_check(job, tmp, verify, reference, log)
        result.ggufs = export_ggufs(job, tmp, verify, reference, log)
        if ollama:
            chosen = result.ggufs[-1].path.name
            result.modelfile = job.out / write_modelfile(tmp, chosen).name
            log(f"wrote Modelfile (FROM ./{chosen})")
        write_merge_info(tmp, job, result)
    return result


def prepare(target, base, out, dtype, gguf, ollama: bool, force: bool, log) -> MergeJob:
    """Resolve and check every input; bad input fails here, before any work is done."""
    check_dtype(dtype)
    gguf_types = parse_types(gguf)  # unknown types / missing llama-quantize fail before any work
    gguf_types.sort(key=lambda t: t in LLAMA_QUANTIZE_TYPES)  # k-quants reuse the F16 file
    if ollama and not gguf_types:
        gguf_types = ["f16"]
    src = resolve_source(target, base)
    use_16bit_original(src, log)
    out = Path(out) if out else src.default_out
    refuse_existing(out, force, "merged model", inputs=(src.adapter, src.base))
    base_dir = local_model_dir(src.base)
    cfg = check_base(base_dir)
    job = MergeJob(src, base_dir, read_adapter(src.adapter), out, target_dtype(dtype, cfg), gguf_types)
    _check_space(job, default_dtype(cfg))
    return job


def _check_space(job: MergeJob, src_dtype: str) -> None:
    base_bytes = sum(s.stat().st_size for s in checkpoint_shards(job.base_dir))
    est = base_bytes * {"float32": 4}.get(job.dtype, 2) // {"float32": 4}.get(src_dtype, 2)
    needed = est + sum(estimate_size(est, job.dtype, t) for t in job.gguf_types)
    check_free_space(job.out.parent, int(needed * 1.05) + (64 << 20), "the merged model and GGUF files")


def merge_and_check(job: MergeJob, tmp: Path, verify: bool, reference: ReferenceOutputs, log) -> MergeResult:
    """The merged weights and model files in `tmp`, checked against peft (a failed check writes nothing)."""
    src = job.src
    log(f"merging {src.adapter} into {src.base} ({job.dtype}) -> {job.out}")
    if src.backend == "unsloth":
        log("  unsloth run: merged with the same streaming 16-bit merge (equivalent to merged_16bit)")
    if src.load_in_4bit:
        log("  trained on a 4-bit base: merging onto the 16-bit weights from disk, not the 4-bit copy")
    report = merge_weights(job.base_dir, job.lora, tmp, job.dtype, log)
    copy_model_files(job.base_dir, src.adapter, tmp, job.dtype)
    log(f"merged {report.merged} LoRA weights into {report.tensors} tensors in {report.seconds:.1f}s")
    parity = None
    if verify:
        parity = verify_merge(job.base_dir, src.adapter, tmp, job.dtype, reference)
        log(parity.line())
        if not parity.ok:
            raise UserError(f"merge check failed: {parity.line()}; the output was not written. "
                            "Is --base the model this adapter was trained on?", exit_code=1)
    return MergeResult(job.out, report, parity)


def export_ggufs(job: MergeJob, tmp: Path, verify: bool, reference: ReferenceOutputs,
                 log) -> list[gguf_export.GGUFReport]:
    """Each asked-for GGUF type from the merged folder, with paths as they will be after the rename."""
    name = job.src.export_name()
    kquants = [t for t in job.gguf_types if t in LLAMA_QUANTIZE_TYPES]
    scratch_f16 = bool(kquants) and "f16" not in job.gguf_types
    if scratch_f16:  # llama-quantize starts from F16; make it once for all k-quants, drop it after
        gguf_export.export(tmp, tmp / "model-f16.gguf", "f16", verify=False, log=log, name=name)
    reports = []
    for t in job.gguf_types:
        rep = gguf_export.export(tmp, tmp / f"model-{t}.gguf", t, verify=verify, log=log, name=name,
                                 reference=reference)
        rep.path = job.out / rep.path.name
        reports.append(rep)
    if scratch_f16:
        (tmp / "model-f16.gguf").unlink()
    return reports


def write_merge_info(tmp: Path, job: MergeJob, result: MergeResult) -> None:
    (tmp / "merge_info.json").write_text(json.dumps({
        "adapter": str(job.src.adapter), "base": str(job.src.base), "dtype": job.dtype, "backend": job.src.backend,
        "parity": None if result.parity is None else result.parity.__dict__,
        "gguf": [{"file": g.path.name, "type": g.qtype} for g in result.ggufs],
    }, indent=2, default=str) + "\n")
