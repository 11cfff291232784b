"""Check 1, template: training renderer == exported HF Jinja == GGUF `tokenizer.chat_template` == Modelfile TEMPLATE
(rendered by real Go `text/template`; SKIPPED with the reason when Go is absent)."""

from __future__ import annotations

from typing import Any

from exporter.diff import first_diff, text_diff
from exporter.errors import UserError
from exporter.verify.artifacts import GGUFInfo, Modelfile, VerifyOptions
from exporter.verify.corpus import PROBE_CONVERSATIONS
from exporter.verify.report import Check


def training_template(name: str | None, art: VerifyOptions) -> tuple[Any, str | None]:
    """(ChatTemplate or None, reason when None): --template wins, else detect on the training base, else merged."""
    from exporter import templates

    for d in (art.base, art.adapter, art.merged):
        if d is not None and d.is_dir():
            try:  # with the dir's bos/eos filled in (base-model formats end answers with the tokenizer's eos)
                return templates.resolve(d, name), None
            except UserError as e:
                if name:
                    raise
                return None, f"cannot tell the training template from {d}: {e} (pass --template FAMILY)"
    if name:
        return templates.load_template(name), None
    return None, "no model dir to detect the template from (pass --template FAMILY)"


def render(tok: Any, jinja: str, messages: list[dict[str, str]], gen: bool) -> str:
    """`messages` through `jinja` with transformers' apply_chat_template (the reference renderer)."""
    return tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=gen)


def _strip_bos(ids: list[int], bos: int | None) -> list[int]:
    return ids[1:] if ids and bos is not None and ids[0] == bos else ids


def _check_training(tpl: Any, tok: Any, ref_full: list[str]) -> Check:
    """Training renderer vs the family's Jinja, as token ids (a leading BOS and trailing whitespace after the final
    end-of-turn token are not part of what the model learns to emit)."""
    from exporter import templates

    bos, n, bad = tok.bos_token_id, len(PROBE_CONVERSATIONS), None
    for conv, text in zip(PROBE_CONVERSATIONS, ref_full, strict=True):
        ids = list(templates.encode(tok, tpl, conv)[0])
        want = tok(text, add_special_tokens=False)["input_ids"]
        a, b = _strip_bos(ids, bos), _strip_bos(want, bos)
        if a != b and not (len(a) < len(b) and b[: len(a)] == a and not tok.decode(b[len(a) :]).strip()):
            i = first_diff(a, b)
            bad = (
                f"training renderer and the {tpl.name} Jinja differ at token {i}: "
                f"{tok.decode(a[max(0, i - 3) : i + 5])!r} vs {tok.decode(b[max(0, i - 3) : i + 5])!r}"
            )
            break
    detail = bad or f"{n} conversations: ids equal"
    return Check("template", f"training ({tpl.name})", "fail" if bad else "pass", detail, {"conversations": n})


def _check_jinja(tpl: Any, tok: Any, target: str, jinja: str | None, refs: tuple[list[str], list[str]]) -> Check:
    """One exported Jinja string renders every probe (and its generation prompt) like the training template."""
    if not jinja:
        return Check("template", target, "fail", f"{target} has no chat template")
    n, problem = len(PROBE_CONVERSATIONS), None
    for conv, full, gen in zip(PROBE_CONVERSATIONS, *refs, strict=True):
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


def _check_go(tpl: Any, tok: Any, mf: Modelfile, ref_gen: list[str]) -> Check:
    """A Modelfile TEMPLATE through real Go text/template renders each generation prompt like the training one."""
    target, n = mf.path.name, len(PROBE_CONVERSATIONS)
    if mf.template is None:
        return Check("template", target, "fail", f"{target} has no TEMPLATE")
    from exporter import gotemplate

    problem = None
    try:  # one Go process renders every prompt; SYSTEM is prepended the way Ollama does (ollama_data)
        items = [(mf.template, gotemplate.ollama_data(c[:-1], system=mf.system)) for c in PROBE_CONVERSATIONS]
        outs = gotemplate.render_go_many(items)
    except gotemplate.GoUnavailable as e:
        return Check("template", target, "skip", f"Go toolchain not available: {e}")
    except UserError as e:  # the TEMPLATE does not parse or execute in Go
        outs, problem = [], f"{target} TEMPLATE fails in Go text/template: {e}"
    for got, gen in zip(outs, ref_gen, strict=False):
        want = gen.removeprefix(tok.bos_token) if tok.bos_token else gen  # Ollama's tokenizer adds BOS
        if got != want:
            problem = text_diff(got, want, f"{target} TEMPLATE (Go)", f"training template {tpl.name}")
            break
    detail = problem or f"{n} prompts render identically with Go text/template"
    return Check("template", target, "fail" if problem else "pass", detail, {"conversations": n})


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
    ref_full = [render(tok, tpl.jinja, c, False) for c in PROBE_CONVERSATIONS]
    ref_gen = [render(tok, tpl.jinja, c[:-1], True) for c in PROBE_CONVERSATIONS]
    checks = [_check_training(tpl, tok, ref_full)]
    sources: dict[str, str | None] = {**exported, **{g.path.name: g.chat_template for g in ggufs}}
    checks += [_check_jinja(tpl, tok, target, jinja, (ref_full, ref_gen)) for target, jinja in sources.items()]
    checks += [_check_go(tpl, tok, mf, ref_gen) for mf in modelfiles]
    return checks
