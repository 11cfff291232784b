"""`exporter serve` on 127.0.0.1, driven by the real `openai` client: a fixture GGUF and a base + trained adapter.

The adapter is trained here (exporter train, a few seconds) on a tool-call conversation and short Q&A pairs, so
answers are deterministic and distinct; references are PEFT (HF) and llama-cpp-python (GGUF) greedy decoding."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from engine_models import KEY, QA, TOOLS, peft_answers

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # trains an adapter and starts servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`exporter serve ...` as a child process on a free 127.0.0.1 port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "-m", "exporter", "serve", *args, "--port", str(self.port)]
        self.log = open(os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})  # fmt: skip
        self.banner = ""
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/health")
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            self.stop()
            raise AssertionError("server did not start in 240 s")
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.banner = self.proc.stdout.read() or ""

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.loads(r.read())

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def models(tool_models, tmp_path_factory) -> SimpleNamespace:
    """tool_models plus an f16 GGUF of a sharpened random model (long, varied answers)."""
    from export_edits import sharpen_attention

    from exporter import gguf, templates

    sharp = tmp_path_factory.mktemp("serve") / "sharp"
    shutil.copytree(tool_models.base, sharp)
    sharpen_attention(sharp)
    sharp_gguf = gguf.export(sharp, ["f16"], templates.resolve(sharp, None), sharp.parent / "gguf").files["f16"]
    return SimpleNamespace(**vars(tool_models), sharp_gguf=sharp_gguf)


@pytest.fixture(scope="module")
def hf_server(models) -> Iterator[Server]:
    s = Server(str(models.base), "--adapter", str(models.lora), "--api-key", KEY, "--model-name", "tuned")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gguf_server(models) -> Iterator[Server]:
    s = Server(str(models.gguf), "--max-seqs", "16", "--ctx", "8192", env={"API_KEY": KEY, "API_MODEL_NAME": "tuned"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(models) -> dict[str, str]:
    """PEFT's greedy answers (the adapter attached to the base): what both servers must answer."""
    ref = peft_answers(models.base, models.lora)
    assert len(set(ref.values())) >= 5, ref  # the adapter learned distinct answers: mixed-up streams would show
    return ref


def _ask(client, q: str, **kw):
    return client.chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24, **kw
    )


