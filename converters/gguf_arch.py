"""Per-architecture GGUF mapping: HF config -> GGUF metadata, HF tensors -> GGUF tensor names, shapes and transforms.

Details follow what llama.cpp's runtime expects for each architecture (learned from llama.cpp's converter, written
here independently): Llama-family q/k rows are permuted for llama.cpp's RoPE layout, Gemma RMSNorm weights are
stored with the +1 the HF module adds at run time, tied embeddings have no `output.weight`, Phi3 and GLM-4 keep
their fused projections (llama.cpp splits them at load time), MoE experts become one 3-D tensor per projection
(stacked from one tensor per expert, or split from transformers 5's fused gate_up), and what llama.cpp cannot
represent (another NoPE layer pattern, another Gemma 2 query scale) is refused rather than converted wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from exporter.converters.gguf_experts import fused_experts, is_fused, stack_experts

from exporter.config import read_json
from exporter.errors import UserError


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: where it comes from and how it is reshaped on the way."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy (row-major) shape as written
    source: str | None  # HF tensor name; None for generated tensors
    row_index: np.ndarray | None = None  # output row r comes from source row row_index[r] (permutation / truncation)
    add: float = 0.0  # constant added after conversion to f32 (Gemma norm +1)
    data: np.ndarray | None = None  # generated tensors (rope factors)
    stack: tuple[str, ...] = ()  # one source per expert, stacked on a new first axis (source is stack[0])

    @property
    def rows(self) -> int:
        """Rows of the tensor seen as a matrix of its last axis (how every block of it is read and encoded)."""
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) >= 2 else 1

    def part(self, r0: int) -> tuple[str, int]:
        """The source of output row r0 and the row offset into it (stacked experts come from several tensors)."""
        assert self.source is not None
        if not self.stack:
            return self.source, 0
        per = self.rows // len(self.stack)
        return self.stack[r0 // per], (r0 // per) * per


@dataclass(frozen=True)
class Arch:
    """What differs between architectures."""

    gguf_arch: gguf.MODEL_ARCH
    hf_archs: tuple[str, ...]
    permute_qk: bool = False
    norm_add: float = 0.0
    params: Callable[[dict[str, Any], gguf.GGUFWriter], None] = lambda hp, w: None
    extra: Callable[[dict[str, Any], gguf.GGUFWriter], list[tuple[str, np.ndarray]]] = lambda hp, w: []
    skip: tuple[str, ...] = field(default=(".rotary_emb.inv_freq",))
    pre_names: dict[str, str] = field(default_factory=dict)  # llama.cpp's name for the same pre-tokenizer here
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos/unk/... ids llama.cpp's converter sets
    # llama.cpp gives added tokens their rstrip attribute (HF's AddedToken.rstrip) only for models whose
    # general.name contains one of these; a fine-tune saved as "out/merged" would tokenize "<|user|>\nHi" unlike HF
    rstrip_names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# What transformers 5's config classes fill in when config.json leaves a key out, for the keys this module reads
# (tests/test_gguf.py checks the metadata they give against AutoConfig on minimal configs). Reading config.json
# directly keeps `exporter gguf` free of transformers, whose config import brings torch (~0.3 GiB) with it.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
        "num_key_value_heads": 8,
    },
    "qwen2": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_key_value_heads": 32,
    },
    "qwen3": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "head_dim": 128,
        "num_key_value_heads": 32,
    },
    "phi3": {
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "original_max_position_embeddings": 4096,
    },
    "qwen3_moe": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_key_value_heads": 4,
        "num_local_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    },
    "mixtral": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rope_theta": 1_000_000.0,
    },
    "gemma2": {
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "num_key_value_heads": 4,
        "head_dim": 256,
    },
    "glm4": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1.5625e-07,
        "tie_word_embeddings": False,
        "num_key_value_heads": 2,
        "head_dim": 128,
    },
    "granite": {
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        **dict.fromkeys(("attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling"), 1.0),
    },
    "olmo2": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "smollm3": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "num_key_value_heads": 4,
        "rope_theta": 2_000_000.0,
    },
    "gemma": {
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "num_key_value_heads": 16,
        "head_dim": 256,
    },
    "qwen2_moe": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
    },
    "ernie4_5": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "rope_theta": 500_000.0,
    },
    "cohere": {
        "max_position_embeddings": 8192,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "logit_scale": 0.0625,
        "rope_theta": 500_000.0,
    },
    "cohere2": {
        "max_position_embeddings": 8192,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "logit_scale": 0.0625,
        "sliding_window": 4096,
        "rope_theta": 10_000.0,
    },
    "ernie4_5_moe": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "num_key_value_heads": 4,
        "rope_theta": 500_000.0,
        "moe_num_experts": 64,
        "moe_k": 6,
        "moe_intermediate_size": 1536,
        "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": -1,
        "moe_layer_interval": 1,
        "use_bias": False,
    },
    "gemma3_text": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "sliding_window": 4096,
        "head_dim": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
}


@dataclass(frozen=True)
class JsonType:
    """What a config.json value must be: `check` accepts it; `expected` says so in an error."""

    expected: str
    check: Callable[[Any], bool]


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE = JsonType("a positive integer", lambda v: _is_int(v, 1))
COUNT = JsonType("a non-negative integer", lambda v: _is_int(v, 0))
NUMBER = JsonType("a number", _is_number)
BOOL = JsonType("true or false", lambda v: isinstance(v, bool))
STRING = JsonType("a string", lambda v: isinstance(v, str))
OBJECT = JsonType("a JSON object", lambda v: isinstance(v, dict))
STRINGS = JsonType("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
COUNTS = JsonType("a list of non-negative integers", lambda v: isinstance(v, list) and all(_is_int(x, 0) for x in v))
NUMBERS = JsonType("a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v))

# Every config.json key the converter reads -> (its type, whether null is allowed). transformers 5's config classes
# refuse null for the keys every supported family declares non-null; a family-specific key (experts, Granite's
# multipliers) may be null, as transformers takes keys a class does not declare as they are, and null is then as if
# left out. Ints are not floats (transformers refuses 4096.0); a float key takes an int (1e-06 and 0 alike). The
# same table checks a `text_config` (Gemma 3's text half).
HPARAM_TYPES: dict[str, tuple[JsonType, bool]] = {
    "model_type": (STRING, True),
    "architectures": (STRINGS, True),
    "text_config": (OBJECT, True),
    "vocab_size": (POSITIVE, False),
    "hidden_size": (POSITIVE, False),
    "num_attention_heads": (POSITIVE, False),
    "num_hidden_layers": (POSITIVE, False),
    "intermediate_size": (POSITIVE, False),
    "num_key_value_heads": (POSITIVE, True),
    "head_dim": (POSITIVE, True),
    "max_position_embeddings": (POSITIVE, False),
    "original_max_position_embeddings": (POSITIVE, True),
    "rms_norm_eps": (NUMBER, False),
    "layer_norm_eps": (NUMBER, True),
    "logit_scale": (NUMBER, True),
    "use_qk_norm": (BOOL, True),
    "model_max_length": (POSITIVE, True),
    "tie_word_embeddings": (BOOL, True),  # null: Gemma 3's outer config; the family default then
    "rope_theta": (NUMBER, True),  # transformers 4 layout: top-level RoPE keys
    "rope_scaling": (OBJECT, True),
    "rope_parameters": (OBJECT, True),
    "rope_local_base_freq": (NUMBER, True),
    "partial_rotary_factor": (NUMBER, True),
    "sliding_window": (COUNT, True),
    "sliding_window_pattern": (POSITIVE, True),
    "layer_types": (STRINGS, True),
    "query_pre_attn_scalar": (NUMBER, True),
    "attn_logit_softcapping": (NUMBER, True),
    "final_logit_softcapping": (NUMBER, True),
    "attention_multiplier": (NUMBER, True),
    "embedding_multiplier": (NUMBER, True),
    "residual_multiplier": (NUMBER, True),
    "logits_scaling": (NUMBER, True),
    "no_rope_layers": (COUNTS, True),
    "no_rope_layer_interval": (POSITIVE, True),
    "num_local_experts": (COUNT, True),
    "num_experts": (COUNT, True),
    "num_experts_per_tok": (POSITIVE, True),
    "moe_intermediate_size": (POSITIVE, True),
    "shared_expert_intermediate_size": (POSITIVE, True),
    "norm_topk_prob": (BOOL, True),
    "mlp_only_layers": (COUNTS, True),
    "decoder_sparse_step": (POSITIVE, True),
    "moe_num_experts": (POSITIVE, True),
    "moe_k": (POSITIVE, True),
    "moe_num_shared_experts": (COUNT, True),
    "moe_layer_start_index": (COUNT, True),
    "moe_layer_end_index": (JsonType("an integer >= -1", lambda v: _is_int(v, -1)), True),
    "moe_layer_interval": (POSITIVE, True),
    "use_bias": (BOOL, True),
    "attention_bias": (BOOL, True),
    "use_sliding_window": (BOOL, True),
    "max_window_layers": (COUNT, True),
}
# The keys of `rope_parameters` / `rope_scaling` (and of their per-attention-type parts, Gemma 3's full_attention
# and sliding_attention) the converter reads; null in them is the same as left out.
ROPE_TYPES: dict[str, JsonType] = {
    "rope_type": STRING,
    "type": STRING,
    "rope_theta": NUMBER,
    "factor": NUMBER,
    "original_max_position_embeddings": POSITIVE,
    "low_freq_factor": NUMBER,
    "high_freq_factor": NUMBER,
    "extrapolation_factor": NUMBER,
    "attention_factor": NUMBER,
    "beta_fast": NUMBER,
    "beta_slow": NUMBER,
    "partial_rotary_factor": NUMBER,
    "long_factor": NUMBERS,
    "short_factor": NUMBERS,
    "full_attention": OBJECT,
    "sliding_attention": OBJECT,
}


def _refuse(path: Path, key: str, value: Any, expected: str) -> UserError:
    shown = "null" if value is None else repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return UserError(f"{path}: {key} is {shown}; expected {expected}")


def _check_rope(path: Path, prefix: str, rp: dict[str, Any]) -> None:
    for key, jtype in ROPE_TYPES.items():
        v = rp.get(key)
        if v is not None and not jtype.check(v):
            raise _refuse(path, prefix + key, v, jtype.expected)
        if isinstance(v, dict) and key in ("full_attention", "sliding_attention"):
            _check_rope(path, f"{prefix}{key}.", v)


def check_types(path: Path, cfg: dict[str, Any], prefix: str = "") -> None:
    """Every key of HPARAM_TYPES (and the RoPE dicts' ROPE_TYPES) that `cfg` has is of its type; one UserError
    naming the file, the key and the type expected otherwise (not a struct.error from the GGUF writer later)."""
    for key, (jtype, nullable) in HPARAM_TYPES.items():
        if key not in cfg:
            continue
        v = cfg[key]
        if v is None and nullable:
            continue
        if v is None or not jtype.check(v):
            raise _refuse(path, prefix + key, v, jtype.expected)
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(key), dict):
            _check_rope(path, f"{prefix}{key}.", cfg[key])
    if isinstance(cfg.get("text_config"), dict) and not prefix:
        check_types(path, cfg["text_config"], "text_config.")


def load_hparams(model_dir: Path) -> dict[str, Any]:
    """config.json with the defaults transformers would fill in for the keys the converter reads, every one of them
    checked against HPARAM_TYPES."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    hp = read_json(path)
    if not isinstance(hp, dict):
        raise UserError(f"{path}: expected a JSON object")
    check_types(path, hp)
    if isinstance(hp.get("text_config"), dict):
        hp = {**hp, **hp["text_config"], "model_type": hp["text_config"].get("model_type", hp.get("model_type"))}
    model_type = hp.get("model_type")
    if model_type == "gemma3":
        model_type = "gemma3_text"
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        if key not in hp and model_type in _DEFAULTS:  # every supported family's config has them
            raise UserError(f"{path}: no {key}; expected {POSITIVE.expected}")
    for key, value in _DEFAULTS.get(model_type, {}).items():
        hp.setdefault(key, value)
    if hp.get("tie_word_embeddings") is None:  # null (Gemma 3's outer config allows it): the family's default
        hp["tie_word_embeddings"] = _DEFAULTS.get(model_type, {}).get("tie_word_embeddings", False)
    if hp.get("num_key_value_heads") is None and hp.get("num_attention_heads"):
        hp["num_key_value_heads"] = hp["num_attention_heads"]
    if model_type in ("llama", "mistral") and hp.get("head_dim") is None and hp.get("num_attention_heads"):
        hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
    if not hp.get("rope_parameters") and hp.get("rope_theta") is None:
        hp["rope_theta"] = 10_000.0
    if model_type == "gemma3_text" and not hp.get("layer_types") and hp.get("num_hidden_layers"):
        every = hp.get("sliding_window_pattern") or 6  # Gemma 3: five sliding layers, then a global one
        hp["layer_types"] = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(hp["num_hidden_layers"])
        ]
    return hp


