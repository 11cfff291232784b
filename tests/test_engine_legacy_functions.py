"""OpenAI's legacy function calling in a conversation (an assistant's `function_call`, then a `function` message
with the result), as older OpenAI clients and llama-cpp-python's server take it: the prompt is the one
transformers renders for the same conversation in today's tool-calling form; misplaced or nameless ones are one
clear error."""

from __future__ import annotations

import json

import pytest

from exporter.engine import EngineError, normalize_messages

LEGACY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": '{"city": "Paris"}'}},
    {"role": "function", "name": "weather", "content": json.dumps({"temp": 21})},
]
MODERN = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "weather", "content": json.dumps({"temp": 21})},
]  # fmt: skip


def test_legacy_function_messages_render_as_tool_calls(tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    want = tok.apply_chat_template(MODERN, tokenize=False, add_generation_prompt=True)
    assert "<tool_response>" in want and "Paris" in want  # the template renders both parts
    got = tok.apply_chat_template(normalize_messages(LEGACY), tokenize=False, add_generation_prompt=True)
    assert got == want


@pytest.mark.parametrize(
    "messages, words",
    [([{"role": "user", "content": "hi"}, {"role": "function", "name": "f", "content": "x"}], "must follow"),
     ([LEGACY[0], LEGACY[1], {"role": "function", "content": "x"}], "needs the function's 'name'")],
)  # fmt: skip
def test_misplaced_function_messages_are_one_error(messages: list, words: str) -> None:
    with pytest.raises(EngineError, match=words):
        normalize_messages(messages)