@pytest.mark.parametrize("which", ["hf_server", "gguf_server"])
def test_answers_equal_reference_streaming_and_not(which: str, request, reference) -> None:
    server: Server = request.getfixturevalue(which)
    assert "curl" in server.banner and "OpenAI(base_url=" in server.banner and server.base in server.banner
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["tuned"]
    for q, _ in QA:
        want = reference[q]
        r = _ask(c, q)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(_ask(c, q, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == want
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    r = _ask(c, QA[0][0], max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    word = reference[QA[2][0]].split()[2]
    r = _ask(c, QA[2][0], stop=[word])
    want = reference[QA[2][0]]
    assert r.choices[0].message.content == want[: want.index(word)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="tuned", messages=[{"role": "user", "content": QA[0][0]}], n=3,
                                  temperature=1.0, seed=5, max_tokens=8)  # fmt: skip
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    again = c.chat.completions.create(model="tuned", messages=[{"role": "user", "content": QA[0][0]}], n=3,
                                      temperature=1.0, seed=5, max_tokens=8)  # fmt: skip
    assert [ch.message.content for ch in r.choices] == [ch.message.content for ch in again.choices]


@pytest.mark.parametrize("which", ["hf_server", "gguf_server"])
def test_tool_call_round_trip(which: str, request) -> None:
    from openai.lib.streaming.chat import ChatCompletionStreamState  # the client's own assembly of a stream

    c = request.getfixturevalue(which).client()
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model="tuned", messages=msgs, tools=TOOLS, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    msgs += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    r = c.chat.completions.create(model="tuned", messages=msgs, tools=TOOLS, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == "It is 21 degrees in Paris." and r.choices[0].finish_reason == "stop"
    for conv in (msgs[:1], msgs):  # a tool call, then a text answer: streamed = non-streamed, as the client sees it
        kw = dict(model="tuned", messages=conv, tools=TOOLS, temperature=0, max_tokens=40)
        want = c.chat.completions.create(**kw).choices[0]
        state = ChatCompletionStreamState()
        for chunk in c.chat.completions.create(**kw, stream=True):
            state.handle_chunk(chunk)
        got = state.get_final_completion().choices[0]
        assert got.finish_reason == want.finish_reason and (got.message.content or None) == want.message.content
        assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in got.message.tool_calls or []] == [
            (tc.function.name, json.loads(tc.function.arguments)) for tc in want.message.tool_calls or []]  # fmt: skip


@pytest.mark.parametrize("fmt_name", ["hermes", "llama3"])
def test_streamed_tool_text_goes_out_before_the_call(fmt_name: str) -> None:
    """Text before the call marker is sent as it comes (less a possible marker start and trailing spaces); the
    calls come at the end, parsed as a non-streamed answer is, and together they equal the non-streamed message."""
    from exporter.engine.chat_format import TOOL_FORMATS, parse_tool_calls
    from exporter.serve import _ToolText

    fmt = next(f for f in TOOL_FORMATS if f.name == fmt_name)
    if fmt_name == "hermes":
        pieces = ["Let me", " check", " that.\n", "<tool", "_call>\n", '{"name": "get_weather", "arguments": ',
                  '{"city": "21"}}\n</tool_call>']  # fmt: skip
        sent = [["Let me"], [" check"], [" that."], [], [], [], []]
    else:  # a <|python_tag|> that arrives in pieces is held too
        pieces = ["  ", "<|py", "thon_tag|>", '{"name": "get_weather", ', '"parameters": {"city": "Paris"}}']
        sent = [[], [], [], [], []]
    tt = _ToolText(fmt)
    assert [[x] if (x := tt.push(p)) else [] for p in pieces] == sent
    delta, called = tt.finish(TOOLS)
    content, calls = parse_tool_calls(fmt, "".join(pieces), TOOLS)
    assert called == "tool_calls" and "".join(s for x in sent for s in x) + delta.get("content", "") == content
    assert [(tc["function"]["name"], tc["function"]["arguments"]) for tc in delta["tool_calls"]] == [
        (tc["function"]["name"], tc["function"]["arguments"]) for tc in calls]  # fmt: skip
    plain = _ToolText(fmt)
    out = [plain.push(p) for p in ["Sure, ", "<tool", " is a word.  "]] if fmt_name == "hermes" else []
    if out:  # a marker start that was not a marker: held, then sent; trailing spaces come with the end
        assert out == ["Sure,", "", " <tool is a word."] and plain.finish(TOOLS) == ({"content": "  "}, None)


def test_errors_have_openai_shape(hf_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        hf_server.client(key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    req = urllib.request.Request(f"{hf_server.base}/models")
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(req, timeout=5)
    assert h.value.code == 401 and json.loads(h.value.read())["error"]["type"] == "authentication_error"
    c = hf_server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    cases = [
        ({"messages": [{"role": "user", "content": "hi"}], "extra_body": {"logit_bias_x": 1}}, "logit_bias_x"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, "frequency_penalty"),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": {}}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": TOOLS}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, "n"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tuned", **kw)
        assert e.value.body["param"] == param, e.value.body
    bad = urllib.request.Request(f"{hf_server.base}/chat/completions", data=b"{not json",
                                 headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(bad, timeout=5)
    assert h.value.code == 400 and "not valid JSON" in json.loads(h.value.read())["error"]["message"]


def test_64_concurrent_streams_separate_and_correct(gguf_server: Server, reference) -> None:
    async def run() -> list[tuple[str, str, str | None]]:
        client = openai.AsyncOpenAI(base_url=gguf_server.base, api_key=KEY, max_retries=0, timeout=600)

        async def one(k: int) -> tuple[str, str, str | None]:
            q = QA[k % len(QA)][0]
            stream = await client.chat.completions.create(
                model="tuned", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24, stream=True
            )
            text, finish = "", None
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
            return q, text, finish

        try:
            return await asyncio.gather(*(one(k) for k in range(64)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [(t, f) for q, t, f in results] == [(reference[q], "stop") for q, _, _ in results]


def test_aborted_stream_frees_its_slot_and_queue_limit(models) -> None:
    """With one slot: a client that drops a long stream must not hold up the next request; a full queue is 429."""
    s = Server(str(models.sharp_gguf), "--max-seqs", "1", "--max-waiting", "1", "--model-name", "tuned")
    try:
        c = s.client(key="none", timeout=60)
        long = dict(model="tuned", messages=[{"role": "user", "content": "hi"}], max_tokens=3000, temperature=0,
                    extra_body={"ignore_eos": True})  # fmt: skip
        stream = c.chat.completions.create(**long, stream=True)
        got = 0
        for ch in stream:
            got += bool(ch.choices and ch.choices[0].delta.content)
            if got >= 2:
                break
        stream.close()
        t0 = time.time()
        r = c.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "hey"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length") and time.time() - t0 < 30
        deadline = time.time() + 10
        while s.health()["running"] and time.time() < deadline:
            time.sleep(0.2)
        assert s.health() | {"status": "ok"} == {"status": "ok", "model": "tuned", "running": 0, "waiting": 0}

        async def flood() -> list[int]:
            """One request running, then three at once: one waits (the queue holds one), two get 429."""
            client = openai.AsyncOpenAI(base_url=s.base, api_key="none", max_retries=0, timeout=120)

            async def one(max_tokens: int) -> int:
                try:
                    await client.chat.completions.create(**{**long, "max_tokens": max_tokens})
                    return 200
                except openai.APIStatusError as e:
                    return e.status_code

            try:  # the running request is long (3000 tokens) and ends only when its client goes away
                running = await client.chat.completions.create(**long, stream=True)
                async for _ in running:
                    break
                while s.health()["running"] == 0:
                    await asyncio.sleep(0.05)
                rest = [asyncio.create_task(one(4)) for _ in range(3)]
                while sum(t.done() for t in rest) < 2:  # the two refused at once
                    await asyncio.sleep(0.05)
                await running.close()  # its slot frees: the waiting request runs
                return list(await asyncio.gather(*rest))
            finally:
                await client.close()

        codes = asyncio.run(flood())  # before, a 300-token request could finish while the three were sent (CI)
        assert sorted(codes) == [200, 429, 429], codes
    finally:
        s.stop()


def test_nan_logits_fail_that_request_only(tiny_model, tmp_path) -> None:
    """A request whose prompt makes the logits NaN gets an OpenAI-shaped 500 naming the cause (streaming: an error
    event, no [DONE]); the requests decoded beside it answer as they do alone, and the server goes on."""
    from engine_models import CLEAN, POISONED, nan_token_model

    nan_token_model(tiny_model("llama3"), tmp_path / "nan")
    s = Server(str(tmp_path / "nan"), "--max-seqs", "4", "--model-name", "nan")
    try:
        c = s.client(key="none", timeout=120)

        def ask(q: str, **kw):
            return c.chat.completions.create(model="nan", messages=[{"role": "user", "content": q}], temperature=0,
                                             max_tokens=12, **kw)  # fmt: skip

        alone = [ask(q).choices[0].message.content for q in CLEAN]

        async def together() -> list:
            client = openai.AsyncOpenAI(base_url=s.base, api_key="none", max_retries=0, timeout=120)

            async def one(q: str) -> Any:
                try:
                    r = await client.chat.completions.create(model="nan", messages=[{"role": "user", "content": q}],
                                                             temperature=0, max_tokens=12)  # fmt: skip
                    return r.choices[0].message.content
                except openai.APIStatusError as e:
                    return e

            try:
                return await asyncio.gather(*(one(q) for q in (CLEAN[0], POISONED, CLEAN[1])))
            finally:
                await client.close()

        a, err, b = asyncio.run(together())
        assert [a, b] == alone
        assert isinstance(err, openai.InternalServerError) and err.body["type"] == "server_error", err
        assert "logits are not finite (nan) at answer token 1" in err.body["message"]
        req = urllib.request.Request(f"{s.base}/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": [{"role": "user", "content": POISONED}],
                                                      "stream": True}).encode())  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as r:
            events = [ln[6:] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
        assert "[DONE]" not in events and "logits are not finite" in json.loads(events[-1])["error"]["message"]
        assert ask(CLEAN[0]).choices[0].message.content == alone[0]
        assert s.health()["running"] == 0
    finally:
        s.stop()
