"""exporter train's keys and their effect: the pipeline's QLoRA, KTO's pref_ftx over a global step, the
logged learning rate, text keys kept as typed, keys without effect said once, a continued adapter's own settings,
optimizer settings changed on resume, an unreachable hub dataset, unsupported keys at their defaults, what a resumed
run trained."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import typer
from conftest import trainer_log
from test_train_dtype_lf import fp32_copy

from exporter import checkpoint, cli, dataset_info, lf_args
from exporter import train as T
from exporter.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rows")
    sft = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(8)]
    # KTO rows, mostly desirable: micro-batches hold unequal numbers of them
    kto = [{"instruction": f"Say {i}.", "output": f"{i}" if i % 4 else f"Not {i} at all", "tag": i % 4 != 3}
           for i in range(16)]  # fmt: skip
    (d / "d.json").write_text(json.dumps(sft))
    (d / "kto.json").write_text(json.dumps(kto))
    info = {"d": {"file_name": "d.json"}, "hub": {"hf_hub_url": "exporter-tests/no-such-dataset-f5f9"},
            "kto": {"file_name": "kto.json", "columns": {"prompt": "instruction", "response": "output",
                                                         "kto_tag": "tag"}}}  # fmt: skip
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


@pytest.fixture(scope="session")
def tiny32(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qwen2 fixture in fp32: the base of runs compared across batch layouts (`fp32_copy`)."""
    return fp32_copy(tiny, tmp_path_factory.mktemp("tiny32"))


def _cfg(model: Path, data: Path, out: Path, **kw) -> lf_args.TrainConfig:
    base = dict(model_name_or_path=str(model), output_dir=str(out), dataset=["d"], dataset_dir=str(data),
                template="qwen", per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2, logging_steps=1,
                disable_gradient_checkpointing=True)  # fmt: skip
    return lf_args.TrainConfig(**(base | kw))


# 1 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["yaml", "override"])
def test_pipeline_with_quantization_bit_keeps_the_quant_libraries(tmp_path: Path, monkeypatch, how: str) -> None:
    """`exporter pipeline` with train.quantization_bit sets up as `exporter train quantization_bit=4` does: the
    quantization libraries stay importable (they were marked absent: "quantization_bit needs bitsandbytes")."""
    from exporter import pipeline

    seen = {}
    monkeypatch.setattr(cli, "_setup", lambda **kw: seen.update(kw))
    monkeypatch.setattr(pipeline, "load_config", lambda path, overrides: None)
    monkeypatch.setattr(pipeline, "run", lambda opts: type("R", (), {"passed": True})())
    train = {"stage": "sft", **({"quantization_bit": 4} if how == "yaml" else {})}
    (tmp_path / "p.yaml").write_text(json.dumps({"base": "b", "run_dir": "r", "train": train}))
    with pytest.raises(typer.Exit):
        cli._pipeline(tmp_path / "p.yaml", ["train.quantization_bit=4"] if how == "override" else [])
    assert seen["quantization"] is True and seen["deepspeed"] is False
    seen.clear()
    (tmp_path / "p.yaml").write_text(json.dumps({"base": "b", "run_dir": "r", "train": {"stage": "sft"}}))
    with pytest.raises(typer.Exit):
        cli._pipeline(tmp_path / "p.yaml", [])
    assert seen["quantization"] is False


# 2 -------------------------------------------------------------------------------------------------------------


def test_kto_pref_ftx_accumulation_equals_one_batch(tiny32: Path, rows: Path, tmp_path: Path) -> None:
    """KTO's pref_ftx term is normalised over the global step (its examples and desirable ones), so micro-batches
    with unequal numbers of desirable answers give one batch's loss (LLaMA-Factory's value for that batch); it used
    each micro-batch's own count."""
    kw = dict(stage="kto", dataset=["kto"], pref_ftx=0.5, max_steps=1, max_samples=8)
    one = T.train(_cfg(tiny32, rows, tmp_path / "one", per_device_train_batch_size=8, **kw)).out
    acc = T.train(_cfg(tiny32, rows, tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                       **kw)).out  # fmt: skip
    assert trainer_log(acc)[0]["loss"] == pytest.approx(trainer_log(one)[0]["loss"], abs=1e-4)


# 3 -------------------------------------------------------------------------------------------------------------


def test_logged_lr_is_the_lr_the_step_used(tiny: Path, rows: Path, tmp_path: Path) -> None:
    """trainer_log.jsonl's lr is the rate the step trained with, as transformers 5's Trainer (and so LLaMA-Factory
    0.9.5) logs it: 1e-4, 6.67e-5, 3.33e-5 for a linear schedule over 3 steps (it was one step late: ..., 0.0)."""
    out = T.train(_cfg(tiny, rows, tmp_path / "o", max_steps=3, learning_rate=1e-4, per_device_train_batch_size=2)).out
    assert [r["lr"] for r in trainer_log(out)] == pytest.approx([1e-4, 1e-4 * 2 / 3, 1e-4 / 3])


