"""`exporter gguf` checked against independent references.

- llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist) on the same model: tensor names, shapes,
  types and f16 bytes identical, metadata equal except the allow-listed keys below (each with its reason).
- llama.cpp itself (llama-cpp-python): every file loads, tokenization equals the HF tokenizer on a mixed-language
  corpus, f32 logits equal transformers' logits, f16 greedy tokens equal HF greedy tokens, K-quants give sane logits,
  every end-of-turn token of the template is end-of-generation.
- Ollama's Modelfile rules: the file parses back to what we meant; the TEMPLATE rendered by real Go equals the Jinja
  chat template rendered by transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILIES, MORE, ROOT, TEMPLATE_OF, detected_template, llama_src, require_go, require_llama_cpp

from exporter.errors import UserError

# byte-level BPE with a real vocabulary in the sdist: llama.cpp's converter names pre-tokenizers of real vocabularies
BPE_FAMILIES = ("llama3", "qwen2", "qwen3")
# the newer ones carry vocabularies trained here with the family's pre-tokenizer; the reference converter is told the
# name its table gives the real model's vocabulary (tests/_reference_convert.py; tokenization tests check the ids).
# Qwen3-MoE and SmolLM3 reuse Qwen2's and Llama 3's vocabularies, already checked real above (a 150k-token real
# vocabulary costs the reference converter two minutes per family here)
REFERENCE_PRE = {
    "qwen3_moe": "qwen2",
    "smollm3": "smaug-bpe",  # what the reference says for SmolLM3 on Llama 3's real vocabulary rebuilt without merges
    "mistral_nemo": "tekken",
    "glm4": "glm4",
    "granite": "starcoder",
    "olmo2": "dbrx",
}
EXTRA_TEXT = [
    "Привет, как дела? Ça va très bien, merci !",
    "مرحبا بالعالم — ‏שלום עולם",
    "Tabs\tand  double  spaces,\n\nnewlines\r\n and trailing   ",
    "3.14159 1,000,000 0x1F 2024-06-01T12:00:00Z",
    "emoji 🦙🚀👩‍💻 and CJK 東京 서울 ภาษาไทย",
    "  leading spaces and 'quotes' \"double\" `code` <tag> {json: [1, 2]}",
]


def _corpus() -> list[str]:
    lines = []
    for path in sorted((ROOT / "data" / "corpus").glob("*.txt")):
        lines += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()][:8]
    return lines + EXTRA_TEXT


_CACHE: dict[tuple[str, bool], tuple[Path, object]] = {}


@pytest.fixture(scope="session")
def converted(tiny_model, tmp_path_factory):
    """Factory: our export of a fixture family (f32, f16, q8_0 in one pass) -> (out dir, ChatTemplate)."""
    from exporter import templates
    from exporter.gguf import export

    def get(family: str, real_vocab: bool = False):
        key = (family, real_vocab)
        kinds = ("f16",) if real_vocab else ("f32", "f16", "q8_0")
        if key not in _CACHE:
            model = tiny_model(family, real_vocab=real_vocab)
            tpl = templates.resolve(model, None)  # the model's own template, written verbatim
            assert tpl.name == detected_template(family)
            out = tmp_path_factory.mktemp(f"gguf-{family}") / "out"
            export(model, list(kinds), tpl, out)
            _CACHE[key] = (out, tpl)
        return _CACHE[key]

    return get


def _gguf(out: Path, kind: str) -> Path:
    (path,) = out.glob(f"*-{kind}.gguf")
    return path


def _reference_f16(model: Path, dest: Path, pre: str | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (lazy mode, --outtype f16) with its own gguf-py, as a subprocess."""
    vendor = llama_src() / "vendor" / "llama.cpp"
    out = dest / "ref-f16.gguf"
    # the converter imports its `conversion/` package from its own dir, so the script dir must stay on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"} | {"PYTHONPATH": str(vendor / "gguf-py")}
    run = [sys.executable, str(ROOT / "tests" / "_reference_convert.py"), str(vendor), pre or "-", "--"]
    cmd = [*run, str(model), "--outtype", "f16", "--outfile", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"llama.cpp converter failed on {model}:\n{r.stderr[-3000:]}"
    return out


def _fields(path: Path) -> dict[str, object]:
    """Metadata as raw bytes per key (value type included): exact and fast even for 150k-token arrays."""
    from gguf import GGUFReader

    return {
        key: b"".join(p.tobytes() for p in field.parts)
        for key, field in GGUFReader(path).fields.items()
        if not key.startswith("GGUF.")
    }


def _show(path: Path, key: str) -> str:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return "<missing>" if field is None else repr(field.contents())[:100]


def assert_same_tensors(ours: Path, ref: Path, family: str) -> None:
    """The two GGUFs hold the same tensors: names, shapes, types and bytes."""
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(ours).tensors}
    tb = {t.name: t for t in GGUFReader(ref).tensors}
    assert sorted(ta) == sorted(tb), f"{family}: tensor names differ: {sorted(set(ta) ^ set(tb))}"
    for name, t in ta.items():
        r = tb[name]
        assert list(t.shape) == list(r.shape), f"{family}/{name}: shape {t.shape} vs {r.shape}"
        assert t.tensor_type == r.tensor_type, f"{family}/{name}: type {t.tensor_type.name} vs {r.tensor_type.name}"
        assert np.asarray(t.data).tobytes() == np.asarray(r.data).tobytes(), f"{family}/{name}: bytes differ"


