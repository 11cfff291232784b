"""PEFT LoRA adapter -> GGUF LoRA file (general.type=adapter, adapter.type=lora, `<base tensor>.lora_a/.lora_b`).

llama.cpp applies `W x + scale * B (A x)` with scale = adapter.lora.alpha / rank; rsLoRA's alpha/sqrt(rank) is
written as an equivalent alpha. Llama-family q/k LoRA B rows get the same RoPE permutation as the base weights.
MoE experts (PEFT's parameter LoRA on transformers 5's fused experts, or one module LoRA per expert) become 3-D
pairs beside the base's 3-D expert tensors, A (experts, r, in) and B (experts, out, r), which llama.cpp applies per
routed expert through `ggml_mul_mat_id` (llama-graph.cpp `build_lora_mm_id`); experts without a LoRA get zeros.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from exporter.converters import gguf_arch, gguf_experts

from exporter.adapter import ExpertLora, LoraPart, expert_targets, load_adapter, match_tensor
from exporter.errors import UserError
from exporter.safetensors_file import read_header

LORA_KINDS = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, LoraPart], list[ExpertLora], int]:
    """The adapter's config, LoRA parts by module weight name, parameter LoRAs on fused experts and its one rank;
    UserError for what a GGUF LoRA cannot hold (llama.cpp applies plain `B @ A` with one alpha per file)."""
    ad = load_adapter(adapter_dir, 1.0, str(adapter_dir))
    cfg, where = ad.config, adapter_dir / "adapter_config.json"
    if cfg.get("use_dora") or any(p.magnitude is not None for p in ad.lora.values()):
        raise UserError(f"{where}: DoRA adapters have a magnitude vector llama.cpp cannot apply; merge first")
    if ad.init is not None:
        raise UserError(
            f"{where}: init_lora_weights {ad.init!r} trains against the base minus its top-r part, but llama.cpp adds "
            "B @ A to the unchanged base; merge first (exporter merge), or convert the adapter's pissa_converted/"
        )
    if ad.full:
        raise UserError(
            f"{where}: {', '.join(sorted(ad.full))} are full weights (modules_to_save), not LoRA; merge the adapter "
            "(exporter merge) and convert the merged model instead"
        )
    if any(p.fan_in_fan_out for p in ad.lora.values()):
        raise UserError(f"{where}: fan_in_fan_out (Conv1D) LoRA is not used by the supported architectures")
    odd = sorted(m for m, p in ad.lora.items() if p.embedding or p.bias is not None)
    if odd:
        raise UserError(
            f"{adapter_dir}: {', '.join(odd)} have embedding LoRA or lora bias, which a GGUF LoRA cannot hold; "
            "merge the adapter and convert the merged model instead"
        )
    named = [(m, p.A, p.B) for m, p in ad.lora.items()] + [(k, x.A, x.B) for k, x in ad.experts.items()]
    for m, a, b in named:
        for ab, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                raise UserError(
                    f"{adapter_dir}: {m}.{ab} holds non-finite values (inf/nan); a GGUF must not carry them"
                )
    ranks = {int(p.A.shape[0]) for p in ad.lora.values()} | {x.A.shape[0] // x.experts for x in ad.experts.values()}
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or len(ranks) > 1:
        raise UserError(f"{adapter_dir}: per-module ranks/alphas; a GGUF LoRA has one alpha for all tensors")
    return cfg, {f"{m}.weight": p for m, p in ad.lora.items()}, list(ad.experts.values()), ranks.pop()


def _alpha(cfg: dict, rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha  # llama.cpp divides by rank


def _base_parts(
    adapter_dir: Path, base_dir: Path, parts: dict[str, LoraPart], experts: list[ExpertLora], rank: int
) -> tuple[dict[str, LoraPart], dict[str, ExpertLora], dict[str, tuple[int, ...]]]:
    """The LoRA of each base tensor it changes (one expert's tensor included), the parameter LoRAs of fused expert
    tensors, and the shapes to plan: those tensors and every expert sharing a stacked tensor with one of them."""
    base_shapes = {n: e.shape for f in sorted(base_dir.glob("*.safetensors")) for n, e in read_header(f).items()}
    lora: dict[str, LoraPart] = {}
    for name, part in parts.items():
        base = match_tensor(name, base_shapes) or name  # Mixtral's router: mlp.gate here, block_sparse_moe.gate there
        shape = (part.B.shape[0], part.A.shape[1])
        if tuple(base_shapes.get(base, ())) != shape:
            have = f"is {list(base_shapes[base])} in" if base in base_shapes else "is absent from"
            raise UserError(
                f"adapter {adapter_dir} is for another base: its LoRA for {name} needs {list(shape)} (rank {rank}), "
                f"and the tensor {have} the base {base_dir}"
            )
        lora[base] = part
    fused: dict[str, ExpertLora] = {}
    for ex in experts:
        for base, e, r0, r1 in expert_targets(ex, base_shapes, f"adapter {adapter_dir}", base_dir):
            if e is None:
                fused[base] = ex
            else:
                lora[base] = ex.part(e, r0, r1)
    groups = {gguf_experts.group(n) for n in lora} - {None}
    plan = {n: tuple(base_shapes[n]) for n in (*lora, *fused)}
    plan.update({n: tuple(s) for n, s in base_shapes.items() if gguf_experts.group(n) in groups})
    return lora, fused, plan


def _pair(
    spec: gguf_arch.TensorSpec, lora: dict[str, LoraPart], fused: dict[str, ExpertLora]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """lora_a and lora_b of one GGUF tensor (numpy layout; llama.cpp's ne is reversed): A (r, in) and B (out, r), or
    for 3-D experts A (experts, r, in) and B (experts, out, r); None when the adapter leaves the tensor alone."""
    if spec.stack:  # one base tensor per expert, stacked: expert e's LoRA (zeros where the adapter has none)
        got = [lora.get(n) for n in spec.stack]
        some = next((p for p in got if p is not None), None)
        if some is None:
            return None
        (r, inp), out = some.A.shape, spec.shape[1]
        a = torch.stack([p.A if p is not None else torch.zeros(r, inp) for p in got])
        b = torch.stack([p.B if p is not None else torch.zeros(out, r) for p in got])
        return a, b
    ex = fused.get(spec.source or "")
    if ex is not None:  # PEFT's layout: expert e's A is rows e*r.., its B columns e, e+experts, ... (ExpertLora)
        n, r = ex.experts, ex.A.shape[0] // ex.experts
        a = ex.A.reshape(n, r, -1)
        b = ex.B.reshape(ex.B.shape[0], r, n).permute(2, 0, 1)  # (experts, out of the fused tensor, r)
        if spec.row_index is not None:  # gate or up: the same rows the base tensor takes
            b = b.reshape(-1, r)[torch.from_numpy(spec.row_index)].reshape(n, -1, r)
        return a, b
    part = lora.get(spec.source or "")
    if part is None:
        return None
    b = part.B if spec.row_index is None else part.B[torch.from_numpy(spec.row_index)]
    return part.A, b


def convert_lora(adapter_dir: Path, base_dir: Path, out_path: Path, kind: str = "f16") -> dict[str, int]:
    """Write the GGUF LoRA of `adapter_dir` for base model `base_dir`; returns {gguf tensor name: rank}."""
    if kind not in LORA_KINDS:
        raise UserError(f"GGUF LoRA type {kind!r}: use one of {', '.join(LORA_KINDS)}")
    cfg, parts, experts, rank = read_adapter(adapter_dir)
    hp = gguf_arch.load_hparams(base_dir)
    arch = gguf_arch.arch_for(hp, base_dir)
    lora, fused, shapes = _base_parts(adapter_dir, base_dir, parts, experts, rank)
    tied = bool(hp.get("tie_word_embeddings"))
    if tied and "lm_head.weight" in shapes:
        raise UserError(f"{adapter_dir}: LoRA on lm_head of a tied-embedding model; merge it (the merge unties)")
    w = gguf.GGUFWriter(path=None, arch=arch.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _alpha(cfg, rank))
    w.add_name(adapter_dir.name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    qtype = LORA_KINDS[kind]
    out: dict[str, int] = {}
    for spec in sorted(gguf_arch.plan_tensors(arch, hp, shapes, None), key=lambda s: s.name):
        pair = _pair(spec, lora, fused)
        if pair is None:
            continue
        for suffix, t in zip((".lora_a", ".lora_b"), pair, strict=True):
            data = np.ascontiguousarray(t.to(torch.float32).numpy())
            if kind == "f16" and data.size and float(np.abs(data).max()) >= 65520.0:
                raise UserError(
                    f"{adapter_dir}: LoRA {spec.source} has values up to {float(np.abs(data).max()):g}, which "
                    "overflow f16; use --type f32"
                )
            w.add_tensor(spec.name + suffix, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        out[spec.name] = rank
    w.write_header_to_file(path=out_path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
