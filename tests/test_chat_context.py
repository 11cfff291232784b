"""`exporter chat` when the conversation outgrows the context: the oldest turns are dropped (the system prompt
stays) with one note on stderr, instead of every later prompt failing until `clear`; a question that cannot fit
even alone says so."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

from exporter.chat import ChatOptions, chat  # noqa: E402
from exporter.engine import LoadOptions, Sampling, load  # noqa: E402


def _chat(model: Path, lines: list[str], system: str | None = None) -> list[str]:
    out = io.StringIO()
    opts = ChatOptions(LoadOptions(str(model), ctx=160, max_seqs=1), Sampling(max_new_tokens=8, ignore_eos=True),
                       system, stdin=io.StringIO("".join(f"{x}\n" for x in lines)), stdout=out)  # fmt: skip
    chat(opts)
    return out.getvalue().splitlines()


def test_old_turns_are_dropped_to_fit(tiny_gguf: Path, capsys) -> None:
    question = "What is the capital of France? " * 2
    answers = _chat(tiny_gguf, [question] * 12, system="Be brief.")
    assert len(answers) == 12 and not any(a.startswith("[error") for a in answers), answers
    err = capsys.readouterr().err
    assert err.count("note: the conversation outgrew the context (160 tokens)") == 1, err
    with load(LoadOptions(str(tiny_gguf), ctx=160, max_seqs=1)) as eng:  # the same question alone is answered
        alone = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
        assert len(eng.encode_chat(alone)) + 8 <= 160
    answers = _chat(tiny_gguf, ["word " * 200, "hi"])
    first = answers[0]
    assert first.startswith("[error: the question alone is ") and first.endswith("the context holds 160 (--ctx)]")
    assert not answers[1].startswith("[error"), answers
