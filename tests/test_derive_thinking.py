"""Jinjas that drop earlier answers' reasoning (QwQ, Qwen3.5, DeepSeek-R1 distills): the derived TEMPLATE is
thinking-aware for Ollama (thinking.InferTags finds its tags), renders the Jinja's text for an earlier answer with
reasoning in real Go (fed as Ollama feeds it), and the remaining difference is stated."""

from __future__ import annotations

import pytest
from conftest import require_go

from exporter import derive, gotemplate
from exporter.templates import detect_template_text, load_template

R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _jinja(name: str) -> str:
    from test_derive import _published

    return _published()[name]


def test_thinking_tags_as_ollama_infers_them() -> None:
    assert gotemplate.thinking_tags(load_template("qwen-3").ollama) == ("<think>", "</think>")
    assert gotemplate.thinking_tags(load_template("qwen-2.5").ollama) == ("", "")
    # InferTags reads a field of the message (`.Thinking`), not a variable's (`$m.Thinking`)
    assert gotemplate.thinking_tags("{{ range $m := .Messages }}<t>{{ $m.Thinking }}</t>{{ end }}") == ("", "")


def test_earlier_reasoning_is_a_checked_shape() -> None:
    msgs = derive.SHAPES["earlier reasoning"]
    assert msgs[1]["role"] == "assistant" and "</think>" in msgs[1]["content"] and msgs[-1]["role"] == "user"


@pytest.mark.parametrize(
    ("name", "bos", "eos", "same"),
    [
        ("Qwen-QwQ-32B", "", "<|im_end|>", True),
        ("Qwen3.5-4B", "", "<|im_end|>", True),
        ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", R1_BOS, R1_EOS, False),  # the Jinja keeps "\n\n" after </think>
    ],
)
def test_jinja_dropping_reasoning_gets_a_thinking_aware_template(name: str, bos: str, eos: str, same: bool) -> None:
    require_go()
    jinja = _jinja(name)
    tpl = detect_template_text(jinja, bos, eos)
    assert tpl.format["go"] == "derived"
    assert gotemplate.thinking_tags(tpl.ollama) == ("<think>", "</think>")  # Ollama: thinking-capable
    assert ("earlier reasoning" in tpl.format["same"]) == same, tpl.notes
    if not same:
        assert any(n.startswith("differs on earlier reasoning") for n in tpl.notes)
    assert any(n.startswith("earlier answers' reasoning: the Jinja drops it") for n in tpl.notes)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nR.\n</think>\n\nHello!"},
            {"role": "user", "content": "And?"}]  # fmt: skip
    want = derive.render_reference(jinja, msgs, True, bos, eos).removeprefix(bos)
    got = gotemplate.render_go(tpl.ollama, gotemplate.ollama_data(msgs, split_thinking=True))  # think: true
    assert "R." not in got and "Hello!" in got
    if same:
        assert got == want
