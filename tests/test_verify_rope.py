"""exporter verify against RoPE scaling or a sliding window dropped or wrong in a GGUF: they only change positions
past the few hundred tokens the perplexity and chat checks score, so such a file passed them while every long chat
diverged.

References: gguf-py's `GGUFReader` (where the tensor data starts, the tensor values), transformers'
`ROPE_INIT_FUNCTIONS` (Llama 3.1 and LongRoPE frequencies from the HF config), transformers vs llama-cpp-python
logits at positions 512-768 (what a wrong `rope_freqs` or window does), llama.cpp's converter (the YaRN keys it writes)
and its model loaders (the window and layer pattern llama.cpp assumes when a key is absent)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_llama_cpp
from export_edits import rewrite_gguf, sharpen_attention
from exporter.converters import gguf_read

from exporter import verify as V
from exporter.errors import UserError
from exporter.verify.metadata import check_metadata


def _drop_tensor(src: Path, dst: Path, name: str) -> Path:
    """Copy GGUF `src` to `dst` without tensor `name` (a converter that ignores the HF config's rope_type)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents(), endianess=r.endianess)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    kept = [t for t in r.tensors if t.name != name]
    for t in kept:
        data = np.array(t.data)
        w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in kept:
        w.write_tensor_data(np.array(t.data))
    w.close()
    return dst


def _export(merged: Path, template: str | None, out: Path) -> Path:
    from exporter import gguf, templates

    return gguf.export(merged, ["f16"], templates.resolve(merged, template), out).files["f16"]


def _far_logits(merged: Path, ids: list[int], *paths: Path) -> list[float]:
    """Max |llama.cpp - transformers| logit difference at positions 512.. of `ids`, for each GGUF."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        hf = model(torch.tensor([ids])).logits[0, 512:].numpy()
    out = []
    for path in paths:
        llm = Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False, n_threads=1)
        llm.eval(ids)
        out.append(float(np.abs(np.array(llm.scores[512 : len(ids)]) - hf).max()))
        llm.close()
    return out


def _metadata(merged: Path, *paths: Path) -> list:
    from exporter.hf_dir import load_tokenizer

    return check_metadata([V.read_gguf(p) for p in paths], merged, load_tokenizer(merged))


def test_data_offset_and_tensor_values_as_gguf_py_reads_them(tmp_path: Path) -> None:
    """A file with a 64-byte alignment and F32/F16 tensors: the data section starts where gguf-py's reader says,
    and every tensor reads back with gguf-py's values."""
    import gguf

    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.data_alignment = 64
    w.add_custom_alignment(64)
    w.add_string("general.name", "x" * 37)  # an odd header length, so the padding matters
    arrays = {"a.weight": np.arange(3, dtype=np.float32) / 7, "b.weight": np.linspace(-2, 2, 10, dtype=np.float16)}
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = gguf.GGUFReader(str(path))
    header = gguf_read.read(path, tensors=True)
    assert header.data_offset == ref.data_offset and header.data_offset % 64 == 0
    for t in ref.tensors:
        got = gguf_read.read_tensor(path, t.name)
        assert np.array_equal(got, np.asarray(t.data, dtype=np.float32).reshape(-1)), t.name
    assert gguf_read.read_tensor(path, "nope.weight") is None
    # a file cut inside the last tensor's data: one line naming the file and tensor, no short array, no traceback
    short = tmp_path / "short.gguf"
    last_t = max(ref.tensors, key=lambda t: t.data_offset)
    short.write_bytes(path.read_bytes()[: last_t.data_offset + last_t.n_bytes - 4])
    last = last_t.name
    with pytest.raises(UserError, match=rf"short\.gguf: tensor {last}'s data lies past the end of the file") as e:
        gguf_read.read_tensor(short, last)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def llama3(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """The llama3 fixture (rope_type llama3, factor 8) with position-dependent attention, and its f16 GGUF."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("rope-llama3")
    merged = root / "merged"
    shutil.copytree(tiny_model("llama3"), merged)
    sharpen_attention(merged)
    return merged, _export(merged, "llama-3.1", root / "gguf")


def test_llama3_rope_freqs_against_transformers(llama3, tmp_path: Path) -> None:
    """rope_freqs all 1.0 (what a converter ignoring rope_type llama3 writes) or missing: llama.cpp's logits leave
    transformers' past position 512 while the good file's stay with them; verify's metadata row fails both, naming
    the tensor, and passes the good file."""
    merged, good = llama3
    ones = rewrite_gguf(
        good, tmp_path / "ones.gguf", tensor=lambda n, a: np.ones_like(a) if n == "rope_freqs.weight" else a
    )
    dropped = _drop_tensor(good, tmp_path / "dropped.gguf", "rope_freqs.weight")
    ids = np.random.default_rng(0).integers(5, 250, size=768).tolist()
    near, wrong = _far_logits(merged, ids, good, ones)
    assert wrong > 4 * near, (near, wrong)  # the reference: the factors matter at long positions

    ok, bad, missing = _metadata(merged, good, ones, dropped)
    assert (
        bad.status == "fail"
        and "rope_freqs.weight[" in bad.detail
        and "transformers' llama3 RoPE gives 8" in bad.detail
    )
    assert missing.status == "fail" and "rope_freqs.weight is missing" in missing.detail, missing.detail
    assert ok.status == "pass" and "llama3 RoPE scaling" in ok.detail, ok.detail


@pytest.fixture(scope="module")
def phi3_longrope(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """The phi3 fixture made a 128k LongRoPE model (as Phi-3-mini-128k's config), and its f16 GGUF."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("rope-phi3")
    merged = root / "merged"
    shutil.copytree(tiny_model("phi3"), merged)
    cfg = json.loads((merged / "config.json").read_text())
    half = cfg["head_dim"] // 2
    cfg["max_position_embeddings"] = 131072
    cfg["sliding_window"] = 262144  # as Phi-3-mini-128k: past the context, so no window applies
    cfg["rope_parameters"] = {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
        "original_max_position_embeddings": 4096,
        "long_factor": [round(1.0 + 0.5 * i, 3) for i in range(half)],
        "short_factor": [round(1.0 + 0.01 * i, 3) for i in range(half)],
    }  # fmt: skip
    (merged / "config.json").write_text(json.dumps(cfg, indent=2))
    return merged, _export(merged, None, root / "gguf")


def test_phi3_longrope_factors_and_attention_factor(phi3_longrope, tmp_path: Path) -> None:
    """Long and short factors swapped, or the attention factor dropped: transformers' longrope gives other
    frequencies and scale; verify fails each by name and passes the converter's own file."""
    import gguf

    merged, good = phi3_longrope
    kv = gguf_read.read_kv(good)
    assert "phi3.rope.scaling.attn_factor" in kv
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(good)).tensors}
    long_, short = tensors["rope_factors_long.weight"], tensors["rope_factors_short.weight"]
    swapped = rewrite_gguf(
        good, tmp_path / "swapped.gguf",
        tensor=lambda n, a: {"rope_factors_long.weight": short, "rope_factors_short.weight": long_}.get(n, a),
    )  # fmt: skip
    no_attn = rewrite_gguf(good, tmp_path / "noattn.gguf", drop=("phi3.rope.scaling.attn_factor",))
    ok, bad, attn = _metadata(merged, good, swapped, no_attn)
    assert bad.status == "fail" and "rope_factors_long.weight[" in bad.detail and "rope_factors_short" in bad.detail
    assert attn.status == "fail" and "phi3.rope.scaling.attn_factor is not set" in attn.detail, attn.detail
    assert ok.status == "pass" and "longrope RoPE scaling" in ok.detail, ok.detail


def test_yarn_scaling_keys_against_the_hf_config(tiny_model, tmp_path: Path) -> None:
    """A qwen2 model with YaRN (as Qwen2.5's long-context recipe): the GGUF must carry llama.cpp's YaRN keys with
    the config's factor and original context; one without the type, or with another factor, fails."""
    require_llama_cpp()
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model("qwen2"), merged)
    cfg = json.loads((merged / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                              "original_max_position_embeddings": 8192}  # fmt: skip
    (merged / "config.json").write_text(json.dumps(cfg, indent=2))
    good = _export(merged, "qwen-2.5", tmp_path / "gguf")
    kv = gguf_read.read_kv(good)
    assert kv["qwen2.rope.scaling.type"] == "yarn" and kv["qwen2.rope.scaling.factor"] == 4.0
    untyped = rewrite_gguf(good, tmp_path / "untyped.gguf", drop=("qwen2.rope.scaling.type",))
    factor2 = rewrite_gguf(good, tmp_path / "factor2.gguf", kv={"qwen2.rope.scaling.factor": 2.0})
    ok, a, b = _metadata(merged, good, untyped, factor2)
    assert a.status == "fail" and "qwen2.rope.scaling.type is not set" in a.detail, a.detail
    assert b.status == "fail" and "qwen2.rope.scaling.factor is 2.0, the HF config gives 4.0" in b.detail, b.detail
    assert ok.status == "pass" and "yarn RoPE scaling" in ok.detail, ok.detail


def test_gemma3_sliding_window_and_layer_pattern(tiny_model, tmp_path: Path) -> None:
    """Gemma 3 (window 512, layers sliding/full): a GGUF window of 4096, or every layer marked sliding. llama.cpp
    leaves transformers past position 512 on the first (top-1 40 % when measured), and the second gives layer 1
    the local RoPE base; verify fails both, naming the key or the layers, and passes the converter's file."""
    require_llama_cpp()
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model("gemma3"), merged)
    sharpen_attention(merged)
    good = _export(merged, None, tmp_path / "gguf")
    kv = gguf_read.read_kv(good)
    assert kv["gemma3.attention.sliding_window"] == 512
    assert list(kv["gemma3.attention.sliding_window_pattern"]) == [True, False]
    wide = rewrite_gguf(good, tmp_path / "wide.gguf", kv={"gemma3.attention.sliding_window": 4096})
    all_swa = rewrite_gguf(good, tmp_path / "allswa.gguf", kv={"gemma3.attention.sliding_window_pattern": [True, True]})
    ids = np.random.default_rng(0).integers(5, 250, size=768).tolist()
    near, wrong = _far_logits(merged, ids, good, wide)
    assert wrong > 20 * near, (near, wrong)
    ok, a, b = _metadata(merged, good, wide, all_swa)
    assert (
        a.status == "fail"
        and "gemma3.attention.sliding_window is 4096, the HF config's sliding_window is 512" in a.detail
    )
    assert b.status == "fail" and "layers [1] differ" in b.detail, b.detail
    assert ok.status == "pass" and "sliding window 512" in ok.detail, ok.detail


def test_phi3_sliding_window_llama_cpp_ignores_is_a_warning(tiny_model, tmp_path: Path) -> None:
    """Phi-3 with a sliding window (Phi-3-mini-4k: 2047; 64 here): llama.cpp disables Phi SWA, so its logits leave
    transformers' past the window while they match before it. No key fixes that, so verify warns, naming the window;
    the same model without a window passes."""
    require_llama_cpp()
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model("phi3"), merged)
    sharpen_attention(merged)
    cfg = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**cfg, "sliding_window": 64}, indent=2))
    good = _export(merged, None, tmp_path / "gguf")
    ids = np.random.default_rng(0).integers(5, 250, size=640).tolist()
    (far,) = _far_logits(merged, ids, good)  # positions 512.., far past the window
    assert far > 0.1, far
    (row,) = _metadata(merged, good)
    assert row.status == "warn" and "without the HF config's sliding window of 64 tokens" in row.detail, row.detail
    (merged / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}, indent=2))
    (plain,) = _metadata(merged, good)
    assert plain.status == "pass", plain.detail
