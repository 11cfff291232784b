"""Cohere2 (Command R7B, Command A: `Cohere2ForCausalLM`, fine-tuned with LLaMA-Factory's `cohere` template) through
`exporter gguf`, which refused it, checked against independent references: llama.cpp's own convert_hf_to_gguf.py on
the same model (metadata, tensor names, shapes, types, f16 bytes), llama.cpp through llama-cpp-python (f32 logits ==
transformers with the sliding window and the global layers' NoPE in play, q8_0 and q4_k_m track them, tokenization ==
the HF tokenizer, end-of-turn ids are EOG) and the chain (LoRA training, merge, GGUF, verify). The fixture has
R7B's layout (three sliding-window layers with RoPE, then a global one without) and a window of 8 tokens, which the
probes outgrow.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import test_arch_added
from conftest import llama_src, require_go
from test_arch_added import _file, model_of, run_chain
from test_gguf import ALLOWED_KV, _fields, _hf_model, _llama, _probe_ids, _reference_f16, _show, assert_same_tensors

FAMILY = "cohere2"
converted = test_arch_added.converted  # the fixture: our f32/f16/q8_0 export of a family, once


def _logit_diff(model, gguf_file) -> float:
    """Largest |logit difference| between transformers and llama.cpp on the probes, relative to the logits' size."""
    import torch

    hf = _hf_model(model)
    llm = _llama(gguf_file, n_ctx=64, logits_all=True, n_threads=1)
    worst = 0.0
    for ids in _probe_ids(model):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        worst = max(worst, float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())))
    return worst


@pytest.mark.slow
def test_matches_llama_cpp_converter(converted, tmp_path):
    """Same tensors (names, shapes, types, f16 bytes) and metadata as llama.cpp's converter on the same model."""
    ours = _file(converted(FAMILY)[0], "f16")
    ref = _reference_f16(model_of(FAMILY), tmp_path, "command-r")
    a, b = _fields(ours), _fields(ref)
    diffs = {k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>")}
    unexplained = {k: (_show(ours, k), _show(ref, k)) for k in diffs - set(ALLOWED_KV)}
    assert not unexplained, f"metadata differs from llama.cpp: {unexplained}"
    for key, want in (("cohere2.attention.sliding_window", "8"), ("cohere2.logit_scale", "0.25")):
        assert _show(ours, key) == want, key
    assert_same_tensors(ours, ref, FAMILY)


def test_config_defaults_match_transformers(tmp_path, caplog):
    """What config.json leaves out is filled in as Cohere2Config fills it in (test_gguf's check)."""
    import test_gguf

    test_gguf.test_config_defaults_match_transformers(FAMILY, model_of, tmp_path, caplog)


def test_logits_match_transformers(converted):
    """f32 logits == transformers' (the suite's limit) past the sliding window; q8_0 tracks them."""
    import torch

    model = model_of(FAMILY)
    cfg = json.loads((model / "config.json").read_text())
    assert max(map(len, _probe_ids(model))) > cfg["sliding_window"], "the probes stay inside the window"
    out, _ = converted(FAMILY)
    assert _logit_diff(model, _file(out, "f32")) < 2e-3
    hf = _hf_model(model)
    q8 = _llama(_file(out, "q8_0"), n_ctx=64, logits_all=True, n_threads=1)
    for ids in _probe_ids(model):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        q8.reset()
        q8.eval(ids)
        q = np.array(q8.scores[: len(ids)], dtype=np.float32)
        assert float(np.corrcoef(q.ravel(), want.ravel())[0, 1]) > 0.99, "q8_0 logits drift"


def test_other_layer_types_are_written(tmp_path):
    """A config whose sliding layers are not llama.cpp's every-4th-global cycle (here every other layer global) gets
    its layer list in the file, and llama.cpp then computes transformers' logits."""
    from exporter import templates
    from exporter.gguf import export

    model = shutil.copytree(model_of(FAMILY), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    types = ["sliding_attention", "full_attention"] * (cfg["num_hidden_layers"] // 2)
    (model / "config.json").write_text(json.dumps({**cfg, "layer_types": types}))
    res = export(model, ["f32"], templates.resolve(model, None), tmp_path / "out")
    shown = _show(res.files["f32"], "cohere2.attention.sliding_window_pattern")
    assert shown == str([t == "sliding_attention" for t in types]), shown
    assert _logit_diff(model, res.files["f32"]) < 2e-3


def test_tokenization_and_end_of_turn(converted):
    """llama.cpp's ids == the HF tokenizer's on the mixed-language corpus; every end-of-turn token is EOG."""

    test_arch_added.test_tokenization_and_end_of_turn(FAMILY, converted)


def test_kquants(converted, tmp_path):
    """q4_k_m through libllama: it loads, its logits track the f32 file's, every tensor not at Q4_K is reported."""
    import test_gguf

    test_gguf.test_kquants_of_every_new_architecture(FAMILY, model_of, converted, tmp_path)


def test_gguf_lora_matches_peft_merge(converted, tmp_path):
    """Base f32 GGUF + our GGUF LoRA in llama.cpp == PEFT merge_and_unload in transformers (test_gguf's check)."""
    import test_gguf

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    test_gguf.test_gguf_lora_matches_peft_merge(FAMILY, targets, None, model_of, converted, tmp_path)


@pytest.mark.slow
def test_chain(tmp_path):
    """LoRA training, merge, GGUF and verify's checks (template, stops, tokenizer ids, perplexity, greedy answers
    HF == llama.cpp) through `exporter pipeline`."""
    run_chain(model_of(FAMILY), tmp_path)


def test_real_r7b_template_renders_like_jinja(tmp_path):
    """With Command R7B's published Jinja (llama.cpp's models/templates copy), the Modelfile TEMPLATE rendered by real
    Go equals the Jinja rendered by transformers, and the turn end stops generation."""
    from transformers import AutoTokenizer

    from exporter import templates
    from exporter.gguf import export
    from exporter.gotemplate import ollama_data, render_go_many
    from exporter.verify.artifacts import parse_modelfile

    require_go()
    jinja = llama_src() / "vendor" / "llama.cpp" / "models" / "templates"
    model = shutil.copytree(model_of(FAMILY), tmp_path / "m")
    shutil.copy(jinja / "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", model / "chat_template.jinja")
    tpl = templates.resolve(model, None)
    assert "<|END_OF_TURN_TOKEN|>" in tpl.eot_tokens
    mf = parse_modelfile(export(model, ["f16"], tpl, tmp_path / "out").modelfiles["f16"])
    tok = AutoTokenizer.from_pretrained(model)
    convs = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "谢谢 🦙"},
        ],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    want = []
    for conv in convs:
        ref = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        want.append(ref[len(tok.bos_token) :] if ref.startswith(tok.bos_token) else ref)
    got = render_go_many([(mf.template, ollama_data(conv, system=tpl.default_system)) for conv in convs])
    assert got == want
