"""Check 6, metadata: what llama.cpp and Ollama read from a GGUF's header that the other checks, which run the model
on short texts through llama.cpp, cannot see going wrong.

- `{arch}.context_length` is the HF config's (llama.cpp's converter: the first of max_position_embeddings, n_ctx,
  n_positions, max_length, max_sequence_length, model_max_length): Ollama cuts every num_ctx to it and llama.cpp's
  `-c 0` takes it, so a smaller one silently shortens every chat;
- `tokenizer.ggml.add_bos_token` is present and says what the HF tokenizer does: without the key llama.cpp and Ollama
  fall back to their own per-architecture defaults, which differ (llama.cpp adds no BOS to a qwen2 vocabulary,
  Ollama's qwen2 and llama models do);
- RoPE scaling: llama.cpp and Ollama scale positions by the GGUF's `rope_freqs` (Llama 3.1) or
  `rope_factors_long`/`_short` (LongRoPE) tensor and its `rope.scaling.*` keys (linear, YaRN). They only change
  positions past the few hundred tokens the other checks score, so a dropped or wrong one passed them while long
  chats diverged. Each is compared with what transformers' own `ROPE_INIT_FUNCTIONS` computes from the HF config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.config import read_json
from exporter.converters.gguf_read import GGUFHeader, read, read_tensor
from exporter.verify.artifacts import GGUFInfo
from exporter.verify.report import Check

# llama.cpp's convert_hf_to_gguf (conversion/base.py set_gguf_parameters): the context length, first key found
CONTEXT_KEYS = ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                "model_max_length")  # fmt: skip


def hf_context_length(model_dir: Path | None) -> tuple[str, int] | None:
    """(key, value) of the HF config's context length as llama.cpp's converter reads it (a multimodal config's
    text_config over the top level), None without a config or such a key."""
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    cfg = read_json(model_dir / "config.json")
    text = cfg.get("text_config")
    hp = {**cfg, **text} if isinstance(text, dict) else cfg
    for key in CONTEXT_KEYS:
        value = hp.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


# HF rope_type -> the `{arch}.rope.scaling.type` llama.cpp's converter writes (None: no key, or "none")
_SCALING_TYPE = {"linear": "linear", "yarn": "yarn"}
# HF rope parameter -> GGUF key suffix llama.cpp reads for YaRN (written by its converter when the config sets it)
_YARN_KEYS = {"extrapolation_factor": "yarn_ext_factor", "attention_factor": "yarn_attn_factor",
              "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}  # fmt: skip
FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass
class HFRope:
    """What llama.cpp needs to scale RoPE as transformers does: the global-attention rope parameters of the HF
    config, the scaling keys expected in the GGUF and the frequency-factor tensors (from transformers)."""

    rope_type: str
    params: dict[str, Any]
    keys: dict[str, Any] = field(default_factory=dict)  # key suffix after `{arch}.rope.scaling.` -> value
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def hf_config(model_dir: Path | None) -> Any:
    """The HF config as transformers reads it (its defaults filled in; a multimodal model's text_config), None
    without one transformers can read (the other checks say why)."""
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError):
        return None
    return getattr(cfg, "text_config", None) or cfg


def hf_rope(cfg: Any) -> HFRope | None:
    """The HF config's RoPE scaling as llama.cpp must reproduce it; None without a config.
    Llama 3.1's `rope_freqs` are `inv_freq_default / inv_freq` of transformers' `ROPE_INIT_FUNCTIONS["llama3"]`,
    LongRoPE's long/short factors the same ratio for a sequence past / within `original_max_position_embeddings`."""
    if cfg is None:
        return None
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    layer_type = "full_attention" if isinstance(rp.get("full_attention"), dict) else None
    if layer_type:
        rp = dict(rp[layer_type])
    rope_type = str(rp.get("rope_type") or rp.get("type") or "default").lower()
    out = HFRope(rope_type, rp)
    if rope_type in _SCALING_TYPE:
        out.keys["type"] = _SCALING_TYPE[rope_type]
        out.keys["factor"] = rp.get("factor")
    if rope_type == "yarn":
        out.keys["original_context_length"] = rp.get("original_max_position_embeddings")
        out.keys.update({k: rp[hf] for hf, k in _YARN_KEYS.items() if rp.get(hf) is not None})
    if rope_type not in ("llama3", "longrope", "su") or (rope_type != "llama3" and not rp.get("long_factor")):
        return out
    init = ROPE_INIT_FUNCTIONS["longrope" if rope_type == "su" else rope_type]

    def factors(seq_len: int | None) -> tuple[np.ndarray, float]:
        inv, attn = init(cfg, "cpu", seq_len, layer_type) if layer_type else init(cfg, "cpu", seq_len)
        dim = 2 * inv.numel()  # the rotated dimensions (partial rotary included)
        default = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return (default / inv).numpy().astype(np.float32), float(attn)

    if rope_type == "llama3":
        out.tensors["rope_freqs.weight"] = factors(None)[0]
    else:
        orig = int(rp["original_max_position_embeddings"])
        out.tensors["rope_factors_long.weight"], attn = factors(orig + 1)
        out.tensors["rope_factors_short.weight"] = factors(None)[0]
        out.keys["attn_factor"] = attn
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    return bool(np.isclose(float(a), float(b), rtol=1e-5, atol=0.0))


def rope_problems(path: Path, header: GGUFHeader, arch: str, rope: HFRope) -> tuple[list[str], list[str]]:
    """(problems, notes) of a GGUF's RoPE scaling keys and factor tensors (its `header`, read with tensors) against
    the HF config's."""
    names = {t.name for t in header.tensors}
    problems, notes = [], []
    prefix = f"{arch}.rope.scaling."
    got_type = header.kv.get(prefix + "type")
    if rope.keys.get("type") is None and got_type not in (None, "none") and rope.rope_type not in ("longrope", "su"):
        problems.append(f"{prefix}type is {got_type!r}, the HF config's rope_type is {rope.rope_type!r}")
    for key, want in rope.keys.items():
        got = header.kv.get(prefix + key)
        if want is None or _same(got, want):
            continue
        where = "not set" if got is None else f"{got!r}"
        problems.append(f"{prefix}{key} is {where}, the HF config gives {want!r} (rope_type {rope.rope_type})")
    for name in FACTOR_TENSORS:
        want = rope.tensors.get(name)
        if want is None:
            if name in names:
                problems.append(
                    f"{name} is in the GGUF but the HF config's rope_type is {rope.rope_type!r}: llama.cpp scales "
                    "positions that transformers does not"
                )
            continue
        got = read_tensor(path, name, header)
        if got is None:
            problems.append(
                f"{name} is missing (HF rope_type {rope.rope_type}): llama.cpp and Ollama then use unscaled RoPE, "
                "which diverges from transformers past the first few hundred tokens"
            )
        elif got.shape != want.shape:
            problems.append(f"{name} has {got.size} values, transformers' {rope.rope_type} RoPE has {want.size}")
        elif not np.allclose(got, want, rtol=1e-5, atol=1e-6):
            i = int(np.argmax(np.abs(got - want)))
            problems.append(
                f"{name}[{i}] is {got[i]:.6g}, transformers' {rope.rope_type} RoPE gives {want[i]:.6g} "
                f"({int((~np.isclose(got, want, rtol=1e-5, atol=1e-6)).sum())} of {want.size} differ)"
            )
    if not problems and (rope.tensors or rope.keys):
        notes.append(f"{rope.rope_type} RoPE scaling")
    return problems, notes


# llama.cpp's sliding-window attention per architecture (src/models/<arch>.cpp): the window when
# `{arch}.attention.sliding_window` is absent (0: no SWA at all) and the layer pattern when
# `{arch}.attention.sliding_window_pattern` is absent (every n-th layer full, `llama_hparams::set_swa_pattern`)
SWA_DEFAULTS = {"gemma2": (4096, 2), "gemma3": (0, 6), "olmo2": (0, 4)}


def swa_problems(kv: dict[str, Any], arch: str, cfg: Any) -> tuple[list[str], list[str], list[str]]:
    """(problems, notes, warnings) of a GGUF's sliding window and which layers slide, against transformers' config:
    both only matter past the window (Gemma 3: 512 tokens), beyond what the other checks score. An architecture whose
    llama.cpp model has no sliding window (Phi-3's is disabled, src/models/phi3.cpp; Llama/Mistral read none) is a
    warning when transformers uses one shorter than the context: nothing in the file can fix that."""
    if cfg is None:
        return [], [], []
    n_layer = int(cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or [])
    window = int(getattr(cfg, "sliding_window", None) or 0)
    hf = [t == "sliding_attention" for t in types] if len(types) == n_layer else [True] * n_layer
    if not window:
        hf = [False] * n_layer
    if arch not in SWA_DEFAULTS or arch == "phi3":
        ctx = kv.get(f"{arch}.context_length")
        if any(hf) and (ctx is None or window < int(ctx)):
            return (
                [],
                [],
                [
                    f"llama.cpp runs {arch} without the HF config's sliding window of {window} tokens: answers past "
                    f"{window} tokens differ from transformers' (a llama.cpp limit; the file cannot carry it)"
                ],
            )
        return [], [], []
    default_window, default_every = SWA_DEFAULTS[arch]
    got_window = int(kv.get(f"{arch}.attention.sliding_window", default_window))
    pattern = kv.get(f"{arch}.attention.sliding_window_pattern")
    if pattern is None or np.ndim(pattern) == 0:
        every = int(pattern) if pattern is not None else default_every
        got = [every == 0 or i % every < every - 1 for i in range(n_layer)]
    else:
        got = [bool(x) for x in pattern][:n_layer]
    if got_window <= 0:
        got = [False] * n_layer
    if not any(hf) and not any(got):
        return [], [], []
    problems = []
    if any(hf) and got_window != window:
        where = f"{got_window}" if f"{arch}.attention.sliding_window" in kv else f"not set ({got_window} in llama.cpp)"
        problems.append(
            f"{arch}.attention.sliding_window is {where}, the HF config's sliding_window is {window}: llama.cpp "
            f"attends over another window than transformers past {min(window, got_window) or window} tokens"
        )
    if any(got) and got != hf:
        differ = [i for i in range(n_layer) if got[i] != hf[i]]
        problems.append(
            f"llama.cpp slides the window on layers {[i for i in range(n_layer) if got[i]]}, the HF config's "
            f"layer_types on {[i for i in range(n_layer) if hf[i]]} (layers {differ} differ)"
        )
    return problems, ([] if problems else [f"sliding window {window}"]), []


def _check_gguf(
    g: GGUFInfo, ctx: tuple[str, int] | None, hf_adds_bos: bool | None, rope: HFRope | None = None, cfg: Any = None
) -> Check:
    problems, notes = [], []
    if ctx is not None:
        key, want = ctx
        if g.context_length != want:
            problems.append(
                f"{g.arch}.context_length is {g.context_length}, the HF config's {key} is {want} (Ollama cuts "
                "num_ctx to it)"
            )
        else:
            notes.append(f"context_length {want}")
    if hf_adds_bos is not None:
        says = "adds" if hf_adds_bos else "adds no"
        if g.add_bos is None:
            problems.append(
                f"tokenizer.ggml.add_bos_token is not set (the HF tokenizer {says} BOS); llama.cpp and Ollama then "
                "use their own per-architecture defaults, which differ"
            )
        elif g.add_bos != hf_adds_bos:
            problems.append(f"tokenizer.ggml.add_bos_token is {str(g.add_bos).lower()}, the HF tokenizer {says} BOS")
        else:
            notes.append(f"add_bos_token {str(g.add_bos).lower()}")
    header = read(g.path, tensors=True)
    if rope is not None:
        more, said = rope_problems(g.path, header, g.arch, rope)
        problems, notes = problems + more, notes + said
    more, said, warnings = swa_problems(header.kv, g.arch, cfg)
    problems, notes = problems + more, notes + said
    detail = "; ".join(problems) or (", ".join(notes) + " as the HF model" if notes else "nothing to compare")
    if warnings and not problems:
        detail = "; ".join([*warnings, detail])
    metrics = {"context_length": g.context_length, "hf_context_length": ctx[1] if ctx else None,
               "add_bos_token": g.add_bos, "hf_adds_bos": hf_adds_bos,
               "hf_rope_type": rope.rope_type if rope is not None else None}  # fmt: skip
    status = "fail" if problems else "warn" if warnings else "pass"
    return Check("metadata", g.path.name, status, detail, metrics)


def check_metadata(ggufs: list[GGUFInfo], hf_dir: Path | None, tok: Any) -> list[Check]:
    """Each GGUF's context length, add_bos_token, RoPE scaling and sliding window against the HF model's."""
    from exporter.hf_dir import adds_bos

    ctx = hf_context_length(hf_dir)
    hf_adds_bos = adds_bos(tok) if ggufs else None
    cfg = hf_config(hf_dir) if ggufs else None
    rope = hf_rope(cfg)
    return [_check_gguf(g, ctx, hf_adds_bos, rope, cfg) for g in ggufs]
