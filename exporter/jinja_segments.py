"""Training from the model's own Jinja: which characters of its `apply_chat_template` text are trained.

The text is exactly the Jinja's rendering (transformers), so training ids equal `apply_chat_template` ids. Trained
are the characters the model must produce after the generation prompt: for each assistant message, from where the
rendering of the conversation up to it with the generation prompt stops agreeing with the full rendering (so a
thinking block the template writes into the answer is trained, the generation prompt is not) through its end-of-turn
token. Contents are located by rendering the conversation a second time with sentinel contents, which also holds
for templates that are not prefix-consistent (Qwen3 drops earlier turns' thinking; Mistral Nemo moves the system
prompt into the last user turn). Templates with `{% generation %}` blocks mark their trained spans themselves.
When the Jinja leaves the final answer open (nothing after it), its end-of-turn text is appended and trained, so
the model still learns to stop.
"""

from __future__ import annotations

import re
from typing import Any

from exporter.derive import render_reference
from exporter.errors import UserError

Segment = tuple[str, bool]
_SENT = re.compile(r"Zq(\d+)jQz")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MARK = re.compile(r"<[^<>\s]{1,64}>|<｜[^｜]{1,64}｜>")


def _render(tpl: Any, messages: list[dict[str, Any]], gen: bool, bos: str, eos: str, kw: dict[str, Any]) -> str:
    try:
        return render_reference(tpl.jinja, messages, gen, bos, eos, **kw)
    except Exception as e:  # jinja2 raises its own types (raise_exception in templates included)
        raise UserError(f"the model's chat template refuses this conversation: {type(e).__name__}: {e}") from None


def _sentinel(m: dict[str, Any], k: int) -> dict[str, Any]:
    """`m` with its content replaced by a sentinel; a leading `...</think>` of an answer is kept so templates that
    split reasoning off the content keep their shape."""
    content = m["content"]
    cut = content.rfind("</think>") + len("</think>") if m.get("role") == "assistant" and "</think>" in content else 0
    head = content[:cut]
    return {**m, "content": f"{head}Zq{k}jQz"}


def _regions(
    tpl: Any, messages: list[dict[str, Any]], full: str, gen: bool, bos: str, eos: str, kw: dict[str, Any]
) -> dict[int, tuple[int, int]]:
    """Where each message's (non-empty string) content lies in `full`: {message index: (start, end)}."""
    marked = [_sentinel(m, k) if isinstance(m.get("content"), str) and m["content"] else m
              for k, m in enumerate(messages)]  # fmt: skip
    text = _render(tpl, marked, gen, bos, eos, kw)
    hits = list(_SENT.finditer(text))
    literals = [text[(hits[i - 1].end() if i else 0) : h.start()] for i, h in enumerate(hits)]
    tail = text[hits[-1].end() :] if hits else text
    out: dict[int, tuple[int, int]] = {}
    pos = 0
    for i, h in enumerate(hits):
        k = int(h.group(1))
        lit = literals[i]
        if not full.startswith(lit, pos):
            raise UserError(
                f"message {k}: the chat template renders this conversation differently once its contents change; "
                "cannot tell which characters are the answers (pass --template NAME to train with a known format)"
            )
        pos += len(lit)
        content = messages[k]["content"]
        if messages[k].get("role") == "assistant" and "</think>" in content:
            content = content[content.rfind("</think>") + len("</think>") :]
        last, verbatim = i + 1 == len(hits), pos + len(content)
        nxt = tail if last else literals[i + 1]
        if full.startswith(content, pos) and (
            verbatim + len(nxt) == len(full) and full.endswith(nxt) if last else full.startswith(nxt, verbatim)
        ):
            end = verbatim  # the content as given
        elif last:  # the template reshaped it (trimmed ...): it spans up to the text that follows it
            end = len(full) - len(nxt) if full.endswith(nxt) else -1
        else:
            end = full.find(nxt, pos) if nxt else pos
        if end < pos:
            raise UserError(f"message {k}: cannot find its content in the chat template's rendering")
        if k in out and messages[k].get("role") == "assistant":
            raise UserError(f"message {k}: the chat template renders this answer twice; cannot train it")
        out[k] = (pos, end)
        pos = end
    return out


def _first_eot(text: str, start: int, stop: int, eot: list[str]) -> int | None:
    """End of the first end-of-turn token in text[start:stop], or None."""
    found = [(i, i + len(t)) for t in eot if t and 0 <= (i := text.find(t, start, stop))]
    return min(found)[1] if found else None


