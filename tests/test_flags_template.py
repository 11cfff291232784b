"""`exporter template render`'s --generation-prompt / --no-generation-prompt: refused where nothing can honour the
flag (a LLaMA-Factory name writes the assistant's header as part of the user turn, in its training text and in its
generated Jinja, which has no `add_generation_prompt` switch; Ollama's Go template has no such input either),
instead of printing the same text as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import UserError
from exporter.templates import render_for_cli

ASKS = [{"role": "user", "content": "hi"}]
ANSWERED = [*ASKS, {"role": "assistant", "content": "yo"}]


def _text(family: str, conv: Path, fmt: str, gen: bool | None) -> str:
    return "".join(part for part, _ in render_for_cli(family, conv, fmt, gen))


@pytest.mark.parametrize(
    ("family", "fmt", "messages", "gen"),
    [
        ("qwen", "jinja", ASKS, False),  # LF name: its generated Jinja
        ("qwen", "train", ASKS, False),  # LF name: its training text
        ("llama3", "ollama", ANSWERED, True),
        ("qwen-2.5", "ollama", ASKS, False),  # official family, Go template
        ("qwen-2.5", "ollama", ANSWERED, True),
    ],
)
def test_a_generation_prompt_flag_nothing_can_honour_is_refused(tmp_path: Path, family, fmt, messages, gen) -> None:
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps(messages), encoding="utf-8")
    flag = "--generation-prompt" if gen else "--no-generation-prompt"
    with pytest.raises(UserError, match=f"^{flag} with {family} --format {fmt}: .*drop it$"):
        render_for_cli(family, conv, fmt, gen)
    # the same flag where it agrees with what the template writes anyway is fine, and so is no flag
    assert _text(family, conv, fmt, not gen) == _text(family, conv, fmt, None) != ""


@pytest.mark.parametrize(
    ("verb", "family", "fmt", "flags", "match"),
    [
        ("render", "llama-2", "train", {"eos_token": "XYZ"}, r"--eos-token with llama-2: the family writes its own"),
        ("render", "llama-3.1", "jinja", {"bos_token": "B"}, r"--bos-token with llama-3\.1: the family writes its own"),
        ("render", "qwen-2.5", "jinja", {"bos_token": "B"}, r"--bos-token with qwen-2\.5: the family writes no bos"),
        ("render", "human-assistant", "ollama", {"bos_token": "<B>", "eos_token": "<E>"}, r"--bos-token with --format "
         "ollama: Ollama's TEMPLATE has no BOS"),
        ("show", "llama-3.1", "jinja", {"eos_token": "x"}, r"--bos-token / --eos-token with llama-3\.1 --format jinja"),
        ("show", "human-assistant", "jinja", {"eos_token": "x"}, r"--bos-token / --eos-token with human-assistant"),
        ("show", "qwen-2.5", "ollama", {"eos_token": "<E>"}, r"--eos-token with qwen-2\.5: the family writes its own"),
        ("show", "vicuna-1.1", "ollama", {"bos_token": "<s>"}, r"--bos-token with --format ollama"),
    ],
)  # fmt: skip
def test_a_bos_or_eos_flag_the_family_does_not_use_is_refused(tmp_path: Path, verb, family, fmt, flags, match) -> None:
    """--bos-token / --eos-token change only what a family takes from the tokenizer (human-assistant, stanford-alpaca,
    vicuna-1.1); given to any other family, or where the output holds no such token, they printed the same text."""
    from exporter.templates import show_for_cli

    conv = tmp_path / "c.json"
    conv.write_text(json.dumps(ANSWERED), encoding="utf-8")
    with pytest.raises(UserError, match=match):
        if verb == "render":
            render_for_cli(family, conv, fmt, None, flags.get("bos_token"), flags.get("eos_token"))
        else:
            show_for_cli(family, fmt, flags.get("bos_token"), flags.get("eos_token"))
    # where the family does take them, they are filled in
    taker = "".join(p for p, _ in render_for_cli("human-assistant", conv, "jinja", None, "<B>", "<E>"))
    assert taker.startswith("<B>") and "yo<E>" in taker, taker
