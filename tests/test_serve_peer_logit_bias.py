"""OpenAI's `logit_bias` in the engine (what `exporter serve` passes on) against transformers: the hf backend's
greedy answer under a bias equals transformers' `generate` with the same bias as `sequence_bias` (its
SequenceBiasLogitsProcessor adds it to the logits); a bias outside -100..100 or a negative token id is an
EngineError naming it."""

from __future__ import annotations

import pytest

from exporter.engine import EngineError, LoadOptions, Sampling, load
from exporter.engine.sampling import check_sampling

pytestmark = pytest.mark.usefixtures("one_thread")

MESSAGES = [{"role": "user", "content": "Tell me about Paris"}]


def test_hf_greedy_under_logit_bias_equals_transformers_sequence_bias(tiny) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with load(LoadOptions(str(tiny), backend="hf", dtype="fp32", device="cpu", max_seqs=2)) as eng:
        ids = eng.encode_chat(MESSAGES)
        plain = eng.generate([ids], Sampling(max_new_tokens=6, ignore_eos=True))[0].token_ids
        top = plain[0]
        runners = [t for t in range(eng.vocab_size) if t not in plain][:2]
        answers = {}
        for bias in ({top: -100.0}, {runners[0]: 100.0}, {top: -3.0, runners[1]: 2.5}):
            got = eng.generate([ids], Sampling(max_new_tokens=6, ignore_eos=True,
                                               logit_bias=tuple(bias.items())))[0].token_ids  # fmt: skip
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 sequence_bias={(t,): b for t, b in bias.items()})  # fmt: skip
            assert got == out[0, len(ids) :].tolist(), bias
            answers[str(bias)] = got
    assert sum(a != plain for a in answers.values()) >= 2  # the biases changed the answer


@pytest.mark.parametrize(("bias", "words"), [(((5, 100.5),), "between -100 and 100"),
                                             (((5, float("nan")),), "between -100 and 100"),
                                             (((-1, 1.0),), "token ids must be integers >= 0")])  # fmt: skip
def test_out_of_range_logit_bias_is_an_engine_error(bias, words) -> None:
    with pytest.raises(EngineError, match=words):
        check_sampling(Sampling(logit_bias=bias))
