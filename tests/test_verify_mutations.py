"""exporter verify against defects the other checks could not see: one good export of the qwen2 fixture, and copies
each changed in one thing a user or a tool gets wrong, that llama.cpp or Ollama read from the header.

References: llama.cpp (llama-cpp-python: the context `-c 0` gets), llama.cpp's converter (context_length is the HF
config's max_position_embeddings, add_bos_token always written), Ollama's model loaders (`tokenizer.ggml.eos_token_ids`
are stop ids; a missing add_bos_token means "add BOS" for qwen2 and llama; num_ctx cut to context_length)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import require_llama_cpp
from export_edits import rewrite_gguf

from exporter import verify as V

FAST = {"prompts": 2, "max_new_tokens": 8, "ctx": 64, "max_windows": 3}


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """A faithful export of the qwen2 fixture: merged dir with the qwen-2.5 template, an f16 GGUF and its Modelfile."""
    require_llama_cpp()
    from exporter import gguf, templates
    from exporter.hf_dir import load_tokenizer

    root = tmp_path_factory.mktemp("verify-mutations")
    merged = root / "merged"
    shutil.copytree(tiny_model("qwen2"), merged)
    tpl = templates.resolve(merged, "qwen-2.5")
    templates.write_into(merged, tpl)
    res = gguf.export(merged, ["f16"], tpl, root / "gguf")
    return SimpleNamespace(merged=merged, tpl=tpl, f16=res.files["f16"], mf16=res.modelfiles["f16"],
                           tok=load_tokenizer(merged))  # fmt: skip


def _rows(rep, target: str) -> dict[str, tuple[str, str]]:
    return {c.check: (c.status, c.detail) for c in rep.checks if c.target == target}


def test_short_context_length_fails_as_a_check_not_a_crash(good, tmp_path: Path) -> None:
    """A GGUF whose context_length is below the HF config's: llama.cpp's `-c 0` and Ollama's num_ctx cap take it.
    Verify fails its metadata row naming both numbers, and its chat row (the prompt does not fit) instead of raising
    ContextOverflow with a traceback; the good file beside it passes every row."""
    key = "qwen2.context_length"
    assert V.read_kv(good.f16)[key] == 32768
    short = rewrite_gguf(good.f16, tmp_path / "short.gguf", kv={key: 64})
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[good.f16, short], template="qwen-2.5", **FAST))
    ok = _rows(rep, good.f16.name)
    assert ok["metadata"] == ("pass", "context_length 32768, add_bos_token false as the HF model"), ok
    assert all(status == "pass" for status, _ in ok.values()), ok
    bad = _rows(rep, short.name)
    assert bad["metadata"][0] == "fail"
    assert "qwen2.context_length is 64, the HF config's max_position_embeddings is 32768" in bad["metadata"][1]
    assert bad["chat"][0] == "fail" and "the context holds 64" in bad["chat"][1], bad["chat"]


def test_context_length_and_add_bos_token_against_the_hf_model(good, tmp_path: Path) -> None:
    """A context_length that still fits the probes (512; llama.cpp's `-c 0` gives 512 tokens instead of 32768) and a
    GGUF without tokenizer.ggml.add_bos_token (llama.cpp adds no BOS to a qwen2 vocabulary then, Ollama's qwen2 loader
    defaults to adding one): llama.cpp tokenizes both as HF does, the metadata check fails each, naming the key."""
    from llama_cpp import Llama

    from exporter.verify.metadata import check_metadata
    from exporter.verify.tokenizer import check_tokenizer

    longer = rewrite_gguf(good.f16, tmp_path / "ctx512.gguf", kv={"qwen2.context_length": 512})
    for path, n in ((good.f16, 32768), (longer, 512)):  # the reference: the context llama.cpp's `-c 0` gets
        llm = Llama(model_path=str(path), n_ctx=0, verbose=False)
        assert llm.n_ctx() == n
        llm.close()
    no_bos = rewrite_gguf(good.f16, tmp_path / "nobos.gguf", drop=("tokenizer.ggml.add_bos_token",))
    infos = [V.read_gguf(p) for p in (good.f16, longer, no_bos)]
    assert [c.status for c in check_tokenizer(good.tok, infos, [], [])] == ["pass"] * 3  # llama.cpp: no change
    ok, ctx, bos = check_metadata(infos, good.merged, good.tok)
    assert ok.status == "pass", ok.detail
    assert ctx.status == "fail" and "qwen2.context_length is 512" in ctx.detail, ctx.detail
    assert bos.status == "fail" and "tokenizer.ggml.add_bos_token is not set (the HF tokenizer adds no BOS)" in (
        bos.detail
    ), bos.detail


def test_ollama_stop_ids_hold_only_end_of_turn_tokens(good, tmp_path: Path) -> None:
    """tokenizer.ggml.eos_token_ids with an ordinary word token: llama.cpp ignores the key (its EOG set is
    unchanged), Ollama stops on every id in it. The stops check fails naming the token."""
    from exporter.verify.artifacts import gen_eos
    from exporter.verify.stops import check_stops, eot_ids

    info = V.read_gguf(good.f16)
    assert info.eos_ids, "the good export writes Ollama's stop ids"
    word = info.tokens.index("Ġb")
    bad = rewrite_gguf(good.f16, tmp_path / "bad.gguf", kv={"tokenizer.ggml.eos_token_ids": [*info.eos_ids, word]})
    gen = gen_eos(good.merged) or []
    eot = eot_ids(good.tok, good.tpl, gen)
    (ok,) = check_stops(eot, None, [info], [], good.tok, gen)
    (fail,) = check_stops(eot, None, [V.read_gguf(bad)], [], good.tok, gen)
    assert ok.status == "pass", ok.detail
    assert fail.status == "fail" and f"tokenizer.ggml.eos_token_ids holds 'Ġb' ({word}), which Ollama stops on" in (
        fail.detail
    ), fail.detail


def test_modelfile_stop_on_ordinary_text_fails(good, tmp_path: Path) -> None:
    """A Modelfile with `PARAMETER stop "the"`: Ollama cuts every answer at its first "the". The stops check of that
    Modelfile fails naming the string; the written Modelfile (special-token stops only) passes."""
    from exporter.verify.artifacts import gen_eos
    from exporter.verify.stops import check_stops, eot_ids

    mf = tmp_path / "Modelfile.f16"
    mf.write_text(good.mf16.read_text() + 'PARAMETER stop "the"\n')
    gen = gen_eos(good.merged) or []
    eot = eot_ids(good.tok, good.tpl, gen)
    mfs = [V.parse_modelfile(good.mf16), V.parse_modelfile(mf)]
    ok, fail = check_stops(eot, None, [], mfs, good.tok, gen, good.tpl.stop)
    assert ok.status == "pass", ok.detail
    assert fail.status == "fail" and "PARAMETER stop 'the' is neither a stop of the template nor a special" in (
        fail.detail
    ), fail.detail
