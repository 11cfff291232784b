"""`exporter serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) on the engine.

GET /v1/models, POST /v1/chat/completions (JSON or SSE streaming; tools with parsed tool_calls where the chat
template has a tool format, and OpenAI's deprecated functions / function_call, answered in function_call; stop,
max_tokens / max_completion_tokens, temperature, top_p, top_k, min_p, repetition / presence / frequency penalties,
logit_bias, seed, n, logprobs; response_format json_object / json_schema, tool_choice "required" or a named
function, and llama-cpp-python's `grammar`, decoded under llama.cpp's grammar sampler on the gguf backend; usage;
finish_reason stop / length / tool_calls / function_call), POST
/v1/completions (raw prompts, as llama-cpp-python's server and OpenAI's legacy API: a string, token ids or a list
of either, echo, logprobs, the prompt's own log-probs with echo + logprobs and max_tokens 0 or more, as
lm-evaluation-harness's local-completions asks, stop, logit_bias, grammar, stream).
Errors have OpenAI's shape: 401 bad key, 400 malformed or unsupported parameter (named), 404 unknown model, 429
queue full, 503 engine closed. Requests run concurrently on
the engine's continuous batching; a client that goes away frees its slot at the next step. Any origin may call it
from a browser (CORS, as llama-cpp-python's server and LLaMA-Factory's API); a silent stream gets `: ping` comments.

Stopping: the first SIGINT or SIGTERM says so in one line, stops accepting, and ends every open request at once with
OpenAI's 503 (a stream: its error event), cancelling its engine requests; the process then exits 130 / 143, as
the other verbs do. A second signal exits at once.
"""

import asyncio
import contextlib
import json
import math
import os
import secrets
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from exporter.engine import (
    Completion,
    ContextOverflow,
    Delta,
    Engine,
    EngineClosed,
    EngineError,
    LoadOptions,
    QueueFull,
    Sampling,
    collect,
    normalize_messages,
    parse_tool_calls,
)
from exporter.engine.chat_format import PYTHON_TAG, ToolFormat
from exporter.engine.grammar import TOOL_CALL_SHAPES, json_grammar, tool_call_grammar
from exporter.engine.sampling import LOGIT_BIAS, PENALTY_RANGE, seed_of_choice
from exporter.errors import UserError

# Parameters of POST /v1/chat/completions: the ones we honour, and the ones accepted only at their neutral value.
SUPPORTED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "n", "stop", "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs", "user",
    "top_k", "repetition_penalty", "skip_special_tokens", "ignore_eos", "presence_penalty", "frequency_penalty",
    "min_p", "do_sample", "logit_bias", "functions", "function_call", "response_format", "grammar",
}  # fmt: skip
NEUTRAL: dict[str, Any] = {}
# ... and of POST /v1/completions (llama-cpp-python's server serves it too)
COMPLETION_SUPPORTED = {
    "model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "echo",
    "logprobs", "user", "top_k", "repetition_penalty", "skip_special_tokens", "ignore_eos", "presence_penalty",
    "frequency_penalty", "min_p", "logit_bias", "grammar",
}  # fmt: skip
COMPLETION_NEUTRAL = {"suffix": None, "best_of": 1}
MAX_N = 16
# a stream is not cached, and a proxy passes each event on as it comes (nginx buffers a response unless told so),
# as llama-cpp-python's server (sse-starlette) says
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
PING_S = 15.0  # sse-starlette's interval: under the 60 s a proxy (nginx) waits for a silent upstream by default
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's range for `seed`


@dataclass
class ServeOptions:
    """What `exporter serve` runs: the model, where to listen, the key, the served name and request defaults."""

    load: LoadOptions
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    default_system: str | None = None
    sampling: Sampling = field(default_factory=lambda: Sampling(max_new_tokens=1024))


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _number(
    body: dict[str, Any], key: str, kind: type, lo: float | None = None, hi: float | None = None, above: bool = False
) -> Any:
    """body[key] (None when absent or null) checked to be an int (`kind` int) or a finite number in [lo, hi]
    (`above`: greater than lo); else a 400 naming the key."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", param=key)
    if not math.isfinite(v) or (lo is not None and (v <= lo if above else v < lo)) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            want = f"in ({lo}, {hi}]" if above else f"between {lo} and {hi}"
        else:
            want = f"{'>' if above else '>='} {lo}" if lo is not None else f"<= {hi}"
        raise ApiError(400, f"'{key}' must be {want}, got {v}", param=key)
    return v


def _typed(body: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """body[key] (None when absent or null) checked to be a `kind`; else a 400 naming the key and `what`."""
    v = body.get(key)
    if v is not None and not isinstance(v, kind):
        raise ApiError(400, f"'{key}' must be {what}, got {json.dumps(v)[:80]}", param=key)
    return v


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """The request's `tools` (None when absent or empty); 400 naming the first malformed entry."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of {'type': 'function', 'function': {...}}", param="tools")
    for k, t in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ApiError(400, f"{where}: expected {{'type': 'function', 'function': {{...}}}}", param=where)
        _check_function(t.get("function"), f"{where}.function")
    return tools


def _check_function(fn: Any, where: str) -> None:
    """A tool's function object ({name, description?, parameters?}); 400 naming `where` when malformed."""
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ApiError(400, f"{where}: expected an object with a 'name' string", param=where)
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ApiError(400, f"{where}.description must be a string", param=where)
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise ApiError(400, f"{where}.parameters must be a JSON Schema object", param=where)


