"""The engine under bad values and faults: seeds of any integer, an exception while serving one request, a worker
that dies, a GGUF context smaller than llama.cpp's batch, the waiting-queue bound, a device this machine lacks, and
token bytes that are part of a UTF-8 character."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import require_llama_cpp

from exporter.engine import EngineClosed, EngineError, LoadOptions, QueueFull, Sampling, load
from exporter.engine.sampling import Sampler
from exporter.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
WAIT = 120  # seconds a request may take before the test calls it hung


def _answer(eng, prompt: list[int], sampling: Sampling) -> list:
    """What one submitted request's sink receives, up to its last event (never waits forever)."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    eng.submit(prompt, sampling, q.put)
    got = []
    while not got or not (isinstance(got[-1], BaseException) or got[-1].finish_reason):
        got.append(q.get(timeout=WAIT))
    return got


def _ids(got: list) -> list[int]:
    return [t for d in got for t in d.token_ids]


def test_any_integer_seed_samples_and_minus_one_is_random(tiny_gguf: Path) -> None:
    """-1 draws a fresh seed (llama.cpp's convention); other negative and huge seeds are repeatable; none of them
    stops the worker (a negative seed used to kill it: every later request hung)."""
    s = Sampling(max_new_tokens=8, temperature=1.5, ignore_eos=True)
    with load(LoadOptions(str(tiny_gguf), max_seqs=2)) as eng:
        p = eng.encode_chat([{"role": "user", "content": "hi"}])
        for seed in (-5, 2**70, -(2**63)):
            a, b = _answer(eng, p, s.replace(seed=seed)), _answer(eng, p, s.replace(seed=seed))
            assert a[-1].finish_reason == "length" and _ids(a) == _ids(b), seed
        assert _answer(eng, p, s.replace(seed=-1))[-1].finish_reason == "length"
        assert _answer(eng, p, Sampling(max_new_tokens=4))[-1].finish_reason in ("stop", "length")
        with pytest.raises(EngineError, match="seed must be an integer"):
            eng.generate([p], s.replace(seed=1.5))
    flat = np.zeros(1000, dtype=np.float32)
    draws = {seed: [Sampler(Sampling(temperature=1.0, seed=seed), [])(flat)[0] for _ in range(5)] for seed in (-1, -5)}
    assert len(set(draws[-1])) > 1 and len(set(draws[-5])) == 1


def test_an_exception_serving_one_request_fails_it_only(tiny_gguf: Path, monkeypatch) -> None:
    """A request whose sampler cannot be built, or whose sampling step raises, gets an EngineError naming the cause;
    the requests beside it answer as they do alone, and the engine goes on."""
    from exporter.engine import sampling, scheduler

    real = sampling.Sampler

    class Picky(real):
        def __init__(self, s: Sampling, prompt, constraint=None) -> None:
            if s.seed == 13:
                raise ValueError("unlucky seed")
            super().__init__(s, prompt, constraint)

        def __call__(self, logits):
            if self.s.seed == 14 and self.n == 2:
                raise RuntimeError("boom at token 3")
            return super().__call__(logits)

    monkeypatch.setattr(scheduler, "Sampler", Picky)
    greedy = Sampling(max_new_tokens=6, ignore_eos=True)
    with load(LoadOptions(str(tiny_gguf), max_seqs=4)) as eng:
        p = eng.encode_chat([{"role": "user", "content": "hi"}])
        alone = _ids(_answer(eng, p, greedy))
        q: queue.SimpleQueue = queue.SimpleQueue()
        for i, s in enumerate((greedy, greedy.replace(seed=13), greedy.replace(seed=14), greedy)):
            eng.submit(p, s, lambda d, i=i: q.put((i, d)))
        got: list[list] = [[], [], [], []]
        while not all(g and (isinstance(g[-1], BaseException) or g[-1].finish_reason) for g in got):
            i, d = q.get(timeout=WAIT)
            got[i].append(d)
        assert "ValueError: unlucky seed" in str(got[1][-1]) and isinstance(got[1][-1], EngineError)
        assert "RuntimeError: boom at token 3" in str(got[2][-1]) and len(_ids(got[2][:-1])) == 2
        assert _ids(got[0]) == _ids(got[3]) == alone
        assert _ids(_answer(eng, p, greedy)) == alone and eng.error is None and eng.load() == (0, 0)


def test_a_dead_worker_fails_every_request_and_says_why(tiny_gguf: Path) -> None:
    """Should the worker thread itself die, the waiting requests and every later one get EngineClosed naming the
    cause, and `error` says it (a server's /health and 503), instead of requests that hang forever."""
    with load(LoadOptions(str(tiny_gguf), max_seqs=1)) as eng:
        p = eng.encode_chat([{"role": "user", "content": "hi"}])
        assert eng.error is None

        def broken() -> list:
            raise RuntimeError("worker bug")

        eng._sched._feeds = broken
        got = _answer(eng, p, Sampling(max_new_tokens=4))
        assert isinstance(got[-1], EngineClosed) and "worker bug" in str(got[-1])
        assert "RuntimeError: worker bug" in (eng.error or "")
        with pytest.raises(EngineClosed, match="worker bug"):
            eng.submit(p, Sampling(), lambda d: None)


