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
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
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
