"""Derive what an export needs from any model's own chat-template Jinja, and check it by rendering.

`derive(jinja, bos, eos, markers, eos_tokens)` renders sentinel conversations through the Jinja (transformers'
sandboxed renderer) and recovers its layout: the text before the first user message with and without a system
prompt, where the system prompt goes (its own turn, folded into the first or the last user turn, refused, ignored),
the default system prompt, the per-role prefixes and suffixes, the generation prompt (and its no-thinking variant),
the end-of-turn tokens. From the layout it writes an Ollama Go TEMPLATE, then renders a corpus of conversation
shapes through the Jinja and through real Go (`exporter.gotemplate`, fed what Ollama feeds) and records every shape
that differs, with the reason where it is known (Go cannot trim; Ollama's `currentDate` prints YYYY-MM-DD only).

A leading BOS the Jinja renders is not part of the Go TEMPLATE: Ollama and llama.cpp add BOS at tokenization.
Dates the Jinja computes at render time (`strftime_now`) become `{{ currentDate }}`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

Messages = list[dict[str, Any]]

# Sentinel contents: ASCII, distinct, none a substring of another, unlikely in any template.
_SYS, _SYS2 = "Zq0sysQz", "Zq9sysQz"
_U1, _A1, _U2, _A2 = "Zq1usrQz", "Zq2astQz", "Zq3usrQz", "Zq4astQz"
_DATE = re.compile(r"\u27e6date:(.*?)\u27e7")  # what strftime_now(fmt) renders while deriving
_ISO_DATE = "%Y-%m-%d"
# token-like markers when the tokenizer's own added tokens are not known: <...>, <｜...｜>, [UPPER_CASE]
_MARKER_RE = re.compile(r"<[^<>\s]{1,64}>|<｜[^｜]{1,64}｜>|\[/?[A-Z][A-Z_]{1,30}\]")


class DeriveError(Exception):
    """The Jinja cannot be read as a chat layout (it refuses the basic conversations, or mixes their contents)."""


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _compiled(jinja: str) -> Any:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(jinja)


def render_marked(jinja: str, messages: Messages, gen: bool, bos: str, eos: str, **kw: Any) -> str:
    """The Jinja rendered as transformers does, except that dates computed at render time print as markers."""
    values = {"tools": None, "documents": None, **kw}
    return _compiled(jinja).render(
        messages=messages,
        add_generation_prompt=gen,
        bos_token=bos,
        eos_token=eos,
        strftime_now=lambda fmt: f"\u27e6date:{fmt}\u27e7",
        **values,
    )


def render_reference(jinja: str, messages: Messages, gen: bool, bos: str, eos: str, **kw: Any) -> str:
    """transformers' own rendering (`apply_chat_template` text): the reference every check compares against."""
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(
        conversations=[messages], chat_template=jinja, add_generation_prompt=gen, bos_token=bos, eos_token=eos, **kw
    )
    return out[0]


def _u(c: str) -> dict[str, Any]:
    return {"role": "user", "content": c}


def _a(c: str) -> dict[str, Any]:
    return {"role": "assistant", "content": c}


def _s(c: str) -> dict[str, Any]:
    return {"role": "system", "content": c}


def _pieces(text: str, sentinels: Sequence[str]) -> list[str] | None:
    """The literal texts around `sentinels` (each once, in this order), or None."""
    out, pos = [], 0
    for s in sentinels:
        if text.count(s) != 1:
            return None
        i = text.find(s, pos)
        if i < 0:
            return None
        out.append(text[pos:i])
        pos = i + len(s)
    out.append(text[pos:])
    return out


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


# ---------------------------------------------------------------------------------------------------------------
# layout


@dataclasses.dataclass
class Layout:
    """The Jinja's chat layout; all texts without the leading BOS, dates as markers."""

    head: str  # everything before the first user's content, no system prompt
    sys_mode: str  # turn (before the first user's content) | last (folded into the last user turn) | none | dropped
    sys_before: str  # turn: text before the system content (replaces `head`); last: inside the last user turn
    sys_after: str  # the text after it, up to the user's content
    empty_system_is_none: bool  # an empty system message renders as no system message
    default_system: str | None  # head == sys_before + default + sys_after
    user: tuple[str, str]  # prefix (users after the first), suffix
    assistant: tuple[str, str]  # prefix in history, suffix (after a complete answer)
    gen: str  # generation prompt after the user suffix
    gen_no_think: str | None  # with enable_thinking=False, where that differs
    close: str  # what ends an answer up to and including its end-of-turn token
    eot: list[str]  # end-of-turn tokens: generation stops on them
    closers: list[str]  # tokens that close an answer in the rendered text (eot, and gpt-oss's <|end|> in history)
    bos_rendered: bool
    # (opening, closing) reasoning tags when the Jinja drops an earlier answer's reasoning (`content.split('</think>')
    # [-1]`): the Go TEMPLATE names `.Thinking` between them, so that Ollama infers the tags and parses reasoning out
    think: tuple[str, str] | None = None


