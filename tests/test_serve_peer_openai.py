"""`exporter serve` side by side with llama-cpp-python's own server (`python -m llama_cpp.server`, the peer) on the
same GGUF, through the real `openai` client: OpenAI's `logit_bias` on /v1/chat/completions and /v1/completions
changes the greedy answer exactly as the peer's does (it was a 400); a malformed one is a 400 naming it. Skips
where llama-cpp-python's server extra (sse-starlette, starlette-context, pydantic-settings) is not installed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve_completions import side_by_side

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")

MESSAGES = [{"role": "user", "content": "Tell me about Paris"}]
PROMPT = "The capital of France is"
# token ids of the qwen2 fixture's vocabulary: "\n" (its greedy chat answer), " is" (its greedy completion), and
# one it never picks unbiased
NEWLINE, IS, OTHER = 198, 353, 374


@pytest.fixture(scope="module")
def clients(tiny_gguf: Path) -> Iterator[tuple[object, object]]:
    """openai clients of ours and of llama-cpp-python's server, both on the session's tiny GGUF."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server extra")
    with side_by_side(tiny_gguf) as both:
        yield both


def _chat(client, stream: bool, **kw) -> str:
    kw = dict(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=6, temperature=0, **kw)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))


def _text(client, stream: bool, **kw) -> str:
    kw = dict(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=6, temperature=0, **kw)
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_steers_greedy_answers_as_llama_cpp_servers(clients, stream: bool) -> None:
    """+100 forces a token, a small bias that does not overturn the top token changes nothing, -100 on the answer's
    token makes the next best win: the same greedy text as the peer, chat and completions, streamed or not."""
    ours, ref = clients
    plain = _chat(ours, stream), _text(ours, stream)
    assert plain == ("\n" * 6, " is" * 6)  # the fixture's unbiased answers: the biases below must change them
    cases = [
        ("chat", _chat, {str(OTHER): 100}),
        ("chat", _chat, {str(OTHER): 3, str(NEWLINE): -2.5}),
        ("text", _text, {str(OTHER): 100.0}),
        ("text", _text, {str(IS): -100}),
        ("text", _text, {str(IS): -1}),
    ]
    changed = 0
    for what, ask, bias in cases:
        got, want = ask(ours, stream, logit_bias=bias), ask(ref, stream, logit_bias=bias)
        assert got == want, (what, bias, got, want)
        changed += got not in plain
    assert changed == 3  # +100 twice and -100: the bias did something


def test_malformed_logit_bias_is_a_400_naming_it(clients) -> None:
    """A well-formed logit_bias (the extremes included) is answered; a key that is no token id of the model, or a
    bias outside OpenAI's -100..100, is a 400 with param 'logit_bias' saying what it expected (llama-cpp-python's
    server answers a non-numeric key with a 500 and takes any bias)."""
    ours, _ = clients
    name = ours.models.list().data[0].id
    for ask, kw in (
        (ours.chat.completions.create, {"messages": MESSAGES}),
        (ours.completions.create, {"prompt": PROMPT}),
    ):
        assert ask(model=name, max_tokens=2, logit_bias={"0": -100, "5": 100.0, "917": 0.5}, **kw).choices
        for bias, words in (({"abc": 1}, "token id"), ({"-1": 1}, "token id"), ({"99999999": 1}, "token id"),
                            ({"5": 101}, "-100 to 100"), ({"5": "x"}, "-100 to 100"), ({"5": True}, "-100 to 100"),
                            (["5"], "an object")):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as e:
                ask(model=name, max_tokens=2, logit_bias=bias, **kw)
            assert e.value.body["param"] == "logit_bias" and words in e.value.body["message"], (bias, e.value.body)
