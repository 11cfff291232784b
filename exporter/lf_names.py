"""LLaMA-Factory template names wherever a template is named (train, merge, quantize, gguf, pipeline, `template`).

`--template llama3` resolves to a `ChatTemplate` (exporter.templates' protocol) that is LLaMA-Factory's `llama3`:
its `encoder` is `lf_templates.encode` (LF's ids and trained labels), its `tokenizer_fix` is LF's
`fix_special_tokens`, its end-of-turn tokens are LF's stop tokens (the fixed eos and the stop words), and its Jinja
is what LF leaves in the tokenizer (`fix_jinja_template`): the model's own chat template, unless the model has none
or the LF template replaces it (`replace_jinja_template`: alpaca, chatml, default, vicuna), then the Jinja generated
from the slots. The Ollama TEMPLATE, stops and default system are derived from that Jinja like any other
(`templates.detect_template_text`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from pathlib import Path
from typing import Any

from exporter import lf_templates as lf
from exporter.errors import UserError

KIND = "llamafactory"
NO_CUT = lf.LFOptions(cutoff_len=1 << 30)  # outside training nothing is cut
_TRAIN_KEYS = ("mask_history", "enable_thinking", "preserve_thinking", "default_system", "tool_format")
_fixed: dict[str, weakref.WeakSet] = {}  # tokenizers already through each template's fix_special_tokens


def is_lf_name(name: str | None) -> bool:
    return bool(name) and name in lf.names()


# ------------------------------------------------------------------ conversations


def to_lf(
    messages: list[dict[str, Any]], words: tuple[str, str] = ("<tool_call>", "</tool_call>")
) -> tuple[str, list[dict[str, str]]]:
    """(system, LF messages) from HF-style messages (system / user / assistant with tool_calls / tool) or from LF's
    own roles (function / observation), which pass through as they are. Tool calls become a function message (its
    JSON; text before the calls is kept in front of them, between the template's tool-call words)."""
    system = ""
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0].get("content") or "", messages[1:]
    out = []
    for k, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if not isinstance(content, str):
            raise UserError(f"message {k}: content must be a string, got {type(content).__name__}")
        if role == "assistant" and m.get("tool_calls"):
            calls = [tc.get("function", tc) for tc in m["tool_calls"]]
            objs = [{"name": c["name"], "arguments": c.get("arguments", {})} for c in calls]
            text = json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)
            out.append({"role": "function", "content": content + words[0] + text + words[1] if content else text})
        elif role == "tool":
            out.append({"role": "observation", "content": content})
        elif role in ("user", "assistant", "function", "observation"):
            out.append({"role": role, "content": content})
        else:
            raise UserError(f"message {k}: role {role!r} has no place in a LLaMA-Factory template")
    return system, out


def tools_json(tools: Any) -> str:
    if not tools:
        return ""
    return tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)


def _ensure_fixed(tpl: lf.LFTemplate, tokenizer: Any) -> None:
    done = _fixed.setdefault(tpl.name, weakref.WeakSet())
    if tokenizer not in done:
        fix_tokenizer(tpl, tokenizer)
        done.add(tokenizer)


def fix_tokenizer(tpl: lf.LFTemplate, tokenizer: Any, where: str = "the model") -> None:
    """LF's `fix_special_tokens` on `tokenizer`; a UserError when it would grow the vocabulary."""
    new = lf.fix_tokenizer(tokenizer, tpl)
    if new:
        raise UserError(
            f"template {tpl.name!r} needs tokens the vocabulary of {where} lacks ({', '.join(new)}); LLaMA-Factory "
            f"adds them and resizes the embeddings (resize_vocab), which exporter does not: pick the template of "
            f"this model's format"
        )


def encode(
    tpl: lf.LFTemplate,
    opts: lf.LFOptions,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: Any = None,
    train_on_prompt: bool = False,
    cutoff_len: int | None = None,
) -> tuple[list[int], list[int]]:
    """The `ChatTemplate.encoder` of an LF name. A conversation that ends with a prompt encodes as that prompt
    (labels all -100): what generation feeds the model, LF's `encode_oneturn` as its chat does it."""
    _ensure_fixed(tpl, tokenizer)
    system, msgs = to_lf(messages, tpl.tool_call_words)
    if len(msgs) % 2:
        asked = [*msgs, {"role": "assistant", "content": ""}]
        ids, _ = lf.encode_oneturn(tokenizer, tpl, asked, system, tools_json(tools), opts)
        return ids, [lf.IGNORE] * len(ids)
    opts = dataclasses.replace(opts, train_on_prompt=train_on_prompt or opts.train_on_prompt)
    if cutoff_len is not None:
        opts = dataclasses.replace(opts, cutoff_len=cutoff_len)
    return lf.encode(tokenizer, tpl, msgs, system, tools_json(tools), opts)


