"""The Go text/template renderer feeds templates what Ollama feeds them, and renders with real Go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import require_go

from exporter import gotemplate
from exporter.errors import UserError
from exporter.gotemplate import GoUnavailable, go_binary, ollama_data, render_go, render_go_many

MSGS = "{{ range .Messages }}[{{ .Role }}|{{ .Content }}]{{ end }}"


@pytest.fixture(autouse=True)
def _go() -> None:
    require_go()


def test_messages_system_and_collate() -> None:
    msgs = [
        {"role": "system", "content": "S1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "tool", "content": "t1"},
        {"role": "tool", "content": "t2"},
    ]
    out = render_go("{{ .System }}#" + MSGS, ollama_data(msgs))
    # Ollama merges consecutive same-role messages (not tool results) with a blank line; .System joins systems
    assert out == "S1\n\nS2#[system|S1\n\nS2][user|a\n\nb][assistant|c][tool|t1][tool|t2]"


def test_modelfile_system_is_prepended_only_without_a_system_message() -> None:
    user = [{"role": "user", "content": "hi"}]
    assert render_go(MSGS, ollama_data(user, system="D")) == "[system|D][user|hi]"
    own = [{"role": "system", "content": "mine"}, *user]
    assert render_go(MSGS, ollama_data(own, system="D")) == "[system|mine][user|hi]"


def test_unicode_and_template_text_pass_through() -> None:
    text = "你好 {{ .System }} <|im_end|> & < > \n\n🎉"
    assert render_go(MSGS, ollama_data([{"role": "user", "content": text}])) == f"[user|{text}]"


def test_tool_calls_and_tools_print_as_ollama_does() -> None:
    args = {"z": 1, "a": [1, {"k": "v", "b": None}], "u": "北京", "f": 1.5}
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "x1", "function": {"name": "f", "arguments": args}}]},
        {"role": "tool", "content": "r", "tool_call_id": "x1", "name": "f"},
    ]
    params = {"type": "object", "properties": {}}
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": params}}]
    tpl = (
        "{{ range .Messages }}{{ range $i, $c := .ToolCalls }}{{ $i }}:{{ .ID }}:{{ .Function.Name }}:"
        '{{ .Function.Arguments }}{{ end }}{{ if eq .Role "tool" }}<{{ .ToolCallID }}|{{ .ToolName }}>{{ end }}'
        "{{ end }}|{{ range .Tools }}{{ . }}{{ end }}|{{ json .Tools }}|{{ range .Tools }}{{ .Function.Name }}{{ end }}"
    )
    out = render_go(tpl, ollama_data(msgs, tools))
    # compact JSON with sorted keys (Ollama hands templates the arguments as a map, #13636), non-ASCII kept
    compact_args = json.dumps(args, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    compact_tools = json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
    assert out == f"0:x1:f:{compact_args}<x1|f>|{compact_tools[1:-1]}|{compact_tools}|f"
    # arguments given as a JSON string (OpenAI style) are parsed like Ollama's API does
    msgs[1]["tool_calls"][0]["function"]["arguments"] = json.dumps(args)
    assert render_go(tpl, ollama_data(msgs, tools)) == out


# A tool as callers write it (OpenAI style: `properties` before `required`, parameter names unsorted, keys Ollama
# does not know: `strict`, `default`, `additionalProperties`, `minLength`) and what Ollama's TEMPLATE sees, written by
# hand from Ollama's api/types.go (Tool, ToolFunction, ToolFunctionParameters, ToolProperty, PropertyType,
# ToolPropertiesMap) and template/template.go (templateTool, templateToolFunction, templateToolFunctionParameters,
# templateProperties): struct field order (type, items; name, description; type, $defs, items, required,
# properties; a property's anyOf, type, items, description, enum, properties, required), omitempty fields left out
# (but the template copy's `description` always printed), unknown keys dropped, the parameters' names sorted (a Go
# map), a nested property's names in the caller's order (an ordered map), a one-element type list as a string,
# free-form `items` as a decoded map (sorted keys), HTML characters escaped.
CALLER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now>",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "unit": {"enum": ["c", "f"], "description": "unit", "type": "string", "default": "c"},
                    "city": {"description": "City", "type": ["string", "null"]},
                    "opts": {"required": ["z"], "type": "object", "properties": {"z": {"type": "integer"}, "a": {}}},
                    "tags": {"type": ["array"], "items": {"type": "string", "minLength": 1}},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]
OLLAMA_PARAMS = (
    '{"type":"object","required":["city"],"properties":{'
    '"city":{"type":["string","null"],"description":"City"},'
    '"opts":{"type":"object","properties":{"z":{"type":"integer"},"a":{}},"required":["z"]},'
    '"tags":{"type":"array","items":{"minLength":1,"type":"string"}},'
    '"unit":{"type":"string","description":"unit","enum":["c","f"]}}}'
)
OLLAMA_WEATHER = (
    '{"type":"function","function":{"name":"get_weather","description":"Weather \\u003cnow\\u003e",'
    f'"parameters":{OLLAMA_PARAMS}}}}}'
)
OLLAMA_PING_PARAMS = '{"type":"","properties":null}'
OLLAMA_PING = f'{{"type":"function","function":{{"name":"ping","description":"","parameters":{OLLAMA_PING_PARAMS}}}}}'


def test_tools_print_in_ollamas_struct_order() -> None:
    """.Tools, each tool, `json` of them and a function's parameters print what Ollama's structs print."""
    tpl = (
        "{{ .Tools }}|{{ json .Tools }}|{{ range .Tools }}{{ . }};{{ end }}|"
        "{{ range .Tools }}{{ json .Function.Parameters }};{{ end }}|"
        "{{ range .Tools }}{{ range $k, $v := .Function.Parameters.Properties }}{{ $k }}={{ $v.Type }},{{ end }};"
        "{{ end }}"
    )
    out = render_go(tpl, ollama_data([{"role": "user", "content": "q"}], CALLER_TOOLS))
    listed = f"[{OLLAMA_WEATHER},{OLLAMA_PING}]"
    each = f"{OLLAMA_WEATHER};{OLLAMA_PING};"
    names = "city=[string null],opts=object,tags=array,unit=string,;;"
    assert out == f"{listed}|{listed}|{each}|{OLLAMA_PARAMS};{OLLAMA_PING_PARAMS};|{names}"


def test_tool_call_arguments_range_like_ollama() -> None:
    """Templates range over a call's arguments (a map in Ollama's templates: sorted keys, values as decoded JSON)."""
    call = {"function": {"name": "f", "arguments": {"z": "s", "a": 2, "m": [1, "x"]}}}
    tpl = (
        "{{ range .Messages }}{{ range .ToolCalls }}{{ range $k, $v := .Function.Arguments }}{{ $k }}="
        '{{ if eq (printf "%T" $v) "string" }}{{ $v }}{{ else }}{{ json $v }}{{ end }};{{ end }}{{ end }}{{ end }}'
    )
    out = render_go(tpl, ollama_data([{"role": "assistant", "content": "", "tool_calls": [call]}]))
    assert out == 'a=2;m=[1,"x"];z=s;'


def test_go_json_escapes_html_like_ollama() -> None:
    msgs = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"s": "<&>"}}}]}]
    tpl = "{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Arguments }}{{ end }}{{ end }}"
    out = render_go(tpl, ollama_data(msgs))
    assert out == '{"s":"\\u003c\\u0026\\u003e"}'


def test_tools_absent_is_false_and_think_flags() -> None:
    tpl = "{{ if .Tools }}T{{ else }}noT{{ end }}|{{ .Think }}|{{ .IsThinkSet }}"
    user = [{"role": "user", "content": "x"}]
    assert render_go(tpl, ollama_data(user)) == "noT|false|false"
    assert render_go(tpl, ollama_data(user, [], think=False)) == "noT|false|true"
    assert render_go(tpl, ollama_data(user, think=True)) == "noT|true|true"


def test_thinking_field() -> None:
    msgs = [{"role": "assistant", "content": "<think>\nhmm\n</think>\n\nok"}]
    tpl = "{{ range .Messages }}{{ .Thinking }}|{{ .Content }}{{ end }}"
    assert render_go(tpl, ollama_data(msgs)) == "|<think>\nhmm\n</think>\n\nok"
    assert render_go(tpl, ollama_data(msgs, split_thinking=True)) == "hmm|ok"
    explicit = [{"role": "assistant", "content": "ok", "reasoning_content": "why"}]
    assert render_go(tpl, ollama_data(explicit)) == "why|ok"


def test_errors_are_user_errors() -> None:
    with pytest.raises(UserError, match="parse"):
        render_go("{{ if }}", ollama_data([{"role": "user", "content": "x"}]))
    with pytest.raises(UserError, match="execute"):
        render_go("{{ index .Messages 5 }}", ollama_data([{"role": "user", "content": "x"}]))
    with pytest.raises(UserError, match="item 1"):
        render_go_many([("ok", {}), ("{{ end }}", {})])
    with pytest.raises(UserError, match="arguments"):
        bad_call = {"function": {"name": "f", "arguments": "{not json"}}
        ollama_data([{"role": "assistant", "tool_calls": [bad_call]}])


def test_batch_equals_single() -> None:
    items = [(MSGS, ollama_data([{"role": "user", "content": f"m{k}"}])) for k in range(5)]
    assert render_go_many(items) == [render_go(t, d) for t, d in items]


def test_binary_cached_by_source_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_CACHE", str(tmp_path))
    exe = go_binary()
    assert exe.is_file() and tmp_path in exe.parents
    mtime = exe.stat().st_mtime_ns
    assert go_binary() == exe and exe.stat().st_mtime_ns == mtime  # built once
    # no Go toolchain and nothing cached: a clear error (tests elsewhere skip on it)
    monkeypatch.setenv("EXPORTER_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(GoUnavailable, match="Go toolchain"):
        go_binary()


def test_source_ships_as_package_data() -> None:
    assert b"text/template" in gotemplate._source()
