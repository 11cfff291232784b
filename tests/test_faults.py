"""Interruptions and resource faults: what a killed run leaves is recognised only by the marks exporter writes (a
previous output moved aside is put back, never removed), one lock for every spelling of an output, manifests written
atomically, a file-size limit or a too-long name as one line, and train's output_dir kept off its inputs."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_lora, train_config

from exporter import atomic, checkpoint, manifest, predict
from exporter import train as T
from exporter.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip


def _exporter(*args: str, limit: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m exporter ARGS`, under a file-size limit of `limit` bytes (`ulimit -f`) when given."""
    env = {**os.environ, "EXPORTER_NO_PROGRESS": "1"}
    pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, env=env,
                          preexec_fn=pre, cwd=cwd, timeout=600)  # fmt: skip


# ------------------------------------------------------------------ #1 only names we mark are leftovers


def test_user_names_like_older_leftovers_are_kept(tmp_path: Path, capsys) -> None:
    """`<out>.old-<digits>` (a live pid or a dead one) is a user's name: no run writing `out` removes it."""
    users = [tmp_path / "out.old-1", tmp_path / f"out.old-{_dead_pid()}", tmp_path / "rep.json.old-4000000"]
    for p in users[:2]:
        p.mkdir()
        (p / "notes.txt").write_text("my precious backup")
    users[2].write_text("keep")
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / manifest.MANIFEST_NAME).write_text("{}")
    with atomic.atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / manifest.MANIFEST_NAME).write_text("{}")
    with atomic.atomic_file(tmp_path / "rep.json") as tmp:
        tmp.write_text("{}")
    assert all((p / "notes.txt").read_text() == "my precious backup" for p in users[:2])
    assert users[2].read_text() == "keep" and "removed" not in capsys.readouterr().err
    assert atomic.leftover("out.old-1") is None and atomic.leftover("out.old-123-abcd1234") == ("out", 123)


def test_a_kill_between_the_two_renames_keeps_the_previous_output(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run killed after moving the previous output aside, before renaming its own in, leaves it as
    `<out>.old-<pid>-<random>`; the next run writing `out` puts it back (and says so) before any work."""
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as tmp:
        (tmp / manifest.MANIFEST_NAME).write_text("previous")
    real, calls = os.replace, []

    def killed_at_second(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_at_second)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_dir(out, force=True) as tmp:
        (tmp / manifest.MANIFEST_NAME).write_text("new")
    monkeypatch.undo()
    aside = [p.name for p in tmp_path.iterdir()]
    assert not out.exists() and len(aside) == 1 and atomic.leftover(aside[0]) == ("out", os.getpid())
    with pytest.raises(UserError, match="already exists; pass --force"), atomic.atomic_dir(out):
        pass
    assert (out / manifest.MANIFEST_NAME).read_text() == "previous" and os.listdir(tmp_path) == ["out"]
    assert f"put {out} back from {aside[0]}" in capsys.readouterr().err


def test_a_previous_output_left_beside_a_new_one_is_removed(tmp_path: Path, capsys) -> None:
    """Killed while removing the replaced output (`out` in place): that `<out>.old-<pid>-<random>` goes."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / manifest.MANIFEST_NAME).write_text("{}")
    old = tmp_path / f"out.old-{_dead_pid()}-abcd1234"
    old.mkdir()
    with atomic.atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / manifest.MANIFEST_NAME).write_text("{}")
    assert not old.exists() and f"removed {old}" in capsys.readouterr().err


def test_training_dir_user_names_are_not_leftovers(tmp_path: Path) -> None:
    """In output_dir, a bare `.final` and `checkpoint-4.old-2` are a user's; the staging dir `.final-<pid>-<random>`,
    temporaries of checkpoints, of the staging dir and of the manifest are what killed runs left."""
    for name in (".final", "checkpoint-4.old-2", ".final-12", "checkpoint-4.old-2-abcd1234x"):
        assert not checkpoint._stale(name), name
    for name in (".final-123-abcd1234", ".final.tmp-5-abcdefgh", "checkpoint-4.tmp-5-abcdefgh",
                 "checkpoint-4.old-5-abcdefgh", "exporter_manifest.json.tmp-5-abcdefgh",
                 "..final-1-abcd1234.exporter-lock"):  # fmt: skip
        assert checkpoint._stale(name), name


# ------------------------------------------------------------------ #2 one lock for every spelling


