"""Torch-free safetensors reading: the checked header of a file, and exact positioned reads of its bytes.

Shared by the merge (`shards.py`, which adds torch dtypes) and the GGUF converter (which must not import torch).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import UserError

ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its dtype name, shape and absolute byte offset."""

    dtype: str
    shape: tuple[int, ...]
    start: int


def read_header(path: Path) -> dict[str, Entry]:
    """Parse and check a safetensors header; truncated or corrupt files raise UserError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file {size})")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    out: dict[str, Entry] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(meta["dtype"])
            item = ITEMSIZE[dtype]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * item or begin < 0:
            raise UserError(f"{path}: corrupt safetensors header: tensor {name} size does not match its shape")
        if end > data_len:
            raise UserError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte {8 + n + end}, file has {size}"
            )
        out[name] = Entry(dtype, shape, 8 + n + begin)
    return out


def pread_exact(fd: int, buf: bytearray | memoryview, offset: int, path: Path, name: str) -> None:
    """Fill `buf` from `fd` at `offset`; a short file is a UserError naming the file and tensor."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise UserError(f"{path}: truncated safetensors file while reading tensor {name}")
        done += got