# Keys where we differ from llama.cpp's converter on purpose.
ALLOWED_KV = {
    # llama.cpp's converter only writes add_bos/add_eos when tokenizer files mention them; we always write what the
    # HF tokenizer does on encode (checked in test_tokenization_matches_hf), which may disagree with a stale flag
    "tokenizer.ggml.add_bos_token": "HF encode behaviour",
    "tokenizer.ggml.add_eos_token": "HF encode behaviour",
    # the template's end-of-turn token becomes eot so llama.cpp stops on it even when its text is not one llama.cpp
    # recognises by name (checked in test_end_of_turn_tokens_are_eog)
    "tokenizer.ggml.eot_token_id": "end-of-turn token of the template",
    "tokenizer.ggml.eom_token_id": "second end-of-turn token of the template",
    # every end-of-generation id (generation_config's eos ids too), as Ollama's converter writes it: Ollama's Go engine
    # stops on eos + this list (llama.cpp's converter does not write it)
    "tokenizer.ggml.eos_token_ids": "Ollama's stop ids",
    # Gemma3: per-layer sliding/global flags from config.json layer_types; llama.cpp's converter leaves them out and
    # llama.cpp then assumes a 5-local-1-global cycle (wrong for the 2-layer fixture: test_f32_logits_match_...)
    "gemma3.attention.sliding_window_pattern": "layer_types written so llama.cpp slides the right layers",
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_llama_cpp_converter(family, tiny_model, converted, tmp_path):
    """Same tensors (names, shapes, types, f16 bytes) and metadata as llama.cpp's converter on the same model."""

    real = family in BPE_FAMILIES
    model = tiny_model(family, real_vocab=real)
    ours = _gguf(converted(family, real_vocab=real)[0], "f16")
    ref = _reference_f16(model, tmp_path, REFERENCE_PRE.get(family))

    a, b = _fields(ours), _fields(ref)
    diffs = {k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>")}
    if "tokenizer.ggml.pre" in diffs:
        # llama.cpp names the pre-tokenizer by hashing a tokenization, so a Llama 3 vocabulary is "llama-bpe" (regex +
        # ignore_merges) even when its tokenizer.json does not ignore merges; we name what the file does: the same
        # regex without ignore_merges is llama.cpp's "smaug-bpe" (test_tokenization_matches_hf checks the ids)
        tj = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
        assert (_show(ours, "tokenizer.ggml.pre"), _show(ref, "tokenizer.ggml.pre")) == ("'smaug-bpe'", "'llama-bpe'")
        assert not tj["model"].get("ignore_merges"), f"{family}: tokenizer.json ignores merges but we said smaug-bpe"
        diffs.discard("tokenizer.ggml.pre")
    unexplained = {k: (_show(ours, k), _show(ref, k)) for k in diffs - set(ALLOWED_KV)}
    assert not unexplained, f"{family}: metadata differs from llama.cpp: {unexplained}"
    for key in diffs & {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}:
        assert key in a, f"{family}: we must always write {key}"

    assert_same_tensors(ours, ref, family)


@pytest.mark.slow
@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.25,
            "extrapolation_factor": 0.5,
        },  # fmt: skip
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512},
    ],
    ids=["linear", "yarn", "yarn-defaults"],
)
def test_rope_scaling_matches_llama_cpp_converter(rope, tiny_model, tmp_path):
    """Linear and YaRN RoPE scaling (no fixture has them): the same rope metadata as llama.cpp's converter."""
    import shutil

    from exporter import templates
    from exporter.gguf import export

    model = shutil.copytree(tiny_model("llama2"), tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    cfg["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    export(model, ["f16"], templates.resolve(model, None), tmp_path / "out")
    a, b = _fields(_gguf(tmp_path / "out", "f16")), _fields(_reference_f16(model, tmp_path))
    rope_keys = {k for k in set(a) | set(b) if ".rope." in k}
    assert {k for k in rope_keys if "scaling" in k} and all(a.get(k) == b.get(k) for k in rope_keys), {
        k: (_show(_gguf(tmp_path / "out", "f16"), k), _show(tmp_path / "ref-f16.gguf", k))
        for k in rope_keys
        if a.get(k) != b.get(k)
    }


def _v4_style(cfg: dict) -> dict:
    """A config as transformers 4 wrote it: rope_theta (and rope_scaling) at top level, no rope_parameters."""
    cfg = dict(cfg)
    rp = cfg.pop("rope_parameters", None) or {}
    if "full_attention" in rp:
        cfg["rope_theta"] = rp["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    elif rp:
        cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_config_defaults_match_transformers(family, tiny_model, tmp_path, caplog):
    """Metadata from config.json read without transformers equals metadata from AutoConfig: on the fixture's config
    without the keys equal to their defaults, the same with transformers-4-style rope keys, and on a bare config
    with only the model's shape (every other key left to the defaults). Each key is written once."""
    import gguf
    from exporter.converters import gguf_arch
    from transformers import AutoConfig

    model = tiny_model(family)
    minimal = AutoConfig.from_pretrained(model).to_diff_dict()
    shape = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    bare = {k: minimal[k] for k in (*shape, "num_attention_heads") if k in minimal}  # every default left to fill
    for name, cfg in (("minimal", minimal), ("v4-style", _v4_style(minimal)), ("bare", bare)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        want = AutoConfig.from_pretrained(d).to_dict()
        if "text_config" in want:
            want = {**want, **want["text_config"]}
        kv = []
        for hp in (gguf_arch.load_hparams(d), want):
            w = gguf.GGUFWriter(path=None, arch="x")
            arch = gguf_arch.arch_for(hp, d)
            arch.params(hp, w)
            extra = {n: t.tobytes() for n, t in arch.extra(hp, w)}
            kv.append(({k: v.value for k, v in w.kv_data[0].items()}, extra))
        (ours, ours_t), (ref, ref_t) = kv
        diff = {
            k: (ours.get(k, "<missing>"), ref.get(k, "<missing>"))
            for k in set(ours) | set(ref)
            if ours.get(k) != ref.get(k)
        }
        assert not diff and ours_t == ref_t, f"{family} ({name} config.json): (ours, AutoConfig) {diff}"
    assert "Duplicated key" not in caplog.text  # gguf-py warns when a key is written twice


def _llama(path: Path, **kw):
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenization_matches_hf(family, tiny_model, converted):
    """llama.cpp tokenizes a mixed-language corpus into exactly the HF tokenizer's ids (specials as HF adds them);
    SentencePiece families through `exporter.spm` (the tokenizer training uses and every exported dir carries)."""
    from exporter import spm

    require_llama_cpp()
    # real vocabularies too: BPE families with llama.cpp's pre-tokenizer regexes, and llama2 rebuilt without a
    # tokenizer.model (SentencePiece-style tokenizer.json only, the layout transformers 5 saves)
    real = family in (*BPE_FAMILIES, "llama2")
    for use_real in (False, True) if real else (False,):
        model = tiny_model(family, real_vocab=use_real)
        out, _ = converted(family, real_vocab=use_real)
        llm = _llama(_gguf(out, "f16"), vocab_only=True)
        hf = spm.load_tokenizer(model)
        for text in _corpus():
            want = hf.encode(text, add_special_tokens=True)
            got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            assert got == want, f"{family}{' (real vocab)' if use_real else ''}: {text!r}\nHF {want}\nGGUF {got}"


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_tokens_are_eog(family, converted):
    """Every token the template ends a turn with, and every eos id of generation_config.json (what HF's generate stops
    on, e.g. GLM-4's <|observation|>, which its published Jinja does not end a turn with), stops llama.cpp's
    generation (Ollama stops on EOG too)."""
    llama_cpp = require_llama_cpp()
    out, tpl = converted(family)
    llm = _llama(_gguf(out, "f16"), vocab_only=True)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    for text in tpl.eot_tokens:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert len(ids) == 1, f"{family}: {text!r} is not one token: {ids}"
        assert llama_cpp.llama_vocab_is_eog(vocab, ids[0]), f"{family}: {text!r} ({ids[0]}) is not end-of-generation"
    gen = json.loads((_src_of(out) / "generation_config.json").read_text())["eos_token_id"]
    for i in gen if isinstance(gen, list) else [gen]:
        assert llama_cpp.llama_vocab_is_eog(vocab, i), f"{family}: generation_config eos id {i} is not EOG"


def _hf_model(model: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def _probe_ids(model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [tok.encode(t, add_special_tokens=True)[:24] for t in ("The quick brown fox", "你好，世界。", "def f(x):")]


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match_transformers(family, tiny_model, converted):
    """The f32 GGUF computes the same logits as transformers on the same token ids."""
    import torch

    model = tiny_model(family)
    out, _ = converted(family)
    llm = _llama(_gguf(out, "f32"), n_ctx=64, logits_all=True, n_threads=2)
    hf = _hf_model(model)
    for ids in _probe_ids(model):
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        diff = float(np.abs(got - want).max())
        assert diff < 2e-3 * max(1.0, float(np.abs(want).max())), f"{family}: max |logit diff| {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_greedy_matches_hf(family, tiny_model, converted):
    """Greedy continuation of the f16 GGUF equals transformers' greedy continuation (where HF's choice is clear)."""
    import torch

    model = tiny_model(family)
    out, _ = converted(family)
    llm = _llama(_gguf(out, "f16"), n_ctx=64, logits_all=True, n_threads=2)
    hf = _hf_model(model)
    for ids in _probe_ids(model):
        seq = list(ids)
        for _ in range(4):
            with torch.no_grad():
                logits = hf(torch.tensor([seq])).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            llm.reset()
            llm.eval(seq)
            got = int(np.argmax(llm.scores[len(seq) - 1]))
            want = int(torch.argmax(logits))
            if float(top2[0] - top2[1]) < 1e-2:  # a near tie: f16 rounding may pick either; continue with HF's
                seq.append(want)
                continue
            assert got == want, f"{family}: greedy step after {seq}: GGUF {got} vs HF {want}"
            seq.append(want)


@pytest.mark.slow
def test_kquants_load_and_give_sane_logits(tiny_model, tmp_path):
    """q4_k_m / q5_k_m / q6_k written through libllama load and track the f32 logits; q4_0 and q8_0 too."""
    from exporter import templates
    from exporter.gguf import export

    require_llama_cpp()
    model = tiny_model("llama3")
    tpl = templates.resolve(model, TEMPLATE_OF["llama3"])
    kinds = ["f32", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
    res = export(model, kinds, tpl, tmp_path / "out")
    assert not list((tmp_path / "out").glob(".*for-kquant*")), "temporary f16 left behind"
    ids = _probe_ids(model)[0]
    logits = {}
    for kind in kinds:
        llm = _llama(res.files[kind], n_ctx=64, logits_all=True, n_threads=2)
        llm.eval(ids)
        logits[kind] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    ref = logits["f32"]
    for kind in kinds[1:]:
        corr = float(np.corrcoef(ref.ravel(), logits[kind].ravel())[0, 1])
        assert corr > (0.99 if kind in ("bf16", "q8_0", "q6_k") else 0.9), f"{kind}: logits correlation {corr}"
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(res.files["q4_k_m"]).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert any(n.startswith(f"{t}: ") for t in types for n in res.fallbacks["q4_k_m"])  # llama.cpp's mix is reported


@pytest.mark.parametrize("family", ["llama2", "qwen2"])  # untied head; tied (token_embd is the output projection)
def test_q4_0_keeps_the_output_projection_at_8_bits(family, tiny_model, tmp_path):
    """A q4_0 file: every matrix q4_0 except the output projection (output.weight, or token_embd when the head is
    tied), which stays q8_0 as llama.cpp keeps it at 6+ bits, and the file's report says so."""
    from gguf import GGUFReader

    from exporter import templates
    from exporter.gguf import export

    model = tiny_model(family)
    res = export(model, ["q4_0"], templates.resolve(model, None), tmp_path / "out")
    types = {t.name: t.tensor_type.name for t in GGUFReader(res.files["q4_0"]).tensors}
    head = "output.weight" if "output.weight" in types else "token_embd.weight"
    assert (family == "qwen2") is (head == "token_embd.weight"), sorted(types)
    assert types[head] == "Q8_0" and types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_0"
    assert any(n.startswith(f"{head}: ") and "q8_0" in n for n in res.fallbacks["q4_0"]), res.fallbacks


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_header_reader_matches_gguf_py(family, converted, tmp_path):
    """Our fast header reader gives gguf-py's GGUFReader values: every key (scalars, strings, arrays) and tensor."""
    from exporter.converters import gguf_read
    from gguf import GGUFReader

    path = _gguf(converted(family)[0], "q8_0")
    ref = GGUFReader(path)
    ours = gguf_read.read(path, tensors=True)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    got = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ours.kv.items()}
    assert got == want
    assert [(t.name, t.shape, t.type, t.offset + ref.data_offset) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type, t.data_offset) for t in ref.tensors
    ]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(UserError, match="truncated GGUF header"):
        gguf_read.read(cut)
    cut.write_bytes(b"GGML" + path.read_bytes()[4:100])
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf_read.read(cut)


@pytest.mark.parametrize("family", MORE)
def test_kquants_of_every_new_architecture(family, tiny_model, converted, tmp_path):
    """q4_k_m through libllama for each new architecture (3-D expert tensors, head_dim != hidden/heads, fused
    gate_up, ...): it loads, its logits track the f32 file's, and every tensor not at Q4_K is reported."""
    from gguf import GGUFReader

    from exporter.gguf import export

    model = tiny_model(family)
    out, tpl = converted(family)
    res = export(model, ["q4_k_m"], tpl, tmp_path / "out")
    ids = _probe_ids(model)[0]
    ref = _llama(_gguf(out, "f32"), n_ctx=64, logits_all=True, n_threads=2)
    ref.eval(ids)
    q = _llama(res.files["q4_k_m"], n_ctx=64, logits_all=True, n_threads=2)
    q.eval(ids)
    a, b = (np.array(m.scores[: len(ids)], dtype=np.float32).ravel() for m in (ref, q))
    assert float(np.corrcoef(a, b)[0, 1]) > 0.9, f"{family}: q4_k_m logits drift from f32"
    types = {t.name: t.tensor_type.name for t in GGUFReader(res.files["q4_k_m"]).tensors if len(t.shape) >= 2}
    k_types = {n for n, t in types.items() if t in ("Q4_K", "Q5_K", "Q6_K")}
    assert any("attn_q.weight" in n for n in k_types), f"{family}: attention not K-quantized: {types}"
    if family in ("qwen3_moe", "mixtral"):
        assert all(types[n] in ("Q4_K", "Q5_K", "Q6_K") for n in types if "_exps." in n), types
    reported = {n.split(":")[0] for n in res.fallbacks["q4_k_m"]}
    assert reported == {n for n, t in types.items() if t != "Q4_K"}, f"{family}: fallback report incomplete"


def test_modelfile_parses_and_template_renders_like_jinja(converted):
    """Each Modelfile reads back (Ollama's rules) to our FROM/TEMPLATE/stops/SYSTEM; Go render == Jinja render."""
    from exporter.converters.modelfile import parse
    from transformers import AutoTokenizer

    from exporter.gotemplate import ollama_data, render_go_many
    from exporter.verify import template as verify_template
    from exporter.verify.artifacts import parse_modelfile

    require_go()
    convs = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Und 3+3? 谢谢 🦙"},
        ],
    ]
    jobs, expected, where, stated = [], [], [], {}
    for family in FAMILIES:
        out, tpl = converted(family)
        tok = AutoTokenizer.from_pretrained(_src_of(out))
        for kind in ("f32", "f16", "q8_0"):
            cmds = parse((out / f"Modelfile.{kind}").read_text(encoding="utf-8"))
            d = dict((c, v) for c, v in cmds if not c.startswith("parameter"))
            stops = [v for c, v in cmds if c == "parameter stop"]
            assert (out / d["model"]).is_file(), f"{family}/{kind}: FROM {d['model']} missing"
            assert d["template"] == tpl.ollama and stops == list(tpl.stop)
            assert set(tpl.eot_tokens) <= set(stops) | {tok.eos_token}, f"{family}: an end-of-turn token is no stop"
            assert d.get("system") == tpl.default_system
            assert not any(c.startswith("parameter") and c != "parameter stop" for c, _ in cmds)  # no num_ctx etc.
        # a TEMPLATE derived from a published Jinja may differ where its header says so (Granite's date format)
        stated[family] = verify_template._stated(parse_modelfile(out / "Modelfile.f16"))[1:]
        for conv in convs:
            try:
                ref = tok.apply_chat_template(conv, chat_template=tpl.jinja, tokenize=False, add_generation_prompt=True)
            except Exception:  # the family's own template rejects this conversation (e.g. no system role)
                continue
            if tok.bos_token and ref.startswith(tok.bos_token):
                ref = ref[len(tok.bos_token) :]  # llama.cpp adds BOS when tokenizing, Ollama templates leave it out
            jobs.append((d["template"], ollama_data(conv, system=tpl.default_system)))
            expected.append(ref)
            where.append(family)
    for family, got, want in zip(where, render_go_many(jobs), expected, strict=True):
        ok = got == want or verify_template._explained(got, want, *stated[family])
        assert ok, f"{family}: Go render differs\nGo:    {got!r}\nJinja: {want!r}"


def _src_of(out: Path) -> Path:
    manifest = json.loads((out / "exporter_manifest.json").read_text())
    return Path(manifest["inputs"]["model"]["source"])


@pytest.mark.parametrize(
    "value",
    ["plain", 'has "quotes"', "multi\nline", 'ends with quote"', " padded ", 'tri """ ple', "tab\tinside"],
)
def test_modelfile_quote_round_trips(value):
    from exporter.converters.modelfile import parse, quote

    assert parse(f"FROM x\nSYSTEM {quote(value, 'v')}\n") == [("model", "x"), ("system", value)]


def test_modelfile_refuses_values_ollama_cannot_read():
    from exporter.converters.modelfile import quote

    with pytest.raises(UserError, match="closing quote"):
        quote('a"""\nb"', "TEMPLATE")


def test_unsupported_architecture_lists_supported(tiny_model, tmp_path):
    import shutil

    from exporter.gguf import export

    model = Path(shutil.copytree(tiny_model("qwen2"), tmp_path / "m"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not supported.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        export(model, ["f16"], None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_type_and_existing_output_are_user_errors(tmp_path):
    from exporter.gguf import parse_types

    with pytest.raises(UserError, match="did you mean 'q8_0'"):
        parse_types("f16,q8")
    assert parse_types("F16, q8_0,f16") == ["f16", "q8_0"]


MOE_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # PEFT's parameter LoRA on fused experts


@pytest.mark.parametrize(
    ("family", "targets", "params"),
    [
        ("llama3", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], None),
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj"], None),
        ("qwen3_moe", ["q_proj", "k_proj", "o_proj"], MOE_PARAMS),
        ("mixtral", ["q_proj", "v_proj"], [*MOE_PARAMS, "mlp.gate.weight"]),  # and the router (block_sparse_moe.gate)
    ],
)
def test_gguf_lora_matches_peft_merge(family, targets, params, tiny_model, converted, tmp_path):
    """Base f32 GGUF + our GGUF LoRA in llama.cpp == PEFT merge_and_unload in transformers (rsLoRA included).
    MoE experts become 3-D LoRA pairs llama.cpp applies per routed expert (Mixtral's router LoRA goes to its checkpoint
    name), the same from a per-expert or a fused-expert base; there the reference is PEFT's merge run by llama.cpp
    (its f32 GGUF): on these random tiny models a near-tie in routing can pick another expert in transformers than
    in llama.cpp for the merged model itself (Mixtral, 'The quick brown fox': 0.96, with or without the LoRA file)."""
    import shutil

    import torch
    from gguf import GGUFReader
    from peft import LoraConfig, get_peft_model

    from exporter.gguf import export, export_adapter

    model = tiny_model(family)
    out, tpl = converted(family)
    hf = _hf_model(model)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, target_parameters=params, init_lora_weights=False,
                     use_rslora=True)  # fmt: skip
    peft_model = get_peft_model(hf, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)  # a visible but moderate change of the logits
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()

    res = export_adapter(adapter, model, ["f32"], tpl, tmp_path / "lora-gguf")
    mf = (tmp_path / "lora-gguf" / "Modelfile").read_text(encoding="utf-8")
    assert f"ADAPTER ./{res.files['f32'].name}" in mf and f"FROM {model.resolve()}" in mf
    if params:
        lora = {t.name: t for t in GGUFReader(res.files["f32"]).tensors}
        n_expert = json.loads((model / "config.json").read_text())["num_local_experts"]
        for kind in ("gate", "up", "down"):  # ggml's ne: A {in, r, experts}, B {r, out, experts}
            a, b = lora[f"blk.1.ffn_{kind}_exps.weight.lora_a"], lora[f"blk.1.ffn_{kind}_exps.weight.lora_b"]
            assert a.shape[1:].tolist() == [8, n_expert] and b.shape[0] == 8 and b.shape[2] == n_expert
        assert ("blk.0.ffn_gate_inp.weight.lora_a" in lora) == ("mlp.gate.weight" in params)
        from test_merge import fused_checkpoint

        fused = fused_checkpoint(model, tmp_path / "fused")  # transformers 5's layout: gate_up split by rows here
        again = export_adapter(adapter, fused, ["f32"], tpl, tmp_path / "lora-gguf-fused")
        got = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(again.files["f32"]).tensors}
        assert got == {n: np.asarray(t.data).tobytes() for n, t in lora.items()}

        merged.save_pretrained(tmp_path / "merged")  # one tensor per expert again, as the base is
        for f in model.iterdir():
            if not (tmp_path / "merged" / f.name).exists():
                shutil.copy(f, tmp_path / "merged" / f.name)
        ref = _llama(export(tmp_path / "merged", ["f32"], tpl, tmp_path / "mg").files["f32"], n_ctx=64, logits_all=True,
                     n_threads=2)  # fmt: skip

    base = _llama(_gguf(out, "f32"), n_ctx=64, logits_all=True, n_threads=2)
    llm = _llama(_gguf(out, "f32"), n_ctx=64, logits_all=True, n_threads=2, lora_path=str(res.files["f32"]))
    for ids in _probe_ids(model):
        if params:
            ref.reset()
            ref.eval(ids)
            want = np.array(ref.scores[: len(ids)], dtype=np.float32)
        else:
            with torch.no_grad():
                want = merged(torch.tensor([ids])).logits[0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        base.reset()
        base.eval(ids)
        base_logits = np.array(base.scores[: len(ids)], dtype=np.float32)
        change = float(np.abs(want - base_logits).max())
        diff = float(np.abs(got - want).max())
        assert change > 0.1, f"{family}: the adapter barely changes the logits ({change}); test would prove nothing"
        assert diff < 2e-3 * max(1.0, float(np.abs(want).max())), f"{family}: LoRA logits differ by {diff}"


def test_cli_writes_files_and_prints_ollama_commands(tiny_model, tmp_path):
    """`exporter gguf` end to end: files, Modelfiles, manifest, printed `ollama create` lines; bad input exits 2."""
    import shutil

    env = dict(os.environ)  # the installed package (conftest sets PYTHONSAFEPATH, so not the source tree)
    model = tiny_model("qwen3")
    out = tmp_path / "g"
    cmd = [sys.executable, "-m", "exporter", "gguf", str(model), "--type", "q8_0,f16", "--out", str(out)]
    r = subprocess.run([*cmd, "--template", "qwen-3", "--ollama-name", "tiny"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ollama create tiny:q8_0 -f {out / 'Modelfile.q8_0'}" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "Modelfile.f16",
            "Modelfile.q8_0",
            "exporter_manifest.json",
            f"{model.name}-f16.gguf",
            f"{model.name}-q8_0.gguf",
        ]
    )
    r = subprocess.run([*cmd, "--template", "qwen-3"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr

    bad = Path(shutil.copytree(model, tmp_path / "bad"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "exporter", "gguf", str(bad), "--template", "qwen-3"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "GPT2LMHeadModel" in r.stderr and "Qwen3ForCausalLM" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "bad-gguf").exists()


def test_sharded_input_gives_the_same_file(tiny_model, converted, tmp_path):
    """A model saved in many shards (with model.safetensors.index.json) converts to the same tensors."""
    import shutil

    from gguf import GGUFReader

    from exporter.gguf import export

    model = tiny_model("qwen2")
    out, tpl = converted("qwen2")
    sharded = Path(shutil.copytree(model, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors")))
    _hf_model(model).to(dtype=__import__("torch").bfloat16).save_pretrained(sharded, max_shard_size="300KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3 and (sharded / "model.safetensors.index.json").is_file()
    res = export(sharded, ["f16"], tpl, tmp_path / "out")
    got = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(res.files["f16"]).tensors}
    want = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(_gguf(out, "f16")).tensors}
    assert got == want


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_expert_checkpoint_gives_the_same_file(family, tiny_model, converted, tmp_path):
    """A checkpoint keeping transformers 5's fused experts (gate_up split into gate and up, down as it is) converts
    to the same tensors as the released per-expert layout."""
    from gguf import GGUFReader
    from test_merge import fused_checkpoint

    from exporter.gguf import export

    out, tpl = converted(family)
    fused = fused_checkpoint(tiny_model(family), tmp_path / "fused")
    res = export(fused, ["f16"], tpl, tmp_path / "out")
    got = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(res.files["f16"]).tensors}
    want = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(_gguf(out, "f16")).tensors}
    assert got.keys() == want.keys() and got == want


@pytest.mark.parametrize("family", ["llama2", "llama3", "qwen3"])  # f16, bf16, bf16 weights
def test_blocks_and_threads_do_not_change_the_file(family, tiny_model, converted, tmp_path, monkeypatch):
    """Blocks of rows are converted by a pool of threads and written where they belong: with blocks of 1-3 rows
    (cutting through the permuted q/k heads of llama3) and 1 or 3 threads, the files are the same bytes."""
    from exporter.converters import gguf_convert

    out, tpl = converted(family)
    want = {k: _gguf(out, k).read_bytes() for k in ("f16", "q8_0")}
    monkeypatch.setattr(gguf_convert, "BLOCK_ELEMS", 1000)
    for threads in (1, 3):
        paths = {k: tmp_path / f"{threads}-{k}.gguf" for k in want}
        gguf_convert.convert(tiny_model(family), paths, tpl.jinja, list(tpl.eot_tokens), threads=threads)
        for k, path in paths.items():
            assert path.read_bytes() == want[k], f"{family} {k} with {threads} threads differs"


def test_fast_encoders_give_gguf_py_bytes():
    """Our numpy encoders write exactly what gguf-py's reference quantizer (and so llama.cpp's converter) writes."""
    import gguf
    from exporter.converters.gguf_quant import bf16_to_f16, bf16_to_f32, encode, nudge_half_away, q8_0
    from gguf.quants import np_roundf

    every = np.arange(1 << 16, dtype=np.uint16)  # every bf16 bit pattern: zero, subnormals, overflow, inf, nan
    with np.errstate(over="ignore"):
        assert np.array_equal(bf16_to_f16(every), bf16_to_f32(every).astype(np.float16).view(np.uint16))

    # Q8_0's rounding: every f32 in [0.25, 2) and the neighbourhood of every tie k + 0.5 up to 127.5, both signs
    dense = np.arange(np.float32(0.25).view(np.uint32), np.float32(2).view(np.uint32), dtype=np.uint32)
    ties = np.arange(128, dtype=np.float32) + np.float32(0.5)
    near = (ties.view(np.uint32)[:, None] + np.arange(-4, 5, dtype=np.int64)).astype(np.uint32).ravel()
    v = np.concatenate([dense, near]).view(np.float32)
    v = np.concatenate([v, -v])
    ours = nudge_half_away(v.copy()).astype(np.int8)  # the int8 cast truncates, as in q8_0
    assert np.array_equal(ours, np_roundf(v).astype(np.int8))

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1536, 1024)) * 0.05).astype(np.float32)
    x[3, :64] = 0.0  # all-zero blocks
    x[4, :32] = np.arange(32, dtype=np.float32) - 15.5  # scale 127/16.5: many products near ties
    x[5, 7], x[6, 8] = 1e-8, 7e4  # f16 subnormal underflow and overflow
    assert q8_0(x).tobytes() == gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).tobytes()
    for qtype in gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q4_0:
        with np.errstate(over="ignore"):
            assert encode(x, qtype).tobytes() == gguf.quants.quantize(x, qtype).tobytes(), qtype.name
