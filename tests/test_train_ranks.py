"""Several training processes as LLaMA-Factory's users start them: the launcher variables (held equal to
LLaMA-Factory 0.9.5's own launcher, which is run with a stand-in torchrun that records its command line), and a
failure met by one rank only, which must end every rank with one line each, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_dtype_lf import fp32_copy
from test_train_methods import pdata  # noqa: F401 - the pairwise, KTO and SFT rows of the training tests

from exporter import distributed

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

# a stand-in torchrun: records its arguments (one per line) where RECORD says, and exits 0
_FAKE_TORCHRUN = """#!/bin/sh
printf '%s\\n' "$@" > "$RECORD"
"""

_LAUNCHES = {  # LLaMA-Factory's launcher variables, as its docs and examples set them
    "static": {"FORCE_TORCHRUN": "y", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "3"},
    "elastic": {
        "FORCE_TORCHRUN": "1",
        "RDZV_ID": "job7",
        "MIN_NNODES": "1",
        "MAX_NNODES": "2",
        "MAX_RESTARTS": "3",
        "NPROC_PER_NODE": "2",
    },
    "elastic-fixed": {"FORCE_TORCHRUN": "true", "RDZV_ID": "job8", "NNODES": "2", "NPROC_PER_NODE": "2"},
}
_MASTER = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"}


@pytest.fixture(scope="session")
def tiny32(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qwen2 fixture in fp32: the base of runs compared across batch layouts (`fp32_copy`)."""
    return fp32_copy(tiny, tmp_path_factory.mktemp("tiny32"))


def _options(args: list[str]) -> dict[str, str]:
    """torchrun's options before the script, `--a-b` and `--a_b` alike."""
    out, i = {}, 0
    while i < len(args) and args[i].startswith("--"):
        out[args[i].lstrip("-").replace("-", "_")] = args[i + 1]
        i += 2
    return out


