"""Hostile inputs and faults, command by command: each case asserts the exit code, the one line naming the culprit,
and what is (not) left on disk. Nothing runs code from a checkpoint, no user file is lost, nothing non-finite is
written, a killed run leaves nothing that the next run does not name and remove.

Most cases run the CLI in this process (`_cli`, exit code from SystemExit, stderr from capsys); kills, concurrent
writers and disk-full run real child processes. Disk full: a 1 MiB tmpfs when this process may mount one (root,
as in CI), else ENOSPC injected at the write layer (`os.write`) in-process.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import pipeline_yaml, random_lora, require_llama_cpp, require_quant
from safetensors.torch import load_file, save_file

from exporter import atomic, cli, pipeline, quiet
from exporter.errors import UserError
from exporter.manifest import MANIFEST_NAME

# ----------------------------------------------------------------------------------------------------------- helpers


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run `exporter ARGS` in this process: (exit code, stderr); with capfd, stderr includes what C code wrote.
    The libraries a command marks absent (exporter/quiet.py) are unmarked after it, as in a new process."""
    old, marked = sys.argv, {n for n in quiet.OPTIONAL_LIBRARIES if n not in sys.modules}
    sys.argv = ["exporter", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
        for name in marked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return code, capsys.readouterr().err


def _one_error(err: str, pattern: str) -> str:
    """stderr holds exactly one `error:` line, it matches `pattern`, and there is no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _refused(capsys: pytest.CaptureFixture, pattern: str, *args: str) -> str:
    code, err = _cli(capsys, *args)
    assert code == 2, err
    return _one_error(err, pattern)


def _leftovers(where: Path) -> list[str]:
    """Temporary dirs/files and lock files of ours under `where`."""
    return sorted(p.name for p in where.rglob("*") if re.search(r"\.(tmp|old)-|\.exporter-lock$", p.name))


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _poke(model: Path, tensor: str, value: float, row: int = 0) -> None:
    """Set one value of a tensor in a copied model/adapter dir."""
    for f in model.glob("*.safetensors"):
        sd = load_file(f)
        key = next((k for k in sd if tensor in k), None)
        if key is not None:
            sd[key][row].view(-1)[0] = value
            save_file(sd, f, metadata={"format": "pt"})
            return
    raise AssertionError(f"no tensor {tensor} in {model}")


def _adapter(base: Path, out: Path, **lora) -> Path:
    """A small PEFT LoRA adapter (random non-zero B) saved by PEFT."""
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    return random_lora(base, out, torch.float32, r=4, lora_alpha=8, **lora)


def _edit_json(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama3")


@pytest.fixture(scope="module")
def lora(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _adapter(llama, tmp_path_factory.mktemp("lora") / "ad")


# A child process that runs the CLI with one function wrapped: on its first call it writes FLAG and waits until GO
# exists (or forever), so the test can kill it, or run a second writer, at a known point in the middle of a write.
_PAUSED = textwrap.dedent(
    """
    import importlib, os, sys, time
    module, attr, flag, go = sys.argv[1:5]
    mod = importlib.import_module(module)
    owner, name = (getattr(mod, attr.split(".")[0]), attr.split(".")[1]) if "." in attr else (mod, attr)
    orig = getattr(owner, name)
    def paused(*a, **k):
        if not os.path.exists(flag):
            open(flag, "w").close()
            while not os.path.exists(go):
                time.sleep(0.02)
        return orig(*a, **k)
    setattr(owner, name, paused)
    from exporter import cli
    sys.argv = ["exporter", *sys.argv[5:]]
    cli.main()
    """
)


@contextlib.contextmanager
def _paused(tmp: Path, target: str, *args: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A child `exporter ARGS` stopped inside `module:attr` (mid-write); yields (process, go-file)."""
    module, attr = target.split(":")
    flag, go = tmp / "paused.flag", tmp / "paused.go"
    flag.unlink(missing_ok=True)
    go.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _PAUSED, module, attr, str(flag), str(go), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not flag.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the child ended before pausing: {proc.communicate()}")
            assert time.time() < deadline, "the child never reached the pause point"
            time.sleep(0.05)
        yield proc, go
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sub(*args: str) -> subprocess.CompletedProcess:
    # --verbose passes llama.cpp's own log through as its C logger writes it: token pieces may split a UTF-8 character
    return subprocess.run([sys.executable, "-m", "exporter", *map(str, args)], capture_output=True, text=True,
                          errors="backslashreplace")  # fmt: skip


# ------------------------------------------------------------------------------------------- atomic outputs, locks


def test_outputs_follow_the_umask(llama: Path, lora: Path, tmp_path: Path) -> None:
    """Exported dirs are 0755 and files 0644 under umask 022 (0750/0640 under 027), never tempfile's 0700/0600."""
    for umask, dmode, fmode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        out = tmp_path / f"m{umask:o}"
        r = subprocess.run(
            [sys.executable, "-c", f"import os, sys; os.umask({umask}); from exporter import cli; "
             f"sys.argv = ['exporter', 'merge', '--base', {str(llama)!r}, '--adapter', {str(lora)!r}, "
             f"'--out', {str(out)!r}]; cli.main()"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(out.stat().st_mode) == dmode
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert set(modes.values()) == {fmode}, modes


def test_second_writer_exits_2_naming_the_holder(llama: Path, lora: Path, tmp_path: Path) -> None:
    """Two merges into one --out: the one that finds the other mid-write exits 2 naming its pid and command; the
    first still finishes."""
    out = tmp_path / "merged"
    args = ("merge", "--base", llama, "--adapter", lora, "--out", out)
    with _paused(tmp_path, "exporter.shards:ShardWriter.write", *args) as (first, go):
        second = _sub(*args, "--force")
        assert second.returncode == 2, second.stderr
        line = _one_error(second.stderr, rf"{re.escape(str(out))} is being written by another exporter run")
        assert f"pid {first.pid}: " in line and "merge --base" in line
        go.touch()
        assert first.wait(120) == 0, first.communicate()
    assert (out / "config.json").is_file() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("stage", "target"),
    [("merge", "exporter.shards:ShardWriter.write"), ("gguf", "exporter.converters.gguf_convert:_pwrite")],
)
def test_kill_9_mid_write_then_rerun(stage: str, target: str, llama: Path, lora: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of writing leaves only a temp dir; the next run names and removes it and succeeds."""
    out = tmp_path / "out"
    args = ("merge", "--base", llama, "--adapter", lora) if stage == "merge" else ("gguf", llama, "-t", "f16,q8_0")
    with _paused(tmp_path, target, *args, "--out", out) as (proc, _):
        temps = [p for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")]
        assert temps and not out.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = _sub(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"removed {temps[0]}" in r.stderr and "left behind by an interrupted run" in r.stderr
    assert out.is_dir() and (out / MANIFEST_NAME).is_file()
    assert _leftovers(tmp_path) == []


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode == 0


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A dir whose disk fills after ~1 MiB: a real tmpfs when possible, else the merge's shard writer and the GGUF
    converter's pwrite failing with ENOSPC after 1 MiB. The free-space check before writing is bypassed, as when
    another process fills the disk meanwhile."""
    from exporter.converters import gguf_convert

    from exporter import gguf, shards

    where = tmp_path / "small"
    mounted = _mount_tmpfs(where, "1m")
    monkeypatch.setattr(atomic, "check_free_space", lambda *a: None)
    monkeypatch.setattr(gguf, "check_free_space", lambda *a: None)
    if not mounted:
        written = {"n": 0}

        def full(real):
            def write(*a, **k):
                written["n"] += 2**19
                if written["n"] > 2**20:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(*a, **k)

            return write

        monkeypatch.setattr(shards.ShardWriter, "write", full(shards.ShardWriter.write))
        monkeypatch.setattr(gguf_convert, "_pwrite", full(gguf_convert._pwrite))
    try:
        yield where
    finally:
        if mounted:
            _umount(where)


def _umount(where: Path) -> None:
    """Unmount a test tmpfs; busy means this process left a file open there (a leaked descriptor): a failure."""
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)])
        raise AssertionError(f"{where} was still in use after the command: a file descriptor leaked")


