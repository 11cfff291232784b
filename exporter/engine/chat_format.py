"""A conversation in, the prompt text out, through the model's own Jinja chat template (transformers' renderer),
for HF dirs and GGUF files alike; end-of-turn tokens derived from that template; tool calls parsed back out.

The tool formats are a table keyed by a marker that the template's Jinja contains, not by the model's name.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from exporter.engine.api import EngineError

_SENTINEL = "\u2063ENGINE-ANSWER\u2063"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1+: may open a tool-call answer


@dataclass(frozen=True)
class ToolFormat:
    """How a family writes tool calls: `marker` in the Jinja selects it, `start` opens a call in an answer."""

    name: str
    marker: str
    start: str
    parse: Callable[[str, Mapping[str, set[str]]], list[dict[str, Any]] | None]  # (text, string parameters)

    def find(self, text: str) -> int:
        """Where the first call starts in `text`, -1 if none (Llama 3 calls are the whole answer)."""
        if self.start == "{":
            return 0 if text.lstrip().startswith(("{", PYTHON_TAG)) else -1
        return text.find(self.start)


def _json_objects(text: str) -> list[Any]:
    """Every top-level JSON value in `text`, in order (whitespace, commas and semicolons between them)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i >= len(text):
            break
        value, i = dec.raw_decode(text, i)
        out.append(value)
    return out


def _call(name: Any, args: Any) -> dict[str, Any]:
    if not isinstance(name, str) or not name:
        raise ValueError("no function name")
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("arguments are not an object")
    return {"name": name, "arguments": args}


def _parse_hermes(text: str, _strings: Mapping[str, set[str]]) -> list[dict[str, Any]] | None:
    bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
    if not bodies:
        return None
    calls = []
    for body in bodies:
        obj = json.loads(body.strip())
        calls.append(_call(obj.get("name"), obj.get("arguments", {})))
    return calls


def _parse_glm(text: str, strings: Mapping[str, set[str]]) -> list[dict[str, Any]] | None:
    """GLM-4.5/4.6: `<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>`; a value is the string
    itself where the tool's schema says the parameter is a string (`strings`: function -> such parameters), else JSON
    where it parses as JSON (the template writes non-strings with tojson), else the string."""
    bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
    if not bodies:
        return None
    calls = []
    for body in bodies:
        name = body.split("<arg_key>", 1)[0].strip()
        args: dict[str, Any] = {}
        for key, value in re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", body, flags=re.S):
            key = key.strip()
            try:
                args[key] = value if key in strings.get(name, ()) else json.loads(value)
            except ValueError:
                args[key] = value
        calls.append(_call(name, args))
    return calls


def _parse_granite(text: str, _strings: Mapping[str, set[str]]) -> list[dict[str, Any]] | None:
    """Granite 3.x: `<|tool_call|>` then a JSON list of {"name", "arguments"} objects."""
    body = text.split("<|tool_call|>", 1)[1].strip() if "<|tool_call|>" in text else ""
    items = [x for v in _json_objects(body) for x in (v if isinstance(v, list) else [v])]
    return [_call(o.get("name"), o.get("arguments", {})) for o in items] or None


def _parse_mistral(text: str, _strings: Mapping[str, set[str]]) -> list[dict[str, Any]] | None:
    if "[TOOL_CALLS]" not in text:
        return None
    body = text.split("[TOOL_CALLS]", 1)[1].strip()
    items = [x for v in _json_objects(body) for x in (v if isinstance(v, list) else [v])]
    return [_call(o.get("name"), o.get("arguments", {})) for o in items]


def _parse_llama3(text: str, _strings: Mapping[str, set[str]]) -> list[dict[str, Any]] | None:
    body = text.replace(PYTHON_TAG, "").strip()
    if not body.startswith("{"):
        return None
    objs = _json_objects(body)
    if not objs or not all(isinstance(o, dict) and "name" in o for o in objs):
        return None
    return [_call(o["name"], o.get("parameters", o.get("arguments", {}))) for o in objs]


TOOL_FORMATS = (  # first marker found in the template wins
    ToolFormat("glm", "<arg_key>", "<tool_call>", _parse_glm),  # GLM-4.5 / 4.6 (before hermes: also <tool_call>)
    ToolFormat("granite", "<|tool_call|>", "<|tool_call|>", _parse_granite),  # Granite 3.x
    ToolFormat("hermes", "<tool_call>", "<tool_call>", _parse_hermes),  # Qwen 2.5 / 3, Hermes, many others
    ToolFormat("mistral", "[TOOL_CALLS]", "[TOOL_CALLS]", _parse_mistral),
    ToolFormat("llama3", '"parameters": ', "{", _parse_llama3),  # Llama 3.1+: one JSON object per answer
)


def tool_format(template: str) -> ToolFormat | None:
    """The tool format the template writes, or None when it has no tool calls."""
    if "tool" not in template:
        return None
    return next((f for f in TOOL_FORMATS if f.marker in template), None)


