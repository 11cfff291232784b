"""Ctrl-C, kills and full disks in the middle of a GGUF export's K-quants (libllama's `llama_model_quantize`, native
code that logs through a Python callback): Ctrl-C stops the run, a second one at once and the next run finishes the
same bytes; the free-space check counts the f16 the K-quants are made from; a disk that fills while libllama writes is
the one disk-full line; a read-only output is refused before anything is printed."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_llama_cpp
from exporter.converters import gguf_kquant

from exporter import gguf, templates
from exporter.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "EXPORTER_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "exporter", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _signal_when(p: subprocess.Popen, pattern: str, times: int) -> tuple[int, str]:
    """Send SIGINT `times` times (50 ms apart) once a file matching `pattern` exists; (exit code, stderr)."""
    deadline = time.monotonic() + 300
    while p.poll() is None and not glob.glob(pattern) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, f"the run ended before {pattern} appeared: {p.communicate()[1][-2000:]}"
    for i in range(times):
        if i:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def _ours(where: Path) -> list[str]:
    """Temporaries and locks of ours under `where`."""
    return sorted(p.name for p in where.iterdir() if re.search(r"\.(tmp|old)-|\.exporter-lock$", p.name))


def test_ctrl_c_during_a_kquant_stops_the_run(tiny: Path, tmp_path: Path) -> None:
    """libllama logs each tensor through a Python callback, where a KeyboardInterrupt is printed and dropped by
    ctypes: Ctrl-C while it writes q4_k_m must still stop the run (not finish it with exit 0), with nothing left."""
    require_llama_cpp()
    out = tmp_path / "g"
    p = _start("gguf", str(tiny), "--type", "q4_k_m", "--out", str(out))
    code, err = _signal_when(p, f"{out}.tmp-*/*-q4_k_m.gguf", 1)
    assert code in (130, -signal.SIGINT), err[-2000:]
    assert "Exception ignored" not in err, err[-2000:]
    assert not out.exists() and _ours(tmp_path) == [], os.listdir(tmp_path)


def test_ctrl_c_twice_during_a_kquant_stops_at_once_and_the_rerun_finishes(tiny: Path, tmp_path: Path) -> None:
    """A second Ctrl-C ends the run at once, as a kill does: nothing at `out`, only temporaries the next run names
    and removes; that run writes the bytes an uninterrupted one writes."""
    require_llama_cpp()
    ref = gguf.export(tiny, ["q4_k_m"], templates.resolve(tiny, None), tmp_path / "ref")
    out = tmp_path / "g"
    p = _start("gguf", str(tiny), "--type", "q4_k_m", "--out", str(out))
    code, err = _signal_when(p, f"{out}.tmp-*/*-q4_k_m.gguf", 2)
    assert code in (130, -signal.SIGINT), err[-2000:]
    assert not out.exists()
    left = _ours(tmp_path)
    p = _start("gguf", str(tiny), "--type", "q4_k_m", "--out", str(out))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert all(f"removed {tmp_path / name}" in err for name in left if ".tmp-" in name), err
    assert _ours(tmp_path) == []
    for kind, path in ref.files.items():
        assert (out / path.name).read_bytes() == path.read_bytes(), kind


def test_kquant_free_space_counts_the_f16_they_are_made_from(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """`--type q4_k_m` writes an f16 GGUF first and keeps it until the K-quant is written: the space checked
    before writing is at least what was on disk at that peak (measured, not estimated)."""
    require_llama_cpp()
    asked: list[int] = []
    peak: list[int] = []
    real = gguf_kquant.quantize

    def measured(f16: Path, path: Path, kind: str, *a: object) -> list[str]:
        notes = real(f16, path, kind, *a)
        peak.append(sum(p.stat().st_size for p in path.parent.iterdir()))
        return notes

    monkeypatch.setattr(gguf, "check_free_space", lambda where, need: asked.append(need))
    monkeypatch.setattr(gguf_kquant, "quantize", measured)
    gguf.export(tiny, ["q4_k_m"], templates.resolve(tiny, None), tmp_path / "g")
    assert asked and peak and asked[0] >= 0.9 * peak[0], (asked, peak)


@pytest.mark.parametrize("kind", ["f16", "f32"])
def test_an_adapter_gguf_checks_free_space_for_what_it_writes(tiny: Path, tmp_path: Path, monkeypatch, kind) -> None:
    """`gguf --adapter` checks the disk before writing, for about the bytes the GGUF LoRA takes (measured)."""
    from conftest import random_lora

    lora = random_lora(tiny, tmp_path / "lora", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    asked: list[int] = []
    monkeypatch.setattr(gguf, "check_free_space", lambda where, need: asked.append(need))
    done = gguf.export_adapter(lora, tiny, [kind], templates.resolve(tiny, None), tmp_path / "g")
    size = done.files[kind].stat().st_size
    assert len(asked) == 1 and 0.8 * size <= asked[0] <= 1.2 * size, (asked, size)


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    opts = f"size={math.ceil(size / 4096) * 4096}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)]).returncode == 0


def test_a_disk_that_fills_while_libllama_writes_is_the_disk_full_line(tiny: Path, tmp_path: Path, monkeypatch):
    """A disk with room for the f16 but not for the q4_k_m made from it (another process filled it after the
    check): the run ends with the disk-full line naming the output, not libllama's bare return code, and leaves
    nothing behind."""
    require_llama_cpp()
    f16 = gguf.export(tiny, ["f16"], templates.resolve(tiny, None), tmp_path / "f16").files["f16"]
    small = tmp_path / "small"
    if not _mount_tmpfs(small, f16.stat().st_size + 256 * 1024):  # the q4_k_m (~1/3 of it) does not fit beside it
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        monkeypatch.setattr(gguf, "check_free_space", lambda *a: None)
        out = small / "g"
        with pytest.raises(UserError) as e:
            gguf.export(tiny, ["q4_k_m"], templates.resolve(tiny, None), out)
        assert str(e.value).startswith(f"disk full under {small} while writing {out} (No space left on device)"), e
        assert "the partial output was removed" in str(e.value)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)])


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """`path` read-only: a read-only bind mount as root (root ignores mode bits), chmod 0555 otherwise."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)]).returncode != 0:
        pytest.skip("cannot make a read-only mount here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)])


def test_a_read_only_gguf_out_is_refused_before_any_line(tiny: Path, tmp_path: Path, capsys) -> None:
    """`export` promises every refusal before the first line printed: an output dir that cannot be written too."""
    require_llama_cpp()
    ro = tmp_path / "ro"
    with _read_only(ro), pytest.raises(UserError, match=rf"cannot write into {re.escape(str(ro))}"):
        gguf.export(tiny, ["f16"], templates.resolve(tiny, None), ro / "g")
    assert capsys.readouterr().out == ""


def test_an_output_is_durable_once_written(tmp_path: Path, monkeypatch) -> None:
    """fsync(2): "Calling fsync() does not necessarily ensure that the entry in the directory containing the file
    has also reached disk. For that an explicit fsync() on a file descriptor for the directory is also needed." A
    laptop that dies after "wrote <out>" must not come back with the rename undone (the next run would remove the
    complete temporary as a killed run's): every dir of the output is fsynced before the rename, its parent after."""
    from exporter import atomic

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        tmp_name = str(tmp)
    with atomic.atomic_file(tmp_path / "r.json") as tmp:
        tmp.write_text("{}")
    monkeypatch.undo()
    renamed = events.index(("replace", str(out)))
    before = {path for kind, path in events[:renamed] if kind == "fsync"}
    assert {tmp_name, f"{tmp_name}/sub", f"{tmp_name}/sub/w.bin"} <= before, events
    assert ("fsync", str(tmp_path)) in events[renamed:], events
    last = events.index(("replace", str(tmp_path / "r.json")))
    assert ("fsync", str(tmp_path)) in events[last:], events
