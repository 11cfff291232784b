"""The Train tab's "Extra arguments" box (LLaMA-Factory 0.9.5's board: `extra_args`, a JSON object of training keys
merged into the run, webui/runner.py `_parse_train_args`) and a data preview that shows what training reads: with a
`tokenized_path` folder holding a saved dataset, training reads that folder instead of the datasets (LF's
`has_tokenized_data` -> `load_from_disk`), so the preview shows its rows. The board had no such box (no way to set
tokenized_path or any key without a field) and previewed the datasets' rows whatever the folder held."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("gradio")
datasets = pytest.importorskip("datasets")

from webui_helpers import ANSWER, train_form, write_data  # noqa: E402

from exporter.errors import UserError  # noqa: E402
from exporter.webui import train_tab  # noqa: E402

FRUITS = ["apples", "pears", "plums", "figs"]


def _args(model: Path, tmp_path: Path, extra: object) -> dict:
    form = train_form(write_data(tmp_path / "data"), tmp_path / "out", extra_args=extra)
    return train_tab.train_args({"model": str(model), "adapter": "", "template": "auto", **form})


def test_preview_shows_the_saved_tokenized_dataset(tiny_model, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base = tiny_model("llama3")
    tok = AutoTokenizer.from_pretrained(base)
    saved, want = [], []
    for fruit in FRUITS:  # an sft folder as LLaMA-Factory saves it: input_ids, attention_mask, labels (-100 prompt)
        prompt = tok(f"Q: {fruit}?", add_special_tokens=False).input_ids
        answer = tok(f" A: more {fruit}.", add_special_tokens=False).input_ids
        saved.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                      "labels": [-100] * len(prompt) + answer})  # fmt: skip
        whole = tok.decode(prompt + answer)
        want.append((whole, whole[len(tok.decode(prompt)) :], len(prompt) + len(answer), len(answer)))
    folder = tmp_path / "tokenized"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(saved)}).save_to_disk(str(folder))

    rows = train_tab.preview_rows(_args(base, tmp_path, json.dumps({"tokenized_path": str(folder)})))
    got = [("".join(t for t, _ in segs), "".join(t for t, tr in segs if tr), n, k) for segs, n, k in rows]
    assert got == want[: train_tab.PREVIEW_ROWS]

    empty = tmp_path / "to-be-saved"  # no saved data there yet: training tokenizes the datasets (and saves them)
    rows = train_tab.preview_rows(_args(base, tmp_path, json.dumps({"tokenized_path": str(empty)})))
    assert all(ANSWER in "".join(t for t, tr in segs if tr) for segs, _, _ in rows) and len(rows) == 3
    assert not os.path.exists(empty)  # the preview writes nothing


def test_extra_args_reach_the_run_and_bad_json_names_the_field(tiny_model, tmp_path: Path) -> None:
    base = tiny_model("llama3")
    cmds, text = train_tab.command_preview(_args(base, tmp_path, '{"tokenized_path": "tok", "weight_decay": 0.01}'))
    assert "tokenized_path: tok\n" in text and "weight_decay: 0.01\n" in text
    assert "--tokenized_path tok" in cmds and "--weight_decay 0.01" in cmds
    label = "Extra arguments (JSON: LLaMA-Factory keys)"
    for extra, error in [
        ("{optim: sgd}", f"{label}: expected a JSON object of LLaMA-Factory keys, got '{{optim: sgd}}' (Expecting "
         "property name enclosed in double quotes)"),
        ('["optim"]', f"""{label}: expected a JSON object of LLaMA-Factory keys, got '["optim"]'"""),
    ]:  # fmt: skip
        with pytest.raises(UserError) as e:
            train_tab.start(_args(base, tmp_path, extra), tmp_path / "runs")
        assert str(e.value) == error
        assert "额外参数" in train_tab._failed("zh", e.value)
    with pytest.raises(UserError, match="tokenized_patj"):  # a misspelt key: the CLI's own unknown-key line
        train_tab.command_preview(_args(base, tmp_path, '{"tokenized_patj": "tok"}'))
    assert not (tmp_path / "runs").exists()
