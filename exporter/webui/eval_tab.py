"""The Evaluate & Predict tab: `exporter predict` (BLEU-4 / ROUGE on a held-out set of the Train tab's data dir) and
`exporter eval` (MMLU / C-Eval / CMMLU accuracy), their options built as the CLI builds them (`PredictOptions`,
`EvalOptions`), written back as LLaMA-Factory `--key value` arguments and run as a subprocess of the real CLI, as the
Export tab runs its stages; the log is tailed live with the command's progress (done/total, ETA: `exporter.progress`)
and the scores the command wrote are shown as a table.

The model is the top row's model + adapter, or a merged dir / GGUF file the last export wrote (as the Chat tab offers).
"""

from __future__ import annotations

import dataclasses
import html
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.webui import jobs
from exporter.webui.locales import word

TASKS = ("mmlu_test", "ceval_validation", "cmmlu_test")
EVAL_TEMPLATES = ("fewshot", "chat")  # LF's plain few-shot text, or the chat template of the top row
PREDICT_METRICS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
                   "predict_samples_per_second", "predict_runtime")  # fmt: skip

# the forms' fields, in the order the handlers receive them (after lang, model, adapter, template, dataset dir, path)
PREDICT_FORM = ("dataset", "max_samples", "cutoff_len", "batch_size", "max_new_tokens", "do_sample", "temperature",
                "top_p", "output_dir")  # fmt: skip
EVAL_FORM = ("task", "task_dir", "eval_template", "n_shot", "lang", "eval_batch_size", "max_questions", "save_dir")


def default_dir(kind: str) -> str:
    """LLaMA-Factory's `saves/.../eval_<time>` style: a fresh dir per run (eval refuses an existing save_dir)."""
    return str(Path("saves") / time.strftime(f"{kind}_%Y-%m-%d-%H-%M-%S"))


def _text(v: Any) -> str:
    return "" if v is None else str(v).strip()


def _model(top: dict[str, Any]) -> dict[str, Any]:
    """The model keys: `path` (a merged dir or .gguf the export wrote) when given, else the top row's model + adapter;
    the top row's template when not auto."""
    path, model, adapter = _text(top["path"]), _text(top["model"]), _text(top["adapter"])
    if not (path or model):
        raise UserError("set the model path (top row) or a model to evaluate")
    template = top.get("template")
    return {"model_name_or_path": path or model, "adapter_name_or_path": None if path else adapter or None,
            "template": None if template in (None, "", "auto") else template}  # fmt: skip


def predict_options(top: dict[str, Any], f: dict[str, Any]) -> Any:
    """`PredictOptions` for the form (`top`: model, adapter, template, path, dataset_dir)."""
    from exporter.predict import PredictOptions

    if not f["dataset"]:
        raise UserError("pick one or more datasets of dataset_info.json to predict on")
    from exporter.webui.train_tab import number

    max_samples = number(f, "max_samples") if _text(f["max_samples"]) else None
    return PredictOptions(
        **_model(top), output_dir=_text(f["output_dir"]) or default_dir("predict"), eval_dataset=list(f["dataset"]),
        dataset_dir=_text(top["dataset_dir"]) or "data", max_samples=max_samples, cutoff_len=int(f["cutoff_len"]),
        per_device_eval_batch_size=int(f["batch_size"]), max_new_tokens=int(f["max_new_tokens"]),
        do_sample=bool(f["do_sample"]), temperature=float(f["temperature"]), top_p=float(f["top_p"]),
    )  # fmt: skip


