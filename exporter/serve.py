"""`exporter serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) on the engine.

GET /v1/models, POST /v1/chat/completions (JSON or SSE streaming; tools with parsed tool_calls where the chat
template has a tool format; stop, max_tokens / max_completion_tokens, temperature, top_p, seed, n, logprobs;
usage; finish_reason stop / length / tool_calls). Errors have OpenAI's shape: 401 bad key, 400 malformed or
unsupported parameter (named), 404 unknown model, 429 queue full, 503 engine closed. Requests run concurrently on
the engine's continuous batching; a client that goes away frees its slot at the next step.
"""

import asyncio
import json
import math
import os
import secrets
import shlex
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from exporter.engine import (
    Completion,
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
from exporter.engine.sampling import seed_of_choice
from exporter.errors import UserError

# Parameters of POST /v1/chat/completions: the ones we honour, and the ones accepted only at their neutral value.
SUPPORTED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "n", "stop", "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs", "user",
    "top_k", "repetition_penalty", "skip_special_tokens", "ignore_eos",
}  # fmt: skip
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "response_format": {"type": "text"}}
MAX_N = 16
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
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"{where}.function: expected an object with a 'name' string",
                           param=f"{where}.function")  # fmt: skip
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ApiError(400, f"{where}.function.description must be a string", param=f"{where}.function")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ApiError(400, f"{where}.function.parameters must be a JSON Schema object",
                           param=f"{where}.function")  # fmt: skip
    return tools


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


