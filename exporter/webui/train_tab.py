"""The Train tab: LLaMA-Factory's training form -> an `exporter train` YAML, parsed and checked by `lf_args` exactly as
the CLI parses it, run as `exporter train CONFIG.yaml` in a subprocess; `trainer_log.jsonl` is tailed into a progress
bar with ETA and a live loss plot. "Preview data" renders the first rows through the template as training sees them
(`examples.prepare`, or the saved `tokenized_path` training reads instead), trained tokens marked. "Extra arguments"
takes any other training key as JSON, as LLaMA-Factory's board does.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import tempfile
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from exporter.errors import UserError
from exporter.webui import jobs
from exporter.webui.locales import LABELS, label, word

# LLaMA-Factory 0.9.5's web board defaults (llamafactory/webui/components/train.py); compute_type is bf16 there and
# falls back to fp32 here when no CUDA GPU is present (PyTorch trains neither fp16 nor fast bf16 on a CPU).
LF_DEFAULTS: dict[str, Any] = {
    "learning_rate": "5e-5", "num_train_epochs": "3.0", "max_grad_norm": "1.0", "max_samples": "100000",
    "compute_type": "bf16", "cutoff_len": 2048, "batch_size": 2, "gradient_accumulation_steps": 8, "val_size": 0.0,
    "lr_scheduler_type": "cosine", "logging_steps": 5, "save_steps": 100, "warmup_steps": 0, "optim": "adamw_torch",
    "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "loraplus_lr_ratio": 0.0, "lora_target": "",
}  # fmt: skip
COMPUTE_TYPES = ("bf16", "fp16", "fp32")
PREVIEW_ROWS = 3
_INTS = ("batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps", "warmup_steps", "seed",
         "lora_rank", "lora_alpha")  # fmt: skip

# the form's fields, in the order the handlers receive them (after the top row's model, adapter, template)
FORM = (
    "stage", "method", "dataset_dir", "dataset", "learning_rate", "num_train_epochs", "max_grad_norm", "max_samples",
    "compute_type", "cutoff_len", "batch_size", "gradient_accumulation_steps", "val_size", "lr_scheduler_type",
    "logging_steps", "save_steps", "warmup_steps", "max_steps", "optim", "seed", "packing", "train_on_prompt",
    "identity_name", "identity_author", "lora_rank", "lora_alpha", "lora_dropout", "loraplus_lr_ratio", "lora_target",
    "use_rslora", "use_dora", "output_dir", "overwrite_output_dir", "extra_args",
)  # fmt: skip


# ------------------------------------------------------------------ what `exporter train` supports


def _literal(field: str) -> tuple[str, ...]:
    from exporter.lf_args import TrainConfig

    return typing.get_args(typing.get_type_hints(TrainConfig)[field])


def stages() -> tuple[str, ...]:
    """Training stages `exporter train` accepts (TrainConfig.stage)."""
    return _literal("stage")


def methods() -> list[str]:
    """Fine-tuning methods: TrainConfig's finetuning types, plus QLoRA when quantization_bit is supported."""
    from exporter.lf_args import UNSUPPORTED, TrainConfig

    types = list(_literal("finetuning_type"))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if "quantization_bit" in fields and "quantization_bit" not in UNSUPPORTED:
        types.insert(types.index("lora") + 1, "qlora")
    return types


def schedulers() -> tuple[str, ...]:
    return _literal("lr_scheduler_type")


def optimizers() -> tuple[str, ...]:
    return _literal("optim")


def default_compute_type() -> str:
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def list_datasets(dataset_dir: str) -> list[str]:
    """Dataset names registered in `dataset_dir`/dataset_info.json ([] when there is none or it is unreadable)."""
    from exporter import dataset_info

    try:
        return sorted(dataset_info.read_info(Path(dataset_dir or "data")))
    except UserError:
        return []


def default_output_dir(model: str, method: str) -> str:
    """LLaMA-Factory's `saves/<model>/<method>/train_<time>`."""
    name = Path(model.rstrip("/")).name if model else "model"
    return str(Path("saves") / (name or "model") / method / time.strftime("train_%Y-%m-%d-%H-%M-%S"))


# ------------------------------------------------------------------ form -> LLaMA-Factory keys


def _text(v: Any) -> str:
    return "" if v is None else str(v).strip()


