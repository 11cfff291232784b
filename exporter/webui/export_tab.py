"""The Export tab: merge -> quantize -> gguf -> verify, each stage's options built as the CLI builds them
(`MergeOptions`, `QuantizeOptions`, `GGUFOptions`, `VerifyOptions`), written back as that command's flags and run as
a subprocess of the real CLI, one after the other; then the verify table, each Modelfile and the `ollama create`
commands. Every stage's options are checked before the first one runs; run again, the board skips the stages it
finished in that export dir (same command, files still as their manifest says) as `exporter pipeline` does, and
reruns a changed one over its own output.
"""

from __future__ import annotations

import dataclasses
import html
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.webui import jobs
from exporter.webui.locales import word

STAGES = ("merge", "quantize", "gguf", "verify")
DEFAULT_TYPES = ["f16", "q8_0"]
MERGE_DTYPES = ("auto", "bf16", "fp16", "fp32")

# each command's flags: options field -> flag (the CLI's own names, exporter/cli.py); a positional field first
POSITIONAL = {"merge": None, "quantize": "model", "gguf": "model", "verify": None}
FLAGS: dict[str, dict[str, str]] = {
    "merge": {"base": "--base", "adapters": "--adapter", "weights": "--weight", "out": "--out", "dtype": "--dtype",
              "max_shard_size": "--max-shard-size", "template": "--template", "force": "--force"},
    "quantize": {"method": "--method", "out": "--out", "bits": "--bits", "group_size": "--group-size",
                 "dataset": "--dataset", "dataset_dir": "--dataset-dir", "template": "--template",
                 "samples": "--samples", "max_length": "--max-length", "seed": "--seed", "force": "--force"},
    "gguf": {"types": "--type", "out": "--out", "ollama_name": "--ollama-name", "template": "--template",
             "adapter": "--adapter", "base_gguf": "--base-gguf", "force": "--force"},
    "verify": {"base": "--base", "adapter": "--adapter", "merged": "--merged", "ggufs": "--gguf",
               "modelfiles": "--modelfile", "quantized": "--quantized", "run_dir": "--run-dir",
               "template": "--template", "prompts": "--prompts", "text": "--text", "data": "--data", "ctx": "--ctx",
               "max_windows": "--max-windows", "max_new_tokens": "--max-new-tokens"},
}  # fmt: skip


def options_class(stage: str) -> type:
    if stage == "merge":
        from exporter.merge import MergeOptions as cls
    elif stage == "quantize":
        from exporter.quantize import QuantizeOptions as cls
    elif stage == "gguf":
        from exporter.gguf import GGUFOptions as cls
    else:
        from exporter.verify import VerifyOptions as cls
    return cls


def to_argv(stage: str, opts: Any) -> list[str]:
    """`exporter STAGE ...` arguments that give exactly `opts` (values equal to the defaults are left out)."""
    argv = [stage]
    pos = POSITIONAL[stage]
    if pos:
        argv.append(str(getattr(opts, pos)))
    defaults = {f.name: f.default for f in dataclasses.fields(opts) if f.default is not dataclasses.MISSING}
    for field, flag in FLAGS[stage].items():
        value = getattr(opts, field)
        if value is None or value is False or value == [] or (field in defaults and value == defaults[field]):
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    unknown = {f.name for f in dataclasses.fields(opts)} - set(FLAGS[stage]) - {pos}
    set_unknown = [f for f in unknown if getattr(opts, f) not in (None, [], {}, defaults.get(f))]
    if set_unknown:
        raise UserError(f"exporter {stage}: {', '.join(sorted(set_unknown))} has no command-line flag")
    return argv


# ------------------------------------------------------------------ the chain


def default_out(model: str, adapter: str) -> str:
    name = Path((adapter or model or "model").rstrip("/")).name or "model"
    return str(Path("exports") / time.strftime(f"{name}-%Y%m%d-%H%M%S"))


def _template(f: dict[str, Any]) -> str | None:
    return None if f.get("template") in (None, "", "auto") else f["template"]


