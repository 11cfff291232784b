"""`export_legacy_format: true` (every LLaMA-Factory 0.9.5 merge_lora example spells the key out, as false): LF 0.9.5
passes `safe_serialization=not export_legacy_format` only on transformers 4; on transformers 5 (LF's reference venv,
and what exporter requires) it writes model.safetensors anyway. exporter writes the same safetensors and says so in
one note (it used to say nothing about the key). `exporter export` still refuses the key in `lf_args` (not this
module's file); see the pass report."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import lf_python
from safetensors import safe_open

from exporter import export
from exporter.lf_args import ExportConfig


def _tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.mark.slow
def test_legacy_format_writes_safetensors_as_llamafactory_with_a_note(tiny_model, tmp_path: Path, capsys) -> None:
    import torch

    lf = lf_python()
    base = tiny_model("qwen2")
    keys = {"model_name_or_path": str(base), "template": "qwen", "infer_dtype": "float16", "export_legacy_format": True}
    ref = tmp_path / "lf"
    code = f"from llamafactory.train.tuner import export_model; export_model({keys | {'export_dir': str(ref)}!r})"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([lf, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [p.name for p in ref.iterdir() if p.suffix in (".bin", ".pt", ".pth")]  # the reference: no pickle

    ours = tmp_path / "ours"
    export.export(ExportConfig(**keys, export_dir=str(ours)), set(keys))
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note: export_legacy_format")]
    assert notes == [
        "note: export_legacy_format: true: the export is safetensors, as LLaMA-Factory 0.9.5's on "
        "transformers 5 (it writes pickled .bin only on transformers 4); exporter never writes pickle"
    ]
    assert not [p.name for p in ours.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    a, b = _tensors(ours), _tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for given in ({"export_legacy_format"}, set()):  # false, or not given: no note
        export._notes(ExportConfig(model_name_or_path="m", export_dir=str(tmp_path / "o")), given)
    assert "export_legacy_format" not in capsys.readouterr().err
