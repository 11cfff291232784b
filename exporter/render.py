"""Training renderer: a conversation -> [(text, trained)] segments, driven by a family's `format` block
(`exporter/templates.py` loads the families), then token ids and labels (`encode`).

It is a second implementation of each family (the Jinja and the Go TEMPLATE are the others); tests hold all three
byte-identical. A template with an encoder of its own (LLaMA-Factory names) or the model's own Jinja
(`exporter.jinja_segments`) encodes through that instead; `encode` dispatches.
"""

from __future__ import annotations

import json
from typing import Any

from exporter.errors import UserError
from exporter.hf_dir import adds_bos
from exporter.templates import ChatTemplate

Segment = tuple[str, bool]


def _content(m: dict[str, Any], i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if not isinstance(c, str):
        raise UserError(f"message {i}: content must be a string, got {type(c).__name__}")
    return c


def _tojson(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False, separators=(",", ":"))


def _tool_fn(tc: dict[str, Any]) -> dict[str, Any]:
    return tc["function"] if isinstance(tc.get("function"), dict) else tc


def _args_json(fn: dict[str, Any]) -> str:
    args = fn.get("arguments")
    return args if isinstance(args, str) else _tojson(args)


_QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)


class _Renderer:
    """State for one render; `out` collects (text, trained) segments."""

    def __init__(self, tpl: ChatTemplate, bos: str, eos: str) -> None:
        self.tpl, self.f, self.bos, self.eos = tpl, tpl.format, bos, eos
        self.out: list[Segment] = []

    def fill(self, pattern: str, **kw: str) -> str:
        # single-pass substitution so braces inside content are never re-read as placeholders
        values = {"bos": self.bos, "eos": self.eos, **kw}
        out, i = [], 0
        while i < len(pattern):
            if pattern[i] == "{":
                j = pattern.find("}", i)
                key = pattern[i + 1 : j]
                if j > 0 and key in values:
                    out.append(values[key])
                    i = j + 1
                    continue
            out.append(pattern[i])
            i += 1
        return "".join(out)

    def emit(self, text: str, trained: bool = False) -> None:
        if text or trained:
            self.out.append((text, trained))

    def assistant(self, content: str, prefix: str = "") -> None:
        start, body, tail = self.f["assistant"]
        self.emit(self.fill(start))
        self.emit(self.fill(body, content=prefix + content), True)
        self.emit(self.fill(tail))


def _check_alternation(loop: list[dict[str, Any]]) -> None:
    for k, m in enumerate(loop):
        if (m.get("role") == "user") != (k % 2 == 0):
            raise UserError(
                f"message {k}: conversation roles must alternate user/assistant/user/assistant/... for this family"
            )