def stages_for(f: dict[str, Any]) -> list[str]:
    """Which stages the form asks for: merge when there is an adapter, the others as chosen."""
    chosen = {"merge": bool(f["adapter"]), "quantize": f["quant_method"] != "none", "gguf": bool(f["gguf_types"]),
              "verify": bool(f["verify"])}  # fmt: skip
    return [s for s in STAGES if chosen[s]]


def merged_dir(f: dict[str, Any]) -> Path:
    """The full model the later stages read: the merge output, or the model itself when there is no adapter."""
    return Path(f["export_out"]) / "merged" if f["adapter"] else Path(f["model"])


def stage_options(stage: str, f: dict[str, Any]) -> Any:
    """The options of one stage from the form `f` (verify: from what the earlier stages wrote)."""
    out, template, merged = Path(f["export_out"]), _template(f), merged_dir(f)
    if stage == "merge":
        dtype = None if f["merge_dtype"] == "auto" else f["merge_dtype"]
        return options_class("merge")(base=f["model"], adapters=[f["adapter"]], out=str(out / "merged"), dtype=dtype,
                                      template=template)  # fmt: skip
    if stage == "quantize":
        return options_class("quantize")(
            model=str(merged), method=f["quant_method"], out=str(out / f"quantized-{f['quant_method']}"),
            bits=int(f["quant_bits"]) if f.get("quant_bits") else None, dataset=f.get("quant_dataset") or None,
            dataset_dir=(f.get("dataset_dir") or None) if f.get("quant_dataset") else None, template=template,
        )  # fmt: skip
    if stage == "gguf":
        return options_class("gguf")(model=str(merged), types=[",".join(f["gguf_types"])], out=str(out / "gguf"),
                                     ollama_name=f.get("ollama_name") or None, template=template)  # fmt: skip
    gguf_dir = out / "gguf"
    quantized = out / f"quantized-{f['quant_method']}"
    return options_class("verify")(
        base=Path(f["model"]) if f["adapter"] else None, adapter=Path(f["adapter"]) if f["adapter"] else None,
        merged=merged, ggufs=sorted(gguf_dir.glob("*.gguf")), modelfiles=sorted(gguf_dir.glob("Modelfile.*")),
        quantized=[quantized] if quantized.is_dir() else [], template=template, prompts=int(f["verify_prompts"]),
    )  # fmt: skip


def check_form(f: dict[str, Any], stages: list[str]) -> None:
    """What LLaMA-Factory's export tab checks first (a model, an export dir, something to export), one line naming
    the field: an empty model ran `exporter gguf .` on the board's working dir, an empty export dir wrote `merged/`
    there, and nothing chosen ended at once as a "0/0" that said nothing."""
    from exporter.webui.locales import label

    if not str(f.get("model") or "").strip():
        raise UserError(f"{label('model', 'en')}: set the model to export")
    if not str(f.get("export_out") or "").strip():
        raise UserError(f"{label('export_out', 'en')}: set the dir the export writes into")
    if not stages:
        raise UserError("nothing to export: set an adapter to merge, or choose a quantize method, GGUF types or "
                        "verify")  # fmt: skip


def check_stages(f: dict[str, Any], stages: list[str]) -> None:
    """Every chosen stage's options checked as its command checks them, before the first stage runs (a bad Ollama
    name used to fail gguf after merge had run); UserError names the first bad one."""
    from exporter import gguf, hub, merge, quantize

    check_form(f, stages)
    for stage in stages:
        if stage == "verify":  # its options are what the earlier stages write
            continue
        opts = stage_options(stage, f)
        if stage == "merge":
            merge.check_options(opts)
        elif stage == "quantize":  # and what `exporter quantize` checks before loading the model, on the base
            _, group = quantize.check_options(opts)  # (the merge keeps its config and layer shapes), as `export`
            quantize.require(opts.method)
            quantize.check_model(opts, hub.resolve(f["model"], "model"), group)
        else:
            gguf.check_options(opts)