def number(f: dict[str, Any], key: str, kind: type = int) -> Any:
    """A number box or slider's value as `kind`; FieldError (one line naming the field) when it is empty or not a
    number (a cleared Seed box hands over None)."""
    try:
        return kind(f[key])
    except (TypeError, ValueError):
        got = "nothing" if f[key] in (None, "") else repr(f[key])
        raise FieldError(key, f"expected {'an integer' if kind is int else 'a number'}, got {got}") from None


def train_args(f: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """The LLaMA-Factory training keys for the form `f` (values as the form holds them; `parse` types them)."""
    method = f["method"]
    a: dict[str, Any] = {"stage": f["stage"], "do_train": True, "model_name_or_path": _text(f["model"])}
    if _text(f.get("adapter")):
        a["adapter_name_or_path"] = _text(f["adapter"])
    if f.get("template") and f["template"] != "auto":
        a["template"] = f["template"]
    a["finetuning_type"] = "lora" if method == "qlora" else method
    if method == "qlora":
        a["quantization_bit"] = 4
    a["dataset_dir"] = _text(f["dataset_dir"]) or "data"
    a["dataset"] = ",".join(f["dataset"] or [])
    a["cutoff_len"] = number(f, "cutoff_len")
    for key in ("max_samples", "learning_rate", "num_train_epochs"):
        if _text(f[key]):
            a[key] = _text(f[key])
    if f.get("max_steps") not in (None, "") and number(f, "max_steps") > 0:
        a["max_steps"] = number(f, "max_steps")
    n = {k: number(f, k) for k in _INTS}  # sliders and number boxes hand over floats
    a.update(
        per_device_train_batch_size=n["batch_size"], gradient_accumulation_steps=n["gradient_accumulation_steps"],
        lr_scheduler_type=f["lr_scheduler_type"], max_grad_norm=_text(f["max_grad_norm"]),
        logging_steps=n["logging_steps"], save_steps=n["save_steps"], warmup_steps=n["warmup_steps"],
        optim=f["optim"], packing=bool(f["packing"]), train_on_prompt=bool(f["train_on_prompt"]), seed=n["seed"],
    )  # fmt: skip
    if f["compute_type"] in ("bf16", "fp16"):
        a[f["compute_type"]] = True
    a.update(extra_args(f))  # as LLaMA-Factory's board: over the keys above, under the LoRA/eval fields below
    if number(f, "val_size", float) > 0:  # as LLaMA-Factory's board: evaluate every save_steps
        a.update(val_size=f["val_size"], eval_strategy="steps", eval_steps=n["save_steps"],
                 per_device_eval_batch_size=n["batch_size"])  # fmt: skip
    if a["finetuning_type"] == "lora":
        a.update(lora_rank=n["lora_rank"], lora_alpha=n["lora_alpha"], lora_dropout=f["lora_dropout"],
                 lora_target=_text(f["lora_target"]) or "all", use_rslora=bool(f["use_rslora"]),
                 use_dora=bool(f["use_dora"]))  # fmt: skip
        if number(f, "loraplus_lr_ratio", float) > 0:
            a["loraplus_lr_ratio"] = f["loraplus_lr_ratio"]
    for key in ("identity_name", "identity_author"):
        if _text(f.get(key)):
            a[key] = _text(f[key])
    a["output_dir"] = _text(f["output_dir"])
    if resume:
        a["resume_from_checkpoint"] = True
    elif f.get("overwrite_output_dir"):
        a["overwrite_output_dir"] = True
    a["plot_loss"] = True
    return a


def extra_args(f: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory's "Extra arguments" box: a JSON object of training keys (how its board sets any key it has no
    field for, e.g. tokenized_path); FieldError when it is not one."""
    text = _text(f.get("extra_args"))
    if not text:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise FieldError(
            "extra_args", f"expected a JSON object of LLaMA-Factory keys, got {text!r} ({e.msg})"
        ) from None
    if not isinstance(extra, dict):
        raise FieldError("extra_args", f"expected a JSON object of LLaMA-Factory keys, got {text!r}")
    return extra


def _yaml_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)  # LF's style: dataset: a,b; lora_target: all
    return v


def parse(args: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Check `args` as `exporter train CONFIG.yaml` would (lf_args: unknown keys, types, what cannot be honoured);
    returns the typed keys (for the YAML the board saves) and the TrainConfig."""
    import torch

    from exporter import lf_args

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.yaml"
        path.write_text(yaml.safe_dump(args, sort_keys=False, allow_unicode=True), encoding="utf-8")
        try:
            cfg, given = lf_args.config_from_args([str(path)])
            if not cfg.model_name_or_path:
                raise UserError("model_name_or_path: set the model path (an HF model dir)")
            if not cfg.output_dir:
                raise UserError("output_dir: set the output dir")
            lf_args.check(cfg, given, "cuda" if torch.cuda.is_available() else "cpu")
        except UserError as e:  # about a file the user never sees: name the form's field instead
            raise field_error(str(e).replace(f"{path}: ", "")) from None
    typed = {k: _yaml_value(getattr(cfg, k)) for k in args}
    # a whole number stays one (logging_steps: 5, not 5.0, though HF types it float)
    return {k: args[k] if isinstance(args[k], int) and typed[k] == args[k] else typed[k] for k in args}, cfg


# LLaMA-Factory keys the form names otherwise (key -> the form field's label key)
_FIELD_OF = {"model_name_or_path": "model", "adapter_name_or_path": "adapter", "per_device_train_batch_size":
             "batch_size", "finetuning_type": "method"}  # fmt: skip


class FieldError(UserError):
    """A bad value of one form field: `field` (a locales.LABELS key) and what is wrong (`detail`)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{label(field, 'en')}: {detail}")
        self.field, self.detail = field, detail

    def text(self, lang: str) -> str:
        return f"{label(self.field, lang)}: {self.detail}"


def field_error(message: str) -> UserError:
    """lf_args' "KEY must be ..., got ..." (or "KEY: ...") as the form field that holds KEY; else as it is."""
    m = re.match(r"(\w+)(?: must be |: )(.*)", message, re.S)
    key = _FIELD_OF.get(m[1], m[1]) if m else None
    if m is None or key not in LABELS:
        return UserError(message)
    return FieldError(key, f"expected {m[2]}" if message[len(m[1]) :].startswith(" must be ") else m[2])


def yaml_text(args: dict[str, Any]) -> str:
    return yaml.safe_dump(args, sort_keys=False, allow_unicode=True)


def flags_command(args: dict[str, Any]) -> str:
    """The same run as LLaMA-Factory-style flags: text keys as typed, other values as the YAML scalar they are, so
    each parses back to the same value (`lf_args.parse_args`)."""
    from exporter import lf_args

    argv = ["train"]
    for k, v in args.items():
        text = isinstance(v, str) and lf_args.text_key(k)
        scalar = yaml.safe_dump(v, default_flow_style=True, width=10**9).strip().removesuffix("\n...")
        argv += [f"--{k}", v if text else scalar]
    return jobs.command_line(argv)


# ------------------------------------------------------------------ data preview


def preview_rows(args: dict[str, Any], n: int = PREVIEW_ROWS) -> list[tuple[list[tuple[str, bool]], int, int]]:
    """The first `n` rows of each dataset as training encodes them: [(segments (text, trained), tokens, trained)];
    with a `tokenized_path` that holds LLaMA-Factory's saved dataset, its first `n` train rows (what training reads
    instead of the datasets). Writes nothing (training, not the preview, saves a tokenized_path)."""
    from exporter import data, examples, hub

    _, cfg = parse(args)
    cfg = dataclasses.replace(cfg, max_samples=n, val_size=0.0, packing=False)
    prep = data.prepare_tokenized(cfg, hub.resolve(cfg.model_name_or_path, "model"), save=False)
    rows = []
    for ex in prep.train[: n if data.has_tokenized(cfg.tokenized_path) else None]:
        flags = [lab != examples.IGNORE for lab in ex.labels]
        cuts = [0] + [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]] + [len(flags)]
        texts = [prep.tokenizer.decode(ex.input_ids[:c], skip_special_tokens=False) for c in cuts]
        segs = [(texts[k + 1][len(texts[k]) :], flags[cuts[k]]) for k in range(len(cuts) - 1)]
        rows.append((segs, len(ex.input_ids), sum(flags)))
    return rows