def segments(
    tpl: lf.LFTemplate, messages: list[dict[str, Any]], tools: Any, bos: str | None, eos: str | None
) -> list[tuple[str, bool]]:
    """The training text as (text, trained) parts: prompts untrained, answers trained (LF's labels, as text)."""
    system, msgs = to_lf(messages, tpl.tool_call_words)
    if len(msgs) % 2:
        msgs = [*msgs, {"role": "assistant", "content": ""}]
        drop_last = True
    else:
        drop_last = False
    out = []
    pieces = lf.pairs(tpl, msgs, system, tools_json(tools), lf.LFOptions())
    for k, (prompt, answer) in enumerate(pieces):
        out.append((lf.piece_text(prompt, bos, eos), False))
        if not (drop_last and k == len(pieces) - 1):
            out.append((lf.piece_text(answer, bos, eos), True))
    if tpl.efficient_eos and not drop_last and eos:
        out.append((eos, True))
    return out


# ------------------------------------------------------------------ as a ChatTemplate


def _as_chat_template(tpl: lf.LFTemplate, jinja: str, bos: str | None, eos: str | None, stops: list[str],
                      markers: list[str], note: str, opts: lf.LFOptions) -> Any:  # fmt: skip
    from exporter import templates

    base = templates.detect_template_text(jinja, bos or "", eos or "", markers + stops, stops)
    return dataclasses.replace(
        base,
        name=tpl.name,
        description=f"LLaMA-Factory 0.9.5 template {tpl.name!r}",
        eot_tokens=stops,
        stop=list(dict.fromkeys([*base.stop, *stops])),
        format={"kind": KIND, "template": tpl.name},
        notes=(*base.notes, note),
        encoder=functools.partial(encode, tpl, opts),
        tokenizer_fix=functools.partial(fix_tokenizer, tpl),
    )


def resolve(model_dir: Path | str, name: str, opts: lf.LFOptions = NO_CUT) -> Any:
    """The LF template `name` for the model in `model_dir` (its tokenizer decides bos/eos and the Jinja kept)."""
    from transformers import AutoTokenizer

    from exporter import templates

    tpl = lf.with_options(lf.load(name), opts)
    tok = AutoTokenizer.from_pretrained(
        str(model_dir), use_fast=True, split_special_tokens=False, trust_remote_code=False
    )
    own = tok.chat_template
    fix_tokenizer(tpl, tok, str(model_dir))
    jinja = lf.chat_template_for(tpl, tok)
    if own is None:
        note = f"the model has no chat template: the one LLaMA-Factory generates from {name!r} is exported"
    elif jinja != own:
        note = f"LLaMA-Factory's {name!r} replaces the model's chat template (replace_jinja_template)"
    else:
        note = f"the model's own chat template is kept, as LLaMA-Factory keeps it for {name!r}"
    markers = templates.model_tokens(model_dir)[0]
    return _as_chat_template(tpl, jinja, *lf.special_texts(tok), lf.stop_tokens(tpl, tok), markers, note, opts)


def sample_messages(sample: Any) -> list[dict[str, str]]:
    """A dataset row as LF reads it (system first, function/observation turns as written), for LF's encoder."""
    return ([{"role": "system", "content": sample.system}] if sample.system else []) + list(sample.messages)


def cutoff(cfg: Any) -> int:
    """LF's cutoff_len for a training config: one less when `packing` or `neat_packing` is set (LF's DataArguments;
    the packing stage pt gets by default keeps the whole length)."""
    return cfg.cutoff_len - 1 if cfg.packing or cfg.neat_packing else cfg.cutoff_len


def resolve_for_training(model_dir: Path, cfg: Any) -> Any:
    """train's template: an LF name with LF's data arguments from the config, else `templates.resolve`; the LF-only
    keys (mask_history, enable_thinking, preserve_thinking, default_system, tool_format) are an error there."""
    from exporter import templates

    if is_lf_name(cfg.template):
        opts = lf.LFOptions(cutoff_len=cutoff(cfg), train_on_prompt=cfg.train_on_prompt,
                            **{k: getattr(cfg, k) for k in _TRAIN_KEYS})  # fmt: skip
        return resolve(model_dir, cfg.template, opts)
    defaults = lf.LFOptions()
    given = [k for k in _TRAIN_KEYS if getattr(cfg, k) != getattr(defaults, k)]
    if given:
        raise UserError(f"{', '.join(given)}: only with a LLaMA-Factory template name (template: {cfg.template!r})")
    return templates.resolve(model_dir, cfg.template)