def _state_path(f: dict[str, Any]) -> Path:
    """Where the board records each finished stage's command line in the export dir (`exporter pipeline`'s way)."""
    return Path(f["export_out"]) / "webui_stages.json"


def _stage_output(stage: str, f: dict[str, Any]) -> Path:
    out = Path(f["export_out"])
    return {"merge": out / "merged", "quantize": out / f"quantized-{f['quant_method']}", "gguf": out / "gguf",
            "verify": report_path(f)}[stage]  # fmt: skip


def _finished(stage: str, argv: list[str], f: dict[str, Any], done: dict[str, list[str]]) -> bool:
    """Whether an earlier run of the board finished `stage` with the same command and its files still match their
    manifest (a changed or truncated file runs it again)."""
    from exporter import manifest

    if done.get(stage) != argv:
        return False
    out = _stage_output(stage, f)
    return out.is_file() if stage == "verify" else manifest.changed(out) is None


def _read_state(f: dict[str, Any]) -> dict[str, list[str]]:
    try:
        doc = json.loads(_state_path(f).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_state(f: dict[str, Any], done: dict[str, list[str]]) -> None:
    Path(f["export_out"]).mkdir(parents=True, exist_ok=True)
    _state_path(f).write_text(json.dumps(done, indent=1), encoding="utf-8")


def chat_targets(f: dict[str, Any]) -> list[str]:
    """What the export wrote that the Chat tab can load: the merged dir, the quantized dir, each GGUF."""
    out = Path(f["export_out"])
    dirs = [out / "merged", out / f"quantized-{f['quant_method']}"]
    ggufs = sorted((out / "gguf").glob("*.gguf")) if (out / "gguf").is_dir() else []
    return [str(p) for p in dirs if (p / "config.json").is_file()] + [str(p) for p in ggufs]


def report_path(f: dict[str, Any]) -> Path:
    return Path(f["export_out"]) / "report.json"


@dataclasses.dataclass
class StageState:
    name: str
    status: str = "pending"  # pending | running | pass | fail | stopped | skipped (finished in an earlier run)
    command: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class ExportRun:
    """The chain as it runs, in a thread of its own (a page closed or reloaded mid-export leaves it running, and a
    reloaded page follows it again): per-stage state, the current subprocess, how it ended."""

    stages: list[StageState]
    f: dict[str, Any] = dataclasses.field(default_factory=dict)  # the form it runs
    job: jobs.Job | None = None
    stopped: bool = False
    error: str = ""  # a one-line error that ended it before or between commands
    thread: threading.Thread | None = None

    def stop(self) -> None:
        self.stopped = True
        if self.job is not None:
            self.job.stop()

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def progress_html(run: ExportRun, lang: str) -> str:
    done = sum(s.status in ("pass", "skipped") for s in run.stages)
    icons = {"pending": "·", "running": "▶", "pass": "✓", "fail": "✗", "stopped": "■", "skipped": "✓"}
    css = {"running": "exp-stage-run", "pass": "exp-stage-pass", "fail": "exp-stage-fail"}
    words = {"pending": word("pending", lang), "running": word("running", lang), "pass": "",
             "fail": word("failed", lang), "stopped": word("stopped", lang),
             "skipped": word("skipped", lang)}  # fmt: skip
    rows = []
    for s in run.stages:
        secs = f" {s.seconds:.1f} s" if s.status not in ("pending", "skipped") else ""
        rows.append(
            f'<li class="{css.get(s.status, "")}" data-stage="{s.name}" data-status="{s.status}">'
            f"{icons[s.status]} <b>{s.name}</b>{secs} {words[s.status]} <code>{html.escape(s.command)}</code></li>"
        )
    bar = f'<progress value="{done}" max="{len(run.stages)}"></progress>'
    return f'<div class="exp-progress">{bar}<span>{done}/{len(run.stages)}</span></div><ul>{"".join(rows)}</ul>'


def stage_argv(stage: str, f: dict[str, Any], force: bool = False) -> list[str]:
    """The `exporter STAGE ...` arguments of one stage (`force`: overwrite what an earlier board run wrote)."""
    opts = stage_options(stage, f)
    if force and hasattr(opts, "force"):
        opts.force = True
    argv = to_argv(stage, opts)
    return argv + ["--report", str(report_path(f))] if stage == "verify" else argv


def _run_stage(run: ExportRun, st: StageState, f: dict[str, Any], runs_dir: Path, done: dict[str, list[str]],
               force: bool) -> None:  # fmt: skip
    """Run one stage to its end; sets st.status (and st.seconds as it runs). A stage an earlier run of the board
    wrote with other settings (or whose files changed) is overwritten (--force), as `exporter pipeline` reruns it; a
    dir the board did not write keeps the command's "already exists" error."""
    argv = stage_argv(st.name, f, force)
    st.command, st.status = jobs.command_line(argv), "running"
    run.job = jobs.start(argv, runs_dir)
    if run.stopped:  # Stop came while it was starting
        run.job.stop()
    for st.seconds in run.job.follow():
        pass
    st.seconds = time.time() - run.job.started
    rc = run.job.returncode
    ok = rc == 0 or (st.name == "verify" and rc == 1 and report_path(f).is_file())  # 1: checks ran, some failed
    st.status = "stopped" if run.stopped else "pass" if ok else "fail"
    if st.status == "pass":
        done[st.name] = stage_argv(st.name, f)
        _write_state(f, done)


def verify_results(f: dict[str, Any], lang: str) -> tuple[str, Any]:
    """(summary line, table rows) from report.json."""
    import pandas as pd

    path = report_path(f)
    cols = ["check", "target", "status", "detail"]
    if not path.is_file():
        return "", pd.DataFrame(columns=cols)
    doc = json.loads(path.read_text(encoding="utf-8"))
    s = doc["summary"]
    verdict = "PASS" if doc["passed"] else "FAIL"
    line = (f"**{word('verify_word', lang)}: {verdict}** — {s['pass']} {word('passed', lang)}, "
            f"{s['fail']} {word('failed_n', lang)}, {s['skip']} {word('skipped_n', lang)}")  # fmt: skip
    rows = [[c["check"], c["target"], c["status"], c["detail"]] for c in doc["checks"]]
    return line, pd.DataFrame(rows, columns=cols)


def ollama_outputs(f: dict[str, Any]) -> tuple[str, str]:
    """(each Modelfile as Markdown, the `ollama create` commands) of the gguf dir."""
    from exporter.gguf import ollama_names, parse_types

    gguf_dir = Path(f["export_out"]) / "gguf"
    files = sorted(gguf_dir.glob("Modelfile.*")) if gguf_dir.is_dir() else []
    if not files:
        return "", ""
    md = "\n\n".join(f"**{p.name}**\n```\n{p.read_text(encoding='utf-8')}\n```" for p in files)
    kinds = [p.name.removeprefix("Modelfile.") for p in files]
    names = ollama_names(merged_dir(f), parse_types(kinds), f.get("ollama_name") or None)
    cmds = [f"cd {gguf_dir}"] + [f"ollama create {names[k]} -f Modelfile.{k}" for k in kinds]
    return md, "\n".join(cmds)


def _chain(run: ExportRun, board: Any) -> None:
    """Run the chosen stages one after the other (the thread of `run`); the Chat tab then offers what they wrote."""
    f, current = run.f, None
    try:
        check_stages(f, [s.name for s in run.stages])
        done = _read_state(f)
        wrote = set(done)  # stages an earlier board run finished here: rerun over them (--force)
        rerun = False
        for k, current in enumerate(run.stages):
            if run.stopped:
                current.status = "stopped"
                return
            if not rerun and _finished(current.name, stage_argv(current.name, f), f, done):
                current.status, current.command = "skipped", jobs.command_line(done[current.name])
                continue
            if not rerun:  # this stage and every later one run again
                rerun = True
                for later in run.stages[k:]:
                    done.pop(later.name, None)
                _write_state(f, done)
            _run_stage(run, current, f, board.runs_dir, done, current.name in wrote)
            if current.status != "pass":
                return
    except Exception as e:  # the page shows one line, never a thread's traceback
        if current is not None and current.status in ("pending", "running"):
            current.status = "fail"
        run.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        return
    board.chat_targets = chat_targets(f)  # the Chat tab offers them


def start_chain(f: dict[str, Any], board: Any) -> ExportRun:
    """Start the chain of the form `f` in a thread of its own; it is `board.export_run` from then on."""
    run = ExportRun([StageState(s) for s in stages_for(f)], f)
    run.thread = threading.Thread(target=_chain, args=(run, board), name="exporter-webui-export", daemon=True)
    board.export_run = run
    run.thread.start()
    return run


def watch(run: ExportRun, lang: str, every: float = 1.0) -> Iterator[tuple[Any, ...]]:
    """(progress, output tail, verify summary, verify table, Modelfiles, commands) every `every` seconds while the
    chain runs, then how it ended (the verify table and the Ollama commands when every stage passed)."""
    import gradio as gr

    skip = (gr.skip(),) * 4
    while run.running():
        yield (progress_html(run, lang), run.job.tail() if run.job else "", *skip)
        time.sleep(every)
    tail = run.job.tail() if run.job else ""
    if run.error:
        yield (progress_html(run, lang), f"error: {run.error}", *skip)
        return
    ended = [s for s in run.stages if s.status in ("fail", "stopped", "pending")]
    if ended or run.stopped:
        failed = any(s.status == "fail" for s in run.stages)
        error = run.job.error_line() if failed and run.job else word("stopped", lang)
        text = tail if tail.rstrip().endswith(error) else f"{tail}\n\n{error}".strip()
        yield (progress_html(run, lang), text, *skip)
        return
    summary, table = verify_results(run.f, lang)
    modelfiles, commands = ollama_outputs(run.f)
    yield (progress_html(run, lang), tail, summary, table, modelfiles, commands)


def run_chain(f: dict[str, Any], board: Any, lang: str) -> Iterator[tuple[Any, ...]]:
    """Run the chosen stages; yields (progress, output tail, verify summary, verify table, Modelfiles, commands)."""
    yield from watch(start_chain(f, board), lang)


# ------------------------------------------------------------------ the tab


FORM = ("export_out", "merge_dtype", "quant_method", "quant_bits", "quant_dataset", "gguf_types", "ollama_name",
        "verify", "verify_prompts")  # fmt: skip


def build(board: Any, demo: Any) -> None:
    """The Export tab's components and events (API names export_run, export_stop, export_monitor)."""
    import gradio as gr

    from exporter.gguf import ALL_KINDS
    from exporter.quantize import METHODS
    from exporter.webui.locales import label

    L, add = board.opts.lang, board.add  # noqa: N806
    c: dict[str, Any] = {}
    with add("tab_export", gr.Tab(label("tab_export", L), id="export")):
        with gr.Row():
            c["export_out"] = add("export_out", gr.Textbox(default_out("", ""), label=label("export_out", L), scale=3,
                                                           elem_id="export_out"))  # fmt: skip
            c["merge_dtype"] = add("merge_dtype", gr.Dropdown(list(MERGE_DTYPES), value="auto",
                                                              label=label("merge_dtype", L)))  # fmt: skip
        with gr.Row():
            c["quant_method"] = add("quant_method", gr.Dropdown(["none", *METHODS], value="none",
                                                                label=label("quant_method", L)))  # fmt: skip
            c["quant_bits"] = add("quant_bits", gr.Dropdown(["4", "8"], value="4", label=label("quant_bits", L)))
            c["quant_dataset"] = add("quant_dataset", gr.Textbox(label=label("quant_dataset", L)))
        with gr.Row():
            c["gguf_types"] = add("gguf_types", gr.CheckboxGroup(list(ALL_KINDS), value=DEFAULT_TYPES,
                                                                 label=label("gguf_types", L), elem_id="gguf_types",
                                                                 scale=3))  # fmt: skip
            c["ollama_name"] = add("ollama_name", gr.Textbox(label=label("ollama_name", L), elem_id="ollama_name"))
        with gr.Row():
            c["verify"] = add("verify", gr.Checkbox(True, label=label("verify", L)))
            c["verify_prompts"] = add("verify_prompts", gr.Slider(0, 16, 4, step=1, label=label("verify_prompts", L)))
        with gr.Row():
            run_btn = add("export_btn", gr.Button(label("export_btn", L), variant="primary", elem_id="export_run"))
            stop_btn = add("export_stop_btn", gr.Button(label("export_stop_btn", L), variant="stop",
                                                         elem_id="export_stop"))  # fmt: skip
        progress = gr.HTML(elem_id="export_progress")
        log = add("export_log", gr.Textbox(label=label("export_log", L), lines=6, max_lines=6, autoscroll=True,
                                           elem_id="export_log"))  # fmt: skip
        summary = gr.Markdown(elem_id="verify_summary")
        table = add("verify_table", gr.Dataframe(headers=["check", "target", "status", "detail"], wrap=True,
                                                 label=label("verify_table", L), elem_id="verify_table"))  # fmt: skip
        with gr.Row():
            modelfiles = gr.Markdown(elem_id="modelfiles")
            commands = add("ollama_commands", gr.Code(language="shell", label=label("ollama_commands", L),
                                                      elem_id="ollama_commands"))  # fmt: skip
    top = board.top
    inputs = [top["lang"], top["model"], top["adapter"], top["template"], top["dataset_dir"], *(c[k] for k in FORM)]
    outputs = [progress, log, summary, table, modelfiles, commands]

    def on_run(*values: Any) -> Iterator[tuple[Any, ...]]:
        lang, model, adapter, template, dataset_dir, *rest = values
        f = dict(zip(FORM, rest, strict=True)) | {"model": (model or "").strip(), "adapter": (adapter or "").strip(),
                                                   "template": template, "dataset_dir": dataset_dir}  # fmt: skip
        with board.lock:  # not queued behind another page's export: checking and starting are one step
            busy = board.export_run is not None and board.export_run.running()
            if not busy:
                run = start_chain(f, board)
        if busy:  # a toast too: this page's monitor of that run overwrites the progress within a second
            gr.Warning(word("busy", lang))
            yield (f"<p>{word('busy', lang)}</p>", *(gr.skip(),) * 5)
            return
        yield from watch(run, lang)

    def on_stop(lang: str) -> str:
        if board.export_run is None or not board.export_run.running():
            return word("nothing_running", lang)
        board.export_run.stop()
        return word("stopped", lang)

    def on_monitor(lang: str) -> Iterator[tuple[Any, ...]]:
        """A page (re)loaded: the export that runs, or how the last one ended."""
        if board.export_run is None:
            yield (gr.skip(),) * 6
            return
        yield from watch(board.export_run, lang)

    run_btn.click(on_run, inputs, outputs, api_name="export_run", concurrency_limit=None)
    stop_btn.click(on_stop, [top["lang"]], [log], api_name="export_stop", concurrency_limit=None)
    demo.load(on_monitor, [top["lang"]], outputs, api_name="export_monitor", concurrency_limit=None)
    for src in (top["model"], top["adapter"]):  # on blur, as the Train tab's output dir
        src.blur(default_out, [top["model"], top["adapter"]], [c["export_out"]], api_visibility="private",
                 trigger_mode="always_last")  # fmt: skip
    c["quant_method"].change(_bits_choices, [c["quant_method"]], [c["quant_bits"]], api_visibility="private")


def _bits_choices(method: str) -> Any:
    import gradio as gr

    from exporter.quantize import BITS

    bits = [str(b) for b in BITS.get(method, (4, 8))]
    return gr.update(choices=bits, value=bits[0])
