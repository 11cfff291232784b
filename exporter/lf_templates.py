"""LLaMA-Factory's chat templates by LLaMA-Factory's names: the same input ids, the same trained labels.

The table is `templates/llamafactory/templates.yaml` (installed in `exporter.families`): each template's slots,
exactly as LLaMA-Factory 0.9.5 registers them in `data/template.py`, keys left out taking `register_template`'s
defaults. This module is the encoder that reads it, following LF's semantics:

- every slot piece is tokenized on its own (`tokenizer.encode(piece, add_special_tokens=False)`), so ids at piece
  boundaries can differ from tokenizing the joined text; LF does it this way and it is the reference;
- turn 0 is prefix + system (+ tool text) + user, later turns are user (or observation) alone; each
  (prompt, answer) pair is one (untrained, trained) span; `efficient_eos` templates train the eos on the next
  prompt's first position and append one final eos; `llama2`-kind templates fold the system text into the first
  user turn; `reasoning` templates add an empty thought to answers without one (trained when `enable_thinking`);
- `fix_tokenizer` is LF's `fix_special_tokens` (eos replaced by the first stop word when `replace_eos`, stop
  words added as special tokens), `jinja` is LF's generated chat template, `stop_token_ids` LF's stop ids.
tests/test_lf_parity.py compares all of it with LLaMA-Factory itself, run in its own venv.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import re
from datetime import datetime
from typing import Any

import yaml

from exporter.errors import UserError

REGISTRY = "llamafactory/templates.yaml"  # inside the `exporter.families` package
IGNORE = -100
KINDS = ("plain", "llama2", "reasoning")
_THINK = ("<think>\n", "\n</think>\n\n")
_TOOL_CALL = ("<tool_call>", "</tool_call>")
_MEDIA = ("<image>", "<video>", "<audio>")  # LF's placeholders, refused by its vision plugins without media

Slot = Any  # str (with {{content}}), {"token": text} or {"special": "bos_token" | "eos_token"}


@dataclasses.dataclass(frozen=True)
class LFTemplate:
    """One LLaMA-Factory template: slots per role and LF's flags. `tools` is None for LF's ToolFormatter (tool
    descriptions rendered by `tool_format`), else the slots of a StringFormatter around the raw tools JSON."""

    name: str
    kind: str
    user: tuple[Slot, ...]
    assistant: tuple[Slot, ...]
    system: tuple[Slot, ...]
    function: tuple[Slot, ...]
    observation: tuple[Slot, ...]
    prefix: tuple[Slot, ...]
    tools: tuple[Slot, ...] | None
    tool_format: str
    default_system: str
    stop_words: tuple[str, ...]
    thought_words: tuple[str, str]
    tool_call_words: tuple[str, str]
    efficient_eos: bool
    replace_eos: bool
    replace_jinja_template: bool
    multimodal: bool = False


@dataclasses.dataclass(frozen=True)
class LFOptions:
    """LLaMA-Factory's data arguments that change the encoding (same names, same defaults)."""

    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    default_system: str | None = None
    tool_format: str | None = None


# ------------------------------------------------------------------ the table


@functools.cache
def _registry() -> dict[str, Any]:
    path = importlib.resources.files("exporter.families").joinpath(REGISTRY)
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def names() -> list[str]:
    """LLaMA-Factory template names we reproduce, sorted."""
    return sorted(_registry()["templates"])


def tool_prompts() -> dict[str, str]:
    return _registry()["tool_prompts"]


_KEYS = {"kind", "user", "assistant", "system", "function", "observation", "prefix", "tools", "tool_format",
         "default_system", "stop_words", "thought_words", "tool_call_words", "efficient_eos", "replace_eos",
         "replace_jinja_template", "multimodal"}  # fmt: skip


