"""End-of-generation metadata, stops, tokenizer knobs and sampling PARAMETERs of `exporter gguf`, each against its
reference: transformers' tokenizer vs llama.cpp's tokens (knobs transformers applies and llama.cpp does not are
refused, the ones it drops are not), llama.cpp's `llama_vocab_eot` (the chat turn's end-of-turn token, never the
pre-training end-of-text one), generation_config.json (its eos ids are stops and `tokenizer.ggml.eos_token_ids`; its
sampling with do_sample is the Modelfile's PARAMETERs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_llama_cpp

TEXTS = ["Hello World", "hello world", " leading space", "Ünïcödé Straße 42", "a\n\nb  c\tdone", "x=1+2; y = 'z'"]
PER_FAMILY_EXPORTS: dict[tuple[str, bool], Path] = {}


def _export(hf: Path, out: Path) -> Path:
    from exporter import gguf, templates

    return gguf.export(hf, ["f16"], templates.resolve(hf, None), out).out_dir


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """`exported(family, real)` -> the f16 GGUF dir of the fixture (built once per module)."""
    require_llama_cpp()

    def get(family: str, real: bool = True) -> Path:
        key = (family, real)
        if key not in PER_FAMILY_EXPORTS:
            hf = tiny_model(family, real_vocab=real)
            PER_FAMILY_EXPORTS[key] = _export(hf, tmp_path_factory.mktemp(f"{family}-gguf"))
        return PER_FAMILY_EXPORTS[key]

    return get


def _gguf(out: Path) -> Path:
    return next(out.glob("*-f16.gguf"))


def _kv(path: Path) -> dict:
    from exporter.converters.gguf_read import read_kv

    return read_kv(path)


def _hf_tokens(model: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _llama_tokens(path: Path, texts: list[str]) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
    finally:
        llm.close()


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _bytelevel(tj: dict) -> dict:
    return next(p for p in tj["pre_tokenizer"]["pretokenizers"] if p["type"] == "ByteLevel")


# ------------------------------------------------------------------------------------------------------ defect 1


def test_bytelevel_add_prefix_space_is_refused_in_one_line(tiny_model, tmp_path):
    """llama3-real (PreTrainedTokenizerFast applies tokenizer.json as written) with ByteLevel add_prefix_space: HF
    tokenizes 'Hello' as ' Hello', llama.cpp's llama-bpe/smaug-bpe cannot: exit 2, one line naming the file and key,
    nothing written."""
    model = Path(shutil.copytree(tiny_model("llama3", real_vocab=True), tmp_path / "l3"))
    _edit_json(model / "tokenizer.json", lambda tj: _bytelevel(tj).update(add_prefix_space=True))
    hf = _hf_tokens(model, ["Hello World"])[0]
    assert hf != _hf_tokens(tiny_model("llama3", real_vocab=True), ["Hello World"])[0]  # HF applies the knob
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "exporter", "gguf", str(model), "-t", "f16", "-o", str(out)],
                       capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(model / "tokenizer.json") in lines[0] and "pre_tokenizer.pretokenizers[1].add_prefix_space" in lines[0]
    assert r.stdout == "" and not out.exists()


LOWER_AFTER_NFC = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}


@pytest.mark.parametrize("normalizer", [{"type": "Lowercase"}, {"type": "NFKC"}, LOWER_AFTER_NFC])
def test_bytelevel_normalizer_is_refused(normalizer, tiny_model, tmp_path):
    """A normalizer llama.cpp does not apply (it applies none) on a tokenizer transformers builds as written."""
    from exporter.converters import gguf_arch, gguf_vocab

    from exporter.errors import UserError

    model = Path(shutil.copytree(tiny_model("llama3", real_vocab=True), tmp_path / "l3"))
    _edit_json(model / "tokenizer.json", lambda tj: tj.update(normalizer=normalizer))
    hp = json.loads((model / "config.json").read_text())
    with pytest.raises(UserError, match=r"tokenizer\.json: normalizer.* is \"(Lowercase|NFKC)\""):
        gguf_vocab.build_vocab(model, hp, gguf_arch.arch_for(hp, model), ["<|eot_id|>"])


def test_add_prefix_space_in_tokenizer_config_is_refused(tiny_model, tmp_path):
    """Qwen2Tokenizer builds its ByteLevel from tokenizer_config.json's add_prefix_space: HF then tokenizes 'Hello'
    as ' Hello' (checked), which llama.cpp's qwen2 pre-tokenizer cannot."""
    from exporter.converters import gguf_arch, gguf_vocab

    from exporter.errors import UserError

    model = Path(shutil.copytree(tiny_model("qwen2", real_vocab=True), tmp_path / "q2"))
    _edit_json(model / "tokenizer_config.json", lambda c: c.update(add_prefix_space=True))
    assert _hf_tokens(model, ["Hello"]) != _hf_tokens(tiny_model("qwen2", real_vocab=True), ["Hello"])
    hp = json.loads((model / "config.json").read_text())
    with pytest.raises(UserError, match=r"tokenizer_config\.json: add_prefix_space is true"):
        gguf_vocab.build_vocab(model, hp, gguf_arch.arch_for(hp, model), ["<|im_end|>"])


