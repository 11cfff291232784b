"""`exporter verify --eval-task / --eval-questions` without `--eval`: they choose what the accuracy check asks, and
without a benchmark dir there is no accuracy check, so they would change nothing; refused in one line, before any
model is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("flag", [["--eval-task", "mmlu_test"], ["--eval-questions", "3"]])
def test_eval_options_without_eval_dir_are_refused(tiny_model, flag: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "exporter", "verify", "--merged", str(tiny_model("qwen2")), *flag],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --eval-task / --eval-questions") and r.stderr.count("\n") == 1, r.stderr
