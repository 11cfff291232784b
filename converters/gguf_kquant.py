"""K-quants (q4_k_m, q5_k_m, q6_k) through libllama's own `llama_model_quantize`, from our f16 GGUF.

libllama applies llama.cpp's mixed-type rules itself (which tensors get more bits, fallbacks for rows that are not
a multiple of 256); we read the result back and report every tensor whose type is not the file's nominal type.
"""

from __future__ import annotations

import os
from pathlib import Path

from exporter.converters import gguf_read

from exporter.errors import UserError
from exporter.quiet import silence_llama_cpp

KQUANT_TYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
_NOMINAL = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(
            "K-quants need llama-cpp-python (pip install 'exporter[gguf]', i.e. llama-cpp-python==0.3.36)"
        ) from e
    silence_llama_cpp()  # its per-tensor log lines: our progress bar and report say what matters
    return llama_cpp


def quantize(f16_path: Path, out_path: Path, kind: str, nthread: int | None = None) -> list[str]:
    """Quantize `f16_path` to `kind` at `out_path`; returns per-tensor notes where the type differs from nominal."""
    if kind not in KQUANT_TYPES:
        raise UserError(f"unknown K-quant type {kind!r}; supported: {', '.join(KQUANT_TYPES)}")
    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, KQUANT_TYPES[kind])
    params.nthread = nthread or len(os.sched_getaffinity(0))  # libllama's default counts host cores, not ours
    rc = lc.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), params)
    if rc != 0:
        raise UserError(f"llama_model_quantize failed ({rc}) writing {kind} from {f16_path}")
    return type_report(out_path, kind)


def type_report(path: Path, kind: str) -> list[str]:
    """Tensors of a K-quant file whose type is not the nominal one (1-D and norm tensors are f32 everywhere)."""
    notes = []
    for t in gguf_read.read(path, tensors=True).tensors:
        if len(t.shape) < 2 or t.type.name == _NOMINAL[kind]:
            continue
        notes.append(f"{t.name}: {t.type.name}")
    return notes
