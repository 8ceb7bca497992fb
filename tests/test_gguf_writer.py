"""lowmem_r1.export.gguf_writer writes the same bytes as gguf's stock GGUFWriter, only faster."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from lowmem_r1.export.gguf_writer import GGUFWriter

ARRAYS = {
    "tokens": [f"tok{i}" for i in range(300)] + ["", "Ġ", "é日本", "🦙 x", "a b"],
    "types": [gguf.TokenType.NORMAL] * 300 + [gguf.TokenType.CONTROL, gguf.TokenType.UNUSED, 7, -1],
    "ints": list(range(-200, 200)),
    "floats": [0.5] * 300,  # not a bulk type: the stock path
    "short": ["a", "b"],  # under the bulk threshold: the stock path
    "bools": [True, False] * 200,  # bool is an int, but gguf writes BOOL: the stock path
}


def _write(cls, path, tensors):
    w = cls(path, "llama")
    for key, val in ARRAYS.items():
        w.add_array(f"test.{key}", val)
    w.add_string("test.s", "plain")
    for name, arr in tensors.items():
        w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def test_same_bytes_as_stock_writer(tmp_path):
    tensors = {"a": np.arange(100, dtype=np.float32).reshape(10, 10), "b": np.ones(7, dtype=np.float16)}
    stock = _write(gguf.GGUFWriter, tmp_path / "stock.gguf", tensors)
    for arr in tensors.values():
        stock.write_tensor_data(arr)
    stock.close()
    fast = _write(GGUFWriter, tmp_path / "fast.gguf", tensors)
    a = tensors["a"]
    assert fast.write_tensor_pieces([a[:3].reshape(-1), a[3:].reshape(-1)]) == a.nbytes  # in two pieces
    fast.write_tensor_pieces([tensors["b"]])
    fast.close()
    assert (tmp_path / "fast.gguf").read_bytes() == (tmp_path / "stock.gguf").read_bytes()
    r = gguf.GGUFReader(str(tmp_path / "fast.gguf"))
    assert r.get_field("test.tokens").contents()[-3:] == ["é日本", "🦙 x", "a b"]
    assert r.get_field("test.types").contents()[-2:] == [7, -1]


def test_pieces_must_add_up_to_the_announced_size(tmp_path):
    w = _write(GGUFWriter, tmp_path / "x.gguf", {"a": np.zeros(8, dtype=np.float32)})
    with pytest.raises(ValueError, match="tensor a: 16 bytes written, 32 announced"):
        w.write_tensor_pieces([np.zeros(4, dtype=np.float32)])
    w.close()


@pytest.mark.parametrize("cls", [gguf.GGUFWriter, GGUFWriter])
def test_out_of_range_int_raises_like_the_stock_writer(cls, tmp_path):
    w = cls(tmp_path / "x.gguf", "llama")
    w.add_array("test.big", [1] * 300 + [2 ** 40])
    w.write_header_to_file()
    with pytest.raises((OverflowError, struct.error)):
        w.write_kv_data_to_file()
    w.close()
