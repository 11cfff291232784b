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
from conftest import random_lora, require_go, require_quant
from safetensors import safe_open

from exporter import atomic, export, lf_args
from exporter.errors import UserError
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
    assert f"Ollama imports it with: ollama create merged -f {root / 'merged' / 'Modelfile'}" in r.stderr
    return base, adapter, root / "merged"


def test_lf_merge_yaml_equals_exporter_merge(lf_merge, tmp_path: Path) -> None:
    base, adapter, out = lf_merge
    dtype = json.loads((base / "config.json").read_text()).get("dtype")
    ref = merge(MergeOptions(base=str(base), adapters=[str(adapter)], out=str(tmp_path / "ref"), template="qwen",
                             dtype="bf16" if dtype == "float32" else None, max_shard_size="5GB"))  # fmt: skip
    assert _tensors(out) == _tensors(ref.out)
    names = {p.name for p in out.iterdir()} - {"Modelfile"}  # LF's export writes one too (below)
    assert names == {p.name for p in ref.out.iterdir()}
    for name in names - {"exporter_manifest.json"}:
        assert (out / name).read_bytes() == (ref.out / name).read_bytes(), name
    manifest = json.loads((out / "exporter_manifest.json").read_text())
    assert manifest["stage"] == "merge" and manifest["settings"]["max_shard_size"] == "5GB"


def test_lf_export_writes_an_ollama_modelfile_verify_checks(lf_merge) -> None:
    """As LLaMA-Factory's export, a `Modelfile` `FROM .` (Ollama imports the safetensors) in the export dir, listed in
    its manifest; its TEMPLATE rendered by real Go and its stops pass verify against the exported Jinja."""
    from exporter.converters.modelfile import parse

    from exporter import verify

    require_go()
    _, _, out = lf_merge
    entries = parse((out / "Modelfile").read_text(encoding="utf-8"))
    assert entries[0] == ("model", ".") and any(k == "template" for k, _ in entries)
    assert ("parameter stop", "<|im_end|>") in entries
    assert "Modelfile" in (out / "exporter_manifest.json").read_text()
    rep = verify.verify(verify.VerifyOptions(merged=out, modelfiles=[out / "Modelfile"], prompts=0, max_windows=1))
    checks = {(c.check, c.target): c.status for c in rep.checks}
    assert checks[("template", "Modelfile")] == "pass" and checks[("stops", "Modelfile")] == "pass", checks


def test_lf_export_overrides_and_bad_input(lf_merge, tmp_path: Path) -> None:
    base, adapter, _ = lf_merge
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LF_MERGE.format(base=base, adapter=adapter, out=tmp_path / "m"))
    r = _cli("export", str(cfg), "export_size=1", "export_device=auto", "infer_dtype=float32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: export_device=auto" in r.stderr
    assert json.loads((tmp_path / "m" / "exporter_manifest.json").read_text())["settings"]["dtype"] == "fp32"
    bad = {
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
    assert settings["max_shard_size"] == "5GB"  # export_size, as LF's save_pretrained(max_shard_size=f"{size}GB")
    assert f"calibration: raw text rows of {texts}, tokenized as plain text" in r.stderr.replace("\n", "")
    assert "rendering through template" not in r.stderr


def _export_cfg(tmp_path: Path, base: Path, adapter: Path | None, *overrides: str):
    yaml = f"model_name_or_path: {base}\n" + (f"adapter_name_or_path: {adapter}\n" if adapter else "")
    (tmp_path / "e.yaml").write_text(yaml + f"export_dir: {tmp_path / 'out'}\nexport_size: 1\n")
    return lf_args.export_config_from_args([str(tmp_path / "e.yaml"), *overrides])


def test_override_errors_name_the_overrides(tmp_path: Path) -> None:
    """A bad key=value is not blamed on the YAML file alone (as `pipeline` says it)."""
    cfg = tmp_path / "e.yaml"
    cfg.write_text("model_name_or_path: m\nexport_dir: o\n")
    with pytest.raises(UserError, match=rf"^{cfg} with export_size=2 infer_dtype=float64: infer_dtype must be one of"):
        lf_args.export_config_from_args([str(cfg), "export_size=2", "infer_dtype=float64"])
    cfg.write_text("model_name_or_path: m\nexport_dir: o\ninfer_dtype: float64\n")
    with pytest.raises(UserError, match=rf"^{cfg}: infer_dtype must be one of"):  # no overrides: the file's
        lf_args.export_config_from_args([str(cfg)])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("export_quantization_bit=5",), "export_quantization_bit 5 is not supported by GPTQ (supported: (4, 8))"),
        (("export_quantization_nsamples=0",), "export_quantization_nsamples must be at least 1, got 0"),
        (("export_quantization_maxlen=8",), "export_quantization_maxlen must be at least 16 tokens, got 8"),
        (
            ("export_quantization_dataset=nosuch.jsonl",),
            "export_quantization_dataset nosuch.jsonl: no such file, and no data/dataset_info.json to look it up in",
        ),
        (("export_quantization_dataset={tmp}",), "export_quantization_dataset {tmp}: a directory; give a file"),
        (
            ("model_name_or_path={phi3}", "adapter_name_or_path=null"),
            "GPTQ cannot quantize model_type 'phi3': gptqmodel 7.6.0 writes a corrupt g_idx",
        ),
    ],
)
def test_quantization_keys_checked_before_the_merge(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], message: str
) -> None:
    """Every quantize check runs before the merge starts, its message naming the export_quantization_* key (not
    `exporter quantize`'s flags); nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c4.jsonl").write_text(json.dumps({"text": "some text " * 50}) + "\n")
    monkeypatch.setattr(export, "merge", lambda *a, **k: pytest.fail("merged before the quantize checks"))
    base = tiny_model("llama3")
    extra = [o.format(tmp=tmp_path, phi3=tiny_model("phi3")) for o in overrides]
    cfg, given = _export_cfg(tmp_path, base, base, "export_quantization_bit=4", "export_quantization_dataset=c4.jsonl",
                             *extra)  # fmt: skip
    with pytest.raises(UserError) as e:
        export.export(cfg, given)
    flags = ("--bits", "--samples", "--max-length", "--dataset", "--method gptq")  # `exporter quantize`'s, not typed
    assert message.format(tmp=tmp_path) in str(e.value) and not any(f in str(e.value) for f in flags), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c4.jsonl", "e.yaml"]


def test_quantized_export_checks_the_base_loads_before_the_merge(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """A base whose tokenizer cannot load is one line before the merge (quantize found it after merging)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c4.jsonl").write_text(json.dumps({"text": "some text " * 50}) + "\n")
    monkeypatch.setattr(export, "merge", lambda *a, **k: pytest.fail("merged before the base was checked"))
    base = tmp_path / "notok"
    shutil.copytree(tiny_model("llama3"), base)
    (base / "tokenizer.json").unlink()
    cfg, given = _export_cfg(tmp_path, base, base, "export_quantization_bit=4", "export_quantization_dataset=c4.jsonl")
    with pytest.raises(UserError, match=r"model .*notok: cannot load its tokenizer"):
        export.export(cfg, given)


