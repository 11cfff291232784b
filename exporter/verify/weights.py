"""Check 9, weights: every quantized GGUF's tensors, dequantized with gguf-py, against the same tensors of a float
GGUF (f32/f16/bf16) verified alongside it, as a relative error per tensor within a bound per ggml type.

Perplexity, KL and top-1 judge the whole model and follow how peaked it is: on a near-uniform or lightly trained
model a tensor whose block scales were zeroed, or a tensor quantized from another layer's (or an earlier export's)
weights, moves them less than a correct quantization of a peaked model does (the qwen2 fixture's q4_k_m with layer 0's
attn_q taken from layer 1: ppl 0.11%, KL 3e-9, top-1 100%, all within the q4_k_m limits). The weights themselves do
not depend on the model: a correct Q8_0 tensor is within about 0.5% of its float values, a Q4_K one within about 10%,
and a zeroed or foreign tensor is 100% or more away.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from exporter.verify.artifacts import GGUFInfo
from exporter.verify.report import Check

FLOAT_TYPES = ("f32", "f16", "bf16")
# the most relative error (||dequantized - float|| / ||float|| over the compared rows) a correct tensor of each ggml
# type has, about 3x what the fixtures' random weights and llama.cpp's own quantize give (measured, every type the
# gguf stage writes, llama3/qwen2/sharpened qwen2 alike: Q8_0 0.54%, Q6_K 1.8%, Q5_K 3.6%, Q5_1 3.8%, Q5_0 4.3%,
# Q4_K 7.2%, IQ4_NL 7.6%, IQ4_XS 7.7%, Q4_1 7.8%, Q4_0 8.6%, Q3_K 15%, IQ3_S 17%, Q2_K 30%; outlier-heavy trained
# weights a little more); a zeroed scale or a tensor from another source is at 100% or more
REL_LIMIT: dict[str, float] = {
    "F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.02, "Q6_K": 0.05, "Q5_K": 0.1, "Q5_0": 0.12, "Q5_1": 0.1,
    "Q4_K": 0.2, "Q4_0": 0.25, "Q4_1": 0.25, "IQ4_NL": 0.25, "IQ4_XS": 0.25, "Q3_K": 0.45, "IQ3_S": 0.5, "Q2_K": 0.85,
}  # fmt: skip
# values compared per tensor at most: rows spread evenly over the tensor (a real model's, not every value)
MAX_VALUES = 1 << 20


@dataclasses.dataclass
class _Tensors:
    """A GGUF's tensors by name (header read by the fast reader: gguf-py's GGUFReader takes minutes on a
    260k-token vocabulary) and the file to map their rows from."""

    path: Path
    header: Any  # converters.gguf_read.GGUFHeader
    by_name: dict[str, Any]  # name -> converters.gguf_read.TensorInfo

    @classmethod
    def read(cls, path: Path) -> _Tensors:
        from exporter.converters.gguf_read import read

        header = read(path, tensors=True)
        return cls(path, header, {t.name: t for t in header.tensors})

    def rows(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name` as a read-only map of shape (rows, bytes per row): a row is its first GGUF
        dimension, whole blocks of its type."""
        from gguf import GGML_QUANT_SIZES

        info = self.by_name[name]
        block, size = GGML_QUANT_SIZES[info.type]
        row_bytes = info.shape[0] // block * size
        n = int(np.prod(info.shape[1:], dtype=np.int64)) if len(info.shape) > 1 else 1
        offset = self.header.data_offset + info.offset
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(n, row_bytes))


def relative_error(q: _Tensors, f: _Tensors, name: str) -> float:
    """||dequantize(q) - f|| / ||f|| of tensor `name` over evenly spread rows (at most MAX_VALUES values)."""
    from gguf import quants

    qrows, frows = q.rows(name), f.rows(name)
    width = int(f.by_name[name].shape[0])
    take = min(len(frows), max(1, MAX_VALUES // max(width, 1)))
    idx = np.unique(np.linspace(0, len(frows) - 1, take).astype(np.int64))
    ref = quants.dequantize(np.ascontiguousarray(frows[idx]), f.by_name[name].type).reshape(len(idx), width)
    got = quants.dequantize(np.ascontiguousarray(qrows[idx]), q.by_name[name].type).reshape(len(idx), width)
    ref, got = ref.astype(np.float32), got.astype(np.float32)
    norm = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(got - ref))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def check_weights(infos: list[GGUFInfo]) -> list[Check]:
    """A `weights` row per quantized GGUF: each tensor against a float GGUF of the same tensors among `infos`; a
    skip row when there is none to compare with."""
    floats = [g for g in infos if g.file_type in FLOAT_TYPES]
    out: list[Check] = []
    for g in infos:
        if g.file_type in FLOAT_TYPES or g.file_type == "unknown":
            continue
        q = _Tensors.read(g.path)
        if q.header.byte_order != "<":
            out.append(Check("weights", g.path.name, "skip", "a big-endian GGUF: its tensors are not compared"))
            continue
        ref = next((f for f in (_Tensors.read(f.path) for f in floats) if _same_tensors(q, f)), None)
        if ref is None:
            detail = "no f32/f16/bf16 GGUF of the same tensors to compare with: give it with --gguf too"
            out.append(Check("weights", g.path.name, "skip", detail))
            continue
        out.append(_compare(g, q, ref))
    return out


def _same_tensors(q: _Tensors, f: _Tensors) -> bool:
    """The same tensor names and shapes, `f` little-endian too."""
    same = q.by_name.keys() == f.by_name.keys() and f.header.byte_order == "<"
    return same and all(q.by_name[n].shape == f.by_name[n].shape for n in q.by_name)


def _compare(g: GGUFInfo, q: _Tensors, ref: _Tensors) -> Check:
    bad: list[str] = []
    worst = ("", 0.0, 0.0)  # name, error, limit: the tensor nearest its limit
    for name, t in q.by_name.items():
        kind = t.type.name
        limit = REL_LIMIT.get(kind)
        if limit is None:  # a type without a bound here (the IQ1/IQ2/IQ3_XXS llama.cpp makes with an imatrix only)
            continue
        try:
            err = relative_error(q, ref, name)
        except NotImplementedError:  # a type this gguf-py cannot dequantize
            continue
        if not err <= limit:
            bad.append(f"{name} ({kind}) {err * 100:.3g}% > {limit * 100:g}%")
        if err / max(limit, 1e-12) >= worst[1] / max(worst[2], 1e-12):
            worst = (name, err, limit)
    metrics = {"reference": ref.path.name, "tensors": len(q.by_name), "worst": worst[0], "worst_rel_error": worst[1]}
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        detail = (
            f"{len(bad)} of {len(q.by_name)} tensors are not a quantization of {ref.path.name}'s: "
            + "; ".join(bad[:5])
            + more
        )
        return Check("weights", g.path.name, "fail", detail, metrics)
    detail = (
        f"{len(q.by_name)} tensors within their type's bound of {ref.path.name}'s (nearest: {worst[0]} "
        f"{worst[1] * 100:.3g}% of {worst[2] * 100:g}%)"
    )
    return Check("weights", g.path.name, "pass", detail, metrics)
