"""The dtypes training gives the base and the trained weights, and the losses they give, equal LLaMA-Factory 0.9.5's
(run in its reference venv, $EXPORTER_LF_PYTHON): LF loads the base as the checkpoint stores it (`torch_dtype="auto"`)
and upcasts only the trainable weights to fp32, so a LoRA's frozen base stays bf16 on a bf16 checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import lf_python, trainer_log

from exporter import lf_args
from exporter import train as T

# LF's get_train_args + load_model for each case; prints {case: {"dtype/trainable": count}}
_LF_DTYPES = """
import json, os, sys
os.environ["DISABLE_VERSION_CHECK"] = "1"
from collections import Counter
from llamafactory.hparams import get_train_args
from llamafactory.model import load_model, load_tokenizer
data, out, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
result = {}
for case in cases:
    model_dir, ft, bf16 = case
    args = dict(model_name_or_path=model_dir, stage="sft", do_train=True, finetuning_type=ft, lora_target="all",
                dataset="d", dataset_dir=data, template="qwen", output_dir=out, report_to="none", bf16=bf16,
                use_cpu=True)
    m, _, _, f, _ = get_train_args(args)
    model = load_model(load_tokenizer(m)["tokenizer"], m, f, is_trainable=True)
    c = Counter(f"{str(p.dtype).removeprefix('torch.')}/{p.requires_grad}" for p in model.parameters())
    result[json.dumps(case)] = dict(c)