_REASONING = "Zq5rsnQz"
THINK_TAGS = ("<think>", "</think>")  # what Ollama's thinking parser is fed here (gotemplate.ollama_data)


class _Marks:
    """Positions of tokens in texts: the tokenizer's added tokens when known, else token-like markers."""

    def __init__(self, markers: Sequence[str] | None) -> None:
        self.known = sorted({m for m in markers or () if m}, key=len, reverse=True)

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, token) of every token in `text`, left to right, longest first at each position."""
        out, i = [], 0
        while i < len(text):
            hit = next((m for m in self.known if text.startswith(m, i)), None)
            if hit is None and not self.known:
                m = _MARKER_RE.match(text, i)
                hit = m.group(0) if m else None
            if hit:
                out.append((i, i + len(hit), hit))
                i += len(hit)
            else:
                i += 1
        return out

    def bounds(self, text: str) -> set[int]:
        b = {0, len(text)}
        for s, e, _ in self.find(text):
            b |= {s, e}
        return b


def _prefix_at_bound(a: str, b: str, bounds: set[int]) -> int:
    """Length of the longest common prefix of a and b that ends on one of `bounds` (positions in a)."""
    n = _lcp(a, b)
    return max(p for p in bounds if p <= n)


def _suffix_at_bound(a: str, b: str, bounds: set[int]) -> int:
    """Length of the longest common suffix of a and b that starts on one of `bounds` (positions in a)."""
    n = _lcp(a[::-1], b[::-1])
    return max(len(a) - p for p in bounds if len(a) - p <= n)


def derive_layout(
    jinja: str, bos: str, eos: str, markers: Sequence[str] | None = None, extra: dict[str, Any] | None = None
) -> tuple[Layout, list[str]]:
    """The layout of `jinja` and notes on what it does that the layout cannot hold; DeriveError when unreadable."""
    marks, notes = _Marks(markers), []
    kw = dict(extra or {})

    def r(msgs: Messages, gen: bool, **more: Any) -> str:
        try:
            text = render_marked(jinja, msgs, gen, bos, eos, **kw, **more)
        except Exception as e:  # a template may refuse a shape; jinja2 raises its own types
            raise DeriveError(f"{type(e).__name__}: {e}") from None
        return text[len(bos) :] if bos and text.startswith(bos) else text

    try:
        r1, r1n = r([_u(_U1)], True), r([_u(_U1)], False)
        r2 = r([_u(_U1), _a(_A1), _u(_U2)], True)
        r4 = r([_u(_U1), _a(_A1)], False)
    except DeriveError as e:
        raise DeriveError(f"the template refuses a plain user/assistant conversation ({e})") from None
    bos_rendered = bool(bos) and render_marked(jinja, [_u(_U1)], True, bos, eos, **kw).startswith(bos)
    p1, p1n, p2, p4 = _pieces(r1, [_U1]), _pieces(r1n, [_U1]), _pieces(r2, [_U1, _A1, _U2]), _pieces(r4, [_U1, _A1])
    if p1 is None or p2 is None or p4 is None or p1n is None:
        raise DeriveError("the template does not render each message's content exactly once")
    head, d = p1
    _, b, c, d2 = p2
    e = p4[2]
    if d2 != d:
        notes.append("the generation prompt after a later user turn differs from the one after the first")
    # user suffix: what follows a user message both before an answer and before the generation prompt
    usuf = p1n[1] if d.startswith(p1n[1]) and b.startswith(p1n[1]) else d[: _prefix_at_bound(d, b, marks.bounds(d))]
    gen, apre = d[len(usuf) :], b[len(usuf) :]
    # assistant suffix and the next user's prefix share the text between an answer and the next question
    if e and c.startswith(e):
        asuf = e
    elif e:
        asuf = c[: _prefix_at_bound(c, e, marks.bounds(c))]
    else:  # the final answer is left open: the user prefix is what the first user turn also starts with
        asuf = c[: len(c) - _suffix_at_bound(c, head, marks.bounds(c))]
    upre = c[len(asuf) :]
    if not head.endswith(upre):
        notes.append("the first user turn starts differently from later ones")
    opening = {found[0][2] for text in (head, upre, apre, gen) if (found := marks.find(text))}
    eot, close = _end_of_turn(asuf, c, e, eos, marks, opening)
    closers, starts = list(eot), {found[0][2] for text in (head, apre, gen) if (found := marks.find(text))}
    for text in (c, e) if not marks.find(asuf) else ():  # no suffix token: what ends answers mid-chat and at the end
        hits = marks.find(text)
        if eot and hits and not text[: hits[0][0]].strip() and hits[0][2] not in closers + list(starts):
            closers.append(hits[0][2])
    gen_no_think = None
    if "enable_thinking" in jinja:
        try:
            g = _pieces(r([_u(_U1)], True, enable_thinking=False), [_U1])
        except DeriveError:
            g = None
        if g and g[1].startswith(usuf) and g[1][len(usuf) :] != gen:
            gen_no_think = g[1][len(usuf) :]
    sys = _system_layout(r, head, c)
    think = None
    if THINK_TAGS[1] in jinja:  # an earlier answer with inline reasoning: does the Jinja drop the reasoning?
        try:
            rt = r([_u(_U1), _a(f"{THINK_TAGS[0]}\n{_REASONING}\n{THINK_TAGS[1]}\n\n{_A1}"), _u(_U2)], True)
        except DeriveError:
            rt = ""
        if _A1 in rt and _REASONING not in rt:
            think = THINK_TAGS
            notes.append(
                "earlier answers' reasoning: the Jinja drops it; Ollama hands it to the TEMPLATE apart from the answer "
                "(.Thinking, left out) when a chat asks with think: true, else it stays in the answer and Go prints it"
            )
    lay = Layout(
        think=think,
        head=head,
        user=(upre, usuf),
        assistant=(apre, asuf),
        gen=gen,
        gen_no_think=gen_no_think,
        close=close,
        eot=eot,
        closers=closers,
        bos_rendered=bos_rendered,
        **sys,
    )
    return lay, notes


def _end_of_turn(
    asuf: str, between: str, final: str, eos: str, marks: _Marks, opening: set[str]
) -> tuple[list[str], str]:
    """(end-of-turn tokens, closing text) of answers: the last token of the assistant suffix that does not also
    open turns; else the token that ends the final answer (gpt-oss: <|return|>, while <|end|> only separates
    messages), else the one that starts the text after an answer (GLM: the next role token)."""
    found = [f for f in marks.find(asuf) if f[2] not in opening] or marks.find(asuf)
    if found:
        s, e, tok = found[-1]
        return [tok], asuf[:e]
    for text in (final, between):
        hits = marks.find(text)
        if hits and not text[: hits[0][0]].strip():
            return [hits[0][2]], between[: hits[0][1]] if text is between else ""
    if eos and eos in between:
        return [eos], between[: between.index(eos) + len(eos)]
    return [], ""


def _system_layout(r: Callable[..., str], head: str, between: str) -> dict[str, Any]:
    """Where a system prompt goes (see `Layout`)."""
    none = {"sys_before": "", "sys_after": "", "empty_system_is_none": False, "default_system": None}
    try:
        rs = r([_s(_SYS), _u(_U1)], True)
    except DeriveError:
        return {"sys_mode": "none", **none}
    ps = _pieces(rs, [_SYS, _U1])
    if ps is None:
        if _SYS not in rs:
            return {"sys_mode": "dropped", **none}
        raise DeriveError("the template renders the system prompt more than once or after the user message")
    x0, x1, _ = ps
    mode = "turn"
    try:
        rs2 = r([_s(_SYS), _u(_U1), _a(_A1), _u(_U2)], True)
    except DeriveError:
        rs2 = ""
    p_last = _pieces(rs2, [_U1, _A1, _SYS, _U2])
    if p_last is not None and _pieces(rs2, [_SYS, _U1, _A1, _U2]) is None:
        mode = "last"  # the system prompt moves to the last user turn (Mistral Nemo)
        between_sys = p_last[2]
        if not between_sys.startswith(between):
            raise DeriveError("the template folds the system prompt into the last user turn in a way not understood")
        x0, x1 = between_sys[len(between) :], p_last[3]
    elif _pieces(rs2, [_SYS, _U1, _A1, _U2]) is None:
        raise DeriveError("the template moves the system prompt between turns in a way not understood")
    try:
        empty_none = r([_s(""), _u(_U1)], True) == r([_u(_U1)], True)
    except DeriveError:
        empty_none = False
    default = None
    if mode == "turn" and head != x0 + x1 and head.startswith(x0) and head.endswith(x1):
        if len(head) > len(x0) + len(x1) and not _DATE.search(head):
            default = head[len(x0) : len(head) - len(x1)]
    return {"sys_mode": mode, "sys_before": x0, "sys_after": x1, "empty_system_is_none": empty_none,
            "default_system": default}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Go TEMPLATE


def go_string(text: str) -> str:
    """`text` as a Go string literal whose characters all survive Ollama's Modelfile parser: JSON's escapes, and
    `\\uXXXX` / `\\UXXXXXXXX` for the other characters Go's strconv.IsPrint rejects (U+00A0, U+200B, U+2028 …)."""
    from exporter.converters.modelfile import is_print

    return "".join(
        c if is_print(c) else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
        for c in json.dumps(text, ensure_ascii=False)
    )