# 4 -------------------------------------------------------------------------------------------------------------


def test_text_keys_keep_the_text_as_typed(tmp_path: Path) -> None:
    """String keys keep what was typed, as LLaMA-Factory's argparse does (`--output_dir 0123` was YAML's octal 83,
    `--identity_name Yes` True); in a YAML file the plain scalar's own text is kept; other keys are still typed."""
    flags, _ = lf_args.parse_args(["--output_dir", "0123", "--identity_name", "Yes", "--identity_author=No",
                                   "--learning_rate", "1e-3", "--do_train", "--model_name_or_path", "m",
                                   "--dataset", "0o17,b"])  # fmt: skip
    assert flags["output_dir"] == "0123" and flags["identity_name"] == "Yes" and flags["identity_author"] == "No"
    cfg, _ = lf_args.config_from_dict(flags, "command line")
    assert cfg.output_dir == "0123" and cfg.dataset == ["0o17", "b"] and cfg.identity_name == "Yes"
    assert cfg.do_train is True and cfg.learning_rate == 1e-3
    (tmp_path / "c.yaml").write_text("model_name_or_path: m\noutput_dir: 0123\nidentity_name: Yes\nseed: 017\n"
                                     "template: 'qwen'\n")  # fmt: skip
    data, where = lf_args.parse_args([str(tmp_path / "c.yaml"), "output_dir=0o17", "adapter_name_or_path=null"])
    cfg, _ = lf_args.config_from_dict(data, where)
    assert (cfg.output_dir, cfg.identity_name, cfg.seed, cfg.template) == ("0o17", "Yes", 15, "qwen")
    assert cfg.adapter_name_or_path is None
    data, where = lf_args.parse_args([str(tmp_path / "c.yaml")])
    assert lf_args.config_from_dict(data, where)[0].output_dir == "0123"
    for argv in (["dataset=[a, b]"], ["--dataset", "[a, b]"], ["--dataset", "a,b"]):  # lists stay YAML: as before
        assert lf_args.config_from_dict({**lf_args.parse_args(argv)[0], "model_name_or_path": "m", "output_dir": "o"},
                                        "command line")[0].dataset == ["a", "b"]  # fmt: skip
    with pytest.raises(UserError, match=r"config: output_dir must be a string, got 83 \(quote it\)"):
        lf_args.config_from_dict({"model_name_or_path": "m", "output_dir": 83}, "config")


# 5 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "said"),
    [({"pref_beta": 0.3, "pref_ftx": 0.1}, "pref_beta, pref_ftx (only with stage: dpo or kto)"),
     ({"pref_beta": 0.3, "pref_loss": "ipo", "finetuning_type": "full", "lora_rank": 16},
      "pref_beta (only with stage: dpo or kto); pref_loss (only with stage: dpo); lora_rank (only with "
      "finetuning_type: lora)"),
     ({"stage": "dpo", "kto_chosen_weight": 2.0}, "kto_chosen_weight (only with stage: kto)"),
     ({"stage": "kto", "packing": True}, "packing (only with stage: sft or pt)"),
     ({"finetuning_type": "full", "lora_rank": 16, "lora_target": ["q_proj"]},
      "lora_rank, lora_target (only with finetuning_type: lora)"),
     ({"stage": "dpo", "simpo_gamma": 1.0}, "simpo_gamma (only with stage: dpo with pref_loss: simpo)"),
     ({"finetuning_type": "full", "freeze_trainable_layers": 1},
      "freeze_trainable_layers (only with finetuning_type: freeze)")],
)  # fmt: skip
def test_keys_without_effect_are_said_once(capsys, extra: dict, said: str) -> None:
    """A key that acts only in another stage or method is said once, naming it (it was accepted silently); at its
    default it asks for nothing and is not said."""
    given = {"model_name_or_path", "output_dir", "dataset", *extra}
    cfg = lf_args.TrainConfig(model_name_or_path="m", output_dir="o", dataset=["d"], **extra)
    lf_args.check(cfg, given, "cpu")
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "no effect" in ln]
    assert len(notes) == 1 and notes[0].startswith("note: no effect in this run (stage ") and said in notes[0], err
    lf_args.check(lf_args.TrainConfig(model_name_or_path="m", output_dir="o", dataset=["d"], stage="dpo",
                                      finetuning_type="full", lora_target=["all"], packing=False),
                  {"lora_target", "packing", "pref_loss"}, "cpu")  # fmt: skip
    assert "no effect" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "error"),
    [({"stage": "dpo", "train_on_prompt": True}, "train_on_prompt only applies to stage: sft"),
     ({"stage": "pt", "mask_history": True}, "mask_history only applies to stage: sft"),
     ({"finetuning_type": "full", "use_dora": True}, "use_dora only applies to finetuning_type: lora"),
     ({"finetuning_type": "freeze", "use_rslora": True}, "use_rslora only applies to finetuning_type: lora")],
)  # fmt: skip
def test_keys_llamafactory_refuses_elsewhere_are_errors(extra: dict, error: str) -> None:
    """Where LLaMA-Factory 0.9.5 raises (train_on_prompt/mask_history outside sft, DoRA/rsLoRA outside LoRA), so
    does exporter, in one line."""
    cfg = lf_args.TrainConfig(model_name_or_path="m", output_dir="o", dataset=["d"], **extra)
    with pytest.raises(UserError, match=error):
        lf_args.check(cfg, set(extra), "cpu")


