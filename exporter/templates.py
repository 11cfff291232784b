"""Chat-template families as data: one YAML file per family drives training, HF Jinja, GGUF and Ollama.

Each `templates/<family>.yaml` (installed as package `exporter.families`) defines the HF Jinja `chat_template`, the
Ollama Go `TEMPLATE`, `PARAMETER stop` strings, the end-of-turn tokens, the default system prompt, the BOS/EOS text
the Jinja renders, and a `format` block that drives the training renderer (`render_segments` / `encode`).

BOS: HF Jinja templates of llama-2/llama-3.1/mistral-nemo/gemma-3 render `bos_token` as text; Ollama and llama.cpp
add BOS at tokenization instead, so the Go TEMPLATE never renders the leading BOS. The training renderer follows the
Jinja (BOS as text, tokenized with `add_special_tokens=False`), so the ids carry exactly one BOS.

The model's own template is the truth: `resolve(model_dir, None)` keeps the model's Jinja (exported byte for byte)
and names the family whose Jinja renders every probe exactly like it; when none does, `exporter.derive` derives the
Go TEMPLATE, stops, end-of-turn tokens and default system from the Jinja itself and training follows the Jinja
(`exporter.jinja_segments`). A template problem never raises there; it becomes `notes`.

Protocol: anything train, verify and calibration encode with is a `ChatTemplate`: `jinja` (what is exported),
`ollama` (Modelfile TEMPLATE, "" for none), `stop`, `eot_tokens`, `default_system`, and either a `format` the
segment renderer knows (a family's layout; `{"kind": "jinja", ...}` the model's own Jinja; `{"kind": "none"}` no
template) or an `encoder(tokenizer, messages, tools=, train_on_prompt=, cutoff_len=) -> (ids, labels)` of its own;
a template that changes the tokenizer (LLaMA-Factory's eos replacement and stop words) has a `tokenizer_fix`, applied
by train before encoding and by `write_into` to every exported tokenizer.

Names: a LLaMA-Factory template name (`exporter.lf_names`, LF's own formats and encoding) resolves first, then a
family name; official families are named after the release they reproduce (`llama-3.1`, `qwen-2.5`), never an LF
name.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from exporter.config import read_json
from exporter.diff import first_diff
from exporter.errors import UserError
from exporter.hf_dir import adds_bos

FAMILIES_PACKAGE = "exporter.families"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One chat-template family. `jinja` is the HF chat_template, `ollama` the Modelfile TEMPLATE."""

    name: str
    description: str
    jinja: str
    ollama: str
    stop: list[str]
    eot_tokens: list[str]
    default_system: str | None
    bos_token: str | None
    eos_token: str | None
    tools: bool
    format: dict[str, Any]
    notes: tuple[str, ...] = ()  # what differs between the Jinja and the Go TEMPLATE, and why (derived templates)
    encoder: Callable[..., tuple[list[int], list[int]]] | None = None  # own token-level encoding (see module doc)
    tokenizer_fix: Callable[[Any], None] | None = None  # changes a tokenizer needs before encoding and export

    @property
    def kind(self) -> str:
        """family (a layout of ours), jinja (the model's own Jinja trains) or none (no template at all)."""
        return str(self.format.get("kind", "family"))

    def for_tokenizer(self, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
        """This family with the tokenizer's BOS/EOS text filled in: base-model formats (stanford-alpaca, vicuna-1.1,
        human-assistant) end answers with whatever eos the tokenizer has, written `{eos_token}` in `eot_tokens` and
        `ollama`."""
        eos = self.eos_token if self.eos_token is not None else eos_token
        bos = self.bos_token if self.bos_token is not None else bos_token
        if "{eos_token}" in self.ollama + "".join(self.eot_tokens) and not eos:
            raise UserError(
                f"template family {self.name!r} ends answers with the tokenizer's eos token, but it has none"
            )

        def fill(s: str) -> str:
            return s.replace("{eos_token}", eos or "")

        return dataclasses.replace(
            self,
            bos_token=bos,
            eos_token=eos,
            ollama=fill(self.ollama),
            eot_tokens=[fill(t) for t in self.eot_tokens],
            stop=[fill(t) for t in self.stop],
        )


_REQUIRED = ("name", "description", "jinja", "ollama", "stop", "eot_tokens", "format")
_OPTIONAL = {"default_system": None, "bos_token": None, "eos_token": None, "tools": False}


def _family_files() -> dict[str, Any]:
    root = importlib.resources.files(FAMILIES_PACKAGE)
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_templates() -> list[str]:
    """Names of all known families, sorted."""
    return sorted(_family_files())


def _parse(name: str, text: str, where: str) -> ChatTemplate:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping at the top level")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"{where}: missing keys {', '.join(missing)}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)}")
    if data["name"] != name:
        raise UserError(f"{where}: name {data['name']!r} does not match the file name {name!r}")
    values = {**_OPTIONAL, **data}
    values["stop"] = [str(s) for s in values["stop"]]
    values["eot_tokens"] = [str(s) for s in values["eot_tokens"]]
    return ChatTemplate(**values)


