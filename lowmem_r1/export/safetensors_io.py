"""safetensors files read and written one tensor (or a few rows) at a time.

Why not `safetensors.safe_open`: it memory-maps the shard, and every page read stays resident, so RSS
grows to the shard's size. The safetensors format is an 8-byte length, a JSON header and raw bytes;
reading each tensor with a plain `readinto` keeps exactly one tensor in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from lowmem_r1.core.errors import UserError

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


def file_order(header: dict) -> list[tuple[str, dict]]:
    """(name, entry) pairs in the order their bytes lie in the file."""
    return sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])


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
    header, start = read_header(path)
    with open(path, "rb") as f:
        for name, entry in file_order(header):
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


def count_params(model_dir: Path) -> int:
    """Elements in all tensors of a model folder, from the headers alone."""
    return sum(math.prod(e["shape"]) for s in checkpoint_shards(model_dir) for e in read_header(s)[0].values())


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
