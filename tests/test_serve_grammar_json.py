"""Constrained decoding on `exporter serve`: OpenAI's `response_format` (json_object, json_schema) and a forced tool
call (`tool_choice` "required" or named, the legacy `function_call: {"name": ...}`), by llama.cpp's grammar engine
over the GGUF's vocabulary (they were a 400 "no constrained decoding").

References: llama-cpp-python's own generation (`Llama.generate(..., temp=0, grammar=...)`, its server's path for
response_format) on the same GGUF gives the same greedy tokens under the same grammar; every answer of a random
tiny model, sampled or greedy, streamed or whole, parses with Python's json and satisfies the schema (types,
required keys, enums, no extra keys), checked explicitly; max_tokens cuts it with finish_reason "length" as OpenAI's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
llama_cpp = pytest.importorskip("llama_cpp")

from exporter.engine import LoadOptions, Sampling, load  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

USER = [{"role": "user", "content": "Describe a thing as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["colour", "count", "ok", "name", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"]}}},
]  # fmt: skip


def follows(value: Any, schema: dict[str, Any]) -> bool:
    """`value` satisfies `schema` (the keywords used here: type, enum, const, properties, required,
    additionalProperties, items, maxLength, maxItems)."""
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict) or not set(schema.get("required", ())) <= set(value):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and not set(value) <= set(props):
            return False
        return all(follows(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(follows(v, schema.get("items", {})) for v in value))  # fmt: skip
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return True


@pytest.fixture(scope="module")
def served(tiny_gguf) -> Iterator[tuple[Any, Any, Any]]:
    """(engine, openai client, raw http client) of `exporter serve`'s app on the qwen2 fixture GGUF."""
    from fastapi.testclient import TestClient

    from exporter.serve import ServeOptions, create_app

    with load(LoadOptions(str(tiny_gguf), max_seqs=2, ctx=2048, threads=1)) as eng:
        http = TestClient(create_app(eng, ServeOptions(eng.options, model_name="tiny")))
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)
        yield eng, client, http


def _llama_cpp_greedy(path: str, prompt: list[int], gbnf: str, stops: frozenset[int], n: int) -> list[int]:
    """llama-cpp-python's own greedy tokens under `gbnf` (its sampler chain: grammar, then greedy), up to a stop."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, verbose=False)
    out = []
    for t in llm.generate(prompt, temp=0.0, grammar=llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)):
        out.append(t)
        if t in stops or len(out) >= n:
            break
    return out


@pytest.mark.parametrize("schema", [None, SCHEMA], ids=["json_object", "json_schema"])
def test_greedy_under_a_grammar_equals_llama_cpp_python(served, tiny_gguf, schema) -> None:
    from exporter.engine.grammar import json_grammar

    eng, _, _ = served
    ids = eng.encode_chat(USER)
    gbnf = json_grammar(schema)
    ours = eng.generate([ids], Sampling(max_new_tokens=150, grammar=gbnf))[0]
    assert ours.token_ids == _llama_cpp_greedy(str(tiny_gguf), ids, gbnf, eng.stop_ids, 150)
    plain = eng.generate([ids], Sampling(max_new_tokens=60))[0]
    assert plain.token_ids[:5] != ours.token_ids[:5]  # the grammar changed what this random model says
    if schema is not None:
        assert ours.finish_reason == "stop" and follows(json.loads(ours.text), schema), ours.text


def test_response_format_json_schema_through_the_openai_client(served) -> None:
    """Greedy and sampled (n=3, seeds), whole and streamed: every answer parses and follows the schema."""
    _, client, _ = served
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=USER, response_format=rf, max_tokens=300, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert follows(json.loads(r.choices[0].message.content), SCHEMA), r.choices[0].message.content
    stream = client.chat.completions.create(model="tiny", messages=USER, response_format=rf, max_tokens=300,
                                            temperature=0, stream=True)  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == r.choices[0].message.content
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    r = client.chat.completions.create(model="tiny", messages=USER, response_format=rf, max_tokens=300,
                                       temperature=1.5, n=3, seed=7)  # fmt: skip
    assert not any("\ufffd" in c.message.content for c in r.choices)  # no broken UTF-8 character
    answers = [json.loads(c.message.content) for c in r.choices]
    assert all(follows(a, SCHEMA) for a in answers), answers
    assert len({json.dumps(a) for a in answers}) > 1  # really sampled


def test_response_format_json_object_and_length(served) -> None:
    """json_object: a JSON object (a stream too); max_tokens cuts it with finish_reason "length", as OpenAI's."""
    _, client, _ = served
    for seed in (1, 2):
        r = client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"},
                                           max_tokens=400, temperature=1.0, seed=seed)  # fmt: skip
        c = r.choices[0]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict), c.message.content
        else:  # the random model wrote a long string: what it wrote is still the start of a JSON object
            assert c.finish_reason == "length" and c.message.content.startswith("{"), c
    r = client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"},
                                       max_tokens=3, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    # llama-cpp-python's server reads a schema given with json_object (its `response_format.schema`)
    r = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=300,
        temperature=0,
        response_format={"type": "json_object", "schema": SCHEMA},
    )  # type: ignore
    assert follows(json.loads(r.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize(
    "choice, names",
    [("required", {"get_weather", "get_time"}),
     ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})],
)  # fmt: skip
def test_forced_tool_call_is_a_parsed_call_of_the_schema(served, choice, names) -> None:
    _, client, _ = served
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for stream in (False, True):
        for seed in (0, 1, 2):
            kw = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=300, temperature=1.0,
                      seed=seed)  # fmt: skip
            if stream:
                name, args, reasons = "", "", []
                for ch in client.chat.completions.create(stream=True, **kw):
                    for c in ch.choices:
                        for call in c.delta.tool_calls or []:
                            name += call.function.name or ""
                            args += call.function.arguments or ""
                        reasons.append(c.finish_reason)
                assert [x for x in reasons if x] == ["tool_calls"]
            else:
                r = client.chat.completions.create(**kw)
                assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
                (call,) = r.choices[0].message.tool_calls
                name, args = call.function.name, call.function.arguments
            assert name in names and follows(json.loads(args), by_name[name]), (name, args)


