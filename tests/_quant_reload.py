"""Run in a fresh process by test_quantize.py: reload quantized dirs with plain transformers and compare to the source.

Usage: python _quant_reload.py SPEC.json RESULT.json, where SPEC is
`{"n_ctx": 128, "cases": [{"key": ..., "source": dir, "quantized": dir, "text": held-out text}, ...]}`.
For each case it writes the quantized model's class and quantized-module count, whether its logits are finite,
the relative L2 distance of its logits to the source's, and both perplexities (verify's, llama.cpp's chunked method)
on the same token ids.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exporter.hf_dir import adds_bos
from exporter.verify.numbers import hf_logits, load_model, score, windows


def perplexity_hf(model_dir: str, ids: list[int], n_ctx: int) -> float:
    """Perplexity of the HF model in `model_dir` on `ids` with verify's method (BOS as its tokenizer adds it)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    wins = windows(ids, n_ctx, tok.bos_token_id if adds_bos(tok) else None, len(ids) // n_ctx)
    return score(hf_logits(load_model(model_dir)), wins, None, False, lambda: None).ppl


def _quantized_modules(model: torch.nn.Module) -> int:
    n = 0
    for mod in model.modules():
        name = type(mod).__name__
        if hasattr(mod, "qweight") or name in ("Linear4bit", "Linear8bitLt"):
            n += 1
    return n


def main() -> None:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    n_ctx = spec["n_ctx"]
    results = {}
    sources: dict[str, tuple[list[int], torch.Tensor, float]] = {}
    for case in spec["cases"]:
        src = case["source"]
        if src not in sources:
            ids = AutoTokenizer.from_pretrained(src)(case["text"])["input_ids"]
            model = load_model(src)
            with torch.no_grad():
                ref = model(torch.tensor([ids[:n_ctx]], device=model.device)).logits.float().cpu()
            sources[src] = (ids, ref, perplexity_hf(src, ids, n_ctx=n_ctx))
            del model
        ids, ref, ppl_src = sources[src]
        try:
            results[case["key"]] = _score(case["quantized"], ids, ref, ppl_src, n_ctx)
        except Exception as e:  # one broken output must not hide the others' results
            results[case["key"]] = {"error": f"{type(e).__name__}: {e}"}
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


def _score(path: str, ids: list[int], ref: torch.Tensor, ppl_src: float, n_ctx: int) -> dict:
    q = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = q(torch.tensor([ids[:n_ctx]], device=q.device)).logits.float().cpu()
    qc = q.config.quantization_config
    qm = qc.get("quant_method", "") if isinstance(qc, dict) else getattr(qc, "quant_method", "")
    return {
        "class": type(q).__name__,
        "quant_method": str(getattr(qm, "value", qm)),  # enum (QuantizationMethod.BITS_AND_BYTES) or str
        "quantized_modules": _quantized_modules(q),
        "finite": bool(torch.isfinite(logits).all()),
        "logits_rel": float((logits - ref).norm() / ref.norm()),
        "ppl_source": ppl_src,
        "ppl_quantized": perplexity_hf(path, ids, n_ctx=n_ctx),
        "tokens": len(ids),
    }


if __name__ == "__main__":
    main()
