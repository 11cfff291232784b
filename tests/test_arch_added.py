"""Gemma (1), Qwen2-MoE, ERNIE 4.5 and Cohere, architectures LLaMA-Factory fine-tunes (its `gemma`, `qwen`,
`ernie_nothink` and `cohere` model groups: Gemma-2B/7B, CodeGemma, Qwen2-57B-A14B (Qwen1.5-MoE's architecture too),
ERNIE-4.5-0.3B, Aya-23, Command-R) that `exporter gguf` refused, checked against independent references:
llama.cpp's own convert_hf_to_gguf.py on the same model (metadata, tensor names, shapes, types, f16 bytes), llama.cpp
through llama-cpp-python (tokenization == the HF tokenizer, f32 logits == transformers, q8_0 tracks f32, end-of-turn
tokens are EOG), real Go text/template (Modelfile TEMPLATE == transformers' Jinja render), and the whole chain (LoRA
training, merge, GGUF, verify) for each. Their fixtures are built here: conftest's family list is for the others.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import _locked, fixtures_root, llama_src, load_maker, pipeline_yaml, require_go, require_llama_cpp
from test_gguf import (
    ALLOWED_KV,
    _corpus,
    _fields,
    _hf_model,
    _llama,
    _probe_ids,
    _reference_f16,
    _show,
    assert_same_tensors,
)

from exporter.errors import UserError

ADDED = ("gemma", "qwen2_moe", "ernie4_5", "cohere")
REFERENCE_PRE = {
    "qwen2_moe": "qwen2",
    "cohere": "command-r",
}  # the fixture's vocabulary is trained here with Qwen2's pre-tokenizer
# llama.cpp's Gemma converter hard-codes CodeGemma's FIM ids (67..70) and eot 107 of the real 256k vocabulary, which
# name unrelated tokens in a fixture's vocabulary; llama.cpp finds FIM tokens by their text when it loads a file
GEMMA_FIXED_IDS = {f"tokenizer.ggml.{k}_token_id" for k in ("prefix", "suffix", "middle", "fsep")}
_OUT: dict[str, tuple[Path, object]] = {}


def model_of(family: str) -> Path:
    """The cached fixture of `family` (built once per fixture version, like conftest's `tiny_model`)."""
    if load_maker().SPECS[family].real_template:
        import os

        os.environ["EXPORTER_LLAMA_SRC"] = str(llama_src())
    out = fixtures_root() / family
    if not (out / "config.json").is_file():
        with _locked(fixtures_root() / f".{family}.lock"):
            if not (out / "config.json").is_file():
                load_maker().make(family, out, force=True)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Factory: our f32/f16/q8_0 export of a family (one pass) -> (out dir, ChatTemplate)."""
    from exporter import templates
    from exporter.gguf import export

    def get(family: str):
        if family not in _OUT:
            model = model_of(family)
            tpl = templates.resolve(model, None)
            out = tmp_path_factory.mktemp(f"gguf-{family}") / "out"
            export(model, ["f32", "f16", "q8_0"], tpl, out)
            _OUT[family] = (out, tpl)
        return _OUT[family]

    return get


def _file(out: Path, kind: str) -> Path:
    (path,) = out.glob(f"*-{kind}.gguf")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", ADDED)
def test_matches_llama_cpp_converter(family, converted, tmp_path):
    """Same tensors (names, shapes, types, f16 bytes) and metadata as llama.cpp's converter on the same model."""

    ours = _file(converted(family)[0], "f16")
    ref = _reference_f16(model_of(family), tmp_path, REFERENCE_PRE.get(family))
    a, b = _fields(ours), _fields(ref)
    diffs = {k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>")}
    allowed = set(ALLOWED_KV) | (GEMMA_FIXED_IDS if family == "gemma" else set())
    if family == "ernie4_5" and "tokenizer.ggml.add_space_prefix" in diffs:
        # llama.cpp's ERNIE converter writes tokenizer_config.json's add_prefix_space as it is, and null (as
        # transformers 5 saves a LlamaTokenizer) becomes false: that file tokenizes "Hello" without the "▁" the HF
        # tokenizer adds. We leave the key out (llama.cpp's default: add it); test_tokenization_... checks the ids
        cfg = json.loads((model_of(family) / "tokenizer_config.json").read_text())
        assert cfg.get("add_prefix_space", 0) is None, "the difference is for a null add_prefix_space only"
        assert (_show(ours, "tokenizer.ggml.add_space_prefix"), _show(ref, "tokenizer.ggml.add_space_prefix")) == (
            "<missing>",
            "False",
        )
        diffs.discard("tokenizer.ggml.add_space_prefix")
    unexplained = {k: (_show(ours, k), _show(ref, k)) for k in diffs - allowed}
    assert not unexplained, f"{family}: metadata differs from llama.cpp: {unexplained}"
    assert_same_tensors(ours, ref, family)


@pytest.mark.slow
def test_cohere_context_is_model_max_length(tmp_path):
    """Command-R's config.json says max_position_embeddings 8192 and model_max_length 131072 (what it was trained on):
    the context length is the latter, as llama.cpp's converter writes it."""
    from exporter import templates
    from exporter.gguf import export

    model = shutil.copytree(model_of("cohere"), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_max_length": 131072}))
    ours = export(model, ["f16"], templates.resolve(model, None), tmp_path / "out").files["f16"]
    ref = _reference_f16(model, tmp_path, REFERENCE_PRE["cohere"])
    key = "command-r.context_length"
    assert (_show(ours, key), _show(ref, key)) == ("131072", "131072")


@pytest.mark.parametrize("family", ADDED)
def test_config_defaults_match_transformers(family, tmp_path, caplog):
    """What config.json leaves out is filled in as transformers' config classes fill it in (test_gguf's check)."""
    import test_gguf

    test_gguf.test_config_defaults_match_transformers(family, model_of, tmp_path, caplog)


@pytest.mark.parametrize("family", ADDED)
def test_logits_match_transformers(family, converted):
    """f32 logits == transformers' on the same ids (the suite's limit); q8_0 loads and tracks them."""
    import torch

    model = model_of(family)
    out, _ = converted(family)
    hf = _hf_model(model)
    f32 = _llama(_file(out, "f32"), n_ctx=64, logits_all=True, n_threads=1)
    q8 = _llama(_file(out, "q8_0"), n_ctx=64, logits_all=True, n_threads=1)
    for ids in _probe_ids(model):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        for llm in (f32, q8):
            llm.reset()
            llm.eval(ids)
        got = np.array(f32.scores[: len(ids)], dtype=np.float32)
        diff = float(np.abs(got - want).max())
        assert diff < 2e-3 * max(1.0, float(np.abs(want).max())), f"{family}: max |logit diff| {diff}"
        q = np.array(q8.scores[: len(ids)], dtype=np.float32)
        assert float(np.corrcoef(q.ravel(), want.ravel())[0, 1]) > 0.99, f"{family}: q8_0 logits drift"


@pytest.mark.parametrize("family", ADDED)
def test_tokenization_and_end_of_turn(family, converted):
    """llama.cpp's ids == the HF tokenizer's on the mixed-language corpus; every end-of-turn token is EOG."""
    from exporter import spm

    llama_cpp = require_llama_cpp()
    out, tpl = converted(family)
    llm = _llama(_file(out, "f16"), vocab_only=True)
    hf = spm.load_tokenizer(model_of(family))
    for text in _corpus():
        want = hf.encode(text, add_special_tokens=True)
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == want, f"{family}: {text!r}"
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    gen = json.loads((model_of(family) / "generation_config.json").read_text())["eos_token_id"]
    ids = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in tpl.eot_tokens]
    assert all(len(i) == 1 for i in ids), ids
    for i in [i[0] for i in ids] + (gen if isinstance(gen, list) else [gen]):
        assert llama_cpp.llama_vocab_is_eog(vocab, i), f"{family}: id {i} is not end-of-generation"


def test_modelfile_template_renders_like_jinja(converted):
    """The GGUF carries the model's Jinja verbatim; the Modelfile TEMPLATE rendered by real Go equals it rendered by
    transformers."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from exporter.gotemplate import ollama_data, render_go_many
    from exporter.verify.artifacts import parse_modelfile

    require_go()
    convs = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Und 3+3? 谢谢 🦙"},
        ],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    jobs, want, where = [], [], []
    for family in ADDED:
        out, tpl = converted(family)
        jinja = (model_of(family) / "chat_template.jinja").read_text(encoding="utf-8")
        field = GGUFReader(_file(out, "f16")).fields["tokenizer.chat_template"]
        assert field.contents() == jinja, f"{family}: the GGUF's chat template is not the model's"
        tok = AutoTokenizer.from_pretrained(model_of(family))
        mf = parse_modelfile(out / "Modelfile.f16")
        for conv in convs:
            try:
                ref = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            except Exception:  # Gemma's template refuses a system turn
                continue
            if tok.bos_token and ref.startswith(tok.bos_token):
                ref = ref[len(tok.bos_token) :]  # llama.cpp adds BOS when tokenizing, Ollama templates leave it out
            jobs.append((mf.template, ollama_data(conv, system=tpl.default_system)))
            want.append(ref)
            where.append(family)
    assert set(where) == set(ADDED)
    for family, got, ref in zip(where, render_go_many(jobs), want, strict=True):
        assert got == ref, f"{family}: Go render differs\nGo:    {got!r}\nJinja: {ref!r}"


@pytest.mark.parametrize("family", ADDED)
def test_kquants(family, converted, tmp_path):
    """q4_k_m through libllama: it loads, its logits track the f32 file's, every tensor not at Q4_K is reported
    (test_gguf's check of the other new architectures)."""
    import test_gguf

    test_gguf.test_kquants_of_every_new_architecture(family, model_of, converted, tmp_path)


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("gemma", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
        ("qwen2_moe", ["q_proj", "v_proj", "gate_proj", "down_proj"]),  # the MLP names reach the shared expert
        ("ernie4_5", ["q_proj", "k_proj", "o_proj", "up_proj"]),
        ("cohere", ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
    ],
)
def test_gguf_lora_matches_peft_merge(family, targets, converted, tmp_path):
    """Base f32 GGUF + our GGUF LoRA in llama.cpp == PEFT merge_and_unload in transformers (test_gguf's check)."""
    import test_gguf

    test_gguf.test_gguf_lora_matches_peft_merge(family, targets, None, model_of, converted, tmp_path)


def test_fused_qwen2_moe_checkpoint_gives_the_same_file(converted, tmp_path, family="qwen2_moe"):
    """Qwen2-MoE (or another MoE `family`) saved as transformers 5 holds it (experts fused into gate_up / down)
    converts to the same tensors as the released per-expert layout (which the reference converter checks above)."""
    from gguf import GGUFReader
    from safetensors import safe_open
    from test_merge import fused_checkpoint

    from exporter.gguf import export

    out, tpl = converted(family)
    fused = fused_checkpoint(model_of(family), tmp_path / "fused")
    with safe_open(next(fused.glob("*.safetensors")), "pt") as st:
        assert any(k.endswith("experts.gate_up_proj") for k in st.keys()), "transformers saved per-expert tensors"
    res = export(fused, ["f16"], tpl, tmp_path / "out")
    got = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(res.files["f16"]).tensors}
    want = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(_file(out, "f16")).tensors}
    assert got.keys() == want.keys() and got == want


@pytest.mark.parametrize(
    ("family", "edit", "message"),
    [
        ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob is true"),
        ("qwen2_moe", {"mlp_only_layers": [1]}, "dense layers"),
        ("qwen2_moe", {"tie_word_embeddings": True}, "needs its own lm_head"),
        ("qwen2_moe", {"norm_topk_prob": "yes"}, "norm_topk_prob is 'yes'; expected true or false"),
        ("gemma", {"final_logit_softcapping": 30.0}, "soft-capping"),
        # an lm_head of its own (a LoRA or modules_to_save on lm_head unties it): llama.cpp's Gemma has no output tensor
        ("gemma", {"tie_word_embeddings": False}, "always uses the token embedding as the output projection"),
        ("gemma2", {"tie_word_embeddings": False}, "always uses the token embedding as the output projection"),
        # llama.cpp's Command-R has q/k norms exactly when it has 64+ layers (Command-R+); its output is the embedding
        ("cohere", {"use_qk_norm": True}, "use_qk_norm is true with 2 layers"),
        # transformers' use_bias gives the MLP biases too, which llama.cpp's ernie4_5 does not load (the file fails)
        ("ernie4_5", {"use_bias": True}, "use_bias is true"),
        ("cohere", {"tie_word_embeddings": False}, "no lm_head of its own"),
        # llama.cpp's ernie4_5_moe loader gives every layer from moe_layer_start_index on its experts
        ("ernie4_5_moe", {"moe_layer_interval": 2}, "moe_layer_interval 2 with 2 layers"),
        ("ernie4_5_moe", {"moe_layer_start_index": 0, "moe_layer_end_index": 0},
         "moe_layer_start_index 0, moe_layer_end_index 0"),
        ("ernie4_5_moe", {"use_bias": True}, "use_bias is true"),
        ("ernie4_5_moe", {"moe_k": "2"}, "moe_k is '2'; expected a positive integer"),
        ("cohere2", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}}, "RoPE scaling"),
        ("cohere2", {"tie_word_embeddings": False}, "no lm_head of its own"),
        ("cohere2", {"attention_bias": True}, "attention_bias is true"),
        ("cohere2", {"sliding_window": None}, "sliding_window is null"),
        ("cohere2", {"attention_bias": "no"}, "attention_bias is 'no'; expected true or false"),
    ],
)  # fmt: skip
def test_what_llama_cpp_cannot_run_is_refused(family, edit, message, tmp_path):
    """A config llama.cpp's graph would compute differently from transformers is one UserError, no file written."""
    import torch
    from safetensors.torch import load_file, save_file

    from exporter import templates
    from exporter.gguf import export

    model = shutil.copytree(model_of(family), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **edit}))
    if edit.get("tie_word_embeddings") is False:
        weights = load_file(model / "model.safetensors")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * torch.tensor(1.5, dtype=torch.bfloat16)
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=message):
        export(model, ["f16"], templates.resolve(model, None), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_chain(model: Path, tmp_path: Path) -> set[str]:
    """LoRA training (`lora_target: all`), merge, GGUF (f16, q8_0) and verify through `exporter pipeline` on `model`;
    every verify check passes (template, stops, tokenizer ids, perplexity, chat among them) and the attention LoRA
    reaches the merged weights. Returns the names of the merged tensors that changed."""
    import torch

    from exporter import pipeline

    require_llama_cpp()
    train = {"lora_target": "all", "lora_rank": 8, "max_steps": 2, "learning_rate": 5e-3, "logging_steps": 1,
             "max_samples": 8}  # fmt: skip
    verify = {"prompts": 2, "max_new_tokens": 8, "ctx": 64, "max_windows": 2, "ppl_threshold": {"adapter": 0.01}}
    gguf = {"types": ["f16", "q8_0"], "ollama_name": "t"}
    path = pipeline_yaml(tmp_path, model, tmp_path / "run", None, train=train, gguf=gguf, verify=verify)
    res = pipeline.run(pipeline.load_config(path, []))
    checks = json.loads(res.report.read_text())["checks"]
    assert res.passed, [c for c in checks if c["status"] != "pass"]
    assert {"template", "stops", "tokenizer", "perplexity", "chat"} <= {c["check"] for c in checks}
    merged, base = _tensors(tmp_path / "run" / "merged"), _tensors(model)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert any(".q_proj." in k for k in changed), "attention LoRA did not reach the merged weights"
    return changed


@pytest.mark.slow
@pytest.mark.parametrize("family", ADDED)
def test_chain(family, tmp_path):
    """LoRA training (Qwen2-MoE's experts too), merge, GGUF and verify's checks (template, stops, tokenizer ids,
    perplexity on the same ids, greedy answers HF == llama.cpp) through `exporter pipeline`."""
    changed = run_chain(model_of(family), tmp_path)
    if family == "qwen2_moe":  # `lora_target: all` trains the routed experts and the shared one, merge folds them in
        assert any(".experts.1." in k for k in changed) and any(".shared_expert." in k for k in changed), changed


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