def eval_options(top: dict[str, Any], f: dict[str, Any]) -> Any:
    """`EvalOptions` for the form; template `fewshot` is LF's plain text, `chat` the top row's chat template."""
    from exporter.evaluate import EvalOptions

    keys = _model(top)
    if f["eval_template"] == "fewshot":
        keys["template"] = "fewshot"
    max_q = int(f["max_questions"]) if f.get("max_questions") not in (None, "", 0) else None
    return EvalOptions(
        **keys, task=f["task"], task_dir=_text(f["task_dir"]) or "evaluation", lang=f["lang"],
        n_shot=int(f["n_shot"]), batch_size=int(f["eval_batch_size"]), max_questions=max_q,
        save_dir=_text(f["save_dir"]) or default_dir("eval"),
    )  # fmt: skip


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def to_argv(verb: str, opts: Any) -> list[str]:
    """`exporter VERB --key value ...` giving exactly `opts` (LF's key names; values equal to the defaults left out)."""
    argv = [verb]
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if value is None or value == _default(f):
            continue
        if isinstance(value, list):
            text = ",".join(map(str, value))
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{f.name}", text]
    return argv


# ------------------------------------------------------------------ results


def predict_table(out: Path) -> list[list[Any]]:
    """[[metric, value]] from predict_results.json (scores first, then speed)."""
    path = out / "predict_results.json"
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [[k, doc[k]] for k in PREDICT_METRICS if k in doc]


def eval_table(save_dir: Path) -> list[list[Any]]:
    """[[category, accuracy]] from LF's results.log (`{category:>15}: {accuracy:.2f}` lines, Average first)."""
    path = save_dir / "results.log"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, acc = line.rpartition(":")
        rows.append([name.strip(), float(acc)])
    return rows


# ------------------------------------------------------------------ running


def status_html(job: jobs.Job, lang: str) -> str:
    secs = (time.time() if job.running() else _ended(job)) - job.started
    state = ("running" if job.running() else "stopped" if job.stopped else "finished" if job.returncode == 0
             else "failed")  # fmt: skip
    css = {"running": "exp-stage-run", "finished": "exp-stage-pass", "failed": "exp-stage-fail"}.get(state, "")
    return (f'<p class="{css}" data-status="{state}"><b>{word(state, lang)}</b> {secs:.0f} s{_bar(job, lang)} '
            f"<code>{html.escape(jobs.command_line(job.argv))}</code></p>")  # fmt: skip


def _ended(job: jobs.Job) -> float:
    """When a finished command ended (its log's last write; a page loaded later shows how long it ran)."""
    try:
        return job.log.stat().st_mtime
    except OSError:
        return time.time()


def _bar(job: jobs.Job, lang: str) -> str:
    """` · predict 12/40 samples · ETA 0:01:05` from the command's progress bar (the ETA while it runs)."""
    p = job.progress()
    if p is None:
        return ""
    eta = p.get("eta_s")
    tail = f" · {word('eta', lang)} {timedelta(seconds=round(eta))}" if job.running() and eta is not None else ""
    return html.escape(f" · {p['what']} {p['done']}/{p['total']} {p['unit']}".rstrip() + tail)


def run(job: jobs.Job, verb: str, opts: Any, lang: str) -> Iterator[tuple[Any, ...]]:
    """Follow `job` (`exporter VERB` for `opts`), yielding (status, log, table) every second; the scores table at the
    end."""
    import pandas as pd

    cols = [word("metric", lang), word("score", lang)]
    empty = pd.DataFrame(columns=cols)
    for _ in job.follow():
        yield status_html(job, lang), job.tail(), empty
    if job.returncode != 0:
        error = word("stopped", lang) if job.stopped else job.error_line()
        yield status_html(job, lang), f"{job.tail()}\n\n{error}".strip(), empty
        return
    rows = predict_table(Path(opts.output_dir)) if verb == "predict" else eval_table(Path(opts.save_dir))
    yield status_html(job, lang), job.tail(), pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------ the tab


