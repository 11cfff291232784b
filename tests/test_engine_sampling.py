"""The engine's sampler against independent implementations on the same logits: the distribution a token is drawn
from equals what transformers' own `generate` logits processors leave (repetition penalty, temperature, top-k with
its ties, top-p, min-p, in the order `_get_logits_processor` builds them), and OpenAI's presence / frequency
penalties equal llama.cpp's penalties sampler (`llama_sampler_init_penalties`, as llama-cpp-python ships it)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from exporter.engine import EngineError, Sampling
from exporter.engine.sampling import Sampler, check_sampling

pytestmark = pytest.mark.usefixtures("one_thread")

# (temperature, top_k, top_p, min_p, repetition_penalty): LLaMA-Factory's chat defaults, each knob alone, together
GRID = [(0.95, 50, 0.7, 0.0, 1.0), (0.7, 50, 1.0, 0.0, 1.0), (1.0, 0, 0.9, 0.0, 1.0), (1.3, 0, 1.0, 0.1, 1.0),
        (0.8, 40, 0.95, 0.05, 1.3), (0.5, 10, 0.8, 0.2, 1.1), (1.0, 0, 1.0, 0.0, 1.2)]  # fmt: skip


def _bf16_logits(vocab: int, seed: int) -> np.ndarray:
    """Logits as a bf16 model gives them (float32 holding bf16 values): ties among the top tokens are common."""
    import torch

    x = np.random.default_rng(seed).normal(scale=3.0, size=vocab).astype(np.float32)
    return torch.tensor(x).to(torch.bfloat16).float().numpy()


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model("qwen2"))


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p", "penalty"), GRID)
def test_distribution_equals_transformers_logits_processors(hf_model, temperature, top_k, top_p, min_p, penalty):
    import torch
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p or None, repetition_penalty=penalty)  # fmt: skip
    processors = hf_model._get_logits_processor(cfg, input_ids_seq_length=8, device="cpu")
    vocab = hf_model.config.vocab_size
    for seed in range(3):
        logits = _bf16_logits(vocab, seed)
        seen = [int(i) for i in np.argsort(-logits)[[0, 2, 3, 7, 30]]] + [5, 9]  # top tokens: the penalty matters
        want = torch.softmax(processors(torch.tensor([seen]), torch.tensor(logits)[None].clone()), -1)[0].numpy()
        s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=penalty)
        sampler = Sampler(s, seen)
        cand, p = sampler.distribution(sampler.penalized(logits))
        got = np.zeros(vocab)
        got[cand] = p
        assert set(cand.tolist()) == set(np.flatnonzero(want).tolist()), (seed, len(cand), np.count_nonzero(want))
        np.testing.assert_allclose(got, want, atol=2e-6)


def _llama_cpp_penalized(logits: np.ndarray, answer: list[int], repeat: float, freq: float, present: float):
    """llama.cpp's penalties sampler applied to `logits` after it has accepted the `answer` tokens."""
    from conftest import require_llama_cpp

    L = require_llama_cpp()
    n = logits.shape[0]
    smpl = L.llama_sampler_init_penalties(n, 64, repeat, freq, present)
    try:
        for t in answer:
            L.llama_sampler_accept(smpl, t)
        data = (L.llama_token_data * n)()
        for i, v in enumerate(logits.tolist()):
            data[i].id, data[i].logit, data[i].p = i, v, 0.0
        arr = L.llama_token_data_array(data, n, -1, False)
        L.llama_sampler_apply(smpl, ctypes.byref(arr))
        out = np.empty(n, dtype=np.float32)
        for i in range(n):
            out[data[i].id] = data[i].logit
        return out
    finally:
        L.llama_sampler_free(smpl)


def _after(s: Sampling, answer: list[int], vocab: int) -> Sampler:
    """A sampler of `s` (no prompt) that has picked `answer`: each token forced by a one-hot row."""
    sampler = Sampler(s.replace(temperature=0.0), [])
    for t in answer:
        row = np.full(vocab, -100.0, dtype=np.float32)
        row[t] = 100.0
        assert sampler(row)[0] == t
    return sampler


@pytest.mark.parametrize(("freq", "present", "repeat"), [(0.7, 0.0, 1.0), (0.0, 1.1, 1.0), (1.5, -0.5, 1.0),
                                                         (-0.4, 0.6, 1.25), (2.0, 2.0, 1.0)])  # fmt: skip
def test_presence_and_frequency_penalties_equal_llama_cpp(freq: float, present: float, repeat: float) -> None:
    vocab = 3000
    logits = np.random.default_rng(1).normal(scale=4.0, size=vocab).astype(np.float32)
    answer = [5, 9, 5, 5, 12, 9, 3, 2999, 5]  # counts: 5 x4, 9 x2, the others once
    s = Sampling(frequency_penalty=freq, presence_penalty=present, repetition_penalty=repeat)
    got = _after(s, answer, vocab).penalized(logits)
    np.testing.assert_allclose(got, _llama_cpp_penalized(logits, answer, repeat, freq, present), rtol=0, atol=1e-6)
    untouched = np.setdiff1d(np.arange(vocab), answer)
    assert np.array_equal(got[untouched], logits[untouched])


def test_penalty_and_min_p_ranges_are_checked() -> None:
    """OpenAI's range for presence/frequency penalties (-2 to 2), min_p in [0, 1]; one error naming the field."""
    check_sampling(Sampling(presence_penalty=-2.0, frequency_penalty=2.0, min_p=1.0))
    for kw, name in (({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
                     ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"min_p": 1.5}, "min_p"),
                     ({"min_p": -0.1}, "min_p")):  # fmt: skip
        with pytest.raises(EngineError, match=name):
            check_sampling(Sampling(**kw))
