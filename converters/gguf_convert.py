"""Streaming HF safetensors -> GGUF conversion, several output types from one pass over the model.

gguf-py's GGUFWriter writes each file's header, metadata and tensor infos; that fixes where every tensor's data
lies. The data is then converted in blocks of whole rows by a pool of threads (numpy releases the GIL): each block
is read once with `pread`, transformed (q/k permutation, norm shift, vocab truncation), encoded for every output
type and written with `pwrite` at its place in every file. Peak memory is a few blocks of rows, never the model.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from exporter.converters import gguf_arch, gguf_quant, gguf_vocab

from exporter import safetensors_file
from exporter.config import read_json
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
BLOCK_ELEMS = 1 << 18  # elements per block of rows (1 MiB as f32: the working set of a block stays in L2)


@dataclass
class Written:
    """One written GGUF file and the per-tensor type decisions worth reporting."""

    kind: str
    path: Path
    types: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}  # bf16 is read as its bits


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
            weight_map = read_json(index)["weight_map"]
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
            for name, entry in safetensors_file.read_header(path).items():
                if entry.dtype not in _DTYPES:
                    raise UserError(f"{path}: tensor {name} has dtype {entry.dtype}; expected BF16, F16 or F32")
                src.files[name] = path
                src.shapes[name] = entry.shape
                src.entries[name] = (entry.dtype, entry.start)
            src._fds[path] = os.open(path, os.O_RDONLY)
        return src

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def raw(self, name: str, start: int, stop: int, scratch: gguf_quant.Scratch | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor seen as a matrix of its last axis (all of a 0/1-D tensor) in its stored
        dtype (bf16 as uint16 bits), read into `scratch`'s buffer when given."""
        dtype, offset = self.entries[name]
        np_type = _DTYPES[dtype]
        size = np.dtype(np_type).itemsize
        shape = self.shapes[name]
        if len(shape) < 2:
            start, stop, row = 0, 1, int(np.prod(shape, dtype=np.int64))
        else:
            row = shape[-1]
        count = (stop - start) * row
        buf = scratch.take("read", (count * size,), np.uint8) if scratch is not None else bytearray(count * size)
        path = self.files[name]
        safetensors_file.pread_exact(self._fds[path], buf, offset + start * row * size, path, name)
        out = np.frombuffer(buf, dtype=np_type, count=count)
        return out.reshape((stop - start, row) if len(shape) >= 2 else shape)


