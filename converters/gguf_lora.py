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
from safetensors.torch import load_file

from exporter.config import read_json
from exporter.errors import UserError
from exporter.merge import check_lora_numbers
from exporter.safetensors_file import read_header

LORA_KINDS = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter weights; UserError for what a GGUF LoRA cannot hold."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; expected a PEFT LoRA adapter directory")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object (PEFT's adapter config)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert to GGUF LoRA")
    if cfg.get("use_dora"):
        raise UserError(f"{cfg_path}: DoRA adapters have a magnitude vector llama.cpp cannot apply; merge first")
    if cfg.get("modules_to_save"):
        raise UserError(
            f"{cfg_path}: modules_to_save {cfg['modules_to_save']} are full weights, not LoRA; merge the adapter "
            "(exporter merge) and convert the merged model instead"
        )
    if cfg.get("fan_in_fan_out"):
        raise UserError(f"{cfg_path}: fan_in_fan_out (Conv1D) LoRA is not used by the supported architectures")
    check_lora_numbers(cfg, cfg_path)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors")
    read_header(weights)  # a truncated or corrupt file is a UserError naming it
    tensors = load_file(str(weights))
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{weights}: tensor {name} holds non-finite values (inf/nan); a GGUF must not carry them")
    return cfg, tensors


def _alpha(cfg: dict, rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha  # llama.cpp divides by rank


def convert_lora(adapter_dir: Path, base_dir: Path, out_path: Path, kind: str = "f16") -> dict[str, int]:
    """Write the GGUF LoRA of `adapter_dir` for base model `base_dir`; returns {gguf tensor name: rank}."""
    if kind not in LORA_KINDS:
        raise UserError(f"GGUF LoRA type {kind!r}: use one of {', '.join(LORA_KINDS)}")
    cfg, tensors = read_adapter(adapter_dir)
    hp = gguf_arch.load_hparams(base_dir)
    arch = gguf_arch.arch_for(hp, base_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        base = name.removeprefix("base_model.model.")
        for part, key in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if base.endswith(part):
                pairs.setdefault(base[: -len(part)] + ".weight", {})[key] = t
                break
        else:
            raise UserError(
                f"{adapter_dir}: tensor {name!r} is not a LoRA A/B matrix (embedding LoRA or extra weights); "
                "merge the adapter and convert the merged model instead"
            )
    if not pairs:
        raise UserError(f"{adapter_dir}: adapter_model.safetensors holds no LoRA tensors")
    base_shapes = {name: e.shape for f in sorted(base_dir.glob("*.safetensors")) for name, e in read_header(f).items()}
    shapes = {}
    for base, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{adapter_dir}: {base} has LoRA {sorted(ab)} only; both A and B are needed")
        shapes[base] = (ab["B"].shape[0], ab["A"].shape[1])
        want = base_shapes.get(base)
        if want is None or tuple(want) != shapes[base] or ab["A"].shape[0] != ab["B"].shape[1]:
            have = f"is {list(want)} in the base" if want is not None else "is absent from the base"
            raise UserError(
                f"adapter {adapter_dir} is for another base: its LoRA for {base} needs {list(shapes[base])} "
                f"(rank {ab['A'].shape[0]}), and the tensor {have} {base_dir}"
            )
    tied = bool(hp.get("tie_word_embeddings"))
    if tied and "lm_head.weight" in shapes:
        raise UserError(f"{adapter_dir}: LoRA on lm_head of a tied-embedding model; merge it (the merge unties)")
    specs = {s.source: s for s in gguf_arch.plan_tensors(arch, hp, shapes, None)}
    ranks = {int(ab["A"].shape[0]) for ab in pairs.values()}
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern or len(ranks) > 1:
        raise UserError(f"{adapter_dir}: per-module ranks/alphas; a GGUF LoRA has one alpha for all tensors")
    (rank,) = ranks
    if rank != cfg.get("r", 8):
        raise UserError(
            f"{adapter_dir}: the LoRA matrices have rank {rank} but adapter_config.json says r={cfg.get('r', 8)}; "
            "the scale alpha/r would be wrong"
        )
    w = gguf.GGUFWriter(path=None, arch=arch.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _alpha(cfg, rank))
    w.add_name(adapter_dir.name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    qtype = LORA_KINDS[kind]
    out: dict[str, int] = {}
    for base, ab in sorted(pairs.items()):
        spec = specs[base]
        a = ab["A"].to(torch.float32).numpy()
        b = ab["B"].to(torch.float32).numpy()
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