def parse_request(body: Any, engine: Engine, opts: ServeOptions, name: str) -> ChatRequest:
    """Check every parameter (400 naming the first bad one) and render the prompt."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in body:
        if key in NEUTRAL:
            if body[key] not in (NEUTRAL[key], None, {}) and not (key == "logit_bias" and body[key] == {}):
                raise ApiError(400, f"unsupported parameter: '{key}' (only {NEUTRAL[key]!r} is supported)", param=key)
        elif key not in SUPPORTED:
            raise ApiError(400, f"unsupported parameter: '{key}'", param=key, code="unsupported_parameter")
    _typed(body, "model", str, "a string")
    if body.get("model") is not None and body.get("model") != name:
        raise ApiError(404, f"The model '{body.get('model')}' does not exist; this server serves '{name}'",
                       param="model", code="model_not_found")  # fmt: skip
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", param="messages")
    try:
        messages = normalize_messages(body["messages"])
    except EngineError as e:
        raise ApiError(400, str(e), param="messages") from None
    if opts.default_system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": opts.default_system})
    tools = _check_tools(body.get("tools"))
    if tools is not None:
        if engine.chat_format.tools is None:
            raise ApiError(400, f"the chat template of '{name}' has no tool-call format", param="tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, "unsupported tool_choice: only 'auto' and 'none' (no constrained decoding)",
                       param="tool_choice")  # fmt: skip
    if choice == "none":
        tools = None
    _typed(body, "parallel_tool_calls", bool, "true or false")
    _typed(body, "user", str, "a string")
    stream = bool(_typed(body, "stream", bool, "true or false"))
    so = _typed(body, "stream_options", dict, "an object") or {}
    if body.get("stream_options") is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = bool(_typed(so, "include_usage", bool, "true or false"))
    d = opts.sampling
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    max_new = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
    top_logprobs = _number(body, "top_logprobs", int, 0, 20)
    want_lp = bool(_typed(body, "logprobs", bool, "true or false"))
    if top_logprobs is not None and not want_lp:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1, above=True)
    top_k = _number(body, "top_k", int, 0)
    penalty = _number(body, "repetition_penalty", float, 0, above=True)
    skip = _typed(body, "skip_special_tokens", bool, "true or false")
    sampling = d.replace(
        max_new_tokens=max_new or d.max_new_tokens,
        temperature=d.temperature if temperature is None else float(temperature),
        top_p=d.top_p if top_p is None else float(top_p),
        top_k=d.top_k if top_k is None else top_k,
        repetition_penalty=d.repetition_penalty if penalty is None else float(penalty),
        seed=_number(body, "seed", int, *INT64),
        stop=tuple(stop),
        logprobs=(top_logprobs or 0) if want_lp else None,
        skip_special_tokens=tools is None if skip is None else skip,
        ignore_eos=bool(_typed(body, "ignore_eos", bool, "true or false")),
    )
    n = _number(body, "n", int, 1, MAX_N) or 1
    try:
        prompt = engine.encode_chat(messages, tools)
    except EngineError as e:
        raise ApiError(400, str(e), param="messages") from None
    return ChatRequest(prompt, sampling, n, stream, include_usage, tools, want_lp)


# ------------------------------------------------------------------------------------------------ responses


def _logprobs(engine: Engine, lps: list[Any] | None) -> dict[str, Any] | None:
    if lps is None:
        return None

    def entry(token: int, lp: float) -> dict[str, Any]:
        raw = engine.token_bytes(token)  # a part of a UTF-8 character shows as \\xNN escapes, as OpenAI's do
        return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": lp, "bytes": list(raw)}

    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps]}


def _message(engine: Engine, c: Completion, tools: list[dict[str, Any]] | None) -> tuple[dict[str, Any], str]:
    content, calls = parse_tool_calls(engine.chat_format.tools, c.text, tools) if tools else (c.text, [])
    if calls:
        return {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"
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
    """n engine requests of one HTTP request, their deltas on one asyncio queue: (choice index, Delta | error)."""

    def __init__(self, engine: Engine, req: ChatRequest) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Delta | BaseException]] = asyncio.Queue()
        self.handles = []
        try:
            for i in range(req.n):
                s = req.sampling.replace(seed=seed_of_choice(req.sampling.seed, i))

                def sink(d: Delta | BaseException, i: int = i) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, d))

                self.handles.append(engine.submit(req.prompt, s, sink))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


def create_app(engine: Engine, opts: ServeOptions) -> Any:
    """The FastAPI app serving `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    name = opts.model_name or engine.name
    app = FastAPI(title="exporter serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

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

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if opts.api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {opts.api_key}".encode()):
                e = ApiError(401, "Incorrect API key provided" if given else "Missing API key (Authorization: Bearer)",
                             type_="authentication_error", code="invalid_api_key")  # fmt: skip
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def _health() -> Any:
        running, waiting = engine.load()
        error = engine.error
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

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        req = parse_request(body, engine, opts, name)
        try:
            run = _Run(engine, req)
        except QueueFull as e:
            raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        except EngineClosed as e:
            raise _unavailable(e) from None
        except EngineError as e:
            raise ApiError(400, str(e)) from None
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        if req.stream:
            return StreamingResponse(_stream(engine, req, run, rid, name), media_type="text/event-stream")
        return JSONResponse(await _complete(engine, req, run, rid, name, request))

    return app


def _unavailable(e: EngineClosed) -> ApiError:
    return ApiError(503, str(e), type_="server_error", code="unavailable")


def _failure(e: BaseException) -> ApiError:
    """What a request that failed inside the engine answers: 503 when the engine closed or died, else 500."""
    return _unavailable(e) if isinstance(e, EngineClosed) else ApiError(500, str(e), type_="server_error")


async def _disconnected(request: Any) -> None:
    """Returns when the client goes away. The body has been read, so the next ASGI message is the disconnect."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive channel that breaks: nobody is listening either
        return


async def _complete(engine: Engine, req: ChatRequest, run: _Run, rid: str, name: str, request: Any) -> dict:
    """The non-streamed answer; a client that goes away cancels its requests at once (their slots free at the next
    step), not when the answer is done."""
    parts: list[list[Delta]] = [[] for _ in range(req.n)]
    done = 0
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while done < req.n:
            got = asyncio.ensure_future(run.queue.get())
            await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                raise asyncio.CancelledError  # nobody to answer
            i, d = got.result()
            if isinstance(d, BaseException):
                raise _failure(d)
            parts[i].append(d)
            done += d.finish_reason is not None
    finally:
        gone.cancel()
        run.cancel()
    choices, counts = [], []
    for i, p in enumerate(parts):
        c = collect(p, len(req.prompt))
        msg, reason = _message(engine, c, req.tools)
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
    done = 0
    try:
        yield _chunk(rid, created, name, [_choice(i, {"role": "assistant", "content": ""}) for i in range(req.n)])
        while done < req.n:
            i, d = await run.queue.get()
            if isinstance(d, BaseException):
                yield f"data: {json.dumps(_failure(d).body())}\n\n"
                return
            counts[i] += len(d.token_ids)
            text = tool_text[i].push(d.text) if tool_text is not None else d.text
            if text or (d.logprobs and tool_text is None):
                lp = _logprobs(engine, d.logprobs) if req.logprobs and tool_text is None else None
                yield _chunk(rid, created, name, [_choice(i, {"content": text}, None, lp)])
            if d.finish_reason is not None:
                done += 1
                reason = d.finish_reason
                if tool_text is not None:
                    delta, called = tool_text[i].finish(req.tools or [])
                    reason = called or reason
                    if delta:
                        yield _chunk(rid, created, name, [_choice(i, delta)])
                yield _chunk(rid, created, name, [_choice(i, {}, reason)])
        if req.include_usage:
            yield _chunk(rid, created, name, [], _usage(len(req.prompt), counts))
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()  # a client that went away (the task is cancelled) frees its slots


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


def run(opts: ServeOptions) -> None:
    """Load the model, print the banner, serve until interrupted."""
    from exporter.engine import load

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("exporter serve needs FastAPI and uvicorn: pip install 'exporter[serve]'") from None
    if not 0 < opts.port < 65536:
        raise UserError(f"--port {opts.port}: expected 1-65535")
    sock = _listen(opts.host, opts.port)  # first: a busy port is one line, not a banner and then uvicorn's error
    try:
        engine = load(opts.load)
        try:
            engine.chat_format.require()
            app = create_app(engine, opts)
            sys.stdout.write(banner(opts, opts.model_name or engine.name, engine))
            sys.stdout.flush()
            uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
        finally:
            engine.close()
    finally:
        sock.close()


def _listen(host: str, port: int) -> Any:
    """A listening socket on host:port; UserError naming the address when it is taken or not ours to bind."""
    import socket

    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server? use --port)") from None