def load_template(name: str) -> ChatTemplate:
    """The family `name`; a UserError with a did-you-mean (families and LLaMA-Factory names) when there is none."""
    from exporter import lf_templates
    from exporter.config import did_you_mean

    files = _family_files()
    if name not in files:
        lf_names = lf_templates.names()
        raise UserError(
            f"unknown chat template {name!r}{did_you_mean(name, [*files, *lf_names])}; families: "
            f"{', '.join(sorted(files))}; LLaMA-Factory names: {', '.join(lf_names)}"
        )
    return _parse(name, files[name].read_text(encoding="utf-8"), f"template family {name}")


def _token_ids(out_dir: Path, tokens: list[str]) -> list[int | None]:
    """Ids of `tokens` in the tokenizer saved in `out_dir` (None where the vocabulary lacks one)."""
    tj = out_dir / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(tj))
        return [tk.token_to_id(t) for t in tokens]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    ids = tok.convert_tokens_to_ids(tokens)
    return [None if i is None or i == tok.unk_token_id else int(i) for i in ids]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from exporter.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fix_saved_tokenizer(out_dir: Path, fix: Callable[[Any], None]) -> dict[str, Any] | None:
    """Apply `fix` to the tokenizer saved in `out_dir`; save it back (and return its new config) when it changed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    before = (tok.eos_token, tok.pad_token, len(tok), tuple(tok.all_special_tokens))
    fix(tok)
    if before == (tok.eos_token, tok.pad_token, len(tok), tuple(tok.all_special_tokens)):
        return None
    tok.save_pretrained(str(out_dir))
    stale = out_dir / "special_tokens_map.json"  # not rewritten by transformers 5, and it wins on load
    if stale.is_file():
        data = read_json(stale)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, key)
            if key in data or value is not None:
                data[key] = {**data[key], "content": value} if isinstance(data.get(key), dict) else value
        _write_json(stale, data)
    return read_json(out_dir / "tokenizer_config.json")


def write_into(out_dir: Path | str, tpl: ChatTemplate, strict: bool = True) -> list[str]:
    """Make an exported HF dir use `tpl`: `tokenizer_config.json` + `chat_template.jinja` carry its Jinja (left
    untouched when they already hold it), and `generation_config.json` `eos_token_id` includes every end-of-turn
    token id (ids from the tokenizer in out_dir). An end-of-turn token the tokenizer lacks is a UserError when
    `strict`, else left out and returned as a warning (a template nobody asked for never stops an export)."""
    from exporter.atomic import atomic_file

    out_dir = Path(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{out_dir}: no tokenizer_config.json; save the tokenizer there before writing the template")
    cfg = read_json(cfg_path)
    if tpl.tokenizer_fix is not None:
        cfg = _fix_saved_tokenizer(out_dir, tpl.tokenizer_fix) or cfg
    tpl = tpl.for_tokenizer(_token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))
    try:
        current = model_chat_template(out_dir)[0]
    except UserError:
        current = None
    ids, warnings = [], []
    for token, tid in zip(tpl.eot_tokens, _token_ids(out_dir, tpl.eot_tokens), strict=True):
        if tid is None:
            msg = f"template {tpl.name!r} ends assistant turns with {token!r}, but the tokenizer in {out_dir} has no "
            if strict:
                raise UserError(msg + "such token; pick the family that matches this tokenizer with --template")
            warnings.append(msg + "such token; it is not added to generation_config.json eos_token_id")
            continue
        ids.append(tid)

    if tpl.jinja and tpl.jinja != current:  # the model's own template stays byte for byte as it was saved
        cfg["chat_template"] = tpl.jinja
        _write_json(cfg_path, cfg)
        with atomic_file(out_dir / "chat_template.jinja") as tmp:
            tmp.write_text(tpl.jinja, encoding="utf-8")

    gen_path = out_dir / "generation_config.json"
    gen = read_json(gen_path, optional=True)
    eos = gen.get("eos_token_id")
    current = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    merged = current + [i for i in ids if i not in current]
    if merged:
        gen["eos_token_id"] = merged[0] if len(merged) == 1 else merged
        _write_json(gen_path, gen)
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# Training renderer: conversation -> [(text, trained)] segments, driven by the family's `format` block.
# It is a second implementation of each family (the Jinja and the Go TEMPLATE are the others); tests hold all
# three byte-identical.
# ---------------------------------------------------------------------------------------------------------------

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
    if not messages:
        raise UserError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"message {i}: expected an object with 'role' and 'content'")
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


# ---------------------------------------------------------------------------------------------------------------
# Detection by content: render probe conversations through the model's own chat_template and through each family.
# ---------------------------------------------------------------------------------------------------------------

PROBES: list[tuple[list[dict[str, Any]], bool]] = [
    ([{"role": "user", "content": "Hello there"}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}], True),
    (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        True,
    ),
    ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], False),
    # what verify compares too: whitespace kept or trimmed, unicode, empty content, multi-line answers
    ([{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": " spaced answer "}], False),
    (
        [
            {"role": "system", "content": "Réponds en français. 用中文也可以。"},
            {"role": "user", "content": "¿Qué tal? 你好 🙂 — “quotes”"},
            {"role": "assistant", "content": "Très bien, 谢谢！🎉\n\nline\n\tindented"},
        ],
        False,
    ),
    (
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "Say it."}],
        True,
    ),
]


_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
_CALL = {"id": "call0A1b2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_PROBE = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [_CALL]},
    {"role": "tool", "tool_call_id": "call0A1b2", "name": "get_weather", "content": "21 C, sunny"},
    {"role": "assistant", "content": "It is 21 C and sunny."},
]  # fmt: skip


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return "" if value is None else str(value)


def model_chat_template(model_dir: Path | str) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) as saved in an HF dir (chat_template.jinja wins, as in transformers)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
    elif not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a directory")
    template = None
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    else:
        ct = cfg.get("chat_template")
        if isinstance(ct, list):
            named = {d.get("name"): d.get("template") for d in ct if isinstance(d, dict)}
            ct = named.get("default")
        template = ct if isinstance(ct, str) else None
    if not template:
        raise UserError(
            f"{model_dir} has no chat_template (tokenizer_config.json or chat_template.jinja); "
            f"pass --template with one of: {', '.join(list_templates())}"
        )
    return template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))


def model_tokens(model_dir: Path | str) -> tuple[list[str], list[str]]:
    """(added tokens of the tokenizer, the tokens of generation_config.json `eos_token_id`) of an HF dir."""
    model_dir = Path(model_dir)
    markers: list[str] = []
    vocab: dict[int, str] = {}
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        data = read_json(tj)
        for t in data.get("added_tokens") or []:
            if isinstance(t, dict) and isinstance(t.get("content"), str):
                markers.append(t["content"])
                vocab[int(t.get("id", -1))] = t["content"]
        model_vocab = (data.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):
            vocab.update({v: k for k, v in model_vocab.items() if isinstance(v, int)})
    cfg = model_dir / "tokenizer_config.json"
    decoder = read_json(cfg).get("added_tokens_decoder") if cfg.is_file() else None
    for tid, t in (decoder or {}).items():
        if isinstance(t, dict) and isinstance(t.get("content"), str):
            markers.append(t["content"])
            vocab.setdefault(int(tid), t["content"])
    gen = model_dir / "generation_config.json"
    ids = read_json(gen).get("eos_token_id") if gen.is_file() else None
    ids = [ids] if isinstance(ids, int) else [i for i in ids or [] if isinstance(i, int)]
    return list(dict.fromkeys(markers)), [vocab[i] for i in ids if i in vocab]


def _render_jinja(
    template: str, messages: list[dict[str, Any]], gen: bool, bos: str, eos: str, tools: list | None = None
) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=gen,
                                   bos_token=bos, eos_token=eos, tools=tools)  # fmt: skip
    return out[0]


def tool_probe(template: str, bos: str, eos: str) -> str | None:
    """The template's rendering of a tool call and its result, or None when it has no tool format."""
    if "tools" not in template:
        return None
    try:
        return _render_jinja(template, TOOL_PROBE, False, bos, eos, [_TOOL])
    except Exception:  # no tool format after all
        return None


