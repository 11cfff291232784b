"""`exporter serve` as clients other than the `openai` SDK see it: a web page on another origin calls it from a real
browser (CORS preflight, the key, a stream read in the page), the `Authorization` header is read as FastAPI's
HTTPBearer reads it (LLaMA-Factory's API and llama-cpp-python's server use it), and a stream carries the headers
that keep proxies from buffering it and pings while silent (sse-starlette's, which llama-cpp-python's server sends);
LLaMA-Factory's API body (`do_sample`) is taken, token ids outside the vocabulary are a 400 (not a dead process), and
a stream with tools carries its logprobs."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import free_port, health, lf_python
from test_serve import Server

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")

from exporter.engine import LoadOptions, Sampling  # noqa: E402
from exporter.serve import ServeOptions, create_app, parse_request  # noqa: E402

KEY = "sk-t"
USER = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[str]:
    """`exporter serve` on the tiny GGUF with an API key, as a process: its /v1 base URL."""
    srv = Server(str(tiny_gguf), "--api-key", KEY, "--max-seqs", "2", "--ctx", "512", "--threads", "1")
    try:
        yield srv.base
    finally:
        srv.stop()


@pytest.fixture
def page() -> Iterator[str]:
    """An empty web page served from another origin (another port), as a chat UI in the browser is."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b"<!doctype html><title>ui</title><p>ui</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


# In the page: each call's result, or "blocked: ..." where the browser refused it (CORS).
BROWSER_CALLS = """
const [base, key, messages, done] = arguments;
const auth = {"Authorization": "Bearer " + key};
const post = (body) => fetch(base + "/chat/completions", {method: "POST",
    headers: {...auth, "Content-Type": "application/json"}, body: JSON.stringify(body)});
const guard = (p) => p.catch((e) => "blocked: " + e);
(async () => {
  const out = {};
  out.models = await guard(fetch(base + "/models", {headers: auth}).then((r) => r.json()));
  out.chat = await guard(post({messages, max_tokens: 6, temperature: 0}).then((r) => r.json()));
  out.stream = await guard(post({messages, max_tokens: 6, temperature: 0, stream: true}).then(async (r) => {
    const reader = r.body.getReader(), dec = new TextDecoder();
    let text = "";
    for (;;) { const {value, done} = await reader.read(); if (done) break; text += dec.decode(value); }
    return text;
  }));
  out.no_key = await guard(fetch(base + "/models").then(async (r) => [r.status, await r.json()]));
  done(out);
})();
"""


def test_a_page_on_another_origin_calls_it_from_a_real_browser(server: str, page: str) -> None:
    """Chromium on a page of another origin: the preflighted POST with the key, /v1/models, a stream read in the
    page, and a 401 the page can read. Before, every call was blocked by the browser (no CORS: the preflight was
    a 405, or a 401 with a key), so no browser UI could use the server; LLaMA-Factory's API and llama-cpp-python's
    server allow any origin."""
    import httpx
    from webui_helpers import chromium

    with chromium() as driver:
        driver.set_script_timeout(60)
        driver.get(page)
        got = driver.execute_async_script(BROWSER_CALLS, server, KEY, USER)
    want = httpx.post(f"{server}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": USER, "max_tokens": 6, "temperature": 0}, timeout=60).json()  # fmt: skip
    assert isinstance(got["models"], dict), got["models"]
    assert [m["id"] for m in got["models"]["data"]] == [want["model"]]
    assert isinstance(got["chat"], dict), got["chat"]
    assert got["chat"]["choices"][0]["message"] == want["choices"][0]["message"]
    assert isinstance(got["stream"], str) and got["stream"].rstrip().endswith("data: [DONE]"), got["stream"]
    events = [json.loads(e[6:]) for e in got["stream"].split("\n\n") if e.startswith("data: {")]
    streamed = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert streamed == want["choices"][0]["message"]["content"]
    assert isinstance(got["no_key"], list), got["no_key"]
    assert got["no_key"][0] == 401 and got["no_key"][1]["error"]["code"] == "invalid_api_key"


def _status(client: Any, header: str | None) -> int:
    return client.get("/v1/models", headers={"Authorization": header} if header is not None else {}).status_code


