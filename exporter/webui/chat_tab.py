"""The Chat tab: talk to the base model, base + adapter, a merged dir or a GGUF file through `exporter.engine` (the one
engine behind `exporter chat`, `serve` and verify), with a system prompt and LLaMA-Factory's sampling defaults, the
answer streamed as it is generated.

The model is loaded into the board's own process (one at a time, as LLaMA-Factory's board); the engine batches the
answers of every open page. The conversation each page holds is the exact text (a `gr.State`); the chat box only shows
it.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterator
from typing import Any

from exporter.errors import UserError
from exporter.webui.locales import word

BACKENDS = ("auto", "hf", "gguf")
DTYPES = ("auto", "fp32", "bf16", "fp16")
# the sampling fields the tab sets, in the order the handlers receive them
SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")


@dataclasses.dataclass
class Loaded:
    """The board's loaded model: the engine and what it is, for the status line."""

    engine: Any
    what: str


def load_options(model: str, adapter: str, template: str, path: str, backend: str, dtype: str) -> Any:
    """What to load: `path` (a merged dir, an adapter dir or a .gguf file) when given, else the top row's model with
    its adapter; the top row's template when not auto."""
    from exporter.engine import LoadOptions

    path, model, adapter = (path or "").strip(), (model or "").strip(), (adapter or "").strip()
    target = path or model
    if not target:
        raise UserError("set the model path (top row) or a model to chat with")
    return LoadOptions(
        model=target, adapter=None if path else adapter or None, backend=None if backend == "auto" else backend,
        template=None if template in (None, "", "auto") else template, dtype=dtype,
    )  # fmt: skip


def describe(engine: Any, opts: Any) -> str:
    """`name` · backend · adapter · template, for the status line."""
    parts = [f"`{opts.model}`"]
    if opts.adapter:
        parts.append(f"+ `{opts.adapter}`")
    parts.append(f"· {engine.kind}")
    if opts.template:
        parts.append(f"· template {opts.template}")
    return " ".join(parts)


def load(opts: Any) -> Loaded:
    """Load the engine; UserError when there is nothing to chat with (no chat template)."""
    from exporter import engine as eng

    engine = eng.load(opts)
    try:
        engine.chat_format.require()
    except UserError:
        engine.close()
        raise
    return Loaded(engine, describe(engine, opts))


def sampling(values: dict[str, Any]) -> Any:
    """Engine sampling from the tab's values, on LLaMA-Factory's defaults."""
    from exporter.chat import LF_SAMPLING

    return LF_SAMPLING.replace(
        max_new_tokens=int(values["max_new_tokens"]), temperature=float(values["temperature"]),
        top_p=float(values["top_p"]), top_k=int(values["top_k"]),
        repetition_penalty=float(values["repetition_penalty"]),
    )  # fmt: skip


def conversation(system: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if (system or "").strip() else []) + history


def answer(loaded: Loaded, system: str, history: list[dict[str, str]], samp: Any) -> Iterator[str]:
    """The answer to the conversation so far, growing as it streams."""
    ids = loaded.engine.encode_chat(conversation(system, history))
    text = ""
    for d in loaded.engine.stream(ids, samp):
        text += d.text
        yield text


# ------------------------------------------------------------------ the tab