@functools.cache
def load(name: str) -> LFTemplate:
    """The LLaMA-Factory template `name`, with `register_template`'s defaults filled in."""
    from exporter.config import did_you_mean

    table = _registry()["templates"]
    if name not in table:
        raise UserError(f"unknown LLaMA-Factory template {name!r}{did_you_mean(name, table)}")
    d = table[name]
    unknown = sorted(set(d) - _KEYS)
    if unknown or d.get("kind", "plain") not in KINDS:
        raise UserError(f"{REGISTRY}: template {name}: unknown keys {unknown} or kind {d.get('kind')!r}")
    efficient_eos = bool(d.get("efficient_eos", False))
    content: tuple[Slot, ...] = ("{{content}}",)
    default_answer = content if efficient_eos else (*content, {"special": "eos_token"})
    user = tuple(d.get("user", content))
    assistant = tuple(d.get("assistant", default_answer))
    return LFTemplate(
        name=name,
        kind=d.get("kind", "plain"),
        user=user,
        assistant=assistant,
        system=tuple(d.get("system", content)),
        function=tuple(d.get("function", assistant)),
        observation=tuple(d.get("observation", user)),
        prefix=tuple(d.get("prefix", ())),
        tools=tuple(d["tools"]) if "tools" in d else None,
        tool_format=d.get("tool_format", "default"),
        default_system=d.get("default_system", ""),
        stop_words=tuple(d.get("stop_words", ())),
        thought_words=tuple(d.get("thought_words", _THINK)),
        tool_call_words=tuple(d.get("tool_call_words", _TOOL_CALL)),
        efficient_eos=efficient_eos,
        replace_eos=bool(d.get("replace_eos", False)),
        replace_jinja_template=bool(d.get("replace_jinja_template", False)),
        multimodal=bool(d.get("multimodal", False)),
    )


def with_options(tpl: LFTemplate, opts: LFOptions) -> LFTemplate:
    """`tool_format` and `default_system` overrides, as `get_template_and_fix_tokenizer` applies them."""
    if opts.train_on_prompt and tpl.efficient_eos:
        raise UserError(f"template {tpl.name!r} does not support train_on_prompt (LLaMA-Factory refuses it too)")
    if opts.mask_history and opts.train_on_prompt:
        raise UserError("mask_history is incompatible with train_on_prompt")
    if opts.tool_format is not None:
        if opts.tool_format not in _FUNCTION_TEXT:
            raise UserError(f"tool_format {opts.tool_format!r} is not one of: {', '.join(sorted(_FUNCTION_TEXT))}")
        answer = ("{{content}}",) if tpl.efficient_eos else ("{{content}}", {"special": "eos_token"})
        tpl = dataclasses.replace(tpl, function=answer, tools=None, tool_format=opts.tool_format)
    if opts.default_system is not None:
        tpl = dataclasses.replace(tpl, default_system=opts.default_system)
    return tpl


# ------------------------------------------------------------------ tools (LF's tool_utils formats)


def _unwrap(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrap(tool: dict[str, Any]) -> dict[str, Any]:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _dumps(x: Any, **kw: Any) -> str:
    return json.dumps(x, ensure_ascii=False, **kw)


def _default_tools(tools: list[dict[str, Any]]) -> str:
    text, tool_names = "", []
    for tool in map(_unwrap, tools):
        args = ""
        params = tool["parameters"]
        for name, p in params["properties"].items():
            required = ", required" if name in params.get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(p["enum"])) if p.get("enum") else ""
            items = ", where each item should be {}".format(p["items"].get("type", "")) if p.get("items") else ""
            args += f"  - {name} ({p.get('type', '')}{required}): {p.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
        tool_names.append(tool["name"])
    return tool_prompts()["default"].format(tool_text=text, tool_names=", ".join(tool_names))