def rope_params(hp: dict[str, Any]) -> dict[str, Any]:
    """Global-attention RoPE parameters from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`;
    a null value is left out (its default applies)."""
    rp = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if isinstance(rp.get("full_attention"), dict):
        rp = dict(rp["full_attention"])
    rp = {k: v for k, v in rp.items() if v is not None}
    if "rope_theta" not in rp and hp.get("rope_theta") is not None:
        rp["rope_theta"] = hp["rope_theta"]
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    if "original_max_position_embeddings" not in rp and hp.get("original_max_position_embeddings") is not None:
        rp["original_max_position_embeddings"] = hp["original_max_position_embeddings"]
    return rp


def _sliding_rope_theta(hp: dict[str, Any]) -> float | None:
    rp = hp.get("rope_parameters") or {}
    if "sliding_attention" in rp:
        return rp["sliding_attention"].get("rope_theta")
    return hp.get("rope_local_base_freq")


def _first(*values: Any) -> Any:
    """The first value that is not None (a null in config.json is as if left out)."""
    return next((v for v in values if v is not None), None)


def _head_dim(hp: dict[str, Any]) -> int:
    return hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]


def qwen_sliding_layers(hp: dict[str, Any]) -> list[int]:
    """The layers transformers runs with a sliding window in a Qwen2/Qwen3(-MoE) config (`use_sliding_window`: only
    some layers, by `max_window_layers` or `layer_types`); llama.cpp's qwen2/qwen3 graphs attend over the whole
    context in every layer. Empty for the other families and when the window is off."""
    model_type, n_layer = hp.get("model_type"), hp["num_hidden_layers"]
    if model_type not in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") or not hp.get("use_sliding_window"):
        return []
    if not (hp["sliding_window"] if "sliding_window" in hp else 4096):  # null (Qwen2-MoE: 0 too): no window
        return []
    if model_type == "qwen3_moe":  # every layer slides
        return list(range(n_layer))
    if hp.get("layer_types"):
        return [i for i, t in enumerate(hp["layer_types"]) if t == "sliding_attention"]
    top = _first(hp.get("max_window_layers"), 28)
    if model_type == "qwen2_moe":  # transformers 5: every other layer below max_window_layers
        return [i for i in range(n_layer) if (i + 1) % 2 and i < top]
    return [i for i in range(n_layer) if i >= top]


