"""Streaming HF safetensors -> GGUF conversion, several output types from one pass over the model.

Tensors are read memory-mapped, a block of rows at a time, converted to f32, transformed (q/k permutation, norm
shift, vocab truncation) and written through gguf-py's GGUFWriter: tensor infos first, then data tensor by tensor,
so peak memory is one block of rows per output, never the model.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
from exporter.converters import gguf_arch, gguf_vocab

from exporter.errors import UserError

T = gguf.GGMLQuantizationType
NUMPY_TYPES: dict[str, T] = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
CHUNK_BYTES = 32 << 20  # f32 bytes per block of rows

logging.getLogger("gguf").setLevel(logging.ERROR)  # duplicate-key notices are expected when an arch overrides
logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)


@dataclass
class Written:
    """One written GGUF file and the per-tensor type decisions worth reporting."""

    kind: str
    path: Path
    types: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


@dataclass
class Source:
    """Safetensors weights of a model dir, read by explicit `pread` of row ranges.

    No mmap: pages of a mapped file count towards the process's resident memory once touched, so a memory-mapped
    pass over a model grows RSS to the model size; reading row blocks keeps it at one block.
    """

    files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]
    entries: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (dtype, absolute data offset)
    _fds: dict[Path, int] = field(default_factory=dict)

    @classmethod
    def open(cls, model_dir: Path) -> Source:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            parts = sorted(set(weight_map.values()))
        else:
            parts = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not parts:
            raise UserError(f"{model_dir}: no *.safetensors weights (GGUF export reads safetensors only)")
        src = cls({}, {})
        for part in parts:
            path = model_dir / part
            if not path.is_file():
                raise UserError(f"{path}: listed in model.safetensors.index.json but missing")
            fd = os.open(path, os.O_RDONLY)
            src._fds[path] = fd
            try:
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, n, 8))
            except (struct.error, ValueError) as e:
                raise UserError(f"{path}: not a safetensors file ({e})") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}; expected BF16, F16 or F32")
                src.files[name] = path
                src.shapes[name] = tuple(info["shape"])
                src.entries[name] = (info["dtype"], 8 + n + info["data_offsets"][0])
        return src

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (all of a 0/1-D tensor) as float32."""
        dtype, offset = self.entries[name]
        np_type, size = _DTYPES[dtype]
        shape = self.shapes[name]
        if len(shape) < 2:
            start, stop, row = 0, 1, int(np.prod(shape, dtype=np.int64))
        else:
            row = int(np.prod(shape[1:], dtype=np.int64))
        count = (stop - start) * row
        buf = os.pread(self._fds[self.files[name]], count * size, offset + start * row * size)
        raw = np.frombuffer(buf, dtype=np_type, count=count)
        if dtype == "BF16":  # bf16 is the top half of an f32: widen into a preallocated buffer in one pass
            out = np.zeros(count, dtype=np.uint32)
            out.view(np.uint16)[1::2] = raw  # little-endian: high half-word
            out = out.view(np.float32)
        else:
            out = raw.astype(np.float32)
        return out.reshape((stop - start, *shape[1:]) if len(shape) >= 2 else shape)