def test_gguf_context_smaller_than_the_batch_never_aborts(tiny_gguf: Path) -> None:
    """--ctx 64: llama.cpp holds 256 cells but takes at most 64 tokens a batch; a longer prompt used to pass the
    length check and abort the process (GGML_ASSERT n_tokens_all <= n_batch). Now the context is the one asked for,
    a prompt longer than it is an EngineError saying so, and prompts that fit are fed in batches llama.cpp takes.
    Run in a child process: the old failure kills the interpreter."""
    code = textwrap.dedent(f"""
        import llama_cpp
        from exporter.engine import EngineError, LoadOptions, Sampling, load
        for max_seqs in (1, 3):
            with load(LoadOptions({str(tiny_gguf)!r}, ctx=64, max_seqs=max_seqs, batch_tokens=512)) as eng:
                b = eng.backend
                assert eng.n_ctx == 64 and b.batch_tokens <= llama_cpp.llama_n_batch(b.ctx), (eng.n_ctx, b.batch_tokens)
                long = eng.tokenize(" one two three four five six seven eight nine ten" * 10)[:100]
                try:
                    eng.generate([long], Sampling(max_new_tokens=4))
                    raise SystemExit("a 100-token prompt ran in a 64-token context")
                except EngineError as e:
                    assert str(e) == "the prompt is 100 tokens; the context holds 64", e
                outs = eng.generate([long[:60]] * max_seqs, Sampling(max_new_tokens=4, ignore_eos=True))
                assert all(len(c.token_ids) == 4 for c in outs)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])


def test_max_waiting_zero_queues_nothing_and_negative_is_refused(tiny_gguf: Path) -> None:
    """max_waiting 0: a request runs when a slot is free (it used to get QueueFull even when idle), else QueueFull;
    a negative bound is a UserError at load."""
    with pytest.raises(UserError, match="max_waiting must be >= 0"):
        load(LoadOptions(str(tiny_gguf), max_waiting=-1))
    with load(LoadOptions(str(tiny_gguf), max_seqs=1, max_waiting=0)) as eng:
        p = eng.encode_chat([{"role": "user", "content": "hi"}])
        assert _answer(eng, p, Sampling(max_new_tokens=2))[-1].finish_reason in ("stop", "length")
        q: queue.SimpleQueue = queue.SimpleQueue()
        running = eng.submit(p, Sampling(max_new_tokens=10_000, ignore_eos=True), q.put)
        q.get(timeout=WAIT)  # it decodes: the only slot is taken
        with pytest.raises(QueueFull):
            eng.submit(p, Sampling(max_new_tokens=2), lambda d: None)
        running.cancel()
        while not getattr(q.get(timeout=WAIT), "finish_reason", None):
            pass
        assert _answer(eng, p, Sampling(max_new_tokens=2))[-1].finish_reason in ("stop", "length")


def test_a_device_this_machine_lacks_is_one_line(tiny_model) -> None:
    """--device cuda:7 on a machine without it: UserError naming --device and the devices there are (it was
    torch's 'Torch not compiled with CUDA enabled' traceback)."""
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    for device in ("cuda:7", "nonsense"):
        with pytest.raises(UserError, match=rf"--device '{device}': not available here \(this machine has: cpu"):
            load(LoadOptions(str(tiny_model("qwen2")), device=device))


@pytest.mark.parametrize("backend", ["hf", "gguf"])
def test_token_bytes_are_the_tokens_own_bytes(tiny_model, tmp_path_factory, backend: str) -> None:
    """A token holding part of a UTF-8 character decodes to U+FFFD; `token_bytes` gives its real bytes, so the
    tokens' bytes add up to the text (OpenAI's logprobs `bytes`). Real Qwen2 vocabulary."""
    hf = tiny_model("qwen2", real_vocab=True)
    model = str(hf)
    if backend == "gguf":
        require_llama_cpp()
        from exporter import gguf, templates

        model = str(
            gguf.export(hf, ["f16"], templates.resolve(hf, None), tmp_path_factory.mktemp("bytes")).files["f16"]
        )
    text = "naïve 😀 你好，世界 龘 𓀀 🦜"
    with load(LoadOptions(model, max_seqs=1)) as eng:
        ids = eng.tokenize(text)
        partial = [t for t in ids if "\ufffd" in eng.decode([t], skip_special=False)]
        assert partial, "no token of the text holds part of a character: the test shows nothing"
        assert all(eng.token_bytes(t) != "\ufffd".encode() for t in partial)
        assert b"".join(eng.token_bytes(t) for t in ids) == text.encode()


@pytest.mark.parametrize("family", ["llama3", "llama2", "qwen2"])
def test_gguf_decode_keeps_the_text_hf_decodes(tiny_model, tmp_path_factory, family: str) -> None:
    """A GGUF's answer text equals the HF tokenizer's decode of the same ids, spaces before punctuation included:
    `llama_detokenize` cleaned them on Llama 3's vocabulary (`x != 0 .` -> `x!= 0.`, `it 's` -> `it's`), so
    predict, chat and serve changed the model's words. Real vocabularies: byte-level BPE and SentencePiece."""
    require_llama_cpp()
    from exporter import gguf, templates

    hf = tiny_model(family, real_vocab=True)
    path = gguf.export(hf, ["f16"], templates.resolve(hf, None), tmp_path_factory.mktemp(f"dec-{family}")).files["f16"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    texts = ["if x != 0 . Bonjour !", "it 's a ' quoted ' word , no ?", "Hello world", " two  spaces . end",
             "naïve 你好 , 世界 !", "a\n. b"]  # fmt: skip
    with load(LoadOptions(str(path), max_seqs=1)) as eng:
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            want = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert eng.decode(ids) == want, (family, text)
            assert eng.decode(ids, skip_special=False) == want, (family, text)
