"""`exporter serve` under malformed requests and faults: every wrong-typed field is a 400 naming it, a dead engine
worker shows in /health and answers 503, seeds of any int64 work, logprobs carry a token's real bytes, a
non-streaming client that disconnects frees its slot at once and logs nothing, a prompt that fills the context is
llama-cpp-python's 400 (`param`, `code`, wording), and an empty stop string is a 400 naming `stop`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import free_port, health

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")

from exporter.engine import EngineError, LoadOptions, Sampling, load  # noqa: E402
from exporter.engine.chat_format import tool_format  # noqa: E402
from exporter.serve import ApiError, ServeOptions, create_app, parse_request  # noqa: E402

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def _fake_engine() -> Any:
    """What parse_request needs of an engine: a chat format with a tool format, and encode_chat."""
    fmt = SimpleNamespace(tools=tool_format("{{ tools }}<tool_call>"))
    return SimpleNamespace(chat_format=fmt, encode_chat=lambda messages, tools=None: [1, 2, 3])


def _parse(body: dict[str, Any]) -> Any:
    opts = ServeOptions(LoadOptions("m"), sampling=Sampling(max_new_tokens=16, temperature=1.0))
    return parse_request(body, _fake_engine(), opts, "m")


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"stream_options": "x"}, "stream_options", "must be an object"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage", "true or false"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream' is true"),
        ({"stream": "false"}, "stream", "true or false"),
        ({"logprobs": "no"}, "logprobs", "true or false"),
        ({"ignore_eos": 1}, "ignore_eos", "true or false"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens", "true or false"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
        ({"user": 5}, "user", "a string"),
        ({"model": 5}, "model", "a string"),
        ({"repetition_penalty": 0}, "repetition_penalty", "must be > 0, got 0"),
        ({"top_p": 0}, "top_p", "must be in (0, 1], got 0"),
        ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be >= 1, got 0"),
        ({"max_completion_tokens": -3}, "max_completion_tokens", "must be >= 1, got -3"),
        ({"temperature": float("nan")}, "temperature", "between 0 and 2, got nan"),
        ({"seed": 2**63}, "seed", "between"),
        ({"seed": "1"}, "seed", "an integer"),
        ({"n": 0}, "n", "between 1 and 16"),
        ({"tools": [{"type": "function", "function": "x"}]}, "tools[0].function", "'name' string"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "'name' string"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function", "'name' string"),
        ({"tools": [TOOL, {"type": "code"}]}, "tools[1]", "expected {'type': 'function'"),
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": []}}]}, "tools[0].function", "JSON Schema"),
        ({"tools": {"a": 1}}, "tools", "must be a list"),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": 5}]},
            "messages",
            "tool_calls must be a list",
        ),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages", "name must be a string"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": []}]}, "messages", "tool_call_id must be"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
            "messages",
            "arguments must be a JSON object",
        ),
    ],
)
def test_each_wrong_type_is_a_400_naming_the_field(extra: dict, param: str, says: str) -> None:
    with pytest.raises(ApiError) as e:
        _parse({"messages": USER, **extra})
    assert e.value.status == 400 and e.value.param == param and says in str(e.value), (e.value.param, str(e.value))
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_well_typed_values_pass() -> None:
    r = _parse({"messages": USER, "stream": True, "stream_options": {"include_usage": True}, "seed": -(2**63),
                "repetition_penalty": 1.2, "top_p": 1, "logprobs": True, "top_logprobs": 2, "tools": [TOOL],
                "parallel_tool_calls": True, "user": "me"})  # fmt: skip
    assert r.stream and r.sampling.seed == -(2**63) and r.sampling.repetition_penalty == 1.2 and r.logprobs
    assert _parse({"messages": USER, "stream": False, "logprobs": False}).sampling.logprobs is None


def test_request_sampling_reaches_the_engine() -> None:
    """Each sampling field of the request replaces the server's default (OpenAI's rules: max_completion_tokens over
    the deprecated max_tokens, up to 4 stop strings, temperature up to 2); absent ones keep the default."""
    r = _parse({"messages": USER, "temperature": 2, "top_p": 0.5, "top_k": 7, "max_completion_tokens": 5,
                "max_tokens": 9, "stop": ["a", "b", "c", "d"], "repetition_penalty": 1.1, "ignore_eos": True,
                "skip_special_tokens": False})  # fmt: skip
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (2.0, 0.5, 7, 5)
    assert (s.stop, s.repetition_penalty, s.ignore_eos, s.skip_special_tokens) == (
        ("a", "b", "c", "d"),
        1.1,
        True,
        False,
    )
    assert _parse({"messages": USER, "max_tokens": 9, "stop": "x"}).sampling.replace(stop=()) == _parse(
        {"messages": USER}
    ).sampling.replace(max_new_tokens=9)
    with pytest.raises(ApiError, match="up to 4 strings"):
        _parse({"messages": USER, "stop": ["a", "b", "c", "d", "e"]})


def test_seeds_work_and_a_dead_worker_is_503_and_unhealthy(tiny_gguf: Path) -> None:
    """seed -1 (random) and any other int64 answer 200 (a negative seed used to kill the engine's worker, after
    which every request hung while /health said ok); if the worker dies anyway, /health is 503 naming why and
    requests get OpenAI's 503 JSON."""
    from fastapi.testclient import TestClient

    with load(LoadOptions(str(tiny_gguf), max_seqs=2)) as eng:
        client = TestClient(create_app(eng, ServeOptions(eng.options)))
        body = {"messages": USER, "max_tokens": 4, "temperature": 1.5}
        for seed in (-1, -7, 2**63 - 1):
            r = client.post("/v1/chat/completions", json={**body, "seed": seed, "n": 2})
            assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
        assert client.get("/health").json()["status"] == "ok"

        def broken() -> list:
            raise RuntimeError("worker bug")

        eng._sched._feeds = broken
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and "worker bug" in r.json()["error"]["message"], r.text
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "worker bug" in h.json()["error"]
        r = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_logprobs_bytes_are_the_tokens_bytes(tiny_model) -> None:
    """A logprobs entry for a token that holds part of a UTF-8 character reports that token's bytes (it was U+FFFD's,
    [239, 191, 189]) and escapes them in `token` (\\xNN), as OpenAI does. Real Qwen2 vocabulary."""
    from exporter.engine import TokenLogprob
    from exporter.serve import _logprobs

    with load(LoadOptions(str(tiny_model("qwen2", real_vocab=True)), max_seqs=1)) as eng:
        ids = eng.tokenize("龘")  # two tokens, neither a whole character
        out = _logprobs(eng, [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids])
        assert out is not None
        entries = [e for c in out["content"] for e in (c, *c["top_logprobs"])]
        assert b"".join(bytes(c["bytes"]) for c in out["content"]) == "龘".encode()
        for e in entries:
            assert bytes(e["bytes"]).decode("utf-8", errors="backslashreplace") == e["token"]
            assert "\ufffd" not in e["token"] and e["token"].startswith("\\x")