def test_authorization_header_read_as_fastapis_httpbearer() -> None:
    """Each Authorization header is let in or refused as LLaMA-Factory 0.9.5's API decides it (FastAPI's
    HTTPBearer(auto_error=False), then the credentials compared with API_KEY; llama-cpp-python's server alike):
    the scheme in any case (RFC 7235), spaces around the key. Before, only the exact bytes "Bearer <key>" passed:
    a client sending "bearer <key>" got a 401."""
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.security.http import HTTPBearer
    from fastapi.testclient import TestClient

    ref = FastAPI()
    security = HTTPBearer(auto_error=False)

    async def verify(auth: Any = Depends(security)) -> None:  # noqa: B008 - FastAPI's way
        if auth is None or auth.credentials != KEY:
            raise HTTPException(status_code=401, detail="Invalid API key.")

    @ref.get("/v1/models", dependencies=[Depends(verify)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": []}

    engine = SimpleNamespace(name="m")
    ours = create_app(engine, ServeOptions(LoadOptions("m"), api_key=KEY))
    headers = [None, "", f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}", f"Bearer {KEY}  ",
               f"Basic {KEY}", KEY, f"Bearer{KEY}", "Bearer wrong", f"Bearer {KEY}x", f"Token {KEY}",
               "Bearer"]  # fmt: skip
    with TestClient(ref) as theirs, TestClient(ours) as mine:
        got = {h: _status(mine, h) for h in headers}
        want = {h: _status(theirs, h) for h in headers}
    assert {h: s == 200 for h, s in got.items()} == {h: s == 200 for h, s in want.items()}
    assert set(got.values()) == {200, 401}


def test_stream_carries_sse_starlettes_no_buffering_headers(server: str) -> None:
    """A streamed answer says Cache-Control and X-Accel-Buffering as sse-starlette's EventSourceResponse does (what
    llama-cpp-python's server streams with): behind nginx, which buffers a proxied response unless told
    `X-Accel-Buffering: no`, the answer arrived in one piece at the end. Chat and completions streams alike."""
    import httpx
    from sse_starlette.sse import EventSourceResponse

    ref = EventSourceResponse(iter(()))
    want = {k: ref.headers[k] for k in ("cache-control", "x-accel-buffering")}
    auth = {"Authorization": f"Bearer {KEY}"}
    for path, body in (("chat/completions", {"messages": USER}), ("completions", {"prompt": "The capital"})):
        with httpx.stream("POST", f"{server}/{path}", headers=auth, timeout=60,
                          json={**body, "max_tokens": 2, "stream": True}) as r:  # fmt: skip
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert {k: r.headers.get(k) for k in want} == want, path
            r.read()


def test_a_silent_stream_is_kept_alive_with_comments_the_client_skips(tiny_gguf: Path, monkeypatch) -> None:
    """A stream queued behind a busy slot sends an SSE comment (`: ping`) every PING_S while it waits, as
    sse-starlette's streams do every 15 s (before, nothing came until the first token: a proxy or client read timeout
    cut a long wait); the `openai` client skips them and assembles the same answer as without a wait."""
    import openai
    from fastapi.testclient import TestClient

    from exporter import serve
    from exporter.engine import load

    monkeypatch.setattr(serve, "PING_S", 0.02, raising=False)
    body = {"messages": USER, "max_tokens": 8, "temperature": 0, "stream": True}
    with load(LoadOptions(str(tiny_gguf), max_seqs=1, ctx=512)) as eng, TestClient(create_app(eng, ServeOptions(
            eng.options))) as client:  # fmt: skip
        long = {"messages": USER, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
        busy = threading.Thread(target=client.post, args=("/v1/chat/completions",), kwargs={"json": long})
        busy.start()
        deadline = time.time() + 60
        while eng.load()[0] == 0:  # the one slot is taken
            assert busy.is_alive() and time.time() < deadline, "the long request did not start"
            time.sleep(0.01)
        text = client.post("/v1/chat/completions", json=body).text
        busy.join()
        first = text.index('"content": "', text.index('"content": ""') + 1)  # the first token's text
        assert ": ping\n\n" in text[:first], text[:300]
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model=eng.name, **{k: v for k, v in body.items() if k != "stream"}, stream=True))  # fmt: skip
        whole = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def _parse(body: dict[str, Any]) -> Any:
    """parse_request on an engine that has what it needs: a tool format and encode_chat."""
    from exporter.engine.chat_format import tool_format

    engine = SimpleNamespace(chat_format=SimpleNamespace(tools=tool_format("{{ tools }}<tool_call>")),
                             encode_chat=lambda messages, tools=None: [1, 2, 3])  # fmt: skip
    opts = ServeOptions(LoadOptions("m"), sampling=Sampling(max_new_tokens=16, temperature=1.0))
    return parse_request(body, engine, opts, "m")