def _render_qwen(r: _Renderer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """ChatML families (qwen-2.5, qwen-3) including tool calls, tool responses and Qwen3 thinking blocks."""
    f, style = r.f, r.f.get("tool_style")
    has_sys = bool(messages) and messages[0].get("role") == "system"
    sys_text = _content(messages[0], 0) if has_sys else None
    if tools:
        head = "<|im_start|>system\n"
        if style == "qwen":
            head += (sys_text if has_sys else r.tpl.default_system or "") + "\n\n"
        elif has_sys:
            head += sys_text + "\n\n"
        head += _QWEN_TOOLS_HEAD + "".join("\n" + _tojson(t) for t in tools) + _QWEN_TOOLS_TAIL
        r.emit(head)
    elif has_sys:
        r.emit(r.fill(f["system_turn"], content=sys_text))
    elif f["system"] == "always":
        r.emit(r.fill(f["system_turn"], content=r.tpl.default_system or ""))
    last_query = len(messages) - 1
    for i, m in enumerate(messages):
        if m.get("role") == "user":
            last_query = i
    for i, m in enumerate(messages):
        role, content = m.get("role"), _content(m, i)
        last = i == len(messages) - 1
        if role == "user" or (role == "system" and i > 0):
            r.emit(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            body = ""
            if f.get("think") == "qwen3":
                reasoning = ""
                if m.get("reasoning_content") is not None:
                    reasoning = m["reasoning_content"]
                elif "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
                if i > last_query and (last or reasoning):
                    body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
                else:
                    body = content
                for k, tc in enumerate(calls):
                    fn = _tool_fn(tc)
                    sep = "\n" if (k == 0 and content) or k > 0 else ""
                    body += sep + '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + _args_json(fn)
                    body += "}\n</tool_call>"
                r.emit("<|im_start|>assistant\n")
            elif calls:
                body = "\n" + content if content else ""
                for tc in calls:
                    fn = _tool_fn(tc)
                    body += '\n<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + _args_json(fn)
                    body += "}\n</tool_call>"
                # "<|im_start|>assistant" is the prompt; the newline that follows belongs to the answer
                r.emit("<|im_start|>assistant")
            else:
                body = content
                r.emit("<|im_start|>assistant\n")
            r.emit(body + "<|im_end|>", True)
            r.emit("\n")
        elif role == "tool":
            prev = messages[i - 1].get("role") if i > 0 else None
            text = ("<|im_start|>user" if prev != "tool" else "") + "\n<tool_response>\n" + content
            text += "\n</tool_response>"
            if last or messages[i + 1].get("role") != "tool":
                text += "<|im_end|>\n"
            r.emit(text)


_LLAMA3_TOOLS_HEAD = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
)


def _tools_text(style: str, tools: list[dict[str, Any]]) -> str:
    if style == "llama3":
        return "".join(_tojson(t) + "\n\n" for t in tools)
    items = []  # mistral: the function's own keys, hand-spaced around compact JSON values
    for t in tools:
        fn = t.get("function", t)
        keys = []
        for key in ("name", "description", "parameters"):
            if key in fn:
                val = fn[key]
                keys.append(f'"{key}": "{val}"' if isinstance(val, str) else f'"{key}": {_tojson(val)}')
        items.append('{"type": "function", "function": {' + ", ".join(keys) + "}}")
    return "[AVAILABLE_TOOLS][" + ", ".join(items) + "][/AVAILABLE_TOOLS]"


def _tool_calls_text(style: str, calls: list[dict[str, Any]], k: int) -> str:
    if style == "llama3":
        if len(calls) != 1:
            raise UserError(f"message {k}: llama3 supports exactly one tool call per assistant message")
        fn = _tool_fn(calls[0])
        return '{"name": "' + fn["name"] + '", "parameters": ' + _args_json(fn) + "}"
    parts = []
    for tc in calls:
        fn, cid = _tool_fn(tc), tc.get("id")
        if not isinstance(cid, str) or len(cid) != 9:
            raise UserError(f"message {k}: mistral tool-call ids must be 9-character strings, got {cid!r}")
        parts.append('{"name": "' + fn["name"] + '", "arguments": ' + _args_json(fn) + ', "id": "' + cid + '"}')
    return "[TOOL_CALLS][" + ", ".join(parts) + "]"


def _render_turns(r: _Renderer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Families made of fixed per-role patterns (llama-2, llama-3.1, mistral-nemo, gemma-3, phi-3, base formats ...)."""
    f = r.f
    mode = f["system"]
    style = f.get("tool_style")
    has_sys = bool(messages) and messages[0].get("role") == "system"
    system = _content(messages[0], 0) if has_sys else r.tpl.default_system
    loop = messages[1:] if has_sys else messages
    if f.get("bos"):
        r.emit(r.bos)
    r.emit(f.get("prefix", ""))
    if f.get("alternate"):
        _check_alternation(loop)
    system_turn = f["system_turn_tools"] if tools and "system_turn_tools" in f else f.get("system_turn", "")
    if mode == "always":
        r.emit(r.fill(system_turn, content=system or ""))
    elif mode in ("optional", "optional_nonempty") and has_sys and (system or mode == "optional"):
        r.emit(r.fill(system_turn, content=system))
    last_user = max((k for k, m in enumerate(loop) if m.get("role") == "user"), default=-1)
    for k, m in enumerate(loop):
        role, content = m.get("role"), _content(m, k)
        if role == "user":
            if tools and style == "llama3" and k == 0:
                r.emit(r.fill(f["user"], content=_LLAMA3_TOOLS_HEAD + _tools_text(style, tools) + content))
                continue
            if tools and style == "mistral" and k == last_user:
                r.emit(_tools_text(style, tools))
            merge = (mode == "first_user" and k == 0) or (mode == "last_user" and k == last_user)
            if merge and has_sys:
                r.emit(r.fill(f["user_with_system"], content=content, system=system))
            else:
                r.emit(r.fill(f["user"], content=content))
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            if calls and not style:
                raise UserError(f"message {k}: template family {r.tpl.name!r} has no tool-call format")
            r.assistant(_tool_calls_text(style, calls, k) if calls else content)
        elif role == "tool" and style:
            if style == "llama3":
                r.emit(r.fill(f["tool_turn"], content=content))
            else:
                cid = m.get("tool_call_id")
                if not isinstance(cid, str) or len(cid) != 9:
                    raise UserError(f"message {k}: mistral tool results need a 9-character tool_call_id, got {cid!r}")
                r.emit('[TOOL_RESULTS]{"content": ' + content + ', "call_id": "' + cid + '"}[/TOOL_RESULTS]')
        elif role == "system" and f.get("system_mid"):
            if content or mode != "optional_nonempty":
                r.emit(r.fill(f["system_turn"], content=content))
        elif role == "system":
            raise UserError(f"template family {r.tpl.name!r} supports one system message, first in the conversation")
        else:
            raise UserError(f"message {k}: role {role!r} is not supported by template family {r.tpl.name!r}")


def _train_next(segments: list[Segment], tokens: list[str]) -> list[Segment]:
    """Mark the role token that opens the turn after an answer as trained (families whose answers end that way)."""
    out: list[Segment] = []
    for k, (text, trained) in enumerate(segments):
        prev_trained = k > 0 and segments[k - 1][1]
        hit = next((t for t in tokens if text.startswith(t)), None) if prev_trained and not trained else None
        if hit:
            out.append((hit, True))
            if text[len(hit) :]:
                out.append((text[len(hit) :], False))
        else:
            out.append((text, trained))
    return out


ROLES = ("system", "user", "assistant", "tool")


def check_roles(messages: list[dict[str, Any]]) -> None:
    """The one rule for roles in every rendering (training, Jinja, Ollama): a message is an object whose role is
    one of ROLES; any other role is an error naming the message, never dropped by one rendering and kept by another."""
    if not messages:
        raise UserError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"message {i}: expected an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}")


def render_segments(
    tpl: ChatTemplate,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> list[Segment]:
    """Render `messages` as [(text, trained)]: trained = assistant content and its end-of-turn token.

    The joined text equals the family's Jinja rendered by transformers' `apply_chat_template` with the same
    arguments. `bos_token`/`eos_token` default to the family's own (pass the tokenizer's to match its Jinja).
    """
    check_roles(messages)
    if tools and not tpl.tools:
        raise UserError(f"template family {tpl.name!r} has no tool format; drop 'tools' or pick a tool-capable family")
    bos = tpl.bos_token if bos_token is None else bos_token
    eos = tpl.eos_token if eos_token is None else eos_token
    if tpl.kind == "none":
        raise UserError("the model has no chat template; pass --template NAME to train it in a chat format")
    if tpl.kind == "jinja":
        from exporter import jinja_segments

        return jinja_segments.segments(tpl, messages, tools, add_generation_prompt, enable_thinking, bos or "",
                                       eos or "")  # fmt: skip
    r = _Renderer(tpl, bos or "", eos or "")
    if tpl.format.get("tool_style") in ("qwen", "qwen3"):
        _render_qwen(r, messages, tools)
    else:
        _render_turns(r, messages, tools)
    if add_generation_prompt:
        gen = tpl.format["generation"]
        if enable_thinking is False and "generation_no_think" in tpl.format:
            gen = tpl.format["generation_no_think"]
        r.emit(r.fill(gen))
    elif tpl.format.get("final_eos") == "always" or (
        tpl.format.get("final_eos") == "after_assistant" and messages[-1].get("role") == "assistant"
    ):
        # The closing eos is trained only when it is what ends the last answer (glm4); where the answer already
        # ended with its own end-of-turn token (phi3's <|end|>) the eos after it is context, not a target.
        answer = tpl.format.get("assistant", ["", ""])[1]
        ended = any(answer.endswith(t) for t in tpl.eot_tokens if t and "{" not in t)
        r.emit(r.eos, messages[-1].get("role") == "assistant" and not ended)
    if tpl.format.get("trained_next"):
        return _train_next(r.out, tpl.format["trained_next"])
    return r.out


def render_text(tpl: ChatTemplate, messages: list[dict[str, Any]], **kw: Any) -> str:
    """The training text of `messages` (== the family's Jinja through apply_chat_template)."""
    return "".join(t for t, _ in render_segments(tpl, messages, **kw))


def _tokenize(tokenizer: Any, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    """Token ids of the joined text (exactly `tokenizer(text, add_special_tokens=False)`) and a trained flag per
    token: a token is trained when at least half of its characters lie in trained segments (so "▁Hello" after a
    prompt space, or an end-of-turn token that swallows the following newline, count as answer tokens)."""
    text = "".join(t for t, _ in segments)
    prefix = [0]  # prefix[i] = number of trained characters in text[:i]
    for t, trained in segments:
        for _ in t:
            prefix.append(prefix[-1] + (1 if trained else 0))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        flags = []
        for start, end in enc["offset_mapping"]:
            start, end = max(0, min(start, len(text))), max(0, min(end, len(text)))
            if end > start:
                flags.append(2 * (prefix[end] - prefix[start]) >= end - start)
            else:
                flags.append(start < len(text) and prefix[start + 1] > prefix[start])
        return ids, flags
    # slow tokenizers have no offsets: tokenize segment by segment (ids may differ at segment boundaries)
    ids, flags = [], []
    for t, trained in segments:
        seg = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids.extend(seg)
        flags.extend([trained] * len(seg))
    return ids, flags


def _cut(ids: list[int], labels: list[int], cutoff_len: int, keep_first: bool) -> tuple[list[int], list[int]]:
    """Truncate to `cutoff_len` tokens; when the plain head cut would drop every trained token, keep a window that
    ends inside the first answer instead (with the leading BOS kept when `keep_first`)."""
    if len(ids) <= cutoff_len:
        return ids, labels
    if cutoff_len < 2:
        raise UserError(f"cutoff_len must be at least 2, got {cutoff_len}")
    if any(x != -100 for x in labels[:cutoff_len]) or all(x == -100 for x in labels):
        return ids[:cutoff_len], labels[:cutoff_len]
    first = next(k for k, x in enumerate(labels) if x != -100)
    span = first
    while span < len(labels) and labels[span] != -100:
        span += 1
    keep = min(span - first, max(1, cutoff_len // 2))
    end = first + keep
    if keep_first:
        start = end - (cutoff_len - 1)
        return ids[:1] + ids[start:end], labels[:1] + labels[start:end]
    start = end - cutoff_len
    return ids[start:end], labels[start:end]


def encode(
    tokenizer: Any,
    tpl: ChatTemplate,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    train_on_prompt: bool = False,
    cutoff_len: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one training conversation (labels -100 where not trained).

    Ids are the tokenizer's ids of the training text (== `apply_chat_template` text of our Jinja), tokenized with
    `add_special_tokens=False`, so a BOS the Jinja renders appears once; when the tokenizer itself adds BOS and the
    template renders none, one BOS is prepended (llama.cpp/Ollama add it at tokenization too). Never two.
    A template with its own `encoder` encodes itself.
    """
    if tpl.encoder is not None:
        return tpl.encoder(tokenizer, messages, tools=tools, train_on_prompt=train_on_prompt, cutoff_len=cutoff_len)
    segments = render_segments(
        tpl, messages, tools=tools, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or ""
    )
    ids, flags = _tokenize(tokenizer, segments)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None and (not ids or ids[0] != bos_id) and adds_bos(tokenizer):
        ids, flags = [bos_id] + ids, [False] + flags
    labels = [i if (f or train_on_prompt) else -100 for i, f in zip(ids, flags, strict=True)]
    if cutoff_len is not None:
        keep_first = bos_id is not None and bool(ids) and ids[0] == bos_id
        ids, labels = _cut(ids, labels, cutoff_len, keep_first)
    return ids, labels