def check_finite(model_dir: Path) -> None:
    """Refuse a model whose weights hold inf/nan: one read of every tensor, block by block (for quantizers that
    would carry them into their output)."""
    src = Source.open(model_dir)
    scratch = gguf_quant.Scratch()
    try:
        for name, shape in src.shapes.items():
            rows = int(np.prod(shape[:-1])) if len(shape) >= 2 else 1  # `raw` rows: the last dim's vectors
            step = max(1, BLOCK_ELEMS // shape[-1]) if len(shape) >= 2 else 1
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                amax = gguf_quant.max_abs(src.raw(name, r0, r1, scratch), src.entries[name][0])
                if not math.isfinite(amax):
                    where = f"{src.files[name]}: tensor {name}"
                    raise UserError(f"{where}: non-finite values (inf/nan) in rows {r0}-{r1 - 1}")
    finally:
        src.close()


def _to_f32(raw: np.ndarray, dtype: str, scratch: gguf_quant.Scratch) -> np.ndarray:
    """A block as float32 in `scratch` (an f32 block read into scratch is already that)."""
    if dtype == "BF16":
        return gguf_quant.bf16_to_f32(raw, scratch)
    if dtype == "F32":
        return raw
    out = scratch.take("f32", raw.shape, np.float32)
    np.copyto(out, raw)
    return out


def _blocks(spec: gguf_arch.TensorSpec) -> list[tuple[int, int]]:
    """Row ranges a tensor is converted in: blocks of about BLOCK_ELEMS, never across two stacked sources."""
    if len(spec.shape) < 2:
        return [(0, 1)]
    n_rows = spec.rows
    step = max(1, BLOCK_ELEMS // spec.shape[-1])
    per = n_rows // len(spec.stack) if spec.stack else n_rows
    return [(r0, min(s0 + per, r0 + step)) for s0 in range(0, n_rows, per) for r0 in range(s0, s0 + per, step)]


def choose_type(spec: gguf_arch.TensorSpec, kind: str, output_like: bool) -> tuple[T, str | None]:
    """GGML type of one tensor in a `kind` file, and why it differs from the file's type (None when it doesn't)."""
    want = NUMPY_TYPES[kind]
    if len(spec.shape) <= 1 or spec.name.endswith("_norm.weight") or not spec.name.endswith(".weight"):
        return T.F32, None  # 1-D, norms and biases stay f32 in every llama.cpp file
    if spec.name.endswith((".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")):
        return T.F32, None  # MoE routers (and Qwen2-MoE's shared-expert gate) stay f32 in every llama.cpp file
    if kind == "q4_0" and output_like:
        return T.Q8_0, "output projection kept at q8_0 (llama.cpp keeps it at 6+ bits)"
    block, _ = gguf.GGML_QUANT_SIZES[want]
    if spec.shape[-1] % block != 0:
        return T.F16, f"row size {spec.shape[-1]} not a multiple of {want.name} block {block}: f16"
    return want, None


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _metadata(w: gguf.GGUFWriter, model_dir: Path, name: str | None, arch: gguf_arch.Arch, rstrip: bool) -> None:
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, name, total)
    meta.name = gguf_arch.model_name(arch, meta.name or model_dir.name, rstrip)
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


def plan(model_dir: Path) -> tuple[gguf_arch.Arch, dict[str, Any], Source]:
    """Architecture, config and the opened weights; UserError for anything unsupported, metadata the architecture
    cannot write included (its keys go to a writer that writes nothing: no tensor is read)."""
    hp = gguf_arch.load_hparams(model_dir)
    arch = gguf_arch.arch_for(hp, model_dir)
    src = Source.open(model_dir)
    try:
        gguf_arch.check_geometry(arch, hp, src.shapes, model_dir)
        dry = gguf.GGUFWriter(path=None, arch=arch.name)
        arch.extra(hp, dry)
        arch.params(hp, dry)
    except BaseException:
        src.close()
        raise
    return arch, hp, src


@dataclass
class _Out:
    """One output file being filled: its fd, each tensor's type and absolute data offset."""

    rec: Written
    fd: int
    types: dict[str, T]
    offsets: dict[str, int]


def _write_head(w: gguf.GGUFWriter, rec: Written, specs: list[gguf_arch.TensorSpec], types: dict[str, T]) -> _Out:
    """Header, metadata and tensor infos through GGUFWriter; returns the file opened for the tensor data."""
    path = rec.path
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    finally:
        w.close()  # also when a write failed (a full disk): no file left open
    pos = gguf.GGUFWriter.ggml_pad(path.stat().st_size, w.data_alignment)  # data starts aligned after the infos
    offsets = {}
    for spec in specs:  # the order the infos were added in, which is the order of their offsets
        offsets[spec.name] = pos
        pos += gguf.GGUFWriter.ggml_pad(_nbytes(spec.shape, types[spec.name]), w.data_alignment)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, pos)  # the final size, its blocks allocated up front (faster writes); padding reads 0
    except OSError:
        os.close(fd)
        raise
    return _Out(rec, fd, types, offsets)


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_scratch = threading.local()


def _check_block(src: Source, spec: gguf_arch.TensorSpec, r0: int, r1: int, amax: float, outs: list[_Out]) -> None:
    """Nothing non-finite goes into a GGUF: no inf/nan in the weights, and no value (or block scale) that overflows
    the type it is written as."""
    if math.isfinite(amax) and all(amax < gguf_quant.OVERFLOW[o.types[spec.name]] for o in outs):
        return
    where = f"{src.files[spec.source]}: tensor {spec.source}" if spec.source else f"generated tensor {spec.name}"
    rows = f"rows {r0}-{r1 - 1}" if len(spec.shape) >= 2 else "its values"
    if not math.isfinite(amax):
        raise UserError(f"{where}: non-finite values (inf/nan) in {rows}; a GGUF must not carry them")
    qtype = next(o.types[spec.name] for o in outs if amax >= gguf_quant.OVERFLOW[o.types[spec.name]])
    raise UserError(
        f"{where}: |value| up to {amax:g} in {rows} overflows {qtype.name} (float16 range); use --type bf16 or f32"
    )