def test_a_symlinked_output_takes_the_same_lock(tmp_path: Path) -> None:
    """Two runs reaching one dir, one through a symlink, cannot both hold it."""
    (tmp_path / "ca").mkdir()
    (tmp_path / "calink").symlink_to("ca", target_is_directory=True)
    code = ("import sys\nfrom exporter import atomic\nfrom exporter.errors import UserError\ntry:\n"
            f"    with atomic.claim({str(tmp_path / 'calink')!r}):\n        pass\nexcept UserError as e:\n"
            "    print(e)\n    sys.exit(2)\n")  # fmt: skip
    with atomic.claim(tmp_path / "ca"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is being written by another exporter run" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path)) == ["ca", "calink"]


# ------------------------------------------------------------------ #3 manifests written atomically


def test_manifest_mark_keeps_the_previous_one_when_the_write_fails(tmp_path: Path) -> None:
    """A failed write (here a file-size limit) of the incomplete mark leaves the previous manifest whole, and says
    which file in one line."""
    manifest.write(tmp_path, "predict", inputs={})
    before = (tmp_path / manifest.MANIFEST_NAME).read_bytes()
    code = ("import sys\nfrom pathlib import Path\nfrom exporter import manifest\nfrom exporter.errors import "
            "UserError\ntry:\n    manifest.mark(Path(sys.argv[1]), 'predict')\nexcept UserError as e:\n"
            "    print(e)\n    sys.exit(2)\n")  # fmt: skip
    limit = 100  # the mark is longer
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))  # fmt: skip
    assert r.returncode == 2 and f"{tmp_path / manifest.MANIFEST_NAME}: File too large" in r.stdout, r.stderr
    assert (tmp_path / manifest.MANIFEST_NAME).read_bytes() == before
    assert os.listdir(tmp_path) == [manifest.MANIFEST_NAME]


def test_predict_repairs_an_empty_manifest_of_its_own_dir(tiny: Path, rows: Path, tmp_path: Path) -> None:
    """A predict-only dir whose manifest a kill or a full disk left empty (older versions) gets a whole manifest
    from the next predict."""
    out = tmp_path / "pk"
    out.mkdir()
    (out / manifest.MANIFEST_NAME).write_text("")
    (out / predict.PREDICTIONS).write_text("")
    opts = predict.PredictOptions(model_name_or_path=str(tiny), output_dir=str(out), eval_dataset=["d"],
                                  dataset_dir=str(rows), template="qwen-2.5", max_new_tokens=2,
                                  max_samples=2)  # fmt: skip
    predict.predict(opts)
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert doc["stage"] == "predict" and "complete" not in doc and manifest.changed(out) is None


# ------------------------------------------------------------------ #5 #6 a file-size limit, a name too long