def _lcp(a: str, b: str, tokens: list[str]) -> int:
    """Length of the common prefix of a and b, never ending inside a token (an end-of-turn token or a <...> mark)."""
    n = min(len(a), len(b))
    p = next((k for k in range(n) if a[k] != b[k]), n)
    for m in _MARK.finditer(b, max(0, p - 64), min(len(b), p + 64)):
        if m.start() < p < m.end():
            return m.start()
    for t in tokens:
        for i in range(max(0, p - len(t) + 1), p):
            if b.startswith(t, i):
                return i
    return p


def _answer_spans(
    tpl: Any, messages: list[dict[str, Any]], full: str, gen: bool, bos: str, eos: str, kw: dict[str, Any]
) -> tuple[list[tuple[int, int]], str]:
    """Trained character spans of every answer, and text to append when the Jinja leaves the final answer open."""
    regions = _regions(tpl, messages, full, gen, bos, eos, kw)
    close, after = tpl.format.get("close", ""), tpl.format.get("after_answer", "")
    closers = tpl.format.get("closers") or tpl.eot_tokens
    spans, extra = [], ""
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        lo = max((e for j, (_, e) in regions.items() if j < k), default=0)
        hi = min((s for j, (s, _) in regions.items() if j > k), default=len(full))
        cs, ce = regions.get(k, (None, None))
        start = cs
        if k > 0:  # the model produces whatever follows the generation prompt (e.g. a thinking block)
            try:
                prompt = render_reference(tpl.jinja, messages[:k], True, bos, eos, **kw)
            except Exception:  # a template may refuse a prefix; the content start is then where the answer starts
                prompt = None
            if prompt is not None:
                s1 = _lcp(prompt, full, closers)
                if lo <= s1 <= (cs if cs is not None else hi):
                    start = s1
        if start is None:
            raise UserError(f"message {k}: cannot find this answer in the chat template's rendering")
        content_end = ce if ce is not None else start
        end = _first_eot(full, content_end, hi, closers)
        if end is None and k == len(messages) - 1 and not gen and content_end == len(full) and close:
            extra, end = close, len(full) + len(close)  # the Jinja leaves the final answer open: close it
        elif end is None:
            end = content_end + len(after) if after and full.startswith(after, content_end) else content_end
        spans.append((start, end))
    return spans, extra


def _generation_spans(tpl: Any, messages: list[dict[str, Any]], gen: bool, bos: str, eos: str,
                      kw: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The text and the template's own `{% generation %}` spans, each extended over an end-of-turn token that
    directly follows it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        out, indices = render_jinja_template(conversations=[messages], chat_template=tpl.jinja,
                                             return_assistant_tokens_mask=True, add_generation_prompt=gen,
                                             bos_token=bos, eos_token=eos, **kw)  # fmt: skip
    except Exception as e:
        raise UserError(f"the model's chat template refuses this conversation: {type(e).__name__}: {e}") from None
    text, spans = out[0], []
    for s, e in indices[0]:
        tok = next((t for t in tpl.format.get("closers") or tpl.eot_tokens if t and text.startswith(t, e)), "")
        spans.append((s, e + len(tok)))
    return text, spans


def segments(
    tpl: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    bos: str = "",
    eos: str = "",
) -> list[Segment]:
    """[(text, trained)] whose joined text is the Jinja's rendering of `messages` (+ the closing text of an answer
    the Jinja leaves open)."""
    kw: dict[str, Any] = dict(tpl.format.get("extra") or {})
    if tools:
        kw["tools"] = tools
    if enable_thinking is not None:
        kw["enable_thinking"] = enable_thinking
    for k, m in enumerate(messages):
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise UserError(f"message {k}: content must be a string, got {type(m['content']).__name__}")
    if _GENERATION.search(tpl.jinja):
        full, spans = _generation_spans(tpl, messages, add_generation_prompt, bos, eos, kw)
        extra = ""
    else:
        full = _render(tpl, messages, add_generation_prompt, bos, eos, kw)
        spans, extra = _answer_spans(tpl, messages, full, add_generation_prompt, bos, eos, kw)
    text = full + extra
    out: list[Segment] = []
    pos = 0
    for s, e in sorted(spans):
        s = max(s, pos)
        if s > pos:
            out.append((text[pos:s], False))
        if e > s:
            out.append((text[s:e], True))
        pos = max(pos, e)
    if pos < len(text):
        out.append((text[pos:], False))
    return out
