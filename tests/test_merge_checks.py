"""merge's refusals come before any work and name what the user gave; `--force` replaces only a previous merge; and
`exporter export` without adapters re-saves a full model as LLaMA-Factory's export does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lf_python, random_lora
from safetensors import safe_open

from exporter import hf_dir
from exporter.errors import UserError
from exporter.merge import MergeOptions, merge


def _adapter(base: Path, out: Path) -> Path:
    """An adapter with the base's tokenizer beside it, as `exporter train` writes it."""
    random_lora(base, out, r=4, lora_alpha=8, target_modules=["q_proj"])
    hf_dir.copy_tokenizer(base, out)
    return out


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("qwen", "template 'qwen' needs tokens the vocabulary of {ad} lacks (<|im_end|>)"),  # LLaMA-Factory's name
        ("qwen-2.5", "template 'qwen-2.5' ends assistant turns with '<|im_end|>', but the tokenizer of {ad} has no"),
        ("nope", "unknown chat template 'nope'"),
    ],
)
def test_template_checked_before_any_work(tiny_model, tmp_path, capfd, template, message):
    """`--template` is checked against the tokenizer the output will carry (the adapter's) before the merge runs: the
    error names that dir, not a temporary one, and nothing else is printed or written."""
    ad = _adapter(tiny_model("llama3"), tmp_path / "ad")
    capfd.readouterr()
    with pytest.raises(UserError) as err:
        merge(MergeOptions(base=str(tiny_model("llama3")), adapters=[str(ad)], out=str(tmp_path / "m"),
                           template=template))  # fmt: skip
    assert message.format(ad=ad) in str(err.value) and ".tmp-" not in str(err.value), err.value
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_force_replaces_only_a_previous_merge(tiny_model, tmp_path):
    """--force replaces our own merge output, never a training run's dir or a gguf output (their manifests say so)."""
    base = tiny_model("qwen2")
    ad = random_lora(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    for stage in ("train", "gguf"):
        other = tmp_path / stage
        (other / "checkpoint-2").mkdir(parents=True)
        (other / "exporter_manifest.json").write_text(json.dumps({"stage": stage, "outputs": []}))
        with pytest.raises(UserError, match=rf"{other} is an exporter {stage} output .*only a previous merge output"):
            merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(other), force=True))
        assert (other / "checkpoint-2").is_dir()
    out = tmp_path / "m"
    merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(out)))
    (out / "marker").write_text("x")
    merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(out), force=True))
    assert not (out / "marker").exists() and (out / "config.json").is_file()


def _tensors(model_dir: Path) -> dict[str, tuple[torch.dtype, torch.Tensor]]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: (sf.get_tensor(k).dtype, sf.get_tensor(k)) for k in sf.keys()})
    return out


def test_export_without_adapter_resaves_like_llamafactory(tiny_model, tmp_path):
    """LF 0.9.5's `export_model` without adapter_name_or_path loads the model, casts it to infer_dtype and saves it
    with the template's tokenizer: ours (a streaming copy) has the same tensors bit for bit, the same config and
    generation_config (but transformers_version) and LF's chat template."""
    lf = lf_python()
    base = tiny_model("qwen2")
    keys = {"model_name_or_path": str(base), "template": "qwen", "export_size": 1, "infer_dtype": "float16"}
    ref = tmp_path / "lf"
    code = f"from llamafactory.train.tuner import export_model; export_model({keys | {'export_dir': str(ref)}!r})"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([lf, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = tmp_path / "export.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()) + f"export_dir: {tmp_path / 'ours'}\n")
    r = subprocess.run([sys.executable, "-m", "exporter", "export", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(ref)
    assert ours.keys() == theirs.keys()
    for k, (dtype, t) in ours.items():
        assert dtype == theirs[k][0] == torch.float16 and torch.equal(t, theirs[k][1]), k
    for name in ("config.json", "generation_config.json"):
        a, b = (json.loads((d / name).read_text()) for d in (tmp_path / "ours", ref))
        a.pop("transformers_version"), b.pop("transformers_version")
        assert a == b, name
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == (ref / "chat_template.jinja").read_text()
    manifest = json.loads((tmp_path / "ours" / "exporter_manifest.json").read_text())
    assert manifest["stage"] == "merge" and list(manifest["inputs"]) == ["base"]


def test_full_export_of_a_quantized_model_is_refused(tiny_model, tmp_path):
    """Without adapters the re-save copies weights as stored: a quantized model is refused in one line, not mangled."""
    import shutil

    q = shutil.copytree(tiny_model("qwen2"), tmp_path / "q")
    cfg = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UserError, match=rf"model {q} is a quantized model \(gptq\): exporter re-saves only"):
        merge(MergeOptions(base=str(q), adapters=[], out=str(tmp_path / "out")), need_adapter=False)
    with pytest.raises(UserError, match="give at least one --adapter"):
        merge(MergeOptions(base=str(q), adapters=[], out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [65504.0, 65519.0, 65520.0, 65536.0, float("inf"), float("nan")])
def test_fp16_overflow_is_caught_exactly_where_the_cast_overflows(value):
    """The merge refuses a tensor exactly when its float16 cast holds inf/nan (65520 and up round to inf)."""
    from exporter.merge import _finite

    cur = torch.tensor([1.0, -value, 2.0], dtype=torch.float32)
    out = cur.to(torch.float16)
    assert _finite(cur, out) is bool(torch.isfinite(out).all()), (value, out)
