"""Characters Ollama's Modelfile parser drops in a Jinja literal or default system prompt never block an export;
`template show --format ollama --eos-token` fills in the eos text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_go
from exporter.converters.modelfile import ModelfileSpec, parse, render
from test_derive import with_template

from exporter import derive, gguf, gotemplate
from exporter.errors import UserError
from exporter.templates import detect_template_text

NBSP, ZWSP = "\u00a0", "\u200b"
# ChatML with a default system prompt holding U+200B and a U+00A0 in the assistant header literal
JINJA = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are\u200b helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if not (m.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\u00a0\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\u00a0\\n' }}{%- endif %}"
)


def test_go_string_escapes_what_the_modelfile_parser_drops() -> None:
    require_go()
    text = f"a{NBSP}b{ZWSP}c\u2028d\t\x7f😀é"
    lit = derive.go_string(text)
    assert NBSP not in lit and ZWSP not in lit and "\x7f" not in lit and "é" in lit and "😀" in lit
    assert gotemplate.render_go("{{ " + lit + " }}", gotemplate.ollama_data([])) == text  # real Go


def test_go_string_escapes_unprintable_characters_beyond_the_bmp() -> None:
    """Unprintable characters past U+FFFF (language tags, musical format controls) need Go's 8-digit \\U escape: a
    4-digit one would read the fifth digit as text."""
    require_go()
    text = "a\U000e0001b\U0001d173c"
    lit = derive.go_string(text)
    assert "\U000e0001" not in lit and "\U0001d173" not in lit
    assert gotemplate.render_go("{{ " + lit + " }}", gotemplate.ollama_data([])) == text  # real Go


def test_unprintable_jinja_literal_and_default_system_export(tiny_model, tmp_path: Path) -> None:
    require_go()
    tpl = detect_template_text(JINJA, "", "<|im_end|>", ["<|im_start|>", "<|im_end|>"])
    assert NBSP not in tpl.ollama and ZWSP not in tpl.ollama
    assert tpl.default_system is None, tpl.default_system  # no SYSTEM line: the TEMPLATE prints the default
    assert any("U+200B" in n and "offset 7" in n for n in tpl.notes), tpl.notes
    user, system = {"role": "user", "content": "Hi"}, {"role": "system", "content": "S"}
    for msgs in ([user], [system, user]):
        want = derive.render_reference(JINJA, msgs, True, "", "<|im_end|>")
        assert gotemplate.render_go(tpl.ollama, gotemplate.ollama_data(msgs)) == want
    model = with_template(tiny_model("qwen2"), JINJA, tmp_path / "m")
    out = gguf.run(gguf.GGUFOptions(str(model), ["f16"], str(tmp_path / "g")))
    got = dict(parse(out.modelfiles["f16"].read_text(encoding="utf-8")))
    assert got["template"] == tpl.ollama and "system" not in got


def test_remaining_refusal_names_character_and_offset(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"stop 'a\\xa0b' contains U\+00A0 \(NO-BREAK SPACE\) at offset 1"):
        render(ModelfileSpec(from_="./x.gguf", template=None, stops=[f"a{NBSP}b"]))
    tpl = detect_template_text(JINJA, "", "<|im_end|>", ["<|im_start|>", "<|im_end|>"])
    import dataclasses

    bad = dataclasses.replace(tpl, stop=[f"x{NBSP}"])
    with pytest.raises(UserError, match="U\\+00A0"):
        gguf.check_modelfile(bad)  # gguf.export calls it before converting


def _show(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", "template", "show", *args], capture_output=True, text=True)


def test_show_ollama_fills_in_eos_token() -> None:
    r = _show("stanford-alpaca", "--format", "ollama", "--eos-token", "</s>")
    assert r.returncode == 0 and "{eos_token}" not in r.stdout and 'PARAMETER stop "</s>"' in r.stdout, r.stdout
    r = _show("stanford-alpaca", "--format", "ollama")
    assert r.returncode == 0 and r.stdout.startswith("# {eos_token} stands for the tokenizer's eos text")
    assert "--eos-token" in r.stdout.splitlines()[0]


TOOLS = [{"type": "function", "function": {"name": "cmp", "description": "is a < b && b > c", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "description": "x<y"}}, "required": ["q"]}}}]  # fmt: skip


@pytest.mark.parametrize("family", ["qwen-2.5", "qwen-3", "llama-3.1", "glm-4.6", "granite-3", "mistral-nemo"])
def test_html_escaping_of_go_json_is_stated(family: str) -> None:
    """Real Go: Ollama's `json` writes `<` as \\u003c where the Jinja's tojson writes `<`; the family's notes say so."""
    require_go()
    from exporter.templates import load_template

    tpl = load_template(family)
    go = gotemplate.render_go(tpl.ollama, gotemplate.ollama_data([{"role": "user", "content": "Hi"}], TOOLS))
    assert "\\u003c" in go  # (Mistral Nemo prints the description itself, its parameters as JSON)
    assert any("json.Marshal" in n and "\\u003c" in n for n in tpl.notes), tpl.notes
