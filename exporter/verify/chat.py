"""Check 5, chat: greedy answers to N prompts through the template, HF vs each GGUF. Full-precision GGUFs must match
HF token for token including where they stop; quantized files report where they first diverge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exporter.diff import first_diff
from exporter.engine import ContextOverflow, LoadOptions, NonFiniteLogits, Sampling, from_hf_model, load
from exporter.errors import UserError
from exporter.progress import progress
from exporter.verify.artifacts import GGUFInfo
from exporter.verify.report import Check
from exporter.verify.template import render

FULL_PRECISION = ("f32", "f16", "bf16")
# Greedy divergence on a near-tie (HF top-2 logit gap below this) is rounding, not an export error: f16 weights and
# llama.cpp's f16 activations move logits of size ~10 by a few 1e-3 (the tolerance tests/test_gguf.py's greedy test
# uses too; Phi-3's fixture diverges on a 1.6e-3 gap)
TIE_MARGIN = 1e-2


def _greedy(engine: Any, prompt: list[int], stop: Sequence[int], max_new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens through the engine (what `exporter serve`/`chat` run), ending with the stop token when one is
    reached, and the top-2 log-prob gap at each step (= the logit gap)."""
    s = Sampling(max_new_tokens=max_new, ignore_eos=True, stop_ids=tuple(stop), logprobs=2)
    c = engine.generate([prompt], s)[0]
    return c.token_ids, [lp.top[0][1] - lp.top[1][1] for lp in c.logprobs or []]


def _judge(
    tok: Any, g: GGUFInfo, prompts: list[str], ref: list[tuple[list[int], list[float]]], outs: list[list[int]],
    stop: list[int],
) -> Check:  # fmt: skip
    """Compare one GGUF's answers with HF's: exact for full precision (near-ties excused), reported otherwise."""
    firsts: list[int | None] = []
    ties: set[int] = set()  # prompts whose first divergence is at a near-tie of HF's logits
    for k, (got, (want, gaps)) in enumerate(zip(outs, ref, strict=True)):
        if got == want:
            firsts.append(None)
            continue
        i = first_diff(got, want)
        firsts.append(i)
        if i < len(want) and i < len(got) and gaps[i] < TIE_MARGIN:
            ties.add(k)  # HF itself had a near-tie there: either token is a faithful greedy pick
    answers = [
        {"prompt": p, "hf": tok.decode(r[0], skip_special_tokens=True),
         "gguf": tok.decode(o, skip_special_tokens=True), "first_divergence": f}
        for p, r, o, f in zip(prompts, ref, outs, firsts, strict=True)
    ]  # fmt: skip
    metrics = {"prompts": len(prompts), "exact": firsts.count(None), "first_divergence": firsts,
               "hf_tokens": [r[0] for r in ref], "gguf_tokens": outs, "answers": answers,
               "near_ties": len(ties)}  # fmt: skip
    exact = f"{firsts.count(None)}/{len(prompts)}"
    if g.file_type not in FULL_PRECISION:
        div = ", ".join("=" if f is None else str(f) for f in firsts)
        return Check("chat", g.path.name, "pass", f"{exact} token-exact; first divergence per prompt: {div}", metrics)
    real = [k for k, f in enumerate(firsts) if f is not None and k not in ties]
    if not real:
        extra = f" ({len(ties)} near-tie)" if ties else ""
        return Check("chat", g.path.name, "pass", f"{exact} answers token-exact incl. stop{extra}", metrics)
    k = real[0]
    w, o, f = ref[k][0], outs[k], firsts[k]
    detail = (
        f"prompt {prompts[k]!r}: GGUF diverges from HF at token {f}: "
        f"HF {tok.decode(w[f : f + 4])!r}{' (stop)' if f == len(w) - 1 and w[-1] in stop else ''}"
        f" vs GGUF {tok.decode(o[f : f + 4])!r}" + (" (GGUF did not stop)" if len(o) > len(w) else "")
    )
    return Check("chat", g.path.name, "fail", detail, metrics)


def check_chat(
    tok: Any,
    hf_model: Any,
    jinja: str | None,
    infos: list[GGUFInfo],
    prompts: list[str],
    stop: list[int],
    max_new: int,
) -> list[Check]:
    """Greedy answers of HF, then of each GGUF to the same prompt ids."""
    if not infos or not prompts:
        return []
    if hf_model is None:
        return [Check("chat", "-", "skip", "needs --merged (the HF model to compare the GGUF answers with)")]
    if not jinja:
        return [Check("chat", "-", "fail", "no chat template to render the prompts with")]
    prompt_ids = [
        tok(render(tok, jinja, [{"role": "user", "content": p}], True), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    checks: list[Check] = []
    ctx = max(len(p) for p in prompt_ids) + max_new + 8
    with progress("chat", "", len(prompts) * (1 + len(infos)), transient=True) as step:
        ref = []
        with from_hf_model(hf_model, tok, LoadOptions("merged", max_seqs=1)) as hf:
            for k, ids in enumerate(prompt_ids):
                try:
                    ref.append(_greedy(hf, ids, stop, max_new))
                except NonFiniteLogits as e:  # no reference answers to compare with
                    return [Check("chat", "merged", "fail", f"prompt {k + 1}: {e}")]
                step()
        for g in infos:
            try:
                llm = load(LoadOptions(str(g.path), max_seqs=1, ctx=ctx))
            except UserError as e:
                detail = f"llama.cpp cannot load {g.path.name} ({e}; arch {g.arch!r}, tokenizer.ggml.pre={g.pre!r})"
                checks.append(Check("chat", g.path.name, "fail", detail))
                continue
            with llm:
                try:
                    outs = []
                    for ids in prompt_ids:
                        outs.append(_greedy(llm, ids, sorted(llm.eos_ids), max_new)[0])
                        step()
                except NonFiniteLogits as e:
                    checks.append(Check("chat", g.path.name, "fail", f"prompt {len(outs) + 1}: {e}"))
                    continue
                except ContextOverflow as e:  # the GGUF's context_length is below what HF answered in
                    detail = f"prompt {len(outs) + 1}: {e} (the GGUF's context_length caps it)"
                    checks.append(Check("chat", g.path.name, "fail", detail))
                    continue
            checks.append(_judge(tok, g, prompts, ref, outs, stop))
    return checks