@pytest.mark.parametrize("stage", ["merge", "gguf"])
def test_disk_full_mid_write(stage: str, full_disk: Path, llama: Path, lora: Path, capsys) -> None:
    out = full_disk / "out"
    args = ("merge", "--base", llama, "--adapter", lora) if stage == "merge" else ("gguf", llama, "-t", "f32")
    pattern = rf"disk full under {re.escape(str(full_disk))} while writing {re.escape(str(out))} .*needed"
    line = _refused(capsys, pattern, *args, "--out", out)
    assert "the partial output was removed" in line
    assert list(full_disk.iterdir()) == []


def test_not_enough_space_before_writing(tmp_path: Path, llama: Path, lora: Path, capsys) -> None:
    where = tmp_path / "small"
    if not _mount_tmpfs(where, "256k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = where / "merged"
        _refused(capsys, r"not enough free disk under .*need about", "merge", "--base", llama, "--adapter", lora,
                 "--out", out)  # fmt: skip
        assert list(where.iterdir()) == []
    finally:
        _umount(where)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """`path` read-only: a read-only bind mount as root (root ignores mode bits), chmod 0555 otherwise."""
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        ok = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)]).returncode == 0
        if not ok:
            pytest.skip("cannot make a read-only mount here")
        try:
            yield
        finally:
            subprocess.run(["umount", str(path)])
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_read_only_output_dir(tmp_path: Path, llama: Path, lora: Path, capsys) -> None:
    ro = tmp_path / "ro"
    with _read_only(ro):
        _refused(capsys, rf"cannot write into {re.escape(str(ro))}: (Read-only file system|permission denied)",
                 "merge", "--base", llama, "--adapter", lora, "--out", ro / "merged")  # fmt: skip
        _refused(capsys, rf"cannot write into {re.escape(str(ro))}", "gguf", llama, "--out", ro / "g")
        assert list(ro.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------- merge


def test_merge_force_never_replaces_an_input(llama: Path, tmp_path: Path, capsys) -> None:
    base = _copy(llama, tmp_path / "base")
    ad = _adapter(base, tmp_path / "work" / "ad")
    before = {"base": _tree(base), "ad": _tree(ad)}
    for out in (base, ad, tmp_path / "work", base / "sub"):
        _refused(capsys, rf"output {re.escape(str(out))} overlaps the input", "merge", "--base", base, "--adapter",
                 ad, "--out", out, "--force")  # fmt: skip
    assert {"base": _tree(base), "ad": _tree(ad)} == before
    assert _leftovers(tmp_path) == []


def test_merge_force_never_replaces_a_user_dir(llama: Path, lora: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _refused(capsys, r"not an exporter output .*not replacing it", "merge", "--base", llama, "--adapter", lora,
             "--out", out, "--force")  # fmt: skip
    assert (out / "notes.txt").read_text() == "keep me" and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"r": 0}, r"adapter_config\.json: r is 0; expected a positive integer"),
        ({"lora_alpha": "sixteen"}, r"adapter_config\.json: lora_alpha is 'sixteen'; expected a finite number"),
        ({"rank_pattern": {"q_proj": -2}}, r"rank_pattern\.q_proj is -2"),
    ],
)
def test_bad_adapter_numbers(change: dict, pattern: str, llama: Path, lora: Path, tmp_path: Path, capsys) -> None:
    ad = _copy(lora, tmp_path / "ad")
    _edit_json(ad / "adapter_config.json", **change)
    for args in (("merge", "--base", llama, "--adapter", ad), ("gguf", llama, "--adapter", ad)):
        _refused(capsys, pattern, *args, "--out", tmp_path / "out")
        assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_non_utf8_adapter_config(llama: Path, lora: Path, tmp_path: Path, capsys) -> None:
    ad = _copy(lora, tmp_path / "ad")
    raw = (ad / "adapter_config.json").read_bytes()
    (ad / "adapter_config.json").write_bytes(raw[:10] + b"\xff\xfe" + raw[10:])
    _refused(capsys, r"adapter_config\.json: not UTF-8 text: byte 10 \(line 2\)", "merge", "--base", llama,
             "--adapter", ad, "--out", tmp_path / "out")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ gguf