def _legacy_functions(body: dict[str, Any]) -> tuple[Any, Any, bool]:
    """(tools, tool_choice, legacy) of the request: OpenAI's deprecated `functions` / `function_call` mapped to
    `tools` / `tool_choice` as OpenAI documents them (each function is a tool's function; "none", "auto" or
    {"name": ...}), legacy True when they were given (the answer then calls in `function_call`, as OpenAI's legacy
    API answers). 400 when both forms are given or one is malformed."""
    functions, call = body.get("functions"), body.get("function_call")
    if functions is None and call is None:
        return body.get("tools"), body.get("tool_choice"), False
    key = "functions" if functions is not None else "function_call"
    if body.get("tools") is not None or body.get("tool_choice") is not None:
        raise ApiError(400, "give 'tools' / 'tool_choice' or the deprecated 'functions' / 'function_call', not both",
                       param=key)  # fmt: skip
    if functions is None:
        raise ApiError(400, "'function_call' needs 'functions'", param="function_call")
    if not isinstance(functions, list):
        raise ApiError(400, "'functions' must be a list of {'name': ..., 'parameters': {...}}", param="functions")
    for k, fn in enumerate(functions):
        _check_function(fn, f"functions[{k}]")
    if isinstance(call, dict):
        if not isinstance(call.get("name"), str) or set(call) != {"name"}:
            raise ApiError(400, "'function_call' must be 'none', 'auto' or {'name': ...}", param="function_call")
        call = {"type": "function", "function": {"name": call["name"]}}
    elif call not in (None, "none", "auto"):
        raise ApiError(400, "'function_call' must be 'none', 'auto' or {'name': ...}", param="function_call")
    return [{"type": "function", "function": fn} for fn in functions], call, True


def _as_function_call(out: dict[str, Any]) -> dict[str, Any]:
    """A message or delta with `tool_calls` in OpenAI's legacy form: its first call's function as `function_call`
    (the legacy API makes one call per answer)."""
    calls = out.pop("tool_calls", None)
    if calls:
        out["function_call"] = calls[0]["function"]
    return out


@dataclass
class ChatRequest:
    """A validated chat request: prompt ids, sampling, n, streaming and tool settings."""

    prompt: list[int]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    tools: list[dict[str, Any]] | None
    logprobs: bool
    legacy: bool = False  # asked with the deprecated `functions`: calls are answered in `function_call`

    @property
    def prompts(self) -> list[list[int]]:
        return [self.prompt]


def _check_keys(body: Any, name: str, supported: set[str], neutral: dict[str, Any]) -> None:
    """The body is an object of known parameters (unsupported ones only at their neutral value) for this model."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in body:
        if key in neutral:
            if body[key] is not None and body[key] != neutral[key]:
                raise ApiError(400, f"unsupported parameter: '{key}' (only {neutral[key]!r} is supported)", param=key)
        elif key not in supported:
            raise ApiError(400, f"unsupported parameter: '{key}'", param=key, code="unsupported_parameter")
    _typed(body, "model", str, "a string")
    if body.get("model") is not None and body.get("model") != name:
        raise ApiError(404, f"The model '{body.get('model')}' does not exist; this server serves '{name}'",
                       param="model", code="model_not_found")  # fmt: skip


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = bool(_typed(body, "stream", bool, "true or false"))
    so = _typed(body, "stream_options", dict, "an object") or {}
    if body.get("stream_options") is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return stream, bool(_typed(so, "include_usage", bool, "true or false"))


def _logit_bias(body: dict[str, Any], engine: Engine) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: an object of token id (a decimal string, as JSON keys are; one of `engine`'s
    vocabulary) -> bias from -100 to 100; 400 naming the first bad entry."""
    bias = _typed(body, "logit_bias", dict, "an object of token id -> bias from -100 to 100") or {}
    vocab = engine.vocab_size if bias else 0
    out = []
    for key, value in bias.items():
        token = int(key) if key.isdecimal() and key.isascii() else -1
        if not 0 <= token < vocab:
            raise ApiError(400, f"'logit_bias' key {key!r}: expected a token id in [0, {vocab})", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -LOGIT_BIAS <= value <= LOGIT_BIAS:
            raise ApiError(400, f"'logit_bias' of token {key}: expected a number from -{LOGIT_BIAS} to {LOGIT_BIAS}, "
                           f"got {json.dumps(value)[:40]}", param="logit_bias")  # fmt: skip
        out.append((token, float(value)))
    return tuple(out)


def _sampling(body: dict[str, Any], d: Sampling, logprobs: int | None, skip_special: bool, engine: Engine) -> Sampling:
    """The request's sampling on the server's defaults `d` (stop, max_tokens, temperature, top_p, top_k, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, seed, ignore_eos, skip_special_tokens, logit_bias of
    `engine`'s tokens); 400 naming the first bad one."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if "" in stop:  # llama-cpp-python's server ends every answer at once on it, with no text
        raise ApiError(400, "'stop' strings must not be empty", param="stop")
    max_tokens = _number(body, "max_tokens", int, 1)  # checked also when max_completion_tokens, which wins, is set
    max_new = _number(body, "max_completion_tokens", int, 1) or max_tokens
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1, above=True)
    top_k = _number(body, "top_k", int, 0)
    penalty = _number(body, "repetition_penalty", float, 0, above=True)
    min_p = _number(body, "min_p", float, 0, 1)
    presence, frequency = (_number(body, k, float, *PENALTY_RANGE) for k in ("presence_penalty", "frequency_penalty"))
    skip = _typed(body, "skip_special_tokens", bool, "true or false")
    return d.replace(
        max_new_tokens=max_new or d.max_new_tokens,
        temperature=d.temperature if temperature is None else float(temperature),
        top_p=d.top_p if top_p is None else float(top_p),
        top_k=d.top_k if top_k is None else top_k,
        repetition_penalty=d.repetition_penalty if penalty is None else float(penalty),
        presence_penalty=d.presence_penalty if presence is None else float(presence),
        frequency_penalty=d.frequency_penalty if frequency is None else float(frequency),
        min_p=d.min_p if min_p is None else float(min_p),
        seed=_number(body, "seed", int, *INT64),
        stop=tuple(stop),
        logprobs=logprobs,
        skip_special_tokens=skip_special if skip is None else skip,
        ignore_eos=bool(_typed(body, "ignore_eos", bool, "true or false")),
        logit_bias=_logit_bias(body, engine),
    )


RESPONSE_FORMATS = (
    "{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name': ..., "
    "'schema': {...}}}"
)


def _response_format(body: dict[str, Any]) -> str | None:
    """The GBNF grammar of the request's `response_format` (None for text): json_object is any JSON object (with a
    `schema`, as llama-cpp-python's server takes it: that schema), json_schema its `json_schema.schema`. 400 naming
    the first malformed field or what the schema converter could not read."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"'response_format' must be {RESPONSE_FORMATS}, got {json.dumps(rf)[:80]}",
                       param="response_format")  # fmt: skip
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        where, schema = "response_format.schema", rf.get("schema")
    else:
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ApiError(400, "Missing required parameter: 'response_format.json_schema' (an object with a 'name' "
                           "and a 'schema')", param="response_format.json_schema")  # fmt: skip
        if not isinstance(js.get("name"), str) or not js["name"]:
            raise ApiError(400, "Missing required parameter: 'response_format.json_schema.name' (a string)",
                           param="response_format.json_schema.name")  # fmt: skip
        if js.get("strict") is not None and not isinstance(js["strict"], bool):
            raise ApiError(400, "'response_format.json_schema.strict' must be true or false",
                           param="response_format.json_schema.strict")  # fmt: skip
        where, schema = "response_format.json_schema.schema", js.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise ApiError(400, f"'{where}' must be a JSON Schema object, got {json.dumps(schema)[:80]}", param=where)
    try:
        return json_grammar(schema)
    except EngineError as e:
        raise ApiError(400, f"'{where}': {e}", param=where) from None