def _serve_process(cmd: list[str], port: int) -> subprocess.Popen:
    """`exporter serve` started as a process, once its /health answers (stderr piped for the test to read)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.communicate()[1]}")
        try:
            health(port)
            return proc
        except OSError:
            time.sleep(0.2)


@pytest.mark.slow
def test_non_streaming_client_that_disconnects_frees_its_slot_at_once(tiny_gguf: Path) -> None:
    """A non-streamed request of 30000 tokens (many seconds) whose client goes away is cancelled within a step or
    so; before, its slot stayed busy until the answer was done. The server then stops on SIGTERM."""
    port = free_port()
    cmd = [sys.executable, "-m", "exporter", "serve", str(tiny_gguf), "--port", str(port), "--max-seqs", "1",
           "--ctx", "32768", "--threads", "1"]  # fmt: skip
    proc = _serve_process(cmd, port)
    try:
        body = json.dumps({"messages": USER, "max_tokens": 30000, "ignore_eos": True, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        while health(port)["running"] == 0:
            time.sleep(0.05)
        time.sleep(0.5)
        assert health(port)["running"] == 1  # still generating
        sock.close()
        t0 = time.time()
        while health(port)["running"] and time.time() - t0 < 10:
            time.sleep(0.05)
        assert time.time() - t0 < 3, "the slot stayed busy after its client went away"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143  # as every verb on SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_overflow_is_llama_cpp_servers_400_and_empty_stop_is_refused(tiny_gguf: Path) -> None:
    """A prompt longer than --ctx answers 400 with param "messages", code "context_length_exceeded" and the message
    llama-cpp-python's server formats (prompt + max_tokens requested); `stop: [""]` is a 400 naming `stop` (it was
    accepted and ignored; llama-cpp-python would end every answer at once, empty)."""
    from fastapi.testclient import TestClient
    from llama_cpp.server.errors import ErrorResponseFormatters

    with load(LoadOptions(str(tiny_gguf), max_seqs=1, ctx=128)) as eng:
        client = TestClient(create_app(eng, ServeOptions(eng.options)))
        messages = [{"role": "user", "content": "word " * 150}]
        n_prompt = len(eng.encode_chat(messages))
        for stream in (False, True):
            r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 7, "stream": stream})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            match = SimpleNamespace(group=lambda k: {1: str(n_prompt), 2: "128"}[k])
            _, want = ErrorResponseFormatters.context_length_exceeded(SimpleNamespace(messages=[], max_tokens=7), match)
            assert err == {"message": want["message"], "type": "invalid_request_error", "param": "messages",
                           "code": "context_length_exceeded"}  # fmt: skip
        for stop in ("", ["x", ""]):
            r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3, "stop": stop})
            assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3, "stop": ["x"]})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("api_key", [None, "sk-t"])
def test_non_streamed_client_that_drops_logs_nothing_and_frees_its_slot(tiny_gguf: Path, api_key: str | None) -> None:
    """Three clients that send a non-streamed request and close at once: the server logs no traceback (it logged
    "Exception in ASGI application ... RuntimeError: No response returned." from the auth middleware, each time),
    every slot is free again, and the key is still checked."""
    port = free_port()
    cmd = [sys.executable, "-m", "exporter", "serve", str(tiny_gguf), "--port", str(port), "--max-seqs", "1",
           "--ctx", "4096", "--threads", "1", *(["--api-key", api_key] if api_key else [])]  # fmt: skip
    proc = _serve_process(cmd, port)
    try:
        body = json.dumps({"messages": USER, "max_tokens": 2000, "ignore_eos": True}).encode()
        auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                         b"Content-Length: %d\r\n\r\n%s" % (auth, len(body), body))  # fmt: skip
            t0 = time.time()
            while health(port)["running"] == 0 and time.time() - t0 < 10:
                time.sleep(0.05)
            sock.close()
        t0 = time.time()
        while health(port)["running"] and time.time() - t0 < 10:
            time.sleep(0.05)
        assert health(port)["running"] == 0
        if api_key:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer no"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-t"})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        err = proc.stderr.read()
        assert "Traceback" not in err and "Exception in ASGI" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _llama_cpp_greedy(gguf: Path, prompt: list[int], n: int, freq: float, present: float) -> str:
    """The reference: llama-cpp-python's `Llama` logits, llama.cpp's own penalties sampler over the answer so far
    (OpenAI's presence / frequency penalties), argmax, until an end-of-generation token or `n` tokens."""
    import numpy as np
    from llama_cpp import Llama, llama_vocab_is_eog
    from test_engine_sampling import _llama_cpp_penalized

    llm = Llama(str(gguf), n_ctx=512, n_threads=1, logits_all=True, verbose=False)  # scores: every row
    try:
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(n):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            token = int(np.argmax(_llama_cpp_penalized(logits, out, 1.0, freq, present)))
            if llama_vocab_is_eog(llm._model.vocab, token):
                break
            out.append(token)
            llm.eval([token])
        return llm.detokenize(out).decode("utf-8", errors="replace")
    finally:
        llm.close()


def test_presence_frequency_penalties_and_min_p_through_the_openai_client(tiny_gguf: Path) -> None:
    """OpenAI's `presence_penalty` / `frequency_penalty` were a 400 unless 0; now a greedy answer with them is what
    llama.cpp's own penalties sampler picks over llama-cpp-python's logits, on both endpoints; `min_p` (as
    llama-cpp-python's server and vLLM take it) of 1 leaves only the top token, so any seed answers greedily."""
    from fastapi.testclient import TestClient

    openai = pytest.importorskip("openai")
    pytest.importorskip("llama_cpp")
    with load(LoadOptions(str(tiny_gguf), max_seqs=2, ctx=512, threads=1)) as eng:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                               http_client=TestClient(create_app(eng, ServeOptions(eng.options))))  # fmt: skip
        name, prompt = eng.name, "The capital of France is"
        penalties = {"frequency_penalty": 1.5, "presence_penalty": 0.5}
        plain = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
        got = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0, **penalties)
        want = _llama_cpp_greedy(tiny_gguf, eng.encode_text(prompt), 16, 1.5, 0.5)
        assert got.choices[0].text == want != plain
        messages = [{"role": "user", "content": "Who are you?"}]
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0,
                                              frequency_penalty=-0.5, presence_penalty=1.0)  # fmt: skip
        assert chat.choices[0].message.content == _llama_cpp_greedy(
            tiny_gguf, eng.encode_chat(messages), 16, -0.5, 1.0)  # fmt: skip
        greedy = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
        for seed in range(3):
            hot = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=1.5,
                                                 seed=seed, extra_body={"min_p": 1.0})  # fmt: skip
            assert hot.choices[0].message.content == greedy.choices[0].message.content
        for key, value in (("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("min_p", 1.5)):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=name, messages=messages, extra_body={key: value})
            assert e.value.body["param"] == key, e.value.body


def test_text_that_is_not_unicode_is_a_400_naming_its_field(tiny_gguf: Path) -> None:
    """JSON may escape a lone surrogate ("\\ud800"), which is no Unicode text and no tokenizer takes: a 400 naming
    `messages` / `prompt` in OpenAI's shape (it was a bare 500 "Internal Server Error" and a traceback)."""
    from fastapi.testclient import TestClient

    with load(LoadOptions(str(tiny_gguf), max_seqs=1, ctx=512, threads=1)) as eng:
        client = TestClient(create_app(eng, ServeOptions(eng.options)), raise_server_exceptions=False)
        for path, body, param in (
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "caf\\udce9"}]}', "messages"),
            ("/v1/completions", b'{"prompt": "\\ud800 hi", "max_tokens": 2}', "prompt"),
        ):
            r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param and "not valid Unicode" in r.json()["error"]["message"]
        with pytest.raises(EngineError, match="not valid Unicode"):
            eng.tokenize("\udce9")
