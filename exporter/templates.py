"""TEMPORARY stand-in for the templates branch (contract in the common brief), so train can be developed.

Only ChatML ("qwen") and "llama3". When the templates branch lands on main, take ITS version of this file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from exporter.config import did_you_mean
from exporter.errors import UserError

_CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    ollama: str
    stop: list[str]
    eot_tokens: list[str]
    default_system: str | None = None


_T = {
    "qwen": ChatTemplate("qwen", _CHATML_JINJA, "", ["<|im_end|>"], ["<|im_end|>"]),
    "llama3": ChatTemplate("llama3", _LLAMA3_JINJA, "", ["<|eot_id|>"], ["<|eot_id|>"]),
}


def list_templates() -> list[str]:
    return sorted(_T)


def load_template(name: str) -> ChatTemplate:
    if name not in _T:
        raise UserError(f"unknown template {name!r}{did_you_mean(name, _T)}")
    return _T[name]


def detect(model_dir: Path) -> ChatTemplate:
    cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    jinja = cfg.get("chat_template") or ""
    for t in _T.values():
        if t.jinja == jinja:
            return t
    raise UserError(f"{model_dir}: chat template matches no known family; pass template")


def resolve(model_dir: Path, override: str | None) -> ChatTemplate:
    return load_template(override) if override else detect(model_dir)


def _segments(tpl: ChatTemplate, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    segs: list[tuple[str, bool]] = []
    for m in messages:
        if tpl.name == "qwen":
            head, eot, tail = f"<|im_start|>{m['role']}\n", "<|im_end|>", "\n"
        else:
            head, eot, tail = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", "<|eot_id|>", ""
        if m["role"] == "assistant":
            segs += [(head, False), (m["content"] + eot, True), (tail, False)]
        else:
            segs += [(head + m["content"] + eot + tail, False)]
    return segs


def encode(tokenizer, tpl, messages, tools=None, train_on_prompt=False, cutoff_len=None):
    ids: list[int] = []
    labels: list[int] = []
    if tpl.name == "llama3":
        ids, labels = [tokenizer.bos_token_id], [-100]
    for text, train in _segments(tpl, messages):
        if not text:
            continue
        part = tokenizer.encode(text, add_special_tokens=False)
        ids += part
        labels += part if (train or train_on_prompt) else [-100] * len(part)
    if cutoff_len:
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    return ids, labels


def write_into(out_dir: Path, tpl: ChatTemplate) -> None:
    out_dir = Path(out_dir)
    p = out_dir / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["chat_template"] = tpl.jinja
    p.write_text(json.dumps(cfg, indent=2))
    (out_dir / "chat_template.jinja").write_text(tpl.jinja)
