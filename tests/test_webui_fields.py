"""The board's messages: a bad Train field is named by its label (not by the temp YAML the board writes), and a
Chat tab "Failed" status goes once a later answer succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

from webui_helpers import train_form  # noqa: E402

from exporter.engine import Delta, EngineError  # noqa: E402
from exporter.errors import UserError  # noqa: E402
from exporter.webui import WebUIOptions, chat_tab, train_tab  # noqa: E402
from exporter.webui.app import build  # noqa: E402


def test_bad_train_field_names_the_field(tmp_path: Path) -> None:
    args = train_tab.train_args({"model": "m", **train_form(tmp_path, tmp_path / "o", learning_rate="abc")})
    with pytest.raises(UserError) as e:
        train_tab.start(args, tmp_path / "runs")
    assert str(e.value) == "Learning rate: expected a number, got 'abc'"
    assert train_tab._failed("en", e.value) == "**Failed**: `error: Learning rate: expected a number, got 'abc'`"
    assert "学习率" in train_tab._failed("zh", e.value)
    assert not (tmp_path / "runs").exists()


def test_chat_failed_status_clears_on_the_next_answer() -> None:
    class Engine:
        def encode_chat(self, messages: list) -> list[int]:
            if messages[-1]["content"] == "too long":
                raise EngineError("the prompt is 9 tokens; the context holds 8")
            return [1]

        def stream(self, ids: list[int], sampling: object):
            yield Delta("Hi", [5], "stop")

    demo, board = build(WebUIOptions())
    submit = next(f.fn for f in demo.fns.values() if f.api_name == "chat_submit")
    board.chat = chat_tab.Loaded(Engine(), "`m` · gguf")
    samp = (16, 0.0, 1.0, 0, 1.0)
    *_, last = submit("en", "too long", [], "", *samp)
    assert last[3].startswith("**Failed**")
    outs = list(submit("en", "hi", last[1], "", *samp))
    assert outs[-1][1][-1] == {"role": "assistant", "content": "Hi"}
    statuses = [o[3] for o in outs if o[3] != {"__type__": "update"}]  # gr.skip() leaves the status as it is
    assert statuses == ["**Loaded** `m` · gguf"], statuses  # every one was gr.skip(): "Failed" stayed