def build(board: Any, demo: Any) -> None:
    """The Chat tab's components and events (API names chat_load, chat_unload, chat_submit, chat_clear)."""
    import gradio as gr

    from exporter.chat import LF_SAMPLING
    from exporter.webui.locales import label

    L, add, s = board.opts.lang, board.add, LF_SAMPLING  # noqa: N806
    c: dict[str, Any] = {}
    with add("tab_chat", gr.Tab(label("tab_chat", L), id="chat")) as tab:
        with gr.Row():
            c["path"] = add("chat_path", gr.Dropdown(
                [], value="", allow_custom_value=True, label=label("chat_path", L), scale=4,
                elem_id="chat_path"))  # fmt: skip
            c["backend"] = add("chat_backend", gr.Dropdown(list(BACKENDS), value="auto",
                                                           label=label("chat_backend", L), scale=1))  # fmt: skip
            c["dtype"] = add("chat_dtype", gr.Dropdown(list(DTYPES), value="auto", label=label("chat_dtype", L),
                                                       scale=1))  # fmt: skip
        with gr.Row():
            load_btn = add("chat_load_btn", gr.Button(label("chat_load_btn", L), variant="primary", scale=0,
                                                      elem_id="chat_load"))  # fmt: skip
            unload_btn = add("chat_unload_btn", gr.Button(label("chat_unload_btn", L), scale=0,
                                                          elem_id="chat_unload"))  # fmt: skip
            status = gr.Markdown(word("no_model", L), elem_id="chat_status")
        with gr.Row():
            with gr.Column(scale=4):
                box = add("chatbot", gr.Chatbot(label=label("chatbot", L), height=420, elem_id="chatbot",
                                                render_markdown=False, buttons=["copy", "copy_all"]))  # fmt: skip
                query = add("query", gr.Textbox(label=label("query", L), lines=2, elem_id="chat_query"))
                with gr.Row():
                    send_btn = add("send_btn", gr.Button(label("send_btn", L), variant="primary", elem_id="chat_send"))
                    stop_btn = add("chat_stop_btn", gr.Button(label("chat_stop_btn", L), elem_id="chat_stop"))
                    clear_btn = add("clear_btn", gr.Button(label("clear_btn", L), elem_id="chat_clear"))
            with gr.Column(scale=1):
                c["system"] = add("system", gr.Textbox(label=label("system", L), lines=3, elem_id="chat_system"))
                c["max_new_tokens"] = add("max_new_tokens", gr.Slider(
                    1, 8192, s.max_new_tokens, step=1, label=label("max_new_tokens", L),
                    elem_id="max_new_tokens"))  # fmt: skip
                c["temperature"] = add("temperature", gr.Slider(0, 1.5, s.temperature, step=0.01,
                                                                label=label("temperature", L),
                                                                elem_id="temperature"))  # fmt: skip
                c["top_p"] = add("top_p", gr.Slider(0.01, 1, s.top_p, step=0.01, label=label("top_p", L)))
                c["top_k"] = add("top_k", gr.Slider(0, 200, s.top_k, step=1, label=label("top_k", L)))
                c["repetition_penalty"] = add("repetition_penalty", gr.Slider(
                    1, 2, s.repetition_penalty, step=0.01, label=label("repetition_penalty", L)))  # fmt: skip
        history = gr.State([])  # inside the tab: a component directly under gr.Tabs doubles the next tab's button
    # on opening the tab: the last export's merged dir and GGUF files to pick from
    tab.select(lambda: gr.update(choices=["", *board.chat_targets]), None, [c["path"]], api_name="chat_models")
    _wire(board, c, status, box, query, history, (load_btn, unload_btn, send_btn, stop_btn, clear_btn))


def _wire(board: Any, c: dict[str, Any], status: Any, box: Any, query: Any, history: Any, buttons: tuple) -> None:
    import gradio as gr

    top = board.top
    load_btn, unload_btn, send_btn, stop_btn, clear_btn = buttons

    def on_load(lang: str, model: str, adapter: str, template: str, path: str, backend: str, dtype: str) -> str:
        unload()
        try:
            board.chat = load(load_options(model, adapter, template, path, backend, dtype))
        except UserError as e:
            return f"**{word('failed', lang)}**: `error: {e}`"
        return f"**{word('loaded', lang)}** {board.chat.what}"

    def unload() -> None:
        loaded, board.chat = board.chat, None
        if loaded is not None:
            loaded.engine.close()

    def on_unload(lang: str) -> str:
        unload()
        return word("no_model", lang)

    def on_submit(lang: str, text: str, hist: list[dict[str, str]], system: str, *samp: Any) -> Iterator[tuple]:
        from exporter.engine import EngineError

        loaded = board.chat
        if loaded is None:
            yield gr.skip(), hist, text, word("no_model", lang)
            return
        if not (text or "").strip():
            yield gr.skip(), hist, text, gr.skip()
            return
        hist = [*hist, {"role": "user", "content": text}]
        samp = sampling(dict(zip(SAMPLING, samp, strict=True)))
        # every update carries the answer so far in the history too: Stop keeps what was said (the chat box shows the
        # same messages; Markdown is off there, so it shows what the model wrote)
        turn = [*hist, {"role": "assistant", "content": ""}]
        yield turn, turn, "", f"**{word('loaded', lang)}** {loaded.what}"  # an earlier answer's "Failed" goes
        try:
            for partial in answer(loaded, system, hist, samp):
                turn = [*hist, {"role": "assistant", "content": partial}]
                yield turn, turn, "", gr.skip()
        except (EngineError, UserError) as e:  # this answer fails (prompt too long, bad values); the chat goes on
            yield hist[:-1], hist[:-1], text, f"**{word('failed', lang)}**: `error: {html.escape(str(e))}`"

    top_in = [top["lang"], top["model"], top["adapter"], top["template"]]
    load_btn.click(on_load, [*top_in, c["path"], c["backend"], c["dtype"]], [status], api_name="chat_load")
    unload_btn.click(on_unload, [top["lang"]], [status], api_name="chat_unload")
    inputs = [top["lang"], query, history, c["system"], *(c[k] for k in SAMPLING)]
    outputs = [box, history, query, status]
    sent = send_btn.click(on_submit, inputs, outputs, api_name="chat_submit", concurrency_limit=8)
    entered = query.submit(on_submit, inputs, outputs, api_visibility="private", concurrency_limit=8)
    stop_btn.click(None, None, None, cancels=[sent, entered], api_visibility="private")
    clear_btn.click(lambda: ([], []), None, [box, history], api_name="chat_clear")