def string_parameters(tools: list[dict[str, Any]] | None) -> dict[str, set[str]]:
    """function name -> its parameters whose JSON schema type is only "string" (or "string" and "null")."""
    out: dict[str, set[str]] = {}
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        props = ((fn or {}).get("parameters") or {}).get("properties") if isinstance(fn, dict) else None
        if not isinstance(props, dict):
            continue
        for key, schema in props.items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            kinds = {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()
            if kinds and kinds - {"null"} == {"string"}:
                out.setdefault(fn.get("name"), set()).add(key)
    return out


def parse_tool_calls(
    fmt: ToolFormat | None, text: str, tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """(content before the calls, OpenAI `tool_calls`) from an answer; ([text], []) when it calls no tool or the
    call is not well-formed JSON (then the answer is returned as plain text, as OpenAI-compatible servers do).
    `tools`: the request's tool list, whose schemas say which argument values stay strings."""
    if fmt is None:
        return text, []
    at = fmt.find(text)
    if at < 0:
        return text, []
    try:
        calls = fmt.parse(text[at:], string_parameters(tools))
    except (ValueError, AttributeError, TypeError):
        return text, []
    if not calls:
        return text, []
    out = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for c in calls
    ]
    return text[:at].rstrip(), out


def _text_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise EngineError(f"{where}: only text content parts are supported, got {kind!r}")
            parts.append(p["text"])
        return "".join(parts)
    raise EngineError(f"{where}: content must be a string or a list of text parts")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-style messages -> what HF chat templates expect: text content, tool-call arguments as objects.
    OpenAI's legacy function calling is read as its tool calling: an assistant's `function_call` as its one tool
    call, a `function` message (the call's result, after it) as a `tool` message of that `name`."""
    if not isinstance(messages, list) or not messages:
        raise EngineError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        roles = ("system", "developer", "user", "assistant", "tool", "function")
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise EngineError(f"{where}: role must be one of system, user, assistant, tool")
        if m["role"] == "function":
            if not isinstance(m.get("name"), str) or not m["name"]:
                raise EngineError(f"{where}: a 'function' message (OpenAI's legacy function result) needs the "
                                  "function's 'name'")  # fmt: skip
            if not out or out[-1]["role"] not in ("assistant", "tool"):
                raise EngineError(f"{where}: a 'function' message (OpenAI's legacy function result) must follow the "
                                  "assistant's call; send an assistant's call as its 'tool_calls'")  # fmt: skip
        if m.get("function_call") is not None and m.get("tool_calls") is None and m["role"] == "assistant":
            m = {**m, "tool_calls": [{"type": "function", "function": m["function_call"]}]}
        role = {"developer": "system", "function": "tool"}.get(m["role"], m["role"])
        msg: dict[str, Any] = {"role": role}
        msg["content"] = _text_content(m.get("content"), where)
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise EngineError(f"{where}.{key} must be a string")
                msg[key] = m[key]
        if m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise EngineError(f"{where}.tool_calls must be a list")
            calls = []
            for j, tc in enumerate(m["tool_calls"]):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise EngineError(f"{where}.tool_calls[{j}]: expected {{'function': {{'name', 'arguments'}}}}")
                if tc.get("id") is not None and not isinstance(tc["id"], str):
                    raise EngineError(f"{where}.tool_calls[{j}].id must be a string")
                args = fn.get("arguments")
                if args is None:
                    args = {}
                elif isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError as e:
                        raise EngineError(f"{where}.tool_calls[{j}].function.arguments: not valid JSON ({e})") from None
                if not isinstance(args, dict):
                    raise EngineError(f"{where}.tool_calls[{j}].function.arguments must be a JSON object")
                call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
                if tc.get("id"):
                    call["id"] = tc["id"]
                calls.append(call)
            if calls:
                msg["tool_calls"] = calls
        out.append(msg)
    return out


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat template and the special-token texts it is rendered with (bos_token, eos_token ...)."""

    template: str
    special: dict[str, str]
    where: str = "the model"

    def require(self) -> None:
        """UserError (at startup, for chat and serve) when there is no template to render conversations with."""
        if not self.template:
            from exporter.errors import UserError

            raise UserError(f"{self.where} has no chat template; pass --template FAMILY (see `exporter template list`)")

    @property
    def tools(self) -> ToolFormat | None:
        return tool_format(self.template)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text, exactly as `tokenizer.apply_chat_template(..., tokenize=False)` renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.template:
            raise EngineError(f"{self.where} has no chat template; pass --template FAMILY (exporter template list)")
        try:
            out, _ = render_jinja_template(
                conversations=[messages],
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                **{**self.special, **kwargs},
            )
        except EngineError:
            raise
        except Exception as e:  # the template's own raise_exception(...) and Jinja errors
            raise EngineError(f"the chat template cannot render this conversation: {e}") from None
        return out[0]

    def end_of_turn(self) -> str:
        """The text the template puts right after an assistant answer (e.g. `<|im_end|>\\n`), '' if none."""
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.render(msgs, add_generation_prompt=False)
        except EngineError:
            return ""
        at = text.rfind(_SENTINEL)
        return text[at + len(_SENTINEL) :] if at >= 0 else ""
