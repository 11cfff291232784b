"""Prompt scoring on POST /v1/completions as lm-evaluation-harness's `local-completions` asks for it (`echo: true,
logprobs: k, max_tokens: 1` or 0, prompts as token-id lists, several per request), against independent references:
transformers' own logits (hf) and llama-cpp-python's completion code, the one its server runs (gguf)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The capital of France is Paris, and the capital of Spain is"


def _serve(model: Path, *args: str) -> tuple[subprocess.Popen, object]:
    port = free_port()
    cmd = [sys.executable, "-m", "exporter", "serve", str(model), "--port", str(port), "--max-seqs", "2",
           "--threads", "1", "--model-name", "m", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no start"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.3)
    return proc, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def hf_client(tiny) -> Iterator[object]:
    proc, client = _serve(tiny)
    yield client
    _stop(proc)


@pytest.fixture(scope="module")
def bos_gguf(tiny_model, tmp_path_factory) -> Path:
    """The llama3 fixture (its vocabulary adds a BOS) as an f16 GGUF: llama-cpp-python lists echo log-probs right
    only when the prompt starts with a BOS (without one it pairs each token with the logits after it)."""
    pytest.importorskip("llama_cpp")
    from exporter import gguf, templates

    hf = tiny_model("llama3")
    return gguf.export(hf, ["f16"], templates.resolve(hf, None), tmp_path_factory.mktemp("bos")).files["f16"]


def _hf_logprobs(model: Path, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] log-softmax of transformers' logits after each token."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1).numpy()


def test_engine_prompt_logprobs_equal_transformers_batched(tiny) -> None:
    """Two prompts of different lengths in one left-padded batch: each prompt token's log-prob and top-2 as
    transformers gives them for that prompt alone; max_new_tokens 0 reads the prompt only."""
    from exporter.engine import LoadOptions, Sampling, load

    with load(LoadOptions(str(tiny), max_seqs=2)) as eng:
        prompts = [eng.encode_text(TEXT), eng.encode_text("Hello world")]
        scored = eng.generate(prompts, Sampling(max_new_tokens=0, prompt_logprobs=2))
        one = eng.generate(prompts, Sampling(max_new_tokens=1, prompt_logprobs=0))
        plain = eng.generate(prompts, Sampling(max_new_tokens=1))
    for ids, c, c1, p in zip(prompts, scored, one, plain, strict=True):
        ref = _hf_logprobs(tiny, ids)
        assert c.token_ids == [] and c.finish_reason == "length" and len(c.prompt_logprobs) == len(ids)
        assert c.prompt_logprobs[0] is None and [x.token for x in c.prompt_logprobs[1:]] == ids[1:]
        want = [ref[k - 1, ids[k]] for k in range(1, len(ids))]
        assert [x.logprob for x in c.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-4)
        for k, x in enumerate(c.prompt_logprobs[1:], 1):
            assert [t for t, _ in x.top] == list(np.argsort(-ref[k - 1], kind="stable")[:2])
        assert c1.token_ids == p.token_ids and len(c1.prompt_logprobs) == len(ids)  # scoring leaves the answer be


def test_engine_prompt_logprobs_equal_llama_cpp_chunked(bos_gguf) -> None:
    """gguf, the prompt fed in chunks of 8 tokens: the same log-probs as llama-cpp-python's create_completion (the
    code its server runs) with echo and logprobs, whose list leaves out the BOS."""
    import llama_cpp

    from exporter.engine import LoadOptions, Sampling, load

    with load(LoadOptions(str(bos_gguf), max_seqs=2, batch_tokens=8, ctx=256, threads=1)) as eng:
        ids = eng.encode_text(TEXT)
        assert len(ids) > 16 and ids[:1] == eng.backend.bos_prefix()
        c = eng.generate([ids], Sampling(max_new_tokens=1, prompt_logprobs=2))[0]
        mixed = eng.encode_text("Déjà vu: 中文 🙂, fin.")  # tokens holding parts of UTF-8 characters
        assert eng.text_offsets(mixed) == [len(eng.decode(mixed[:k], skip_special=False)) for k in range(len(mixed))]
    llm = llama_cpp.Llama(str(bos_gguf), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    theirs = llm.create_completion(TEXT, echo=True, logprobs=2, max_tokens=1, temperature=0)["choices"][0]["logprobs"]
    # theirs: the text's tokens (no BOS) and the answer's; the first text token's log-prob is null
    assert len(theirs["token_logprobs"]) == len(ids) - 1 + 1
    mine = [x.logprob for x in c.prompt_logprobs[2:]] + [None]
    assert mine[:-1] == pytest.approx(theirs["token_logprobs"][1:-1], abs=1e-3)


def test_echo_logprobs_equal_llama_cpp_server_code(bos_gguf) -> None:
    """Through `exporter serve`: text, tokens, text_offset, token_logprobs and top_logprobs of an echo request as
    llama-cpp-python's completion gives them (string prompt, BOS added by the server and not listed)."""
    import llama_cpp

    proc, client = _serve(bos_gguf, "--ctx", "256")
    try:
        mine = client.completions.create(model="m", prompt=TEXT, echo=True, logprobs=2, max_tokens=1, temperature=0)
        streamed = list(client.completions.create(model="m", prompt=TEXT, echo=True, logprobs=2, max_tokens=1,
                                                  temperature=0, stream=True))  # fmt: skip
    finally:
        _stop(proc)
    llm = llama_cpp.Llama(str(bos_gguf), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    theirs = llm.create_completion(TEXT, echo=True, logprobs=2, max_tokens=1, temperature=0)["choices"][0]
    a, x, y = mine.choices[0], mine.choices[0].logprobs, theirs["logprobs"]
    assert a.text == theirs["text"] and a.text.startswith(TEXT)
    assert x.tokens == y["tokens"] and x.text_offset == y["text_offset"]
    assert x.token_logprobs[0] is None and x.top_logprobs[0] is None
    assert x.token_logprobs[1:] == pytest.approx([float(v) for v in y["token_logprobs"][1:]], abs=1e-3)
    for got, want in zip(x.top_logprobs[1:], y["top_logprobs"][1:], strict=True):
        # a token holding part of a UTF-8 character: ours \\xNN (as chat logprobs, as OpenAI), theirs "" (dropped);
        # a special token: ours its text (as OpenAI's "<|endoftext|>"), theirs "" (dropped)
        got = {re.sub(r"\\x[0-9a-f]{2}", "", k): v for k, v in got.items()}
        if "" in want and "" not in got:
            got = {k: v for k, v in got.items() if not re.fullmatch(r"<\|[a-z_]+\|>", k)}
            want = {k: v for k, v in want.items() if k}
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=1e-3)
    # streamed: the echo (with the prompt's log-probs) first, then the answer's token
    assert "".join(c.choices[0].text for c in streamed) == a.text
    lps = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs is not None]
    assert [t for lp in lps for t in lp.tokens] == x.tokens
    assert [v for lp in lps for v in lp.token_logprobs][1:] == pytest.approx(x.token_logprobs[1:], abs=1e-6)


