"""exporter predict's generation length against LLaMA-Factory 0.9.5's own do_predict: `max_new_tokens` <= 0 hands
the length to `max_length` (prompt + answer), whose LF default is 1024 (it was refused without an explicit
max_length)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import lf_python
from test_predict import predict_both

LONG = " ".join(f"word{i}" for i in range(330))
ROWS = [  # prompts of ~1020 tokens: LF's default max_length leaves a few tokens to generate
    {"instruction": LONG, "input": "", "output": "Hi there"},
    {"instruction": "长" * 300 + LONG[:900], "input": "", "output": "好"},
]


@pytest.mark.slow
def test_max_new_tokens_zero_uses_lf_default_max_length(tiny_model, tmp_path: Path) -> None:
    lf_python()  # skips at once without LF's venv
    model = tiny_model("qwen2")
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"rows": {"file_name": "rows.json"}}), encoding="utf-8")
    text = (f"model_name_or_path: {model}\nstage: sft\ndo_predict: true\neval_dataset: rows\ndataset_dir: {data}\n"
            "template: qwen\ncutoff_len: 1024\nper_device_eval_batch_size: 1\npredict_with_generate: true\n"
            "do_sample: false\nmax_new_tokens: 0\nreport_to: none\n")  # fmt: skip
    theirs, ours, _ = predict_both(tmp_path, text)
    assert all(row["predict"] for row in theirs)  # LF generated something up to its max_length
    assert ours == theirs