def _common_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """Hyper-parameters every decoder shares."""
    if sliding := qwen_sliding_layers(hp):
        shown = ", ".join(map(str, sliding[:8])) + (", ..." if len(sliding) > 8 else "")
        raise UserError(
            f"config.json: use_sliding_window is true, so transformers gives layer(s) {shown} a sliding window of "
            f"{hp.get('sliding_window', 4096)} tokens; llama.cpp's {hp['model_type']} attends over the whole context "
            "in every layer, so the GGUF would answer differently (no released Qwen model sets it)"
        )
    w.add_block_count(hp["num_hidden_layers"])
    if hp.get("max_position_embeddings") is not None:
        w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    if hp.get("num_key_value_heads") is not None:
        w.add_head_count_kv(hp["num_key_value_heads"])
    rp = rope_params(hp)
    rope_type = rp.get("rope_type")
    if rope_type == "linear" and rp.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    elif rope_type == "yarn" and rp.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        if rp.get("original_max_position_embeddings") is None:
            raise UserError("config.json: YaRN RoPE scaling without original_max_position_embeddings")
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if rp.get(key) is not None:
                add(rp[key])
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif rope_type not in (None, "default", "llama3"):
        raise UserError(f"RoPE scaling type {rope_type!r} is not supported; supported: linear, yarn, llama3, longrope")
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(rp["rope_theta"])
    if (swa_theta := _sliding_rope_theta(hp)) is not None:
        w.add_rope_freq_base_swa(swa_theta)
    if hp.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if (n_expert := _first(hp.get("num_local_experts"), hp.get("num_experts"))) is not None:
        w.add_expert_count(n_expert)
    if hp.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(hp["num_experts_per_tok"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def _llama_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    _common_params(hp, w)
    if hp.get("vocab_size") is not None:
        w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(_head_dim(hp))


def _qwen3moe_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    _common_params(hp, w)
    if hp.get("mlp_only_layers") or _first(hp.get("decoder_sparse_step"), 1) != 1:
        raise UserError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
    if hp.get("moe_intermediate_size") is None:
        raise UserError("config.json: moe_intermediate_size is null; expected a positive integer (Qwen3-MoE)")
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])


