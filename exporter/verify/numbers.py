"""Check 4, perplexity: adapter (PEFT) vs merged (HF) vs each GGUF (llama.cpp) vs each quantized HF dir, on the SAME
token ids (tokenized once with HF), with llama.cpp's chunked method (windows of `ctx` tokens, first token -> BOS,
the second half scored). Three limits per type, each against the reference (merged, else the adapter): the relative
perplexity difference, the mean KL divergence and the top-1 agreement. Perplexity alone barely moves on a near-uniform
model even when it is not the reference's (a merge at half the adapter's weight: 0.07%), KL and top-1 do (1e-2, 82%)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.config import did_you_mean, read_text
from exporter.errors import UserError
from exporter.hf_dir import adds_bos
from exporter.progress import progress
from exporter.verify.artifacts import GGUFInfo, GGUFLoadError, VerifyOptions, load_llama
from exporter.verify.chat import TIE_MARGIN
from exporter.verify.corpus import HELD_OUT_TEXT
from exporter.verify.report import Check

# Max relative perplexity difference to the merged HF model, per artifact type (GGUF file type or "adapter"). The
# types llama.cpp quantizes without an imatrix: about 2x (q4_k_m: 1.8x) llama.cpp's own relative figure for Llama 3
# 8B vs its f16 (tools/perplexity/README.md, "None" rows: q6_K 0.35%, q5_K_M 0.91%, q5_K_S 1.7%, q5_1 1.7%, q5_0
# 2.1%, q4_K_M 2.8%, q4_K_S 4.3%, q4_1 7.2%, q4_0 7.5%, q3_K_L 8.9%, q3_K_M 10.5%, q3_K_S 26%, q2_K 56%; iq4_NL/XS
# and iq3_S/M have imatrix rows only, so theirs is the nearest K-quant's x the fixtures' ratio to it, about 1.15), and
# at least 2x what the fixtures measure (llama3, qwen2, qwen2 sharpened; default --ctx/--max-windows: q4_1 6.3%, q2_k
# 15%, the near-degenerate qwen2's iq3_s 41% and iq3_m 28%, every other type <= 7.2%). A correct q4_0 or q4_1 of
# Llama 3 8B is 7.5% off: the old 5% failed it.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "adapter": 0.002,
    "f32": 0.001,
    "f16": 0.001,
    "bf16": 0.002,
    "q8_0": 0.005,
    "q6_k": 0.01,
    "q5_k_m": 0.02,
    "q5_k_s": 0.035,
    "q5_0": 0.045,
    "q5_1": 0.035,
    "q4_k_m": 0.05,
    "q4_k_s": 0.09,
    "q4_0": 0.15,
    "q4_1": 0.15,
    "iq4_nl": 0.1,
    "iq4_xs": 0.1,
    "q3_k_l": 0.18,
    "q3_k_m": 0.21,
    "q3_k_s": 0.55,
    "iq3_m": 0.6,
    "iq3_s": 0.8,
    "q2_k": 1.15,
    # quantized HF dirs from `exporter quantize` (kind = method + bits, read from their quantization_config)
    "gptq8": 0.01,
    "bnb8": 0.01,
    "gptq4": 0.10,
    "awq4": 0.10,
    "bnb4": 0.10,
}

# Mean KL divergence from the reference (nats per scored token) at most, per type. Correct exports measured: the
# fixtures (llama3, qwen2, qwen2 sharpened, qwen2-real with a random LoRA; default --ctx/--max-windows): adapter vs an
# fp32/fp16/bf16 merge <= 1.5e-6 (merges at 0.9 / 0.5 of the adapter's weight: 2.6e-4-4.3e-4 / 6.4e-3-9.5e-3);
# f32 <= 5e-8, f16 <= 1.2e-7, bf16 <= 6e-6, q8_0 <= 1.6e-4, q6_k <= 1.2e-3, q5_k_m <= 3.2e-3, q4_k_m <= 1.2e-2,
# q4_0 <= 1.5e-2. The demo (data/demo.yaml: trained 80 steps at lr 0.01, a bf16 merge): adapter 2.1e-4, f16 6.1e-6,
# q8_0 1.4e-2, q4_k_m 0.17. llama.cpp's tools/perplexity/README.md, Llama 3 8B vs its f16: bf16 2.5e-5, q8_0 1.4e-3,
# q6_K 5.5e-3, q5_K_M 1.1e-2, q4_K_M 3.1e-2, q4_0 7.2e-2, q3_K_M 0.10, q2_K 0.45. Adapter and full precision: about
# 10x the demo (which is 10x a real model's bf16 rounding); quantized types: 20x llama.cpp's figure (the demo's tiny
# model loses 5-10x more to quantization than an 8B one), a bound on a broken file rather than on quality. iq4_nl,
# iq4_xs, iq3_s, iq3_m (llama.cpp's figures are with an imatrix only): the nearest K-quant's figure without one (q4_K_S
# 0.043, q3_K_S 0.23) x the fixtures' KL ratio to it (iq4 1.10-1.16, iq3_s 1.08-1.15, iq3_m 0.94-1.02), x20. The
# fixtures measured (llama3 / sharpened qwen2): q5_k_s 3.2e-3 / 1.8e-3, q5_0 4.1e-3 / 2.2e-3, q5_1 3.3e-3 / 1.9e-3,
# q4_k_s 1.1e-2 / 4.8e-3, q4_1 1.3e-2 / 5.9e-3, iq4_nl 1.2e-2 / 5.5e-3, iq4_xs 1.2e-2 / 5.5e-3, q3_k_l 3.7e-2 / 1.3e-2,
# q3_k_m 3.8e-2 / 1.3e-2, q3_k_s 4.5e-2 / 1.6e-2, iq3_m 4.6e-2 / 1.5e-2, iq3_s 5.1e-2 / 1.7e-2, q2_k 0.15 / 2.7e-2.
DEFAULT_KLD: dict[str, float] = {
    "adapter": 2e-3,
    "f32": 1e-4,
    "f16": 5e-4,
    "bf16": 1e-3,
    "q8_0": 0.03,
    "q6_k": 0.1,
    "q5_k_m": 0.2,
    "q5_k_s": 0.3,
    "q5_0": 0.45,
    "q5_1": 0.35,
    "q4_k_m": 0.6,
    "q4_k_s": 0.9,
    "q4_0": 1.4,
    "q4_1": 1.4,
    "iq4_nl": 1.0,
    "iq4_xs": 1.0,
    "q3_k_l": 1.7,
    "q3_k_m": 2.0,
    "q3_k_s": 4.5,
    "iq3_m": 4.5,
    "iq3_s": 5.5,
    "q2_k": 9.0,
}

# Top-1 agreement with the reference at least, per type; a disagreement where the reference's own top two are a
# near-tie (chat.TIE_MARGIN apart) counts as agreement: either is a faithful pick. Correct exports of the fixtures
# agree on 100% (near-ties excused; raw 96.8% at worst, bf16), the demo's adapter and f16 100%; merges at 0.9 / 0.5
# of the adapter: 86-97% / 36-83%. llama.cpp: bf16 vs f16 99.7% (raw). Quantized types have none by default: their
# top-1 follows how peaked the model is (a correct q4_k_m: 50% on a near-uniform fixture, 92% on the demo and on
# Llama 3 8B); set one with --top1-threshold.
DEFAULT_TOP1: dict[str, float] = {"adapter": 0.99, "f32": 0.99, "f16": 0.99, "bf16": 0.98}

# The three limits: VerifyOptions field -> (option, defaults, example, the most a value may be). Types without a
# KL or top-1 default (quantized HF dirs) have those reported, not judged, unless given.
LIMITS: dict[str, tuple[str, dict[str, float], str, float]] = {
    "ppl_threshold": ("--ppl-threshold", DEFAULT_THRESHOLDS, "q8_0=0.005", math.inf),
    "kld_threshold": ("--kld-threshold", DEFAULT_KLD, "q8_0=0.005", math.inf),
    "top1_threshold": ("--top1-threshold", DEFAULT_TOP1, "q8_0=0.9", 1.0),
}

Limits = dict[str, dict[str, float]]  # LIMITS field -> type -> limit
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


def parse_thresholds(spec: str | None, field: str = "ppl_threshold") -> dict[str, float]:
    """`"f16=0.001,q8_0=0.005"` -> {"f16": 0.001, "q8_0": 0.005} (fractions: 0.001 = 0.1%), to set over the defaults
    of `field` (a key of LIMITS)."""
    option, _, example, _ = LIMITS[field]
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
            raise UserError(f"{option}: {item!r} is not TYPE=FRACTION (e.g. {example})") from None
        out[key.strip().lower()] = fraction
    return check_thresholds(out, field)


# the types of quantized HF dirs (artifacts.quantized_kind): method + bits
_HF_KIND = re.compile(r"(gptq|awq)\d+|bnb[48]")


def _known_types() -> list[str]:
    """Every type verify can compare: "adapter", each llama.cpp file type (as read_gguf names it) and the HF kinds."""
    from gguf import LlamaFileType

    ftypes = [t.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower() for t in LlamaFileType]
    return ["adapter", *ftypes, "gptq4", "gptq8", "awq4", "bnb4", "bnb8"]


def check_thresholds(thresholds: dict[str, Any], field: str = "ppl_threshold") -> dict[str, float]:
    """Thresholds as lower-case type -> float; each a type verify compares (`q8` matches no file: refused, not
    ignored) and a finite number >= 0 (a NaN one would fail every file, an inf one pass any), top-1 ones at most 1."""
    option, _, example, most = LIMITS[field]
    out: dict[str, float] = {}
    known = _known_types()
    for key, value in thresholds.items():
        name = str(key).lower()
        if name not in known and not _HF_KIND.fullmatch(name):
            raise UserError(
                f"{option} {key}: not a type verify compares{did_you_mean(name, known)} (types: adapter, a GGUF file "
                "type such as f16, q8_0, q4_k_m, or a quantized HF dir's gptq4, gptq8, awq4, bnb4, bnb8)"
            )
        fraction = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if fraction is None or not math.isfinite(fraction) or not 0 <= fraction <= most:
            bound = "between 0 and 1" if math.isfinite(most) else ">= 0"
            raise UserError(
                f"{option} {key}={value!r}: expected a finite fraction {bound} (e.g. {example.partition('=')[2]})"
            )
        out[name] = float(fraction)
    return out


def limits_of(opts: Any) -> Limits:
    """Each limit of LIMITS: its defaults with what `opts` (VerifyOptions) sets over them, checked."""
    return {f: {**defaults, **check_thresholds(getattr(opts, f), f)} for f, (_, defaults, _, _) in LIMITS.items()}


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
    top1: float | None = None  # the share of tokens whose argmax is the reference's (llama.cpp's "same top p")
    near_ties: float | None = None  # the share whose argmax differs where the reference's top two are a near-tie

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def score(fn: LogitsFn, wins: list[list[int]], ref: Scored | None, keep: bool, step: Callable[[], None]) -> Scored:
    """Score the second half of each window (llama.cpp's `first = n_ctx/2`); KL and top-1 agreement vs `ref`."""
    nll, n, kld, agree, ties, kept = 0.0, 0, 0.0, 0, 0, []
    for k, w in enumerate(wins):
        first = len(w) // 2
        logits = fn(w)[first : len(w) - 1]
        if ref is not None and ref.logprobs is not None:
            v = min(logits.shape[-1], ref.logprobs[k].shape[-1])
            lp, rp = _log_softmax(logits[:, :v]), ref.logprobs[k][:, :v]
            kld += float((np.exp(rp) * (rp - lp)).sum())
            mine, theirs = lp.argmax(-1), rp.argmax(-1)
            agree += int((mine == theirs).sum())
            rows = np.arange(len(mine))
            gap = rp[rows, theirs] - rp[rows, mine]  # how much the reference prefers its pick to ours
            ties += int(((mine != theirs) & (gap < TIE_MARGIN)).sum())
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
        out.kld, out.top1, out.near_ties = kld / max(n, 1), agree / max(n, 1), ties / max(n, 1)
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


def _judge(c: _Candidate, s: Scored, ref: Scored, ref_name: str, limits: Limits, base: dict) -> Check:
    """Pass when the relative perplexity difference, the KL divergence and the top-1 agreement (near-ties excused) to
    the reference are each within the type's limit; a type without a KL or top-1 limit has it reported only."""
    thr, kld_max, top1_min = (limits[f].get(c.kind) for f in LIMITS)
    rel = abs(s.ppl - ref.ppl) / ref.ppl
    kld, top1 = s.kld or 0.0, (s.top1 or 0.0) + (s.near_ties or 0.0)
    metrics = {"ppl": s.ppl, "rel_diff": rel, "threshold": thr, "type": c.kind, "kld": s.kld, "kld_limit": kld_max,
               "top1": s.top1, "near_ties": s.near_ties, "top1_limit": top1_min, **base}  # fmt: skip
    if not math.isfinite(s.ppl):
        detail = f"perplexity is {s.ppl} (non-finite logits or a target token with probability 0)"
        return Check("perplexity", c.target, "fail", detail, metrics)
    if thr is None:
        detail = f"no threshold for type {c.kind!r}; pass --ppl-threshold {c.kind}=FRACTION"
        return Check("perplexity", c.target, "fail", detail, metrics)
    ties = f" + {s.near_ties * 100:.1f}% near-ties" if s.near_ties else ""
    # (name, passed, "value op limit") for each judged measure; an unlimited one shows its value only
    parts = [("ppl", rel <= thr, f"ppl {s.ppl:.4f} vs {ref_name} {ref.ppl:.4f}: {rel * 100:.3f}% "
              f"{'<=' if rel <= thr else '>'} {thr * 100:g}%")]  # fmt: skip
    if kld_max is None:
        parts.append(("KL", True, f"KL {kld:.2e} (no limit)"))
    else:
        parts.append(("KL", kld <= kld_max, f"KL {kld:.2e} {'<=' if kld <= kld_max else '>'} {kld_max:g}"))
    shown = f"top-1 {(s.top1 or 0) * 100:.1f}%{ties}"
    misses = round((1 - top1) * s.tokens)
    if top1_min is None:
        parts.append(("top-1", True, f"{shown} (no limit)"))
    elif top1 >= top1_min:
        parts.append(("top-1", True, f"{shown} >= {top1_min * 100:g}%"))
    elif misses <= 1:  # on a short text one token is more than the limit allows: rounding can flip one pick
        parts.append(("top-1", True, f"{shown}: 1 token of {s.tokens} differs (one token alone fails no limit)"))
    else:
        parts.append(("top-1", False, f"{shown} < {top1_min * 100:g}%"))
    failed = [name for name, ok, _ in parts if not ok]
    lead = f"{' and '.join(failed)} beyond the {c.kind} limit: " if failed else ""
    detail = lead + ", ".join(text for _, _, text in parts) + f" ({c.kind})"
    return Check("perplexity", c.target, "fail" if failed else "pass", detail, metrics)


def check_numbers(
    art: VerifyOptions,
    tok: Any,
    hf_model: Any,
    infos: list[GGUFInfo],
    quantized_kinds: list[str],
    limits: Limits,
    ctx: int,
    max_windows: int,
) -> list[Check]:
    """Reference (merged, else adapter) perplexity, then every other model's on the same windows, judged against
    `limits` (LIMITS field -> type -> limit)."""
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
            checks.append(_judge(c, s, ref, ref_name, limits, base))
    return checks
