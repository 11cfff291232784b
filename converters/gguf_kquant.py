"""The GGUF types libllama's own `llama_model_quantize` writes from our f16 GGUF: the K-quants (q2_k ... q6_k),
the legacy q4_1/q5_0/q5_1 and the non-linear iq4_nl/iq4_xs/iq3_s/iq3_m, named as llama-quantize names them.

libllama applies llama.cpp's mixed-type rules itself (which tensors get more bits, fallbacks for rows that are not
a multiple of the block size); we read the result back and report every tensor whose type is not the file's nominal
type. The types llama.cpp makes only with an importance matrix are refused before anything is written, as
llama-quantize refuses them (src/llama-quant.cpp `tensor_requires_imatrix`).
"""

from __future__ import annotations

import os
from pathlib import Path

from exporter.errors import UserError
from exporter.quiet import silence_llama_cpp

# --type (llama-quantize's QUANT_OPTIONS names, lower case) -> (the llama_ftype, the file's nominal ggml type: what
# llama_ftype_get_default_type gives; other types in the file are its mixed-type rules or fallbacks, reported)
KQUANT_TYPES: dict[str, tuple[str, str]] = {
    "q2_k": ("LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K"),
    "q3_k_s": ("LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q3_K"),
    "q3_k_m": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K"),
    "q3_k_l": ("LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K"),
    "q4_k_s": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K"),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K"),
    "q5_k_s": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K"),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K"),
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K"),
    "q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1"),
    "q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0"),
    "q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_1"),
    "iq4_nl": ("LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL"),
    "iq4_xs": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS"),
    "iq3_s": ("LLAMA_FTYPE_MOSTLY_IQ3_S", "IQ3_S"),
    "iq3_m": ("LLAMA_FTYPE_MOSTLY_IQ3_M", "IQ3_S"),
}
# llama-quantize's aliases: `Q4_K` is Q4_K_M
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
# the types with tensors libllama quantizes only with an importance matrix (llama-quantize --imatrix): IQ1/IQ2 and
# IQ3_XXS ones, the Q2_K of a q2_k_s file, and iq3_xs (measured: its attn_k are IQ3_XXS)
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")
# llama-quantize types that are not for a model fine-tuned in floating point, and why
NOT_OFFERED = {
    "tq1_0": "a ternary type, for models trained with ternary weights (BitNet)",
    "tq2_0": "a ternary type, for models trained with ternary weights (BitNet)",
    "q1_0": "a 1-bit type, for models trained with 1-bit weights (gguf-py cannot dequantize it for verify)",
    "q2_0": "a 2-bit type without K-quant scales, for models trained for it (gguf-py cannot read it for verify)",
    "mxfp4_moe": "for the experts of a MoE model trained in MXFP4 (gpt-oss)",
    "copy": "llama-quantize's copy without quantizing: use f16, bf16 or f32",
}


def refusal(kind: str) -> str | None:
    """Why `kind` (lower case), a llama-quantize type, is not written here; None when it is not one of those."""
    if kind in NEEDS_IMATRIX:
        return (f"{kind} needs an importance matrix (llama-quantize --imatrix; libllama refuses it without one), "
                "which exporter does not make; without one use q2_k, q3_k_s or iq4_xs")  # fmt: skip
    if kind in NOT_OFFERED:
        return f"{kind} is {NOT_OFFERED[kind]}"
    return None


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
        raise UserError(refusal(kind) or f"unknown libllama type {kind!r}; supported: {', '.join(KQUANT_TYPES)}")
    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, KQUANT_TYPES[kind][0])
    params.nthread = nthread or len(os.sched_getaffinity(0))  # libllama's default counts host cores, not ours
    rc = lc.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), params)
    if rc != 0:
        raise UserError(f"llama_model_quantize failed ({rc}) writing {kind} from {f16_path}")
    return type_report(out_path, kind)


def type_report(path: Path, kind: str) -> list[str]:
    """Tensors of a libllama-quantized file whose type is not the nominal one (1-D and norm tensors are f32
    everywhere)."""
    from exporter.converters import gguf_read  # gguf-py and numpy: not for `exporter.gguf`'s import of the tables

    notes = []
    for t in gguf_read.read(path, tensors=True).tensors:
        if len(t.shape) < 2 or t.type.name == KQUANT_TYPES[kind][1]:
            continue
        notes.append(f"{t.name}: {t.type.name}")
    return notes