def _qwen2moe_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """Qwen2-MoE: routed experts plus one gated shared expert in every layer; llama.cpp's graph neither normalizes the
    top-k routing weights nor has dense layers or an output projection tied to the embedding."""
    _common_params(hp, w)
    if hp.get("mlp_only_layers") or _first(hp.get("decoder_sparse_step"), 1) != 1:
        raise UserError("Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
    if hp.get("norm_topk_prob"):
        raise UserError("Qwen2-MoE config: norm_topk_prob is true; llama.cpp's Qwen2-MoE does not normalize them")
    if hp.get("tie_word_embeddings"):
        raise UserError("Qwen2-MoE config: tie_word_embeddings is true; llama.cpp's Qwen2-MoE needs its own lm_head")
    for key, add in (
        ("moe_intermediate_size", w.add_expert_feed_forward_length),
        ("shared_expert_intermediate_size", w.add_expert_shared_feed_forward_length),
    ):
        if hp.get(key) is None:
            raise UserError(f"config.json: {key} is null; expected a positive integer (Qwen2-MoE)")
        add(hp[key])


def _ernie45_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """ERNIE 4.5 (dense): `use_bias` gives transformers' MLP biases that llama.cpp's ernie4_5 never loads (a file
    with them fails to load: too many tensors), so it is refused."""
    if hp.get("use_bias"):
        raise UserError("ERNIE 4.5 config: use_bias is true; llama.cpp's ernie4_5 has no MLP biases (cannot load them)")
    _common_params(hp, w)


def _ernie45moe_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """ERNIE 4.5 MoE (21B-A3B, 300B-A47B): dense layers before `moe_layer_start_index`, then routed experts (chosen by
    softmax + a correction bias, weights renormalized) beside always-on shared experts of moe_num_shared_experts *
    moe_intermediate_size. llama.cpp's loader gives every layer from the start index on its experts, so a config with
    dense layers elsewhere (an interval or an end index) is refused, as are biases (its FFNs have none)."""
    n_layer = hp["num_hidden_layers"]
    start = _first(hp.get("moe_layer_start_index"), 1)
    end = _first(hp.get("moe_layer_end_index"), -1)
    step = _first(hp.get("moe_layer_interval"), 1)
    end = n_layer - 1 if end == -1 else end
    if step != 1 or end < n_layer - 1 or start >= n_layer:
        raise UserError(
            f"ERNIE 4.5 MoE config: moe_layer_start_index {start}, moe_layer_end_index {end}, moe_layer_interval "
            f"{step} with {n_layer} layers; llama.cpp's ernie4_5-moe has experts in every layer from the start index "
            "to the last (interval 1)"
        )
    if hp.get("use_bias"):
        raise UserError("ERNIE 4.5 MoE config: use_bias is true; llama.cpp's ernie4_5-moe has no MLP or lm_head biases")
    for key in ("moe_num_experts", "moe_k", "moe_intermediate_size"):
        if hp.get(key) is None:
            raise UserError(f"config.json: {key} is null; expected a positive integer (ERNIE 4.5 MoE)")
    _common_params(hp, w)
    w.add_expert_count(hp["moe_num_experts"])
    w.add_expert_used_count(hp["moe_k"])
    w.add_interleave_moe_layer_step(step)
    w.add_leading_dense_block_count(start)
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    shared = _first(hp.get("moe_num_shared_experts"), 0)
    w.add_expert_shared_count(shared)
    if shared:
        w.add_expert_shared_feed_forward_length(hp["moe_intermediate_size"] * shared)


def _cohere_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """Command-R / Aya-23: LayerNorm (no bias), attention and MLP in parallel, logits scaled by `logit_scale`; the
    context is `model_max_length` where config.json has it (Command-R says 8192 in max_position_embeddings but was
    trained on 128k, as llama.cpp's converter reads it)."""
    if rope_params(hp).get("rope_type") not in (None, "default"):
        raise UserError("Cohere config: RoPE scaling is not supported; llama.cpp's Command-R runs without it")
    if hp.get("tie_word_embeddings") is False:
        raise UserError("Cohere config: tie_word_embeddings is false; llama.cpp's Command-R has no lm_head of its own")
    n_layer, qk_norm = hp["num_hidden_layers"], bool(hp.get("use_qk_norm"))
    if qk_norm != (n_layer >= 64):  # llama.cpp loads (and requires) q/k norms by layer count alone
        raise UserError(
            f"Cohere config: use_qk_norm is {str(qk_norm).lower()} with {n_layer} layers; llama.cpp's Command-R "
            "normalizes queries and keys exactly when a model has 64 layers or more (Command-R+)"
        )
    _common_params(
        {**hp, "max_position_embeddings": _first(hp.get("model_max_length"), hp["max_position_embeddings"])}, w
    )
    w.add_layer_norm_eps(hp["layer_norm_eps"])
    w.add_logit_scale(hp["logit_scale"])
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _cohere2_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """Command R7B / Command A: Command-R's parallel block, LayerNorm and scaled logits; its sliding-window layers
    rotate queries and keys, its global layers do not (NoPE), as llama.cpp's cohere2 does. llama.cpp slides every
    layer but each 4th unless the file lists them, so another `layer_types` is written out."""
    if rope_params(hp).get("rope_type") not in (None, "default"):
        raise UserError("Cohere2 config: RoPE scaling is not supported; llama.cpp's cohere2 runs without it")
    if hp.get("tie_word_embeddings") is False:
        raise UserError("Cohere2 config: tie_word_embeddings is false; llama.cpp's cohere2 has no lm_head of its own")
    if hp.get("attention_bias"):
        raise UserError("Cohere2 config: attention_bias is true; llama.cpp's cohere2 has no attention biases")
    n_layer, window = hp["num_hidden_layers"], hp.get("sliding_window")
    if not window:  # transformers then gives no layer a window, and so no layer RoPE
        shown = "null" if window is None else window
        raise UserError(
            f"Cohere2 config: sliding_window is {shown}; transformers then rotates no layer, llama.cpp needs one"
        )
    every = _first(hp.get("sliding_window_pattern"), 4)
    cycle = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n_layer)]
    types = hp.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                      for i in range(n_layer)]  # fmt: skip
    head_dim = hp["hidden_size"] // hp["num_attention_heads"]  # what transformers uses, whatever head_dim says
    _common_params({**hp, "head_dim": head_dim}, w)
    w.add_vocab_size(hp["vocab_size"])
    w.add_layer_norm_eps(hp["layer_norm_eps"])
    w.add_logit_scale(hp["logit_scale"])
    w.add_sliding_window(window)
    if types != cycle:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _gemma_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """Gemma (1): no RoPE keys unless the base differs from llama.cpp's 10000; queries scaled by 1/sqrt(head_dim)."""
    rp = rope_params(hp)
    if rp.get("rope_type") not in (None, "default"):
        raise UserError(f"Gemma config: RoPE scaling {rp['rope_type']!r} is not supported for Gemma")
    if hp.get("attn_logit_softcapping") is not None or hp.get("final_logit_softcapping") is not None:
        raise UserError("Gemma config has logit soft-capping, which Gemma (1) does not use; is this Gemma 2?")
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(_head_dim(hp))
    w.add_value_length(_head_dim(hp))
    if rp.get("rope_theta", 10000.0) != 10000.0:
        w.add_rope_freq_base(rp["rope_theta"])


