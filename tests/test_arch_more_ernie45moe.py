"""ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B / 300B-A47B, LLaMA-Factory's `ernie_nothink` group) through `exporter gguf`, which
refused it, checked against independent references: llama.cpp's own convert_hf_to_gguf.py on the same model
(metadata, tensor names, shapes, types, f16 bytes), llama.cpp through llama-cpp-python (f32 logits == transformers,
q8_0 and q4_k_m track them, tokenization == the HF tokenizer, end-of-turn ids are EOG), PEFT (GGUF LoRA == merge) and
the chain (LoRA training, merge, GGUF, verify). The fixture follows the 21B model's layout: a dense first layer, then
routed experts picked by softmax + a correction bias, two shared experts beside them.
"""

from __future__ import annotations

import pytest
import test_arch_added
from test_arch_added import _file, model_of, run_chain
from test_gguf import ALLOWED_KV, _fields, _hf_model, _reference_f16, _show, assert_same_tensors

FAMILY = "ernie4_5_moe"
converted = test_arch_added.converted  # the fixture: our f32/f16/q8_0 export of a family, once


@pytest.mark.slow
def test_matches_llama_cpp_converter(converted, tmp_path):
    """Same tensors (names, shapes, types, f16 bytes: the 3-D experts, the f32 router and its correction bias, the
    shared experts, the dense first layer) and metadata as llama.cpp's converter on the same model."""
    ours = _file(converted(FAMILY)[0], "f16")
    ref = _reference_f16(model_of(FAMILY), tmp_path)
    a, b = _fields(ours), _fields(ref)
    diffs = {k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>")}
    # llama.cpp's ERNIE converters copy a null add_prefix_space as false (test_arch_added explains and checks it)
    assert (_show(ours, "tokenizer.ggml.add_space_prefix"), _show(ref, "tokenizer.ggml.add_space_prefix")) == (
        "<missing>",
        "False",
    )
    unexplained = {
        k: (_show(ours, k), _show(ref, k)) for k in diffs - set(ALLOWED_KV) - {"tokenizer.ggml.add_space_prefix"}
    }
    assert not unexplained, f"metadata differs from llama.cpp: {unexplained}"
    for key, want in (
        ("ernie4_5-moe.leading_dense_block_count", "1"),
        ("ernie4_5-moe.expert_shared_feed_forward_length", "512"),
        ("ernie4_5-moe.expert_count", "4"),
    ):
        assert _show(ours, key) == want, key
    assert_same_tensors(ours, ref, FAMILY)


def test_config_defaults_match_transformers(tmp_path, caplog):
    """What config.json leaves out is filled in as Ernie4_5_MoeConfig fills it in (test_gguf's check)."""
    import test_gguf

    test_gguf.test_config_defaults_match_transformers(FAMILY, model_of, tmp_path, caplog)


def test_logits_match_transformers(converted):
    """f32 logits == transformers' (the suite's limit) with the router's correction bias in play; q8_0 tracks them."""
    hf = _hf_model(model_of(FAMILY))
    bias = hf.model.layers[1].mlp.gate.moe_statics.e_score_correction_bias
    assert float(bias.abs().max()) > 0, "the fixture's correction bias did not load: the check would not see it"
    test_arch_added.test_logits_match_transformers(FAMILY, converted)


def test_tokenization_and_end_of_turn(converted):
    """llama.cpp's ids == the HF tokenizer's on the mixed-language corpus; every end-of-turn token is EOG."""

    test_arch_added.test_tokenization_and_end_of_turn(FAMILY, converted)


def test_kquants(converted, tmp_path):
    """q4_k_m through libllama: it loads, its logits track the f32 file's, every tensor not at Q4_K is reported."""
    import test_gguf

    test_gguf.test_kquants_of_every_new_architecture(FAMILY, model_of, converted, tmp_path)


def test_gguf_lora_matches_peft_merge(converted, tmp_path):
    """Base f32 GGUF + our GGUF LoRA in llama.cpp == PEFT merge_and_unload in transformers (the MLP names reach the
    dense layer and the shared experts)."""
    import test_gguf

    # the dense layer's and the shared experts' down_proj (PEFT refuses gate_proj or up_proj alone: the routed experts
    # hold them fused)
    targets = r".*\.(q_proj|v_proj|o_proj|layers\.0\.mlp\.down_proj|shared_experts\.down_proj)"
    test_gguf.test_gguf_lora_matches_peft_merge(FAMILY, targets, None, model_of, converted, tmp_path)


def test_fused_checkpoint_gives_the_same_file(converted, tmp_path):
    """The model saved as transformers 5 holds it (experts fused, the correction bias under the router) converts to
    the same tensors as the released layout (which the reference converter checks above)."""
    test_arch_added.test_fused_qwen2_moe_checkpoint_gives_the_same_file(converted, tmp_path, FAMILY)


@pytest.mark.slow
def test_chain(tmp_path):
    """LoRA training (`lora_target: all` reaches the routed experts), merge, GGUF and verify's checks
    (template, stops, tokenizer ids, perplexity, greedy answers HF == llama.cpp) through `exporter pipeline`."""
    changed = run_chain(model_of(FAMILY), tmp_path)
    # the routed experts (PEFT parameter LoRA on the fused experts) and the router; PEFT 0.21's weight conversion turns
    # the gate/up/down_proj targets into the fused experts' names, so the dense layer's MLP and the shared experts
    # keep their weights (reported; not the converter's concern)
    assert any(".experts.1." in k for k in changed), " ".join(sorted(changed))
