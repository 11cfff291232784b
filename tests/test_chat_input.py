"""What a user types into `exporter chat`. At a terminal, the line is edited as in `llamafactory-cli chat`, which
reads it with `input()` after importing GNU readline: arrow keys move in the line, Up brings back an earlier
question, Backspace erases a whole character, Ctrl-D ends the chat on a fresh line. Piped, a line that is not UTF-8
text (a Latin-1 file, a terminal set to another encoding) is an error in its answer's place and the chat goes on, as
LF's run_chat says so and goes on; it used to end the chat with a traceback, leaving every later line unanswered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_chat import _read_until, terminal

pytestmark = pytest.mark.usefixtures("one_thread")

# the chat loop on an engine that answers each question with "<the question|messages in the prompt>"
ECHO_CHAT = """
import exporter.engine
from exporter.chat import ChatOptions, chat
from exporter.engine import Delta, LoadOptions

class Echo:
    n_ctx = 1 << 20
    chat_format = type("F", (), {"require": lambda self: None})()
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def encode_chat(self, messages): self.messages = messages; return [0]
    def stream(self, prompt, sampling):
        yield Delta(f"<{self.messages[-1]['content']}|{len(self.messages)}>", [1], "stop")

exporter.engine.load = lambda opts: Echo()
chat(ChatOptions(LoadOptions("m")))
"""


def test_terminal_line_editing_history_and_ctrl_d() -> None:
    with terminal("-c", ECHO_CHAT) as fd:
        assert "use `clear` to remove the history" in _read_until(fd, "User: ", 60)
        os.write(fd, b"abc\x1b[D\x1b[DX\r")  # a b c, Left, Left, X: "aXbc"
        assert "Assistant: <aXbc|1>" in _read_until(fd, "User: ", 60)
        os.write(fd, b"\x1b[A\r")  # Up: the last question again (its answer now in the history)
        assert "Assistant: <aXbc|3>" in _read_until(fd, "User: ", 60)
        os.write(fd, "你好\x7f\x7f再见\r".encode())  # two characters erased whole by two Backspaces
        assert "Assistant: <再见|5>" in _read_until(fd, "User: ", 60)
        os.write(fd, b"\x04")  # Ctrl-D: the end, the shell's prompt on a line of its own
        assert _read_until(fd, "\n", 60).endswith("\n")


def test_a_line_that_is_not_utf8_is_an_error_in_its_place(tiny_gguf: Path) -> None:
    def run(stdin: bytes, errors: str = "strict") -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "exporter", "chat", str(tiny_gguf), "--temperature", "0", "--max-new-tokens", "4"]
        env = {**os.environ, "PYTHONIOENCODING": f"utf-8:{errors}"}
        return subprocess.run(cmd, input=stdin, capture_output=True, timeout=300, env=env)

    want = run(b"hello\nbye\n").stdout.decode().splitlines()
    for errors in ("surrogateescape", "strict"):  # Python's stdin in a C.UTF-8 / an en_US.UTF-8 locale
        r = run(b"hello\ncaf\xe9\nbye\n", errors)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")[-2000:]
        lines = r.stdout.decode().splitlines()
        assert len(lines) == 3 and lines[1].startswith("[error: input line 2 is not utf-8 text"), lines
        assert [lines[0], lines[2]] == want  # the bad line left no turn in the history