def _gemma2_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """Gemma 2: no RoPE keys (llama.cpp's 10000 is Gemma 2's), soft-capping, sliding window every other layer."""
    n_layer, n_head, hidden = hp["num_hidden_layers"], hp["num_attention_heads"], hp["hidden_size"]
    head_dim = _first(hp.get("head_dim"), 256)
    # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 46-layer 27B, by 1/sqrt(head_dim) otherwise
    scalar = _first(hp.get("query_pre_attn_scalar"), 256)
    want = hidden // n_head if n_layer == 46 else head_dim
    if scalar != want:
        raise UserError(f"Gemma 2 config: query_pre_attn_scalar {scalar}, but llama.cpp scales queries by {want}")
    if rope_params(hp).get("rope_theta", 10000.0) != 10000.0:
        raise UserError("Gemma 2 config: rope_theta is not 10000, the only value llama.cpp uses for Gemma 2")
    w.add_context_length(hp.get("max_position_embeddings", 8192))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    for key, add, default in (
        ("attn_logit_softcapping", w.add_attn_logit_softcapping, 50.0),
        ("final_logit_softcapping", w.add_final_logit_softcapping, 30.0),
    ):
        if hp.get(key, default) is not None:  # null: no soft-capping
            add(hp.get(key, default))
    w.add_sliding_window(_first(hp.get("sliding_window"), 4096))
    types = hp.get("layer_types") or []
    if types and types != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])  # not llama.cpp's default cycle


