"""Check 1, template: training renderer == exported HF Jinja == GGUF `tokenizer.chat_template` == Modelfile TEMPLATE
(rendered by real Go `text/template`; SKIPPED with the reason when Go is absent).

A Modelfile TEMPLATE derived from a Jinja that Go cannot express exactly (content trimming, dates in another format
than Ollama's `currentDate`) says so in its header; a probe that differs only in such a stated way is a WARN (a
finding, not a silent pass), any other difference FAILs. Probes the model's own Jinja refuses (e.g. a system message
for Gemma 2) are left out and counted."""

from __future__ import annotations

import datetime
import re
from typing import Any

from exporter.diff import first_diff, text_diff
from exporter.errors import UserError
from exporter.verify.artifacts import GGUFInfo, Modelfile, VerifyOptions
from exporter.verify.corpus import PROBE_CONVERSATIONS
from exporter.verify.report import Check

Probe = tuple[list[dict[str, str]], str, str]  # conversation, its full rendering, its prompt's (generation prompt)


def training_template(name: str | None, art: VerifyOptions) -> tuple[Any, str | None]:
    """(ChatTemplate or None, reason when None): --template wins (a LLaMA-Factory name for the model's tokenizer),
    else the training base's own (a family when one matches, else derived from its Jinja), else the adapter's or
    merged dir's."""
    from exporter import templates

    dirs = [d for d in (art.base, art.adapter, art.merged) if d is not None and d.is_dir()]
    if name and name != "auto" and dirs:  # with the dir's bos/eos filled in (base-model formats end with its eos)
        return templates.resolve(dirs[0], name), None
    if name and name != "auto":
        return templates.load_template(name), None
    for d in dirs:
        try:
            return templates.resolve(d, None), None
        except UserError as e:
            return None, f"cannot tell the training template from {d}: {e} (pass --template FAMILY)"
    return None, "no model dir to detect the template from (pass --template FAMILY)"


def render(tok: Any, jinja: str, messages: list[dict[str, str]], gen: bool) -> str:
    """`messages` through `jinja` with transformers' apply_chat_template (the reference renderer)."""
    return tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=gen)


