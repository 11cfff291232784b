"""exporter verify's `modelfile` row: what `ollama create -f Modelfile` does before any model runs.

References: Ollama's parser (ollama/ollama v0.33 parser/parser.go: FROM and ADAPTER resolved from the Modelfile's
folder, a FROM naming no file taken as a model name; every PARAMETER through api.FormatParams), and real Go's
`strconv.ParseInt(s, 10, 64)` / `ParseFloat(s, 32)` / `ParseBool`, the calls FormatParams makes on each value."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import require_go, require_llama_cpp

from exporter import verify as V
from exporter.verify.modelfile import check_modelfiles, go_value_error

FAST = {"prompts": 1, "max_new_tokens": 4, "ctx": 64, "max_windows": 2}


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """The qwen2 fixture's f16 GGUF and Modelfile, as the gguf stage writes them (FROM ./<stem>-f16.gguf)."""
    require_llama_cpp()
    from exporter import gguf, templates

    root = tmp_path_factory.mktemp("verify-modelfile")
    merged = root / "merged"
    shutil.copytree(tiny_model("qwen2"), merged)
    tpl = templates.resolve(merged, "qwen-2.5")
    templates.write_into(merged, tpl)
    res = gguf.export(merged, ["f16"], tpl, root / "gguf")
    return SimpleNamespace(merged=merged, f16=res.files["f16"], mf=res.modelfiles["f16"])


def _row(path: Path):
    (row,) = check_modelfiles([V.parse_modelfile(path)])
    return row


def test_from_resolves_from_the_modelfiles_folder(good, tmp_path: Path, monkeypatch) -> None:
    """The gguf stage's Modelfile passes from any working directory; the same Modelfile copied away from its GGUF
    fails naming the path Ollama looked at; a FROM that names a model (no path) is a warning, not a failure; verify
    itself reports the row."""
    monkeypatch.chdir(tmp_path)  # Ollama resolves from the Modelfile's folder, not the working directory
    ok = _row(good.mf)
    assert ok.status == "pass", ok.detail
    moved = tmp_path / "Modelfile.f16"
    shutil.copy(good.mf, moved)
    bad = _row(moved)
    assert bad.status == "fail" and f"FROM ./{good.f16.name}: no such file" in bad.detail, bad.detail
    assert str(tmp_path / good.f16.name) in bad.detail
    named = tmp_path / "Modelfile.named"
    named.write_text("FROM qwen2.5:0.5b\nPARAMETER temperature 0.7\n")
    assert _row(named).status == "warn"
    adapter = tmp_path / "Modelfile.adapter"
    adapter.write_text(f"FROM {good.f16}\nADAPTER ./lora.gguf\n")
    assert "ADAPTER ./lora.gguf: no such file" in _row(adapter).detail
    rep = V.verify(
        V.VerifyOptions(merged=good.merged, ggufs=[good.f16], modelfiles=[moved], template="qwen-2.5", **FAST)
    )
    rows = {(c.check, c.status) for c in rep.checks if c.target == moved.name}
    assert ("modelfile", "fail") in rows and not rep.passed


def test_parameters_ollama_create_refuses(good, tmp_path: Path) -> None:
    """transformers' names (`repetition_penalty`, `max_new_tokens`), a misspelt case, a float top_k, a word for
    num_ctx: `ollama create` stops on each (unknown parameter / invalid int value); verify fails each by name.
    A deprecated one is a warning, and num_ctx above the GGUF's context_length (Ollama cuts it) too."""
    (tmp_path / good.f16.name).symlink_to(good.f16)
    head = good.mf.read_text()
    cases = {
        "PARAMETER repetition_penalty 1.1": "PARAMETER repetition_penalty: `ollama create` refuses it (unknown "
        "parameter); Ollama's name is repeat_penalty",
        "PARAMETER max_new_tokens 256": "Ollama's name is num_predict",
        "PARAMETER Temperature 0.7": "Ollama's name is temperature",
        "PARAMETER top_k 20.0": "PARAMETER top_k 20.0: not a whole number",
        "PARAMETER num_ctx 8k": "PARAMETER num_ctx 8k: not a whole number",
        "PARAMETER temperature 0,7": "PARAMETER temperature 0,7: not a number",
    }
    for line, expected in cases.items():
        mf = tmp_path / "Modelfile.f16"
        mf.write_text(head + line + "\n")
        row = _row(mf)
        assert row.status == "fail" and expected in row.detail, (line, row.detail)
    for line, expected in {
        "PARAMETER mirostat 2": "PARAMETER mirostat is deprecated",
        "PARAMETER num_ctx 65536": "num_ctx 65536 is above the GGUF's context_length 32768",
    }.items():
        mf.write_text(head + line + "\n")
        row = _row(mf)
        assert row.status == "warn" and expected in row.detail, (line, row.detail)
    mf.write_text(head + "PARAMETER num_ctx 4096\nPARAMETER top_p 9e-1\nPARAMETER use_mmap true\n")
    assert _row(mf).status == "pass"


_GO = """package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

func main() {
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		kind, s, _ := strings.Cut(sc.Text(), " ")
		var err error
		switch kind {
		case "int":
			_, err = strconv.ParseInt(s, 10, 64)
		case "float":
			_, err = strconv.ParseFloat(s, 32)
		case "bool":
			_, err = strconv.ParseBool(s)
		}
		fmt.Println(err == nil)
	}
}
"""


def test_value_parsing_is_gos(tmp_path: Path) -> None:
    """Each value's accept/refuse equals real Go's strconv, the functions Ollama's FormatParams calls."""
    go = require_go()
    values = {
        "int": ["42", "-3", "+7", "0", "20.0", "1e3", "8k", " 5", "9223372036854775807", "9223372036854775808", "0x10",
                "1_000", ""],
        "float": ["0.7", ".5", "5.", "-1", "+2.5", "1e-3", "9e-1", "0,7", "inf", "-Inf", "+Infinity", "NaN", "nan",
                  "0x1p-2", "1e39", "3.4028235e38", "3.5e38", "1_0", "1__0", "_1", "1_", "1_.5", "0x_1p0", "1e1_0",
                  "abc", "1.2.3", "", "e5", "0x1.8p1"],
        "bool": ["true", "True", "TRUE", "t", "1", "false", "F", "0", "yes", "on", "tRUE", ""],
    }  # fmt: skip
    src = tmp_path / "main.go"
    src.write_text(_GO)
    lines = [f"{kind} {v}" for kind, vs in values.items() for v in vs]
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off", "GOCACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [go, "run", str(src)], input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    go_ok = [w == "true" for w in out.stdout.split()]
    ours = [go_value_error(line.split(" ", 1)[0], line.split(" ", 1)[1]) is None for line in lines]
    differ = {line: (g, o) for line, g, o in zip(lines, go_ok, ours, strict=True) if g != o}
    assert not differ, json.dumps(differ)