def _tools_text(fmt: str, tools: list[dict[str, Any]]) -> str:
    """The system-prompt text describing `tools` in tool format `fmt` (LF's `tool_formatter`)."""
    prompts = tool_prompts()
    if fmt == "default":
        return _default_tools(tools)
    if fmt == "glm4":
        body = "".join(
            f"\n\n## {t['name']}\n\n{_dumps(t, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
            for t in map(_unwrap, tools)
        )
        return prompts["glm4"].format(tool_text=body)
    if fmt == "llama3":
        body = "".join(_dumps(_wrap(t), indent=4) + "\n\n" for t in tools)
        return prompts["llama3"].format(date=datetime.now().strftime("%d %b %Y"), tool_text=body)
    if fmt == "mistral":
        return "[AVAILABLE_TOOLS] " + _dumps([_wrap(t) for t in tools]) + "[/AVAILABLE_TOOLS]"
    if fmt == "qwen":
        return prompts["qwen"].format(tool_text="".join("\n" + _dumps(_wrap(t)) for t in tools))
    if fmt == "qwen3_5":
        unwrapped = [t.get("function", t) if t.get("type") == "function" else t for t in tools]
        return prompts["qwen3_5"].format(tool_text="".join("\n" + _dumps(t) for t in unwrapped))
    raise UserError(f"unknown tool format {fmt!r}")


def _glm4_calls(calls: list[tuple[str, str]]) -> str:
    if len(calls) > 1:
        raise UserError("GLM-4 does not support parallel functions")
    return f"{calls[0][0]}\n{calls[0][1]}"


def _qwen3_5_calls(calls: list[tuple[str, str]]) -> str:
    out = []
    for name, args in calls:
        text = f"<tool_call>\n<function={name}>"
        for key, value in json.loads(args).items():
            value = value if isinstance(value, str) else _dumps(value)
            text += f"\n<parameter={key}>\n{value}\n</parameter>"
        out.append(text + "\n</function>\n</tool_call>")
    return "\n".join(out)


def _llama3_calls(calls: list[tuple[str, str]]) -> str:
    objs = [{"name": n, "parameters": json.loads(a)} for n, a in calls]
    return _dumps(objs[0] if len(objs) == 1 else objs)


# the assistant text of a list of (name, arguments JSON) calls, per tool format (LF's `function_formatter`)
_FUNCTION_TEXT = {
    "default": lambda calls: "\n".join(f"Action: {n}\nAction Input: {a}" for n, a in calls),
    "glm4": _glm4_calls,
    "llama3": _llama3_calls,
    "mistral": lambda calls: _dumps([{"name": n, "arguments": json.loads(a)} for n, a in calls]),
    "qwen": lambda calls: "\n".join(
        "<tool_call>\n" + _dumps({"name": n, "arguments": json.loads(a)}) + "\n</tool_call>" for n, a in calls
    ),
    "qwen3_5": _qwen3_5_calls,
}


def _parse_calls(text: str) -> list[tuple[str, str]]:
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"function message is not valid JSON: {text[:80]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    try:
        return [(c["name"], _dumps(c["arguments"])) for c in calls]
    except (KeyError, TypeError):
        raise UserError(
            f'function message must hold {{"name": ..., "arguments": ...}} objects: {text[:80]!r}'
        ) from None


def _function_content(tpl: LFTemplate, content: str, with_words: bool) -> str:
    """A `function` (tool call) message as assistant text: LF's FunctionFormatter. Text outside the tool-call words
    (or a leading thought) is kept in front of the formatted calls."""
    fmt = _FUNCTION_TEXT[tpl.tool_format]
    if with_words:
        a, b = tpl.tool_call_words
        m = re.search(re.escape(a) + "(.*?)" + re.escape(b), content, re.DOTALL)
        if m:
            return content.replace(m.group(0), "") + fmt(_parse_calls(m.group(1)))
        a, b = tpl.thought_words
        m = re.search(re.escape(a) + "(.*?)" + re.escape(b), content, re.DOTALL)
        if m:
            return m.group(0) + fmt(_parse_calls(content.replace(m.group(0), "")))
    return fmt(_parse_calls(content))


# ------------------------------------------------------------------ slots -> pieces -> ids


def _fill(slots: tuple[Slot, ...], **values: str) -> list[Slot]:
    """LF's StringFormatter.apply: each placeholder replaced once per string slot, in argument order."""
    out = []
    for slot in slots:
        if isinstance(slot, str):
            for key, value in values.items():
                slot = slot.replace("{{" + key + "}}", value, 1)
        out.append(slot)
    return out


