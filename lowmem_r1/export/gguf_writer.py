"""gguf's GGUFWriter, with long metadata arrays packed in bulk and tensors written in pieces.

The stock writer packs every array element through `struct.pack` one at a time, with a type check per
element: for a 49k-token vocabulary plus 49k merges that is ~150k Python calls and ~0.2 s, more than
writing the 135M model's F16 tensors. Here, arrays of strings or of 32-bit integers are packed with a few
C-level calls instead; the bytes are the same (tests/test_gguf_writer.py compares them with the stock
writer). `write_tensor_pieces` streams one tensor in row chunks. Everything else is the stock code.
Imports gguf at its top: import this module lazily (gguf.py does, inside _write).
"""

from __future__ import annotations

import struct
import sys
from itertools import chain

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

_Q = struct.Struct("<Q")
_BULK = 256  # shorter arrays are not worth a special path


class GGUFWriter(gguf.GGUFWriter):
    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        packed = None
        if (vtype == gguf.GGUFValueType.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE
                and isinstance(val, (list, tuple)) and len(val) >= _BULK):
            packed = _pack_array(val, sub_type)
        if packed is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
        return (struct.pack("<I", vtype) if add_vtype else b"") + packed

    def write_tensor_pieces(self, pieces) -> int:
        """`write_tensor_data` for a tensor that arrives as consecutive byte pieces (row chunks), so it is
        never whole in memory and each piece is still in cache when written. Each piece is written before
        the next is asked for (pieces may reuse one buffer). Returns the bytes written."""
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
            raise ValueError(f"Expected output file to contain tensor info or weights, got {self.state}")
        if self.endianess != gguf.GGUFEndian.LITTLE or sys.byteorder != "little":
            raise ValueError("write_tensor_pieces writes little-endian files on little-endian machines only")
        file_id = next(i for i, tensors in enumerate(self.tensors) if tensors)
        fout = self.fout[file_id]
        name = next(iter(self.tensors[file_id]))
        info = self.tensors[file_id].pop(name)
        self.write_padding(fout, fout.tell())
        written = 0
        for piece in pieces:
            piece.tofile(fout)
            written += piece.nbytes
        if written != info.nbytes:
            raise ValueError(f"tensor {name}: {written} bytes written, {info.nbytes} announced in its header")
        self.write_padding(fout, written)
        self.state = WriterState.WEIGHTS
        return written


def _pack_array(val, sub_type) -> bytes | None:
    """Element type, count and elements, as the stock writer lays them out; None when not a bulk case."""
    T = gguf.GGUFValueType
    ltype = sub_type if sub_type is not None else T.get_type(val[0])
    head = struct.pack("<IQ", ltype, len(val))
    if ltype == T.STRING and all(type(v) is str for v in val):
        encoded = [v.encode("utf-8") for v in val]
        return head + b"".join(chain.from_iterable(zip(map(_Q.pack, map(len, encoded)), encoded)))
    # int subclasses (TokenType) are fine; bool is an int too, but the stock writer makes it BOOL
    if ltype == T.INT32 and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
        return head + np.asarray(val, dtype="<i4").tobytes()  # out-of-range values raise, as struct does
    return None