def _go_text(text: str, notes: list[str] | None = None) -> str:
    """Template actions printing `text` exactly (Go string literals), dates as `currentDate`."""
    out, pos = [], 0
    for m in _DATE.finditer(text):
        if m.start() > pos:
            out.append("{{ " + go_string(text[pos : m.start()]) + " }}")
        out.append("{{ currentDate }}")
        if notes is not None and m.group(1) != _ISO_DATE:
            notes.append(f"the Jinja prints today's date as {m.group(1)!r}; Ollama's currentDate prints YYYY-MM-DD")
        pos = m.end()
    if pos < len(text):
        out.append("{{ " + go_string(text[pos:]) + " }}")
    return "".join(out)


def go_template(lay: Layout, notes: list[str] | None = None) -> str:
    """The Ollama TEMPLATE of `lay` (fed `.Messages` as Ollama does: system first, if any)."""
    t = lambda s: _go_text(s, notes)  # noqa: E731
    upre, usuf = lay.user
    apre, asuf = lay.assistant
    has_sys = "true" if not lay.empty_system_is_none else "$sys"
    lines = ['{{- $sys := "" }}{{ $hasSys := false }}{{ $first := -1 }}{{ $lastUser := -1 }}']
    if lay.sys_mode in ("turn", "last"):
        lines.append(
            '{{- if .Messages }}{{ if eq (index .Messages 0).Role "system" }}{{ $sys = (index .Messages 0).Content }}'
            "{{ $hasSys = " + has_sys + " }}{{ end }}{{ end }}"
        )
    lines.append(
        '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ if lt $first 0 }}{{ $first = $i }}{{ end }}'
        "{{ $lastUser = $i }}{{ end }}{{ end }}"
    )
    lines.append("{{- range $i, $m := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    lines.append('{{- if eq $m.Role "user" }}')
    if lay.sys_mode == "turn":
        lines.append(
            "{{- if eq $i $first }}{{ if $hasSys }}" + t(lay.sys_before) + "{{ $sys }}" + t(lay.sys_after)
            + "{{ else }}" + t(lay.head) + "{{ end }}{{ else }}" + t(upre) + "{{ end }}"
        )  # fmt: skip
    else:
        lines.append("{{- if eq $i $first }}" + t(lay.head) + "{{ else }}" + t(upre) + "{{ end }}")
        if lay.sys_mode == "last":
            lines.append(
                "{{- if and $hasSys (eq $i $lastUser) }}" + t(lay.sys_before) + "{{ $sys }}" + t(lay.sys_after)
                + "{{ end }}"
            )  # fmt: skip
    lines.append("{{- $m.Content }}" + t(usuf))
    gen = t(lay.gen)
    if lay.gen_no_think is not None:
        gen = "{{ if and $.IsThinkSet (not $.Think) }}" + t(lay.gen_no_think) + "{{ else }}" + gen + "{{ end }}"
    if gen:
        lines.append("{{- if $last }}" + gen + "{{ end }}")
    # reasoning of earlier answers: never printed, as in the Jinja; the tags around `.Thinking` (plain text, in a
    # range over .Messages) are what Ollama's thinking.InferTags reads to make the model thinking-capable
    think = "{{ if false }}" + lay.think[0] + "{{ .Thinking }}" + lay.think[1] + "{{ end }}" if lay.think else ""
    lines.append('{{- else if eq $m.Role "assistant" }}' + t(apre) + think + "{{ $m.Content }}")
    if asuf:
        lines.append("{{- if not $last }}" + t(asuf) + "{{ end }}")
    lines.append("{{- end }}")
    lines.append("{{- end }}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# checking a Go TEMPLATE against the Jinja on a corpus of shapes

_SYSTEM = "You are a concise assistant."
SHAPES: dict[str, Messages] = {
    "user": [_u("Hello there")],
    "system+user": [_s(_SYSTEM), _u("Hello there")],
    "multi-turn": [_u("What is 2+2?"), _a("4"), _u("And 3+3?")],
    "system+multi-turn": [_s(_SYSTEM), _u("What is 2+2?"), _a("4"), _u("And 3+3?")],
    "three turns": [_u("One?"), _a("1"), _u("Two?"), _a("2"), _u("Three?")],
    "unicode": [_s("Réponds en français. 用中文也可以。"), _u("¿Qué tal? 你好 🙂 — “quotes”")],
    "multi-line": [_u("line one\n\nline three\n\tindented"), _a("ok\nfine"), _u("again")],
    "padded whitespace": [_u("  leading and trailing spaces  \n"), _a(" spaced answer "), _u(" next ")],
    "empty system": [_s(""), _u("Hello there")],
    "empty content": [_u(""), _a(""), _u("Say something.")],
    # an answer with reasoning in history: fed to Go as Ollama feeds it (`.Thinking` apart from the answer when the
    # TEMPLATE is thinking-aware, else inline)
    "earlier reasoning": [_u("Hi"), _a("<think>\nThe user greets me.\n</think>\n\nHello!"), _u("How are you?")],
}
PLAIN_SHAPES = ("user", "system+user", "multi-turn", "system+multi-turn")


@dataclasses.dataclass
class ShapeResult:
    """How one shape renders: `same` or the first difference (`jinja`/`go` are short excerpts)."""

    shape: str
    same: bool
    detail: str = ""
    whitespace_only: bool = False


def _diff(a: str, b: str) -> str:
    i = _lcp(a, b)
    return f"at char {i}: Jinja {a[max(0, i - 15) : i + 25]!r}, Go {b[max(0, i - 15) : i + 25]!r}"


def check_go(
    candidates: Sequence[tuple[str, str | None]],
    jinja: str,
    bos: str,
    eos: str,
    shapes: dict[str, Messages] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[list[ShapeResult]]:
    """For each candidate (Go TEMPLATE, Modelfile SYSTEM): every shape rendered through the Jinja (transformers,
    leading BOS dropped) and through the candidate (real Go, fed as Ollama feeds it). Shapes the Jinja refuses are
    left out. GoUnavailable without a Go toolchain."""
    from exporter.gotemplate import ollama_data, render_go_results, thinking_aware

    shapes = SHAPES if shapes is None else shapes
    refs: dict[str, str] = {}
    for name, msgs in shapes.items():
        try:
            text = render_reference(jinja, msgs, True, bos, eos, **(extra or {}))
        except Exception:  # the Jinja refuses this shape (e.g. no system role): nothing to compare
            continue
        refs[name] = text[len(bos) :] if bos and text.startswith(bos) else text
    items = [(go, ollama_data(shapes[name], system=system, split_thinking=thinking_aware(go)))
             for go, system in candidates for name in refs]  # fmt: skip
    rendered = iter(render_go_results(items))
    out = []
    for _ in candidates:
        results = []
        for name in refs:
            got, err = next(rendered)
            if err:
                results.append(ShapeResult(name, False, f"Go: {err}"))
            elif got == refs[name]:
                results.append(ShapeResult(name, True))
            else:
                ws = "".join(got.split()) == "".join(refs[name].split())
                results.append(ShapeResult(name, False, _diff(refs[name], got), ws))
        out.append(results)
    return out


def explain(results: Sequence[ShapeResult], notes: Sequence[str]) -> list[str]:
    """One line per reason the differing shapes differ (shapes of a known reason grouped, with a first example)."""
    dates = [n for n in notes if "today's date" in n]
    groups: dict[str, list[ShapeResult]] = {}
    lines = []
    for res in results:
        if res.same:
            continue
        if res.whitespace_only:
            groups.setdefault("the Jinja trims or adds whitespace around content; Go prints it as given", []).append(
                res
            )
        elif dates:
            groups.setdefault(dates[0], []).append(res)
        else:
            lines.append(f"differs on {res.shape}: {res.detail}")
    grouped = [f"differs on {', '.join(r.shape for r in rs)}: {why} ({rs[0].detail})" for why, rs in groups.items()]
    return grouped + lines


# ---------------------------------------------------------------------------------------------------------------
# the whole derivation


@dataclasses.dataclass
class Derived:
    """What an export needs from a Jinja: Go TEMPLATE, stops, default system, end-of-turn tokens, the layout, and
    notes on what the layout does not hold."""

    ollama: str
    stop: list[str]
    eot_tokens: list[str]
    default_system: str | None
    layout: Layout
    notes: list[str]
    extra: dict[str, Any]  # render variables the Jinja needs (an empty tools list for tool-use templates)


def with_eos_stops(stops: Sequence[str], eos: str, eos_tokens: Sequence[str]) -> list[str]:
    """`stops`, then eos and the generation_config eos tokens not among them: HF `generate` ends on each of those, so
    the Modelfile's stops hold them too (for the exact-family and the derived template alike)."""
    out = list(stops)
    for s in (eos, *eos_tokens):
        if s and s not in out:
            out.append(s)
    return out


def stops_for(lay: Layout, eos: str, eos_tokens: Sequence[str]) -> list[str]:
    """End-of-turn tokens, eos, generation_config eos tokens; the next user prefix when there is no token."""
    out = with_eos_stops(lay.eot, eos, eos_tokens)
    if not lay.eot and lay.user[0].strip():
        out.append(lay.user[0].strip())
    return out


def derive(
    jinja: str, bos: str, eos: str, markers: Sequence[str] | None = None, eos_tokens: Sequence[str] = ()
) -> Derived:
    """The layout, Go TEMPLATE and stops of `jinja`; DeriveError when it cannot be read as a chat layout."""
    extra: dict[str, Any] = {}
    try:
        lay, notes = derive_layout(jinja, bos, eos, markers)
    except DeriveError:
        if "tools" not in jinja:
            raise
        extra = {"tools": []}  # tool-use templates that iterate `tools` unconditionally
        lay, notes = derive_layout(jinja, bos, eos, markers, extra)
        notes.append("the Jinja needs a tools list; derived and checked with an empty one")
    if lay.sys_mode == "none":
        notes.append("the Jinja refuses system messages; the Go TEMPLATE leaves them out")
    elif lay.sys_mode == "dropped":
        notes.append("the Jinja ignores system messages; so does the Go TEMPLATE")
    if not lay.eot:
        notes.append("answers end with no special token; stops on the next user prefix")
    go = go_template(lay, notes)
    return Derived(go, stops_for(lay, eos, eos_tokens), list(lay.eot), lay.default_system, lay,
                   list(dict.fromkeys(notes)), extra)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# a ChatTemplate for a Jinja that no family matches exactly


def _pick(results: list[list[ShapeResult]], tie_ok: list[bool]) -> int:
    """Index of the Go TEMPLATE to use: 0 (derived) unless a family renders every shape the derived one does and
    more, or as many and its tool format is the Jinja's too (or the Jinja has none)."""
    same = [{r.shape for r in res if r.same} for res in results]
    best = 0
    for k in range(1, len(results)):
        if same[k] >= same[0] and same[k] and (len(same[k]) > len(same[0]) or tie_ok[k]):
            if best == 0 or len(same[k]) > len(same[best]):
                best = k
    return best


def chat_template(
    jinja: str, bos: str, eos: str, markers: Sequence[str] | None = None, eos_tokens: Sequence[str] = (),
    nearest: str = "",
) -> Any:  # fmt: skip
    """A `ChatTemplate` for `jinja` when no family matches it exactly: the Jinja itself is exported and trains
    (`exporter.jinja_segments`); the Go TEMPLATE is the derived one, or a family's where that renders more shapes
    like the Jinja in real Go. `notes` say which shapes differ and why; nothing here raises for a template."""
    from exporter.errors import UserError
    from exporter.gotemplate import GoUnavailable
    from exporter.templates import ChatTemplate, list_templates, load_template, tool_probe

    common = {"name": "derived", "jinja": jinja, "bos_token": bos or None, "eos_token": eos or None,
              "tools": "tools" in jinja}  # fmt: skip
    near = [nearest] if nearest else []
    try:
        d = derive(jinja, bos, eos, markers, eos_tokens)
    except DeriveError as e:
        stop = [s for s in dict.fromkeys([eos, *eos_tokens]) if s]
        fmt: dict[str, Any] = {"kind": "jinja", "close": "", "after_answer": ""}
        note = f"no Ollama TEMPLATE could be derived: {e}"
        return ChatTemplate(**common, description="the model's own Jinja; no Ollama TEMPLATE", ollama="", stop=stop,
                            eot_tokens=[], default_system=None, format=fmt, notes=(note, *near))  # fmt: skip
    from exporter.converters.modelfile import unprintable

    system, bad = d.default_system, unprintable(d.default_system or "")
    if bad is not None:  # the TEMPLATE prints the Jinja's head, default included, when a chat has no system message
        system = None
        d.notes.append(f"the default system prompt holds {bad}, which a Modelfile cannot hold: no SYSTEM line (the "
                       "TEMPLATE prints the default itself when a chat has no system message)")  # fmt: skip
    names, gos, systems, stops, tie_ok = ["derived"], [d.ollama], [system], [d.stop], [False]
    fams: list[Any] = [None]
    own_tools = tool_probe(jinja, bos, eos)
    for name in list_templates():
        try:
            fam = load_template(name).for_tokenizer(bos or None, eos or None)
        except UserError:  # a base format that needs an eos token this tokenizer lacks
            continue
        names.append(name), gos.append(fam.ollama), systems.append(fam.default_system), stops.append(fam.stop)
        fams.append(fam)
        theirs = tool_probe(fam.jinja, bos, eos) if own_tools is not None else None
        tie_ok.append(own_tools is None or "".join((theirs or "").split()) == "".join(own_tools.split()))
    notes, same, differ, pick = [], [], [], 0
    head = "chat template: the model's own Jinja; Ollama TEMPLATE derived from it"
    try:
        results = check_go(list(zip(gos, systems, strict=True)), jinja, bos, eos, extra=d.extra)
    except GoUnavailable:
        notes.append("the Go TEMPLATE is not checked: no Go toolchain")
    else:
        pick = _pick(results, tie_ok)
        same = [r.shape for r in results[pick] if r.same]
        differ = [r.shape for r in results[pick] if not r.same]
        notes = explain(results[pick], d.notes) + notes
        head += f"; renders like the Jinja in real Go on {len(same)} of {len(same) + len(differ)} shapes"
        head += f" ({', '.join(same)})" if same else ""
    if pick:
        head = head.replace("derived from it", f"of family {names[pick]}")
    if own_tools is not None:
        same_tools = f"tool calls: in family {names[pick]}'s format, the Jinja's up to whitespace"
        no_tools = "tool definitions, calls and results are not translated: the Go TEMPLATE renders none"
        notes.append(same_tools if pick and tie_ok[pick] else no_tools)
    own = fams[pick] if pick and tie_ok[pick] else None
    notes += own.notes if own else ()  # what the family's Go TEMPLATE prints otherwise
    # a family carrying this very Jinja (kind jinja) knows its tool turns: answers that end in a call close with
    # the token before the tool results (GLM's <|observation|>), trained, and an end-of-turn token where the
    # tokenizer has it
    mine = own.format if own and own.kind == "jinja" else {}
    closers = list(dict.fromkeys([*d.layout.closers, *mine.get("closers", ())]))
    eot = list(dict.fromkeys([*d.eot_tokens, *(t for t in (own.eot_tokens if mine else ()) if t in (markers or ()))]))
    shown = "\n".join(notes)
    notes = [head, *notes, *(n for n in d.notes if n not in shown), *near]
    fmt = {"kind": "jinja", "close": d.layout.close, "after_answer": d.layout.assistant[1], "extra": d.extra,
           "closers": closers,
           "go": names[pick], "same": same, "differ": differ}  # fmt: skip
    return ChatTemplate(
        **common,
        description=f"the model's own Jinja (Go TEMPLATE: {names[pick]})",
        ollama=gos[pick],
        stop=list(dict.fromkeys([*d.stop, *stops[pick]])),
        eot_tokens=eot,
        default_system=systems[pick],
        format=fmt,
        notes=tuple(notes),
    )
