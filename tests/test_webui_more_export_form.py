"""The Export tab refuses, in one line naming the field and starting nothing, what LLaMA-Factory 0.9.5's export tab
refuses first (webui/components/export.py save_model: err_no_path, err_no_export_dir, err_no_adapter): no model (it
ran `exporter gguf .` on the board's working dir), no export dir (it wrote `merged/` into the working dir) and nothing
to export (it ended at once as a silent "0/0")."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")

from exporter.webui import export_tab  # noqa: E402


def _form(out: Path, **over: object) -> dict:
    f = {"export_out": str(out), "merge_dtype": "auto", "quant_method": "none", "quant_bits": "4", "quant_dataset": "",
         "gguf_types": ["f16"], "ollama_name": "", "verify": False, "verify_prompts": 1, "model": "",
         "adapter": "", "template": "auto", "dataset_dir": ""}  # fmt: skip
    return f | over


def _run(f: dict, tmp_path: Path) -> tuple[list[tuple[str, str]], str, SimpleNamespace]:
    board = SimpleNamespace(export_run=None, runs_dir=tmp_path / "runs", chat_targets=[])
    *_, last = export_tab.run_chain(f, board, "en")
    return re.findall(r'data-stage="(\w+)" data-status="(\w+)"', last[0]), last[1], board


@pytest.mark.parametrize(
    "over, error",
    [
        ({}, "error: Model path (HF dir): set the model to export"),
        ({"adapter": "lora"}, "error: Model path (HF dir): set the model to export"),
        ({"model": "m", "export_out": "  "}, "error: Export dir: set the dir the export writes into"),
        ({"model": "m", "gguf_types": []}, "error: nothing to export: set an adapter to merge, or choose a quantize "
         "method, GGUF types or verify"),
    ],
)  # fmt: skip
def test_export_form_without_model_dir_or_stage_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over: dict, error: str
) -> None:
    monkeypatch.chdir(tmp_path)  # where an empty model or export dir used to point the commands
    (tmp_path / "m").mkdir()
    stages, log, board = _run(_form(tmp_path / "export", **over), tmp_path)
    assert log == error
    assert board.export_run.job is None  # no command started
    assert all(status == "pending" for _, status in stages)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no export dir, no runs dir, no merged/ or gguf/ in the cwd


def test_calibration_dataset_is_checked_before_the_merge(tiny_model, tmp_path: Path) -> None:
    """A GPTQ/AWQ calibration dataset the data dir does not define was found by `exporter quantize` only after the
    merge had run (check_stages promises every stage's options checked first): now the CLI's own line, nothing run."""
    from conftest import random_lora
    from webui_helpers import write_data

    base = tiny_model("qwen2")
    adapter = random_lora(base, tmp_path / "lora", r=4, target_modules=["q_proj"])
    data = write_data(tmp_path / "data")
    f = _form(tmp_path / "export", model=str(base), adapter=str(adapter), quant_method="gptq", quant_dataset="nope",
              gguf_types=[], dataset_dir=str(data))  # fmt: skip
    stages, log, board = _run(f, tmp_path)
    assert log == f"error: --dataset nope: no such file, and dataset 'nope' is not defined in {data}/dataset_info.json"
    assert stages == [("merge", "pending"), ("quantize", "pending")] and board.export_run.job is None
    assert not (tmp_path / "export").exists()
