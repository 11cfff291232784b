"""exporter predict: LLaMA-Factory's do_predict files and BLEU/ROUGE, against jieba + rouge-chinese + nltk computed
here on the written predictions, against LF's own run when its reference venv is there ($EXPORTER_LF_PYTHON), on
HF, HF + adapter and GGUF models; LF's predict YAML unchanged apart from model path and dataset dir."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, lf_python, require_llama_cpp
from engine_models import CLEAN, POISONED, nan_token_model
from sharp_model import sharpen
from test_metrics import reference

HERE = Path(__file__).resolve().parent
DATA = ROOT / "data"
DATASETS = "identity,alpaca_zh_demo,alpaca_en_demo"
# LLaMA-Factory's examples/train_lora/llama3_lora_predict.yaml, verbatim but for the model, adapter and output paths
LF_PREDICT_YAML = """\
### model
model_name_or_path: {model}
adapter_name_or_path: {adapter}

### method
stage: sft
do_predict: true
finetuning_type: lora

### dataset
eval_dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 50
overwrite_cache: true
preprocessing_num_workers: 16
dataset_dir: {data}

### output
output_dir: {out}
overwrite_output_dir: true

### eval
per_device_eval_batch_size: 1
predict_with_generate: true
ddp_timeout: 180000000
"""


@pytest.fixture(scope="module")
def sharp_qwen(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny qwen2 with varied greedy answers; its only eos is the tokenizer's (<|im_end|>), as LF stops."""
    return sharpen(tiny_model("qwen2"), tmp_path_factory.mktemp("sharp") / "qwen2-sharp", eos_only=True)


def _exporter(*args: str, cwd: Path | None = None, progress: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "EXPORTER_NO_PROGRESS": "" if progress else "1"}
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=900)  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def _predict(model: Path, out: Path, *extra: str, progress: bool = False) -> subprocess.CompletedProcess:
    r = _exporter("predict", "--model_name_or_path", str(model), "--eval_dataset", DATASETS, "--dataset_dir",
                  str(DATA), "--max_samples", "3", "--max_new_tokens", "12", "--output_dir", str(out), *extra,
                  progress=progress)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr
    return r


def test_files_and_metrics_equal_reference_libraries(sharp_qwen: Path, tmp_path: Path) -> None:
    r = _predict(sharp_qwen, tmp_path / "b4", "--per_device_eval_batch_size", "4", progress=True)
    assert "ETA" in r.stderr  # progress with ETA
    rows = _rows(tmp_path / "b4")
    assert len(rows) == 9 and all(set(x) == {"prompt", "predict", "label"} for x in rows)
    assert len({x["predict"] for x in rows}) > 3, "the fixture model must give varied answers"
    # LF's label: the answer as the template writes it, special tokens removed (ChatML: a newline follows)
    assert rows[0]["label"].startswith("Hello! I am {{name}}") and rows[0]["label"].endswith("\n")
    assert rows[0]["prompt"].startswith("<|im_start|>system\n") and rows[0]["prompt"].endswith("assistant\n")
    assert any("\u4e00" <= ch <= "\u9fff" for x in rows for ch in x["label"])  # Chinese rows are in
    per = [reference(x["predict"], x["label"]) for x in rows]
    results = json.loads((tmp_path / "b4" / "predict_results.json").read_text(encoding="utf-8"))
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert results[f"predict_{key}"] == float(np.mean([s[key] for s in per])), key
    assert results["predict_runtime"] > 0 and results["predict_samples_per_second"] > 0
    assert results["predict_steps_per_second"] > 0
    both = json.loads((tmp_path / "b4" / "all_results.json").read_text(encoding="utf-8"))
    assert both == results
    # batching changes nothing: one sample at a time (LF's per_device_eval_batch_size: 1) gives the same file
    _predict(sharp_qwen, tmp_path / "b1", "--per_device_eval_batch_size", "1")
    assert _rows(tmp_path / "b1") == rows