# 6 -------------------------------------------------------------------------------------------------------------


def test_continued_adapter_says_the_settings_it_keeps(tiny: Path, rows: Path, tmp_path: Path, capsys) -> None:
    """Training on adapter_name_or_path keeps the adapter's LoRA settings: given ones that differ are said once with
    the adapter's values; `lora_target: all` on an all-linear adapter is no difference."""
    first = T.train(_cfg(tiny, rows, tmp_path / "first", max_steps=1)).out
    capsys.readouterr()
    T.train(_cfg(tiny, rows, tmp_path / "b", max_steps=1, adapter_name_or_path=str(first), lora_rank=16,
                 lora_target=["q_proj"], lora_dropout=0.0), {"lora_rank", "lora_target", "lora_dropout"})  # fmt: skip
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "its own LoRA settings" in ln]
    assert len(notes) == 1, notes
    assert "lora_rank 16 (the adapter's: 8)" in notes[0] and "lora_target q_proj (the adapter's: " in notes[0]
    assert "lora_dropout" not in notes[0]
    T.train(_cfg(tiny, rows, tmp_path / "c", max_steps=1, adapter_name_or_path=str(first), lora_target=["all"],
                 lora_rank=8), {"lora_target", "lora_rank"})  # fmt: skip
    assert "its own LoRA settings" not in capsys.readouterr().err


# 7 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("learning_rate", 5e-4), ("weight_decay", 0.1), ("adam_beta2", 0.95)])
def test_resume_refuses_changed_optimizer_settings(tiny: Path, rows: Path, tmp_path: Path, key: str,
                                                   value: float) -> None:  # fmt: skip
    """The optimizer's param groups and the scheduler's base rates come back from the checkpoint, so a changed
    learning_rate (weight_decay, betas, epsilon) would be ignored: refused, naming both values; a checkpoint that
    did not record them resumes as before."""
    out = tmp_path / "o"
    T.train(_cfg(tiny, rows, out, save_steps=1))
    ckpt = out / "checkpoint-1"
    old = getattr(lf_args.TrainConfig(model_name_or_path="m", output_dir="o"), key) if key != "learning_rate" else 1e-3
    with pytest.raises(UserError, match=f"{key} {old} in the checkpoint, {value} now"):
        T.train(_cfg(tiny, rows, out, save_steps=1, resume_from_checkpoint=str(ckpt), **{key: value}))
    saved = {"examples": 8, "seed": 42}
    checkpoint._check_same_run(ckpt, saved, saved | {key: value})  # not recorded: accepted


# 8 -------------------------------------------------------------------------------------------------------------