@pytest.mark.parametrize(
    ("family", "edit"),
    [
        # transformers 5's Qwen2Tokenizer rebuilds its normalizer (NFC) and pre-tokenizer from its own code
        (
            "qwen2",
            lambda tj: (_bytelevel(tj).update(add_prefix_space=True), tj.update(normalizer={"type": "Lowercase"})),
        ),
        # NFC (Qwen's, kept by PreTrainedTokenizerFast) only changes text that is not NFC already
        ("llama3", lambda tj: tj.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}]})),
    ],
    ids=["qwen2-knobs-dropped-by-transformers", "llama3-nfc"],
)
def test_knobs_transformers_does_not_apply_still_convert(family, edit, tiny_model, tmp_path):
    """Not refused where HF and our GGUF tokenize alike: llama.cpp's tokens equal HF's on every text."""
    require_llama_cpp()
    model = Path(shutil.copytree(tiny_model(family, real_vocab=True), tmp_path / family))
    _edit_json(model / "tokenizer.json", edit)
    out = _export(model, tmp_path / "out")
    assert _llama_tokens(_gguf(out), TEXTS) == _hf_tokens(model, TEXTS)


def test_real_fixtures_all_pass_the_knob_check(tiny_model):
    """Every fixture's byte-level tokenizer (real published ones included) passes the knob check."""
    from conftest import FAMILIES
    from exporter.converters import gguf_vocab

    for family in FAMILIES:
        for real in (False, True):
            if real and family not in ("qwen2", "qwen3", "llama3", "gemma3", "phi3", "llama2", "mistral", "mixtral"):
                continue
            model = tiny_model(family, real_vocab=real)
            tj = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
            if (tj.get("decoder") or {}).get("type") == "ByteLevel":
                gguf_vocab.check_bpe_knobs(model, tj, "x")


# ------------------------------------------------------------------------------------------------------ defect 2


def _gen_eos_texts(model: Path) -> list[str]:
    from transformers import AutoTokenizer

    ids = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    ids = ids if isinstance(ids, list) else [ids]
    return AutoTokenizer.from_pretrained(str(model)).convert_ids_to_tokens(ids)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_generation_config_eos_tokens_are_stops_and_eos_token_ids(family, tiny_model, exported):
    """A family-matched template (qwen-2.5, llama-3.1) stops where HF generate does: every generation_config eos
    token is a PARAMETER stop, and tokenizer.ggml.eos_token_ids holds each of those ids (Ollama's engine stops on
    eos + that list); llama.cpp still loads the file, and verify's stop checks pass."""
    from transformers import AutoTokenizer

    from exporter.templates import resolve
    from exporter.verify.artifacts import gen_eos, parse_modelfile, read_gguf
    from exporter.verify.stops import check_stops, eot_ids

    model = tiny_model(family, real_vocab=True)
    out = exported(family)
    mf = parse_modelfile(out / "Modelfile.f16")
    assert set(_gen_eos_texts(model)) <= set(mf.stops), mf.stops
    g = read_gguf(_gguf(out))
    gen_ids = gen_eos(model)
    assert set(g.eos_ids) == set(gen_ids) | {g.eog_ids["eos"]}, (g.eos_ids, gen_ids)
    assert _llama_tokens(g.path, ["Hi"])  # loads
    tok = AutoTokenizer.from_pretrained(str(model))
    checks = check_stops(eot_ids(tok, resolve(model, None), gen_ids), model, [g], [mf], tok, gen_ids)
    # llama.cpp makes Qwen's ordinary text token '</s>' EOG by its text (with or without this change): not ours
    problems = [p for c in checks if c.status != "pass" for p in c.detail.split("; ") if not p.startswith("'</s>'")]
    assert not problems and len(checks) == 3, problems


def test_eos_token_ids_left_out_when_eos_is_the_only_one(exported):
    """llama2: generation_config eos is eos itself; no tokenizer.ggml.eos_token_ids (eos_token_id says it)."""
    assert "tokenizer.ggml.eos_token_ids" not in _kv(_gguf(exported("llama2")))


# ------------------------------------------------------------------------------------------------------ defect 3


def _eot_eos(path: Path) -> tuple[int, int]:
    llama_cpp = require_llama_cpp()
    from exporter.quiet import silence_llama_cpp

    silence_llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return llama_cpp.llama_vocab_eot(vocab), llama_cpp.llama_vocab_eos(vocab)
    finally:
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize(("family", "eot"), [("qwen2", "<|im_end|>"), ("qwen3", "<|im_end|>"),
                                              ("llama3", "<|eot_id|>")])  # fmt: skip
def test_eot_is_the_chat_turns_end_not_end_of_text(family, eot, tiny_model, exported):
    """llama.cpp's llama_vocab_eot is the template's end-of-turn token (here = eos), as on llama.cpp's converter's
    file, never <|endoftext|> / <|end_of_text|>."""
    from transformers import AutoTokenizer

    from exporter.templates import resolve

    model = tiny_model(family, real_vocab=True)
    assert resolve(model, None).eot_tokens[0] == eot
    got_eot, got_eos = _eot_eos(_gguf(exported(family)))
    assert got_eot == AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids(eot) == got_eos