def match_family(template: str, bos: str = "", eos: str = "") -> tuple[ChatTemplate | None, str]:
    """(the family whose Jinja renders every probe exactly as `template` does, or None; a line naming the nearest
    family and where it first differs)."""
    import difflib

    refs: list[tuple[int, str]] = []
    for k, (msgs, gen) in enumerate(PROBES):
        try:
            refs.append((k, _render_jinja(template, msgs, gen, bos, eos)))
        except Exception:  # the model's template may refuse a probe (e.g. no system role): compare the others
            continue
    if not refs:
        return None, "its chat_template fails on every probe conversation"
    tool_ref = tool_probe(template, bos, eos)
    best: tuple[float, str, int, str, str] | None = None
    for name in list_templates():
        tpl = load_template(name)
        diff = None
        score = 0.0
        for k, ref in refs:
            msgs, gen = PROBES[k]
            try:
                ours = _render_jinja(tpl.jinja, msgs, gen, bos, eos)
            except Exception:
                ours = ""
            if ours != ref and diff is None:
                diff = (k, ref, ours)
            score += difflib.SequenceMatcher(None, ref, ours, autojunk=False).ratio()
        if tool_ref is not None and diff is None:  # the model's tool format must be the family's too
            ours = tool_probe(tpl.jinja, bos, eos) if tpl.tools else None
            if ours != tool_ref:
                diff = (len(PROBES), tool_ref, ours or "")
        if diff is None:
            return tpl, ""
        if best is None or score > best[0]:
            best = (score, name, *diff)
    assert best is not None
    _, name, k, ref, ours = best
    at = first_diff(ref, ours)
    return None, (
        f"nearest family is {name!r}, which first differs at char {at} of "
        f"{'the tool probe' if k == len(PROBES) else f'probe {k}'}: the model renders "
        f"{ref[at : at + 40]!r}, {name} renders {ours[at : at + 40]!r}"
    )


