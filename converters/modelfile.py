"""Ollama Modelfile writer, plus a reader implementing Ollama's Modelfile parsing rules to check what we write.

Ollama's parser (ollama/ollama parser/parser.go) reads a command value until a newline at which the value so far,
whitespace-trimmed, is complete: `\"\"\"...\"\"\"`, `"..."`, or unquoted. There are no escapes, so a value cannot
contain its own closing quote at the end of a line, and non-printable characters other than tab/newline are
dropped. We pick a quoting that survives these rules and refuse values that cannot be written.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exporter.config import read_json_object
from exporter.errors import UserError

COMMANDS = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)


def is_print(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama reads them; PARAMETER commands come back as ("parameter NAME", value)."""
    out: list[tuple[str, str]] = []
    state, buf, name, line = "nil", "", "", 1
    ws, nl = (" ", "\t"), ("\r", "\n")
    for ch in text.lstrip("\ufeff"):
        if ch in nl:
            line += 1
        r: str | None = ch  # the state machine swallows some characters (None)
        if state == "nil":
            nxt, r = ("comment", None) if ch == "#" else ("nil", None) if ch in ws or ch in nl else ("name", ch)
        elif state == "name":
            if not (ch.isascii() and ch.isalpha()) and ch not in ws:
                raise ValueError(f"line {line}: invalid command")
            nxt, r = ("name", ch) if ch not in ws else ("value", None)
        elif state == "param":
            if not ((ch.isascii() and ch.isalnum()) or ch == "_") and ch not in ws:
                raise ValueError(f"line {line}: bad parameter name")
            nxt, r = ("param", ch) if ch not in ws else ("value", None)
        elif state == "value":
            nxt = "nil" if ch in ws or ch in nl else "value"
        else:  # comment
            nxt, r = ("nil" if ch in nl else "comment"), None
        if nxt != state:
            if state == "name":
                cmd = buf.lower()
                if cmd not in COMMANDS:
                    raise ValueError(f"line {line}: unknown command {buf!r}")
                if cmd == "parameter":
                    nxt = "param"
                name = "model" if cmd == "from" else cmd
            elif state == "param":
                name = f"parameter {buf}"
            elif state == "value":
                value, ok = _unquote(buf.strip())
                if not ok or ch in ws:
                    buf += ch
                    continue
                out.append((name, value))
            buf, state = "", nxt
        if r is not None and is_print(r):
            buf += r
    if state == "value":
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ValueError("unterminated quoted value at end of file")
        out.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    if not any(c == "model" for c, _ in out):
        raise ValueError("no FROM line")
    return out


def unprintable(value: str) -> str | None:
    """The first character of `value` Ollama's Modelfile parser drops, as `U+00A0 (NO-BREAK SPACE) at offset 12`;
    None when there is none."""
    for i, c in enumerate(value):
        if not is_print(c) and c not in "\t\n\r":
            return f"U+{ord(c):04X} ({unicodedata.name(c, 'unnamed')}) at offset {i}"
    return None


def quote(value: str, what: str, always: bool = False) -> str:
    """`value` quoted so Ollama's parser returns it unchanged (`always`: quoted even when plain would do)."""
    bad = unprintable(value)
    if bad is not None:
        raise UserError(f"{what} contains {bad}, a non-printable character that Ollama's Modelfile parser drops")
    candidates = (
        [f'"""{value}"""', f'"{value}"']
        if ('"' in value or "\n" in value or value != value.strip())
        else [
            value,
            f'"{value}"',
        ]
    )
    if always:
        candidates = [f'"{value}"', f'"""{value}"""']
    for cand in candidates:
        try:
            got = parse(f"FROM x\nSYSTEM {cand}\n")
        except ValueError:
            continue
        if got == [("model", "x"), ("system", value)]:
            return cand
    raise UserError(f"{what} cannot be written in an Ollama Modelfile: it ends a line with the closing quote")