@pytest.mark.parametrize(
    ("family", "real", "eot", "eom"),
    [("phi3", True, "<|end|>", "<|assistant|>"), ("glm4", False, "<|user|>", "<|observation|>")],
)
def test_phi3_glm4_eot_and_eom_unchanged(family, real, eot, eom, exported):
    """Phi-3's <|assistant|> and GLM-4's <|observation|> (generation_config / template stops) stay eom."""
    path = _gguf(exported(family, real))
    kv = _kv(path)
    tokens = kv["tokenizer.ggml.tokens"]
    assert tokens[int(kv["tokenizer.ggml.eot_token_id"])] == eot
    assert tokens[int(kv["tokenizer.ggml.eom_token_id"])] == eom
    assert tokens[_eot_eos(path)[0]] == eot


# ------------------------------------------------------------------------------------------------------ defect 4


QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def _hf_sampling(model: Path) -> dict[str, float]:
    """What transformers' generate samples with: generation_config.json over transformers' own defaults."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(str(model))
    defaults = GenerationConfig._get_default_generation_params()
    pick = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "repeat_penalty": "repetition_penalty"}
    out = {k: getattr(gen, v) if getattr(gen, v) is not None else defaults[v] for k, v in pick.items()}
    return out | ({"min_p": gen.min_p} if gen.min_p is not None else {})


def _params(modelfile: Path) -> dict[str, float]:
    from exporter.converters.modelfile import parse

    cmds = parse(modelfile.read_text(encoding="utf-8"))
    return {
        c.removeprefix("parameter "): float(v) for c, v in cmds if c.startswith("parameter ") and c != "parameter stop"
    }


def test_sampling_defaults_reach_every_modelfile(tiny_model, tmp_path):
    """qwen3-real with Qwen3's published generation_config: the GGUF's Modelfile and a merged dir's `FROM .` carry
    transformers' sampling (temperature 0.6, top_k 20, top_p 0.95, repeat_penalty 1); verify parses them."""
    from exporter import gguf, templates
    from exporter.verify.artifacts import parse_modelfile

    model = Path(shutil.copytree(tiny_model("qwen3", real_vocab=True), tmp_path / "q3"))
    _edit_json(model / "generation_config.json", lambda g: g.update(QWEN3_SAMPLING))
    want = _hf_sampling(model)
    assert want == {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "repeat_penalty": 1.0}
    out = _export(model, tmp_path / "out")
    assert _params(out / "Modelfile.f16") == want
    assert "<|im_end|>" in parse_modelfile(out / "Modelfile.f16").stops
    tpl = templates.resolve(model, None)
    (tmp_path / "Modelfile").write_text(gguf.dir_modelfile(tpl, "src", model), encoding="utf-8")
    assert _params(tmp_path / "Modelfile") == want


def test_sampling_defaults_reach_the_adapter_modelfile(tiny_model, tmp_path):
    """`exporter gguf --adapter`: the same PARAMETER lines, from the base's generation_config."""
    from conftest import random_lora

    from exporter import gguf, templates

    base = Path(shutil.copytree(tiny_model("qwen2"), tmp_path / "base"))
    _edit_json(base / "generation_config.json", lambda g: g.update(QWEN3_SAMPLING, min_p=0.05))
    ad = random_lora(base, tmp_path / "ad", r=2, target_modules=["q_proj"])
    res = gguf.export_adapter(ad, base, ["f16"], templates.resolve(base, None), tmp_path / "out")
    assert _params(res.modelfiles["f16"]) == _hf_sampling(base) | {"min_p": 0.05}


def test_no_sampling_parameters_without_do_sample(tiny_model, tmp_path):
    """Greedy in transformers (do_sample absent or false): no sampling PARAMETER, a comment saying why."""
    from exporter import gguf, templates

    model = Path(shutil.copytree(tiny_model("qwen2"), tmp_path / "m"))
    _edit_json(model / "generation_config.json", lambda g: g.update(temperature=0.7, top_p=0.8))
    text = gguf.dir_modelfile(templates.resolve(model, None), "src", model)
    assert "PARAMETER temperature" not in text and "PARAMETER top_p" not in text
    assert "# generation_config.json sets temperature, top_p but do_sample is not true" in text


def test_bad_sampling_value_is_refused_before_converting(tiny_model, tmp_path):
    from exporter import gguf, templates
    from exporter.errors import UserError

    model = Path(shutil.copytree(tiny_model("qwen2"), tmp_path / "m"))
    _edit_json(model / "generation_config.json", lambda g: g.update(do_sample=True, top_k="twenty"))
    with pytest.raises(UserError, match=r"generation_config\.json: top_k is 'twenty'"):
        gguf.export(model, ["f16"], templates.resolve(model, None), tmp_path / "out")
    assert not (tmp_path / "out").exists()
