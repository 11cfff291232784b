"""Render Ollama Modelfile TEMPLATEs with real Go `text/template` (the engine Ollama uses).

A small Go program ships as package data (`exporter/gotmpl/main.go`); it is compiled once with the local `go`
toolchain into a cache dir keyed by the source hash, then fed JSON on stdin: the template plus the variables
Ollama's template package passes to a chat template (`.System`, `.Messages`, `.Tools`, `.Prompt`, `.Response`,
`.Think`, `.IsThinkSet`), with Ollama's functions (`json`, `currentDate`, `yesterdayDate`) and `missingkey=zero`.
As in Ollama, the Go side decodes tool definitions into structs shaped like its `api.Tool`: a TEMPLATE prints them
in that struct's field order, with parameter names sorted and unknown keys dropped, whatever order the caller used.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from exporter.errors import UserError


class GoUnavailable(UserError):
    """No Go toolchain on PATH (tests skip on it; CLI users get this one-line error)."""


def _source() -> bytes:
    return importlib.resources.files("exporter").joinpath("gotmpl/main.go").read_bytes()


def _cache_root() -> Path:
    base = os.environ.get("EXPORTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "exporter"
    )
    return Path(base) / "gotmpl"


def go_binary() -> Path:
    """Path of the compiled renderer, building it on first use (cached by source hash)."""
    src = _source()
    key = hashlib.sha256(src).hexdigest()[:16]
    exe = _cache_root() / key / "gotmpl"
    if exe.is_file():
        return exe
    go = shutil.which("go")
    if go is None:
        raise GoUnavailable("the Go toolchain (`go`) is not on PATH; it is needed to render Ollama templates")
    exe.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gotmpl-build-", dir=exe.parent) as tmp:
        (Path(tmp) / "main.go").write_bytes(src)
        (Path(tmp) / "go.mod").write_text("module gotmpl\n\ngo 1.18\n", encoding="utf-8")
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GO111MODULE": "on"}
        env.setdefault("GOCACHE", str(_cache_root() / "gocache"))
        built = Path(tmp) / "gotmpl"
        r = subprocess.run([go, "build", "-o", str(built), "."], cwd=tmp, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"building the Go template renderer failed: {r.stderr.strip()}")
        os.replace(built, exe)
    return exe


def render_go(template: str, data: dict[str, Any], now: str | None = None) -> str:
    """Render Ollama Go `template` with `data` (see `ollama_data`) through real Go text/template; `now`
    (YYYY-MM-DD) fixes what `currentDate` returns (default: today, as in Ollama)."""
    exe = go_binary()
    item = {"template": template, "data": data} | ({"now": now} if now else {})
    payload = json.dumps(item, ensure_ascii=False).encode("utf-8")
    r = subprocess.run([str(exe)], input=payload, capture_output=True)
    if r.returncode != 0:
        raise UserError(f"Go template error: {r.stderr.decode('utf-8', 'replace').strip()}")
    return r.stdout.decode("utf-8")


def _arguments(args: Any, where: str) -> dict[str, Any]:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise UserError(f"{where}: tool-call arguments are not valid JSON: {args[:60]!r}") from None
    if not isinstance(args, dict):
        raise UserError(f"{where}: tool-call arguments must be a JSON object, got {type(args).__name__}")
    return args


_THINKING_ACTION = re.compile(r"\}\}([^{}]*)\{\{-?\s*\.Thinking\s*-?\}\}([^{}]*)\{\{")


def thinking_tags(go: str) -> tuple[str, str]:
    """The (opening, closing) reasoning tags Ollama's thinking.InferTags reads from a TEMPLATE: the plain text
    around a `{{ .Thinking }}` action (a field of the message, in a range over .Messages); ("", "") when there is
    none. Ollama parses reasoning out of answers (think: true) only when both are found."""
    if "range" not in go or ".Messages" not in go:
        return "", ""
    for m in _THINKING_ACTION.finditer(go):
        if m.group(1).strip() and m.group(2).strip():
            return m.group(1).strip(), m.group(2).strip()
    return "", ""


def thinking_aware(go: str) -> bool:
    """Whether Ollama treats a model with this TEMPLATE as thinking-capable (`thinking_tags` finds both tags)."""
    return all(thinking_tags(go))


def ollama_data(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    system: str | None = None,
    think: bool | None = None,
    split_thinking: bool = False,
) -> dict[str, Any]:
    """The variables Ollama's chat endpoint gives a TEMPLATE for `messages` (OpenAI/HF style dicts).

    Mirrors Ollama: a Modelfile `SYSTEM` (`system`) is prepended when the conversation has no system message;
    consecutive messages of the same role (except tool) are merged with a blank line; `.System` joins all system
    messages; `reasoning_content` becomes `.Thinking`; tool-call arguments become an object (printed as compact
    JSON by the template); `think` sets `.Think` and `.IsThinkSet` (HF `enable_thinking`). With
    `split_thinking` (thinking models), an answer's inline `<think>...</think>` moves to `.Thinking` as Ollama's
    thinking parser returns it, and thinking loses its surrounding newlines (as the Qwen3 Jinja strips them).
    """
    msgs = list(messages)
    if system is not None and (not msgs or msgs[0].get("role") != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    out: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        role = str(m.get("role", "")).lower()
        item: dict[str, Any] = {"role": role, "content": m.get("content") or ""}
        thinking = m.get("reasoning_content")
        if split_thinking and role == "assistant" and thinking is None and "</think>" in item["content"]:
            before, _, after = item["content"].partition("</think>")
            thinking = before.rstrip("\n").split("<think>")[-1]
            item["content"] = after.split("</think>")[-1].lstrip("\n")
        if thinking:
            item["thinking"] = thinking.strip("\n") if split_thinking else thinking
        calls = []
        for j, tc in enumerate(m.get("tool_calls") or []):
            fn = tc.get("function", tc)
            args = _arguments(fn.get("arguments"), f"message {i}")
            call: dict[str, Any] = {"function": {"index": j, "name": fn["name"], "arguments": args}}
            if tc.get("id"):
                call["id"] = tc["id"]
            calls.append(call)
        if calls:
            item["tool_calls"] = calls
        if m.get("name") and role == "tool":
            item["tool_name"] = m["name"]
        if m.get("tool_call_id"):
            item["tool_call_id"] = m["tool_call_id"]
        if out and out[-1]["role"] == role and role != "tool":
            out[-1]["content"] += "\n\n" + item["content"]
            continue
        out.append(item)
    return {
        "System": "\n\n".join(m["content"] for m in out if m["role"] == "system"),
        "Messages": out,
        "Tools": list(tools or []),
        "Prompt": "",
        "Response": "",
        "Think": bool(think),
        "IsThinkSet": think is not None,
    }


def render_go_results(items: list[tuple[str, dict[str, Any]]], now: str | None = None) -> list[tuple[str, str]]:
    """Render many (template, data) pairs in one Go process: (output, error text or "") per item."""
    if not items:
        return []
    exe = go_binary()
    extra = {"now": now} if now else {}
    payload = json.dumps([{"template": t, "data": d} | extra for t, d in items], ensure_ascii=False)
    r = subprocess.run([str(exe)], input=payload.encode("utf-8"), capture_output=True)
    if r.returncode != 0:
        raise UserError(f"Go template renderer failed: {r.stderr.decode('utf-8', 'replace').strip()}")
    return [(res["out"], res.get("err") or "") for res in json.loads(r.stdout.decode("utf-8"))]


def render_go_many(items: list[tuple[str, dict[str, Any]]], now: str | None = None) -> list[str]:
    """Render many (template, data) pairs in one Go process; a failing item raises UserError naming its index."""
    out = []
    for k, (text, err) in enumerate(render_go_results(items, now)):
        if err:
            raise UserError(f"Go template error (item {k}): {err}")
        out.append(text)
    return out