def build(board: Any, demo: Any) -> None:
    """The tab's components and events (API names eval_predict, eval_bench, eval_stop, eval_models,
    eval_monitor)."""
    import gradio as gr

    from exporter.webui.locales import label

    L, add = board.opts.lang, board.add  # noqa: N806
    c: dict[str, Any] = {}
    with add("tab_eval", gr.Tab(label("tab_eval", L), id="eval")) as tab:
        c["path"] = add("eval_path", gr.Dropdown([], value="", allow_custom_value=True, label=label("eval_path", L),
                                                 elem_id="eval_path"))  # fmt: skip
        with add("predict_box", gr.Accordion(label("predict_box", L), open=True)):
            with gr.Row():
                c["dataset"] = add("eval_dataset", gr.Dropdown([], multiselect=True, label=label("eval_dataset", L),
                                                               scale=2, elem_id="eval_dataset"))  # fmt: skip
                c["max_samples"] = add("max_samples", gr.Textbox("100000", label=label("max_samples", L),
                                                                    elem_id="eval_max_samples"))  # fmt: skip
                c["cutoff_len"] = add("cutoff_len", gr.Slider(4, 131072, 1024, step=1, label=label("cutoff_len", L)))
                c["batch_size"] = add("batch_size", gr.Slider(1, 1024, 2, step=1, label=label("batch_size", L)))
            with gr.Row():
                c["max_new_tokens"] = add("max_new_tokens", gr.Slider(1, 8192, 512, step=1,
                                                                      label=label("max_new_tokens", L),
                                                                      elem_id="eval_max_new_tokens"))  # fmt: skip
                c["do_sample"] = add("do_sample", gr.Checkbox(False, label=label("do_sample", L),
                                                              elem_id="eval_do_sample"))  # fmt: skip
                # greedy unless do_sample: the two are greyed out while they have no effect
                c["temperature"] = add("temperature", gr.Slider(0.01, 1.5, 0.95, step=0.01, interactive=False,
                                                                label=label("temperature", L),
                                                                elem_id="eval_temperature"))  # fmt: skip
                c["top_p"] = add("top_p", gr.Slider(0.01, 1, 0.7, step=0.01, interactive=False,
                                                    label=label("top_p", L), elem_id="eval_top_p"))  # fmt: skip
            with gr.Row():
                c["output_dir"] = add("output_dir", gr.Textbox(default_dir("predict"), label=label("output_dir", L),
                                                               scale=3, elem_id="eval_output_dir"))  # fmt: skip
                predict_btn = add("predict_btn", gr.Button(label("predict_btn", L), variant="primary",
                                                           elem_id="eval_predict"))  # fmt: skip
        with add("bench_box", gr.Accordion(label("bench_box", L), open=True)):
            with gr.Row():
                c["task"] = add("eval_task", gr.Dropdown(list(TASKS), value=TASKS[0], label=label("eval_task", L)))
                c["task_dir"] = add("task_dir", gr.Textbox("evaluation", label=label("task_dir", L), scale=2))
                c["eval_template"] = add("eval_template", gr.Dropdown(list(EVAL_TEMPLATES), value="fewshot",
                                                                      label=label("eval_template", L)))  # fmt: skip
                c["lang"] = add("eval_lang", gr.Dropdown(["en", "zh"], value="en", label=label("eval_lang", L)))
            with gr.Row():
                c["n_shot"] = add("n_shot", gr.Slider(0, 10, 5, step=1, label=label("n_shot", L)))
                c["eval_batch_size"] = add("eval_batch_size", gr.Slider(1, 256, 4, step=1,
                                                                        label=label("eval_batch_size", L)))  # fmt: skip
                c["max_questions"] = add("max_questions", gr.Number(0, precision=0, minimum=0,
                                                                    label=label("max_questions", L)))  # fmt: skip
            with gr.Row():
                c["save_dir"] = add("save_dir", gr.Textbox(default_dir("eval"), label=label("save_dir", L), scale=3))
                bench_btn = add("bench_btn", gr.Button(label("bench_btn", L), variant="primary",
                                                       elem_id="eval_bench"))  # fmt: skip
        stop_btn = add("eval_stop_btn", gr.Button(label("eval_stop_btn", L), variant="stop", elem_id="eval_stop"))
        status = gr.HTML(elem_id="eval_status")
        log = add("eval_log", gr.Textbox(label=label("eval_log", L), lines=6, max_lines=6, autoscroll=True,
                                         elem_id="eval_log"))  # fmt: skip
        table = add("eval_table", gr.Dataframe(headers=[word("metric", L), word("score", L)], label=label(
            "eval_table", L), elem_id="eval_table"))  # fmt: skip
    # on opening the tab: the last export's outputs, and the data dir's datasets
    tab.select(lambda d: (gr.update(choices=["", *board.chat_targets]), gr.update(choices=_datasets(d))),
               [board.top["dataset_dir"]], [c["path"], c["dataset"]], api_name="eval_models")  # fmt: skip
    c["do_sample"].change(sampling_fields, [c["do_sample"]], [c["temperature"], c["top_p"]],
                          api_visibility="private")  # fmt: skip
    _wire(board, demo, c, (predict_btn, bench_btn, stop_btn), [status, log, table])