def test_token_id_prompts_score_as_transformers(tiny, hf_client) -> None:
    """lm-evaluation-harness's loglikelihood request (prompt: [[ids], [ids]], echo, logprobs 1, max_tokens 1):
    one choice per prompt, in order, listing exactly the ids sent (no BOS added) and one answer token; max_tokens
    0 scores the prompt alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in (TEXT, "Hello world")]
    r = hf_client.completions.create(model="m", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 2
    for ids, c in zip(prompts, r.choices, strict=True):
        ref = _hf_logprobs(tiny, ids)
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        want = [ref[k - 1, ids[k]] for k in range(1, len(ids))] + [ref[-1].max()]  # the answer: greedy
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        assert c.text.startswith(tok.decode(ids)) and lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
    r0 = hf_client.completions.create(model="m", prompt=prompts[0], echo=True, logprobs=0, max_tokens=0)
    c = r0.choices[0]
    assert c.text == TEXT and c.finish_reason == "length" and r0.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[1:] == pytest.approx(r.choices[0].logprobs.token_logprobs[1:-1], abs=1e-6)


def test_several_prompts_order_and_n(hf_client) -> None:
    """A list of prompts with n answers each: choice index = prompt index x n + answer (OpenAI, vLLM), each answer
    what that prompt alone gets, streamed or not; max_tokens 0 without echo is a 400."""
    prompts = ["Hello world", TEXT, "1 2 3"]
    alone = [hf_client.completions.create(model="m", prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]  # fmt: skip
    assert len(set(alone)) > 1
    r = hf_client.completions.create(model="m", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [a for a in alone for _ in range(2)]
    texts = [""] * 6
    for chunk in hf_client.completions.create(model="m", prompt=prompts, n=2, max_tokens=5, temperature=0,
                                              stream=True):  # fmt: skip
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [a for a in alone for _ in range(2)]
    for bad in ({"prompt": []}, {"prompt": ["a", ""]}, {"prompt": [[1, 2], []]}, {"max_tokens": 0}):
        with pytest.raises(openai.BadRequestError) as e:
            hf_client.completions.create(**{"model": "m", "prompt": "a", **bad})
        assert e.value.body["param"] in ("prompt", "max_tokens"), e.value.body


def test_lm_eval_local_completions_loglikelihood(tiny, hf_client) -> None:
    """lm-evaluation-harness's own `local-completions` model (its request builder and parser, batch of 2) scores
    context/continuation pairs as transformers does."""
    api = pytest.importorskip("lm_eval.models.openai_completions", reason="lm_eval (pip install lm_eval)")
    from lm_eval.api.instance import Instance

    lm = api.LocalCompletionsAPI(base_url=f"{hf_client.base_url}completions", model="m", tokenizer=str(tiny),
                                 tokenizer_backend="huggingface", batch_size=2, max_retries=1)  # fmt: skip
    pairs = [("The capital of France is", " Paris"), ("Hello", " world, and more"), ("1 2 3", " 4 5")]
    reqs = [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        ids = ctx_ids + cont_ids
        ref = _hf_logprobs(tiny, ids)
        want = sum(ref[k - 1, ids[k]] for k in range(len(ctx_ids), len(ids)))
        assert ll == pytest.approx(want, abs=1e-3)


def test_prompt_scoring_on_broken_weights_fails_that_request(tiny_model, tmp_path) -> None:
    """NaN logits while scoring a prompt fail that request with NonFiniteLogits (a server's 500 naming it), never
    a NaN log-prob (JSON has none); a clean prompt on the same engine is scored as before."""
    from engine_models import CLEAN, POISONED, nan_token_model

    from exporter.engine import LoadOptions, NonFiniteLogits, Sampling, load

    nan_token_model(tiny_model("llama3"), tmp_path / "hf")
    with load(LoadOptions(str(tmp_path / "hf"), max_seqs=2)) as eng:
        score = Sampling(max_new_tokens=0, prompt_logprobs=0)
        with pytest.raises(NonFiniteLogits, match="at prompt token"):
            eng.generate([eng.encode_text(POISONED)], score)
        (c,) = eng.generate([eng.encode_text(CLEAN[0])], score)
    assert all(np.isfinite(x.logprob) for x in c.prompt_logprobs[1:])