def render_each(tok: Any, jinja: str, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Each whole conversation through `jinja`, leaving out those the model's own Jinja refuses (e.g. a system
    message for Gemma 2)."""
    out = []
    for conv in conversations:
        try:
            out.append(render(tok, jinja, conv, False))
        except Exception:  # jinja2's TemplateError from raise_exception, or whatever else the model's Jinja raises
            continue
    return out


def _strip_bos(ids: list[int], bos: int | None) -> list[int]:
    return ids[1:] if ids and bos is not None and ids[0] == bos else ids


def _check_training(tpl: Any, tok: Any, probes: list[Probe]) -> Check:
    """Training renderer vs the template's Jinja, as token ids (a leading BOS and trailing whitespace after the final
    end-of-turn token are not part of what the model learns to emit; the end-of-turn text training appends to an
    answer the Jinja leaves open is)."""
    from exporter import render

    bos, n, bad = tok.bos_token_id, len(probes), None
    close = tpl.format.get("close", "") if tpl.kind == "jinja" else ""
    for conv, text, _ in probes:
        ids = list(render.encode(tok, tpl, conv)[0])
        want = tok(text, add_special_tokens=False)["input_ids"]
        a, b = _strip_bos(ids, bos), _strip_bos(want, bos)
        if a == b or (len(a) < len(b) and b[: len(a)] == a and not tok.decode(b[len(a) :]).strip()):
            continue
        if close and len(a) > len(b) and a[: len(b)] == b and tok.decode(a[len(b) :]) == close:
            continue
        i = first_diff(a, b)
        bad = (
            f"training renderer and the {tpl.name} Jinja differ at token {i}: "
            f"{tok.decode(a[max(0, i - 3) : i + 5])!r} vs {tok.decode(b[max(0, i - 3) : i + 5])!r}"
        )
        break
    detail = bad or f"{n} conversations: ids equal"
    return Check("template", f"training ({tpl.name})", "fail" if bad else "pass", detail, {"conversations": n})


def _check_jinja(tpl: Any, tok: Any, target: str, jinja: str | None, probes: list[Probe]) -> Check:
    """One exported Jinja string renders every probe (and its generation prompt) like the training template."""
    if not jinja:
        return Check("template", target, "fail", f"{target} has no chat template")
    n, problem = len(probes), None
    for conv, full, gen in probes:
        try:
            got_full, got_gen = render(tok, jinja, conv, False), render(tok, jinja, conv[:-1], True)
        except Exception as e:  # a broken template raises from jinja2
            problem = f"its chat template does not render: {type(e).__name__}: {e}"
            break
        if got_full != full:
            problem = text_diff(got_full, full, target, f"training template {tpl.name}")
            break
        if got_gen != gen:
            problem = text_diff(got_gen, gen, target + " (generation prompt)", f"training template {tpl.name}")
            break
    same = jinja == tpl.jinja
    detail = problem or (f"{n} conversations render identically" + ("" if same else " (string differs)"))
    return Check("template", target, "fail" if problem else "pass", detail, {"conversations": n})


def _stated(mf: Modelfile) -> tuple[list[str], bool, str | None]:
    """What the Modelfile's header says about its TEMPLATE: the 'differs on' lines, whether content trimming is
    among them, and the strftime format of a date the Jinja prints differently from Ollama's currentDate."""
    header = [ln[1:].strip() for ln in mf.path.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
    differs = [ln for ln in header if ln.startswith("differs on ")]
    trims = any("whitespace around content" in ln for ln in differs)
    date = next((m.group(1) for ln in header if (m := re.search(r"prints today's date as '([^']+)'", ln))), None)
    return header, trims, date


def _explained(got: str, want: str, trims: bool, date_fmt: str | None) -> bool:
    """Whether `got` (Go) differs from `want` (Jinja) only in ways the Modelfile states."""
    if date_fmt:
        today = datetime.date.today()
        got = got.replace(today.isoformat(), "\x00")
        want = want.replace(today.strftime(date_fmt), "\x00")
    if got == want:
        return True
    return trims and "".join(got.split()) == "".join(want.split())


def _check_go(tpl: Any, tok: Any, mf: Modelfile, probes: list[Probe]) -> Check:
    """A Modelfile TEMPLATE through real Go text/template renders each generation prompt like the training one; a
    stated difference is a WARN."""
    target, n = mf.path.name, len(probes)
    header, trims, date_fmt = _stated(mf)
    if mf.template is None:
        stated = next((ln for ln in header if "no Ollama TEMPLATE" in ln or "no TEMPLATE" in ln), None)
        return Check("template", target, "warn" if stated else "fail", stated or f"{target} has no TEMPLATE")
    from exporter import gotemplate

    problem, warned = None, []
    try:  # one Go process renders every prompt; SYSTEM is prepended the way Ollama does (ollama_data)
        items = [(mf.template, gotemplate.ollama_data(c[:-1], system=mf.system)) for c, _, _ in probes]
        outs = gotemplate.render_go_many(items)
    except gotemplate.GoUnavailable as e:
        return Check("template", target, "skip", f"Go toolchain not available: {e}")
    except UserError as e:  # the TEMPLATE does not parse or execute in Go
        outs, problem = [], f"{target} TEMPLATE fails in Go text/template: {e}"
    for k, (got, (_, _, gen)) in enumerate(zip(outs, probes, strict=False)):
        want = gen.removeprefix(tok.bos_token) if tok.bos_token else gen  # Ollama's tokenizer adds BOS
        if got == want:
            continue
        diff = text_diff(got, want, f"{target} TEMPLATE (Go)", f"training template {tpl.name}")
        if _explained(got, want, trims, date_fmt):
            warned.append(f"probe {k}: {diff}")
        else:
            problem = diff
            break
    metrics = {"conversations": n, "stated_differences": warned}
    if problem:
        return Check("template", target, "fail", problem, metrics)
    # a difference no probe shows (an earlier answer's reasoning, dropped by the Jinja) is still a finding
    reasoning = [ln for ln in header if ln.startswith(("earlier answers' reasoning", "differs on earlier reasoning"))]
    if warned:
        why = "; ".join(ln for ln in header if ln.startswith("differs on ") or "today's date" in ln)
        detail = f"{n - len(warned)} of {n} prompts render identically in Go; the others differ as stated ({why})"
        return Check("template", target, "warn", "; ".join([detail, *(ln for ln in reasoning if ln not in why)]),
                     metrics)  # fmt: skip
    if reasoning:
        detail = f"{n} prompts render identically with Go text/template; " + "; ".join(reasoning)
        return Check("template", target, "warn", detail, metrics)
    return Check("template", target, "pass", f"{n} prompts render identically with Go text/template", metrics)


def check_template(
    tpl: Any,
    tpl_reason: str | None,
    tok: Any,
    exported: dict[str, str],
    ggufs: list[GGUFInfo],
    modelfiles: list[Modelfile],
) -> list[Check]:
    """Training renderer == exported HF Jinja == GGUF chat_template == Go-rendered Modelfile TEMPLATE."""
    if tpl is None:
        return [Check("template", "training", "fail" if exported else "skip", tpl_reason or "no template")]
    if tpl.kind == "none":
        return [Check("template", "training", "skip", "; ".join(tpl.notes))]
    probes: list[Probe] = []
    for conv in PROBE_CONVERSATIONS:
        try:
            probes.append((conv, render(tok, tpl.jinja, conv, False), render(tok, tpl.jinja, conv[:-1], True)))
        except Exception:  # the model's own Jinja refuses this probe (e.g. a system message): nothing to compare
            continue
    if not probes:
        return [Check("template", "training", "fail", f"the {tpl.name} Jinja refuses every probe conversation")]
    checks = [_check_training(tpl, tok, probes)]
    sources: dict[str, str | None] = {**exported, **{g.path.name: g.chat_template for g in ggufs}}
    checks += [_check_jinja(tpl, tok, target, jinja, probes) for target, jinja in sources.items()]
    checks += [_check_go(tpl, tok, mf, probes) for mf in modelfiles]
    return checks