def test_quantized_export_merges_under_the_out_temp_name_and_records_the_real_inputs(
    lf_merge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The temporary merge lives in a `<export_dir>.tmp-<pid>-*` dir (a killed run's is removed by the next one, as
    every temporary), export_size reaches quantize as its shard size, and the manifest's inputs are the base and the
    adapter, not the removed merge. Quantize itself is a stand-in here (test_lf_gptq_* runs the real one)."""
    import os

    base, adapter, _ = lf_merge
    (tmp_path / "c4.jsonl").write_text("")
    seen = {}

    def fake_quantize(q, names=None, inputs=None):
        seen.update(q=q, names=names, inputs=inputs, model_files=sorted(p.name for p in Path(q.model).iterdir()))
        Path(q.out).mkdir()

    monkeypatch.setattr(export, "check_model", lambda *a, **k: {})
    monkeypatch.setattr(export, "quantize", fake_quantize)
    cfg, given = _export_cfg(tmp_path, base, adapter, "export_quantization_bit=4",
                             f"export_quantization_dataset={tmp_path / 'c4.jsonl'}", "export_size=3")  # fmt: skip
    export.export(cfg, given)
    work = Path(seen["q"].model).parent
    assert atomic.leftover(work.name) == ("out", os.getpid()) and work.parent == tmp_path
    assert "model.safetensors" in seen["model_files"] and not work.exists()
    assert seen["q"].max_shard_size == "3GB" and seen["names"].samples == "export_quantization_nsamples"
    assert seen["inputs"] == {"base": base, "adapter": adapter}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c4.jsonl", "e.yaml", "out"]
    assert "no Ollama Modelfile with export_quantization_bit" in capsys.readouterr().err  # GPTQ: Ollama cannot import
    assert "Modelfile" not in seen["model_files"]  # the temporary merge wrote none either


def test_lf_vocabulary_keys_are_checked_against_the_tokenizer_exported(lf_merge, tmp_path: Path) -> None:
    """LF's export YAML repeats training's `add_special_tokens` / `add_tokens` / `resize_vocab`: accepted when the
    tokenizer the export carries holds each token (the export is the same as without them), one line naming a
    missing token before anything is written (before: "unknown key 'add_special_tokens'", exit 2)."""
    base, adapter, out = lf_merge
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LF_MERGE.format(base=base, adapter=adapter, out=tmp_path / "m"))
    r = _cli("export", str(cfg), "add_special_tokens=<|im_end|>, <|im_start|>", "resize_vocab=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _tensors(tmp_path / "m") == _tensors(out)
    r = _cli("export", str(cfg), "export_dir=" + str(tmp_path / "n"), "add_tokens=<|im_end|>,<think_new>")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: '<think_new>' (add_tokens / add_special_tokens) is not in the tokenizer of {base}: the export "
        "carries the tokenizer training saved; point adapter_name_or_path at the training output that added it"
    ], r.stderr
    assert not (tmp_path / "n").exists()