def test_max_tokens_is_checked_also_when_max_completion_tokens_wins() -> None:
    """`max_completion_tokens` (OpenAI's current name) wins over the deprecated `max_tokens`, and a bad `max_tokens`
    beside it is still the 400 naming it that it is alone (it was let through unchecked)."""
    from exporter.serve import ApiError

    assert _parse({"messages": USER, "max_completion_tokens": 5, "max_tokens": 9}).sampling.max_new_tokens == 5
    for bad in (0, "9", 2.5):
        with pytest.raises(ApiError) as e:
            _parse({"messages": USER, "max_completion_tokens": 5, "max_tokens": bad})
        assert e.value.status == 400 and e.value.param == "max_tokens"


# LLaMA-Factory 0.9.5's API request model validates a body and lists its fields
LF_VALIDATE = """
import json, sys
from llamafactory.api.protocol import ChatCompletionRequest
ChatCompletionRequest.model_validate_json(sys.stdin.read())
print(json.dumps(sorted(ChatCompletionRequest.model_fields)))
"""


def test_a_body_for_llama_factorys_api_is_taken_and_do_sample_false_is_greedy() -> None:
    """A request LLaMA-Factory 0.9.5's API takes, every field of its ChatCompletionRequest set, is taken here (LF's
    env names are too: a client written for `llamafactory-cli api`); `do_sample: false` decodes greedily as LF's
    engine does, whatever the temperature, except for n > 1 answers, which LF samples. Before, `do_sample` was a
    400 "unsupported parameter"."""
    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
    body = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
            "tools": [tool], "do_sample": False, "temperature": 0.7, "top_p": 0.9, "n": 1, "presence_penalty": 0.5,
            "max_tokens": 8, "stop": ["x"], "stream": False}  # fmt: skip
    out = subprocess.run([lf_python(), "-c", LF_VALIDATE], input=json.dumps(body), capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(body) == json.loads(out.stdout)  # every field LF's API takes is in the body
    got = {k: _parse({**body, **over}).sampling for k, over in (
        ("false", {}), ("true", {"do_sample": True}), ("n2", {"n": 2}), ("absent", {"do_sample": None}))}  # fmt: skip
    assert got["false"].greedy and got["false"].top_p == 0.9 and got["false"].max_new_tokens == 8
    assert [got[k].temperature for k in ("true", "n2", "absent")] == [0.7, 0.7, 0.7]


def test_token_ids_outside_the_vocabulary_are_a_400_not_a_dead_server(server: str, tiny_gguf: Path) -> None:
    """`/v1/completions` with prompt token ids past the vocabulary (its size from llama-cpp-python's `Llama`) or
    negative answers a 400 naming `prompt`, the last id of the vocabulary is served, and the server goes on
    serving. Before, the ids were decoded first and llama.cpp's token_to_piece threw std::out_of_range: the whole
    server process aborted ("terminate called ...") on one bad request."""
    import httpx
    import llama_cpp

    n_vocab = llama_cpp.Llama(str(tiny_gguf), vocab_only=True, verbose=False).n_vocab()
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(ids: list[int]) -> Any:
        return httpx.post(f"{server}/completions", headers=auth, json={"prompt": ids, "max_tokens": 2}, timeout=60)

    for ids in ([1, n_vocab], [-1, 2], [2**40], [n_vocab + 10**6]):
        r = post(ids)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prompt" and f"token ids must be in [0, {n_vocab})" in err["message"], err
    assert post([1, n_vocab - 1]).status_code == 200
    port = int(server.rsplit(":", 1)[1].split("/")[0])
    assert health(port)["status"] == "ok"


def test_streamed_answer_with_tools_carries_its_logprobs(server: str) -> None:
    """With `tools` and `logprobs: true`, the `openai` client's streamed chunks carry every token's logprobs, the
    same as the non-streamed answer (and the same text); before, a stream with tools sent `logprobs: null` in every
    chunk, while the non-streamed answer had them."""
    import openai

    client = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    kw = {"model": client.models.list().data[0].id, "messages": USER, "tools": [tool], "max_tokens": 5,
          "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    streamed = [t for c in chunks if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in whole.logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.logprobs.content], abs=1e-4)
    assert [[x.token for x in t.top_logprobs] for t in streamed] == [
        [x.token for x in t.top_logprobs] for t in whole.logprobs.content]  # fmt: skip
