"""`exporter serve` edge cases: a non-streamed client that goes away logs nothing, a prompt that fills the context is
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

import pytest
from conftest import require_llama_cpp

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")

from exporter.engine import LoadOptions, load  # noqa: E402
from exporter.serve import ServeOptions, create_app  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    require_llama_cpp()
    from exporter import gguf, templates

    hf = tiny_model("qwen2")
    return gguf.export(hf, ["f16"], templates.resolve(hf, None), tmp_path_factory.mktemp("serve")).files["f16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


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
    port = _free_port()
    cmd = [sys.executable, "-m", "exporter", "serve", str(tiny_gguf), "--port", str(port), "--max-seqs", "1",
           "--ctx", "4096", "--threads", "1", *(["--api-key", api_key] if api_key else [])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no start"
            try:
                _health(port)
                break
            except OSError:
                time.sleep(0.2)
        body = json.dumps({"messages": USER, "max_tokens": 2000, "ignore_eos": True}).encode()
        auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                         b"Content-Length: %d\r\n\r\n%s" % (auth, len(body), body))  # fmt: skip
            t0 = time.time()
            while _health(port)["running"] == 0 and time.time() - t0 < 10:
                time.sleep(0.05)
            sock.close()
        t0 = time.time()
        while _health(port)["running"] and time.time() - t0 < 10:
            time.sleep(0.05)
        assert _health(port)["running"] == 0
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
