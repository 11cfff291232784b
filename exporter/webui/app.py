"""The board: a top row (language, model, adapter, chat template) and one tab per stage of the chain, in Gradio.

Every labelled element is registered with `Board.add(key, component)` so the language switch can re-label it from
`locales.LABELS`. Runs that take long are CLI subprocesses (`jobs.py`); the board holds at most one run per tab.
Nothing phones home: Gradio's analytics are off, the theme's fonts are served locally, and a public share link is
made only when asked (`--share`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

from exporter.webui.locales import LABELS, LANGS, label

# Gradio reads these at import: no usage analytics, no version check against its servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# and as its queue starts: no per-event summary for its monitoring dashboard (the board has none). Gradio 6.31 rebuilt
# it with pandas after every event, in a worker thread, through options pandas 3 deprecates; while pandas turns
# DeprecationWarning on for the whole process in another thread, those warnings reached the terminal on page reloads
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**62))

CSS = """
.exp-preview pre { white-space: pre-wrap; font-size: 13px; margin: 4px 0 12px; }
.exp-row-head { font-weight: 600; font-size: 13px; }
mark.exp-trained { background: #b7ebc0; color: inherit; padding: 0; }
.exp-progress { display: flex; align-items: center; gap: 12px; min-height: 28px; }
.exp-progress progress { flex: 1; height: 14px; }
.exp-stage-pass { color: #15803d; } .exp-stage-fail { color: #b91c1c; } .exp-stage-run { color: #1d4ed8; }
"""


@dataclasses.dataclass
class WebUIOptions:
    """What `exporter webui` takes."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    lang: str = "en"
    runs_dir: str = "webui_runs"  # configs the board saves and the logs of the commands it runs


class Board:
    """The app's state: its options, the labelled components, the shared top-row inputs and the current runs."""

    def __init__(self, opts: WebUIOptions) -> None:
        self.opts = opts
        self.runs_dir = Path(opts.runs_dir)
        self.labelled: list[tuple[str, Any]] = []
        self.top: dict[str, Any] = {}  # lang, model, adapter, template components
        self.train_run: Any = None
        self.export_run: Any = None
        self.eval_run: Any = None  # the Evaluate & Predict tab's command (jobs.Job)
        self.eval_opts: Any = None  # (verb, options) of eval_run
        self.chat: Any = None  # the Chat tab's loaded model (chat_tab.Loaded)
        self.chat_targets: list[str] = []  # what the last export wrote, offered by the Chat tab
        self.lock = threading.Lock()  # checking that no run is going and starting one: one step for all pages

    def add(self, key: str, component: Any) -> Any:
        if key not in LABELS:
            raise KeyError(f"no label for {key!r} in locales.LABELS")
        self.labelled.append((key, component))
        return component

    def relabel(self, lang: str) -> list[Any]:
        """One update per registered component: its label (buttons and headings: their text) in `lang`."""
        import gradio as gr

        out = []
        for key, comp in self.labelled:
            text = label(key, lang)
            if isinstance(comp, (gr.Button, gr.Markdown)):
                out.append(gr.update(value=text))
            else:
                out.append(gr.update(label=text))
        return out


def _top_row(board: Board) -> None:
    import gradio as gr

    from exporter.templates import list_templates

    lang = board.opts.lang
    with gr.Row():
        board.add("title", gr.Markdown(label("title", lang)))
        board.top["lang"] = board.add(
            "lang",
            gr.Dropdown(
                [(v, k) for k, v in LANGS.items()],
                value=lang,
                label=label("lang", lang),
                scale=0,
                min_width=120,
                elem_id="lang",
            ),  # fmt: skip
        )
    with gr.Row():
        board.top["model"] = board.add(
            "model", gr.Textbox(label=label("model", lang), scale=3, elem_id="model", placeholder="path/to/model")
        )
        board.top["adapter"] = board.add(
            "adapter", gr.Textbox(label=label("adapter", lang), scale=3, elem_id="adapter", placeholder="saves/…")
        )
        board.top["template"] = board.add(
            "template",
            gr.Dropdown(
                ["auto", *list_templates()], value="auto", label=label("template", lang), scale=1, elem_id="template"
            ),  # fmt: skip
        )


def build(opts: WebUIOptions) -> tuple[Any, Board]:
    """The Gradio Blocks of the board (not launched) and its state."""
    import gradio as gr

    from exporter.webui import chat_tab, eval_tab, export_tab, train_tab

    board = Board(opts)
    with gr.Blocks(title="exporter", analytics_enabled=False) as demo:
        _top_row(board)
        with gr.Tabs():
            train_tab.build(board, demo)
            eval_tab.build(board, demo)
            chat_tab.build(board, demo)
            export_tab.build(board, demo)
        comps = [c for _, c in board.labelled]
        board.top["lang"].change(board.relabel, [board.top["lang"]], comps, api_visibility="private")
    return demo, board


def check_options(opts: WebUIOptions) -> None:
    """One line (UserError) for options the board cannot run with, before Gradio starts: a port out of range or
    taken (the check `exporter serve` makes), a --runs-dir that is not a directory nor can be made one."""
    from exporter.errors import UserError
    from exporter.serve import listen

    listen(opts.host, opts.port).close()
    runs = Path(opts.runs_dir)
    first = next(p for p in (runs, *runs.absolute().parents) if p.exists())  # made at the first Start, not now
    if not first.is_dir():
        what = "not a directory" if first == runs else f"{first} is not a directory"
        raise UserError(f"--runs-dir {runs}: {what} (the board saves the configs it runs and their logs there)")
    if not os.access(first, os.W_OK | os.X_OK):
        raise UserError(f"--runs-dir {runs}: {first} is not writable")


def launch(opts: WebUIOptions, block: bool = True) -> Any:
    """Build and serve the board on opts.host:opts.port; a public link only with opts.share."""
    import gradio as gr

    check_options(opts)
    demo, _ = build(opts)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=opts.host, server_port=opts.port, share=opts.share, inbrowser=False, quiet=True,
        prevent_thread_lock=True, theme=gr.themes.Default(), css=CSS,
    )  # fmt: skip
    # our one line instead of Gradio's banner (which also advertises share=True)
    shared = f", public link {demo.share_url}" if demo.share_url else ""
    print(f"exporter webui on {demo.local_url}{shared} (Ctrl-C stops it)", flush=True)
    if block:
        demo.block_thread()
    return demo
