"""exporter export: LLaMA-Factory's merge/export YAML, unchanged, does what `exporter merge` / `quantize` do.

The YAMLs are LLaMA-Factory 0.9.5's examples (examples/merge_lora/llama3_lora_sft.yaml, llama3_gptq.yaml) with the
paths pointed at a tiny fixture. The reference for the merge is `exporter merge` itself (whose output is checked
against PEFT in test_merge.py): the same files, byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_lora, require_quant
from safetensors import safe_open

from exporter.merge import MergeOptions, merge

LF_MERGE = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: {base}
adapter_name_or_path: {adapter}
template: qwen
trust_remote_code: true

### export
export_dir: {out}
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""

LF_GPTQ = """\
### model
model_name_or_path: {model}
template: qwen
trust_remote_code: true

### export
export_dir: {out}
export_quantization_bit: 8
export_quantization_dataset: {dataset}
export_quantization_maxlen: 64
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True)


def _tensors(model_dir: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                out[k] = (str(t.dtype), t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return out


@pytest.fixture(scope="module")
def lf_merge(tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, adapter, the export dir written from LF's merge example YAML)."""
    root = tmp_path_factory.mktemp("export")
    base = tiny_model("qwen2")
    adapter = random_lora(base, root / "adapter", r=8, lora_alpha=16)
    cfg = root / "llama3_lora_sft.yaml"
    cfg.write_text(LF_MERGE.format(base=base, adapter=adapter, out=root / "merged"))
    r = _cli("export", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "export_device" not in r.stderr  # cpu is what it does: nothing to say
    return base, adapter, root / "merged"


def test_lf_merge_yaml_equals_exporter_merge(lf_merge, tmp_path: Path) -> None:
    base, adapter, out = lf_merge
    dtype = json.loads((base / "config.json").read_text()).get("dtype")
    ref = merge(MergeOptions(base=str(base), adapters=[str(adapter)], out=str(tmp_path / "ref"), template="qwen",
                             dtype="bf16" if dtype == "float32" else None, max_shard_size="5GB"))  # fmt: skip
    assert _tensors(out) == _tensors(ref.out)
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in ref.out.iterdir()}
    for name in names - {"exporter_manifest.json"}:
        assert (out / name).read_bytes() == (ref.out / name).read_bytes(), name
    manifest = json.loads((out / "exporter_manifest.json").read_text())
    assert manifest["stage"] == "merge" and manifest["settings"]["max_shard_size"] == "5GB"


def test_lf_export_overrides_and_bad_input(lf_merge, tmp_path: Path) -> None:
    base, adapter, _ = lf_merge
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LF_MERGE.format(base=base, adapter=adapter, out=tmp_path / "m"))
    r = _cli("export", str(cfg), "export_size=1", "export_device=auto", "infer_dtype=float32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: export_device=auto" in r.stderr
    assert json.loads((tmp_path / "m" / "exporter_manifest.json").read_text())["settings"]["dtype"] == "fp32"
    bad = {
        ("export_legacy_format=true",): "pickled .bin weights",
        ("export_dri=x",): "unknown key 'export_dri' (did you mean 'export_dir'?)",
        ("export_quantization_bit=4",): "export_quantization_bit needs export_quantization_dataset",
        ("export_hub_model_id=me/m",): "pushing the export to the Hugging Face hub is not supported",
        (): "already exists",  # export_dir m was written above: never written into
    }
    for extra, message in bad.items():
        r = _cli("export", str(cfg), *extra)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith("error: ") and message in last, (extra, r.stderr)
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "m"]


@pytest.mark.slow
def test_lf_gptq_yaml_quantizes_like_exporter_quantize(lf_merge, tmp_path: Path) -> None:
    """LF's GPTQ export example on the merged model: GPTQ 8-bit calibrated on a raw-text file (LF's c4_demo format)."""
    require_quant()
    _, _, merged = lf_merge
    texts = tmp_path / "c4_demo.jsonl"
    words = "the lighthouse keeper wrote in the log every night while the lamp turned over the dark water".split()
    rows = [{"text": " ".join(words[(i + k) % len(words)] for k in range(60))} for i in range(40)]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "llama3_gptq.yaml"
    cfg.write_text(LF_GPTQ.format(model=merged, out=tmp_path / "gptq", dataset=texts))
    r = _cli("export", str(cfg), "export_quantization_nsamples=8")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "gptq"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 8 and qcfg["quant_method"] == "gptq"
    settings = json.loads((out / "exporter_manifest.json").read_text())["settings"]
    assert settings["calibration"]["source"] == f"text file {texts}" and settings["max_length"] == 64
    assert settings["samples"] == 8 and settings["calibration"]["blocks"] == 8