def _glm4_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    _common_params(hp, w)
    factor = _first(rope_params(hp).get("partial_rotary_factor"), hp.get("partial_rotary_factor"), 0.5)
    w.add_rope_dimension_count(int(_head_dim(hp) * factor))


def _granite_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """Granite: Llama plus four multipliers; llama.cpp derives head_dim from hidden / heads."""
    hp = {k: v for k, v in hp.items() if k != "head_dim"}
    _llama_params(hp, w)
    for key, add in (
        ("attention_multiplier", w.add_attention_scale),
        ("embedding_multiplier", w.add_embedding_scale),
        ("residual_multiplier", w.add_residual_scale),
        ("logits_scaling", w.add_logit_scale),
    ):
        if hp.get(key):
            add(hp[key])


def _olmo2_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    _common_params(hp, w)
    if hp.get("sliding_window") is not None:  # OLMo 3
        w.add_sliding_window(hp["sliding_window"])
        types = hp.get("layer_types") or ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                                          for i in range(hp["num_hidden_layers"])]  # fmt: skip
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _smollm3_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    """SmolLM3: Llama with RoPE left out of every 4th layer, a pattern llama.cpp fixes in code."""
    n_layer = hp["num_hidden_layers"]
    every = _first(hp.get("no_rope_layer_interval"), 4)
    nope = hp.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n_layer)]
    if list(nope) != [int((i + 1) % 4 != 0) for i in range(n_layer)]:
        raise UserError(
            f"SmolLM3 config: no_rope_layers {list(nope)}; llama.cpp leaves RoPE out of every 4th layer only"
        )
    _llama_params(hp, w)


def _llama3_rope_factors(hp: dict[str, Any], w: gguf.GGUFWriter) -> list[tuple[str, np.ndarray]]:
    """Llama 3.1 frequency scaling as a `rope_freqs` tensor (Meta's published formula)."""
    rp = rope_params(hp)
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return []
    dim = _head_dim(hp)
    base = rp.get("rope_theta", 10000.0)
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.array(out, dtype=np.float32))]


def _gemma3_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    _common_params(hp, w)  # with Gemma3's defaults for what older configs leave out (_DEFAULTS)
    if hp.get("attn_logit_softcapping") is not None:
        raise UserError("Gemma3 config has attn_logit_softcapping, which Gemma3 does not use; is this Gemma2?")
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(_first(hp.get("sliding_window"), 4096))
        if hp.get("layer_types"):
            # which layers slide: without this llama.cpp assumes Gemma3's 5-local-1-global cycle from layer 0,
            # wrong for any config whose layer_types differ from that cycle (llama.cpp's converter drops it)
            w.add_sliding_window_pattern([t == "sliding_attention" for t in hp["layer_types"]])


def _phi3_rope_parts(hp: dict[str, Any]) -> tuple[dict[str, Any], int]:
    rp = rope_params(hp)
    rot = _first(rp.get("partial_rotary_factor"), hp.get("partial_rotary_factor"), 1.0)
    return rp, int(rot * hp["hidden_size"]) // hp["num_attention_heads"]


