"""OpenAI's deprecated `functions` / `function_call` request parameters on /v1/chat/completions, through the real
`openai` client: the functions are the request's tools (the prompt is the one transformers renders with them as
`tools`), a call comes back in the legacy form OpenAI's API and the client's types define (`message.function_call`,
finish_reason "function_call"; streamed as `delta.function_call`), "none" renders no tools; both forms at once or a
malformed one is a 400 naming it. They were a 400 "unsupported parameter". (llama-cpp-python's server, the peer,
drops `functions` for a model's own Jinja template: it is no reference for the prompt here.)"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from engine_models import TOOLS

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tool_models may train its adapter

WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
FUNCTIONS = [t["function"] for t in TOOLS]


@pytest.fixture(scope="module")
def served(tool_models) -> Iterator[tuple[object, object]]:
    """(openai client of `exporter serve`'s app on the tool-calling GGUF, the model's transformers tokenizer)."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from exporter.engine import LoadOptions, load
    from exporter.serve import ServeOptions, create_app

    with load(LoadOptions(str(tool_models.gguf), max_seqs=2, ctx=1024, threads=1)) as eng:
        http = TestClient(create_app(eng, ServeOptions(eng.options, model_name="tuned")))
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)
        yield client, AutoTokenizer.from_pretrained(str(tool_models.merged))


def _prompt_tokens(tok, tools=None) -> int:
    text = tok.apply_chat_template(WEATHER, tools=tools, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("function_call", [None, "auto"])
def test_functions_answer_in_function_call(served, function_call) -> None:
    client, tok = served
    kw = dict(model="tuned", messages=WEATHER, functions=FUNCTIONS, temperature=0, max_tokens=40)
    if function_call is not None:
        kw["function_call"] = function_call
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert r.usage.prompt_tokens == _prompt_tokens(tok, TOOLS)  # the functions are rendered as tools
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None, choice
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}

    name, args, reasons = "", "", []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            assert c.delta.tool_calls is None and not c.delta.content, c
            if c.delta.function_call is not None:
                name += c.delta.function_call.name or ""
                args += c.delta.function_call.arguments or ""
            reasons.append(c.finish_reason)
    assert (name, json.loads(args)) == ("get_weather", {"city": "Paris"})
    assert [x for x in reasons if x] == ["function_call"]


def test_function_call_none_renders_no_functions(served) -> None:
    client, tok = served
    r = client.chat.completions.create(model="tuned", messages=WEATHER, functions=FUNCTIONS, function_call="none",
                                       temperature=0, max_tokens=40)  # fmt: skip
    assert r.usage.prompt_tokens == _prompt_tokens(tok)
    assert r.choices[0].message.function_call is None and r.choices[0].finish_reason != "function_call"


@pytest.mark.parametrize(
    "extra, param, words",
    [({"functions": FUNCTIONS, "tools": TOOLS}, "functions", "not both"),
     ({"functions": FUNCTIONS, "tool_choice": "auto"}, "functions", "not both"),
     ({"function_call": "auto"}, "function_call", "needs 'functions'"),
     ({"functions": {"name": "f"}}, "functions", "must be a list"),
     ({"functions": [{"description": "no name"}]}, "functions[0]", "'name' string"),
     ({"functions": [{"name": "f", "parameters": "x"}]}, "functions[0]", "JSON Schema"),
     ({"functions": FUNCTIONS, "function_call": "always"}, "function_call", "'none', 'auto' or {'name'"),
     ({"functions": FUNCTIONS, "function_call": {"name": "get_time"}}, "function_call", "no tool named 'get_time'")],
)  # fmt: skip
def test_malformed_legacy_functions_are_400s(served, extra, param, words) -> None:
    """One 400 naming the parameter and saying what is wrong (they were all "unsupported parameter")."""
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tuned", messages=WEATHER, max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
