"""The Export tab checks every stage's options before the first stage runs, and a run again skips the stages an
earlier run finished (same command, files as their manifest says) and reruns a changed one over its own output."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import random_lora, require_llama_cpp

pytest.importorskip("gradio")
pytestmark = pytest.mark.usefixtures("one_thread")

from exporter.webui import export_tab  # noqa: E402


def _run(f: dict, board: SimpleNamespace) -> tuple[list[tuple[str, str]], str]:
    *_, last = export_tab.run_chain(f, board, "en")
    return re.findall(r'data-stage="(\w+)" data-status="(\w+)"', last[0]), last[1]


def test_bad_later_stage_is_found_first_and_a_rerun_recovers(tiny_model, tmp_path: Path) -> None:
    require_llama_cpp()
    base = tiny_model("qwen2")
    adapter = random_lora(base, tmp_path / "lora", r=4, target_modules=["q_proj"])
    board = SimpleNamespace(export_run=None, runs_dir=tmp_path / "runs", chat_targets=[])
    out = tmp_path / "export"
    f = {"export_out": str(out), "merge_dtype": "auto", "quant_method": "none", "quant_bits": "4",
         "quant_dataset": "", "gguf_types": ["f16"], "ollama_name": "Bad Name!", "verify": False,
         "verify_prompts": 1, "model": str(base), "adapter": str(adapter), "template": "auto",
         "dataset_dir": ""}  # fmt: skip
    stages, log = _run(f, board)
    assert log.startswith("error: --ollama-name 'Bad Name!'") and stages == [("merge", "pending"), ("gguf", "pending")]
    assert not out.exists()  # nothing ran (merge used to run, then gguf failed)
    stages, log = _run({**f, "ollama_name": "ok"}, board)
    assert stages == [("merge", "pass"), ("gguf", "pass")], log
    merged = (out / "merged" / "model.safetensors").stat().st_mtime_ns
    stages, log = _run({**f, "ollama_name": "ok"}, board)  # used to be "merge ... already exists; pass --force"
    assert stages == [("merge", "skipped"), ("gguf", "skipped")], log
    stages, log = _run({**f, "ollama_name": "other"}, board)  # a changed gguf option reruns gguf over its output
    assert stages == [("merge", "skipped"), ("gguf", "pass")], log
    assert "ollama create other:f16" in (out / "gguf" / "Modelfile.f16").read_text()
    assert (out / "merged" / "model.safetensors").stat().st_mtime_ns == merged
