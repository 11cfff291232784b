"""gguf's refusals: each is the only thing printed (no template lines before it), and `--force` replaces only a
previous gguf output, never a training run's dir or a merged model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_lora

from exporter import gguf
from exporter.errors import UserError


def _ours(path: Path, stage: str) -> Path:
    (path / "checkpoint-2").mkdir(parents=True)
    (path / "exporter_manifest.json").write_text(json.dumps({"stage": stage, "outputs": []}))
    return path


def test_existing_out_is_the_only_line(tiny_model, tmp_path):
    """The CLI case the tester hit: `gguf --out <existing>` printed the template lines first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = subprocess.run([sys.executable, "-m", "exporter", "gguf", str(tiny_model("llama3")), "--out", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and lines == [f"error: {out} already exists; pass --force to replace it"], lines


def test_refusals_print_nothing_before_them(tiny_model, tmp_path, capfd):
    """Every refusal of `gguf.run`, model or adapter mode, before any line of output."""
    llama = tiny_model("llama3")
    ad = random_lora(llama, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    cases = [
        (gguf.GGUFOptions(str(llama), out=str(foreign)), "already exists"),
        (gguf.GGUFOptions(str(llama), out=str(foreign), force=True), "is not an exporter output"),
        (gguf.GGUFOptions(str(llama), out=str(_ours(tmp_path / "run", "train")), force=True), "exporter train output"),
        (gguf.GGUFOptions(str(llama), out=str(_ours(tmp_path / "m", "merge")), force=True), "exporter merge output"),
        (gguf.GGUFOptions(str(llama), adapter=str(ad), out=str(tmp_path / "run"), force=True), "train output"),
        (gguf.GGUFOptions(str(llama), adapter=str(ad), types=["q8_0"], out=str(tmp_path / "g")), "with --adapter"),
        (gguf.GGUFOptions(str(llama), template="nope", out=str(tmp_path / "g")), "unknown chat template"),
    ]
    capfd.readouterr()
    for opts, message in cases:
        with pytest.raises(UserError, match=message):
            gguf.run(opts)
        printed = capfd.readouterr()
        assert printed.out == "" and printed.err == "", (message, printed)
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and (tmp_path / "m" / "checkpoint-2").is_dir()
    assert not (tmp_path / "g").exists()


def test_force_replaces_a_previous_gguf_output(tiny_model, tmp_path):
    llama = tiny_model("llama3")
    out = tmp_path / "g"
    gguf.run(gguf.GGUFOptions(str(llama), out=str(out)))
    (out / "marker").write_text("x")
    gguf.run(gguf.GGUFOptions(str(llama), out=str(out), force=True))
    assert not (out / "marker").exists() and (out / "Modelfile.f16").is_file()
