"""Test helpers: deliberately broken copies of exports (GGUF metadata/tensor edits with gguf-py, sharpened models)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def rewrite_gguf(
    src: Path,
    dst: Path,
    kv: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    tensor: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Copy GGUF `src` to `dst` with metadata `kv` set (same value type as before), keys in `drop` removed, and
    each tensor's data passed through `tensor(name, array)` (same dtype/shape, raw quantized bytes for quants)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch=arch, endianess=r.endianess)
    kv = dict(kv or {})
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
    for name, field in r.fields.items():
        if name in skip or name in drop or name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = kv.pop(name) if name in kv else field.contents()
        w.add_key_value(name, value, vtype, sub_type=sub)
    for name, value in kv.items():  # new keys: infer the type
        w.add_key_value(name, value, gguf.GGUFValueType.get_type(value))
    for t in r.tensors:
        data = np.array(t.data)
        if tensor is not None:
            data = tensor(t.name, data)
        w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        data = np.array(t.data)
        if tensor is not None:
            data = tensor(t.name, data)
        w.write_tensor_data(data)
    w.close()
    return dst


def sharpened_export(src: Path, root: Path, types: list[str]) -> tuple[Path, Any, Any]:
    """The qwen2 fixture `src` copied to `root/merged`, sharpened (sharpen_attention), the qwen-2.5 template written
    into it and exported to `root/gguf` in `types`: (merged dir, template, gguf.export's result)."""
    from exporter import gguf, templates

    merged = root / "merged"
    shutil.copytree(src, merged)
    sharpen_attention(merged)
    tpl = templates.resolve(merged, "qwen-2.5")
    templates.write_into(merged, tpl)
    return merged, tpl, gguf.export(merged, types, tpl, root / "gguf")


def sharpen_attention(model_dir: Path, factor: float = 6.0, embed_scale: float = 0.15) -> None:
    """Make a random tiny model behave more like a trained one, in place: q/k projections scaled by `factor` so
    attention depends on positions (a random model's is near-uniform, which would hide RoPE errors), embeddings and
    lm_head by `embed_scale` so it is not confidently wrong (perplexity near the vocab size, not 10^7, where tiny
    rounding moves perplexity by percents)."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    qk_rows = (cfg["num_attention_heads"] + cfg.get("num_key_value_heads", cfg["num_attention_heads"])) * hd
    for f in sorted(model_dir.glob("*.safetensors")):
        d = load_file(f)
        for k in d:
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                d[k] = (d[k].float() * factor).to(d[k].dtype)
            elif k.endswith("qkv_proj.weight"):  # phi3: fused rows q | k | v
                w = d[k].float()
                w[:qk_rows] *= factor
                d[k] = w.to(d[k].dtype)
            elif k.endswith(("embed_tokens.weight", "lm_head.weight")):
                d[k] = (d[k].float() * embed_scale).to(d[k].dtype)
        save_file(d, f, metadata={"format": "pt"})