def _convert_block(src: Source, spec: gguf_arch.TensorSpec, r0: int, r1: int, outs: list[_Out]) -> int:
    """Rows [r0, r1) of one output tensor: read once, encoded and written into every output file; bytes written."""
    if not hasattr(_scratch, "buffers"):
        _scratch.buffers = gguf_quant.Scratch()
    scratch: gguf_quant.Scratch = _scratch.buffers
    raw, dtype = None, "F32"
    if spec.data is not None:
        x = (spec.data if len(spec.shape) < 2 else spec.data[r0:r1]).astype(np.float32)
    else:
        name, first = spec.part(r0)  # stacked experts: this block's expert and its first row
        dtype = src.entries[name][0]
        idx = spec.row_index
        if len(spec.shape) < 2:
            raw = src.raw(name, 0, 1, scratch)
        elif idx is None:
            raw = src.raw(name, r0 - first, r1 - first, scratch)
        else:  # permuted rows: read the span they come from, then gather
            want = idx[r0:r1]
            lo = int(want.min())
            raw = src.raw(name, lo, int(want.max()) + 1, scratch)[want - lo]
        x = None
    amax = gguf_quant.max_abs(x, "F32") if raw is None else gguf_quant.max_abs(raw, dtype)
    _check_block(src, spec, r0, r1, amax + abs(spec.add), outs)
    written = 0
    for out in outs:
        qtype = out.types[spec.name]
        if qtype == T.F16 and dtype == "F16" and not spec.add:
            data = raw  # already the bytes to write
        elif qtype == T.F16 and dtype == "BF16" and not spec.add:
            data = gguf_quant.bf16_to_f16(raw, scratch)  # exact without the f32 detour
        else:
            if x is None:
                x = _to_f32(raw, dtype, scratch)
                if spec.add:
                    x += np.float32(spec.add)
            data = gguf_quant.encode(x, qtype, scratch)
        row_bytes = _nbytes(spec.shape, qtype) // spec.rows
        _pwrite(out.fd, data, out.offsets[spec.name] + r0 * row_bytes)
        written += data.nbytes
    return written


def convert(
    model_dir: Path,
    outputs: dict[str, Path],
    chat_template: str | None,
    eot_tokens: list[str],
    progress: Callable[[int, int], None] | None = None,
    model_name: str | None = None,
    threads: int | None = None,
    vocab: gguf_vocab.Vocab | None = None,
) -> tuple[list[Written], gguf_vocab.Vocab]:
    """Write one GGUF per `outputs` kind (f32, f16, bf16, q8_0, q4_0) reading the model once, block by block;
    `vocab`: the model's, already read by `gguf_vocab.build_vocab` with `eot_tokens` (read here otherwise)."""
    for kind in outputs:
        if kind not in NUMPY_TYPES:
            raise UserError(f"GGUF type {kind!r} is not a direct conversion type; use one of {', '.join(NUMPY_TYPES)}")
    if not outputs:
        raise UserError("no GGUF output type requested")
    arch, hp, src = plan(model_dir)
    if vocab is None:
        vocab = gguf_vocab.build_vocab(model_dir, hp, arch, eot_tokens)
    n_vocab_real = len(vocab.tokens) if arch.gguf_arch == gguf.MODEL_ARCH.GEMMA3 else None
    specs = gguf_arch.plan_tensors(arch, hp, src.shapes, n_vocab_real)
    has_output = any(s.name == "output.weight" for s in specs)

    outs: list[_Out] = []
    specs_all: list[gguf_arch.TensorSpec] = []
    try:
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
                nbytes = _nbytes(spec.shape, qtype)
                w.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            _metadata(w, model_dir, model_name, arch, vocab.rstrip)
            arch.params(hp, w)
            w.add_file_type(FILE_TYPES[kind])
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            gguf_vocab.write_vocab(w, vocab, chat_template)
            outs.append(_write_head(w, rec, specs_all, types))

        total = sum(_nbytes(s.shape, o.types[s.name]) for o in outs for s in specs_all)
        done = 0
        n_threads = threads or len(os.sched_getaffinity(0))
        pending: deque[Future[int]] = deque()

        def finish(job: Future[int]) -> None:  # in this thread, in submission order
            nonlocal done
            done += job.result()
            if progress:
                progress(done, total)

        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for spec in specs_all:
                for r0, r1 in _blocks(spec):
                    pending.append(pool.submit(_convert_block, src, spec, r0, r1, outs))
                    if len(pending) >= 2 * n_threads:  # bounded: memory stays at a few blocks
                        finish(pending.popleft())
            while pending:
                finish(pending.popleft())
    finally:
        for out in outs:
            os.close(out.fd)
        src.close()
    return [o.rec for o in outs], vocab
