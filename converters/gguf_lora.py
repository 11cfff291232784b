"""PEFT LoRA adapter -> GGUF LoRA file (general.type=adapter, adapter.type=lora, `<base tensor>.lora_a/.lora_b`).

llama.cpp applies `W x + scale * B (A x)` with scale = adapter.lora.alpha / rank; rsLoRA's alpha/sqrt(rank) is
written as an equivalent alpha. Llama-family q/k LoRA B rows get the same RoPE permutation as the base weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from exporter.converters import gguf_arch

from exporter.adapter import LoraPart, load_adapter
from exporter.errors import UserError
from exporter.safetensors_file import read_header

LORA_KINDS = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, LoraPart], int]:
    """The adapter's config, LoRA parts by base weight name and its one rank; UserError for what a GGUF LoRA cannot
    hold (llama.cpp applies plain `B @ A` with one alpha per file)."""
    ad = load_adapter(adapter_dir, 1.0, str(adapter_dir))
    cfg, where = ad.config, adapter_dir / "adapter_config.json"
    if cfg.get("use_dora") or any(p.magnitude is not None for p in ad.lora.values()):
        raise UserError(f"{where}: DoRA adapters have a magnitude vector llama.cpp cannot apply; merge first")
    if ad.full:
        raise UserError(
            f"{where}: {', '.join(sorted(ad.full))} are full weights (modules_to_save), not LoRA; merge the adapter "
            "(exporter merge) and convert the merged model instead"
        )
    if ad.experts:
        raise UserError(
            f"{where}: LoRA on MoE experts ({', '.join(sorted(ad.experts))}) is not written as a GGUF LoRA; merge the "
            "adapter (exporter merge) and convert the merged model instead"
        )
    if any(p.fan_in_fan_out for p in ad.lora.values()):
        raise UserError(f"{where}: fan_in_fan_out (Conv1D) LoRA is not used by the supported architectures")
    odd = sorted(m for m, p in ad.lora.items() if p.embedding or p.bias is not None)
    if odd:
        raise UserError(
            f"{adapter_dir}: {', '.join(odd)} have embedding LoRA or lora bias, which a GGUF LoRA cannot hold; "
            "merge the adapter and convert the merged model instead"
        )
    for m, p in ad.lora.items():
        for ab, t in (("lora_A", p.A), ("lora_B", p.B)):
            if not bool(torch.isfinite(t).all()):
                raise UserError(
                    f"{adapter_dir}: {m}.{ab} holds non-finite values (inf/nan); a GGUF must not carry them"
                )
    ranks = {int(p.A.shape[0]) for p in ad.lora.values()}
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or len(ranks) > 1:
        raise UserError(f"{adapter_dir}: per-module ranks/alphas; a GGUF LoRA has one alpha for all tensors")
    return cfg, {f"{m}.weight": p for m, p in ad.lora.items()}, ranks.pop()


def _alpha(cfg: dict, rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha  # llama.cpp divides by rank


def convert_lora(adapter_dir: Path, base_dir: Path, out_path: Path, kind: str = "f16") -> dict[str, int]:
    """Write the GGUF LoRA of `adapter_dir` for base model `base_dir`; returns {gguf tensor name: rank}."""
    if kind not in LORA_KINDS:
        raise UserError(f"GGUF LoRA type {kind!r}: use one of {', '.join(LORA_KINDS)}")
    cfg, parts, rank = read_adapter(adapter_dir)
    hp = gguf_arch.load_hparams(base_dir)
    arch = gguf_arch.arch_for(hp, base_dir)
    shapes = {base: (p.B.shape[0], p.A.shape[1]) for base, p in parts.items()}
    base_shapes = {n: e.shape for f in sorted(base_dir.glob("*.safetensors")) for n, e in read_header(f).items()}
    for base, shape in shapes.items():
        if tuple(base_shapes.get(base, ())) != shape:
            have = f"is {list(base_shapes[base])} in" if base in base_shapes else "is absent from"
            raise UserError(
                f"adapter {adapter_dir} is for another base: its LoRA for {base} needs {list(shape)} (rank {rank}), "
                f"and the tensor {have} the base {base_dir}"
            )
    tied = bool(hp.get("tie_word_embeddings"))
    if tied and "lm_head.weight" in shapes:
        raise UserError(f"{adapter_dir}: LoRA on lm_head of a tied-embedding model; merge it (the merge unties)")
    specs = {s.source: s for s in gguf_arch.plan_tensors(arch, hp, shapes, None)}
    w = gguf.GGUFWriter(path=None, arch=arch.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _alpha(cfg, rank))
    w.add_name(adapter_dir.name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    qtype = LORA_KINDS[kind]
    out: dict[str, int] = {}
    for base, part in sorted(parts.items()):
        spec = specs[base]
        a = part.A.to(torch.float32).numpy()
        b = part.B.to(torch.float32).numpy()
        if spec.row_index is not None:
            b = b[spec.row_index]
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            if kind == "f16" and data.size and float(np.abs(data).max()) >= 65520.0:
                raise UserError(
                    f"{adapter_dir}: LoRA {base} has values up to {float(np.abs(data).max()):g}, which overflow f16; "
                    "use --type f32"
                )
            w.add_tensor(spec.name + suffix, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
        out[spec.name] = rank
    w.write_header_to_file(path=out_path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