def _forced_call(choice: Any, tools: list[dict[str, Any]] | None, engine: Engine, key: str) -> str | None:
    """The GBNF grammar of one call in the template's tool format when `choice` ("required", or a named function)
    forces one (None for "auto" / "none" / absent); 400 naming what is wrong."""
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        names = None
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):  # fmt: skip
        names = {choice["function"]["name"]}
    else:
        raise ApiError(400, f"'{key}' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                       f"{{'name': ...}}}}, got {json.dumps(choice)[:80]}", param=key)  # fmt: skip
    if not tools:
        raise ApiError(400, f"'{key}' {json.dumps(choice)[:80]} needs 'tools'", param=key)
    functions = [t["function"] for t in tools if names is None or t["function"]["name"] in names]
    if not functions:
        where = "functions" if key == "function_call" else "tools"
        raise ApiError(400, f"'{key}': no tool named {sorted(names or ())[0]!r} in '{where}'", param=key)
    fmt = engine.chat_format.tools
    if fmt is None or fmt.name not in TOOL_CALL_SHAPES:
        raise ApiError(400, f"'{key}' {json.dumps(choice)[:60]}: a call cannot be forced in the "
                       f"{fmt.name if fmt else 'missing'} tool format of this chat template (only in "
                       f"{', '.join(TOOL_CALL_SHAPES)}); use 'auto'", param=key)  # fmt: skip
    try:
        return tool_call_grammar(functions, fmt.name)
    except EngineError as e:
        raise ApiError(400, f"'{key}': {e}", param=key) from None


def _check_grammar(engine: Engine, grammar: str | None, param: str) -> None:
    """400 naming `param` when the engine cannot decode under `grammar` (its backend has no grammar engine, or
    llama.cpp cannot parse it)."""
    if grammar is not None:
        try:
            engine.check_grammar(grammar)
        except EngineError as e:
            raise ApiError(400, f"'{param}': {e}", param=param) from None


def _own_grammar(body: dict[str, Any], engine: Engine, other: str | None) -> str | None:
    """llama-cpp-python's server field `grammar`: a GBNF grammar (llama.cpp's syntax) the answer follows; 400 when
    it is no string, llama.cpp cannot parse it, or `other` (a response_format / forced tool call) is given too."""
    grammar = _typed(body, "grammar", str, "a GBNF grammar (llama.cpp's grammar syntax) as a string")
    if grammar is not None:
        if other is not None:
            raise ApiError(400, f"give 'grammar' or '{other}', not both", param="grammar")
        _check_grammar(engine, grammar, "grammar")
    return grammar


