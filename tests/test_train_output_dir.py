"""exporter train and its output_dir: what is ours (no user file removed, only atomic's exact temporaries), refusals
that change nothing, bad inputs refused before anything is written, the umask, HF's final checkpoint and a run
extended from it, save_strategy, intervals given as a fraction of the run, and LLaMA-Factory's eval_results.json."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import random_lora, train_config, trainer_log

from exporter import atomic, checkpoint, cli, lf_args, manifest
from exporter import train as T
from exporter.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rows")
    data = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(8)]
    (d / "d.json").write_text(json.dumps(data))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": f"Line {i} of plain text to learn."}) + "\n"
                                          for i in range(24)))  # fmt: skip
    info = {"d": {"file_name": "d.json"}, "text": {"file_name": "text.jsonl", "columns": {"prompt": "text"}}}
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    old, sys.argv = sys.argv, ["exporter", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--dataset_dir", str(data), "--dataset", "d",
            "--output_dir", str(out), "--template", "qwen-2.5", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--max_steps", "2", *extra]  # fmt: skip


def _refused(capsys: pytest.CaptureFixture, args: list[str], *expected: str) -> str:
    code, err = _cli(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(e in lines[0] for e in expected), lines[0]
    return lines[0]


def _tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


# ------------------------------------------------------------------ what is ours


def test_only_atomics_exact_temporaries_are_leftovers(tmp_path: Path) -> None:
    """`<name>.tmp-<pid>-<tempfile's suffix>`, `<name>.old-<pid>` and `.<name>.exporter-lock` are ours; a user's
    `notes.tmp-2024.txt` or `eval.old-run1.json` is not, and a claim never removes it."""
    made = Path(tempfile.mkdtemp(prefix=f"out.tmp-{os.getpid()}-", dir=tmp_path)).name
    assert atomic.leftover(made) == ("out", os.getpid()) and atomic.leftover("out.old-123-ab_cd9z0") == ("out", 123)
    assert atomic.leftover("checkpoint-3.tmp-77-ab_cd9z0") == ("checkpoint-3", 77)
    for name in ("notes.tmp-2024.txt", "eval.old-run1.json", "out.tmp-12", "out.tmp-12-abc", "out.old-",
                 "out.tmp-1-ABCDEFGH", "out.tmp-x-abcdefgh", "out.old-12.bak", "out.old-123"):  # fmt: skip
        assert atomic.leftover(name) is None, name
    assert atomic.locked(atomic.lock_name("checkpoint-3")) == "checkpoint-3" and atomic.locked("..final.exporter-lock")
    assert atomic.locked(".exporter-lock") is None and atomic.locked("a.exporter-lock") is None
    user = [tmp_path / "out.tmp-2024.txt", tmp_path / "out.old-run1", tmp_path / "out.tmp-1-short"]
    for p in user:
        p.write_text("mine")
    (tmp_path / "out.tmp-999999-abcdefgh").mkdir()  # a killed writer's
    with atomic.atomic_dir(tmp_path / "out") as t:
        (t / "f").write_text("x")
    assert all(p.read_text() == "mine" for p in user) and not (tmp_path / "out.tmp-999999-abcdefgh").exists()


def test_ours_is_what_a_run_writes(tmp_path: Path) -> None:
    """checkpoint-<digits> dirs, the log, the manifest, its listed outputs of the names a run writes, and what
    killed runs left; a manifest listing a user's file (older versions listed the whole dir) does not make it ours."""
    out = tmp_path / "out"
    out.mkdir()
    names = ["checkpoint-2", "checkpoint-best", "checkpoint-2.old-5-abcdefgh", ".final-5-abcdefgh",
             ".final.tmp-5-abcdefgh", ".checkpoint-4.exporter-lock", "adapter_model.safetensors", "README.md",
             "notes.md", "notes.tmp-2024.txt", "eval.old-run1.json", "training_loss.png",
             checkpoint.TRAINER_LOG]  # fmt: skip
    for n in names:
        (out / n).mkdir() if n.startswith(("checkpoint-", ".final")) else (out / n).write_text("x")
    (out / "checkpoint-3").write_text("a file, not a checkpoint")
    listed = ["adapter_model.safetensors", "notes.md", "training_loss.png", "checkpoint-2/trainer_state.json"]
    (out / manifest.MANIFEST_NAME).write_text(json.dumps({"stage": "train", "outputs": [{"path": p} for p in listed]}))
    assert checkpoint._ours(out) == {
        manifest.MANIFEST_NAME, checkpoint.TRAINER_LOG, "checkpoint-2", "checkpoint-2.old-5-abcdefgh",
        ".final-5-abcdefgh", ".final.tmp-5-abcdefgh", ".checkpoint-4.exporter-lock", "adapter_model.safetensors",
        "training_loss.png",
    }  # fmt: skip


