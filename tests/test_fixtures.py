"""The tiny-model fixtures behave like their families: load, generate, chat-template, tokenize, stay deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES, ROOT, TEMPLATE_OF, llama_src, load_maker

MAKER = load_maker()
MIXED = (
    "Hello, world! 你好，世界。今天天气很好 🎉👍🏽 👨‍👩‍👧\n"
    "def add(a, b):\n    return a + b  # 加法\n"
    "  spaces\tand tabs; numbers 12345 and 3.14, émoji 🚀 ok."
)
# add_bos_token of the real models' tokenizers (tokenizer_config.json / llama.cpp's vocab metadata).
REAL_ADD_BOS = {
    "llama2": True,
    "llama3": True,
    "mistral": True,
    "qwen2": False,
    "qwen3": False,
    "gemma3": True,
    "phi3": True,
    "qwen3_moe": False,
    "mixtral": True,
    "gemma2": True,
    "mistral_nemo": True,
    "glm4": False,
    "granite": False,
    "olmo2": False,
    "smollm3": False,
}
ARCH = {
    "llama2": "LlamaForCausalLM",
    "llama3": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "mistral_nemo": "MistralForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. 请用中文回答。"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "再说一遍 🙂"},
]


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_and_generates(tiny_model, family: str) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = tiny_model(family)
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == ARCH[family]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hidden_size"] % 256 == 0 and cfg["intermediate_size"] % 256 == 0
    assert model.dtype == getattr(torch, cfg["dtype"])
    tok = _tok(path)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    tied = MAKER.SPECS[family].tie
    assert ("lm_head.weight" not in names) == tied
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr() or not tied
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    if family == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in names
    if family == "phi3":  # fused like the hub's Phi-3 checkpoints
        assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    if family == "qwen3_moe":  # one tensor per expert, as released (transformers 5 fuses them at load)
        assert {f"model.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(4)} <= names
    if family == "mixtral":
        assert {
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.0.block_sparse_moe.gate.weight",
        } <= names
    if family == "mistral_nemo":  # explicit head_dim, not hidden_size / heads
        assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]

    ids = tok("Hello 你好", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1].item() in _gen_eos(path)
    logits = model(**ids).logits
    assert torch.isfinite(logits).all() and logits.float().std() > 0.1  # peaky enough to rank tokens


def _gen_eos(path: Path) -> list[int]:
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders(tiny_model, family: str) -> None:
    path = tiny_model(family)
    tok = _tok(path)
    jinja = MAKER.family_template(MAKER.SPECS[family])  # published where the sdist has it
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == jinja
    assert (path / "chat_template.jinja").read_text() == jinja
    assert tok.chat_template == jinja
    conv = CONVERSATION
    if family == "gemma2":  # Gemma 2's published template refuses a system role
        conv = [{**CONVERSATION[1], "content": CONVERSATION[0]["content"] + " " + CONVERSATION[1]["content"]}]
        conv += CONVERSATION[2:]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    for m in conv:  # every message (Mistral moves the system prompt into the last user turn)
        assert m["content"] in text
    assert text.index(conv[-3]["content"]) < text.index(conv[-2]["content"]) < text.index(conv[-1]["content"])
    ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
    for t in tok.all_special_tokens + [str(a) for a in tok.added_tokens_decoder.values()]:
        assert ids.count(tok.convert_tokens_to_ids(t)) == text.count(t), t  # each marker is one id
    if tok.bos_token and text.startswith(tok.bos_token):
        assert ids[:2] != [tok.bos_token_id] * 2  # no double BOS
    # the assistant turn ends with one of the generation_config eos ids
    assert set(ids) & set(_gen_eos(path)), (family, text)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_roundtrip_and_reference(tiny_model, family: str) -> None:
    from tokenizers import Tokenizer

    path = tiny_model(family)
    tok = _tok(path)
    ids = tok.encode(MIXED, add_special_tokens=False)
    assert tok.decode(ids) == MIXED
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    zh = tok.encode("机器学习是人工智能的一个分支", add_special_tokens=False)
    assert len(zh) < 3 * 14  # Chinese is tokenized (not just bytes at 3 per char)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert raw.encode(MIXED, add_special_tokens=False).ids == ids  # AutoTokenizer keeps the file's pipeline
    if (path / "tokenizer.model").is_file():  # SentencePiece families: HF == sentencepiece itself
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        # (transformers 5 builds Llama-family tokenizers with Metaspace(prepend_scheme="first"), which skips
        # sentencepiece's dummy prefix when the text already starts with a space: compare other texts)
        texts = [MIXED, *MIXED.split("\n")[:2], "x  y", "Tabs\tand  two spaces"]
        if family == "phi3":  # its tokenizer.json prepends the dummy prefix like sentencepiece
            texts += [" leading", "   return x", MIXED.split("\n")[2]]
        for text in texts:
            assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text


@pytest.mark.parametrize("family", FAMILIES)
def test_add_bos_like_real_family(tiny_model, family: str) -> None:
    tok = _tok(tiny_model(family))
    ids = tok.encode("hello")
    if REAL_ADD_BOS[family]:
        assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode("hello", add_special_tokens=False)
    else:
        assert ids == tok.encode("hello", add_special_tokens=False)
    assert tok.eos_token_id not in ids  # no family appends EOS


@pytest.mark.parametrize("family", FAMILIES)
def test_adds_bos_everywhere_says_what_transformers_does(tiny_model, family: str) -> None:
    """The one "does this tokenizer add BOS" (hf_dir.adds_bos) and the GGUF converter's reading of the files without
    transformers (gguf_vocab) both say what transformers' encode does, on every family."""
    from exporter.converters import gguf_arch, gguf_vocab

    from exporter import hf_dir

    path = tiny_model(family)
    tok = _tok(path)
    with_special, plain = tok(MIXED)["input_ids"], tok(MIXED, add_special_tokens=False)["input_ids"]
    prepends = with_special[:1] == [tok.bos_token_id] and with_special[1:] == plain
    assert prepends == REAL_ADD_BOS[family] and (prepends or with_special == plain)
    assert hf_dir.adds_bos(tok) is prepends
    hp = gguf_arch.load_hparams(path)
    vocab = gguf_vocab.build_vocab(path, hp, gguf_arch.arch_for(hp, path), [])
    assert vocab.add_bos is prepends and vocab.add_eos is False


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_single_ids(tiny_model, family: str) -> None:
    path = tiny_model(family)
    tok = _tok(path)
    spec = MAKER.SPECS[family]
    tokens = {t for t in (spec.bos, spec.eos, spec.pad, *spec.gen_eos) if t}
    tokens |= {t for t, _ in spec.added} | {t for t in spec.spm_head if t != spec.unk}
    assert tokens
    for t in sorted(tokens):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and (ids[0] != tok.unk_token_id or t == spec.unk), (t, ids)  # Granite: unk is eos
        assert tok.decode(ids) == t
    gen = _gen_eos(path)
    assert gen == tok.convert_tokens_to_ids(list(spec.gen_eos))
    from exporter.templates import load_template

    eot = load_template(TEMPLATE_OF[family]).for_tokenizer(tok.bos_token, tok.eos_token).eot_tokens
    for t in eot:  # the template's end-of-turn ids stop generation
        assert tok.convert_tokens_to_ids(t) in gen, t
    cfg = json.loads((path / "config.json").read_text())
    eos = cfg["eos_token_id"]
    assert eos == (gen if spec.config_eos_list else tok.eos_token_id) and cfg["pad_token_id"] == tok.pad_token_id


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("family", ["llama3", "phi3"])
def test_deterministic_builds(tmp_path: Path, family: str) -> None:
    a = MAKER.make(family, tmp_path / "a")
    b = MAKER.make(family, tmp_path / "b")
    c = MAKER.make(family, tmp_path / "c", seed=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa["model.safetensors"] != fc["model.safetensors"] and fa["tokenizer.json"] == fc["tokenizer.json"]


def test_bench_size_is_about_a_billion() -> None:
    cfg = MAKER._config(MAKER.SPECS["llama3"], "bench", 2048, {"bos": 1, "eos": 2, "pad": None})
    n = sum(_numel(s) for s in MAKER._tensor_shapes(cfg).values())
    assert 0.8e9 < n < 1.0e9


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def test_cli_bad_input(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "make_tiny_model.py")
    r = subprocess.run([sys.executable, script, "nope", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("x")  # an empty dir would be used; one with files is refused
    r = subprocess.run([sys.executable, script, "qwen2", str(tmp_path / "y")], capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert not list(tmp_path.glob("*.tmp-*"))


# ---- real vocabularies (llama.cpp's ggml-vocab-*.gguf) ------------------------------------------------------


def _vectors(name: str) -> list[tuple[str, list[int]]]:
    models = llama_src() / "vendor" / "llama.cpp" / "models"
    # .inp: texts separated by "\n__ggml_vocab_test__\n"; .out: one line of ids per text
    sep = "\n__ggml_vocab_test__\n"
    raw = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    inp = raw.removesuffix(sep).split(sep)
    out = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(x) for x in ids.split()]) for text, ids in zip(inp, out[: len(inp)], strict=True)]


# inputs where transformers 5.23 and llama.cpp tokenize differently, and why
REAL_VOCAB_KNOWN = {
    # llama.cpp NFC-composes before the Llama 3 regex; transformers' tokenizer has no normalizer
    "llama3": lambda text: text == "Cửa Việt",
}


@pytest.mark.slow  # a cold cache builds a 30k-262k-token vocabulary per family (about 5-30 s each)
@pytest.mark.parametrize("family", [f for f in FAMILIES if MAKER.SPECS[f].real_vocab])
def test_real_vocab_matches_llama_cpp(tiny_model, family: str, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    llama_src()
    from exporter import spm

    path = tiny_model(family, real_vocab=True)
    tok = spm.load_tokenizer(path)  # SentencePiece families with SentencePiece's prefix (tests/test_spm.py)
    spec = MAKER.SPECS[family]
    pairs = _vectors(spec.real_vocab)
    assert len(pairs) >= 40
    bad = [t for t, ids in pairs if tok.encode(t, add_special_tokens=False) != ids]
    with capsys.disabled():
        print(f"\n[real vocab] {family} ({spec.real_vocab}): {len(pairs) - len(bad)}/{len(pairs)} match llama.cpp")
    known = REAL_VOCAB_KNOWN.get(family, lambda text: False)
    assert [t for t in bad if not known(t)] == []
    if (path / "tokenizer.model").is_file():  # the sentencepiece model rebuilt from the GGUF: exact, no exceptions
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        assert [t for t, ids in pairs if sp.encode(t) != ids] == []
    # the family's special tokens are single ids, BOS as the family adds it, eos list as the real model's
    for t in {t for t in (spec.bos, spec.eos, spec.pad, *spec.gen_eos, *(a for a, _ in spec.added)) if t}:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert (tok.encode("hi")[0] == tok.bos_token_id) == REAL_ADD_BOS[family]
    assert _gen_eos(path) == tok.convert_tokens_to_ids(list(spec.gen_eos))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    ids = tok(MIXED, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert out.shape[1] > ids["input_ids"].shape[1]


# ---- demo data (LLaMA-Factory's dataset_info.json conventions) ----------------------------------------------

DATA = ROOT / "data"


def _rows(name: str) -> list[dict]:
    info = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))
    return json.loads((DATA / info[name]["file_name"]).read_text(encoding="utf-8"))


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_dataset_info_registers_every_file() -> None:
    info = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))
    assert {"identity", "alpaca_en_demo", "alpaca_zh_demo", "sharegpt_demo"} <= set(info)
    for name, attr in info.items():
        assert (DATA / attr["file_name"]).is_file(), name
        assert attr.get("formatting", "alpaca") in ("alpaca", "sharegpt"), name
        rows = _rows(name)
        assert isinstance(rows, list) and len(rows) >= 20, name
        if attr.get("formatting", "alpaca") == "alpaca":
            cols = {"prompt": "instruction", "query": "input", "response": "output", **attr.get("columns", {})}
            for row in rows:
                assert isinstance(row[cols["prompt"]], str) and row[cols["prompt"]].strip(), (name, row)
                assert isinstance(row.get(cols["query"], ""), str) and row[cols["response"]].strip(), (name, row)