def parse_request(body: Any, engine: Engine, opts: ServeOptions, name: str) -> ChatRequest:
    """Check every parameter (400 naming the first bad one) and render the prompt."""
    _check_keys(body, name, SUPPORTED, NEUTRAL)
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", param="messages")
    try:
        messages = normalize_messages(body["messages"])
    except EngineError as e:
        raise ApiError(400, str(e), param="messages") from None
    if opts.default_system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": opts.default_system})
    tools, choice, legacy = _legacy_functions(body)
    tools = _check_tools(tools)
    if tools is not None:
        if engine.chat_format.tools is None:
            raise ApiError(400, f"the chat template of '{name}' has no tool-call format",
                           param="functions" if legacy else "tools")  # fmt: skip
    key = "function_call" if legacy else "tool_choice"
    grammar = _forced_call(choice, tools, engine, key)
    if choice == "none":
        tools = None
    fmt_grammar = _response_format(body)
    if grammar is None:
        grammar, key = fmt_grammar, "response_format"
    _check_grammar(engine, grammar, key)
    grammar = _own_grammar(body, engine, key if grammar is not None else None) or grammar
    _typed(body, "parallel_tool_calls", bool, "true or false")
    _typed(body, "user", str, "a string")
    stream, include_usage = _streaming(body)
    top_logprobs = _number(body, "top_logprobs", int, 0, 20)
    want_lp = bool(_typed(body, "logprobs", bool, "true or false"))
    if top_logprobs is not None and not want_lp:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    sampling = _sampling(body, opts.sampling, (top_logprobs or 0) if want_lp else None, tools is None, engine)
    sampling = sampling.replace(grammar=grammar)
    n = _number(body, "n", int, 1, MAX_N) or 1
    # LLaMA-Factory's API field: false is greedy, as its engine decodes one answer (n > 1 answers are sampled)
    if _typed(body, "do_sample", bool, "true or false") is False and n == 1:
        sampling = sampling.replace(temperature=0.0)
    try:
        prompt = engine.encode_chat(messages, tools)
    except EngineError as e:
        raise ApiError(400, str(e), param="messages") from None
    return ChatRequest(prompt, sampling, n, stream, include_usage, tools, want_lp, legacy)


@dataclass
class TextRequest:
    """A validated POST /v1/completions request: its prompts (text, ids, and how many ids the server put before the
    text: a BOS), sampling, n answers to each, echo, streaming, logprobs (k, or None)."""

    texts: list[str]
    prompts: list[list[int]]
    added: list[int]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None = None


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _text_prompts(prompt: Any, engine: Engine) -> tuple[list[str], list[list[int]], list[int]]:
    """(texts, ids, added) of `prompt`: a string, a list of strings, a list of token ids, or a list of lists of
    token ids (OpenAI's four forms); a string is tokenized as llama-cpp-python's server does (the BOS the model adds,
    special tokens parsed), token ids are read as given. 400 naming the first bad prompt."""
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    items = prompt if many else [prompt]
    texts, ids, added = [], [], []
    bos = len(engine.encode_text("a")) - len(engine.tokenize("a"))  # what encode_text puts before a text
    for k, p in enumerate(items):
        where = f"prompt[{k}]" if many else "prompt"
        if _is_ids(p):
            if any(t < 0 or t >= engine.vocab_size for t in p):  # before decoding: llama.cpp aborts the process
                raise ApiError(400, f"'{where}' token ids must be in [0, {engine.vocab_size})", param="prompt")
            texts.append(engine.decode(p, skip_special=False))
            ids.append(list(p))
            added.append(0)
        elif isinstance(p, str) and p:
            try:
                ids.append(engine.encode_text(p))
            except EngineError as e:
                raise ApiError(400, f"'{where}': {e}", param="prompt") from None
            texts.append(p)
            added.append(bos)
        else:
            raise ApiError(400, f"'{where}' must be a non-empty string or list of token ids (a request's 'prompt': "
                           "a string, a list of strings, a list of token ids, or a list of such lists)",
                           param="prompt")  # fmt: skip
    return texts, ids, added


def parse_completion(body: Any, engine: Engine, opts: ServeOptions, name: str) -> TextRequest:
    """POST /v1/completions: `prompt` in OpenAI's four forms (see `_text_prompts`), each prompt answered `n` times
    (choice index = prompt index x n + answer); `echo` with `logprobs` scores the prompt tokens too, and with
    `max_tokens` 0 only them (OpenAI's legacy API; lm-evaluation-harness's loglikelihood). 400 naming a bad
    parameter."""
    _check_keys(body, name, COMPLETION_SUPPORTED, COMPLETION_NEUTRAL)
    texts, ids, added = _text_prompts(body.get("prompt"), engine)
    _typed(body, "user", str, "a string")
    stream, include_usage = _streaming(body)
    echo = bool(_typed(body, "echo", bool, "true or false"))
    logprobs = _number(body, "logprobs", int, 0, 20)
    score_only = body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool)
    if score_only and not echo:
        raise ApiError(400, "'max_tokens' 0 needs 'echo': true (the prompt alone is answered)", param="max_tokens")
    sampling = _sampling({**body, "max_tokens": None} if score_only else body, opts.sampling, logprobs, True, engine)
    if score_only:
        sampling = sampling.replace(max_new_tokens=0, prompt_logprobs=logprobs or 0)
    elif echo and logprobs is not None:
        sampling = sampling.replace(prompt_logprobs=logprobs)
    sampling = sampling.replace(grammar=_own_grammar(body, engine, None))
    n = _number(body, "n", int, 1, MAX_N) or 1
    return TextRequest(texts, ids, added, sampling, n, stream, include_usage, echo, logprobs)


# ------------------------------------------------------------------------------------------------ responses


def _logprobs(engine: Engine, lps: list[Any] | None) -> dict[str, Any] | None:
    if lps is None:
        return None

    def entry(token: int, lp: float) -> dict[str, Any]:
        raw = engine.token_bytes(token)  # a part of a UTF-8 character shows as \\xNN escapes, as OpenAI's do
        return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": lp, "bytes": list(raw)}

    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps]}


def _message(
    engine: Engine, c: Completion, tools: list[dict[str, Any]] | None, legacy: bool = False
) -> tuple[dict[str, Any], str]:
    """The answer's message and finish_reason: its tool calls parsed (`legacy`: the first as `function_call`)."""
    content, calls = parse_tool_calls(engine.chat_format.tools, c.text, tools) if tools else (c.text, [])
    if calls:
        msg = {"role": "assistant", "content": content or None, "tool_calls": calls}
        return (_as_function_call(msg), "function_call") if legacy else (msg, "tool_calls")
    return {"role": "assistant", "content": content}, c.finish_reason