def detect_template_text(
    template: str,
    bos: str = "",
    eos: str = "",
    markers: list[str] | None = None,
    eos_tokens: list[str] | None = None,
) -> ChatTemplate:
    """The family whose Jinja renders every probe exactly as `template` does, carrying `template` itself as its
    Jinja; else a template derived from `template` (`exporter.derive.chat_template`). Never raises for a template."""
    family, nearest = match_family(template, bos, eos)
    if family is not None:
        note = (f"chat template: the model's own Jinja, which renders every probe exactly like family {family.name!r}; "
                f"Ollama TEMPLATE of family {family.name}")  # fmt: skip
        return dataclasses.replace(family.for_tokenizer(bos or None, eos or None), jinja=template, notes=(note,))
    from exporter.derive import chat_template

    return chat_template(template, bos, eos, markers, eos_tokens or [], nearest)


def detect(model_dir: Path | str) -> ChatTemplate:
    """The template of the chat_template saved in `model_dir`: a family when one matches by rendered content (never
    by name), else derived from it. UserError only when there is no chat_template at all."""
    template, bos, eos = model_chat_template(model_dir)
    markers, eos_tokens = model_tokens(model_dir)
    return detect_template_text(template, bos, eos, markers + [t for t in (bos, eos) if t], eos_tokens)


def no_template(bos: str, eos: str) -> ChatTemplate:
    """What a model without any chat template exports with: no Jinja, no Ollama TEMPLATE, eos as the stop."""
    note = "the model has no chat template: none is exported, and the Modelfile has no TEMPLATE"
    return ChatTemplate(name="none", description="no chat template", jinja="", ollama="", stop=[eos] if eos else [],
                        eot_tokens=[], default_system=None, bos_token=bos or None, eos_token=eos or None,
                        tools=False, format={"kind": "none"}, notes=(note,))  # fmt: skip


