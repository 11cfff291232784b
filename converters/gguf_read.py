"""A fast reader of a GGUF file's header: metadata key/values and tensor infos, typed by gguf-py's enums.

gguf-py's `GGUFReader` builds a numpy view per field and per array element, which took 38 s on a 150k-token
vocabulary; this walks the same layout (the GGUF spec: magic, version, counts, key/value pairs, tensor infos) with
`struct` over a read-only memory map, numeric arrays as one numpy view each, in a fraction of a second. Value types
and their numpy types are gguf-py's (`GGUFValueType`, `GGUFReader.gguf_scalar_to_np`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType

from exporter.errors import UserError

_NUMPY = GGUFReader.gguf_scalar_to_np


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: GGUF name, shape in GGUF order (fastest dimension first), type, data offset."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # relative to the start of the data section


@dataclass
class GGUFHeader:
    """What precedes the tensor data of a GGUF file."""

    version: int
    kv: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int | None = None  # with `tensors`: where the data section starts (aligned to general.alignment)
    byte_order: str = "<"  # struct's "<" or ">": a big-endian file's numbers


class _Cursor:
    """Little- or big-endian reads from a buffer; IndexError or struct.error past its end."""

    def __init__(self, buf: Any, order: str) -> None:
        self.buf, self.pos, self.order = buf, 0, order
        self._u64 = struct.Struct(order + "Q")

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        st = struct.Struct(self.order + fmt)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def strings(self, n: int) -> list[str]:
        """`n` strings (u64 length + UTF-8 bytes each): the vocabulary, so a tight loop."""
        buf, pos, u64, out = self.buf, self.pos, self._u64.unpack_from, []
        for _ in range(n):
            (k,) = u64(buf, pos)
            end = pos + 8 + k
            if end > len(buf):
                raise IndexError("string past the end of the file")
            out.append(buf[pos + 8 : end].decode("utf-8", "replace"))
            pos = end
        self.pos = pos
        return out

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.strings(1)[0]
        if vtype == GGUFValueType.ARRAY:
            sub, n = self.unpack("IQ")
            sub = GGUFValueType(sub)
            if sub == GGUFValueType.STRING:
                return self.strings(n)
            if sub in _NUMPY:
                dtype = np.dtype(_NUMPY[sub]).newbyteorder(self.order)
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()  # the map closes
                self.pos += arr.nbytes
                return arr
            return [self.value(sub) for _ in range(n)]
        dtype = np.dtype(_NUMPY[vtype]).newbyteorder(self.order)
        (v,) = np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos)
        self.pos += dtype.itemsize
        return v.item()


def read(path: Path | str, tensors: bool = False) -> GGUFHeader:
    """Metadata (numeric arrays as numpy arrays, string arrays as lists) and, with `tensors`, the tensor infos."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if path.stat().st_size < 24:
                raise UserError(f"{path}: not a GGUF file ({path.stat().st_size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, tensors)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


def _parse(path: Path, buf: Any, with_tensors: bool) -> GGUFHeader:
    if struct.unpack_from("<I", buf)[0] != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<" if version & 0xFFFF else ">"  # a big-endian file's version reads byte-swapped
    cur = _Cursor(buf, order)
    cur.pos = 4
    version, n_tensors, n_kv = cur.unpack("IQQ")
    if version < 2:
        raise UserError(f"{path}: GGUF version {version} is too old")
    try:
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.strings(1)[0]
            (vtype,) = cur.unpack("I")
            kv[key] = cur.value(GGUFValueType(vtype))
        infos = []
        for _ in range(n_tensors if with_tensors else 0):
            name = cur.strings(1)[0]
            (n_dims,) = cur.unpack("I")
            dims = cur.unpack(f"{n_dims}Q")
            ttype, offset = cur.unpack("IQ")
            infos.append(TensorInfo(name, tuple(int(d) for d in dims), GGMLQuantizationType(ttype), offset))
    except (struct.error, IndexError) as e:
        raise UserError(f"{path}: truncated GGUF header ({e})") from None
    except ValueError as e:  # an unknown value or tensor type number
        raise UserError(f"{path}: unknown GGUF type ({e})") from None
    data_offset = None
    if with_tensors:
        align = kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0:
            raise UserError(f"{path}: general.alignment is {align!r}; expected a positive integer")
        data_offset = -(-cur.pos // align) * align  # the tensor infos' end, padded to the alignment
    return GGUFHeader(version, kv, infos, data_offset, order)


# tensor types read_tensor returns as numbers (1-D factor tensors and the like; quantized blocks are not decoded)
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def read_tensor(path: Path | str, name: str, header: GGUFHeader | None = None) -> np.ndarray | None:
    """The values of an F32 or F16 tensor `name` as float32, in GGUF order flattened; None when the file has no such
    tensor. UserError when it is of another type or its data lies past the end of the file. `header`: the file's
    `read(path, tensors=True)` when the caller has it (else it is read here)."""
    path = Path(path)
    header = header if header is not None else read(path, tensors=True)
    info = next((t for t in header.tensors if t.name == name), None)
    if info is None:
        return None
    if info.type not in _PLAIN:
        raise UserError(f"{path}: tensor {name} is {info.type.name}; expected F32 or F16")
    dtype = np.dtype(_PLAIN[info.type]).newbyteorder(header.byte_order)
    count = int(np.prod(info.shape, dtype=np.int64))
    start = (header.data_offset or 0) + info.offset
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise UserError(f"{path}: tensor {name}'s data lies past the end of the file (truncated?)")
    return np.frombuffer(raw, dtype=dtype).astype(np.float32)


def read_kv(path: Path | str) -> dict[str, Any]:
    """All metadata key/values of a GGUF file."""
    return read(path).kv
