"""The tensor bytes of a GGUF file, streamed: each planned tensor is converted a few rows at a time from
the memory-mapped shard and appended, so memory stays at one chunk whatever the model's size."""

from __future__ import annotations

import mmap
from itertools import groupby

from lowmem_r1.core.errors import UserError
from lowmem_r1.export.gguf_plan import PlannedTensor, TensorPlan
from lowmem_r1.export.safetensors_io import ST_DTYPES

# Source bytes converted per piece: small enough that a chunk is still in the CPU cache between being
# read, converted and written (SmolLM2's 538 MB to F16: 0.15 s, against 0.26 s a whole tensor at a time).
CHUNK_BYTES = 4 << 20


def permute(w, n_head: int):
    """HF rotary layout -> GGML's: within each head, interleave the two halves of the rotary dims."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_ggml(gguf, src, ttype, buffers: dict):
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


def pieces(gguf, m, start: int, t: PlannedTensor, buffers: dict):
    """One tensor of a memory-mapped safetensors file as ggml byte pieces, a few rows at a time (all rows
    when the q/k permutation needs them). The mapping is mmap'd, not read: no copy into a read buffer;
    each chunk's pages are dropped from the mapping once written (MADV_DONTNEED: the page cache keeps
    them), so resident memory stays at one chunk, not the file."""
    import torch

    shape = t.entry["shape"]
    rows = shape[0] if shape else 1
    a, b = t.entry["data_offsets"]
    if start + b > len(m):
        raise UserError(f"{t.shard}: file ends inside tensor data; the checkpoint is truncated (merge it again)")
    row_bytes = (b - a) // max(rows, 1)
    dtype = getattr(torch, ST_DTYPES[t.entry["dtype"]][0])
    step = rows if t.permute_heads else max(1, CHUNK_BYTES // max(row_bytes, 1))
    pos = start + a
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        src = torch.frombuffer(m, dtype=dtype, count=n * row_bytes // dtype.itemsize, offset=pos)
        src = src.reshape([n, *shape[1:]]) if shape else src.reshape(shape)
        yield to_ggml(gguf, permute(src, t.permute_heads) if t.permute_heads else src, t.ttype, buffers)
        del src
        if hasattr(m, "madvise"):  # not on Windows
            lo = pos - pos % mmap.PAGESIZE
            m.madvise(mmap.MADV_DONTNEED, lo, pos + n * row_bytes - lo)
        pos += n * row_bytes


def write_tensors(writer, gguf, plan: TensorPlan) -> None:
    """Every planned tensor's bytes, in plan order (computed tensors first, then shard by shard)."""
    buffers: dict = {}
    for t in plan.tensors:
        if t.shard is None:
            writer.write_tensor_pieces([to_ggml(gguf, t.data, t.ttype, buffers)])
    for shard, items in groupby((t for t in plan.tensors if t.shard is not None), key=lambda t: t.shard):
        # ACCESS_COPY: a private mapping is writable, which torch.frombuffer wants; nothing writes to it
        with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
            for t in items:  # file order, as planned
                writer.write_tensor_pieces(pieces(gguf, m, plan.starts[shard], t, buffers))
