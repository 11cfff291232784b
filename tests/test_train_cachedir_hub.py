"""LLaMA-Factory's `cache_dir` key (ModelArguments: a hub cache of its own) in a training YAML: the hub ids of
model_name_or_path and adapter_name_or_path are resolved in that cache (`models--owner--name/snapshots/<commit>`;
offline, a snapshot already there), where `exporter train` refused the key ("cache_dir: … is not supported yet",
exit 2) although `llamafactory-cli train` takes it. The cache is built here, no download."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_lora, trainer_log
from safetensors.torch import load_file
from test_hub_cache_dir import _cache
from test_train_dtype_lf import fp32_copy

YAML = """model_name_or_path: {base}
adapter_name_or_path: {adapter}
output_dir: {out}
dataset: d
dataset_dir: {data}
template: qwen
cutoff_len: 64
per_device_train_batch_size: 2
learning_rate: 1.0e-3
max_steps: 1
logging_steps: 1
disable_gradient_checkpointing: true
{extra}"""


def _train(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # never the network: the snapshot
    return subprocess.run([sys.executable, "-m", "exporter", "train", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_train_resolves_hub_ids_in_cache_dir(tiny: Path, tmp_path: Path) -> None:
    adapter = random_lora(tiny, tmp_path / "adapter", r=4, lora_alpha=8)
    cache = tmp_path / "hf"
    _cache(cache, "acme/tiny", tiny)
    _cache(cache, "acme/tiny-lora", adapter)
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.json").write_text(json.dumps([{"instruction": "Who are you?", "input": "", "output": "I am Exa."},
                                             {"instruction": "2+2?", "input": "", "output": "4."}]))  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    ref = tmp_path / "ref.yaml"
    ref.write_text(YAML.format(base=tiny, adapter=adapter, out=tmp_path / "ref", data=data, extra=""))
    assert (r := _train(ref)).returncode == 0, r.stderr[-2000:]
    cfg = tmp_path / "t.yaml"
    extra = f"cache_dir: {cache}\n"
    cfg.write_text(YAML.format(base="acme/tiny", adapter="acme/tiny-lora", out=tmp_path / "m", data=data, extra=extra))
    assert (r := _train(cfg)).returncode == 0, r.stderr[-2000:]
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("m", "ref"))
    assert ours.keys() == theirs.keys() and ours and all(ours[k].equal(theirs[k]) for k in ours)
    assert [x["loss"] for x in trainer_log(tmp_path / "m")] == [x["loss"] for x in trainer_log(tmp_path / "ref")]
    for base, adapter, what in (("acme/other", "acme/tiny-lora", "model 'acme/other'"),
                                ("acme/tiny", "acme/no-lora", "adapter 'acme/no-lora'")):  # fmt: skip
        out = tmp_path / "n"
        cfg.write_text(YAML.format(base=base, adapter=adapter, out=out, data=data, extra=extra))
        r = _train(cfg)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith(f"error: {what}: not a local directory, and fetching it from the Hugging Face "
                                   f"hub into cache_dir {cache} failed"), lines  # fmt: skip
        assert not out.exists()


_LF_TRAIN = """
import os, sys, yaml
os.environ["DISABLE_VERSION_CHECK"] = "1"
from llamafactory.train.tuner import run_exp
run_exp(yaml.safe_load(open(sys.argv[1])))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cache_dir", "HF_HUB_CACHE"])
def test_train_from_cache_dir_as_llamafactory(tiny: Path, tmp_path: Path, how: str) -> None:
    """LLaMA-Factory 0.9.5 itself (its venv, offline) on the same YAML, a hub id in cache_dir (or in the HF cache
    HF_HUB_CACHE names): the same first loss, and the adapter names its base by the hub id (exporter wrote the
    snapshot's path there, a path of this machine's cache, and in the adapter's README). The fp32 copy of the fixture:
    on a CPU that emulates bf16 exporter upcasts a bf16 frozen base, which LLaMA-Factory keeps (test_train_dtype_lf)."""
    from conftest import lf_python

    cache = tmp_path / "hf"
    _cache(cache, "acme/tiny", fp32_copy(tiny, tmp_path / "tiny32"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.json").write_text(json.dumps([{"instruction": "Who are you?", "input": "", "output": "I am Exa."}]))
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    text = YAML.replace("adapter_name_or_path: {adapter}\n", "").replace("disable_gradient_checkpointing: true\n", "")
    where = f"cache_dir: {cache}\n" if how == "cache_dir" else ""
    (tmp_path / "lf.yaml").write_text(text.format(base="acme/tiny", out=tmp_path / "lf", data=data, extra=(
        f"{where}stage: sft\ndo_train: true\nreport_to: none\nseed: 42\n")))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hfd")}
    if how == "HF_HUB_CACHE":
        env["HF_HUB_CACHE"] = str(cache)
    proc = subprocess.run([lf_python(), "-c", _LF_TRAIN, str(tmp_path / "lf.yaml")], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "t.yaml").write_text(text.format(base="acme/tiny", out=tmp_path / "m", data=data, extra=(
        f"{where}seed: 42\n")))  # fmt: skip
    assert (r := _train(tmp_path / "t.yaml", env)).returncode == 0, r.stderr[-2000:]
    for out in (tmp_path / "m", tmp_path / "lf"):
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny", out
    assert "snapshots" not in (tmp_path / "m" / "README.md").read_text()
    ours, theirs = trainer_log(tmp_path / "m")[0]["loss"], trainer_log(tmp_path / "lf")[0]["loss"]
    assert ours == pytest.approx(theirs, rel=1e-6)