def test_identity_has_placeholders_in_both_languages() -> None:
    rows = _rows("identity")
    assert len(rows) >= 40
    zh = [r for r in rows if _has_cjk(r["instruction"])]
    en = [r for r in rows if not _has_cjk(r["instruction"])]
    assert len(zh) >= 15 and len(en) >= 15
    assert all("{{name}}" in r["output"] or "{{author}}" in r["output"] for r in rows)
    assert sum("{{author}}" in r["output"] for r in rows) >= 30
    assert len({r["instruction"] for r in rows}) == len(rows)  # no duplicate prompts


def test_alpaca_demo_languages() -> None:
    assert all(_has_cjk(r["instruction"]) for r in _rows("alpaca_zh_demo"))
    assert not any(_has_cjk(r["instruction"] + r["output"]) for r in _rows("alpaca_en_demo"))


def test_sharegpt_demo_follows_llama_factory_rules() -> None:
    info = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))["sharegpt_demo"]
    cols, tags = info["columns"], info["tags"]
    odd = {tags["user_tag"], tags["observation_tag"]}  # LLaMA-Factory: turns 1, 3, ... come from these
    even = {tags["assistant_tag"], tags["function_tag"]}  # turns 2, 4, ... from these
    rows = _rows("sharegpt_demo")
    with_tools = [r for r in rows if r.get(cols["tools"])]
    assert with_tools and any(r.get(cols["system"]) for r in rows)
    for row in rows:
        msgs = row[cols["messages"]]
        assert len(msgs) % 2 == 0 and msgs, row
        for i, m in enumerate(msgs):
            assert m[tags["role_tag"]] in (odd if i % 2 == 0 else even), (i, m)
            assert m[tags["content_tag"]].strip()
            if m[tags["role_tag"]] == tags["function_tag"]:
                call = json.loads(m[tags["content_tag"]])
                names = {t["name"] for t in json.loads(row[cols["tools"]])}
                assert call["name"] in names and isinstance(call["arguments"], dict)
        assert msgs[-1][tags["role_tag"]] == tags["assistant_tag"]