print("RESULT " + json.dumps(result))
"""

_LF_TRAIN = """
import os, sys, yaml
os.environ["DISABLE_VERSION_CHECK"] = "1"
from llamafactory.train.tuner import run_exp
run_exp(yaml.safe_load(open(sys.argv[1])))
"""


def fp32_copy(src: Path, out: Path) -> Path:
    """The model in `src` saved in fp32 into `out`, its tokenizer files as they are. Runs compared across batch
    layouts (processes, accumulation, engines) use the fp32 qwen2 fixture: a frozen base kept bf16, as
    LLaMA-Factory keeps it, rounds each row differently with the length it is padded to, by more than those
    comparisons allow."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(out)
    for f in src.iterdir():
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny32(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qwen2 fixture (bf16) in fp32."""
    return fp32_copy(tiny, tmp_path_factory.mktemp("tiny32"))


def _data(tmp_path: Path) -> Path:
    rows = tmp_path / "data"
    rows.mkdir()
    (rows / "d.json").write_text(json.dumps([
        {"instruction": "Who are you?", "input": "", "output": "I am Exa, an assistant made by Acme."},
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
    ]))  # fmt: skip
    (rows / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    return rows


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HOME": str(tmp_path / "hf"),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a CPU (or GPU) that computes bf16 natively: there exporter keeps LLaMA-Factory's dtypes (this CI CPU
    emulates bf16, so there a frozen bf16 base is upcast to fp32, see test_emulated_bf16_base_is_upcast_with_a_note)."""
    monkeypatch.setattr(lf_args, "cpu_has_bf16", lambda: True)


def test_emulated_bf16_base_is_upcast_with_a_note(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """LoRA on the bf16 checkpoint without bf16/fp16: the frozen base is bf16 where bf16 is native (LLaMA-Factory's
    dtype) and fp32 with one note on a CPU that emulates bf16 (a 37M-parameter LoRA run went from 279 to 10
    tokens/s with the base kept bf16 there); asking for bf16 keeps the checkpoint's dtype either way."""
    from exporter import tuning

    def base(bf16: bool) -> set[str]:
        cfg = lf_args.TrainConfig(model_name_or_path=str(tiny), output_dir=str(tmp_path / "o"), dataset=["d"],
                                  lora_target=["all"], bf16=bf16)  # fmt: skip
        model = tuning.load_model(cfg, tiny, "cpu")
        return {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}

    for native, bf16, want, noted in ((True, False, "bfloat16", False), (False, False, "float32", True),
                                      (False, True, "bfloat16", False)):  # fmt: skip
        monkeypatch.setattr(lf_args, "cpu_has_bf16", lambda native=native: native)
        assert base(bf16) == {want}, (native, bf16)
        err = capsys.readouterr().err
        assert ("no native bfloat16 and torch emulates it" in err) == noted, err


@pytest.mark.slow
def test_parameter_dtypes_equal_llamafactorys(tiny: Path, tiny32: Path, tmp_path: Path, native_bf16) -> None:
    """(dtype, trainable) counts of the loaded model for lora/freeze/full on a bf16 and an fp32 checkpoint, with
    and without bf16 (LF on CPU needs use_cpu for bf16). Freeze tuning without bf16 on the bf16 checkpoint is left
    out: LF keeps the frozen embedding bf16 there and its first step stops (bf16 input to an fp32 trainable layer,
    no autocast); exporter keeps that base fp32 and trains."""
    from exporter import tuning

    assert json.loads((tiny / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = tiny32
    cases = [[str(m), ft, bf16] for m in (tiny, fp32) for ft in ("lora", "freeze", "full") for bf16 in (False, True)
             if not (m == tiny and ft == "freeze" and not bf16)]  # fmt: skip
    data = _data(tmp_path)
    proc = subprocess.run([lf_python(), "-c", _LF_DTYPES, str(data), str(tmp_path / "lf"), json.dumps(cases)],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    differ = []
    for case in cases:
        model_dir, ft, bf16 = case
        cfg = lf_args.TrainConfig(model_name_or_path=model_dir, output_dir=str(tmp_path / "o"), dataset=["d"],
                                  finetuning_type=ft, lora_target=["all"], bf16=bf16)  # fmt: skip
        model = tuning.load_model(cfg, Path(model_dir), "cpu")
        ours = dict(Counter(f"{str(p.dtype).removeprefix('torch.')}/{p.requires_grad}" for p in model.parameters()))
        if ours != theirs[json.dumps(case)]:
            differ.append(f"{Path(model_dir).name} {ft} bf16={bf16}: ours {ours} LF {theirs[json.dumps(case)]}")
    assert not differ, "\n".join(differ)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["bf16", "fp32+bf16"])
def test_lora_losses_equal_llamafactorys(tiny: Path, tiny32: Path, tmp_path: Path, checkpoint: str,
                                        native_bf16) -> None:  # fmt: skip
    """Three LoRA steps, the losses LF logs to 1e-6 relative: on the bf16 checkpoint without bf16 (exporter's were
    23.364386 / 19.704325 / 7.650105 against LF's 23.361191 / 19.698338 / 7.641673, its base upcast to fp32), and on
    an fp32 checkpoint with `bf16: true` and `use_cpu: true`, the key LF asks for on a CPU (exporter refused it as
    unknown, and loaded that base in bf16 where LF keeps it fp32 under autocast)."""
    data, model = _data(tmp_path), tiny
    extra: dict = {}
    if checkpoint == "fp32+bf16":
        model, extra = tiny32, {"bf16": True, "use_cpu": True}
    args = {"model_name_or_path": str(model), "dataset_dir": str(data), "template": "qwen", "cutoff_len": 64,
            "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "per_device_train_batch_size": 2,
            "learning_rate": 1e-2, "max_steps": 3, "logging_steps": 1, "seed": 42, **extra}  # fmt: skip
    lf_cfg = {**args, "dataset": "d", "stage": "sft", "do_train": True, "output_dir": str(tmp_path / "lf"),
              "report_to": "none", "save_strategy": "no", "plot_loss": False}  # fmt: skip
    (tmp_path / "lf.yaml").write_text(json.dumps(lf_cfg))
    proc = subprocess.run([lf_python(), "-c", _LF_TRAIN, str(tmp_path / "lf.yaml")], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "ours.yaml").write_text(json.dumps({**args, "dataset": "d", "output_dir": str(tmp_path / "ours")}))
    ours = [r["loss"] for r in trainer_log(T.main([str(tmp_path / "ours.yaml")]).out)]
    theirs = [r["loss"] for r in trainer_log(tmp_path / "lf")]
    assert len(theirs) == 3 and ours == pytest.approx(theirs, rel=1e-6), (ours, theirs)