def test_a_file_size_limit_is_one_line(tiny: Path, tmp_path: Path) -> None:
    """EFBIG (`ulimit -f`) is one line naming the output, exit 2, nothing left, like a full disk; safetensors'
    wrapped "File too large" counts too."""
    lora = random_lora(tiny, tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    r = _exporter("merge", "--base", str(tiny), "--adapter", str(lora), "--out", str(tmp_path / "m"), limit=200_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path / 'm'}: File too large")
    assert sorted(os.listdir(tmp_path)) == ["lora"]
    from safetensors import SafetensorError

    err = atomic.os_error(SafetensorError("Error while serializing: IoError(File too large (os error 27))"))
    assert err is not None and err.errno == errno.EFBIG


def test_a_name_too_long_for_the_temporaries_is_refused_first(tmp_path: Path) -> None:
    """An output name that leaves no room for `<name>.tmp-<pid>-<8>` is one line naming the limit, nothing made."""
    for name in ("m" * 240, "m" * 250):
        for make in (atomic.atomic_dir, atomic.atomic_file):
            with pytest.raises(UserError, match=r"240|250") as e, make(tmp_path / name):
                pass
            assert "at most 234 bytes" in str(e.value) and os.listdir(tmp_path) == []
    with atomic.atomic_dir(tmp_path / ("m" * 234)) as tmp:
        (tmp / "f").write_text("x")


# ------------------------------------------------------------------ #7 a run killed as its outputs moved in


def test_a_run_killed_as_its_final_files_moved_in_is_resumed(tiny: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """Its manifest says `complete: false` (the kill came before the final manifest): the same command resumes from
    the last checkpoint, as LLaMA-Factory's auto-resume does, and completes it."""
    out = tmp_path / "out"
    T.train(train_config(tiny, rows, out, save_steps=1))
    killed = {"stage": "train", "complete": False, "outputs": [{"path": n} for n in sorted(checkpoint._listed(out))]}
    (out / manifest.MANIFEST_NAME).write_text(json.dumps(killed))  # `write_final`'s mark, the state the kill leaves
    capsys.readouterr()
    T.train(train_config(tiny, rows, out, save_steps=1))
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().err
    assert manifest.changed(out) is None


# ------------------------------------------------------------------ #8 train never writes into its inputs


def test_train_refuses_an_output_dir_in_its_inputs(tiny: Path, rows: Path, tmp_path: Path) -> None:
    """output_dir inside the base, inside adapter_name_or_path or holding the data is refused in merge's words,
    before output_dir is touched."""
    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    lora = random_lora(tiny, tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    for out, extra, inp in ((base / "sub", {}, base), (lora / "sub" / "x", {"adapter_name_or_path": str(lora)}, lora),
                            (rows, {}, rows / "dataset_info.json")):  # fmt: skip
        before = sorted(os.listdir(out.parent)) if out.parent.exists() else None
        with pytest.raises(UserError, match=re.escape(f"output_dir {out} overlaps the input {inp} (it would")):
            T.train(train_config(base, rows, out, **extra))
        assert (sorted(os.listdir(out.parent)) if out.parent.exists() else None) == before


# ------------------------------------------------------------------ #9 predict's files replaced together


class _Eng:
    def decode(self, ids: list[int], skip: bool) -> str:
        return "prompt"


def test_a_kill_among_predicts_renames_leaves_the_manifest_incomplete(tmp_path: Path, monkeypatch) -> None:
    """Predictions replaced, scores not yet: the manifest says incomplete (its own, or a training dir's marked
    pending), never whole-looking over mixed files; a finished write restores the training dir's manifest."""
    ex = [predict.Example([1], "label", "label", "row 1")]
    real = atomic.atomic_file

    def killed_at_results(path: Path, force: bool = True):  # noqa: ANN202
        if Path(path).name == predict.RESULTS:
            raise KeyboardInterrupt
        return real(path, force)

    own, trained = tmp_path / "own", tmp_path / "trained"
    for out, stage in ((own, "predict"), (trained, "train")):
        out.mkdir()
        predict._write_outputs(out, ex, _Eng(), ["old"], {"predict_bleu-4": 1.0})
        manifest.write(out, stage, inputs={})
        monkeypatch.setattr(atomic, "atomic_file", killed_at_results)
        with pytest.raises(KeyboardInterrupt):
            predict._write_outputs(out, ex, _Eng(), ["new answer"], {"predict_bleu-4": 2.0})
        monkeypatch.undo()
        doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
        assert doc["complete"] is False and "incomplete" in (manifest.changed(out) or ""), doc
    assert "predict run writing it" in manifest.changed(trained)
    written = predict._write_outputs(trained, ex, _Eng(), ["new answer"], {"predict_bleu-4": 2.0})
    predict._record(trained, predict.PredictOptions(model_name_or_path="m", output_dir=str(trained)), written)
    doc = json.loads((trained / manifest.MANIFEST_NAME).read_text())
    assert doc["stage"] == "train" and "complete" not in doc and manifest.changed(trained) is None


# ------------------------------------------------------------------ #10 messages


def test_a_report_under_a_file_is_refused_before_verify_runs(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("hi")
    r = _exporter("verify", "--merged", str(tmp_path / "nothing"), "--report", str(tmp_path / "afile" / "r.json"))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --report {tmp_path / 'afile' / 'r.json'}: {tmp_path / 'afile'} is a file, not a directory; give a "
        "path in a directory"
    ), r.stderr
    with pytest.raises(UserError, match=f"cannot create {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not"):
        atomic.atomic_dir(tmp_path / "afile" / "m").__enter__()


def test_a_small_disk_full_message_counts_in_kib(tmp_path: Path) -> None:
    """A full disk while writing a small file: sizes in KiB or bytes, no guess at what was needed."""
    with pytest.raises(UserError) as e, atomic.atomic_file(tmp_path / "r.json") as tmp:
        tmp.write_bytes(b"x" * 1536)
        raise OSError(errno.ENOSPC, "No space left on device")
    text = str(e.value)
    assert "(No space left on device): 1.5 KiB written, " in text and "needed" not in text, text
    assert os.listdir(tmp_path) == []