def test_bad_input_is_one_line(sharp_qwen: Path, tmp_path: Path) -> None:
    r = _exporter("predict", "--model_name_or_path", str(sharp_qwen), "--output_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "eval_dataset" in r.stderr and "Traceback" not in r.stderr
    r = _exporter("predict", "--model_name_or_path", str(sharp_qwen), "--eval_dataset", "identity", "--dataset_dir",
                  str(DATA), "--output_dir", str(tmp_path / "o"), "--predict_with_generate", "false")  # fmt: skip
    assert r.returncode == 2 and "predict_with_generate" in r.stderr
    r = _exporter("predict", "--model_name_or_path", str(sharp_qwen), "--eval_dataset", "identity", "--output_dir",
                  str(tmp_path / "o"), "--max_new_token", "4")  # fmt: skip
    assert r.returncode == 2 and "did you mean 'max_new_tokens'" in r.stderr
    r = _exporter("predict", "--model_name_or_path", str(sharp_qwen), "--eval_dataset", "nope", "--dataset_dir",
                  str(DATA), "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 2 and "nope" in r.stderr
    assert not (tmp_path / "o" / "generated_predictions.jsonl").exists()
    r = _exporter("predict", "--model_name_or_path", str(sharp_qwen), "--eval_dataset", "identity", "--dataset_dir",
                  str(DATA), "--output_dir", str(tmp_path / "o"), "--max_samples", "-1")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == ["error: max_samples must be a positive number of rows per dataset (or unset for "
                                     "all), got -1"]  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_output_dir_not_ours_is_refused_before_any_work(sharp_qwen: Path, tmp_path: Path) -> None:
    """output_dir must be absent, empty or an exporter output: a file, or a user's dir holding a file of predict's
    name, is one line before the model loads, and left as it was; an earlier predict's dir is reused."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    user = tmp_path / "user"
    user.mkdir()
    (user / "generated_predictions.jsonl").write_text("my notes\n")
    out = tmp_path / "again"

    def run(out: Path, n: int) -> subprocess.CompletedProcess:
        return _exporter("predict", "--model_name_or_path", str(sharp_qwen), "--eval_dataset", "identity",
                         "--dataset_dir", str(DATA), "--max_samples", str(n), "--max_new_tokens", "2", "--output_dir",
                         str(out))  # fmt: skip

    for bad, message in ((afile, "exists and is not a directory"), (user, "is not empty and not an exporter output")):
        r = run(bad, 1)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.splitlines()
        assert line.startswith(f"error: output_dir {bad} ") and message in line, line
        assert "predict_bleu-4" not in r.stdout  # nothing generated
    assert afile.read_text() == "mine" and (user / "generated_predictions.jsonl").read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "user"]  # no lock or temporary left
    for n in (1, 2):  # an earlier predict's dir is ours: the second run replaces its files
        r = run(out, n)
        assert r.returncode == 0, r.stderr
        assert len(_rows(out)) == n
    from exporter import manifest

    assert manifest.changed(out) is None


def test_lf_predict_yaml_runs_unchanged_with_adapter(tiny_model, tmp_path: Path) -> None:
    """LF's example YAML, base + LoRA adapter attached; the adapter changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = sharpen(tiny_model("llama3"), tmp_path / "base")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    model.save_pretrained(tmp_path / "lora")
    cfg = tmp_path / "llama3_lora_predict.yaml"
    cfg.write_text(LF_PREDICT_YAML.format(model=base, adapter=tmp_path / "lora", data=DATA, out=tmp_path / "pred"))
    r = _exporter("predict", str(cfg), "max_samples=2", "max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert "predict_bleu-4" in r.stdout
    rows = _rows(tmp_path / "pred")
    assert len(rows) == 4 and rows[0]["prompt"].startswith("<|begin_of_text|><|start_header_id|>")
    r = _exporter("predict", str(cfg), "max_samples=2", "max_new_tokens=8", "adapter_name_or_path=",
                  f"output_dir={tmp_path / 'base-pred'}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [x["predict"] for x in _rows(tmp_path / "base-pred")] != [x["predict"] for x in rows]


@pytest.mark.llama
def test_gguf_predictions_equal_hf(tiny_model, tmp_path: Path) -> None:
    require_llama_cpp()
    model = sharpen(tiny_model("llama3"), tmp_path / "m")
    subprocess.run([sys.executable, "-m", "exporter", "gguf", str(model), "--type", "f16", "--out",
                    str(tmp_path / "gguf")], check=True, capture_output=True)  # fmt: skip
    _predict(model, tmp_path / "hf")
    _predict(next((tmp_path / "gguf").glob("*-f16.gguf")), tmp_path / "f16")
    hf, f16 = _rows(tmp_path / "hf"), _rows(tmp_path / "f16")
    assert [x["label"] for x in f16] == [x["label"] for x in hf]
    assert [x["predict"] for x in f16] == [x["predict"] for x in hf]


def test_nan_logits_stop_with_the_row_named(tiny_model, tmp_path: Path) -> None:
    """A sample whose prompt makes the model's logits NaN: exit 2, one line naming its dataset row, no traceback, no
    predictions written (not a file of garbage answers)."""
    model = tmp_path / "nan"
    nan_token_model(tiny_model("llama3"), model)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": q, "output": "ok"} for q in (CLEAN[0], POISONED, CLEAN[1])]
    (data / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"rows": {"file_name": "rows.json"}}), encoding="utf-8")
    for batch in ("1", "3"):
        out = tmp_path / f"out{batch}"
        r = _exporter("predict", "--model_name_or_path", str(model), "--eval_dataset", "rows", "--dataset_dir",
                      str(data), "--max_new_tokens", "8", "--per_device_eval_batch_size", batch, "--output_dir",
                      str(out))  # fmt: skip
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.splitlines()
        assert re.fullmatch(r"error: .*/rows\.json row 2: the model's logits are not finite \(nan\) at answer "
                            r"token 1: its weights are broken; this answer stops here", line), line  # fmt: skip
        assert not (out / "generated_predictions.jsonl").exists()


# ---------------------------------------------------------------------------------------------- LLaMA-Factory itself


def _metrics_libs(tmp_path: Path) -> Path:
    """jieba, rouge-chinese, nltk (and what nltk imports) from this venv, for LF's venv that lacks its metrics extra."""
    libs = tmp_path / "metrics-libs"
    libs.mkdir()
    for mod in ("jieba", "rouge_chinese", "nltk", "regex", "click", "joblib", "six"):
        spec = importlib.util.find_spec(mod)
        assert spec is not None and spec.origin is not None
        path = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
        (libs / path.name).symlink_to(path)
        for dist in path.parent.glob(f"{mod}-*.dist-info"):
            (libs / dist.name).symlink_to(dist)
    return libs


def predict_both(tmp_path: Path, text: str) -> tuple[list[dict], list[dict], str]:
    """The predict YAML `text` (without output_dir) run by LF 0.9.5's own do_predict into tmp_path/lf and by
    exporter into tmp_path/ours: (LF's rows, ours, exporter's stderr); each must exit 0."""
    lf = lf_python()
    for who in ("lf", "ours"):
        (tmp_path / f"{who}.yaml").write_text(text + f"output_dir: {tmp_path / who}\n", encoding="utf-8")
    cmd = [lf, str(HERE / "lf_predict_reference.py"), str(tmp_path / "lf.yaml"), str(_metrics_libs(tmp_path))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _exporter("predict", str(tmp_path / "ours.yaml"))
    assert r.returncode == 0, r.stderr
    return _rows(tmp_path / "lf"), _rows(tmp_path / "ours"), r.stderr


def test_same_files_as_llamafactory(sharp_qwen: Path, tmp_path: Path) -> None:
    """LF 0.9.5's own do_predict on the same YAML: identical prompts, predictions, labels and BLEU/ROUGE."""
    text = (f"model_name_or_path: {sharp_qwen}\nstage: sft\ndo_predict: true\nfinetuning_type: lora\n"
            f"eval_dataset: identity,alpaca_zh_demo\ndataset_dir: {DATA}\ntemplate: qwen\ncutoff_len: 1024\n"
            "max_samples: 3\noverwrite_cache: true\nper_device_eval_batch_size: 1\npredict_with_generate: true\n"
            "do_sample: false\nmax_new_tokens: 12\nreport_to: none\n")  # fmt: skip
    theirs_rows, our_rows, _ = predict_both(tmp_path, text)
    assert our_rows == theirs_rows
    theirs = json.loads((tmp_path / "lf" / "predict_results.json").read_text(encoding="utf-8"))
    ours = json.loads((tmp_path / "ours" / "predict_results.json").read_text(encoding="utf-8"))
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert ours[key] == theirs[key], key
    assert set(ours) <= set(theirs)  # LF's names (LF adds predict_model_preparation_time)


def test_train_with_do_predict(tiny_model, tmp_path: Path) -> None:
    """`exporter train` with LF's do_predict: alone it only predicts (LF's do_train defaults to false); with
    do_train it trains, then predicts with the new adapter into the same output_dir."""
    model = tiny_model("llama3")
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(LF_PREDICT_YAML.format(model=model, adapter="null", data=DATA, out=tmp_path / "only"))
    r = _exporter("train", str(cfg), "max_samples=2", "max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    assert len(_rows(tmp_path / "only")) == 4 and not (tmp_path / "only" / "adapter_model.safetensors").exists()

    out = tmp_path / "both"
    r = _exporter("train", "--stage", "sft", "--do_train", "--do_predict", "--model_name_or_path", str(model),
                  "--dataset", "identity", "--eval_dataset", "identity", "--dataset_dir", str(DATA), "--template",
                  "llama3", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                  "--max_samples", "3", "--max_new_tokens", "4", "--predict_with_generate")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "adapter_model.safetensors").is_file() and len(_rows(out)) == 3
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    assert "train_loss" in results and "predict_bleu-4" in results
    from exporter import manifest

    assert manifest.changed(out) is None  # the training run's manifest still matches its dir
    # without do_predict, eval_dataset is what training evaluates on (LLaMA-Factory's), instead of a val_size split
    out = tmp_path / "evaluated"
    r = _exporter("train", "--model_name_or_path", str(model), "--dataset", "identity", "--eval_dataset",
                  "alpaca_en_demo", "--dataset_dir", str(DATA), "--template", "llama3", "--output_dir", str(out),
                  "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_samples", "3", "--eval_steps", "1",
                  "--per_device_eval_batch_size", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [row["current_steps"] for row in log if "eval_loss" in row] == [1, 2], log
    doc = json.loads((out / "exporter_manifest.json").read_text())
    assert "eval_dataset:alpaca_en_demo" in doc["inputs"]
    assert "eval_loss" in json.loads((out / "eval_results.json").read_text())
    r = _exporter("train", "--model_name_or_path", str(model), "--dataset", "identity", "--eval_dataset", "identity",
                  "--val_size", "0.1", "--dataset_dir", str(DATA), "--output_dir", str(tmp_path / "x"))  # fmt: skip
    assert r.returncode == 2 and "val_size and eval_dataset both name a validation set" in r.stderr
    assert not (tmp_path / "x").exists()