# generation_config.json key -> (Ollama PARAMETER, transformers' value when the key is unset (None: no line), integer)
_SAMPLING = {
    "temperature": ("temperature", 1.0, False),
    "top_k": ("top_k", 50, True),
    "top_p": ("top_p", 1.0, False),
    "min_p": ("min_p", None, False),
    "repetition_penalty": ("repeat_penalty", 1.0, False),
}


def sampling_parameters(model_dir: Path | None) -> tuple[list[tuple[str, str]], str | None]:
    """(PARAMETER name, value) of the sampling `transformers.generate` does with the model's generation_config.json,
    and a comment line saying why there are none where it has sampling keys that do not apply.

    Only with `do_sample: true`: then every knob transformers applies, the unset ones at transformers' defaults
    (temperature 1, top_k 50, top_p 1, repetition_penalty 1; min_p only when set), since Ollama's own defaults
    (0.8, 40, 0.9, repeat_penalty 1.1) differ from them; Ollama's library Modelfiles carry these lines (qwen3:
    temperature 0.6, top_k 20, top_p 0.95, repeat_penalty 1). Without it transformers decodes greedily; Ollama's
    only match is temperature 0, which makes every chat deterministic, not what Ollama's users expect of a chat
    model, so no line is written and Ollama's defaults apply (the comment says so). A value that is not a number is
    a UserError naming the file and key, with or without do_sample."""
    path = (model_dir / "generation_config.json") if model_dir is not None else None
    gen = read_json_object(path, optional=True) if path is not None else {}
    values: dict[str, float] = {}
    for key, (name, default, integer) in _SAMPLING.items():
        value = gen.get(key)
        if value is None:
            value = default
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            # checked with or without do_sample: the GGUF's general.sampling.* (gguf-py's Metadata) carry them too
            raise UserError(f"{path}: {key} is {value!r}; expected a non-negative number")
        elif integer and value != int(value):
            raise UserError(f"{path}: {key} is {value!r}; expected a whole number")
        if value is not None:
            values[name] = int(value) if integer else value
    if gen.get("do_sample") is not True:
        present = [k for k in _SAMPLING if gen.get(k) is not None]
        why = "do_sample is not true: transformers decodes greedily, and Ollama samples with its own defaults"
        return [], (f"generation_config.json sets {', '.join(present)} but {why}" if present else None)
    return [(name, repr(value)) for name, value in values.items()], None


@dataclass(frozen=True)
class ModelfileSpec:
    """What goes into one Modelfile."""

    from_: str
    template: str | None
    stops: Sequence[str]
    system: str | None = None
    adapter: str | None = None
    header: Sequence[str] = ()
    parameters: Sequence[tuple[str, str]] = ()  # PARAMETER lines other than stop (`sampling_parameters`)


def render(spec: ModelfileSpec) -> str:
    """Modelfile text; round-trips through `parse` (checked)."""
    lines = [f"# {h}" if h else "#" for h in spec.header]
    lines.append(f"FROM {quote(spec.from_, 'FROM path')}")
    if spec.adapter:
        lines.append(f"ADAPTER {quote(spec.adapter, 'ADAPTER path')}")
    if spec.template is not None:
        lines.append(f"TEMPLATE {quote(spec.template, 'TEMPLATE')}")
    for stop in spec.stops:
        lines.append(f"PARAMETER stop {quote(stop, f'stop {stop!r}', always=True)}")
    for name, value in spec.parameters:
        lines.append(f"PARAMETER {name} {quote(value, f'PARAMETER {name}')}")
    if spec.system:
        lines.append(f"SYSTEM {quote(spec.system, 'SYSTEM', always=True)}")
    text = "\n".join(lines) + "\n"
    expected = [("model", spec.from_)]
    if spec.adapter:
        expected.append(("adapter", spec.adapter))
    if spec.template is not None:
        expected.append(("template", spec.template))
    expected += [("parameter stop", s) for s in spec.stops]
    expected += [(f"parameter {name}", value) for name, value in spec.parameters]
    if spec.system:
        expected.append(("system", spec.system))
    if parse(text) != expected:
        raise UserError("the Modelfile would not read back as written under Ollama's parsing rules")
    return text