@pytest.mark.parametrize(
    ("value", "types", "pattern"),
    [
        (float("nan"), "f16", r"non-finite values \(inf/nan\) in rows 0-"),
        (float("inf"), "q8_0", r"non-finite values \(inf/nan\) in rows 0-"),
        (1e5, "f16", r"\|value\| up to 99840 in rows 0-\d+ overflows F16 .*use --type bf16 or f32"),
    ],
)
def test_gguf_refuses_non_finite(value, types, pattern, llama: Path, tmp_path: Path, capsys) -> None:
    model = _copy(llama, tmp_path / "model")
    _poke(model, "layers.1.mlp.down_proj.weight", value)
    out = tmp_path / "g"
    line = _refused(capsys, pattern, "gguf", model, "-t", types, "--out", out)
    assert "model.layers.1.mlp.down_proj.weight" in line and "model.safetensors" in line
    assert not out.exists() and _leftovers(tmp_path) == []
    # bf16 holds 1e5: the same model converts to bf16
    if value == 1e5:
        code, err = _cli(capsys, "gguf", model, "-t", "bf16", "--out", out)
        assert code == 0, err


def test_block_max_abs_is_exact() -> None:
    """The converter's per-block check (two integer max passes) equals numpy's |x|.max() and sees every inf/nan."""
    import numpy as np
    from exporter.converters.gguf_quant import max_abs

    rng = np.random.default_rng(1)
    for dtype, np_type in (("F32", np.float32), ("F16", np.float16), ("BF16", np.float32)):
        for sign in (1, -1, 0):
            x = (rng.standard_normal(4096) * 10 ** rng.uniform(-3, 3)).astype(np_type)
            x = np.abs(x) * sign if sign else x
            raw = (x.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else x
            ref = np.abs((raw.astype(np.uint32) << 16).view(np.float32)) if dtype == "BF16" else np.abs(x)
            assert max_abs(raw, dtype) == float(ref.max())
            for bad in (np.nan, np.inf, -np.inf, -np.nan):
                poisoned = raw.copy()
                b = np.array([bad], dtype=np_type)
                poisoned[rng.integers(4096)] = (
                    (b.view(np.uint32) >> 16).astype(np.uint16)[0] if dtype == "BF16" else b[0]
                )
                assert not np.isfinite(max_abs(poisoned, dtype))


def test_gguf_adapter_refuses_non_finite_and_another_base(llama: Path, lora: Path, tmp_path: Path, capsys) -> None:
    ad = _copy(lora, tmp_path / "ad")
    _poke(ad, "layers.0.self_attn.v_proj.lora_B", float("nan"))
    _refused(capsys, r"ad: model\.layers\.0\.self_attn\.v_proj\.lora_B holds non-finite values \(inf/nan\)",
             "gguf", llama, "--adapter", ad, "--out", tmp_path / "out")  # fmt: skip
    other = _copy(lora, tmp_path / "other")  # trained on a narrower model: A has 64 input columns
    sd = load_file(other / "adapter_model.safetensors")
    key = next(k for k in sd if "layers.0.self_attn.q_proj.lora_A" in k)
    sd[key] = sd[key][:, :64].contiguous()
    save_file(sd, other / "adapter_model.safetensors")
    _refused(capsys, r"is for another base: its LoRA for model\.layers\.0\.self_attn\.q_proj\.weight needs "
             r"\[256, 64\] \(rank 4\), and the tensor is \[256, 256\] in the base", "gguf", llama, "--adapter",
             other, "--out", tmp_path / "out")  # fmt: skip
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def _tiny(family: str) -> Path:
    from conftest import build_fixture

    return build_fixture(family)


def test_gguf_config_that_does_not_match_the_weights(llama: Path, tmp_path: Path, capsys) -> None:
    model = _copy(llama, tmp_path / "model")
    _edit_json(model / "config.json", num_attention_heads=8)  # weights have 4 heads of 64
    _refused(capsys, r"config\.json does not match the weights: tensor model\.layers\.0\.self_attn\.(q|o)_proj\."
             r"weight is \[256, 256\], the config .* needs \[(512, 256|256, 512)\]", "gguf", model, "--out",
             tmp_path / "g")  # fmt: skip
    _edit_json(model / "config.json", num_attention_heads=4, num_hidden_layers=3)
    _refused(capsys, r"num_hidden_layers=3 but the weights have no tensors for layer\(s\) 2", "gguf", model,
             "--out", tmp_path / "g")  # fmt: skip
    _edit_json(model / "config.json", num_hidden_layers="two")
    _refused(capsys, r"config\.json: num_hidden_layers is 'two'; expected a positive integer", "gguf", model,
             "--out", tmp_path / "g")  # fmt: skip
    assert not (tmp_path / "g").exists() and _leftovers(tmp_path) == []


def test_gguf_clean_model_still_converts(llama: Path, tmp_path: Path, capsys) -> None:
    """The check does not refuse what is fine: a clean model still converts to every direct type."""
    code, err = _cli(capsys, "gguf", llama, "-t", "f32,f16,bf16,q8_0,q4_0", "--out", tmp_path / "g")
    assert code == 0, err


# -------------------------------------------------------------------------------------------------------- quantize


def test_quantize_refuses_non_finite_and_corrupt(llama: Path, tmp_path: Path, capsys) -> None:
    require_quant()
    model = _copy(llama, tmp_path / "model")
    _poke(model, "layers.0.mlp.up_proj.weight", float("-inf"), row=5)
    _refused(capsys, r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight: non-finite values "
             r"\(inf/nan\) in rows 0-", "quantize", model, "--method", "bnb4", "--out", tmp_path / "q")  # fmt: skip
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _refused(capsys, r"model\.safetensors: truncated safetensors file", "quantize", model, "--method", "bnb4",
             "--out", tmp_path / "q")  # fmt: skip
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _refused(capsys, r"model\.safetensors: corrupt safetensors file", "quantize", model, "--method", "gptq",
             "--out", tmp_path / "q")  # fmt: skip
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == []


def test_quantize_gptq_one_group_per_row(llama: Path, tmp_path: Path, capsys) -> None:
    """--group-size -1, which the group-size error suggests, quantizes (was: gptqmodel's ValueError traceback)."""
    require_quant()
    code, err = _cli(capsys, "quantize", llama, "--method", "gptq", "--group-size", "-1", "--out", tmp_path / "q",
                     "--samples", "8", "--max-length", "64")  # fmt: skip
    assert code == 0, err
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["group_size"] == -1 and cfg["bits"] == 4


# ------------------------------------------------------------------------------------------ data and templates


def test_non_utf8_chat_template_and_bad_ollama_name(llama: Path, tmp_path: Path, capsys) -> None:
    """A chat_template.jinja that is not UTF-8 is one line in every command that reads it (was: gguf-py's
    traceback); an --ollama-name Ollama would refuse is refused before converting."""
    model = _copy(llama, tmp_path / "model")
    (model / "chat_template.jinja").write_bytes(b"{% for m in messages %}{{ m.content }}\xff{% endfor %}")
    pattern = r"model/chat_template\.jinja: not UTF-8 text: byte 38 \(line 1\)"
    _refused(capsys, pattern, "gguf", model, "-t", "f16", "--out", tmp_path / "g")
    _refused(capsys, pattern, "template", "detect", model)
    _refused(capsys, pattern, "chat", model)
    for name in ("Bad Name!", "a:b", "x" * 81, "-lead"):
        _refused(capsys, rf"--ollama-name {re.escape(repr(name))}: expected \[namespace/\]name", "gguf", llama,
                 "--ollama-name", name, "--out", tmp_path / "g")  # fmt: skip
    assert not (tmp_path / "g").exists() and _leftovers(tmp_path) == []


def test_non_utf8_conversation_and_unknown_roles(tmp_path: Path, capsys) -> None:
    conv = tmp_path / "conv.json"
    conv.write_bytes(b'[{"role": "user", "content": "caf\xe9"}]')
    _refused(capsys, r"conv\.json: not UTF-8 text: byte 33 \(line 1\) is b'\\xe9'", "template", "render", "qwen-2.5",
             conv)  # fmt: skip
    conv.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "..."},
                                {"role": "assistant", "content": "yo"}]))  # fmt: skip
    for family in ("qwen-2.5", "llama-3.1", "gemma-3", "qwen"):  # dropped by some renderings, kept by others, before
        for fmt in ("train", "jinja", "ollama"):
            _refused(capsys, r"message 1: role 'narrator' is not one of system, user, assistant, tool", "template",
                     "render", family, conv, "--format", fmt)  # fmt: skip