def test_unreachable_hub_dataset_is_one_quick_line(rows: Path, monkeypatch, capfd) -> None:
    """A hub dataset that cannot be reached fails at once in one line (huggingface_hub retried five times over
    ~23 s, logging each try), in offline mode so a cached copy would still load."""
    pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # never resolves
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in dataset_info._PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    sp = dataset_info.spec("hub", dataset_info.read_info(rows), rows)
    start = time.monotonic()
    with pytest.raises(UserError, match="the hub is unreachable and it is not in the local cache") as e:
        dataset_info.read_rows(sp)
    assert time.monotonic() - start < 10 and "\n" not in str(e.value)
    out, err = capfd.readouterr()
    assert "Retry" not in out + err and "thrown while requesting" not in out + err, out + err
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_reachable_hub_is_left_online(rows: Path, monkeypatch) -> None:
    """A reachable hub (or offline mode set by the user) loads as `datasets` does: offline mode only when the hub's
    host takes no connection."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    modes = []
    monkeypatch.setattr(dataset_info, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: modes.append(constants.HF_HUB_OFFLINE) or [{}])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    sp = dataset_info.spec("hub", dataset_info.read_info(rows), rows)
    assert dataset_info.read_rows(sp) == [("exporter-tests/no-such-dataset-f5f9 row 1", {})]
    monkeypatch.setattr(dataset_info, "_hub_reachable", lambda: False)
    dataset_info.read_rows(sp)
    assert modes == [False, True] and constants.HF_HUB_OFFLINE is False


# 9 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [("eval_on_each_dataset", "false", True), ("streaming", False, True), ("use_unsloth", "false", True),
     ("ref_model", None, True), ("pref_bco_weight", 0, True), ("freeze_multi_modal_projector", True, True),
     ("eval_on_each_dataset", True, False), ("streaming", True, False), ("use_unsloth", "yes", False),
     ("ref_model", "m2", False), ("pref_bco_weight", 0.5, False)],
)  # fmt: skip
def test_unsupported_key_at_its_default_is_accepted(key: str, value, accepted: bool) -> None:
    """A key exporter cannot honour yet, given at LLaMA-Factory's default, asks for nothing and is accepted; another
    value still needs the feature and is refused (`streaming=false` asks for nothing, `streaming=true` is refused)."""
    data = {"model_name_or_path": "m", "output_dir": "o", key: value}
    if accepted:
        assert not hasattr(lf_args.config_from_dict(data, "config")[0], key)
    else:
        with pytest.raises(UserError, match=f"config: {key}: .* is not supported yet"):
            lf_args.config_from_dict(data, "config")


# 10 ------------------------------------------------------------------------------------------------------------


def test_resumed_run_says_what_it_trained() -> None:
    """The closing line says the steps this run trained (it said "trained 6 steps" for steps 5-6 of a resume)."""
    assert T._trained(0, 6) == "trained 6 steps" and T._trained(0, 1) == "trained 1 step"
    assert T._trained(4, 6) == "trained steps 5-6 (resumed at step 4)"
    assert T._trained(5, 6) == "trained step 6 (resumed at step 5)" and T._trained(6, 6).startswith("trained no step")


# 9 -------------------------------------------------------------------------------------------------------------

_LF_TRAIN = """
import os, sys, yaml
os.environ["DISABLE_VERSION_CHECK"] = "1"
from llamafactory.train.tuner import run_exp
run_exp(yaml.safe_load(open(sys.argv[1])))
"""


def test_trainer_log_and_state_follow_llamafactory(tiny: Path, tmp_path: Path) -> None:
    """An epoch of 8 batches in updates of 3 (3, 3, 2), logging_steps 2, max_steps 3, through LLaMA-Factory 0.9.5
    itself and through exporter: the same log lines (step 2 only: HF logs the last step only when it is due), HF's
    epoch (micro-batches used: 0.75 at step 2, where updates gave 0.6667), LF's closing line, and trainer_state.json
    ending with the training summary."""
    import os
    import subprocess

    from conftest import lf_python

    rows = tmp_path / "data"  # LF's alpaca reader needs the input column
    rows.mkdir()
    (rows / "d.json").write_text(
        json.dumps([{"instruction": f"Q{i}?", "input": "", "output": f"A{i}."} for i in range(8)])
    )
    (rows / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    args = {"model_name_or_path": str(tiny), "dataset": "d", "dataset_dir": str(rows), "template": "qwen",
            "per_device_train_batch_size": 1, "gradient_accumulation_steps": 3, "max_steps": 3, "logging_steps": 2,
            "learning_rate": 1e-3, "cutoff_len": 128}  # fmt: skip
    lf_out = tmp_path / "lf"
    lf_cfg = {**args, "stage": "sft", "do_train": True, "finetuning_type": "lora", "output_dir": str(lf_out),
              "report_to": "none", "bf16": False, "plot_loss": False, "save_strategy": "no"}  # fmt: skip
    (tmp_path / "lf.yaml").write_text(json.dumps(lf_cfg))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([lf_python(), "-c", _LF_TRAIN, str(tmp_path / "lf.yaml")], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = T.train(_cfg(tiny, rows, tmp_path / "ours", **{k: v for k, v in args.items() if k != "dataset"})).out

    def lines(out: Path) -> list[dict]:
        return [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]

    def shape(out: Path) -> list[tuple]:
        return [(r["current_steps"], "loss" in r, round(r["epoch"], 4)) for r in lines(out)]

    assert shape(ours) == shape(lf_out) == [(2, True, 0.75), (3, False, 1.0)]
    assert set(lines(ours)[-1]) == set(lines(lf_out)[-1])  # the closing line: steps, epoch, percentage, times
    summary = {"epoch", "step", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
    for out in (ours, lf_out):
        state = json.loads((out / "trainer_state.json").read_text())
        assert summary <= set(state["log_history"][-1]) and state["log_history"][-1]["epoch"] == 1.0, out
        assert json.loads((out / "all_results.json").read_text())["epoch"] == 1.0