def test_legacy_function_call_by_name(served) -> None:
    _, client, _ = served
    functions = [t["function"] for t in TOOLS]
    r = client.chat.completions.create(model="tiny", messages=USER, functions=functions, temperature=0,
                                       function_call={"name": "get_weather"}, max_tokens=300)  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "function_call" and c.message.function_call.name == "get_weather"
    assert follows(json.loads(c.message.function_call.arguments), TOOLS[0]["function"]["parameters"])


@pytest.mark.parametrize(
    "extra, param, words",
    [({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
     ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "Missing required"),
     ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
      "response_format.json_schema.name", "Missing required"),
     ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
      "response_format.json_schema.schema", "JSON Schema object"),
     ({"response_format": {"type": "json_object", "schema": {"$ref": "#/nowhere"}}}, "response_format.schema",
      "cannot turn the JSON schema into a grammar"),
     ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
     ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
      "no tool named 'nope'"),
     ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "'required'")],
)  # fmt: skip
def test_malformed_constraints_are_400s(served, extra, param, words) -> None:
    _, _, http = served
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err


def test_a_string_never_holds_a_raw_control_character(served) -> None:
    """llama.cpp's JSON string character excludes U+0000-U+001F (a raw newline is no JSON); llama-cpp-python's
    converter port lets them in, ours gives llama.cpp's rule."""
    import numpy as np
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from exporter.engine.grammar import json_grammar

    eng, _, _ = served
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    newline = [t for t in range(eng.vocab_size) if b"\n" in eng.token_bytes(t) and t not in eng.stop_ids]
    assert newline
    zeros = np.zeros(eng.vocab_size, dtype=np.float32)
    allowed = {}
    for name, gbnf in (("ours", json_grammar(schema)), ("port", json_schema_to_gbnf(json.dumps(schema)))):
        g = eng.backend.grammar(gbnf, eng.stop_ids)
        try:
            for t in eng.tokenize('{"s":"a'):
                g.mask(zeros)
                g.accept(t)
            allowed[name] = bool(np.isfinite(g.mask(zeros))[newline].any())
        finally:
            g.close()
    assert allowed == {"ours": False, "port": True}


@pytest.mark.parametrize("lead, bad, good", [(b"\xed", b"\xa0", b"\x80"), (b"\xf4", b"\x90", b"\x80")])
def test_no_token_breaks_a_utf8_character(served, lead, bad, good) -> None:
    """llama.cpp's grammar decodes UTF-8 loosely: after ED it takes A0 (a surrogate, U+D800), after F4 90 (past
    U+10FFFF), and a lead byte F5, which Python's decoder (and any JSON reader) rejects, so the text held U+FFFD;
    with the vocabulary's UTF-8 table only a continuation that makes a real character follows, and no lead byte
    that none can."""
    import numpy as np

    from exporter.engine.grammar import json_grammar

    eng, _, _ = served
    byte = {eng.token_bytes(t): t for t in range(eng.vocab_size) if len(eng.token_bytes(t)) == 1}
    assert {lead, bad, good, b"\xf5"} <= set(byte)
    zeros = np.zeros(eng.vocab_size, dtype=np.float32)
    seen = {}
    for name in ("grammar alone", "with utf8"):
        g = eng.backend.grammar(json_grammar(None), eng.stop_ids)
        if name == "grammar alone":
            g.utf8 = None
        try:
            for t in eng.tokenize('{"s": "a'):
                g.mask(zeros)
                g.accept(t)
            first = np.isfinite(g.mask(zeros))
            g.accept(byte[lead])
            then = np.isfinite(g.mask(zeros))
            seen[name] = (bool(first[byte[b"\xf5"]]), bool(then[byte[bad]]), bool(then[byte[good]]))
        finally:
            g.close()
    assert seen == {"grammar alone": (True, True, True), "with utf8": (False, False, True)}
    text = b"".join(eng.token_bytes(t) for t in (byte[lead], byte[bad], byte[bad]))
    assert "\ufffd" in text.decode("utf-8", errors="replace")  # what the grammar alone let through


