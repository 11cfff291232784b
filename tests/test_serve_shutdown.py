"""`exporter serve` stopped by SIGTERM (`docker stop`, `timeout`) or Ctrl-C while it streams: one line says it is
stopping, every open request ends at once with OpenAI's 503 (a stream: its error event, which the `openai` client
raises as an APIError, not a broken connection), and the process exits 143 / 130 with no traceback; a second
signal exits at once. Before, it waited silently, with no limit, for every answer to finish (42 s for 8 streams:
`docker stop` then killed it and reset every client), and a second Ctrl-C dropped every client with a traceback
each in the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, health

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

SHUTTING_DOWN = "the server is shutting down"


class _Serve:
    """`exporter serve MODEL` as a process on a free port, its stdout and stderr in one file."""

    def __init__(self, model: Path, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.log = tmp / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "exporter", "serve", str(model), "--port", str(self.port), "--threads", "1", *args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                pytest.fail(f"the server did not start: {self.log.read_text()}")
            try:
                health(self.port)
                break
            except OSError:
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=60)  # fmt: skip

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class _Clients:
    """Requests in threads, each recording its chunks and how it ended: "finished", or the exception and when."""

    def __init__(self, serve: _Serve) -> None:
        self.serve, self.chunks, self.ends, self.threads = serve, {}, {}, []

    def _run(self, name: str, call: Any) -> None:
        self.chunks[name] = 0
        try:
            out = call()
            if isinstance(out, openai.Stream):
                for _ in out:
                    self.chunks[name] += 1
            self.ends[name] = ("finished", time.time())
        except Exception as e:
            self.ends[name] = (e, time.time())

    def start(self, name: str, call: Any) -> None:
        t = threading.Thread(target=self._run, args=(name, call), daemon=True)
        t.start()
        self.threads.append(t)

    def chat(self, name: str, stream: bool) -> None:
        c = self.serve.client
        self.start(name, lambda: c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"count to a million, {name}"}], stream=stream,
            max_tokens=4000, extra_body={"ignore_eos": True}))  # fmt: skip

    def text(self, name: str) -> None:
        c = self.serve.client
        self.start(name, lambda: c.completions.create(model="m", prompt=f"Once upon a time {name}", stream=True,
                                                      max_tokens=4000, extra_body={"ignore_eos": True}))  # fmt: skip

    def join(self, timeout: float) -> None:
        deadline = time.time() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.time()))


def _wait_streaming(clients: _Clients, streams: list[str], running: int, waiting: int, chunks: int = 2) -> None:
    """Until each of `streams` has sent `chunks` chunks and the engine runs `running` answers with `waiting` queued."""
    deadline = time.time() + 60
    while time.time() < deadline:
        h = health(clients.serve.port)
        started = all(clients.chunks.get(s, 0) >= chunks for s in streams)
        if started and (h["running"], h["waiting"]) == (running, waiting):
            return
        assert not clients.ends, clients.ends  # nothing may end before the signal
        time.sleep(0.1)
    pytest.fail(f"the requests did not start: {health(clients.serve.port)} {clients.chunks}")


def _ended_cleanly(clients: _Clients, names: list[str], signalled: float) -> None:
    """Each request ended within 2 s of the signal with the server's 503 "shutting down" (a stream: the error event
    the openai client raises as APIError), never a connection error."""
    for name in names:
        assert name in clients.ends, f"{name} was still open: {clients.chunks}"
        e, when = clients.ends[name]
        assert isinstance(e, openai.APIError) and not isinstance(e, openai.APIConnectionError), (name, e)
        assert SHUTTING_DOWN in str(e), (name, e)
        assert when - signalled < 2.0, f"{name} ended {when - signalled:.1f} s after the signal"


def _one_stopping_line(log: str, signame: str, n: int) -> None:
    assert "Traceback" not in log and "Exception in ASGI" not in log and "CancelledError" not in log, log
    stopping = [line for line in log.splitlines() if "stopping" in line]
    assert stopping == [f"exporter serve: stopping ({signame}): ending {n} open requests with a 503 error; "
                        f"a second {'Ctrl-C' if signame == 'SIGINT' else signame} exits at once"], log  # fmt: skip


def test_sigterm_ends_every_open_request_at_once_and_exits_143(tiny_model, tmp_path: Path) -> None:
    """SIGTERM with 4 answers decoding and 2 queued (--max-seqs 4): chat and completion streams get the error event,
    the non-streamed request a 503 in OpenAI's shape, a request after the signal is refused (503, or no
    connection once the listener is closed), the engine's slots are cancelled, and the process exits 143, as every
    verb does on SIGTERM."""
    s = _Serve(tiny_model("qwen2"), tmp_path, "--max-seqs", "4", "--model-name", "m")
    try:
        clients = _Clients(s)
        streams = ["chat0", "chat1", "chat2", "text", "chat3"]
        for name in streams[:3]:
            clients.chat(name, stream=True)
        clients.text("text")
        _wait_streaming(clients, streams[:4], 4, 0)
        clients.chat("chat3", stream=True)  # these two wait for a slot
        clients.chat("whole", stream=False)
        _wait_streaming(clients, ["chat3"], 4, 2, chunks=1)  # its first chunk (the role) comes at once
        signalled = time.time()
        s.proc.send_signal(signal.SIGTERM)
        clients.join(5)
        _ended_cleanly(clients, [*streams, "whole"], signalled)
        whole = clients.ends["whole"][0]
        assert isinstance(whole, openai.InternalServerError) and whole.status_code == 503, whole
        assert whole.body == {"message": SHUTTING_DOWN, "type": "server_error", "param": None, "code": "unavailable"}
        with pytest.raises((openai.InternalServerError, openai.APIConnectionError)) as late:
            s.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert isinstance(late.value, openai.APIConnectionError) or late.value.status_code == 503, late.value
        assert s.proc.wait(timeout=15) == 143
        assert time.time() - signalled < 15
        _one_stopping_line(s.log.read_text(), "SIGTERM", 6)
    finally:
        s.kill()


def test_two_ctrl_c_exit_at_once_without_tracebacks(tiny_gguf: Path, tmp_path: Path) -> None:
    """Ctrl-C twice (the GGUF backend): the first ends the streams cleanly, the second exits at once (130, or killed
    by SIGINT when it lands in Python's own exit, which a shell shows as 130 too), with no traceback (there were 18)."""
    s = _Serve(tiny_gguf, tmp_path, "--max-seqs", "8", "--model-name", "m", "--ctx", "8192")
    try:
        clients = _Clients(s)
        streams = [f"chat{i}" for i in range(4)]
        for name in streams:
            clients.chat(name, stream=True)
        _wait_streaming(clients, streams, 4, 0)
        signalled = time.time()
        s.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        second = time.time()
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGINT)
        clients.join(5)
        _ended_cleanly(clients, streams, signalled)
        assert s.proc.wait(timeout=15) in (130, -signal.SIGINT)
        assert time.time() - second < 3, "the second Ctrl-C did not exit at once"
        _one_stopping_line(s.log.read_text(), "SIGINT", 4)
    finally:
        s.kill()
