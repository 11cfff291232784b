"""verify's `weights` row: a quantized GGUF's tensors, dequantized by gguf-py, against the f16 GGUF's. A q8_0 or
q4_k_m file with one tensor's block scales zeroed, or one tensor taken from another layer, passes perplexity, KL and
top-1 on the sharpened qwen2 fixture (measured: q4_k_m with blk.0.ffn_down zeroed ppl 0.20%, KL 2.4e-2; q8_0 with
blk.0.ffn_down from blk.1 ppl 0.04%, KL 1.5e-2: within the q4_k_m 5% / 0.6 and q8_0 0.5% / 0.03 limits), while its
weights are 100% or more away from what they should be. Good q8_0/q4_0 (our numpy quantizer), q4_k_m/q5_k_m/q6_k
(libllama's own llama_model_quantize) and llama.cpp's own converter's q8_0 pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import llama_src, require_llama_cpp
from export_edits import rewrite_gguf, sharpened_export

from exporter import verify as V

FAST = {"prompts": 1, "max_new_tokens": 4}  # the perplexity windows as a user gets them (--ctx 128, 8 windows)
TYPES = ["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """The sharpened qwen2 fixture (attention that depends on the weights, as a trained model's) in every TYPES."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("verify-more-weights")
    merged, _, res = sharpened_export(tiny_model("qwen2"), root, TYPES)
    return SimpleNamespace(merged=merged, files=res.files, root=root)


def _zero_scales(target: str, block_bytes: int):
    """Every block of tensor `target` with its leading f16 scale `d` zeroed (Q8_0: 34-byte blocks, Q4_K: 144)."""

    def edit(name: str, a: np.ndarray) -> np.ndarray:
        if name != target:
            return a
        a = a.copy()
        a.reshape(-1, block_bytes)[:, 0:2] = 0
        return a

    return edit


def _from_layer(path: Path, target: str, source: str):
    """Tensor `target` replaced by `source`'s bytes (same shape and type): quantized from the wrong weights."""
    import gguf

    other = next(np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors if t.name == source)
    return lambda name, a: other.copy() if name == target else a


def _row(ggufs: list[Path]):
    from exporter.verify.weights import check_weights

    (row,) = check_weights([V.read_gguf(g) for g in ggufs])
    return row


def test_good_quantizations_pass(export) -> None:
    """Every type the gguf stage writes is within its bound of the f16's; without an f16 the row is a skip."""
    f16 = export.files["f16"]
    for kind in TYPES[1:]:
        row = _row([f16, export.files[kind]])
        assert row.status == "pass", (kind, row.detail)
        assert row.metrics["worst_rel_error"] > 0  # a real comparison, not an empty one
    assert _row([export.files["q8_0"]]).status == "skip"


def test_llama_cpp_converters_q8_0_passes(export, tmp_path: Path) -> None:
    """The bounds are not our quantizer's: llama.cpp's own convert_hf_to_gguf.py --outtype q8_0 passes too."""
    out = tmp_path / "ref-q8_0.gguf"
    vendor = llama_src() / "vendor" / "llama.cpp"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"} | {"PYTHONPATH": str(vendor / "gguf-py")}
    run = [sys.executable, str(Path(__file__).parent / "_reference_convert.py"), str(vendor), "qwen2", "--"]
    r = subprocess.run([*run, str(export.merged), "--outtype", "q8_0", "--outfile", str(out)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    row = _row([export.files["f16"], out])
    assert row.status == "pass", row.detail


@pytest.mark.parametrize(
    ("kind", "damage"),
    [
        ("q8_0", "from:blk.0.ffn_down.weight:blk.1.ffn_down.weight"),
        ("q4_k_m", "zero:blk.0.ffn_down.weight"),
        ("q4_k_m", "zero:blk.0.attn_v.weight"),
        ("q4_k_m", "from:blk.0.attn_q.weight:blk.1.attn_q.weight"),
    ],
)
def test_a_damaged_quantization_passes_the_numbers_but_not_the_weights(export, kind: str, damage: str) -> None:
    """The damaged file passes the perplexity row (the old verify's only judge of a quant: a zeroed q8_0 tensor
    moves perplexity past its 0.5% and fails there already) and fails `weights`, naming the tensor; verify as a
    whole fails."""
    f16, good = export.files["f16"], export.files[kind]
    what, target, *source = damage.split(":")
    block = {"q8_0": 34, "q4_k_m": 144}[kind]
    edit = _zero_scales(target, block) if what == "zero" else _from_layer(good, target, source[0])
    bad = rewrite_gguf(good, export.root / f"bad-{kind}-{what}-{target}.gguf", tensor=edit)
    rep = V.verify(V.VerifyOptions(merged=export.merged, ggufs=[f16, bad], template="qwen-2.5", **FAST))
    numbers = {c.target: c for c in rep.checks if c.check == "perplexity"}
    assert numbers[bad.name].status == "pass", numbers[bad.name].detail  # what made the old verify pass it
    weights = [c for c in rep.checks if c.check == "weights"]
    assert [c.status for c in weights] == ["fail"] and not rep.passed, rep.passed
    row = _row([f16, bad])
    assert row.status == "fail" and f"{target} (" in row.detail and "not a quantization of" in row.detail, row.detail
