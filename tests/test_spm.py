"""SentencePiece families tokenize like SentencePiece and llama.cpp, in training and in every exported dir.

References: llama.cpp's own tokenizer test vectors (`ggml-vocab-llama-spm.gguf.inp/.out`, `ggml-vocab-phi-3...`,
generated with the original tokenizers), llama.cpp itself (llama-cpp-python) on the sdist's real vocabularies and on
our GGUF of each real-vocabulary fixture (Mistral's [INST] tokens are not in Llama 2's vocabulary file), and
sentencepiece. Texts: every test vector, the multilingual corpus, each at text start, after leading spaces and after
the family's control tokens ([INST], <|user|>, </s>).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TEMPLATE_OF, llama_src, require_llama_cpp
from test_fixtures import _vectors

SPM = {"llama2": "llama-spm", "mistral": "llama-spm", "phi3": "phi-3"}
# transformers 5 rebuilds these with Metaspace(prepend_scheme="first"); Phi-3's tokenizer.json already prepends "▁"
# to every piece (the hub's layout, kept as written), its drift was llama.cpp's name-keyed rstrip (see `_ours`)
DRIFTS = ("llama2", "mistral")
# how each family's chat format puts text after control tokens (llama.cpp starts each such piece with "▁")
WRAP = {
    "llama2": ["<s>[INST] {} [/INST]", "{}</s><s>[INST]{}"],
    "mistral": ["[INST]{}[/INST]", "[INST] {}[/INST] {}</s>[INST]{}"],
    "phi3": ["<|user|>\n{}<|end|>\n<|assistant|>\n", "<|user|>{}<|end|><|assistant|> {}<|end|>"],
}


def _texts() -> list[str]:
    from exporter.verify import TOKENIZER_CORPUS

    base = [*TOKENIZER_CORPUS, "", " ", "Hi", "  two", "\tTab", "\nNewline"]
    return base + [" " + t for t in base] + ["   " + t for t in base[:6]]


def _wrapped(family: str) -> list[str]:
    out = []
    for text in _texts():
        for pattern in WRAP[family]:
            out.append(pattern.replace("{}", text))
    return out


_GGUF: dict[str, Path] = {}


def _ours(family: str, tiny_model, tmp_path_factory) -> Path:
    """Our f16 GGUF of the family's real-vocabulary fixture saved as "merged" (cached per session): llama.cpp strips
    whitespace after Phi-3's added tokens, as HF does, only when general.name says phi3."""
    from exporter import gguf, templates

    if family not in _GGUF:
        work = tmp_path_factory.mktemp(f"spm-{family}")
        model = Path(shutil.copytree(tiny_model(family, real_vocab=True), work / "merged"))
        res = gguf.export(model, ["f16"], templates.resolve(model, TEMPLATE_OF[family]), work / "out")
        _GGUF[family] = res.files["f16"]
    return _GGUF[family]


def _llama(path: Path):
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.slow  # builds the real-vocabulary fixtures (32k pieces) when the cache is cold
@pytest.mark.parametrize("family", list(SPM))
def test_real_vocabulary_parity(family, tiny_model, tmp_path_factory, tmp_path):
    """Fixed HF ids == llama.cpp's test vectors == llama.cpp on every text; the plain transformers 5 tokenizer does
    not (the drift is real), and an exported dir reloaded by AutoTokenizer behaves like the fixed tokenizer."""
    from transformers import AutoTokenizer

    from exporter import spm

    src = tiny_model(family, real_vocab=True)
    plain = AutoTokenizer.from_pretrained(src)
    fixed = spm.load_tokenizer(src)
    exported = Path(shutil.copytree(src, tmp_path / "exported"))
    assert spm.fix_dir(exported) == (family in DRIFTS) and not spm.fix_dir(exported)  # once, then already right
    reloaded = AutoTokenizer.from_pretrained(exported)
    vocab_file = llama_src() / "vendor" / "llama.cpp" / "models" / f"ggml-vocab-{SPM[family]}.gguf"
    sdist = _llama(vocab_file)
    ours = _llama(_ours(family, tiny_model, tmp_path_factory))

    vectors = _vectors(SPM[family])
    assert len(vectors) >= 40
    bad = [t for t, ids in vectors if fixed.encode(t, add_special_tokens=False) != ids]
    assert not bad, f"{family}: {len(bad)}/{len(vectors)} test vectors differ, first {bad[0]!r}"
    assert any(plain.encode(t, add_special_tokens=False) != ids for t, ids in vectors) == (family in DRIFTS)

    checked = drift = 0
    for text in _texts():  # plain texts, BOS as the tokenizer adds it: the sdist's vocabulary is the reference
        want = sdist.tokenize(text.encode(), add_bos=True, special=False)
        for tok, name in ((fixed, "fixed"), (reloaded, "exported dir")):
            assert tok.encode(text) == want, f"{family} ({name}): {text!r}"
        assert ours.tokenize(text.encode(), add_bos=True, special=False) == want, f"{family} GGUF: {text!r}"
        drift += plain.encode(text) != want
        checked += 1
    for text in _wrapped(family):  # after control tokens: llama.cpp on our GGUF (it has Mistral's [INST] too)
        want = ours.tokenize(text.encode(), add_bos=False, special=True)
        for tok, name in ((fixed, "fixed"), (reloaded, "exported dir")):
            assert tok.encode(text, add_special_tokens=False) == want, f"{family} ({name}): {text!r}"
        drift += plain.encode(text, add_special_tokens=False) != want
        checked += 1
    assert (drift > 0) == (family in DRIFTS)
    print(f"\n[spm] {family}: {len(vectors)} vectors + {checked} texts equal llama.cpp ({drift} differ unfixed)")


@pytest.mark.parametrize("family", list(SPM))
def test_training_ids_equal_llama_cpp(family, tiny_model, tmp_path_factory):
    """The ids training computes for a conversation (tokenizer as `exporter train` loads it, our renderer) are what
    llama.cpp makes of the same rendered text, for the trained-vocabulary fixture too."""
    from exporter import gguf, render, spm, templates

    model = tiny_model(family)
    tpl = templates.resolve(model, TEMPLATE_OF[family])
    out = tmp_path_factory.mktemp(f"spm-train-{family}") / "g"
    llm = _llama(gguf.export(model, ["f16"], tpl, out).files["f16"])
    tok = spm.load_tokenizer(model)
    convs = [
        [{"role": "user", "content": " leading space"}, {"role": "assistant", "content": "  two spaces"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "你好 🙂"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "\tand tabs"},
            {"role": "assistant", "content": " ok"},
        ],
    ]
    for conv in convs:
        ids, _ = render.encode(tok, tpl, conv)
        text = render.render_text(tpl, conv, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        want = llm.tokenize(text.encode(), add_bos=not text.startswith(tok.bos_token or "\0"), special=True)
        assert ids == want, f"{family}: {text!r}"
