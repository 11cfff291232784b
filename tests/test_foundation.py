"""Config, atomic output, manifest, hub resolution and the CLI's error contract."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import atomic, config, hub, manifest
from exporter.errors import UserError


@dataclasses.dataclass
class _Cfg:
    model_name_or_path: str
    lora_rank: int = 8
    learning_rate: float = 1e-4
    bf16: bool = False
    dataset: list[str] = dataclasses.field(default_factory=list)
    stage: str = "sft"


def test_config_yaml_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model_name_or_path: m\nlora_rank: 4\ndataset: a,b\n")
    cfg = config.load(_Cfg, f, ["lora_rank=16", "bf16=true", "learning_rate=5e-5"])
    assert cfg == _Cfg("m", 16, 5e-5, True, ["a", "b"])


def test_config_unknown_key_did_you_mean(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model_name_or_path: m\nlora_rnak: 4\n")
    with pytest.raises(UserError, match=r"unknown key 'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        config.load(_Cfg, f)


def test_config_type_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="lora_rank must be an integer"):
        config.load(_Cfg, None, ["model_name_or_path=m", "lora_rank=big"])
    with pytest.raises(UserError, match="missing required key"):
        config.load(_Cfg, None, [])
    with pytest.raises(UserError, match="key=value"):
        config.load(_Cfg, None, ["nokey"])


def test_read_json_names_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError, match=r"x.json: not valid JSON at line 2 column 7"):
        config.read_json(f)
    f.write_text('{"a": [1]}')
    assert config.read_json(f) == {"a": [1]}


def test_atomic_dir_success_and_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        (tmp / manifest.MANIFEST_NAME).write_text("{}")  # an exporter output: --force may replace it
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    with pytest.raises(UserError, match="already exists"):
        with atomic.atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(out, force=True) as tmp:
            (tmp / "b.txt").write_text("y")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written left behind
    assert (out / "a.txt").exists() and not (out / "b.txt").exists()
    with atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "c.txt").write_text("z")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    with pytest.raises(UserError, match="not an exporter output"):  # no marker: never replaced
        with atomic.atomic_dir(out, force=True):
            pass


def test_atomic_file(tmp_path: Path) -> None:
    out = tmp_path / "f.bin"
    with pytest.raises(ValueError):
        with atomic.atomic_file(out) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic.atomic_file(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole"


def test_only_this_outputs_leftovers_are_removed(tmp_path: Path, capsys) -> None:
    """A run writing `out` removes what killed runs left as `out`'s temporaries (atomic's exact names), never another
    output's, a user's file that merely looks alike, nor (for a file output) a live writer's temporary."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, live = int(dead.stdout), os.getpid()
    stale = [f"out.tmp-{pid}-abcd_123"]
    # `out.old-<pid>`: an older version's name, without the random part, is a user's (test_faults)
    kept = [f"other.tmp-{pid}-abcd_123", f"out.tmp-{pid}-backup", f"out.tmp-{pid}-abcd_123.txt", "out.bak",
            f"out.old-{pid}"]  # fmt: skip
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("keep me")
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / manifest.MANIFEST_NAME).write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])
    err = capsys.readouterr().err
    assert all(f"removed {tmp_path / name}" in err for name in stale), err
    # a file output: only dead writers' temporaries go; a live one (this process) is another run's, still writing
    (tmp_path / f"f.json.tmp-{pid}-abcd1234").write_text("dead")
    (tmp_path / f"f.json.tmp-{live}-abcd1234").write_text("alive")
    with atomic.atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    assert not (tmp_path / f"f.json.tmp-{pid}-abcd1234").exists()
    assert (tmp_path / f"f.json.tmp-{live}-abcd1234").read_text() == "alive"


def test_free_space_check(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not enough free disk"):
        atomic.check_free_space(tmp_path / "x" / "y", 1 << 60)
    atomic.check_free_space(tmp_path, 1)


def test_manifest(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("hello")
    out = tmp_path / "out"
    out.mkdir()
    (out / "w.bin").write_bytes(b"abc")
    path = manifest.write(out, "test", {"base": src, "hub": "org/model"}, {"k": 1})
    doc = json.loads(path.read_text())
    assert doc["inputs"]["base"]["files"][0]["sha256"] == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    assert doc["inputs"]["hub"] == {"source": "org/model"}
    assert [o["path"] for o in doc["outputs"]] == ["w.bin"]
    assert doc["versions"]["torch"].startswith("2.13.0")


def test_hub_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.resolve(tmp_path) == tmp_path
    with pytest.raises(UserError, match="no such directory"):
        hub.resolve(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="fetching it from the Hugging Face hub failed"):
        hub.resolve("no-such-owner/no-such-model")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True)


def test_cli_version_and_help() -> None:
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("exporter ")
    r = _cli("--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_installed_package_ships_data() -> None:
    """`pip install .` (non-editable, as CI installs it) must carry the template families and LLaMA-Factory's table,
    the Go renderer source, verify's built-in corpora and the converters under the `exporter` import name."""
    import importlib.resources

    families = [p.name for p in importlib.resources.files("exporter.families").iterdir() if p.name.endswith(".yaml")]
    assert {"llama-2.yaml", "llama-3.1.yaml", "qwen-2.5.yaml", "qwen-3.yaml", "gemma-3.yaml", "phi-3.yaml"} <= set(
        families
    )
    lf = importlib.resources.files("exporter.families").joinpath("llamafactory/templates.yaml")  # LF's table
    assert "qwen3_5_nothink:" in lf.read_text(encoding="utf-8")
    assert importlib.resources.files("exporter.gotmpl").joinpath("main.go").read_text().startswith("//")
    assert importlib.resources.files("exporter.converters").joinpath("gguf_arch.py").is_file()
    corpora = importlib.resources.files("exporter.verify.corpora")
    for name in ("tokenizer_texts.json", "conversations.json", "prompts.json", "held_out.txt"):
        assert corpora.joinpath(name).read_text(encoding="utf-8").strip(), name


def test_progress_state_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EXPORTER_PROGRESS_FILE gets the bar's done/total and an ETA from the rate so far (the board reads it)."""
    import time

    from exporter.progress import progress, read

    f = tmp_path / "p.json"
    monkeypatch.setenv("EXPORTER_PROGRESS_FILE", str(f))
    monkeypatch.setenv("EXPORTER_NO_PROGRESS", "1")  # the terminal bar off; the file still written
    with progress("predict", "samples", 4) as advance:
        assert read(f) == {"what": "predict", "unit": "samples", "done": 0, "total": 4, "elapsed_s": 0.0,
                           "eta_s": None}  # fmt: skip
        time.sleep(0.6)
        advance()
        mid = read(f)
        assert mid["done"] == 1 and 3 * 0.6 <= mid["eta_s"] <= 3 * mid["elapsed_s"] + 0.01, mid
        advance(3)
    end = read(f)
    assert (end["done"], end["total"], end["eta_s"]) == (4, 4, 0.0)
    f.unlink()
    with progress("train", "loss {task.fields[loss]}", 2, show=False, loss="-") as advance:  # another rank
        advance(2)
    assert not f.exists() and not list(tmp_path.iterdir())