def test_look_alikes_of_checkpoints_are_the_users_and_resume_takes_the_highest(tmp_path: Path) -> None:
    """`checkpoint-3-best/`, a `checkpoint-7` link to a user's dir and another output's atomic temporary are not
    ours (overwrite_output_dir would remove them); resume picks the highest complete checkpoint-N by number."""
    out = tmp_path / "out"
    out.mkdir()
    mine = tmp_path / "elsewhere"
    mine.mkdir()
    (out / "checkpoint-7").symlink_to(mine, target_is_directory=True)
    for n in ("checkpoint-3-best", "checkpoint-10.bak", "notes.tmp-5-abcdefgh", "checkpoint-2", "checkpoint-10",
              "checkpoint-12"):  # fmt: skip
        (out / n).mkdir()
    for n in ("checkpoint-2", "checkpoint-10"):  # complete; checkpoint-12 has no state yet (killed mid-save)
        (out / n / checkpoint.STATE_NAME).write_text("{}")
    assert checkpoint._ours(out) == {manifest.MANIFEST_NAME, checkpoint.TRAINER_LOG, "checkpoint-2", "checkpoint-10",
                                     "checkpoint-12"}  # fmt: skip
    assert checkpoint.latest(out) == out / "checkpoint-10"


def test_runs_into_a_dir_keep_the_users_files(tiny: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """A resumed run and an overwrite_output_dir run remove only the run's own files and what killed runs left."""
    out = tmp_path / "out"
    T.train(train_config(tiny, rows, out, save_steps=1))
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-best")
    users = {"eval.old-run1.json": "mine", "notes.tmp-2024.txt": "mine", "notes.md": "mine"}
    for n, text in users.items():
        (out / n).write_text(text)
    stale = [".final.tmp-999999-abcd1234", "checkpoint-2.old-999999-abcd1234", ".checkpoint-1.exporter-lock",
             ".final-999999-abcd1234"]  # fmt: skip
    for n in stale:
        (out / n).mkdir() if "lock" not in n else (out / n).write_text("")
    capsys.readouterr()
    T.train(train_config(tiny, rows, out, save_steps=1, resume_from_checkpoint=str(out / "checkpoint-1")))
    assert all((out / n).read_text() == t for n, t in users.items()) and (out / "checkpoint-best").is_dir()
    assert not any((out / n).exists() for n in stale)
    T.train(train_config(tiny, rows, out, overwrite_output_dir=True))
    err = capsys.readouterr().err
    assert "kept checkpoint-best, eval.old-run1.json, notes.md, notes.tmp-2024.txt in" in err
    assert all((out / n).read_text() == t for n, t in users.items()) and (out / "checkpoint-best").is_dir()
    assert not (out / "checkpoint-1").exists() and (out / "checkpoint-2").is_dir()
    assert {p.name for p in out.iterdir()} - checkpoint._ours(out) == {"checkpoint-best", *users}  # the rest: ours


def test_refusals_change_nothing(tiny: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """A refused resume (no checkpoint; another run's checkpoint) or rerun leaves output_dir byte for byte as it
    was, so overwrite_output_dir then works; a dir whose final outputs its manifest does not list is one line that
    does not tell to set overwrite_output_dir when it is set."""
    out, other = tmp_path / "out", tmp_path / "other"
    assert _cli(capsys, *_args(tiny, rows, out))[0] == 0
    for ckpt in out.glob("checkpoint-*"):  # a finished run without checkpoints
        shutil.rmtree(ckpt)
    T.train(train_config(tiny, rows, other, max_steps=1, per_device_train_batch_size=2))
    before = _tree(out)
    _refused(capsys, _args(tiny, rows, out, "--resume_from_checkpoint", "true"), "has no checkpoint-N")
    assert _tree(out) == before
    _refused(capsys, _args(tiny, rows, out), "already holds a finished run; set overwrite_output_dir: true")
    assert _tree(out) == before
    _refused(capsys, _args(tiny, rows, out, "--resume_from_checkpoint", str(other / "checkpoint-1")),
             "batch_size 2 in the checkpoint, 4 now")  # fmt: skip
    assert _tree(out) == before
    code, err = _cli(capsys, *_args(tiny, rows, out, "--overwrite_output_dir"))
    assert code == 0 and "kept" not in err, err
    manifest.mark(out, "train")  # as an older version left a dir after a refused resume
    before = _tree(out)
    line = _refused(capsys, _args(tiny, rows, out, "--overwrite_output_dir"), "adapter_model.safetensors",
                    "not listed in its exporter_manifest.json as written by exporter train")  # fmt: skip
    assert "set overwrite_output_dir" not in line and _tree(out) == before


# ------------------------------------------------------------------ inputs checked before anything is written


def test_bad_model_and_adapter_refused_before_writing(tiny: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """A truncated base or adapter safetensors, an adapter dir given as the model (transformers would load its base
    and PEFT stack a second adapter on it), a model dir given as the adapter: one line, exit 2, no output_dir."""
    out = tmp_path / "out"
    broken = shutil.copytree(tiny, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _refused(capsys, _args(broken, rows, out), f"{weights}: corrupt or truncated safetensors file")
    adapter = random_lora(tiny, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    _refused(capsys, _args(adapter, rows, out), f"model_name_or_path {adapter} is a PEFT adapter",
             f"pass its base model ({tiny}) as model_name_or_path and {adapter} as adapter_name_or_path")  # fmt: skip
    _refused(capsys, _args(tiny, rows, out, "--adapter_name_or_path", str(tiny)), "no adapter_config.json")
    cut = adapter / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    _refused(capsys, _args(tiny, rows, out, "--adapter_name_or_path", str(adapter)), f"{cut}: corrupt or truncated")
    assert not out.exists()


# ------------------------------------------------------------------ outputs


def test_outputs_follow_the_umask(tiny: Path, rows: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapter, full model, optimizer and RNG safetensors (save_file writes 0600) are 0644 under umask 022, dirs
    0755, in the output and its checkpoints."""
    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    old = os.umask(0o022)
    try:
        T.train(train_config(tiny, rows, tmp_path / "lora", max_steps=1))
        T.train(train_config(tiny, rows, tmp_path / "full", max_steps=1, finetuning_type="full", learning_rate=1e-5))
    finally:
        os.umask(old)
    paths = [p for p in tmp_path.rglob("*") if not p.is_symlink()]
    assert {"optimizer.safetensors", "rng_state.safetensors", "adapter_model.safetensors", "model.safetensors"} <= {
        p.name for p in paths}  # fmt: skip
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in paths}
    assert {k: m for k, m in modes.items() if m != (oct(0o755) if Path(k).is_dir() else oct(0o644))} == {}
    assert {p.name for p in (tmp_path / "full").iterdir()} <= checkpoint._ours(tmp_path / "full")  # all known


def test_final_checkpoint_and_a_run_extended_from_it(tiny: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """As HF's Trainer: a save at the last step; a finished run resumed from it with a larger max_steps goes on
    from that step, its linear schedule rebuilt for the new total (HF loads the scheduler's step into the new
    schedule); another batch size is still refused."""
    out = tmp_path / "out"
    T.train(train_config(tiny, rows, out, lr_scheduler_type="linear"))
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2"}
    _refused(capsys, _args(tiny, rows, out), f"resume_from_checkpoint: {out / 'checkpoint-2'} with a larger max_steps")
    T.train(train_config(tiny, rows, out, lr_scheduler_type="linear", max_steps=4,
                         resume_from_checkpoint=str(out / "checkpoint-2")))  # fmt: skip
    log = trainer_log(out)
    assert [(r["current_steps"], r["total_steps"]) for r in log] == [(1, 2), (2, 2), (3, 4), (4, 4)]
    # the lr each step used: step 3 the checkpoint's last rate (0, as HF's resumed optimizer has it), step 4 the new
    # total's schedule
    assert log[2]["lr"] == 0.0 and log[3]["lr"] == pytest.approx(1e-3 * 1 / 4)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4 and (out / "checkpoint-4").is_dir()
    assert manifest.changed(out) is None
    more_epochs = train_config(tiny, rows, tmp_path / "e", max_steps=-1, num_train_epochs=3,
                               resume_from_checkpoint=str(out / "checkpoint-2"))  # fmt: skip
    assert T.train(more_epochs).steps == 6  # 8 rows, 4 a batch: 2 steps an epoch
    with pytest.raises(UserError, match="batch_size 4 in the checkpoint, 2 now"):
        T.train(train_config(tiny, rows, tmp_path / "b", max_steps=4, per_device_train_batch_size=2,
                             resume_from_checkpoint=str(out / "checkpoint-2")))  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_save_strategy(tiny: Path, rows: Path, tmp_path: Path) -> None:
    """LLaMA-Factory's save_strategy with HF's meaning: epoch saves at each epoch's end, no never; YAML's bare `no`
    reads as false and means "no"; other values are one line."""
    cfg, _ = lf_args.config_from_dict({"model_name_or_path": "m", "output_dir": "o", "save_strategy": False}, "x")
    assert cfg.save_strategy == "no"
    with pytest.raises(UserError, match="save_strategy"):
        lf_args.config_from_dict({"model_name_or_path": "m", "output_dir": "o", "save_strategy": "best"}, "x")
    for strategy, saved in (("epoch", {"checkpoint-2", "checkpoint-4"}), ("no", set())):
        out = tmp_path / strategy
        T.train(train_config(tiny, rows, out, max_steps=-1, num_train_epochs=2, save_strategy=strategy, save_steps=1))
        assert {p.name for p in out.glob("checkpoint-*")} == saved


def test_fractional_intervals_and_eval_results(tiny: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """eval_steps/save_steps/logging_steps < 1 are fractions of the run (HF), said as the step count they come to;
    1.5 is one line; do_eval writes LLaMA-Factory's eval_results.json (pt: with the perplexity)."""
    with pytest.raises(UserError, match="eval_steps must be positive: a whole number of steps, or a fraction"):
        lf_args.check(train_config(Path("m"), rows, tmp_path, val_size=0.25, eval_strategy="steps", eval_steps=1.5),
                      set(), "cpu")  # fmt: skip
    cfg, _ = lf_args.config_from_dict({"model_name_or_path": "m", "output_dir": "o", "eval_steps": 0.5}, "x")
    assert cfg.eval_strategy == "steps" and "eval_steps" not in capsys.readouterr().err  # said once it is resolved
    out = tmp_path / "sft"
    T.train(train_config(tiny, rows, out, max_steps=4, val_size=0.25, eval_strategy="steps", eval_steps=0.5,
                         save_steps=0.5, logging_steps=0.5, do_eval=True))  # fmt: skip
    err = capsys.readouterr().err
    assert all(f"{k}=0.5: every 2 of the 4 steps" in err for k in ("logging_steps", "save_steps", "eval_steps"))
    assert [r["current_steps"] for r in trainer_log(out) if "eval_loss" in r] == [2, 4, 4]  # + do_eval's at the end
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    results, evals = (json.loads((out / f"{n}_results.json").read_text()) for n in ("all", "eval"))
    assert set(evals) == {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch"}
    assert results["eval_loss"] == evals["eval_loss"] and "eval_loss" not in json.loads(
        (out / "train_results.json").read_text())  # fmt: skip
    out = tmp_path / "pt"
    T.train(train_config(tiny, rows, out, stage="pt", dataset=["text"], template=None, cutoff_len=16, val_size=0.25,
                         do_eval=True))  # fmt: skip
    evals = json.loads((out / "eval_results.json").read_text())
    assert evals["eval_perplexity"] == pytest.approx(math.exp(evals["eval_loss"]))
    assert torch.isfinite(torch.tensor(evals["eval_perplexity"]))