def resolve(model_dir: Path | str, override: str | None, need: bool = True) -> ChatTemplate:
    """`override` (a family name; "auto" = none) when given, else `detect(model_dir)`; filled in with the model's
    BOS/EOS text (see `ChatTemplate.for_tokenizer`). Without any chat template in the model: a UserError when
    `need` (training), else `no_template` (merge, quantize and gguf go on)."""
    cfg = read_json(Path(model_dir) / "tokenizer_config.json", optional=True)
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    if override and override != "auto":
        from exporter import lf_names

        if lf_names.is_lf_name(override):
            return lf_names.resolve(model_dir, override)
        return load_template(override).for_tokenizer(bos or None, eos or None)
    try:
        return detect(model_dir)
    except UserError:
        if need:
            raise
        return no_template(bos, eos)


# ---------------------------------------------------------------------------------------------------------------
# CLI helpers (`exporter template ...`): each returns the text to print.
# ---------------------------------------------------------------------------------------------------------------


def read_conversation(path: Path | str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) from a JSON file: a list of messages or {"messages": [...], "tools": [...]}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"conversation file {path} not found")
    data = read_json(path)
    tools = None
    if isinstance(data, dict):
        tools = data.get("tools")
        data = data.get("messages")
    if not isinstance(data, list) or not data:
        raise UserError(f'{path}: expected a non-empty list of messages or {{"messages": [...], "tools": [...]}}')
    if tools is not None and not isinstance(tools, list):
        raise UserError(f"{path}: 'tools' must be a list")
    return data, tools


def render_for_cli(
    family: str,
    conversation: Path | str,
    fmt: str = "train",
    add_generation_prompt: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> list[Segment]:
    """Render a conversation file with one family: `train` (segments with the trained flag), `jinja` (transformers
    apply_chat_template of our Jinja) or `ollama` (real Go text/template; no leading BOS, which Ollama adds at
    tokenization). The generation prompt defaults to on when the conversation does not end with an answer.
    A LLaMA-Factory name renders LF's training text and LF's generated Jinja (`lf_names.render_for_cli`)."""
    from exporter import lf_names

    messages, tools = read_conversation(conversation)
    if lf_names.is_lf_name(family):
        return lf_names.render_for_cli(family, messages, tools, fmt, bos_token, eos_token)
    tpl = load_template(family).for_tokenizer(bos_token, eos_token)
    gen = messages[-1].get("role") != "assistant" if add_generation_prompt is None else add_generation_prompt
    if fmt == "train":
        return render_segments(tpl, messages, tools=tools, add_generation_prompt=gen)
    if fmt == "jinja":
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            out, _ = render_jinja_template(
                conversations=[messages],
                tools=tools,
                chat_template=tpl.jinja,
                add_generation_prompt=gen,
                bos_token=tpl.bos_token or "",
                eos_token=tpl.eos_token or "",
            )
        except Exception as e:
            raise UserError(f"{conversation}: the {family} Jinja template refused it: {e}") from None
        return [(out[0], False)]
    if fmt == "ollama":
        from exporter.gotemplate import ollama_data, render_go

        return [(render_go(tpl.ollama, ollama_data(messages, tools)), False)]
    raise UserError(f"unknown format {fmt!r}; use train, jinja or ollama")


def show_for_cli(family: str, fmt: str = "jinja", bos_token: str | None = None, eos_token: str | None = None) -> str:
    """The family's HF Jinja or Ollama TEMPLATE (with its PARAMETER stop lines and SYSTEM as Modelfile text); for a
    LLaMA-Factory name also its slots (`lf_names.show_for_cli`)."""
    from exporter import lf_names

    if lf_names.is_lf_name(family):
        return lf_names.show_for_cli(family, fmt, bos_token, eos_token)
    tpl = load_template(family)
    if fmt == "jinja":
        return tpl.jinja
    if fmt == "ollama":
        lines = [f'TEMPLATE """{tpl.ollama}"""']
        if tpl.default_system:
            lines.append(f'SYSTEM """{tpl.default_system}"""')
        lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in tpl.stop]
        return "\n".join(lines)
    raise UserError(f"unknown format {fmt!r}; use jinja or ollama")