@pytest.mark.slow
def test_launcher_variables_equal_llamafactorys(tmp_path: Path, monkeypatch) -> None:
    """FORCE_TORCHRUN=y (LF's is_env_enabled takes y) and LF's elastic launch (RDZV_ID, MIN_NNODES/MAX_NNODES,
    MAX_RESTARTS: a c10d rendezvous at MASTER_ADDR:MASTER_PORT) start torchrun with LLaMA-Factory's options; they were
    ignored (no torchrun at all for `y`; a static launch without restarts for RDZV_ID)."""
    from conftest import lf_python

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(_FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    (tmp_path / "cfg.yaml").write_text("stage: sft\n")
    lf_cli = Path(lf_python()).parent / "llamafactory-cli"
    base = {k: v for k, v in os.environ.items() if k not in {"LOCAL_RANK", "RANK", "WORLD_SIZE"}}
    base["PATH"] = f"{bin_dir}{os.pathsep}{base['PATH']}"
    procs = {}
    for name, launch in _LAUNCHES.items():  # LLaMA-Factory's launcher, all three at once
        env = {**base, **launch, **_MASTER, "RECORD": str(tmp_path / f"lf-{name}"), "DISABLE_VERSION_CHECK": "1"}
        procs[name] = subprocess.Popen([str(lf_cli), "train", "cfg.yaml"], env=env, cwd=tmp_path,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for name, launch in _LAUNCHES.items():
        out = procs[name].communicate(timeout=300)[0]
        assert procs[name].returncode == 0, out[-3000:]
        theirs = _options((tmp_path / f"lf-{name}").read_text().splitlines())
        seen: list[list[str]] = []
        monkeypatch.setattr(distributed, "_torchrun", lambda args, seen=seen: seen.append(args) or 0)
        for key in {k for la in _LAUNCHES.values() for k in la} | {"LOCAL_RANK"}:
            monkeypatch.delenv(key, raising=False)
        for key, value in {**launch, **_MASTER}.items():
            monkeypatch.setenv(key, value)
        assert distributed.relaunch(["cfg.yaml"]) == 0 and seen, name
        assert _options(seen[0]) == theirs, name


def test_elastic_variables_are_checked(monkeypatch) -> None:
    """Elastic launch variables that torchrun would reject, or that would leave each node waiting for good: one line."""
    monkeypatch.setattr(distributed, "_torchrun", lambda args: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for key in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("RDZV_ID", "job")
    for env, said in (({"MAX_RESTARTS": "x"}, "MAX_RESTARTS"), ({"MIN_NNODES": "2", "MAX_NNODES": "1"}, "MIN_NNODES"),
                      ({"MIN_NNODES": "1", "MAX_NNODES": "2"}, "MASTER_ADDR and MASTER_PORT not set")):  # fmt: skip
        for key in ("MAX_RESTARTS", "MIN_NNODES", "MAX_NNODES"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(distributed.UserError, match=said):
            distributed.relaunch(["cfg.yaml"])


# makes one rank fail on its own (FAIL_RANK, at FAIL_AT), as a rank whose node reads other data, or whose disk is
# full, does: imported at start-up by every process of the run (a sitecustomize on PYTHONPATH)
_ONE_RANK_FAILS = """import os
if os.environ.get("RANK") == os.environ["FAIL_RANK"]:
    from exporter import checkpoint, examples
    from exporter.errors import UserError

    def fail(*args, **kwargs):
        raise UserError(os.environ["FAIL_SAYS"])

    if os.environ["FAIL_AT"] == "data":
        examples.prepare = fail
    else:
        checkpoint.save = fail
"""


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "at", "says"), [("1", "data", "sft.json: row 3: expected a string"),
                                                  ("0", "save", "checkpoint-1: No space left on device")])  # fmt: skip
def test_one_rank_failing_stops_every_rank_in_one_line(tiny: Path, tmp_path: Path, rank: str, at: str,
                                                       says: str) -> None:  # fmt: skip
    """One rank meets an error the others do not (its data, before any step; rank 0 writing a checkpoint while rank 1
    waits): it says why, every other rank says in one line that it stops with it, exit code 2. The other rank used to
    print a traceback of gloo's "Connection closed by peer" from the collective it was waiting in."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.json").write_text(json.dumps([{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(8)]))
    (data / "dataset_info.json").write_text(json.dumps({"sft": {"file_name": "sft.json"}}))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ONE_RANK_FAILS)
    env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", EXPORTER_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               FAIL_RANK=rank, FAIL_AT=at, FAIL_SAYS=says,
               PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    args = ["--model_name_or_path", str(tiny), "--dataset", "sft", "--dataset_dir", str(data), "--template", "qwen",
            "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2",
            "--disable_gradient_checkpointing", "true", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "exporter", "train", *args], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)  # fmt: skip
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert not [line for line in lines if not line.startswith(("error:", "note:"))], p.stderr[-3000:]
    other = 1 - int(rank)
    assert sorted(errors) == sorted(
        [
            f"error: {says}",
            f"error: training process {other} stops: another training "
            "process of the run stopped and closed its connection (its error says why)",
        ]
    ), p.stderr[-3000:]


@pytest.mark.slow
def test_kto_batch_split_unevenly_equals_one_process(tiny32: Path, pdata: Path, tmp_path: Path) -> None:  # noqa: F811
    """27 KTO examples in global batches of 4: the short batch of 3 is split 2 + 1 over two processes. Its KL baseline
    is the mean over its 3 rows, as one process computes it; each process's mean, averaged over the processes, made
    the two-process run leave one process's curve at that step (loss 0.7679 against 0.7771, kl 148.4 against 138.5)
    and drift from there."""
    from conftest import trainer_log
    from test_train_methods import _flags, _one_process, _torchrun

    from exporter import examples, lf_args

    common = _flags(stage="kto", model_name_or_path=tiny32, dataset="kto", dataset_dir=pdata, template="qwen",
                    max_samples=27, num_train_epochs=1, logging_steps=1, learning_rate=1e-2, save_strategy="no",
                    disable_gradient_checkpointing=True)  # fmt: skip
    cfg, _ = lf_args.config_from_args(common + _flags(output_dir=tmp_path / "x"))
    lengths = [examples.length(e) for e in examples.prepare(cfg, tiny32).train]
    assert len(lengths) == 27

    def short_at(seed: int) -> int:  # the step of the batch of 3 (with LoRA's zero start the KL is 0 at step 1)
        return [len(b) for b in examples.plan_epoch(lengths, 4, seed, 0)].index(3) + 1

    seed = next(s for s in range(100) if short_at(s) >= 6)  # once the policy has moved off the reference
    common += _flags(seed=seed)
    one = _one_process(common + _flags(per_device_train_batch_size=4, output_dir=tmp_path / "one"))
    _torchrun(2, common + _flags(per_device_train_batch_size=2, output_dir=tmp_path / "two"), tmp_path)
    a, b = trainer_log(one), trainer_log(tmp_path / "two")
    assert [r["current_steps"] for r in b] == list(range(1, 8))
    assert a[short_at(seed) - 1]["kl"] > 1
    # the KL and rewards are differences of sums of log-probs near -300, which carry fp32 noise (a few 1e-3) at this lr
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4), ra["current_steps"]
        assert rb["kl"] == pytest.approx(ra["kl"], rel=1e-3, abs=1e-2), ra["current_steps"]