def sampling_fields(do_sample: bool) -> tuple[Any, Any]:
    """Temperature and top-p take input only when they act: predict samples only with do_sample (LLaMA-Factory's
    board always samples; `exporter predict` is greedy unless asked)."""
    import gradio as gr

    return gr.update(interactive=bool(do_sample)), gr.update(interactive=bool(do_sample))


def _datasets(dataset_dir: str) -> list[str]:
    from exporter.webui.train_tab import list_datasets

    return list_datasets(dataset_dir)


def _wire(board: Any, demo: Any, c: dict[str, Any], buttons: tuple, outputs: list[Any]) -> None:
    import gradio as gr

    from exporter.webui.train_tab import FieldError

    top = board.top
    predict_btn, bench_btn, stop_btn = buttons
    head = [top["lang"], top["model"], top["adapter"], top["template"], top["dataset_dir"], c["path"]]

    def start(verb: str, form: tuple[str, ...], values: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        lang, model, adapter, template, dataset_dir, path, *rest = values
        t = {"model": model, "adapter": adapter, "template": template, "dataset_dir": dataset_dir, "path": path}
        f = dict(zip(form, rest, strict=True))
        with board.lock:  # not queued behind another page's run: checking and starting are one step
            busy = board.eval_run is not None and board.eval_run.running()
            error = job = None
            if not busy:
                try:
                    opts = predict_options(t, f) if verb == "predict" else eval_options(t, f)
                    job = board.eval_run = jobs.start(to_argv(verb, opts), board.runs_dir)
                    board.eval_opts = (verb, opts)  # for a page (re)loaded while it runs
                except UserError as e:
                    error = e
        if busy:  # a toast too: this page's monitor of that run overwrites the status within a second
            gr.Warning(word("busy", lang))
            yield f"<p>{word('busy', lang)}</p>", gr.skip(), gr.skip()
            return
        if error is not None:
            text = error.text(lang) if isinstance(error, FieldError) else str(error)
            yield f'<p class="exp-stage-fail">{word("failed", lang)}</p>', f"error: {text}", None
            return
        yield from run(job, verb, opts, lang)

    def on_predict(*values: Any) -> Iterator[tuple[Any, ...]]:
        yield from start("predict", PREDICT_FORM, values)

    def on_bench(*values: Any) -> Iterator[tuple[Any, ...]]:
        yield from start("eval", EVAL_FORM, values)

    def on_stop(lang: str) -> str:
        if board.eval_run is None or not board.eval_run.running():
            return word("nothing_running", lang)
        board.eval_run.stop()
        return word("stopped", lang)

    def on_monitor(lang: str) -> Iterator[tuple[Any, ...]]:
        """A page (re)loaded: the predict/eval command that runs, or how the last one ended."""
        if board.eval_run is None:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        verb, opts = board.eval_opts
        yield from run(board.eval_run, verb, opts, lang)

    predict_btn.click(on_predict, [*head, *(c[k] for k in PREDICT_FORM)], outputs, api_name="eval_predict",
                      concurrency_limit=None)  # fmt: skip
    bench_btn.click(on_bench, [*head, *(c[k] for k in EVAL_FORM)], outputs, api_name="eval_bench",
                    concurrency_limit=None)  # fmt: skip
    stop_btn.click(on_stop, [top["lang"]], [outputs[1]], api_name="eval_stop", concurrency_limit=None)
    demo.load(on_monitor, [top["lang"]], outputs, api_name="eval_monitor", concurrency_limit=None)
