"""Streaming safetensors I/O: read tensors row block by row block, write shards tensor by tensor.

Reads use positioned reads (`os.pread`), not a memory map: pages of a mapped file count towards the process's
resident memory for as long as the file is open, so a mapped 2 GB shard reads back as 2 GB RSS. Writes plan every
tensor's offsets first, write the header, then append each tensor's bytes as they are produced, so no shard is ever
held in memory.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.errors import UserError
from exporter.safetensors_file import pread_exact
from exporter.safetensors_file import read_header as read_entries

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a safetensors file."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; truncated or corrupt files raise UserError naming the file."""
    return {name: TensorInfo(name, path, DTYPES[e.dtype], e.shape, e.start) for name, e in read_entries(path).items()}


def read_rows(info: TensorInfo, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
    """Rows `r0:r1` of a tensor (the whole tensor when not given), read into fresh memory."""
    shape = info.shape
    if r0 is None or not shape:
        r0, r1 = 0, shape[0] if shape else 1
    row = numel(shape[1:]) * itemsize(info.dtype) if shape else itemsize(info.dtype)
    count = (r1 - r0) * row
    buf = bytearray(count)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        pread_exact(fd, buf, info.start + r0 * row, info.path, info.name)
    finally:
        os.close(fd)
    if count == 0:
        return torch.empty((r1 - r0, *shape[1:]) if shape else (), dtype=info.dtype)
    t = torch.frombuffer(buf, dtype=info.dtype)
    return t.reshape((r1 - r0, *shape[1:]) if shape else ())


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9, '500MiB' -> 500*2**20 (the units transformers' max_shard_size accepts)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not m:
        raise UserError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MB or 1GiB")
    power = "KMGT".index(m.group(2)) + 1 if m.group(2) else 0
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base**power)


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


def plan_shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a bigger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes one safetensors file whose tensors are known up front; `write` appends bytes in plan order."""

    def __init__(self, path: Path, tensors: list[PlannedTensor]) -> None:
        self.path = path
        self.tensors = tensors
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in tensors:
            span = [offset, offset + t.nbytes]
            header[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": span}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = offset
        self.written = 0
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)

    def write(self, chunk: torch.Tensor) -> None:
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy() if chunk.numel() else b""
        self.f.write(data)
        self.written += chunk.numel() * chunk.element_size()

    def close(self) -> None:
        self.f.close()
        if self.written != self.total:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes of tensor data, planned {self.total}")


def write_shards(tmp: Path, planned: list[PlannedTensor], shard_bytes: int,
                 fill: Callable[[PlannedTensor, ShardWriter], None]) -> int:  # fmt: skip
    """The planned tensors, in order, streamed into safetensors shards of at most `shard_bytes` in `tmp` (+ the
    index when there are several): `fill(t, writer)` writes tensor t's bytes. Returns the shard count."""
    shards = plan_shards(planned, shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    for shard, fname in zip(shards, names, strict=True):
        writer = ShardWriter(tmp / fname, shard)
        try:
            for t in shard:
                fill(t, writer)
                weight_map[t.name] = fname
        except BaseException:
            writer.f.close()
            raise
        writer.close()
    if len(shards) > 1:
        total = sum(t.nbytes for t in planned)
        meta = {"total_parameters": sum(numel(t.shape) for t in planned), "total_size": total}  # as transformers 5
        index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return len(shards)