def _phi3_params(hp: dict[str, Any], w: gguf.GGUFWriter) -> None:
    rp, rope_dims = _phi3_rope_parts(hp)
    orig = rp.get("original_max_position_embeddings")
    if orig is None:
        raise UserError("Phi3 config.json lacks original_max_position_embeddings; llama.cpp needs it")
    w.add_context_length(hp["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(_first(rp.get("rope_theta"), 10_000.0))
    w.add_sliding_window(hp.get("sliding_window") or 0)


def _phi3_rope_factors(hp: dict[str, Any], w: gguf.GGUFWriter) -> list[tuple[str, np.ndarray]]:
    """LongRoPE factors (Phi-3 128k variants) as tensors plus the attention factor."""
    rp, rope_dims = _phi3_rope_parts(hp)
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not long:
        return []
    orig = rp.get("original_max_position_embeddings")
    if orig is None:
        raise UserError("Phi3 config.json lacks original_max_position_embeddings; llama.cpp needs it")
    scale = hp["max_position_embeddings"] / orig
    kind = str(rp.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise UserError(f"Phi3 rope scaling type {kind!r} is not supported; supported: longrope, su, yarn")
    if short is None or len(long) != len(short) or len(long) != rope_dims // 2:
        raise UserError(f"Phi3 rope long/short factors must both have {rope_dims // 2} entries")
    w.add_rope_scaling_attn_factors(attn)
    return [
        ("rope_factors_long.weight", np.asarray(long, dtype=np.float32)),
        ("rope_factors_short.weight", np.asarray(short, dtype=np.float32)),
    ]


ARCHS: dict[str, Arch] = {
    "llama": Arch(
        gguf.MODEL_ARCH.LLAMA,
        ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
        permute_qk=True,
        params=_llama_params,
        extra=_llama3_rope_factors,
    ),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",), params=_common_params),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3, ("Qwen3ForCausalLM",), params=_common_params),
    "gemma3": Arch(gguf.MODEL_ARCH.GEMMA3, ("Gemma3ForCausalLM",), norm_add=1.0, params=_gemma3_params),
    "phi3": Arch(
        gguf.MODEL_ARCH.PHI3,
        ("Phi3ForCausalLM",),
        params=_phi3_params,
        extra=_phi3_rope_factors,
        rstrip_names=("phi3", "phi-3"),
    ),
    "qwen3moe": Arch(gguf.MODEL_ARCH.QWEN3MOE, ("Qwen3MoeForCausalLM",), params=_qwen3moe_params),
    "gemma": Arch(gguf.MODEL_ARCH.GEMMA, ("GemmaForCausalLM",), norm_add=1.0, params=_gemma_params),
    "qwen2moe": Arch(gguf.MODEL_ARCH.QWEN2MOE, ("Qwen2MoeForCausalLM",), params=_qwen2moe_params),
    # ERNIE 4.5 rotates adjacent pairs, as llama.cpp's NORM RoPE does: no permutation
    "ernie4_5": Arch(gguf.MODEL_ARCH.ERNIE4_5, ("Ernie4_5ForCausalLM",), params=_ernie45_params),
    "ernie4_5_moe": Arch(gguf.MODEL_ARCH.ERNIE4_5_MOE, ("Ernie4_5_MoeForCausalLM",), params=_ernie45moe_params),
    # Cohere rotates adjacent pairs too (NORM RoPE); its StarCoder-style pre-tokenizer is llama.cpp's "command-r"
    "cohere": Arch(
        gguf.MODEL_ARCH.COMMAND_R,
        ("CohereForCausalLM",),
        params=_cohere_params,
        pre_names={"starcoder": "command-r"},
    ),
    "cohere2": Arch(
        gguf.MODEL_ARCH.COHERE2,
        ("Cohere2ForCausalLM",),
        params=_cohere2_params,
        pre_names={"starcoder": "command-r"},
    ),
    "gemma2": Arch(gguf.MODEL_ARCH.GEMMA2, ("Gemma2ForCausalLM",), norm_add=1.0, params=_gemma2_params),
    "glm4": Arch(
        gguf.MODEL_ARCH.GLM4,
        ("Glm4ForCausalLM",),
        params=_glm4_params,
        pre_names={"llama-bpe": "glm4"},  # the same regex; llama.cpp also drops GLM's BOS under this name
        special_tokens={"bos": "<|endoftext|>", "unk": "<|endoftext|>"},
    ),
    "granite": Arch(gguf.MODEL_ARCH.GRANITE, ("GraniteForCausalLM",), permute_qk=True, params=_granite_params),
    # OLMo 2's cl100k-style regex without ignore_merges: llama.cpp calls it "dbrx" (and "smaug-bpe": same code)
    "olmo2": Arch(gguf.MODEL_ARCH.OLMO2, ("Olmo2ForCausalLM",), params=_olmo2_params, pre_names={"smaug-bpe": "dbrx"}),
    "smollm3": Arch(gguf.MODEL_ARCH.SMOLLM3, ("SmolLM3ForCausalLM",), permute_qk=True, params=_smollm3_params),
}
SUPPORTED = sorted(hf for a in ARCHS.values() for hf in a.hf_archs)


def model_name(arch: Arch, name: str, rstrip: bool) -> str:
    """`general.name` as written: with the architecture's name added where llama.cpp needs it to strip whitespace
    after added tokens as the HF tokenizer does."""
    if rstrip and arch.rstrip_names and not any(n in name.lower() for n in arch.rstrip_names):
        return f"{name} ({arch.rstrip_names[-1]})"
    return name


def arch_for(hp: dict[str, Any], where: Path) -> Arch:
    """The Arch of a config's `architectures[0]`; UserError listing the supported ones otherwise."""
    names = hp.get("architectures") or []
    hf = names[0] if names else None
    for arch in ARCHS.values():
        if hf in arch.hf_archs:
            return arch
    raise UserError(
        f"{where / 'config.json'}: architecture {hf!r} is not supported for GGUF export; "
        f"supported: {', '.join(SUPPORTED)}"
    )


def _permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's RoPE expects: within each head, interleave the two rotary halves."""
    half = n_rows // n_head // 2
    idx = np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(n_rows)
    return idx


def plan_tensors(
    arch: Arch, hp: dict[str, Any], shapes: dict[str, tuple[int, ...]], n_vocab_real: int | None
) -> list[TensorSpec]:
    """Map every HF tensor to its GGUF spec; unknown tensors are a UserError naming them."""
    n_layer = hp["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, n_layer)
    n_head, n_kv = hp["num_attention_heads"], hp.get("num_key_value_heads") or hp["num_attention_heads"]
    specs: list[TensorSpec] = []
    tied = hp.get("tie_word_embeddings") is True  # load_hparams checked it is a bool
    for name, (shape, stack) in stack_experts(shapes).items():
        if name.endswith(arch.skip):
            continue
        if tied and name == "lm_head.weight":
            continue  # a tied head is the embedding; llama.cpp reuses token_embd
        for hf, out_shape, rows in fused_experts(name, shape) if is_fused(name, shape) else [(name, shape, None)]:
            # the router's score correction (ERNIE 4.5 MoE's moe_statics; transformers 5 holds it under the router) is
            # named as a bias in GGUF
            hf = hf.replace(".gate.moe_statics.", ".moe_statics.").replace("_correction_bias", "_correction.bias")
            mapped = tmap.get_type_and_name(hf, try_suffixes=(".weight", ".bias"))
            if mapped is None and name == "lm_head.weight":  # Gemma, Gemma 2: llama.cpp has no output tensor
                raise UserError(
                    f"{name}: this model has its own output projection (tie_word_embeddings false, e.g. after training "
                    f"lm_head), but llama.cpp's {arch.name} always uses the token embedding as the output projection; "
                    "it cannot be exported to GGUF without changing its answers"
                )
            if mapped is None:
                raise UserError(f"tensor {name!r} {list(shape)} has no GGUF name for architecture {arch.name}")
            ttype, new = mapped
            if arch.permute_qk and ttype in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
                rows = _permute_rows(out_shape[0], n_head if ttype == gguf.MODEL_TENSOR.ATTN_Q else n_kv)
            if ttype == gguf.MODEL_TENSOR.TOKEN_EMBD and arch.gguf_arch == gguf.MODEL_ARCH.GEMMA3 and n_vocab_real:
                if n_vocab_real < out_shape[0]:  # Gemma pads the embedding past the tokenizer; llama.cpp wants equal
                    rows = np.arange(n_vocab_real)
                    out_shape = (n_vocab_real, *out_shape[1:])
            add = arch.norm_add if new.endswith("norm.weight") else 0.0
            source = stack[0] if stack else name
            specs.append(TensorSpec(new, tuple(out_shape), source, rows, add, stack=stack))
    return specs


def extra_tensors(arch: Arch, hp: dict[str, Any], w: gguf.GGUFWriter) -> list[TensorSpec]:
    """Generated tensors (rope factors), which may also add metadata to `w`."""
    return [TensorSpec(n, d.shape, None, data=d) for n, d in arch.extra(hp, w)]


def check_geometry(arch: Arch, hp: dict[str, Any], shapes: dict[str, tuple[int, ...]], model_dir: Path) -> None:
    """Every weight's shape must follow config.json's sizes, as llama.cpp checks when it loads the file (a GGUF
    whose head count disagrees with its tensors cannot be loaded)."""
    hidden, n_head = hp["hidden_size"], hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads") or n_head
    hd, ff = _head_dim(hp), hp.get("intermediate_size")
    expect = {  # GGUF tensor kind -> (rows, cols) of the HF weight; None: not fixed by the config
        "attn_q": (n_head * hd, hidden),
        "attn_k": (n_kv * hd, hidden),
        "attn_v": (n_kv * hd, hidden),
        "attn_qkv": ((n_head + 2 * n_kv) * hd, hidden),
        "attn_output": (hidden, n_head * hd),
        "ffn_gate": (ff, hidden),
        "ffn_up": (ff, hidden),
        "ffn_gate_up": (2 * ff if ff else None, hidden),  # one fused tensor (Phi-3, GLM-4: gate_up_proj)
        "ffn_down": (hidden, ff),
        "token_embd": (None, hidden),
        "output": (None, hidden),
    }
    keys = "hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size"
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, hp["num_hidden_layers"])
    layers: set[int] = set()
    for name, shape in shapes.items():
        mapped = tmap.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            continue  # plan_tensors names it
        parts = mapped[1].split(".")
        if parts[0] == "blk":
            layers.add(int(parts[1]))
        kind = "ffn_gate_up" if "gate_up" in name else parts[-2]
        want = expect.get(kind) if name.endswith(".weight") and len(shape) == 2 else None
        if want is None:
            continue
        if any(w is not None and w != have for w, have in zip(want, shape, strict=True)):
            shown = [w if w is not None else "any" for w in want]
            raise UserError(
                f"{model_dir / 'config.json'} does not match the weights: tensor {name} is {list(shape)}, "
                f"the config ({keys} = {hidden}, {n_head}, {n_kv}, {hd}, {ff}) needs {shown}; llama.cpp could not load "
                "such a GGUF"
            )
    missing = sorted(set(range(hp["num_hidden_layers"])) - layers)
    if missing:
        raise UserError(
            f"{model_dir / 'config.json'} says num_hidden_layers={hp['num_hidden_layers']} but the weights have no "
            f"tensors for layer(s) {', '.join(map(str, missing[:8]))}"
        )
