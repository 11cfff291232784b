"""Chat-template families as data: one YAML file per family drives training, HF Jinja, GGUF and Ollama.

Each `templates/<family>.yaml` (installed as package `exporter.families`) defines the HF Jinja `chat_template`, the
Ollama Go `TEMPLATE`, `PARAMETER stop` strings, the end-of-turn tokens, the default system prompt, the BOS/EOS text
the Jinja renders, and a `format` block that drives the training renderer (`render_segments` / `encode`).

BOS: HF Jinja templates of llama2/llama3/mistral/gemma render `bos_token` as text; Ollama and llama.cpp add BOS at
tokenization instead, so the Go TEMPLATE never renders the leading BOS. The training renderer follows the Jinja
(BOS as text, tokenized with `add_special_tokens=False`), so the ids carry exactly one BOS.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from pathlib import Path
from typing import Any

import yaml

from exporter.errors import UserError

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
    """The family `name`; a UserError with a did-you-mean when there is no such family."""
    from exporter.config import did_you_mean

    files = _family_files()
    if name not in files:
        raise UserError(
            f"unknown chat template family {name!r}{did_you_mean(name, files)}; known: {', '.join(sorted(files))}"
        )
    return _parse(name, files[name].read_text(encoding="utf-8"), f"template family {name}")


def _token_id(out_dir: Path, token: str) -> int | None:
    tj = out_dir / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tj)).token_to_id(token)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    ids = tok.convert_tokens_to_ids([token])
    return None if ids[0] is None or ids[0] == tok.unk_token_id else int(ids[0])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from exporter.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_into(out_dir: Path | str, tpl: ChatTemplate) -> None:
    """Make an exported HF dir use `tpl`: `tokenizer_config.json` + `chat_template.jinja` carry its Jinja, and
    `generation_config.json` `eos_token_id` includes every end-of-turn token id (ids from the tokenizer in out_dir).
    """
    from exporter.atomic import atomic_file

    out_dir = Path(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{out_dir}: no tokenizer_config.json; save the tokenizer there before writing the template")
    ids = []
    for token in tpl.eot_tokens:
        tid = _token_id(out_dir, token)
        if tid is None:
            raise UserError(
                f"template {tpl.name!r} ends assistant turns with {token!r}, but the tokenizer in {out_dir} has no "
                f"such token; pick the family that matches this tokenizer with --template"
            )
        ids.append(tid)

    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = tpl.jinja
    _write_json(cfg_path, cfg)
    with atomic_file(out_dir / "chat_template.jinja") as tmp:
        tmp.write_text(tpl.jinja, encoding="utf-8")

    gen_path = out_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id")
    current = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    merged = current + [i for i in ids if i not in current]
    gen["eos_token_id"] = merged[0] if len(merged) == 1 else merged
    _write_json(gen_path, gen)
