"""exporter predict with a LLaMA-Factory `template:` name against LLaMA-Factory 0.9.5's own do_predict: LF's slots
(not the model's Jinja) for the prompt and label, tools through LF's tool formatter, `default_system`,
`enable_thinking` and `tool_format` applied, rows without a response predicted with an empty answer. Real
tokenizers (the `-real` fixtures), so the slot tokenization is LF's on a published vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import lf_python
from test_predict import _exporter, predict_both

ROWS = {
    "alp": [
        {
            "instruction": "把这句话翻译成英文",
            "input": "我爱北京天安门",
            "output": "I love Tiananmen",
            "system": "你是一个翻译助手。",
            "history": [["你好", "你好！"]],
        },
        {"instruction": "Say hi", "input": "", "output": "Hi there"},
    ],
    "sg": [
        {
            "conversations": [
                {"from": "human", "value": "What's the weather in Paris?"},
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                {"from": "observation", "value": '{"temp": 20}'},
                {"from": "gpt", "value": "It is 20 degrees."},
            ],
            "tools": '[{"name": "get_weather", "description": "Get weather", "parameters": {"type": "object", '
            '"properties": {"city": {"type": "string"}}}}]',
        },
    ],
    "unl": [  # mixed: LF cannot concatenate a dataset whose responses are all null with a labelled one
        {"instruction": "Tell me a joke", "input": "", "output": None},
        {"instruction": "Say bye", "input": "", "output": "Bye"},
        {"instruction": "写一首诗", "input": "", "output": None},
    ],
}
INFO = {
    "alp": {"file_name": "alp.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                 "system": "system", "history": "history"}},
    "sg": {"file_name": "sg.json", "formatting": "sharegpt",
           "columns": {"messages": "conversations", "tools": "tools"}},
    "unl": {"file_name": "unl.json"},
}  # fmt: skip

CASES = {  # id: (real-vocabulary family, LF template, datasets, extra YAML)
    # Llama 3.1's Jinja writes a dated system block; LF's llama3 slots do not
    "llama3": ("llama3", "llama3", "alp,unl", ""),
    # LF's mistral: "[INST] " with a space, the system prompt in the first turn; a tools row through its formatter
    "mistral": ("mistral", "mistral", "alp,sg", ""),
    # default_system and tool_format (LF data arguments) change the predict prompt; unlabeled rows are predicted on
    "qwen-system-tools": ("qwen2", "qwen", "sg,alp,unl", "default_system: You are a pirate.\ntool_format: default\n"),
    # enable_thinking: false puts LF's empty thought into the prompt
    "qwen3-nothink": ("qwen3", "qwen3", "alp,unl", "enable_thinking: false\n"),
}


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in ROWS.items():
        (data / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps(INFO), encoding="utf-8")
    return data


@pytest.mark.parametrize("case", list(CASES))
def test_lf_template_prompts_labels_and_scores_equal_llamafactory(case: str, tiny_model, tmp_path: Path) -> None:
    lf_python()  # skips at once without LF's venv
    family, template, datasets, extra = CASES[case]
    model = tiny_model(family, real_vocab=True)
    text = (f"model_name_or_path: {model}\nstage: sft\ndo_predict: true\neval_dataset: {datasets}\n"
            f"dataset_dir: {_data(tmp_path)}\ntemplate: {template}\ncutoff_len: 1024\nper_device_eval_batch_size: 1\n"
            f"predict_with_generate: true\ndo_sample: false\nmax_new_tokens: 4\nreport_to: none\n{extra}")  # fmt: skip
    theirs, ours, said = predict_both(tmp_path, text)
    assert "no effect" not in said.replace("no effect here: report_to", ""), said
    assert len(ours) == len(theirs) and ours == theirs
    lf_scores = json.loads((tmp_path / "lf" / "predict_results.json").read_text(encoding="utf-8"))
    our_scores = json.loads((tmp_path / "ours" / "predict_results.json").read_text(encoding="utf-8"))
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert our_scores[key] == lf_scores[key], key


def test_thinking_and_tool_format_need_an_lf_template(tmp_path: Path) -> None:
    """Without a LLaMA-Factory template name there are no slots for them to shape: one line, exit 2, before any
    work (an unknown tool_format likewise)."""
    data = _data(tmp_path)
    base = ["predict", "--model_name_or_path", str(tmp_path / "none"), "--eval_dataset", "alp", "--dataset_dir",
            str(data), "--output_dir", str(tmp_path / "o")]  # fmt: skip
    for extra, words in ((["--enable_thinking", "false"], "LLaMA-Factory template name"),
                         (["--tool_format", "qwen"], "LLaMA-Factory template name"),
                         (["--template", "qwen", "--tool_format", "nope"], "tool_format 'nope'")):  # fmt: skip
        r = _exporter(*base, *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.splitlines()
        assert words in line, line
    assert not (tmp_path / "o").exists()