def _tools_piece(tpl: LFTemplate, tools: str) -> str:
    if tpl.tools is not None:
        return _fill(tpl.tools, content=tools)[0]
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        raise UserError(f"tools is not valid JSON: {tools[:80]!r}") from None
    if not parsed:
        return ""
    parsed = parsed if isinstance(parsed, list) else [parsed]
    return _tools_text(tpl.tool_format, parsed)


def _turns(tpl: LFTemplate, messages: list[dict[str, str]], system: str, tools: str) -> list[list[Slot]]:
    """The slot pieces of each message (LF's `_encode`, before tokenization)."""
    system = system or tpl.default_system
    out = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        pieces: list[Slot] = []
        head = ""
        if i == 0:
            pieces += list(tpl.prefix)
            if system or tools:
                text = system + (_tools_piece(tpl, tools) if tools else "")
                if tpl.kind == "llama2":
                    head = _fill(tpl.system, content=text)[0]
                else:
                    pieces += _fill(tpl.system, content=text)
        if role == "user":
            if tpl.kind == "llama2":
                pieces += _fill(tpl.user, content=head + content)
            else:
                pieces += _fill(tpl.user, content=content, idx=str(i // 2))
        elif role == "assistant":
            pieces += _fill(tpl.assistant, content=content)
        elif role == "observation":
            pieces += _fill(tpl.observation, content=content)
        elif role == "function":
            pieces += _fill(tpl.function, content=_function_content(tpl, content, tpl.kind != "llama2"))
        else:
            raise UserError(f"message {i}: unexpected role {role!r} (user, assistant, observation, function)")
        out.append(pieces)
    return out


def _remove_thought(tpl: LFTemplate, content: str) -> str:
    a, b = tpl.thought_words
    return re.sub(re.escape(a) + "(.*?)" + re.escape(b), "", content, flags=re.DOTALL).lstrip("\n")


def pairs(
    tpl: LFTemplate, messages: list[dict[str, str]], system: str | None, tools: str | None, opts: LFOptions
) -> list[tuple[list[Slot], list[Slot]]]:
    """(prompt pieces, answer pieces) per turn: LF's `encode_multiturn`, reasoning templates included."""
    messages = [dict(m) for m in messages]
    discard_history_cot = opts.mask_history and not opts.preserve_thinking
    reasoning = tpl.kind == "reasoning"
    if reasoning:
        for i in range(1, len(messages), 2):
            if opts.enable_thinking is False or (discard_history_cot and i < len(messages) - 2):
                messages[i]["content"] = _remove_thought(tpl, messages[i]["content"])
    turns = _turns(tpl, messages, system or "", tools or "")
    if reasoning:
        thought = tpl.thought_words[0] + tpl.thought_words[1]
        for i in [len(messages) - 2] if discard_history_cot else range(0, len(messages), 2):
            answer = messages[i + 1]["content"]
            if tpl.thought_words[0].strip() not in answer and tpl.thought_words[1].strip() not in answer:
                if opts.enable_thinking:
                    turns[i + 1] = [thought, *turns[i + 1]]
                else:
                    turns[i] = [*turns[i], thought]
    return [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]


def piece_ids(tokenizer: Any, pieces: list[Slot]) -> list[int]:
    """Each piece tokenized on its own, as LF's `_convert_elements_to_ids`."""
    ids: list[int] = []
    for p in pieces:
        if isinstance(p, str):
            if p:
                ids += tokenizer.encode(p, add_special_tokens=False)
        elif "token" in p:
            ids.append(tokenizer.convert_tokens_to_ids(p["token"]))
        else:
            tid = getattr(tokenizer, p["special"] + "_id")
            if tid is not None:
                ids.append(tid)
    return ids


def piece_text(pieces: list[Slot], bos: str | None, eos: str | None) -> str:
    special = {"bos_token": bos, "eos_token": eos}
    return "".join(p if isinstance(p, str) else p.get("token") or special[p["special"]] or "" for p in pieces)


def seqlen(source: int, target: int, cutoff: int) -> tuple[int, int]:
    """How much of a (prompt, answer) pair fits in `cutoff` tokens (LF's `infer_seqlen`)."""
    if target * 2 < cutoff:
        max_target = cutoff
    elif source * 2 < cutoff:
        max_target = cutoff - source
    else:
        max_target = int(cutoff * (target / (source + target)))
    new_target = min(max_target, target)
    return min(max(cutoff - new_target, 0), source), new_target


def encode_oneturn(
    tokenizer: Any,
    tpl: LFTemplate,
    messages: list[dict[str, str]],
    system: str | None = None,
    tools: str | None = None,
    opts: LFOptions = LFOptions(),
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a conversation ending with its answer, as LF's `template.encode_oneturn` makes
    them (what `do_predict` and `llamafactory-cli eval` feed the model): every turn before the last answer is the
    prompt; history answers lose their thoughts and only the last answer gets an empty one (reasoning templates).
    `messages` are LF's roles; `tokenizer` has been through `fix_tokenizer`; nothing is cut."""
    tpl = with_options(tpl, opts)
    pieces = pairs(tpl, messages, system, tools, dataclasses.replace(opts, mask_history=True))
    prompt = [i for p, a in pieces[:-1] for i in piece_ids(tokenizer, p) + piece_ids(tokenizer, a)]
    return prompt + piece_ids(tokenizer, pieces[-1][0]), piece_ids(tokenizer, pieces[-1][1])


def encode(
    tokenizer: Any,
    tpl: LFTemplate,
    messages: list[dict[str, str]],
    system: str | None = None,
    tools: str | None = None,
    opts: LFOptions = LFOptions(),
) -> tuple[list[int], list[int]]:
    """Input ids and labels of one SFT example, as LF's SupervisedDatasetProcessor makes them. `messages` are LF's
    roles (user / assistant / observation / function), alternating, ending with the answer; `tokenizer` has been
    through `fix_tokenizer`. Labels are -100 where nothing is trained."""
    if len(messages) % 2 != 0:
        raise UserError("a training conversation must alternate prompt/answer and end with an answer")
    tpl = with_options(tpl, opts)
    if tpl.multimodal:
        for i, m in enumerate(messages):
            found = [p for p in _MEDIA if p in m["content"]]
            if found:
                raise UserError(
                    f"message {i}: {found[0]} placeholder without a matching input; template {tpl.name!r} is a "
                    f"multimodal format (exporter trains text only)"
                )
    encoded = [(piece_ids(tokenizer, p), piece_ids(tokenizer, a)) for p, a in pairs(tpl, messages, system, tools, opts)]
    eos_id = tokenizer.eos_token_id
    total = 1 if tpl.efficient_eos else 0
    if opts.mask_history:
        encoded = encoded[::-1]  # the last turns first: they are kept when cutoff_len cuts
    ids: list[int] = []
    labels: list[int] = []
    for k, (source, target) in enumerate(encoded):
        if total >= opts.cutoff_len:
            break
        ns, nt = seqlen(len(source), len(target), opts.cutoff_len - total)
        source, target = source[:ns], target[:nt]
        total += ns + nt
        if opts.train_on_prompt:
            source_label = source
        elif tpl.efficient_eos and k != 0:
            source_label = [eos_id] + [IGNORE] * (ns - 1)
        else:
            source_label = [IGNORE] * ns
        target_label = [IGNORE] * nt if opts.mask_history and k != 0 else target
        if opts.mask_history:
            ids, labels = source + target + ids, source_label + target_label + labels
        else:
            ids, labels = ids + source + target, labels + source_label + target_label
    if tpl.efficient_eos:
        ids, labels = ids + [eos_id], labels + [eos_id]
    return ids, labels


# ------------------------------------------------------------------ tokenizer, Jinja, stop tokens


def fix_tokenizer(tokenizer: Any, tpl: LFTemplate) -> list[str]:
    """LF's `fix_special_tokens`: eos replaced by the first stop word (`replace_eos`), an eos when there is none,
    pad = eos when unset, the other stop words added as special tokens. Returns the tokens that were new to the
    vocabulary (LF then needs `resize_vocab`)."""
    before = len(tokenizer)
    seen = set(tokenizer.get_vocab())
    stop_words = list(tpl.stop_words)
    if tpl.replace_eos:
        if not stop_words:
            raise UserError(f"template {tpl.name!r}: stop words are required to replace the eos token")
        _set_eos(tokenizer, stop_words.pop(0))
    if tokenizer.eos_token_id is None:
        _set_eos(tokenizer, "<|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if stop_words:
        try:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": stop_words}, replace_additional_special_tokens=False
            )
        except TypeError:
            tokenizer.add_special_tokens({"additional_special_tokens": stop_words})
    if len(tokenizer) == before:
        return []
    return [t for t in tokenizer.get_vocab() if t not in seen]


def _set_eos(tokenizer: Any, token: str) -> None:
    if tokenizer.eos_token != token:
        tokenizer.add_special_tokens({"eos_token": token})


def stop_tokens(tpl: LFTemplate, tokenizer: Any) -> list[str]:
    """Tokens that end an answer: the (fixed) eos and every stop word (LF's `get_stop_token_ids`, as text)."""
    out = [tokenizer.eos_token] if tokenizer.eos_token else []
    return out + [w for w in tpl.stop_words if w not in out]


def stop_token_ids(tpl: LFTemplate, tokenizer: Any) -> list[int]:
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(tpl, tokenizer)})


def _jinja_slots(slots: tuple[Slot, ...], special: dict[str, str | None], placeholder: str = "content") -> str:
    """Slots as a Jinja string expression (LF's `_convert_slots_to_jinja`); bos/eos written as their text, left out
    when the tokenizer has none."""
    items = []
    for slot in slots:
        if isinstance(slot, str):
            head, *tail = slot.split("{{content}}")
            if head:
                items.append("'" + head.replace("'", "\\'") + "'")
            if tail:
                items.append(placeholder)
                if tail[0]:
                    items.append("'" + tail[0].replace("'", "\\'") + "'")
        elif "special" in slot:
            if special[slot["special"]] is not None:
                items.append("'" + special[slot["special"]] + "'")
        else:
            raise UserError(f"template slot {slot}: a token slot cannot be written as Jinja")
    return " + ".join(items)


def jinja(tpl: LFTemplate, bos: str | None, eos: str | None) -> str:
    """The chat template LF generates from the slots (`_get_jinja_template`), for a (fixed) tokenizer whose bos/eos
    texts are `bos`/`eos` (None: the tokenizer has none)."""
    special = {"bos_token": bos, "eos_token": eos}
    prefix = _jinja_slots(tpl.prefix, special)
    system = _jinja_slots(tpl.system, special, placeholder="system_message")
    user = _jinja_slots(tpl.user, special)
    assistant = _jinja_slots(tpl.assistant, special)
    out = "{{ " + prefix + " }}" if prefix else ""
    if tpl.default_system:
        out += "{% set system_message = '" + tpl.default_system.replace("'", "\\'") + "' %}"
    out += (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    )
    if tpl.kind == "llama2":
        out += (
            "{% for message in loop_messages %}"
            "{% if loop.index0 == 0 and system_message is defined %}"
            "{% set content = " + system + " + message['content'] %}"
            "{% else %}{% set content = message['content'] %}{% endif %}"
        )
    else:
        out += "{% if system_message is defined %}{{ " + system + " }}{% endif %}"
        out += "{% for message in loop_messages %}{% set content = message['content'] %}"
    return out + (
        "{% if message['role'] == 'user' %}{{ " + user + " }}"
        "{% elif message['role'] == 'assistant' %}{{ " + assistant + " }}"
        "{% endif %}{% endfor %}"
    )


def special_texts(tokenizer: Any) -> tuple[str | None, str | None]:
    """(bos, eos) texts of a tokenizer, None where it has no such token."""
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    return bos, tokenizer.eos_token if tokenizer.eos_token_id is not None else None


def chat_template_for(tpl: LFTemplate, tokenizer: Any) -> str | None:
    """The chat template the trained adapter carries, decided as LF's `fix_jinja_template` does: the model's own
    when it has one and the template does not ask to replace it, else the Jinja generated from the slots."""
    if tokenizer.chat_template is None or tpl.replace_jinja_template:
        return jinja(tpl, *special_texts(tokenizer))
    return tokenizer.chat_template
