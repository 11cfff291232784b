"""Check 4, perplexity: adapter (PEFT) vs merged (HF) vs each GGUF (llama.cpp) vs each quantized HF dir, on the SAME
token ids (tokenized once with HF), with llama.cpp's chunked method (windows of `ctx` tokens, first token -> BOS,
the second half scored); the relative difference to the reference must stay within the threshold of the type.
KL divergence and top-1 agreement against the reference are reported beside it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.config import read_text
from exporter.errors import UserError
from exporter.hf_dir import adds_bos
from exporter.progress import progress
from exporter.verify.artifacts import GGUFInfo, GGUFLoadError, VerifyOptions, load_llama
from exporter.verify.corpus import HELD_OUT_TEXT
from exporter.verify.report import Check

# Max relative perplexity difference to the merged HF model, per artifact type (GGUF file type or "adapter").
DEFAULT_THRESHOLDS: dict[str, float] = {
    "adapter": 0.002,
    "f32": 0.001,
    "f16": 0.001,
    "bf16": 0.002,
    "q8_0": 0.005,
    "q6_k": 0.01,
    "q5_k_m": 0.02,
    "q5_k_s": 0.02,
    "q5_0": 0.02,
    "q5_1": 0.02,
    "q4_k_m": 0.05,
    "q4_k_s": 0.05,
    "q4_0": 0.05,
    "q4_1": 0.05,
    "q3_k_l": 0.10,
    "q3_k_m": 0.10,
    "q3_k_s": 0.15,
    "q2_k": 0.25,
    # quantized HF dirs from `exporter quantize` (kind = method + bits, read from their quantization_config)
    "gptq8": 0.01,
    "bnb8": 0.01,
    "gptq4": 0.10,
    "awq4": 0.10,
    "bnb4": 0.10,
}

LogitsFn = Callable[[list[int]], np.ndarray]


def windows(ids: Sequence[int], ctx: int, bos: int | None, max_windows: int) -> list[list[int]]:
    """llama.cpp's perplexity chunks: consecutive windows of `ctx` tokens (a shorter tail is not used), the first
    token of each replaced by BOS when the tokenizer adds one."""
    out = []
    for k in range(min(len(ids) // ctx, max_windows)):
        w = list(ids[k * ctx : (k + 1) * ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def parse_thresholds(spec: str | None) -> dict[str, float]:
    """`"f16=0.001,q8_0=0.005"` -> {"f16": 0.001, "q8_0": 0.005} (relative: 0.001 = 0.1%), to set over the defaults."""
    out: dict[str, float] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            fraction = float(value)
        except ValueError:
            raise UserError(f"--ppl-threshold: {item!r} is not TYPE=FRACTION (e.g. q8_0=0.005)") from None
        out[key.strip().lower()] = fraction
    return check_thresholds(out)


def check_thresholds(thresholds: dict[str, Any]) -> dict[str, float]:
    """Thresholds as lower-case type -> float; each a finite number >= 0 (a NaN one would fail every file, an inf
    one pass any)."""
    out: dict[str, float] = {}
    for key, value in thresholds.items():
        fraction = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if fraction is None or not math.isfinite(fraction) or fraction < 0:
            raise UserError(f"--ppl-threshold {key}={value!r}: expected a finite fraction >= 0 (e.g. 0.005)")
        out[str(key).lower()] = float(fraction)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class Scored:
    """Per-window log-probabilities of the scored half (kept for the reference only) and the mean NLL."""

    nll: float
    tokens: int
    logprobs: list[np.ndarray] | None = None
    kld: float | None = None
    top1: float | None = None

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def score(fn: LogitsFn, wins: list[list[int]], ref: Scored | None, keep: bool, step: Callable[[], None]) -> Scored:
    """Score the second half of each window (llama.cpp's `first = n_ctx/2`); KL and top-1 agreement vs `ref`."""
    nll, n, kld, agree, kept = 0.0, 0, 0.0, 0, []
    for k, w in enumerate(wins):
        first = len(w) // 2
        logits = fn(w)[first : len(w) - 1]
        if ref is not None and ref.logprobs is not None:
            v = min(logits.shape[-1], ref.logprobs[k].shape[-1])
            lp, rp = _log_softmax(logits[:, :v]), ref.logprobs[k][:, :v]
            kld += float((np.exp(rp) * (rp - lp)).sum())
            agree += int((lp.argmax(-1) == rp.argmax(-1)).sum())
        else:
            lp = _log_softmax(logits)
        target = np.asarray(w[first + 1 :])
        nll -= float(lp[np.arange(len(target)), target].sum())
        n += len(target)
        if keep:
            kept.append(lp.astype(np.float32))
        step()
    out = Scored(nll / max(n, 1), n, kept if keep else None)
    if ref is not None and ref.logprobs is not None:
        out.kld, out.top1 = kld / max(n, 1), agree / max(n, 1)
    return out


def hf_logits(model: Any) -> LogitsFn:
    """Logits of a transformers model for one window."""
    import torch

    def fn(w: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([w], device=model.device)).logits[0].float().cpu().numpy()

    return fn


def _gguf_logits(llm: Any) -> LogitsFn:
    def fn(w: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(w)
        return np.array(llm.scores[: len(w)], dtype=np.float32)

    return fn


def load_model(model_dir: Path | str) -> Any:
    """`AutoModelForCausalLM.from_pretrained` as saved (quantized dirs included), on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporter import quiet

    kw: dict[str, Any] = {"device_map": "cuda"} if torch.cuda.is_available() else {}
    with quiet.library_quiet():  # a GPT-QModel dir imports it, banner and all
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).eval()


def load_hf(model_dir: Path) -> Any:
    """An HF causal LM in float32, eval mode (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


class QuantizedLoadError(Exception):
    """A quantized HF dir that transformers cannot load (missing extra, corrupt files): a failed check."""


def _load_quantized(model_dir: Path) -> Any:
    try:
        return load_model(model_dir)
    except Exception as e:  # the loaders raise many types; the check reports which
        hint = " (install the [quant] extra: pip install 'exporter[quant]')" if isinstance(e, ImportError) else ""
        raise QuantizedLoadError(f"cannot load {model_dir}: {type(e).__name__}: {e}{hint}") from None


def _load_adapter(base: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(base), adapter).eval()


@dataclasses.dataclass
class _Candidate:
    """One model scored against the reference on the same windows."""

    target: str
    kind: str  # a threshold key
    load: Callable[[], Any]
    is_hf: bool


def _candidates(
    art: VerifyOptions, has_hf: bool, infos: list[GGUFInfo], kinds: list[str], ctx: int
) -> list[_Candidate]:
    out: list[_Candidate] = []
    if has_hf and art.adapter is not None:
        out.append(_Candidate("adapter", "adapter", lambda: _load_adapter(art.base, art.adapter), True))
    for g in infos:
        load = lambda g=g: load_llama(g, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True)  # noqa: E731
        out.append(_Candidate(g.path.name, g.file_type, load, False))
    for q, kind in zip(art.quantized, kinds, strict=True):
        out.append(_Candidate(q.name, kind, lambda q=q: _load_quantized(q), True))
    return out


def _judge(c: _Candidate, s: Scored, ref: Scored, ref_name: str, thr: float | None, base: dict) -> Check:
    """Pass when the relative perplexity difference to the reference is within the type's threshold."""
    rel = abs(s.ppl - ref.ppl) / ref.ppl
    metrics = {"ppl": s.ppl, "rel_diff": rel, "threshold": thr, "type": c.kind, "kld": s.kld, "top1": s.top1, **base}
    if not math.isfinite(s.ppl):
        detail = f"perplexity is {s.ppl} (non-finite logits or a target token with probability 0)"
        return Check("perplexity", c.target, "fail", detail, metrics)
    if thr is None:
        detail = f"no threshold for type {c.kind!r}; pass --ppl-threshold {c.kind}=FRACTION"
        return Check("perplexity", c.target, "fail", detail, metrics)
    ok = rel <= thr
    detail = (
        f"ppl {s.ppl:.4f} vs {ref_name} {ref.ppl:.4f}: {rel * 100:.3f}% "
        f"{'<=' if ok else '>'} {thr * 100:g}% ({c.kind}); KL {s.kld:.2e}, top-1 {s.top1 * 100:.1f}%"
    )
    return Check("perplexity", c.target, "pass" if ok else "fail", detail, metrics)


def check_numbers(
    art: VerifyOptions,
    tok: Any,
    hf_model: Any,
    infos: list[GGUFInfo],
    quantized_kinds: list[str],
    thresholds: dict[str, float],
    ctx: int,
    max_windows: int,
) -> list[Check]:
    """Reference (merged, else adapter) perplexity, then every other model's on the same windows."""
    if hf_model is None and art.adapter is None:
        return [Check("perplexity", "-", "skip", "no HF model (--merged or --adapter) to compare with")]
    text = read_text(art.text) if art.text else HELD_OUT_TEXT
    ids = tok(text, add_special_tokens=False)["input_ids"]  # tokenized ONCE: every model sees these ids
    wins = windows(ids, ctx, tok.bos_token_id if adds_bos(tok) else None, max_windows)
    if not wins:
        raise UserError(f"held-out text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    others = _candidates(art, hf_model is not None, infos, quantized_kinds, ctx)
    with progress("perplexity", "", (1 + len(others)) * len(wins), transient=True) as step:
        ref_name = "merged" if hf_model is not None else "adapter"
        ref_model = hf_model if hf_model is not None else _load_adapter(art.base, art.adapter)
        ref = score(hf_logits(ref_model), wins, None, True, step)
        base = {"ref": ref_name, "ref_ppl": ref.ppl, "tokens": ref.tokens, "windows": len(wins), "ctx": ctx}
        ok = math.isfinite(ref.ppl)
        detail = f"reference ppl {ref.ppl:.4f} on {ref.tokens} tokens" + (
            "" if ok else ": non-finite, so nothing can be compared with it (non-finite logits or weights?)"
        )
        checks = [Check("perplexity", ref_name, "pass" if ok else "fail", detail, {"ppl": ref.ppl, **base})]
        for c in others:
            try:
                m = c.load()
            except (GGUFLoadError, QuantizedLoadError) as e:
                checks.append(Check("perplexity", c.target, "fail", str(e)))
                for _ in wins:
                    step()
                continue
            s = score(hf_logits(m) if c.is_hf else _gguf_logits(m), wins, ref, False, step)
            if hasattr(m, "close"):
                m.close()
            del m
            checks.append(_judge(c, s, ref, ref_name, thresholds.get(c.kind), base))
    return checks
