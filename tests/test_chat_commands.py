"""`exporter chat` takes the commands Ollama users type in `ollama run` (cmd/interactive.go): `/bye` and `/exit`
leave, `/clear` empties the history, `/?` and `/help` print the commands; none of them reaches the model. LF's
`exit` and `clear` still work, and a piped question that starts with a slash is still asked. A fake engine records
each prompt's conversation."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.engine import Delta, LoadOptions, Sampling


class _Format:
    def require(self) -> None:
        pass


class _Engine:
    """Answers "A<k>" to the k-th question; `asked` holds each question's conversation."""

    n_ctx = 1 << 20
    chat_format = _Format()

    def __init__(self) -> None:
        self.asked: list[list[dict[str, Any]]] = []

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        self.asked.append([dict(m) for m in messages])
        return [1]

    def stream(self, prompt: list[int], sampling: Sampling) -> Iterator[Delta]:
        yield Delta(f"A{len(self.asked)}", [1], "stop")

    def __enter__(self) -> _Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> _Engine:
    import exporter.engine

    eng = _Engine()
    monkeypatch.setattr(exporter.engine, "load", lambda opts: eng)
    return eng


def _chat(text: str, terminal: bool = False) -> str:
    from exporter.chat import ChatOptions, chat

    out = io.StringIO()
    chat(ChatOptions(LoadOptions("m"), stdin=(_Terminal if terminal else io.StringIO)(text), stdout=out))
    return out.getvalue()


def test_piped_ollama_commands(engine: _Engine, capsys: pytest.CaptureFixture[str]) -> None:
    out = _chat("hi\n/clear\nagain\n/tmp holds what?\n/?\n/bye\nnever asked\n")
    assert out.splitlines() == ["A1", "A2", "A3"]  # one line per question: no line for the commands
    assert [[m["content"] for m in a] for a in engine.asked] == [["hi"], ["again"], ["again", "A2", "/tmp holds what?"]]
    assert "/bye" in capsys.readouterr().err  # the help, on stderr


def test_terminal_ollama_commands(engine: _Engine) -> None:
    out = _chat("hi\n/set parameter temperature 0\n/clear\nthen\n/help\n/exit\nnever\n", terminal=True)
    assert [[m["content"] for m in a] for a in engine.asked] == [["hi"], ["then"]]
    assert "Unknown command '/set'. Type /? for help" in out and "History has been removed." in out
    assert "/bye" in out and "never" not in "".join(m["content"] for a in engine.asked for m in a)
