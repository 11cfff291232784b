"""POST /v1/completions, through the real `openai` client, against llama-cpp-python's own server
(`python -m llama_cpp.server`) on the same GGUF: greedy text, finish_reason and usage, echo, stop, logprobs and
streaming give what the reference gives."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server_gguf(tiny_gguf) -> Path:
    """The session's tiny GGUF, where llama-cpp-python's server (the reference) is installed."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server extra")
    return tiny_gguf


def _started(cmd: list[str], port: int, path: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no start"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)


@contextlib.contextmanager
def side_by_side(gguf: Path) -> Iterator[tuple[object, object]]:
    """openai clients of `exporter serve` and of llama-cpp-python's own server (the peer), both on `gguf`; each
    server started is stopped at the end, also when the other did not start."""
    ours, ref = free_port(), free_port()
    mine = [sys.executable, "-m", "exporter", "serve", str(gguf), "--port", str(ours), "--ctx", "512",
            "--max-seqs", "2", "--threads", "1"]  # fmt: skip
    theirs = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(ref), "--n_ctx",
              "512", "--n_threads", "1", "--verbose", "false"]  # fmt: skip
    procs = []
    try:
        for cmd, port, path in ((mine, ours, "/health"), (theirs, ref, "/v1/models")):
            procs.append(_started(cmd, port, path))
        yield tuple(openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="x", max_retries=0) for p in (ours, ref))
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def clients(server_gguf: Path) -> Iterator[tuple[object, object]]:
    with side_by_side(server_gguf) as both:
        yield both


def _both(clients: tuple, **kw: object) -> tuple[object, object]:
    ours, ref = clients
    kw = {"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **kw}
    mine = ours.completions.create(**{**kw, "model": ours.models.list().data[0].id})
    theirs = ref.completions.create(**kw, extra_body={"repeat_penalty": 1.0})  # its server's default is 1.1
    return mine, theirs


def test_completions_equal_llama_cpp_servers(clients) -> None:
    mine, theirs = _both(clients)
    a, b = mine.choices[0], theirs.choices[0]
    assert mine.object == "text_completion" and a.text == b.text and a.text and a.finish_reason == b.finish_reason
    assert (mine.usage.prompt_tokens, mine.usage.completion_tokens) == (
        theirs.usage.prompt_tokens, theirs.usage.completion_tokens)  # fmt: skip
    mine, theirs = _both(clients, echo=True)
    assert mine.choices[0].text == theirs.choices[0].text == PROMPT + a.text
    stop = a.text[len(a.text) // 2 :][:3]
    mine, theirs = _both(clients, stop=[stop])
    assert mine.choices[0].text == theirs.choices[0].text == a.text[: a.text.index(stop)]
    assert mine.choices[0].finish_reason == theirs.choices[0].finish_reason == "stop"
    mine, theirs = _both(clients, logprobs=3, max_tokens=6)
    x, y = mine.choices[0].logprobs, theirs.choices[0].logprobs
    assert x.tokens == y.tokens and x.text_offset == y.text_offset
    assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-3)
    for got, want in zip(x.top_logprobs, y.top_logprobs, strict=True):
        # a token holding part of a UTF-8 character: ours \\xNN (as chat logprobs, as OpenAI), theirs "" (dropped)
        got = {re.sub(r"\\x[0-9a-f]{2}", "", k): v for k, v in got.items()}
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=1e-3)
    ours = clients[0]
    name = ours.models.list().data[0].id
    chunks = list(ours.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == a.text and chunks[-1].choices[0].finish_reason == "length"


def test_completions_bad_parameters_are_400s(clients) -> None:
    ours = clients[0]
    for kw, param in (({"prompt": ""}, "prompt"), ({"prompt": 5}, "prompt"), ({"stop": [""]}, "stop"),
                      ({"max_tokens": 0}, "max_tokens"), ({"suffix": "x"}, "suffix"),
                      ({"prompt": "a " * 600}, "messages")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            ours.completions.create(**{"model": ours.models.list().data[0].id, "prompt": PROMPT, **kw})
        assert e.value.body["param"] == param, e.value.body
    assert e.value.body["code"] == "context_length_exceeded" and "in your prompt" in e.value.body["message"]