def _chunk(rid: str, created: int, name: str, choices: list[dict[str, Any]], usage: Any = None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _choice(i: int, delta: dict[str, Any], reason: str | None = None, lp: Any = None) -> dict[str, Any]:
    return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}


def _usage(prompt: int, completions: list[int]) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": sum(completions), "total_tokens": prompt + sum(completions)}


class _Run:
    """n engine requests of one HTTP request, their deltas on one asyncio queue: (choice index, Delta | error);
    listed in `tracked` until cancelled (answered, failed, its client gone, or the server stopping)."""

    def __init__(self, engine: Engine, req: ChatRequest | TextRequest, tracked: "_Open") -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Delta | BaseException]] = asyncio.Queue()
        self.handles = []
        self.stopped: ApiError | None = None  # the server is stopping: the answer ends with this error now
        self.tracked = tracked
        try:
            for i in range(len(req.prompts) * req.n):  # choice i: prompt i // n, its answer i % n
                s = req.sampling.replace(seed=seed_of_choice(req.sampling.seed, i % req.n))

                def sink(d: Delta | BaseException, i: int = i) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, d))

                self.handles.append(engine.submit(req.prompts[i // req.n], s, sink))
        except BaseException:
            self.cancel()
            raise
        tracked.runs.add(self)

    def cancel(self) -> None:
        self.tracked.runs.discard(self)
        for h in self.handles:
            h.cancel()

    def stop(self, error: ApiError) -> None:
        """End the answer now with `error` (what is queued but not yet sent is dropped); its slots free at the
        engine's next step."""
        self.stopped = error
        self.queue.put_nowait((0, error))
        self.cancel()


class _Open:
    """The requests being answered, so that a stopping server can end them; `stopping`: the error every request
    gets from then on."""

    def __init__(self) -> None:
        self.runs: set[_Run] = set()
        self.stopping: ApiError | None = None

    def stop(self) -> int:
        """Refuse new requests and end the open ones with a 503; how many were open."""
        self.stopping = ApiError(503, "the server is shutting down", type_="server_error", code="unavailable")
        runs = list(self.runs)
        for run in runs:
            run.stop(self.stopping)
        return len(runs)


def create_app(engine: Engine, opts: ServeOptions) -> Any:
    """The FastAPI app serving `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    name = opts.model_name or engine.name
    app = FastAPI(title="exporter serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    app.state.requests = requests = _Open()  # `run` ends them when the server stops

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(ApiError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def _not_allowed(request: Request, _: Exception) -> JSONResponse:
        e = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        return JSONResponse(e.body(), status_code=405)

    app.add_middleware(_Auth, key=opts.api_key)
    # outermost, so that a browser's preflight (it carries no key) is answered and a 401 still carries the headers
    # a page needs to read it: any origin, as llama-cpp-python's server and LLaMA-Factory's API allow
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.get("/health")
    async def _health() -> Any:
        running, waiting = engine.load()
        error = str(requests.stopping) if requests.stopping is not None else engine.error
        if error is not None:  # closed, or its worker died: no request can be served
            body = {"status": "error", "error": error, "model": name, "running": running, "waiting": waiting}
            return JSONResponse(body, status_code=503)
        return {"status": "ok", "model": name, "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def _models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "exporter"}]}

    @app.get("/v1/models/{model_id:path}")
    async def _model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": name, "object": "model", "created": created, "owned_by": "exporter"}

    async def _respond(request: Request, req: ChatRequest | TextRequest, rid: str, stream: Any, complete: Any) -> Any:
        """The request's answers, streamed (SSE) or whole; when the client went away, a 499 nobody reads (uvicorn
        drops it) and nothing logged."""
        run = _start(engine, req, requests)
        if req.stream:
            return StreamingResponse(_sse(run, stream(engine, req, run, rid, name)), media_type="text/event-stream",
                                     headers=SSE_HEADERS)  # fmt: skip
        answer = await complete(engine, req, run, rid, name, request)
        return Response(status_code=499) if answer is None else JSONResponse(answer)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Any:
        req = parse_request(await _json(request), engine, opts, name)
        return await _respond(request, req, f"chatcmpl-{secrets.token_hex(12)}", _stream, _complete)

    @app.post("/v1/completions")
    async def _text(request: Request) -> Any:
        req = parse_completion(await _json(request), engine, opts, name)
        return await _respond(request, req, f"cmpl-{secrets.token_hex(12)}", _stream_text, _complete_text)

    return app


async def _json(request: Any) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _start(engine: Engine, req: ChatRequest | TextRequest, tracked: _Open) -> _Run:
    """The request's n answers queued on the engine; 429 queue full, 503 engine closed or the server stopping, 400
    too long or bad."""
    if tracked.stopping is not None:
        raise tracked.stopping
    try:
        return _Run(engine, req, tracked)
    except QueueFull as e:
        raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
    except EngineClosed as e:
        raise _unavailable(e) from None
    except ContextOverflow as e:
        raise _too_long(e, req.sampling.max_new_tokens, isinstance(req, TextRequest)) from None
    except EngineError as e:
        raise ApiError(400, str(e)) from None


class _Auth:
    """Checks the Bearer key on /v1/ paths. A plain ASGI middleware: Starlette's BaseHTTPMiddleware (call_next)
    logged a traceback ("No response returned") for every non-streamed client that went away."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(_bearer(given), self.key.encode()):
                from fastapi.responses import JSONResponse

                e = ApiError(401, "Incorrect API key provided" if given else "Missing API key (Authorization: Bearer)",
                             type_="authentication_error", code="invalid_api_key")  # fmt: skip
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bearer(header: bytes) -> bytes:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, as RFC 7235 and FastAPI's
    HTTPBearer take it; spaces around the token dropped), or b"" for any other header."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _too_long(e: ContextOverflow, max_tokens: int, text: bool = False) -> ApiError:
    """A prompt that fills the context: llama-cpp-python's server's (and OpenAI's) 400, counting the answer asked;
    `text`: of /v1/completions (its wording there)."""
    asked = e.prompt_tokens + max_tokens
    if text:
        message = (f"This model's maximum context length is {e.n_ctx} tokens, however you requested {asked} tokens "
                   f"({e.prompt_tokens} in your prompt; {max_tokens} for the completion). Please reduce your prompt; "
                   "or completion length.")  # fmt: skip
    else:
        message = (f"This model's maximum context length is {e.n_ctx} tokens. However, you requested {asked} tokens "
                   f"({e.prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of "
                   "the messages or completion.")  # fmt: skip
    return ApiError(400, message, param="messages", code="context_length_exceeded")


def _unavailable(e: EngineClosed) -> ApiError:
    return ApiError(503, str(e), type_="server_error", code="unavailable")


def _failure(e: BaseException) -> ApiError:
    """What a request that failed inside the engine answers: 503 when the engine closed or died (or the server is
    stopping: its own ApiError), else 500."""
    if isinstance(e, ApiError):
        return e
    return _unavailable(e) if isinstance(e, EngineClosed) else ApiError(500, str(e), type_="server_error")


async def _disconnected(request: Any) -> None:
    """Returns when the client goes away. The body has been read, so the next ASGI message is the disconnect."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive channel that breaks: nobody is listening either
        return


async def _gather(req: ChatRequest | TextRequest, run: _Run, request: Any) -> list[list[Delta]] | None:
    """The Deltas of each of the n answers, or None when the client went away: that cancels its requests at once
    (their slots free at the next step), not when the answers are done."""
    parts: list[list[Delta]] = [[] for _ in range(len(req.prompts) * req.n)]
    done = 0
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while done < len(parts):
            got = asyncio.ensure_future(run.queue.get())
            await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                return None  # nobody to answer
            i, d = got.result()
            if run.stopped is not None:
                raise run.stopped
            if isinstance(d, BaseException):
                raise _failure(d)
            parts[i].append(d)
            done += d.finish_reason is not None
    finally:
        gone.cancel()
        run.cancel()
    return parts


async def _deltas(req: ChatRequest | TextRequest, run: _Run, counts: list[int]) -> AsyncIterator[tuple[int, Delta]]:
    """Each answer's Deltas as they come (n per prompt), until all finish, counting each answer's tokens into
    `counts`; a failure inside the engine raises its ApiError."""
    done = 0
    while done < len(req.prompts) * req.n:
        i, d = await run.queue.get()
        if run.stopped is not None:
            raise run.stopped
        if isinstance(d, BaseException):
            raise _failure(d)
        counts[i] += len(d.token_ids)
        yield i, d
        done += d.finish_reason is not None


async def _sse(run: _Run, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """A route's SSE `chunks`, then [DONE]; a failure inside the engine ends the stream with its error event. A
    stream silent for PING_S (queued behind busy slots, or a long prompt being read) gets a `: ping` comment, which
    SSE clients skip, as sse-starlette sends. A client that went away (the task is cancelled) frees the request's
    slots."""
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(chunks))
            while not (await asyncio.wait({pending}, timeout=PING_S))[0]:
                yield ": ping\n\n"
            try:
                c = pending.result()
            except StopAsyncIteration:
                break
            yield c
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        if pending is not None:
            pending.cancel()
        run.cancel()


async def _complete(engine: Engine, req: ChatRequest, run: _Run, rid: str, name: str, request: Any) -> dict | None:
    """The non-streamed answer, or None when the client went away."""
    parts = await _gather(req, run, request)
    if parts is None:
        return None
    choices, counts = [], []
    for i, p in enumerate(parts):
        c = collect(p, len(req.prompt))
        msg, reason = _message(engine, c, req.tools, req.legacy)
        choices.append({"index": i, "message": msg, "logprobs": _logprobs(engine, c.logprobs), "finish_reason": reason})
        counts.append(c.completion_tokens)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "usage": _usage(len(req.prompt), counts),
    }


def _text_logprobs(engine: Engine, lps: list[Any] | None, offset: int) -> dict[str, Any] | None:
    """/v1/completions' logprobs (tokens, text_offset, token_logprobs, top_logprobs), as llama-cpp-python's server
    gives them: each top_logprobs entry also holds the chosen token."""
    if lps is None:
        return None

    def text(token: int) -> str:
        return engine.token_bytes(token).decode("utf-8", errors="backslashreplace")

    tokens = [text(x.token) for x in lps]
    ids = [x.token for x in lps]
    offsets = [offset + n for n in engine.text_offsets(ids)]
    tops = [{**{text(t): v for t, v in x.top}, tokens[k]: x.logprob} for k, x in enumerate(lps)]
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": [x.logprob for x in lps], "top_logprobs": tops}


def _echo_logprobs(engine: Engine, ids: list[int], lps: list[Any], gen: dict[str, Any] | None) -> dict[str, Any]:
    """/v1/completions' logprobs with `echo`: the prompt's tokens (those of its text: not a BOS the server put before
    it), the first with null token_logprobs and top_logprobs (nothing before it is scored), as OpenAI's legacy API
    and llama-cpp-python's server give them; then the answer's (`gen`)."""

    def text(token: int) -> str:
        return engine.token_bytes(token).decode("utf-8", errors="backslashreplace")

    out: dict[str, list[Any]] = {"tokens": [], "text_offset": engine.text_offsets(ids), "token_logprobs": [],
                                 "top_logprobs": []}  # fmt: skip
    for k, (t, x) in enumerate(zip(ids, lps, strict=True)):
        out["tokens"].append(text(t))
        out["token_logprobs"].append(None if k == 0 else x.logprob)
        out["top_logprobs"].append(None if k == 0 else {**{text(i): v for i, v in x.top}, out["tokens"][-1]: x.logprob})
    for key, values in (gen or {}).items():
        out[key] += values
    return out


def _text_choice(i: int, text: str, reason: str | None, lp: Any = None) -> dict[str, Any]:
    return {"text": text, "index": i, "logprobs": lp, "finish_reason": reason}


def _text_body(rid: str, created: int, name: str, choices: list[dict[str, Any]], usage: Any = None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


async def _complete_text(engine: Engine, req: TextRequest, run: _Run, rid: str, name: str, request: Any) -> dict | None:
    """The non-streamed /v1/completions answer (the prompt first with `echo`), or None when the client went away."""
    parts = await _gather(req, run, request)
    if parts is None:
        return None
    choices, counts = [], []
    for i, p in enumerate(parts):
        k = i // req.n  # the prompt this answer is to
        c = collect(p, len(req.prompts[k]))
        lp = _text_logprobs(engine, c.logprobs, len(req.texts[k]))
        if req.echo and req.logprobs is not None and c.prompt_logprobs is not None:
            lp = _echo_logprobs(engine, req.prompts[k][req.added[k] :], c.prompt_logprobs[req.added[k] :], lp)
        choices.append(_text_choice(i, (req.texts[k] if req.echo else "") + c.text, c.finish_reason, lp))
        counts.append(c.completion_tokens)
    return _text_body(rid, int(time.time()), name, choices, _usage(sum(map(len, req.prompts)), counts))


async def _stream_text(engine: Engine, req: TextRequest, run: _Run, rid: str, name: str) -> AsyncIterator[str]:
    """/v1/completions' SSE chunks: the text of each answer as it comes (the prompt first with `echo`)."""
    created = int(time.time())
    total = len(req.prompts) * req.n
    counts, sent = [0] * total, [len(req.texts[i // req.n]) for i in range(total)]  # text_offset of the next token
    scored = req.echo and req.logprobs is not None  # the echo of each answer waits for its prompt's log-probs

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        return f"data: {json.dumps(_text_body(rid, created, name, choices, usage), ensure_ascii=False)}\n\n"

    if req.echo and not scored:
        yield chunk([_text_choice(i, req.texts[i // req.n], None) for i in range(total)])
    async for i, d in _deltas(req, run, counts):
        if d.prompt_logprobs is not None and scored:
            k, a = i // req.n, req.added[i // req.n]
            lp = _echo_logprobs(engine, req.prompts[k][a:], d.prompt_logprobs[a:], None)
            yield chunk([_text_choice(i, req.texts[k], None, lp)])
        if d.text or d.logprobs or d.finish_reason is not None:
            lp = _text_logprobs(engine, d.logprobs, sent[i]) if d.logprobs is not None else None
            yield chunk([_text_choice(i, d.text, d.finish_reason, lp)])
        sent[i] += len(d.text)
    if req.include_usage:
        yield chunk([], _usage(sum(map(len, req.prompts)), counts))


class _ToolText:
    """One answer's text while tools may be called: the text before the first call marker goes out as it comes
    (less a tail that may be the marker's start, and trailing whitespace, which non-streamed content strips); from
    the marker on it is held, then parsed at the end exactly as a non-streamed answer is."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt, self.text, self.sent, self.held = fmt, "", 0, False

    def push(self, text: str) -> str:
        """The new text that is safe to send now."""
        self.text += text
        if self.held or self.fmt.find(self.text) >= 0:
            self.held = True
            return ""
        if self.fmt.start == "{":  # Llama 3: a call is the whole answer; wait for its first character (and for
            lead = self.text.lstrip()  # the rest of a <|python_tag|> it may begin)
            safe = len(self.text) if lead and not PYTHON_TAG.startswith(lead) else 0
        else:
            start, safe = self.fmt.start, len(self.text)
            for n in range(min(len(start) - 1, len(self.text)), 0, -1):
                if self.text.endswith(start[:n]):
                    safe -= n
                    break
        safe = len(self.text[:safe].rstrip())
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self, tools: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
        """The last delta (the rest of the content, then the tool calls) and "tool_calls" if the answer called any."""
        content, calls = parse_tool_calls(self.fmt, self.text, tools)
        rest = content[self.sent :]  # what was sent has no marker and ends in non-space: a prefix of `content`
        delta: dict[str, Any] = {"content": rest} if rest else {}
        if calls:
            delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(calls)]
        return delta, "tool_calls" if calls else None


async def _stream(engine: Engine, req: ChatRequest, run: _Run, rid: str, name: str) -> AsyncIterator[str]:
    """SSE chunks; with tools, text streams until a tool call starts, and the calls follow once parsed."""
    created = int(time.time())
    fmt = engine.chat_format.tools
    tool_text = [_ToolText(fmt) for _ in range(req.n)] if req.tools and fmt is not None else None
    counts = [0] * req.n
    yield _chunk(rid, created, name, [_choice(i, {"role": "assistant", "content": ""}) for i in range(req.n)])
    async for i, d in _deltas(req, run, counts):
        text = tool_text[i].push(d.text) if tool_text is not None else d.text
        if text or d.logprobs:  # with tools too: each token's logprobs as it comes, while its text may be held
            lp = _logprobs(engine, d.logprobs) if req.logprobs else None
            yield _chunk(rid, created, name, [_choice(i, {"content": text}, None, lp)])
        if d.finish_reason is not None:
            reason = d.finish_reason
            if tool_text is not None:
                delta, called = tool_text[i].finish(req.tools or [])
                if called and req.legacy:
                    delta, called = _as_function_call(delta), "function_call"
                reason = called or reason
                if delta:
                    yield _chunk(rid, created, name, [_choice(i, delta)])
            yield _chunk(rid, created, name, [_choice(i, {}, reason)])
    if req.include_usage:
        yield _chunk(rid, created, name, [], _usage(len(req.prompt), counts))


# ------------------------------------------------------------------------------------------------ running


def banner(opts: ServeOptions, name: str, engine: Engine) -> str:
    """The startup text: URL, a curl and an openai example, ready to paste."""
    host = opts.host if opts.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"http://{host}:{opts.port}/v1"
    key = opts.api_key or "none"
    payload = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello!"}]})
    auth = f" -H {shlex.quote('Authorization: Bearer ' + opts.api_key)}" if opts.api_key else ""
    running = f"{engine.kind} backend, {engine.options.max_seqs} sequences at a time"
    return (
        f"exporter serve: {name} ({running}) at {base}\n\n"
        f"  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d {shlex.quote(payload)}\n\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'Hello!'}}])"
        f'.choices[0].message.content)"\n'
    )


def options_from_env(opts: ServeOptions) -> ServeOptions:
    """LLaMA-Factory's API_HOST / API_PORT / API_KEY / API_MODEL_NAME fill what the command line left unset."""
    env = os.environ
    if env.get("API_PORT"):
        try:
            opts.port = int(env["API_PORT"])
        except ValueError:
            raise UserError(f"API_PORT={env['API_PORT']!r}: expected a port number") from None
    opts.host = env.get("API_HOST") or opts.host
    opts.api_key = opts.api_key or env.get("API_KEY") or None
    opts.model_name = opts.model_name or env.get("API_MODEL_NAME") or None
    return opts


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CUT_AFTER_S = 2.0  # a connection still open this long after the stop (its client reads no more) is closed


def _exit_now(sig: int, frame: Any = None) -> None:
    """A second SIGINT/SIGTERM (a signal handler): exit at once, 128 + the signal, whatever is still running."""
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(128 + sig)


def _server(config: Any, requests: _Open) -> Any:
    """uvicorn's Server, stopped our way. The first SIGINT/SIGTERM prints one line, ends every open request at once
    (`_Open.stop`: a 503, or a stream's error event), then uvicorn closes the listener and the connections; one
    whose client reads no more is closed after CUT_AFTER_S. uvicorn alone waited for every answer to finish, with
    no word and no limit, and re-raised the signal. A second signal exits at once (uvicorn's forced exit cancelled
    the open requests, a traceback each)."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.stopped_by = 0  # the signal that stopped it
            self.loop: asyncio.AbstractEventLoop | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # uvicorn's, less its re-raising of the signal on the way out
            self.loop = asyncio.get_running_loop()
            previous = {s: signal.signal(s, self.handle_exit) for s in STOP_SIGNALS}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.stopped_by:
                _exit_now(sig)
            self.stopped_by = sig
            self.should_exit = True  # uvicorn's main loop sees it within 0.1 s: stop listening, close connections
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._stop, sig)

        def _stop(self, sig: int) -> None:
            n = requests.stop()
            name = signal.Signals(sig).name
            ended = f"ending {n} open request{'' if n == 1 else 's'} with a 503 error" if n else "no request was open"
            again = "Ctrl-C" if sig == signal.SIGINT else name
            print(f"exporter serve: stopping ({name}): {ended}; a second {again} exits at once", file=sys.stderr,
                  flush=True)  # fmt: skip
            assert self.loop is not None
            self.loop.call_later(CUT_AFTER_S, self._cut)

        def _cut(self) -> None:
            for conn in list(self.server_state.connections):
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.abort()

    return Server()


def run(opts: ServeOptions) -> int:
    """Load the model, print the banner, serve until SIGINT or SIGTERM stops it: the exit code then, 130 / 143. From
    that signal on, another one exits the process at once (in the engine's last step, or in Python's exit)."""
    from exporter.engine import load

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("exporter serve needs FastAPI and uvicorn: pip install 'exporter[serve]'") from None
    sock = listen(opts.host, opts.port)  # first: a busy port is one line, not a banner and then uvicorn's error
    stopped_by = 0
    try:
        engine = load(opts.load)
        try:
            engine.chat_format.require()
            app = create_app(engine, opts)
            sys.stdout.write(banner(opts, opts.model_name or engine.name, engine))
            sys.stdout.flush()
            config = uvicorn.Config(app, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=int(CUT_AFTER_S) + 3)  # fmt: skip
            server = _server(config, app.state.requests)
            server.run(sockets=[sock])
            stopped_by = server.stopped_by
        finally:
            previous = {s: signal.signal(s, _exit_now) for s in STOP_SIGNALS}
            try:
                engine.close()  # the engine ends its current step
            finally:
                if not stopped_by:
                    for s, handler in previous.items():
                        signal.signal(s, handler)
    finally:
        sock.close()
    return 128 + stopped_by if stopped_by else 0


def listen(host: str, port: int) -> Any:
    """A listening socket on host:port; UserError naming the port when it is out of range, or the address when it
    is taken or not ours to bind (`exporter webui` checks its port with it too)."""
    import socket

    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected 1-65535")
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server? use --port)") from None
