"""CLI and gguf checks: an adapter's relative --base-gguf, --base-gguf without --adapter, repeated single-value
options, `gguf .`, shell-quoted `ollama create` lines, SIGTERM cleanup."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import random_lora
from exporter.converters.modelfile import parse

from exporter import cli, gguf
from exporter.errors import UserError


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=cwd)


def test_relative_base_gguf_is_relative_to_the_modelfile(tiny_model, tmp_path, monkeypatch):
    """`--base-gguf out/qwen2/qwen2-f16.gguf` from the cwd: Ollama resolves a relative FROM in the Modelfile's dir."""
    llama = tiny_model("llama3")
    ad = random_lora(llama, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    (tmp_path / "out" / "base").mkdir(parents=True)
    (tmp_path / "out" / "base" / "b-f16.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    res = gguf.run(gguf.GGUFOptions(str(llama), adapter=str(ad), out="out/lora", base_gguf="out/base/b-f16.gguf"))
    mf = res.modelfiles["f16"]
    from_ = dict(parse(mf.read_text()))["model"]
    assert from_ == "../base/b-f16.gguf", from_
    assert (mf.parent / from_).resolve() == (tmp_path / "out/base/b-f16.gguf").resolve()
    assert gguf.base_from_line("mybase:latest", llama, tmp_path / "out/lora") == "mybase:latest"  # an Ollama name


def test_base_gguf_beside_the_modelfile_is_an_explicit_relative_path(tmp_path):
    """A base GGUF in the Modelfile's own dir (or below) is `./name`, never a bare `name` that reads as an Ollama
    model name; one elsewhere is `../...`; a name that is no file stays as given."""
    out = tmp_path / "out" / "lora"
    (out / "sub").mkdir(parents=True)
    for rel in ("b.gguf", "sub/b.gguf"):
        (out / rel).write_bytes(b"GGUF")
        assert gguf.base_from_line(str(out / rel), tmp_path, out) == f"./{rel}"
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert gguf.base_from_line(str(tmp_path / "b.gguf"), tmp_path, out) == "../../b.gguf"
    assert gguf.base_from_line(None, tmp_path, out) == str(tmp_path.resolve())


def test_base_gguf_without_adapter_is_refused(tiny_model, tmp_path):
    r = _run("gguf", str(tiny_model("llama3")), "--base-gguf", "x.gguf", "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--base-gguf" in r.stderr and "--adapter" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["gguf", "M", "-t", "q4_k_m", "-t", "q8_0"],
        ["gguf", "M", "--type", "f16", "--type=q8_0"],
        ["gguf", "M", "-tq8_0", "--type", "f16"],
        ["gguf", "M", "--adapter", "A", "--adapter", "B"],
        ["gguf", "M", "--template", "qwen", "--out", "o", "--template", "chatml"],
        ["gguf", "M", "--out", "a", "-o", "b"],
        ["--debug", "template", "show", "qwen-2.5", "--format", "jinja", "--format", "ollama"],
        ["merge", "--base", "b", "--adapter", "a", "--out", "o", "--out", "p"],
    ],
)
def test_repeated_single_value_option_is_an_error(argv):
    message = cli._repeated_option(argv)
    assert message is not None and "given twice" in message, message


@pytest.mark.parametrize(
    "argv",
    [
        ["gguf", "M", "-t", "q4_k_m,q8_0", "--force", "--force"],
        ["merge", "--base", "b", "--adapter", "a", "--adapter", "c", "--weight", "1", "--weight", "2", "--out", "o"],
        ["verify", "--gguf", "a", "--gguf", "b", "--data", "x", "--data", "y"],
        ["train", "--template", "qwen", "--template", "llama3"],  # passed through to LF's parser
        ["export", "cfg.yaml", "--template", "x", "--template", "y"],
        ["template", "show", "qwen-2.5", "--eos-token", "--format"],  # a value that looks like an option
        ["gguf", "M", "--", "-t", "-t"],
    ],
)
def test_repeatable_options_and_pass_through_verbs_are_untouched(argv):
    assert cli._repeated_option(argv) is None


def test_repeated_type_exits_2_before_any_work(tiny_model, tmp_path):
    r = _run("gguf", str(tiny_model("llama3")), "-t", "q4_k_m", "-t", "q8_0", "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and r.stderr.startswith("error: --type is given twice") and r.stderr.count("\n") == 1
    assert not (tmp_path / "g").exists()


def test_gguf_dot_writes_beside_the_model(tiny_model, tmp_path):
    model = tmp_path / "q3"
    shutil.copytree(tiny_model("llama3"), model)
    r = _run("gguf", ".", cwd=model)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q3-gguf" / "q3-f16.gguf").is_file() and (tmp_path / "q3-gguf" / "Modelfile.f16").is_file()
    assert "ollama create q3:f16 -f " in r.stdout
    assert gguf.default_out(Path(".")) == Path.cwd().parent / f"{Path.cwd().name}-gguf"


def test_ollama_create_line_is_shell_quoted(tmp_path):
    line = gguf.create_command("m:f16", tmp_path / "my out (v2)" / "Modelfile.f16")
    assert line == f"ollama create m:f16 -f '{tmp_path}/my out (v2)/Modelfile.f16'"
    assert gguf.create_command("m:f16", Path("g/Modelfile.f16")) == "ollama create m:f16 -f g/Modelfile.f16"


def test_sigterm_cleans_up_like_ctrl_c(tiny_model, tmp_path):
    """SIGTERM mid-conversion: exit 143, no `out.tmp-*` dir and no lock file left (as with SIGINT)."""
    out = tmp_path / "g"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = (
        "import sys, time\nimport exporter.converters.gguf_convert as c\n"
        "c.convert = lambda *a, **k: time.sleep(120)\n"  # conversion under way: the temp dir exists
        "sys.argv = ['exporter', 'gguf', sys.argv[1], '--out', sys.argv[2]]\nfrom exporter.cli import main\nmain()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_model("llama3")), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith("g.tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    assert any(p.name.startswith("g.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    before = signal.getsignal(signal.SIGTERM)  # `main` called in-process (tests) leaves the handler as it was
    old_argv, sys.argv = sys.argv, ["exporter", "--version"]
    try:
        with pytest.raises(SystemExit):
            cli.main()
    finally:
        sys.argv = old_argv
    assert signal.getsignal(signal.SIGTERM) == before


def test_base_gguf_check_is_a_user_error(tiny_model):
    with pytest.raises(UserError, match="needs --adapter"):
        gguf.run(gguf.GGUFOptions(str(tiny_model("llama3")), base_gguf="x.gguf"))


def test_verify_data_file_without_text_is_refused(tmp_path):
    from exporter.verify.artifacts import data_texts

    junk = tmp_path / "junk.json"
    junk.write_text('[{"foo": 1}]')
    with pytest.raises(UserError, match=r"data .*junk.json: no text in any row"):
        data_texts(junk)
    ok = tmp_path / "ok.json"
    ok.write_text('[{"instruction": "Say hi", "output": "hi"}]')
    assert data_texts(ok) == (["Say hi", "hi"], ["Say hi"])


def test_detect_without_a_template_names_no_missing_option(tiny_model, tmp_path):
    from test_derive import with_template

    model = with_template(tiny_model("qwen2"), "", tmp_path / "m")
    (model / "chat_template.jinja").unlink()
    r = _run("template", "detect", str(model))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing to detect" in r.stderr
    assert "pass --template" not in r.stderr


def test_render_ollama_list_content_names_file_and_message(tmp_path):
    conv = tmp_path / "conv.json"
    conv.write_text('[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]')
    r = _run("template", "render", "qwen-2.5", str(conv), "--format", "ollama")
    assert r.returncode == 2 and r.stderr == f"error: {conv}: message 0 content is a list; Ollama's messages hold " \
        "text: give it as a string\n", r.stderr  # fmt: skip


def test_a_directory_where_a_file_is_expected(tmp_path):
    r = _run("template", "render", "qwen-2.5", str(tmp_path))
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path} is a directory, expected a conversation JSON file\n"
    r = _run("export", str(tmp_path))
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path} is a directory, expected a config file (CONFIG.yaml)\n"