def _data(tmp: Path, files: dict[str, bytes], info: dict) -> Path:
    d = tmp / "data"
    d.mkdir()
    for name, raw in files.items():
        (d / name).write_bytes(raw)
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--dataset_dir", str(data), "--dataset", "d",
            "--output_dir", str(out), "--template", "llama-3.1", "--max_steps", "1", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "raw", "pattern"),
    [
        ("d.json", b'[{"instruction": "caf\xe9", "output": "x"}]', r"d\.json: not UTF-8 text: byte 21 \(line 1\)"),
        ("d.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\x80"}\n', r"byte 53 \(line 2\)"),
        ("d.csv", b"instruction,output\nok,fine\nbad\xc3,x\n", r"d\.csv: not UTF-8 text: byte 30 \(line 3\)"),
    ],
)
def test_non_utf8_data(name: str, raw: bytes, pattern: str, llama: Path, tmp_path: Path, capsys) -> None:
    d = _data(tmp_path, {name: raw}, {"d": {"file_name": name}})
    _refused(capsys, pattern, *_train_args(llama, d, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file_name", ["../secret.json", "/etc/passwd.json", "sub/../../x.json"])
def test_dataset_file_outside_dataset_dir(file_name: str, llama: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "secret.json").write_text('[{"instruction": "a", "output": "b"}]')
    d = _data(tmp_path, {}, {"d": {"file_name": file_name}})
    _refused(capsys, rf"dataset 'd': file_name {re.escape(repr(file_name))} points outside dataset_dir",
             *_train_args(llama, d, tmp_path / "out"))  # fmt: skip
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    ("stages", "pattern"),
    [
        ({"gguf": {"types": ["f16", "q9"]}}, r"--type 'q9' is not a GGUF type"),
        ({"merge": {"dtype": "int3"}}, r"--dtype 'int3': expected one of bf16, fp16, fp32"),
        ({"verify": {"ppl_threshold": "q8_0=lots"}}, r"--ppl-threshold: 'q8_0=lots' is not TYPE=FRACTION"),
        ({"verify": {"ctx": 2}}, r"verify\.ctx must be at least 8, got 2"),
        ({"gguf": {"ollama_name": "my model"}}, r"--ollama-name 'my model': expected"),
        ({"verify": {"ppl_threshold": {"q8_0": float("nan")}}}, r"--ppl-threshold q8_0=nan: expected a finite"),
        ({"train": {"learning_rate": "fast"}}, r"learning_rate must be a number"),
    ],
)
def test_pipeline_checks_every_stage_first(stages: dict, pattern: str, tmp_path: Path, capsys) -> None:
    base = _tiny("qwen2")
    run_dir = tmp_path / "run"
    _refused(capsys, pattern, "pipeline", pipeline_yaml(tmp_path, base, run_dir, **stages))
    assert not run_dir.exists()  # nothing ran: no train, no merge


def test_pipeline_refuses_a_run_dir_that_is_not_ours(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "home"
    run_dir.mkdir()
    (run_dir / "thesis.tex").write_text("years of work")
    _refused(capsys, r"run_dir .*home is not empty and holds no pipeline\.json", "pipeline",
             pipeline_yaml(tmp_path, _tiny("qwen2"), run_dir))  # fmt: skip
    assert sorted(p.name for p in run_dir.iterdir()) == ["thesis.tex"]


def test_pipeline_never_reuses_a_changed_artifact(tmp_path: Path, capsys) -> None:
    """A truncated merged model (or a changed GGUF) is not skipped over: its stage and the later ones run again, and
    verify's PASSED is about the files on disk."""
    require_llama_cpp()
    run_dir = tmp_path / "run"
    path = pipeline_yaml(tmp_path, _tiny("qwen2"), run_dir)
    first = pipeline.run(pipeline.load_config(path, []))
    assert first.ran == ["train", "merge", "gguf", "verify"] and first.passed
    shard = run_dir / "merged" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    again = pipeline.run(pipeline.load_config(path, []))
    assert again.skipped == ["train"] and again.ran == ["merge", "gguf", "verify"] and again.passed
    assert "merged/model.safetensors is" in capsys.readouterr().out.replace("\n", "")
    gguf_file = next((run_dir / "gguf").glob("*.gguf"))
    with open(gguf_file, "r+b") as f:  # same size, other bytes
        f.seek(gguf_file.stat().st_size - 10)
        f.write(b"\x00" * 10)
    third = pipeline.run(pipeline.load_config(path, []))
    assert third.skipped == ["train", "merge"] and third.ran == ["gguf", "verify"] and third.passed
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def qwen() -> Path:
    return _tiny("qwen2")


def _train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--dataset_dir", str(data), "--dataset", "d",
            "--output_dir", str(out), "--template", "qwen-2.5", "--per_device_train_batch_size", "2",
            "--logging_steps", "1", *extra]  # fmt: skip


def _strict_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file as strict JSON (NaN/Infinity, which json.loads accepts, are errors)."""

    def bad(c: str) -> None:
        raise AssertionError(f"{path}: {c} is not JSON")

    return [json.loads(line, parse_constant=bad) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--num_train_epochs", "0"], r"num_train_epochs must be positive \(or set max_steps > 0\).* got 0\.0"),
        (["--num_train_epochs", "-1"], r"num_train_epochs must be positive .* got -1\.0"),
        (["--max_steps", "2", "--learning_rate", "-1e-4"], r"learning_rate must be a positive number, got -0\.0001"),
        (["--max_steps", "2", "--learning_rate", "nan"], r"learning_rate must be a finite number, got nan"),
        (["--max_steps", "2", "--lora_rank", "0"], r"lora_rank must be a positive integer, got 0"),
        (["--max_steps", "2", "--lora_alpha", "sixteen"], r"lora_alpha must be an integer, got 'sixteen'"),
        (["--max_steps", "2", "--save_steps", "0"], r"save_steps must be positive"),
        (["--max_steps", "2", "--lora_dropout", "1.5"], r"lora_dropout must be in \[0, 1\), got 1\.5"),
        (["--max_steps", "2", "--max_samples", "-1"], r"max_samples must be a positive number of rows .* got -1"),
    ],
)
def test_train_numbers_that_train_nothing(extra, pattern, qwen: Path, rows: Path, tmp_path: Path, capsys) -> None:
    _refused(capsys, pattern, *_train(qwen, rows, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(qwen, rows, tmp_path, capsys) -> None:
    """learning_rate=1e30: exit 2 naming the step; no adapter written (so nothing for gguf --adapter to export); the
    checkpoint before it is kept and finite; the log is strict JSON."""
    out = tmp_path / "out"
    args = _train(qwen, rows, out, "--max_steps", "4", "--save_steps", "1", "--learning_rate", "1e30")
    line = _refused(capsys, r"training diverged at step (\d+) of 4: the (loss|gradient norm|weights)", *args)
    at = int(re.search(r"step (\d+) of", line).group(1))
    assert at >= 2 and f"the last good checkpoint, {out / f'checkpoint-{at - 1}'}, is kept" in line
    assert not (out / "adapter_model.safetensors").exists() and not (out / "all_results.json").exists()
    for ckpt in out.glob("checkpoint-*"):  # only finite states were saved
        assert int(ckpt.name.split("-")[1]) < at
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter_model.safetensors").values())
    assert [r["current_steps"] for r in _strict_lines(out / "trainer_log.jsonl")] == list(range(1, at))
    assert _leftovers(out) == []


def test_non_finite_evaluation_loss_stops(qwen, rows, tmp_path, capsys, monkeypatch) -> None:
    """A finite training loss but an inf/nan evaluation loss (injected into the validation batches' loss) is a
    stop with exit 2 naming the step, not a NaN in the results."""
    from exporter import tuning

    real = tuning.loss_sum

    def nan_when_evaluating(score, batch):  # evaluation runs without gradients
        loss = real(score, batch)
        return loss if torch.is_grad_enabled() else loss * float("nan")

    monkeypatch.setattr(tuning, "loss_sum", nan_when_evaluating)
    out = tmp_path / "out"
    args = _train(qwen, rows, out, "--max_steps", "2", "--val_size", "0.25", "--eval_strategy", "steps",
                  "--eval_steps", "1")  # fmt: skip
    _refused(capsys, r"training diverged at step 1 of 2: the evaluation loss is nan", *args)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "all_results.json").exists()
    assert [r["current_steps"] for r in _strict_lines(out / "trainer_log.jsonl")] == [1]


def _pickle_bomb(path: Path, marker: Path) -> None:
    """A .pt file whose unpickling would run `touch marker` (as a malicious shared checkpoint would)."""

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Bomb(), "param_groups": []}, path)


def test_resume_never_unpickles(qwen: Path, rows: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = _train(qwen, rows, out, "--max_steps", "4", "--save_steps", "2")
    code, err = _cli(capsys, *args)
    assert code == 0, err
    ckpt = out / "checkpoint-2"
    assert {"optimizer.safetensors", "scheduler.json", "rng_state.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not list(ckpt.glob("*.pt*"))
    marker = tmp_path / "PWNED"
    # a payload planted beside a checkpoint of ours is never opened; resuming works
    _pickle_bomb(ckpt / "optimizer.pt", marker)
    code, err = _cli(capsys, *args, "--overwrite_output_dir", "false", "--resume_from_checkpoint", str(ckpt),
                     "--output_dir", str(tmp_path / "again"))  # fmt: skip
    assert code == 0, err
    # an older-format checkpoint whose optimizer.pt carries code: refused by name, the code never runs
    old = _copy(ckpt, tmp_path / "old" / "checkpoint-2")
    for name in ("optimizer.safetensors", "scheduler.json", "rng_state.safetensors", "exporter_manifest.json"):
        (old / name).unlink()
    _refused(capsys, rf"{re.escape(str(old / 'optimizer.pt'))}: refusing to load it: .*never runs code",
             *args, "--resume_from_checkpoint", str(old), "--output_dir", str(tmp_path / "third"))  # fmt: skip
    assert not marker.exists()


@pytest.mark.parametrize("engine", ["single", "zero3", "fsdp"])
def test_base_model_pickle_never_runs(qwen: Path, rows: Path, tmp_path: Path, capsys, engine: str) -> None:
    """A base model whose pytorch_model.bin would run code when unpickled: one line, exit 2, the code never runs,
    also where ZeRO-3 loads it into partitions (transformers' other loading path; it was a traceback), and under
    FSDP, where rank 0 alone reads the weights: the other process, which built the model without them, stops too."""
    model, marker = tmp_path / "model", tmp_path / "PWNED"
    model.mkdir()
    for f in qwen.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
    _pickle_bomb(model / "pytorch_model.bin", marker)
    extra = ()
    if engine == "zero3":
        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed not installed")
        ds = tmp_path / "ds_z3.json"
        ds.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                  "zero_optimization": {"stage": 3}}))  # fmt: skip
        extra = ("--deepspeed", str(ds))
    env = dict(os.environ)
    if engine == "fsdp":  # LLaMA-Factory's launcher variables: exporter starts torchrun itself
        extra, env = ("--fsdp", "full_shard"), dict(env, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "exporter", *_train(model, rows, tmp_path / "out", "--max_steps", "1", *extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    refused = r"model .*: refusing to load its pickled weights: .*never runs code from a model"
    if engine == "fsdp":
        lines = sorted(ln for ln in r.stderr.splitlines() if ln.startswith("error:"))
        assert len(lines) == 2 and lines[0] == "error: another process could not load the model", r.stderr
        assert re.search(refused, lines[1]), lines[1]
    else:
        _one_error(r.stderr, refused)
    assert not marker.exists()
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_resume_refuses_a_changed_checkpoint(qwen: Path, rows: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    kill_at_3 = _train(qwen, rows, out, "--max_steps", "4", "--save_steps", "2")
    from exporter import train as T

    real = T.step

    def crash(run, batches):
        if run.state.global_step == 2:
            raise UserError("simulated crash at step 3")
        return real(run, batches)

    T.step = crash
    try:
        code, _ = _cli(capsys, *kill_at_3)
    finally:
        T.step = real
    assert code == 2 and (out / "checkpoint-2").is_dir() and not (out / "adapter_model.safetensors").exists()
    weights = out / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    _refused(capsys, rf"resume_from_checkpoint {re.escape(str(out / 'checkpoint-2'))}: .*adapter_model\.safetensors "
             r"is \d+ bytes, the manifest says \d+", *kill_at_3)  # fmt: skip


def test_resume_refuses_a_checkpoint_of_other_lora_settings(qwen: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """A checkpoint saved with another lora_rank or lora_target is refused naming a tensor (was: a size-mismatch
    traceback, or PEFT skipping the missing tensors silently)."""
    first = _train(qwen, rows, tmp_path / "first", "--max_steps", "2", "--save_steps", "1")
    assert _cli(capsys, *first)[0] == 0
    ckpt = tmp_path / "first" / "checkpoint-1"
    for extra, what in ((["--lora_rank", "4"], r"\[8, \d+\] in the checkpoint and \[4, \d+\] in this run"),
                        (["--lora_target", "q_proj"], r"not part of this run's LoRA")):  # fmt: skip
        out = tmp_path / f"again{len(extra[1])}"
        args = _train(qwen, rows, out, "--max_steps", "3", "--resume_from_checkpoint", str(ckpt), *extra)
        _refused(capsys, rf"{re.escape(str(ckpt))}: tensor \S+ is {what}: .*other LoRA settings", *args)
        assert not (out / "adapter_model.safetensors").exists()


def test_output_dir_that_is_not_ours(qwen: Path, rows: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = _tree(out)
    for extra in ([], ["--overwrite_output_dir"]):
        _refused(capsys, r"output_dir .*home is not empty and is not an exporter training output",
                 *_train(qwen, rows, out, "--max_steps", "1", *extra))  # fmt: skip
        assert _tree(out) == before


def test_overwrite_clears_only_our_outputs(qwen: Path, rows: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = _train(qwen, rows, out, "--max_steps", "2", "--save_steps", "1")
    assert _cli(capsys, *args)[0] == 0
    (out / "notes.md").write_text("mine")
    (out / ".final.tmp-999-abcd1234").mkdir()  # a killed run's staging dir (atomic's name)
    code, err = _cli(capsys, *args, "--overwrite_output_dir")
    assert code == 0, err
    assert "kept notes.md" in err and "removed " in err and (out / "notes.md").read_text() == "mine"
    assert (out / "adapter_model.safetensors").is_file() and _leftovers(out) == []


def test_huge_row_is_cut_before_tokenizing_without_changing_ids(qwen: Path) -> None:
    """A 50 MB row costs bounded time and memory; rows below the cut, and what cutoff_len keeps of rows above it,
    tokenize to exactly the ids of the uncut text (LLaMA-Factory's cut: prompt run, then answer run)."""
    from transformers import AutoTokenizer

    from exporter import examples, render, templates
    from exporter.data import Drops, Sample
    from exporter.lf_args import TrainConfig

    tok = AutoTokenizer.from_pretrained(qwen)
    tpl = templates.load_template("qwen-2.5")
    cfg = TrainConfig(model_name_or_path=str(qwen), output_dir="x", cutoff_len=64)
    limit = examples.max_chars(tok, cfg.cutoff_len, floor=0)  # the cut without its floor: cheap to compare
    words = " ".join(f"w{i % 97}ord" for i in range(40_000))
    assert len(words) > 2 * limit

    def conv(*turns: str) -> Sample:
        roles = ("user", "assistant")
        return Sample([{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], system="Be brief.")

    def uncut(s: Sample) -> list[int]:
        ids, labels = render.encode(tok, tpl, s.chat(), cutoff_len=None)
        return examples.truncate(list(ids), list(labels), cfg.cutoff_len)[0]

    cases = [
        conv("short", "fine"),
        conv(words[: limit - 10], "ok"),  # just below the cut: untouched
        conv(words, "the answer"),  # a huge prompt: its start and the whole answer
        conv("q", words),  # a huge answer
        conv(words, "a", "again", "b"),  # a huge first turn: the later turns are past the budget
        conv("q", "a", words, words),  # both huge, in a later turn
    ]
    assert cases[0].capped(limit) is cases[0] and cases[1].capped(limit) is cases[1]
    got = examples.tokenize_sft(cases, tok, tpl, cfg, Drops(), limit=limit)
    assert [e.input_ids for e in got] == [uncut(s) for s in cases]
    huge = conv("x" * 50_000_000, "the answer")
    t = time.perf_counter()
    (ex,) = examples.tokenize_sft([huge], tok, tpl, cfg, Drops())
    assert time.perf_counter() - t < 15 and len(ex.input_ids) == 64
    assert ex.input_ids == uncut(conv("x" * 2**18, "the answer"))


# ---------------------------------------------------------------------------------------------------------- verify


def test_verify_bad_inputs_and_no_false_llama_cpp_warning(llama: Path, tmp_path: Path, capfd) -> None:
    require_llama_cpp()
    g = tmp_path / "g"
    code, err = _cli(capfd, "gguf", llama, "-t", "f16", "--out", g)
    assert code == 0, err
    gguf_file = next(g.glob("*.gguf"))
    common = ("--gguf", gguf_file, "--prompts", "1", "--max-new-tokens", "2", "--ctx", "32", "--max-windows", "1")
    # --verbose shows llama.cpp's own log: vocab-only loads create no context, so no "n_ctx_train (0)" warning
    r = _sub("--verbose", "verify", "--merged", llama, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "llama_model_load" in r.stderr and "n_ctx_train (0)" not in r.stderr
    text = tmp_path / "held_out.txt"
    text.write_bytes(b"plain text, then a Latin-1 byte: caf" + b"\xe9\n")
    _refused(capfd, r"held_out\.txt: not UTF-8 text: byte 36 \(line 1\)", "verify", "--merged", llama, "--text",
             text, *common)  # fmt: skip
    bad = _copy(llama, tmp_path / "bad")
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    _refused(capfd, r"bad/model\.safetensors: truncated safetensors file: tensor .* ends at byte \d+, file has \d+",
             "verify", "--merged", bad, *common)  # fmt: skip


def test_verify_non_finite_numbers_never_pass(llama: Path, tmp_path: Path, capsys) -> None:
    """A model whose logits are NaN has no perplexity to compare with: verify fails (exit 1), never a PASS, and
    report.json stays strict JSON; a NaN, inf or negative threshold is refused up front (exit 2)."""
    bad = _copy(llama, tmp_path / "nan")
    _poke(bad, "layers.0.mlp.down_proj.weight", float("nan"))
    report = tmp_path / "report.json"
    code, err = _cli(capsys, "verify", "--merged", bad, "--prompts", "0", "--ctx", "32", "--max-windows", "1",
                     "--report", report)  # fmt: skip
    assert code == 1, err
    doc = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"report.json holds {c}: not JSON"))
    (ref,) = [c for c in doc["checks"] if c["check"] == "perplexity"]
    assert ref["status"] == "fail" and "non-finite" in ref["detail"] and ref["metrics"]["ppl"] == "nan"
    for spec in ("q8_0=nan", "f16=inf", "f16=-0.1"):
        _refused(capsys, rf"--ppl-threshold .*{re.escape(spec.split('=')[1])}.*expected a finite fraction >= 0",
                 "verify", "--merged", llama, "--ppl-threshold", spec)  # fmt: skip


def test_verify_chat_check_of_nan_logits_fails_naming_the_prompt(llama: Path, tmp_path: Path, capsys) -> None:
    """The chat check on a merged model whose logits are NaN stops at the first answer token and fails naming the
    prompt (not an answer of garbage tokens compared with the GGUF's)."""
    require_llama_cpp()
    code, err = _cli(capsys, "gguf", llama, "-t", "f16", "--out", tmp_path / "g")
    assert code == 0, err
    bad = _copy(llama, tmp_path / "nan")
    _poke(bad, "layers.0.mlp.down_proj.weight", float("nan"))
    report = tmp_path / "report.json"
    code, err = _cli(capsys, "verify", "--merged", bad, "--gguf", next((tmp_path / "g").glob("*.gguf")), "--prompts",
                     "1", "--max-new-tokens", "2", "--ctx", "32", "--max-windows", "1", "--report", report)  # fmt: skip
    assert code == 1 and "Traceback" not in err, err
    (chat,) = [c for c in json.loads(report.read_text())["checks"] if c["check"] == "chat"]
    assert chat["status"] == "fail" and chat["target"] == "merged", chat
    assert chat["detail"].startswith("prompt 1: the model's logits are not finite (nan) at answer token 1:"), chat


# ---------------------------------------------------------------------------------------------------- chat, serve


def test_chat_and_serve_bad_inputs(llama: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Bad weights, a non-UTF-8 tokenizer file, broken YAML or sampling values out of range: one line, exit 2, before
    any prompt is read (not a loader's traceback, not an error after every answer)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    trunc = _copy(llama, tmp_path / "trunc")
    shard = trunc / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    badtok = _copy(llama, tmp_path / "badtok")
    raw = (badtok / "tokenizer_config.json").read_bytes()
    (badtok / "tokenizer_config.json").write_bytes(raw[:5] + b"\xff" + raw[5:])
    broken = tmp_path / "infer.yaml"
    broken.write_text(f"model_name_or_path: [{llama}\n")
    for cmd in ("chat", "serve"):
        _refused(capsys, r"trunc/model\.safetensors: truncated safetensors file", cmd, trunc)
        _refused(capsys, r"badtok/tokenizer_config\.json: not UTF-8 text: byte 5", cmd, badtok)
        _refused(capsys, r"infer\.yaml: not valid YAML at line 2, column 1: expected ',' or ']'", cmd, broken)
        _refused(capsys, r"max_new_tokens must be >= 1, got 0", cmd, llama, "--max-new-tokens", "0")
    _refused(capsys, r"temperature must be >= 0, got -1\.0", "chat", llama, "--temperature", "-1")
    _refused(capsys, r"top_p must be in \(0, 1\], got 1\.5", "chat", llama, "--top-p", "1.5")
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use: one line before the model loads
        port = taken.getsockname()[1]
        _refused(capsys, rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use", "serve", trunc, "--port",
                 str(port))  # fmt: skip


def test_eval_of_a_model_with_non_finite_logits_fails(llama: Path, tmp_path: Path, capsys) -> None:
    """NaN logits give no accuracy (argmax would answer "A" everywhere and report a number): exit 2, nothing saved."""
    from eval_fixture import write_task

    bad = _copy(llama, tmp_path / "nan")
    _poke(bad, "layers.0.mlp.down_proj.weight", float("nan"))
    write_task(tmp_path / "evaluation", "mmlu")
    out = tmp_path / "scores"
    args = ("eval", "--model_name_or_path", bad, "--task", "mmlu_test", "--task_dir", tmp_path / "evaluation",
            "--lang", "en", "--n_shot", "0", "--template", "fewshot", "--save_dir", out)  # fmt: skip
    _refused(capsys, r"nan: the answer letters' logits are not finite \(nan, nan, nan, nan\) for question \d+: the "
             r"model's weights are broken", *args)  # fmt: skip
    assert not out.exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------- model dirs that cannot load without their code


_EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("pwned")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig): pass
class EvilModel(LlamaForCausalLM): config_class = EvilConfig
class EvilTok(PreTrainedTokenizerFast): pass
"""


def _remote_code(llama: Path, where: Path, marker: Path) -> Path:
    """A copy of `llama` whose config and tokenizer name classes of its own evil.py (auto_map), which writes
    `marker` when imported."""
    d = _copy(llama, where)
    (d / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    _edit_json(d / "config.json", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    _edit_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "evil.EvilTok"]},
               tokenizer_class="EvilTok")  # fmt: skip
    return d


def test_train_trust_remote_code_runs_no_model_code(llama: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """`trust_remote_code: true` is noted as without effect (as chat, predict, eval and export say it), and a model
    whose tokenizer is its own code is one line, exit 2 (was: evil.py imported, then a 70-line traceback)."""
    marker = tmp_path / "PWNED"
    rc = _remote_code(llama, tmp_path / "rc", marker)
    code, err = _cli(capsys, *_train_args(rc, rows, tmp_path / "out", "--trust_remote_code", "true"))
    assert code == 2, err
    _one_error(err, r"model .*rc: its tokenizer is the code shipped with it \(auto_map: evil\.EvilTok\), and "
               r"exporter never runs code from a model")  # fmt: skip
    assert "note: trust_remote_code: exporter never runs code from a model" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def _no_tokenizer(llama: Path, where: Path, marker: Path) -> Path:
    d = _copy(llama, where)
    (d / "tokenizer.json").unlink()
    return d


def _pickled(llama: Path, where: Path, marker: Path) -> Path:
    d = _copy(llama, where)
    (d / "model.safetensors").unlink()
    _pickle_bomb(d / "pytorch_model.bin", marker)
    return d


_UNLOADABLE = {
    "no-tokenizer": (_no_tokenizer, r"model .*: cannot load its tokenizer \(no tokenizer\.json or tokenizer\.model\)"),
    "remote-code": (_remote_code, r"model .*: its tokenizer is the code shipped with it \(auto_map: evil\.EvilTok\)"),
    "pickle": (_pickled, r"model .*: refusing to load its pickled weights: .*never runs code from a model"),
}


@pytest.mark.parametrize("case", sorted(_UNLOADABLE))
@pytest.mark.parametrize("verb", ["merge", "quantize", "chat", "serve", "verify"])
def test_unloadable_model_dir_is_one_line(verb: str, case: str, llama: Path, lora: Path, tmp_path: Path,
                                          capsys) -> None:  # fmt: skip
    """A model dir whose tokenizer cannot load, or that needs its own code, or whose only weights are a pickle
    that needs more than tensors: one line, exit 2, before any work, and no code from the dir runs (was: a
    50-70-line traceback; merge's after every shard was merged)."""
    if verb == "quantize" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    make, pattern = _UNLOADABLE[case]
    if verb == "merge" and case == "pickle":  # merge reads safetensors only: its own refusal, still before any work
        pattern = r"base .*: no model\.safetensors or model\.safetensors\.index\.json \(safetensors needed\)"
    marker = tmp_path / "PWNED"
    d = make(llama, tmp_path / "m", marker)
    out = tmp_path / "out"
    args = {
        "merge": ("merge", "--base", d, "--adapter", lora, "--out", out),
        "quantize": ("quantize", d, "--method", "bnb4", "--out", out),
        "chat": ("chat", d),
        "serve": ("serve", d, "--port", "0"),
        "verify": ("verify", "--merged", d),
    }[verb]
    if verb == "merge" and case == "remote-code":  # merge reads tokenizer.json itself and copies evil.py along
        assert _cli(capsys, *args)[0] == 0 and (out / "evil.py").is_file() and not marker.exists()
        return
    _refused(capsys, pattern, *args)
    assert not marker.exists() and not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("verb", ["gguf", "merge", "chat"])
def test_generation_config_not_an_object(verb: str, llama: Path, lora: Path, tmp_path: Path, capsys) -> None:
    """generation_config.json `[1, 2]`: one line naming it (was: AttributeError / TypeError tracebacks)."""
    d = _copy(llama, tmp_path / "gc")
    (d / "generation_config.json").write_text("[1, 2]")
    out = tmp_path / "out"
    args = {"gguf": ("gguf", d, "--out", out), "merge": ("merge", "--base", d, "--adapter", lora, "--out", out),
            "chat": ("chat", d)}[verb]  # fmt: skip
    _refused(capsys, r"gc/generation_config\.json: expected a JSON object$", *args)
    assert not out.exists()


@pytest.mark.parametrize("verb", ["gguf", "merge"])
def test_chat_template_of_the_wrong_type(verb: str, llama: Path, lora: Path, tmp_path: Path, capsys) -> None:
    """`chat_template: 5` is refused by name (was: taken as no template, and exported without one)."""
    d = _copy(llama, tmp_path / "tc")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    _edit_json(d / "tokenizer_config.json", chat_template=5)
    out = tmp_path / "out"
    args = {"gguf": ("gguf", d, "--out", out), "merge": ("merge", "--base", d, "--adapter", lora, "--out", out)}[verb]
    _refused(capsys, r"tc/tokenizer_config\.json: chat_template is 5; expected a string or a list of "
             r"\{name, template\}$", *args)  # fmt: skip
    assert not out.exists()


def test_named_chat_templates_are_read(llama: Path, tmp_path: Path) -> None:
    """transformers' list of {name, template}: the "default" one is the model's template."""
    from exporter import templates

    d = _copy(llama, tmp_path / "named")
    own = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    _edit_json(d / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "x"},
                                                           {"name": "default", "template": own}])  # fmt: skip
    assert templates.model_chat_template(d)[0] == own