def preview_html(rows: list[tuple[list[tuple[str, bool]], int, int]], lang: str) -> str:
    if not rows:
        return f"<p>{word('no_rows', lang)}</p>"
    out = ['<div class="exp-preview">']
    for i, (segs, n_tok, n_trained) in enumerate(rows, 1):
        body = "".join(
            f'<mark class="exp-trained">{html.escape(t)}</mark>' if trained else html.escape(t) for t, trained in segs
        )
        head = f"{word('row', lang)} {i} · {n_tok} {word('tokens', lang)}, {n_trained} {word('trained', lang)}"
        out.append(f'<div class="exp-row"><div class="exp-row-head">{head}</div><pre>{body}</pre></div>')
    out.append("</div>")
    return "".join(out)


# ------------------------------------------------------------------ monitoring a run


def read_log(out_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """trainer_log.jsonl records (a partly written last line is skipped); [] when it is older than `since`."""
    path = out_dir / "trainer_log.jsonl"
    try:
        if path.stat().st_mtime < since:
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    recs = []
    for ln in lines:
        try:
            recs.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return recs


def loss_plot(log: list[dict[str, Any]], out_dir: Path) -> Any:
    """The live loss plot: loss and eval loss with LLaMA-Factory's smoothed curves (the figure training_loss.png is
    drawn with; an image, as LLaMA-Factory's board shows it); None before the first logged loss."""
    from exporter.loss_plot import loss_figure

    return loss_figure(log, ("loss", "eval_loss"), out_dir.name)


def progress_html(log: list[dict[str, Any]], lang: str, running: bool) -> str:
    if not log:
        return f'<div class="exp-progress">{word("preparing", lang) if running else ""}</div>'
    r = log[-1]
    done, total = r["current_steps"], r["total_steps"]
    pct = r.get("percentage", round(done / max(total, 1) * 100, 2))
    eta = f" · {word('eta', lang)} {r.get('remaining_time', '')}" if running else ""
    return (
        f'<div class="exp-progress"><progress value="{done}" max="{total}"></progress>'
        f'<span class="exp-progress-text">{word("step", lang)} {done}/{total} · {pct:.0f}% · '
        f"{word('elapsed', lang)} {r.get('elapsed_time', '')}{eta}</span></div>"
    )


def status_md(job: jobs.Job, out_dir: Path, config: Path, lang: str) -> str:
    """What the run is doing or how it ended, with the command that runs it."""
    cmd = f"`{jobs.command_line(job.argv)}`"
    if job.running():
        return f"**{word('running', lang)}** {cmd}"
    if job.stopped:
        from exporter.checkpoint import latest

        ckpt = latest(out_dir) if out_dir.is_dir() else None
        tail = f"{word('resume_from', lang)} `{ckpt}`" if ckpt else word("no_checkpoint", lang)
        return f"**{word('stopped', lang)}**. {tail}"
    if job.returncode == 0:
        res = out_dir / "all_results.json"
        loss = json.loads(res.read_text(encoding="utf-8")).get("train_loss") if res.is_file() else None
        loss_txt = f" · train_loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
        return f"**{word('finished', lang)}** → `{out_dir}`{loss_txt} · {word('saved_config', lang)} `{config}`"
    return f"**{word('failed', lang)}** ({cmd}): `{job.error_line()}`"


@dataclasses.dataclass
class TrainRun:
    """The board's one training run (as LLaMA-Factory's board, one at a time)."""

    job: jobs.Job
    out_dir: Path
    config: Path
    form: tuple[Any, ...] = ()  # the model, adapter, template and FORM values it was started with


def start(args: dict[str, Any], runs_dir: Path) -> TrainRun:
    """Check the keys, save them as a YAML config in `runs_dir`, and run `exporter train CONFIG.yaml`."""
    typed, cfg = parse(args)
    jobs.make_dir(runs_dir)
    config = runs_dir / time.strftime("train-%Y%m%d-%H%M%S.yaml")
    config.write_text(yaml_text(typed), encoding="utf-8")
    return TrainRun(jobs.start(["train", str(config)], runs_dir), Path(cfg.output_dir), config)


def watch(run: TrainRun, lang: str, every: float = 1.0) -> Iterator[tuple[str, str, Any, str]]:
    """(status, progress, loss plot rows, output tail) while the run lives, and once more when it has ended."""
    while True:
        running = run.job.running()
        log = read_log(run.out_dir, since=run.job.started - 1)
        yield (status_md(run.job, run.out_dir, run.config, lang), progress_html(log, lang, running),
               loss_plot(log, run.out_dir), run.job.tail())  # fmt: skip
        if not running:
            return
        time.sleep(every)


def command_preview(args: dict[str, Any]) -> tuple[str, str]:
    """(command lines, YAML) of the run the form describes."""
    typed, _ = parse(args)
    cmds = f"{jobs.command_line(['train', 'train.yaml'])}\n\n{flags_command(typed)}"
    return cmds, yaml_text(typed)


# ------------------------------------------------------------------ the tab


def _args_of(values: tuple[Any, ...], resume: bool = False) -> tuple[str, dict[str, Any]]:
    """(lang, LF keys) from the handlers' inputs: lang, model, adapter, template, then FORM."""
    lang, *rest = values
    form = dict(zip(("model", "adapter", "template", *FORM), rest, strict=True))
    return lang, train_args(form, resume)


def _failed(lang: str, e: Exception) -> str:
    return f"**{word('failed', lang)}**: `error: {e.text(lang) if isinstance(e, FieldError) else e}`"


def build(board: Any, demo: Any) -> None:
    """The Train tab's components and events (API names train_preview, data_preview, train_start, train_resume,
    train_stop, train_monitor)."""
    import gradio as gr

    from exporter.webui.locales import label

    L = board.opts.lang  # noqa: N806
    add = board.add
    d = LF_DEFAULTS
    c: dict[str, Any] = {}
    with add("tab_train", gr.Tab(label("tab_train", L), id="train")):
        with gr.Row():
            c["stage"] = add("stage", gr.Dropdown(list(stages()), value="sft", label=label("stage", L), scale=1))
            c["method"] = add("method", gr.Dropdown(methods(), value="lora", label=label("method", L), scale=1))
            c["dataset_dir"] = add("dataset_dir", gr.Textbox("data", label=label("dataset_dir", L), scale=1,
                                                             elem_id="dataset_dir"))  # fmt: skip
            board.top["dataset_dir"] = c["dataset_dir"]  # the Export tab's calibration data come from here too
            c["dataset"] = add("dataset", gr.Dropdown(
                list_datasets("data"), multiselect=True, allow_custom_value=True, label=label("dataset", L), scale=3,
                elem_id="dataset"))  # fmt: skip
        with gr.Row():
            for key in ("learning_rate", "num_train_epochs", "max_grad_norm", "max_samples"):
                c[key] = add(key, gr.Textbox(d[key], label=label(key, L), elem_id=key))
            c["compute_type"] = add("compute_type", gr.Dropdown(
                list(COMPUTE_TYPES), value=default_compute_type(), label=label("compute_type", L)))  # fmt: skip
        with gr.Row():
            c["cutoff_len"] = add("cutoff_len", gr.Slider(4, 131072, d["cutoff_len"], step=1,
                                                          label=label("cutoff_len", L)))  # fmt: skip
            c["batch_size"] = add("batch_size", gr.Slider(
                1, 1024, d["batch_size"], step=1, label=label("batch_size", L), elem_id="batch_size"))  # fmt: skip
            c["gradient_accumulation_steps"] = add("gradient_accumulation_steps", gr.Slider(
                1, 1024, d["gradient_accumulation_steps"], step=1, label=label("gradient_accumulation_steps", L),
                elem_id="gradient_accumulation_steps"))  # fmt: skip
            c["val_size"] = add("val_size", gr.Slider(0, 1, d["val_size"], step=0.001, label=label("val_size", L)))
            c["lr_scheduler_type"] = add("lr_scheduler_type", gr.Dropdown(
                list(schedulers()), value=d["lr_scheduler_type"], label=label("lr_scheduler_type", L)))  # fmt: skip
        _extra(board, c)
        _lora(board, c)
        u: dict[str, Any] = {}
        with gr.Row():
            u["preview_data_btn"] = add("data_preview_btn", gr.Button(label("data_preview_btn", L), scale=0,
                                                                      elem_id="data_preview_btn"))  # fmt: skip
        u["data_preview"] = gr.HTML(elem_id="data_preview")
        with gr.Row():
            c["output_dir"] = add("output_dir", gr.Textbox(default_output_dir("", "lora"), label=label("output_dir", L),
                                                           scale=4, elem_id="output_dir"))  # fmt: skip
            c["overwrite_output_dir"] = add("overwrite_output_dir", gr.Checkbox(
                False, label=label("overwrite_output_dir", L), scale=1))  # fmt: skip
        with gr.Row():
            u["preview_btn"] = add("preview_btn", gr.Button(label("preview_btn", L), elem_id="train_preview"))
            u["start_btn"] = add("start_btn", gr.Button(label("start_btn", L), variant="primary",
                                                        elem_id="train_start"))  # fmt: skip
            u["resume_btn"] = add("resume_btn", gr.Button(label("resume_btn", L), elem_id="train_resume"))
            u["stop_btn"] = add("stop_btn", gr.Button(label("stop_btn", L), variant="stop", elem_id="train_stop"))
        with gr.Row():
            with gr.Column(scale=3):
                u["status"] = gr.Markdown(elem_id="train_status")
                u["progress"] = gr.HTML(elem_id="train_progress")
                u["output"] = add("train_output", gr.Textbox(label=label("train_output", L), lines=6, max_lines=6,
                                                              autoscroll=True, elem_id="train_output"))  # fmt: skip
            with gr.Column(scale=2):
                u["plot"] = add("loss_plot", gr.Plot(label=label("loss_plot", L), elem_id="loss_plot"))
        with gr.Row():
            u["command"] = add("command", gr.Code(language="shell", label=label("command", L),
                                                  elem_id="train_command"))  # fmt: skip
            u["yaml"] = add("yaml", gr.Code(language="yaml", label=label("yaml", L), elem_id="train_yaml"))
    _wire(board, demo, c, u)


def _extra(board: Any, c: dict[str, Any]) -> None:
    import gradio as gr

    from exporter.webui.locales import label

    L, add, d = board.opts.lang, board.add, LF_DEFAULTS  # noqa: N806
    with add("extra_tab", gr.Accordion(label("extra_tab", L), open=False, elem_id="extra_tab")):
        with gr.Row():
            c["logging_steps"] = add("logging_steps", gr.Slider(1, 1000, d["logging_steps"], step=1,
                                                                label=label("logging_steps", L),
                                                                elem_id="logging_steps"))  # fmt: skip
            c["save_steps"] = add("save_steps", gr.Slider(1, 5000, d["save_steps"], step=1,
                                                          label=label("save_steps", L)))  # fmt: skip
            c["warmup_steps"] = add("warmup_steps", gr.Slider(0, 5000, d["warmup_steps"], step=1,
                                                              label=label("warmup_steps", L)))  # fmt: skip
            c["max_steps"] = add("max_steps", gr.Number(-1, precision=0, label=label("max_steps", L),
                                                        elem_id="max_steps"))  # fmt: skip
            c["optim"] = add("optim", gr.Dropdown(list(optimizers()), value=d["optim"], label=label("optim", L)))
            c["seed"] = add("seed", gr.Number(42, precision=0, label=label("seed", L)))
        with gr.Row():
            c["packing"] = add("packing", gr.Checkbox(False, label=label("packing", L)))
            c["train_on_prompt"] = add("train_on_prompt", gr.Checkbox(False, label=label("train_on_prompt", L)))
            c["identity_name"] = add("identity_name", gr.Textbox(label=label("identity_name", L),
                                                                 elem_id="identity_name"))  # fmt: skip
            c["identity_author"] = add("identity_author", gr.Textbox(label=label("identity_author", L),
                                                                     elem_id="identity_author"))  # fmt: skip
        with gr.Row():
            c["extra_args"] = add("extra_args", gr.Textbox("{}", label=label("extra_args", L), elem_id="extra_args"))


def _lora(board: Any, c: dict[str, Any]) -> None:
    import gradio as gr

    from exporter.webui.locales import label

    L, add, d = board.opts.lang, board.add, LF_DEFAULTS  # noqa: N806
    with add("lora_tab", gr.Accordion(label("lora_tab", L), open=False)):
        with gr.Row():
            c["lora_rank"] = add("lora_rank", gr.Slider(1, 1024, d["lora_rank"], step=1, label=label("lora_rank", L)))
            c["lora_alpha"] = add("lora_alpha", gr.Slider(1, 2048, d["lora_alpha"], step=1,
                                                          label=label("lora_alpha", L)))  # fmt: skip
            c["lora_dropout"] = add("lora_dropout", gr.Slider(0, 1, d["lora_dropout"], step=0.01,
                                                              label=label("lora_dropout", L)))  # fmt: skip
            c["loraplus_lr_ratio"] = add("loraplus_lr_ratio", gr.Slider(
                0, 64, d["loraplus_lr_ratio"], step=0.01, label=label("loraplus_lr_ratio", L)))  # fmt: skip
        with gr.Row():
            c["lora_target"] = add("lora_target", gr.Textbox(d["lora_target"], label=label("lora_target", L), scale=3))
            c["use_rslora"] = add("use_rslora", gr.Checkbox(False, label=label("use_rslora", L)))
            c["use_dora"] = add("use_dora", gr.Checkbox(False, label=label("use_dora", L)))


def _wire(board: Any, demo: Any, c: dict[str, Any], ui: dict[str, Any]) -> None:
    """The tab's events."""
    import gradio as gr

    top = board.top
    inputs = [top["lang"], top["model"], top["adapter"], top["template"], *(c[k] for k in FORM)]
    watched = [ui["status"], ui["progress"], ui["plot"], ui["output"]]

    def on_preview(*values: Any) -> tuple[str, str, str]:
        lang = values[0]
        try:
            cmds, text = command_preview(_args_of(values)[1])
        except UserError as e:
            return "", "", _failed(lang, e)
        return cmds, text, ""

    def on_data_preview(*values: Any) -> str:
        lang = values[0]
        try:
            return preview_html(preview_rows(_args_of(values)[1]), lang)
        except UserError as e:
            return f"<p><code>error: {html.escape(e.text(lang) if isinstance(e, FieldError) else str(e))}</code></p>"

    def run(values: tuple[Any, ...], resume: bool) -> Iterator[tuple[Any, ...]]:
        lang = values[0]
        # not queued behind a run another page started (Start would wait unseen for its end, then start a second
        # run): the lock makes checking for a run and starting one a single step across pages
        with board.lock:
            busy = board.train_run is not None and board.train_run.job.running()
            error = None
            if not busy:
                try:
                    started = board.train_run = start(_args_of(values, resume)[1], board.runs_dir)
                    started.form = tuple(values[1:])
                except UserError as e:
                    error = e
        if busy:  # a toast too: this page's monitor of that run overwrites the status within a second
            gr.Warning(word("busy", lang))
            yield (f"**{word('busy', lang)}**", gr.skip(), gr.skip(), gr.skip())
            return
        if error is not None:
            yield (_failed(lang, error), "", None, "")
            return
        yield from watch(started, lang)

    def on_start(*values: Any) -> Iterator[tuple[Any, ...]]:
        yield from run(values, resume=False)

    def on_resume(*values: Any) -> Iterator[tuple[Any, ...]]:
        yield from run(values, resume=True)

    def on_stop(lang: str) -> str:
        if board.train_run is None or not board.train_run.job.running():
            return word("nothing_running", lang)
        board.train_run.job.stop()
        return word("stopped", lang)

    form = inputs[1:]  # what a page (re)loaded while a run goes gets back: that run's form (as LLaMA-Factory's)

    def on_monitor(lang: str) -> Iterator[tuple[Any, ...]]:
        run = board.train_run
        keep = (gr.skip(),) * len(form)
        if run is None:
            yield (gr.skip(),) * len(watched) + keep
            return
        restore = run.form if run.form and run.job.running() else keep
        for k, out in enumerate(watch(run, lang)):
            yield (*out, *(restore if k == 0 else keep))

    ui["preview_btn"].click(on_preview, inputs, [ui["command"], ui["yaml"], ui["status"]],
                            api_name="train_preview")  # fmt: skip
    ui["preview_data_btn"].click(on_data_preview, inputs, [ui["data_preview"]], api_name="data_preview")
    ui["start_btn"].click(on_start, inputs, watched, api_name="train_start", concurrency_limit=None)
    ui["resume_btn"].click(on_resume, inputs, watched, api_name="train_resume", concurrency_limit=None)
    ui["stop_btn"].click(on_stop, [top["lang"]], [ui["status"]], api_name="train_stop", concurrency_limit=None)
    demo.load(on_monitor, [top["lang"]], [*watched, *form], api_name="train_monitor", concurrency_limit=None)
    c["dataset_dir"].change(lambda p: gr.update(choices=list_datasets(p)), [c["dataset_dir"]], [c["dataset"]],
                            api_visibility="private", trigger_mode="always_last")  # fmt: skip
    # on the user's own changes only (`input`), not when a reloaded page gets a running run's form back
    c["stage"].input(lambda s: s == "pt", [c["stage"]], [c["packing"]], api_visibility="private")
    # a new default output dir once the model path is typed (blur: not per keystroke, so a late update never
    # overwrites an output dir typed just after) or the method changes
    for event in (top["model"].blur, c["method"].input):
        event(default_output_dir, [top["model"], c["method"]], [c["output_dir"]], api_visibility="private",
              trigger_mode="always_last")  # fmt: skip
