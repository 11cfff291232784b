"""Perplexity of a transformers model on given token ids, with llama.cpp's chunked method.

The ids are cut into `n_ctx`-long chunks (the tail shorter than a chunk is not used); when the tokenizer adds a
BOS token, each chunk's first id is replaced by BOS; only the second half of each chunk is scored, so every scored
token has at least `n_ctx / 2` tokens of context. This is `llama-perplexity`'s method, so HF and GGUF numbers on
the same ids are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.hf_dir import adds_bos


def windows(ids: Sequence[int], ctx: int, bos: int | None, max_windows: int) -> list[list[int]]:
    """llama.cpp's perplexity chunks: consecutive windows of `ctx` tokens, the first replaced by BOS if used."""
    out = []
    for k in range(min(len(ids) // ctx, max_windows)):
        w = list(ids[k * ctx : (k + 1) * ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def perplexity_model(model: Any, token_ids: Sequence[int], n_ctx: int = 512, bos_id: int | None = None) -> float:
    """Perplexity of an already loaded causal LM; `bos_id` replaces each chunk's first id when given."""
    import torch

    if n_ctx < 4:
        raise UserError(f"perplexity: n_ctx must be at least 4, got {n_ctx}")
    ids = list(token_ids)
    wins = windows(ids, n_ctx, bos_id, len(ids) // n_ctx)
    if not wins:
        raise UserError(f"perplexity: need at least {n_ctx} tokens for one chunk of n_ctx={n_ctx}, got {len(ids)}")
    first = n_ctx // 2
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            chunk = torch.tensor(w, dtype=torch.long)
            logits = model(chunk[None].to(device)).logits[0, first : n_ctx - 1].float()
            targets = chunk[first + 1 :].to(logits.device)
            logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])
            nll -= logp.sum().item()
            count += targets.numel()
    return math.exp(nll / count)


def load_model(model_dir: Path | str) -> Any:
    """`AutoModelForCausalLM.from_pretrained` (on the GPU when there is one), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"device_map": "cuda"} if torch.cuda.is_available() else {}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).eval()


def perplexity_hf(model_dir: Path | str, token_ids: Sequence[int], n_ctx: int = 512) -> float:
    """Perplexity of the HF model in `model_dir` on `token_ids` (llama.cpp's chunked method, BOS as its tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    bos = tok.bos_token_id if adds_bos(tok) else None
    return perplexity_model(load_model(model_dir), token_ids, n_ctx=n_ctx, bos_id=bos)