def for_texts(name: str, bos: str | None, eos: str | None) -> Any:
    """The LF template `name` without a tokenizer (template show/render): the generated Jinja for these bos/eos
    texts (`replace_eos` templates use their first stop word as eos, as LF makes the tokenizer do)."""
    tpl = lf.load(name)
    if tpl.replace_eos:
        eos = tpl.stop_words[0]
    stops = list(dict.fromkeys([*([eos] if eos else []), *tpl.stop_words]))
    note = f"LLaMA-Factory's Jinja for {name!r} (generated from its slots)"
    return _as_chat_template(tpl, lf.jinja(tpl, bos, eos), bos, eos, stops, [], note, lf.LFOptions())


# ------------------------------------------------------------------ `exporter template ...`


def _texts(tpl: lf.LFTemplate, bos: str | None, eos: str | None) -> tuple[str | None, str | None]:
    return bos, tpl.stop_words[0] if tpl.replace_eos else eos


def render_for_cli(
    name: str, messages: list[dict[str, Any]], tools: Any, fmt: str, bos: str | None, eos: str | None
) -> list[tuple[str, bool]]:
    """`template render` for an LF name: `train` (LF's text with its trained parts), `jinja` (LF's generated Jinja
    through transformers) or `ollama` (the Go TEMPLATE derived from it, through real Go)."""
    tpl = lf.load(name)
    bos, eos = _texts(tpl, bos, eos)
    if fmt == "train":
        return segments(tpl, messages, tools, bos, eos)
    ct = for_texts(name, bos, eos)
    if fmt == "jinja":
        from exporter.templates import _render_jinja

        return [(_render_jinja(ct.jinja, messages, False, bos or "", eos or "", tools), False)]
    if fmt == "ollama":
        from exporter.gotemplate import ollama_data, render_go

        return [(render_go(ct.ollama, ollama_data(messages, tools)), False)]
    raise UserError(f"unknown format {fmt!r}; use train, jinja or ollama")


def show_for_cli(name: str, fmt: str, bos: str | None, eos: str | None) -> str:
    """`template show` for an LF name: its slots as the table holds them, its generated Jinja, or the Modelfile
    lines derived from that Jinja."""
    tpl = lf.load(name)
    if fmt == "slots":
        entry = {k: v for k, v in dataclasses.asdict(tpl).items() if k != "name"}
        return json.dumps({name: entry}, ensure_ascii=False, indent=2)
    ct = for_texts(name, *_texts(tpl, bos, eos))
    if fmt == "jinja":
        return ct.jinja
    if fmt == "ollama":
        lines = [f'TEMPLATE """{ct.ollama}"""']
        if ct.default_system:
            lines.append(f'SYSTEM """{ct.default_system}"""')
        return "\n".join(lines + [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in ct.stop])
    raise UserError(f"unknown format {fmt!r}; use jinja, ollama or slots")


def generated_by(jinja: str, bos: str | None, eos: str | None) -> list[str]:
    """The LF names whose generated Jinja, for these bos/eos texts, is `jinja` byte for byte (a model that
    LLaMA-Factory exported with that template)."""
    out = []
    for name in lf.names():
        tpl = lf.load(name)
        if jinja == lf.jinja(tpl, *_texts(tpl, bos or None, eos or None)):
            out.append(name)
    return out


def same_text(family: Any, name: str) -> bool:
    """True when the family and the LF name render every probe conversation to the same text (their trained
    positions still differ: a family trains what its Jinja marks, LF trains its answer slots)."""
    from exporter.render import render_text
    from exporter.templates import PROBES

    tpl = lf.load(name)
    bos, eos = _texts(tpl, family.bos_token or "<s>", family.eos_token or "</s>")
    fam = family.for_tokenizer(bos, eos)
    for messages, gen in PROBES:
        try:
            ours = "".join(t for t, _ in segments(tpl, messages, None, bos, eos))
            theirs = render_text(fam, messages, add_generation_prompt=gen)
        except UserError:
            return False
        if ours != theirs:
            return False
    return True


def same_text_names() -> dict[str, list[str]]:
    """Family name -> the LF names that render the same text."""
    from exporter.templates import list_templates, load_template

    families = {f: load_template(f) for f in list_templates()}
    return {f: [n for n in lf.names() if same_text(t, n)] for f, t in families.items()}
