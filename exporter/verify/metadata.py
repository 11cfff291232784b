"""Check 6, metadata: what llama.cpp and Ollama read from a GGUF's header that the other checks, which run the model
on short texts through llama.cpp, cannot see going wrong.

- `{arch}.context_length` is the HF config's (llama.cpp's converter: the first of max_position_embeddings, n_ctx,
  n_positions, max_length, max_sequence_length, model_max_length): Ollama cuts every num_ctx to it and llama.cpp's
  `-c 0` takes it, so a smaller one silently shortens every chat;
- `tokenizer.ggml.add_bos_token` is present and says what the HF tokenizer does: without the key llama.cpp and Ollama
  fall back to their own per-architecture defaults, which differ (llama.cpp adds no BOS to a qwen2 vocabulary,
  Ollama's qwen2 and llama models do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.config import read_json
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


def _check_gguf(g: GGUFInfo, ctx: tuple[str, int] | None, hf_adds_bos: bool | None) -> Check:
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
    detail = "; ".join(problems) or (", ".join(notes) + " as the HF model" if notes else "nothing to compare")
    metrics = {"context_length": g.context_length, "hf_context_length": ctx[1] if ctx else None,
               "add_bos_token": g.add_bos, "hf_adds_bos": hf_adds_bos}  # fmt: skip
    return Check("metadata", g.path.name, "fail" if problems else "pass", detail, metrics)


def check_metadata(ggufs: list[GGUFInfo], hf_dir: Path | None, tok: Any) -> list[Check]:
    """Each GGUF's context length and add_bos_token against the HF model's."""
    from exporter.hf_dir import adds_bos

    ctx = hf_context_length(hf_dir)
    hf_adds_bos = adds_bos(tok) if ggufs else None
    return [_check_gguf(g, ctx, hf_adds_bos) for g in ggufs]