def test_tool_call_grammar_in_the_hermes_shape(served) -> None:
    """Only `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` of a listed function gets through."""
    import numpy as np

    from exporter.engine.grammar import tool_call_grammar

    eng, _, _ = served
    gbnf = tool_call_grammar([t["function"] for t in TOOLS], "hermes")
    text = '<tool_call>\n{"name": "get_time", "arguments": {"zone": 3}}\n</tool_call>'
    for wrong in ('<tool_call>\n{"name": "other"', '<tool_call>\n{"arguments"', "Sure"):
        g = eng.backend.grammar(gbnf, eng.stop_ids)
        try:
            ok = True
            for t in eng.tokenize(wrong):
                allowed = np.isfinite(g.mask(np.zeros(eng.vocab_size, dtype=np.float32)))
                if not allowed[t]:
                    ok = False
                    break
                g.accept(t)
            assert not ok, wrong
        finally:
            g.close()
    g = eng.backend.grammar(gbnf, eng.stop_ids)
    try:
        for t in eng.tokenize(text):
            assert np.isfinite(g.mask(np.zeros(eng.vocab_size, dtype=np.float32)))[t]
            g.accept(t)
        end = np.isfinite(g.mask(np.zeros(eng.vocab_size, dtype=np.float32)))
        assert set(np.flatnonzero(end)) <= set(eng.stop_ids) and end.any()  # complete: only a stop may follow
    finally:
        g.close()


def test_hf_backend_answers_a_400_naming_what_works(tiny) -> None:
    """The hf backend has no grammar engine: a constrained request is a 400 naming the backend and the GGUF route,
    never an unconstrained answer."""
    from fastapi.testclient import TestClient

    from exporter.serve import ServeOptions, create_app

    with load(LoadOptions(str(tiny), backend="hf", dtype="fp32", device="cpu", max_seqs=1)) as eng:
        http = TestClient(create_app(eng, ServeOptions(eng.options, model_name="tiny")))
        for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                             ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice")):  # fmt: skip
            r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param, err
            assert "hf backend" in err["message"] and "GGUF" in err["message"], err
        plain = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2,
                                                        "response_format": {"type": "text"}})  # fmt: skip
        assert plain.status_code == 200


def test_llama_cpp_python_grammar_field_on_both_endpoints(served, tiny_gguf) -> None:
    """llama-cpp-python's server field `grammar` (GBNF): /v1/completions' greedy text equals its
    `Llama.create_completion(grammar=...)`; a chat answer follows it too; an unparsable grammar, or one beside a
    response_format, is a 400 naming `grammar` (it was "unsupported parameter")."""
    _, _, http = served
    gbnf = 'root ::= ("yes" | "no" | "maybe") " " [0-9] [0-9]'
    body = {"prompt": "Is it raining?", "max_tokens": 12, "temperature": 0, "grammar": gbnf}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.json()
    text = r.json()["choices"][0]["text"]
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=512, verbose=False)
    ref = llm.create_completion("Is it raining?", max_tokens=12, temperature=0,
                                grammar=llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False))  # fmt: skip
    assert text == ref["choices"][0]["text"]
    assert text.split(" ")[0] in ("yes", "no", "maybe") and len(text.split(" ")[1]) == 2, text
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 12, "temperature": 1.0, "seed": 3,
                                                "grammar": gbnf})  # fmt: skip
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer.split(" ")[0] in ("yes", "no", "maybe") and r.json()["choices"][0]["finish_reason"] == "stop"
    for extra, words in (({"grammar": "root ::= nowhere"}, "cannot parse"), ({"grammar": 7}, "GBNF"),
                         ({"grammar": gbnf, "response_format": {"type": "json_object"}}, "not both")):  # fmt: skip
        for path, base in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "x"})):
            if path == "/v1/completions" and "response_format" in extra:
                continue
            r = http.post(path, json={**base, "max_tokens": 2, **extra})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "grammar" and words in err["message"], err