def _rows_per_chunk(shape: tuple[int, ...]) -> int:
    row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else max(1, int(np.prod(shape)))
    return max(1, CHUNK_BYTES // (4 * row_elems))


def iter_f32(src: Source, spec: gguf_arch.TensorSpec) -> Iterator[np.ndarray]:
    """The spec's data as f32 numpy blocks of whole rows, in output row order."""
    if spec.data is not None:
        yield spec.data.astype(np.float32)
        return
    assert spec.source is not None
    shape = spec.shape
    if len(shape) < 2:
        t = src.rows(spec.source, 0, 1)
        yield t + np.float32(spec.add) if spec.add else t
        return
    n_rows, step = shape[0], _rows_per_chunk(shape)
    idx = spec.row_index
    contiguous = idx is None or np.array_equal(idx, np.arange(len(idx)))
    full = None if contiguous else src.rows(spec.source, 0, src.shapes[spec.source][0])
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        out = src.rows(spec.source, r0, r1) if full is None else full[idx[r0:r1]]
        yield out + np.float32(spec.add) if spec.add else out


def choose_type(spec: gguf_arch.TensorSpec, kind: str, output_like: bool) -> tuple[T, str | None]:
    """GGML type of one tensor in a `kind` file, and why it differs from the file's type (None when it doesn't)."""
    want = NUMPY_TYPES[kind]
    if len(spec.shape) <= 1 or spec.name.endswith("_norm.weight") or not spec.name.endswith(".weight"):
        return T.F32, None  # 1-D, norms and biases stay f32 in every llama.cpp file
    if kind == "q4_0" and output_like:
        return T.Q8_0, "output projection kept at q8_0 (llama.cpp keeps it at 6+ bits)"
    block, _ = gguf.GGML_QUANT_SIZES[want]
    if spec.shape[-1] % block != 0:
        return T.F16, f"row size {spec.shape[-1]} not a multiple of {want.name} block {block}: f16"
    return want, None


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


_ROW_QUANTS = {T.Q8_0: gguf.quants.Q8_0, T.Q4_0: gguf.quants.Q4_0, T.BF16: gguf.quants.BF16}
_SLICE_ELEMS = 1 << 20


def quantize(block: np.ndarray, qtype: T) -> np.ndarray:
    """Same bytes as `gguf.quants.quantize`, faster: f16 through torch's vectorised cast (IEEE round-to-nearest-even
    like numpy's), block quants over ~1M-element row slices instead of gguf-py's 16-row groups."""
    if qtype == T.F16 and block.size >= _SLICE_ELEMS:
        import torch

        return torch.from_numpy(np.ascontiguousarray(block)).half().numpy()
    if qtype in _ROW_QUANTS and block.ndim == 2 and block.size >= _SLICE_ELEMS:
        step = max(1, _SLICE_ELEMS // block.shape[1])
        quant = _ROW_QUANTS[qtype]
        return np.concatenate([quant.quantize_rows(block[r : r + step]) for r in range(0, block.shape[0], step)])
    return gguf.quants.quantize(block, qtype)


class _Stream:
    """Array-like that GGUFWriter.write_tensor_data writes by calling `tofile`: converts block by block."""

    def __init__(self, blocks: Callable[[], Iterator[np.ndarray]], qtype: T, nbytes: int, tick: Callable[[int], None]):
        self.blocks, self.qtype, self.nbytes, self.tick = blocks, qtype, nbytes, tick

    def tofile(self, fout: BinaryIO) -> None:
        written = 0
        for block in self.blocks():
            data = quantize(block, self.qtype)
            data.tofile(fout)
            written += data.nbytes
            self.tick(data.nbytes)
        if written != self.nbytes:
            raise RuntimeError(f"wrote {written} bytes for a tensor planned at {self.nbytes}")


def _metadata(w: gguf.GGUFWriter, model_dir: Path, name: str | None) -> None:
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, name, total)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


def plan(model_dir: Path) -> tuple[gguf_arch.Arch, dict[str, Any], Source]:
    """Architecture, config and the opened weights; UserError for anything unsupported."""
    hp = gguf_arch.load_hparams(model_dir)
    arch = gguf_arch.arch_for(hp, model_dir)
    return arch, hp, Source.open(model_dir)


def convert(
    model_dir: Path,
    outputs: dict[str, Path],
    chat_template: str | None,
    eot_tokens: list[str],
    progress: Callable[[int, int], None] | None = None,
    model_name: str | None = None,
) -> tuple[list[Written], gguf_vocab.Vocab]:
    """Write one GGUF per `outputs` kind (f32, f16, bf16, q8_0, q4_0) reading the model once, tensor by tensor."""
    for kind in outputs:
        if kind not in NUMPY_TYPES:
            raise UserError(f"GGUF type {kind!r} is not a direct conversion type; use one of {', '.join(NUMPY_TYPES)}")
    arch, hp, src = plan(model_dir)
    vocab = gguf_vocab.build_vocab(model_dir, hp, arch.name, eot_tokens)
    n_vocab_real = len(vocab.tokens) if arch.gguf_arch == gguf.MODEL_ARCH.GEMMA3 else None
    specs = gguf_arch.plan_tensors(arch, hp, src.shapes, n_vocab_real)
    has_output = any(s.name == "output.weight" for s in specs)

    if not outputs:
        raise UserError("no GGUF output type requested")
    writers: list[tuple[Written, gguf.GGUFWriter, dict[str, T]]] = []
    specs_all: list[gguf_arch.TensorSpec] = []
    for kind, path in outputs.items():
        w = gguf.GGUFWriter(path=None, arch=arch.name)
        specs_all = gguf_arch.extra_tensors(arch, hp, w) + specs
        rec, types = Written(kind, path), {}
        for spec in specs_all:
            output_like = spec.name == "output.weight" or (not has_output and spec.name == "token_embd.weight")
            qtype, why = choose_type(spec, kind, output_like)
            types[spec.name] = qtype
            rec.types[spec.name] = qtype.name
            if why:
                rec.fallbacks.append(f"{spec.name}: {why}")
            w.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), _nbytes(spec.shape, qtype), raw_dtype=qtype)
        _metadata(w, model_dir, model_name)
        arch.params(hp, w)
        w.add_file_type(FILE_TYPES[kind])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gguf_vocab.write_vocab(w, vocab, chat_template)
        writers.append((rec, w, types))

    total = sum(_nbytes(s.shape, t[s.name]) for _, _, t in writers for s in specs_all)
    done = 0

    lock = threading.Lock()

    def tick(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress:
                progress(done, total)

    for rec, w, _ in writers:
        w.write_header_to_file(path=rec.path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    # one thread per output file: numpy's quantization releases the GIL, so the outputs convert in parallel
    with ThreadPoolExecutor(max_workers=len(writers)) as pool:
        for spec in specs_all:
            single = len(spec.shape) < 2 or spec.shape[0] <= _rows_per_chunk(spec.shape)
            cached = list(iter_f32(src, spec)) if single else None  # small tensors: convert once for all outputs
            jobs = []
            for _rec, w, types in writers:
                blocks = (lambda c=cached: iter(c)) if cached is not None else (lambda s=spec: iter_f32(src, s))
                stream = _Stream(blocks, types[spec.name], _nbytes(spec.shape, types[spec.name]), tick)
                jobs.append(pool.submit(w.write_tensor_data, stream, tensor_endianess=gguf.GGUFEndian.LITTLE))
            for job in jobs:
                job.result()
    for _, w, _ in writers:
        w.close()
    return [rec for rec, _, _ in writers], vocab
