"""The README's first command: `bash scripts/demo.sh` builds the tiny base, trains, merges, converts and verifies with
every check passing (exit 0); a rerun skips the finished stages and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _demo(run) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUN": str(run)}
    return subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)


def test_demo_passes_and_rerun_skips(tmp_path):
    run = tmp_path / "demo"
    first = _demo(run)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    report = json.loads((run / "verify" / "report.json").read_text())
    statuses = [c["status"] for c in report["checks"]]
    assert statuses and "fail" not in statuses, [c for c in report["checks"] if c["status"] == "fail"]
    assert {"template", "perplexity", "chat"} <= {c["check"] for c in report["checks"]}
    ggufs = sorted(p.name for p in (run / "gguf").glob("*.gguf"))
    assert len(ggufs) == 3 and all((run / "gguf" / f"Modelfile.{t}").is_file() for t in ("f16", "q8_0", "q4_k_m"))
    stamp = {p: p.stat().st_mtime_ns for p in (run / "gguf").iterdir()}

    again = _demo(run)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "skipped: train, merge, gguf, verify" in " ".join(again.stdout.split()), again.stdout[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (run / "gguf").iterdir()} == stamp
