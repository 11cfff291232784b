"""The `exporter` command line: parses arguments and calls one stage function; nothing else lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from exporter import __version__
from exporter.errors import UserError

app = typer.Typer(
    name="exporter",
    help="LoRA fine-tuning to a running, verified Ollama model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False, "verbose": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"exporter {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show third-party libraries' banners, logs and warnings."),
) -> None:
    """LoRA fine-tuning to a running, verified Ollama model."""
    _state["debug"] = debug
    _state["verbose"] = verbose


def _setup(quantization: bool = False, transformers: bool = True, deepspeed: bool = False) -> None:
    """Before a command imports anything heavy: without `quantization`, GPT-QModel and torchao stay unimported, and
    DeepSpeed without `deepspeed`; known third-party noise stays out of the output unless --verbose
    (exporter/quiet.py)."""
    from exporter import quiet

    if not quantization:
        quiet.without_libraries(quiet.QUANT_LIBRARIES)
    if not deepspeed:
        quiet.without_libraries(("deepspeed",))
    quiet.quiet(_state["verbose"], transformers=transformers)


# ---- stage commands are registered below, one block each ----


# quantize (exporter/quantize.py)
@app.command("quantize")
def _quantize(
    model: str = typer.Argument(..., help="HF model dir (or hub id) to quantize, e.g. the output of `merge`."),
    method: str = typer.Option(..., "--method", help="gptq | awq (gptqmodel) | bnb4 | bnb8 (bitsandbytes)."),
    out: str = typer.Option(..., "--out", help="Output dir (written atomically)."),
    bits: int | None = typer.Option(None, "--bits", help="4 or 8 (gptq); awq/bnb4: 4; bnb8: 8."),
    group_size: int | None = typer.Option(None, "--group-size", help="GPTQ/AWQ group size (default 128; -1: per row)."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Calibration dataset name(s) from dataset_info.json, or a file of raw `text` rows."
    ),
    dataset_dir: str | None = typer.Option(None, "--dataset-dir", help="Dir holding dataset_info.json (default data)."),
    template: str | None = typer.Option(None, "--template", help="Chat template family (default: detected)."),
    samples: int | None = typer.Option(None, "--samples", help="Calibration blocks (at most; default 128)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Tokens per calibration block (default 512)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for calibration order and quantization (default 0)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest output shard, e.g. 2GB, 500MB."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output dir."),
) -> None:
    """Quantize an HF model to GPTQ, AWQ or bitsandbytes nf4/int8, calibrated on your data through its chat template."""
    _setup(quantization=True)
    from exporter.quantize import QuantizeOptions, quantize

    quantize(
        QuantizeOptions(
            model=model, method=method, out=out, bits=bits, group_size=group_size, dataset=dataset,
            dataset_dir=dataset_dir, template=template, samples=samples, max_length=max_length, seed=seed,
            max_shard_size=max_shard_size, force=force,
        )
    )  # fmt: skip


# ---- template: chat-template families (exporter/templates.py) ----
template_app = typer.Typer(
    help="Chat-template families: list, show, detect, render.", no_args_is_help=True, add_completion=False
)
app.add_typer(template_app, name="template")


@template_app.command("list")
def _template_list() -> None:
    """List the official families and the LLaMA-Factory names, and which LF names render a family's text."""
    _setup(transformers=False)
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from exporter import lf_names, lf_templates
    from exporter.templates import list_templates, load_template

    same = lf_names.same_text_names()
    table = Table("family", "end of turn", "tools", "same text as LF", "description", title="official families")
    for name in list_templates():
        tpl = load_template(name)
        cells = (name, " ".join(tpl.eot_tokens), "yes" if tpl.tools else "", " ".join(same[name]), tpl.description)
        table.add_row(*(Text(c) for c in cells))
    lf_table = Table("LF name", "stop words", "kind", "Jinja", "same text as family", title="LLaMA-Factory 0.9.5 names")
    for name in lf_templates.names():
        t = lf_templates.load(name)
        jinja = "generated" if t.replace_jinja_template else "model's (else generated)"
        fams = " ".join(f for f, names in same.items() if name in names)
        lf_table.add_row(*(Text(c) for c in (name, " ".join(t.stop_words), t.kind, jinja, fams)))
    console = Console(highlight=False)
    console.print(table)
    console.print(lf_table)


@template_app.command("show")
def _template_show(
    family: str = typer.Argument(..., help="Family or LLaMA-Factory name (see `exporter template list`)."),
    fmt: str = typer.Option("jinja", "--format", help="jinja, ollama (Modelfile lines) or slots (LF names)."),
    bos_token: str = typer.Option(None, "--bos-token", help="BOS text an LF name's generated Jinja writes."),
    eos_token: str = typer.Option(None, "--eos-token", help="EOS text an LF name's generated Jinja writes."),
) -> None:
    """Print a template's HF Jinja chat_template or its Ollama Modelfile TEMPLATE/SYSTEM/stop lines."""
    _setup(transformers=False)
    from exporter.templates import show_for_cli

    typer.echo(show_for_cli(family, fmt, bos_token, eos_token))


@template_app.command("detect")
def _template_detect(model_dir: str = typer.Argument(..., help="HF model dir with a chat_template.")) -> None:
    """Name the family whose template renders exactly like the model's own chat_template, or say what is derived
    from it: the shapes checked in Go and those that differ."""
    _setup()
    from exporter import lf_names
    from exporter.templates import detect, model_chat_template

    try:
        model_chat_template(model_dir)
    except UserError as e:
        if "has no chat_template" not in str(e):  # unreadable files say what is wrong with them
            raise
        raise UserError(
            f"{model_dir} has no chat_template (tokenizer_config.json or chat_template.jinja): nothing to detect; "
            "gguf, merge and quantize export it without one, training needs a --template"
        ) from None
    tpl = detect(model_dir)
    lf = lf_names.generated_by(tpl.jinja, tpl.bos_token, tpl.eos_token)
    lf_note = [f"LLaMA-Factory's generated Jinja of: {', '.join(lf)} (train with that --template)"] if lf else []
    typer.echo("\n".join([tpl.name, *tpl.notes, *lf_note]))


@template_app.command("render")
def _template_render(
    family: str = typer.Argument(..., help="Family or LLaMA-Factory name."),
    conversation: str = typer.Argument(..., help='JSON file: \\[messages] or {"messages": \\[...], "tools": \\[...]}.'),
    fmt: str = typer.Option("train", "--format", help="train (trained parts in green), jinja or ollama."),
    generation_prompt: bool = typer.Option(
        None,
        "--generation-prompt/--no-generation-prompt",
        help="Default: on unless the last message is an answer (the other choice: an official family's train/jinja).",
    ),
    bos_token: str = typer.Option(None, "--bos-token", help="BOS text for families that take it from the tokenizer."),
    eos_token: str = typer.Option(None, "--eos-token", help="EOS text for families that take it from the tokenizer."),
) -> None:
    """Render a conversation with a family, as training text, HF Jinja or Ollama Go template."""
    _setup()
    import sys

    from exporter.templates import render_for_cli

    segments = render_for_cli(family, conversation, fmt, generation_prompt, bos_token, eos_token)
    if fmt == "train" and sys.stdout.isatty():
        from rich.console import Console
        from rich.text import Text

        text = Text()
        for part, trained in segments:
            text.append(part, style="green" if trained else None)
        Console(highlight=False).print(text, end="")
    else:
        sys.stdout.write("".join(part for part, _ in segments))
    sys.stdout.flush()


# ---- train and export: LLaMA-Factory's arguments (CONFIG.yaml, key=value, --key value), parsed by lf_args.py ----
_LF_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _lf_args(ctx: typer.Context, verb: str) -> list[str]:
    if not ctx.args:
        raise UserError(f"exporter {verb}: give CONFIG.yaml [key=value ...] or --key value flags (see --help)")
    first = ctx.args[0]
    if not first.startswith("-") and "=" not in first and Path(first).is_dir():
        raise UserError(f"{first} is a directory, expected a config file (CONFIG.yaml)")
    return list(ctx.args)


@app.command(
    "train",
    context_settings=_LF_ARGS,
    help="Fine-tune (LoRA, QLoRA, freeze or full; stages sft, pt, dpo, kto): exporter train CONFIG.yaml "
    "\\[key=value ...], or LLaMA-Factory flags: exporter train --stage sft --do_train --model_name_or_path M "
    "--dataset a,b --output_dir OUT ...; several processes: torchrun --nproc_per_node N -m exporter train ...",
)
def train_cmd(ctx: typer.Context) -> None:
    from exporter import lf_args

    argv = _lf_args(ctx, "train")
    raw = lf_args.parse_args(argv)[0]  # QLoRA needs bitsandbytes; a `deepspeed` config, DeepSpeed
    _setup(quantization=raw.get("quantization_bit") is not None, deepspeed=raw.get("deepspeed") is not None)
    from exporter import train

    train.main(argv, [flag for flag in ("--debug", "--verbose") if _state[flag[2:]]])  # for every rank, if relaunched


# ---- predict and eval: LLaMA-Factory's do_predict and llamafactory-cli eval (exporter/predict.py, evaluate.py) ----
@app.command(
    "predict",
    context_settings=_LF_ARGS,
    help="Generate answers for a held-out set and score BLEU-4/ROUGE as LLaMA-Factory does: exporter predict "
    "CONFIG.yaml \\[key=value ...] (LF's predict YAML), or --model_name_or_path M --eval_dataset a,b --output_dir OUT",
)
def predict_cmd(ctx: typer.Context) -> None:
    argv = _lf_args(ctx, "predict")
    _setup()
    from exporter import predict

    predict.main(argv)


@app.command(
    "eval",
    context_settings=_LF_ARGS,
    help="MMLU / C-Eval / CMMLU accuracy as llamafactory-cli eval: exporter eval CONFIG.yaml \\[key=value ...] (LF's "
    "eval YAML), or --model_name_or_path M --task mmlu_test --task_dir evaluation --save_dir OUT",
)
def eval_cmd(ctx: typer.Context) -> None:
    argv = _lf_args(ctx, "eval")
    _setup()
    from exporter import evaluate

    evaluate.main(argv)


# ---- export: LLaMA-Factory's merge/export YAML (exporter/export.py) ----
@app.command(
    "export",
    context_settings=_LF_ARGS,
    help="LLaMA-Factory's `llamafactory-cli export` config, unchanged: exporter export CONFIG.yaml \\[key=value ...]; "
    "merges the adapters (merge) and, with export_quantization_bit, quantizes with GPTQ (quantize).",
)
def export_cmd(ctx: typer.Context) -> None:
    from exporter import lf_args

    cfg, given = lf_args.export_config_from_args(_lf_args(ctx, "export"))
    _setup(quantization=cfg.export_quantization_bit is not None)
    from exporter import export

    export.export(cfg, given)


# ---- merge ----
@app.command("merge")
def _merge(
    base: str = typer.Option(..., "--base", help="Base model: local HF dir or hub id."),
    adapter: list[str] = typer.Option(..., "--adapter", help="PEFT LoRA adapter dir or hub id; repeat to stack."),
    weight: list[float] = typer.Option(
        None, "--weight", help="Scale of each adapter's change, one per --adapter in order (default 1)."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory (refused if it exists, unless --force)."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype: bf16, fp16 or fp32 (default: the base's)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest output shard, e.g. 2GB, 500MB."),
    template: str = typer.Option(None, "--template", help="Chat-template family to write (default: detected)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
) -> None:
    """Merge LoRA adapters into a base model, streaming one tensor at a time (equals PEFT merge_and_unload)."""
    _setup()
    from exporter.merge import MergeOptions, merge

    merge(
        MergeOptions(
            base=base, adapters=adapter, out=str(out), weights=weight or None, dtype=dtype,
            max_shard_size=max_shard_size, template=template, force=force,
        )
    )  # fmt: skip


# ---- gguf: GGUF export + Ollama Modelfiles (exporter/gguf.py) ----
@app.command("gguf")
def _gguf(
    model: str = typer.Argument(..., help="HF model dir (or hub id); with --adapter: the base model."),
    type_: str = typer.Option(
        "f16",
        "--type",
        "-t",
        help="Comma-separated GGUF types, named as llama-quantize names them (any case): f32,f16,bf16,q8_0,q4_0; "
        "through libllama: q2_k,q3_k_s,q3_k_m,q3_k_l,q4_k_s,q4_k_m,q5_k_s,q5_k_m,q6_k,q4_1,q5_0,q5_1,"
        "iq4_nl,iq4_xs,iq3_s,iq3_m (types that need an imatrix are refused).",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output dir (default: <model>-gguf next to the model)."),
    ollama_name: str | None = typer.Option(None, "--ollama-name", help="Model name in the ollama create commands."),
    template: str | None = typer.Option(None, "--template", help="Chat template family (default: detect)."),
    adapter: Path | None = typer.Option(None, "--adapter", help="PEFT LoRA adapter dir: write a GGUF LoRA instead."),
    base_gguf: str | None = typer.Option(
        None, "--base-gguf", help="With --adapter: FROM of the Modelfile (GGUF path or Ollama model name)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output dir."),
) -> None:
    """Convert a model to GGUF files (several types in one pass) with one Ollama Modelfile each."""
    _setup(transformers=False)
    from exporter import gguf

    opts = gguf.GGUFOptions(
        model=model, types=[type_], out=str(out) if out else None, ollama_name=ollama_name, template=template,
        adapter=str(adapter) if adapter else None, base_gguf=base_gguf, force=force,
    )  # fmt: skip
    gguf.run(opts)


# verify ------------------------------------------------------------------------------------------------------
@app.command("verify")
def _verify(
    base: Path = typer.Option(None, "--base", help="Base model dir the adapter was trained on."),
    adapter: Path = typer.Option(None, "--adapter", help="PEFT LoRA adapter dir."),
    merged: Path = typer.Option(None, "--merged", help="Merged (exported) HF model dir."),
    gguf: list[Path] = typer.Option([], "--gguf", help="GGUF file, or a dir: every .gguf in it (repeatable)."),
    modelfile: list[Path] = typer.Option(
        [], "--modelfile", help="Ollama Modelfile, or a dir: every Modelfile* in it (repeatable)."
    ),
    quantized: list[Path] = typer.Option(
        [], "--quantized", help="Quantized HF dir from `exporter quantize` (repeatable; needs --merged)."
    ),
    run_dir: Path = typer.Option(None, "--run-dir", help="A pipeline run dir: find all artifacts in it."),
    template: str = typer.Option(None, "--template", help="Chat-template family used in training."),
    report: Path = typer.Option(None, "--report", help="Write report.json here."),
    junit: Path = typer.Option(None, "--junit", help="Write JUnit XML here (for CI)."),
    ppl_threshold: str = typer.Option(
        None, "--ppl-threshold", help="Max relative perplexity difference per type, e.g. f16=0.001,q8_0=0.005."
    ),
    kld_threshold: str = typer.Option(
        None,
        "--kld-threshold",
        help="Max mean KL divergence from the reference (nats/token) per type, e.g. adapter=1e-3,q4_k_m=0.1 "
        "(defaults: adapter 2e-3, f32 1e-4, f16 5e-4, bf16 1e-3, q8_0 0.03, q4_k_m 0.6).",
    ),
    top1_threshold: str = typer.Option(
        None,
        "--top1-threshold",
        help="Min top-1 agreement with the reference (near-ties excused) per type, e.g. q4_k_m=0.85 "
        "(defaults: adapter, f32, f16 0.99; bf16 0.98; quantized types none).",
    ),
    prompts: int = typer.Option(4, "--prompts", min=0, help="Greedy chat prompts compared HF vs GGUF."),
    text: Path = typer.Option(None, "--text", help="Held-out text file for perplexity (default: built-in)."),
    data: list[Path] = typer.Option(
        [], "--data", help="Training data (JSON/JSONL file or dir, repeatable): its texts and prompts are checked too."
    ),
    ctx: int = typer.Option(128, "--ctx", min=8, help="Perplexity window (llama.cpp's -c)."),
    max_windows: int = typer.Option(
        8, "--max-windows", min=1, help="Perplexity windows at most (llama.cpp's --chunks)."
    ),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Greedy tokens per chat prompt."),
    eval_dir: Path = typer.Option(
        None, "--eval", help="LF's evaluation/ dir (mmlu/, ceval/, cmmlu/): accuracy of merged vs each GGUF."
    ),
    eval_task: str = typer.Option(None, "--eval-task", help="mmlu_test, ceval_validation or cmmlu_test."),
    eval_questions: int = typer.Option(5, "--eval-questions", min=1, help="Questions per subject for --eval."),
) -> None:
    """Prove an export is faithful: templates, stop tokens, tokenizer, perplexity and chat; exit 1 on a failure."""
    _setup(quantization=bool(quantized))
    from exporter import verify
    from exporter.verify import report as verify_report

    opts = verify.VerifyOptions(
        base=base, adapter=adapter, merged=merged, ggufs=gguf, modelfiles=modelfile, quantized=quantized,
        run_dir=run_dir, template=template, ppl_threshold=verify.parse_thresholds(ppl_threshold, "ppl_threshold"),
        kld_threshold=verify.parse_thresholds(kld_threshold, "kld_threshold"),
        top1_threshold=verify.parse_thresholds(top1_threshold, "top1_threshold"), prompts=prompts,
        text=text, data=data, ctx=ctx, max_windows=max_windows, max_new_tokens=max_new_tokens, eval_dir=eval_dir,
        eval_task=eval_task, eval_questions=eval_questions,
    )  # fmt: skip
    for option, path in (("--report", report), ("--junit", junit)):
        if path is not None:
            verify_report.check_output(path, option)
    if report is not None and junit is not None and report.resolve() == junit.resolve():
        raise UserError(f"--report and --junit are the same file {report}; give two paths")
    rep = verify.verify(opts)
    verify_report.print_table(rep)
    if report is not None:
        verify_report.write_json(rep, report)
    if junit is not None:
        verify_report.write_junit(rep, junit)
    raise typer.Exit(0 if rep.passed else 1)


# pipeline ----------------------------------------------------------------------------------------------------
@app.command("pipeline")
def _pipeline(
    config_file: Path = typer.Argument(..., help="Pipeline YAML (base, run_dir, template, train/merge/gguf/verify)."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. train.max_steps=5."),
) -> None:
    """train -> merge -> gguf -> verify into one run dir; finished stages are skipped; exit 1 if verify fails."""
    from exporter import config

    train = config.read_yaml(config_file).get("train")
    _setup(quantization=(isinstance(train, dict) and train.get("quantization_bit") is not None)
           or any(o.startswith("train.quantization_bit=") for o in overrides or []),
           deepspeed=(isinstance(train, dict) and train.get("deepspeed") is not None)
           or any(o.startswith("train.deepspeed=") for o in overrides or []))  # fmt: skip
    from exporter import pipeline

    result = pipeline.run(pipeline.load_config(config_file, overrides or []))
    raise typer.Exit(0 if result.passed else 1)


# ---- chat and serve: talk to a model (exporter/chat.py, exporter/serve.py on exporter/engine) ----
def _engine_load_options(
    adapter: str | None, template: str | None, backend: str | None, dtype: str | None, device: str | None,
    max_seqs: int | None, ctx: int | None, threads: int | None,
) -> dict:  # fmt: skip
    return {"adapter": adapter, "template": template, "backend": backend, "dtype": dtype, "device": device,
            "max_seqs": max_seqs, "ctx": ctx, "threads": threads}  # fmt: skip


_MODEL_HELP = "HF dir, PEFT adapter dir, .gguf file, or a LLaMA-Factory inference YAML."
_BACKEND_HELP = "hf | gguf | vllm (default: from the path)."
_OVERRIDES_HELP = "key=value over the inference YAML, as llamafactory-cli takes them (e.g. max_new_tokens=64)."


@app.command("chat")
def _chat(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    overrides: list[str] = typer.Argument(None, help=_OVERRIDES_HELP),
    adapter: str = typer.Option(None, "--adapter", help="PEFT adapter dir (hf) or GGUF LoRA file (gguf)."),
    template: str = typer.Option(
        None, "--template", help="LLaMA-Factory or family name, or a .jinja file (default: the model's own)."
    ),
    system: str = typer.Option(None, "--system", help="System prompt."),
    temperature: float = typer.Option(None, "--temperature", help="0 = greedy (default 0.95, as LLaMA-Factory)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 0.7)."),
    top_k: int = typer.Option(None, "--top-k", help="Top-k sampling, 0 = off (default 50)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Longest answer (default 1024)."),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty", help="HF's (default 1.0)."),
    min_p: float = typer.Option(None, "--min-p", help="Drop tokens below min-p x the top one's probability (0-1)."),
    presence_penalty: float = typer.Option(None, "--presence-penalty", help="OpenAI's, -2 to 2 (default 0)."),
    frequency_penalty: float = typer.Option(None, "--frequency-penalty", help="OpenAI's, -2 to 2 (default 0)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    backend: str = typer.Option(None, "--backend", help=_BACKEND_HELP),
    dtype: str = typer.Option(None, "--dtype", help="hf, vllm: auto | fp32 | bf16 | fp16."),
    device: str = typer.Option(None, "--device", help="hf: cpu, cuda, cuda:1 ..."),
    ctx: int = typer.Option(
        None, "--ctx", help="Context: prompt + answer (gguf: 4096, hf: the model's; 0: the training one)."
    ),
    threads: int = typer.Option(None, "--threads", help="hf, gguf: CPU threads."),
) -> None:
    """Chat in the terminal (history, `clear`, `exit`); reads one prompt a line when stdin is not a terminal."""
    from exporter.chat import LF_SAMPLING, ChatOptions, chat, quantized_model, resolve_options

    load_kw = _engine_load_options(adapter, template, backend, dtype, device, 1, ctx, threads)
    samp_kw = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
               "repetition_penalty": repetition_penalty, "min_p": min_p, "presence_penalty": presence_penalty,
               "frequency_penalty": frequency_penalty, "seed": seed}  # fmt: skip
    load_opts, sampling, sys_prompt = resolve_options(model, load_kw, samp_kw, system, LF_SAMPLING, overrides or [])
    _setup(quantization=quantized_model(load_opts))
    chat(ChatOptions(load_opts, sampling, sys_prompt))


@app.command("serve")
def _serve(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    overrides: list[str] = typer.Argument(None, help=_OVERRIDES_HELP),
    adapter: str = typer.Option(None, "--adapter", help="PEFT adapter dir (hf) or GGUF LoRA file (gguf)."),
    template: str = typer.Option(
        None, "--template", help="LLaMA-Factory or family name, or a .jinja file (default: the model's own)."
    ),
    system: str = typer.Option(None, "--system", help="Default system prompt (when a request has none)."),
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; env API_HOST)."),
    port: int = typer.Option(None, "--port", help="Port (default 8000; env API_PORT)."),
    api_key: str = typer.Option(None, "--api-key", help="Require this Bearer key (env API_KEY)."),
    model_name: str = typer.Option(None, "--model-name", help="Name in /v1/models (env API_MODEL_NAME)."),
    max_seqs: int = typer.Option(8, "--max-seqs", help="Requests decoded together (continuous batching)."),
    max_waiting: int = typer.Option(256, "--max-waiting", help="Requests queued behind those; more get 429."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Answer length when a request sets none (1024)."),
    backend: str = typer.Option(None, "--backend", help=_BACKEND_HELP),
    dtype: str = typer.Option(None, "--dtype", help="hf, vllm: auto | fp32 | bf16 | fp16."),
    device: str = typer.Option(None, "--device", help="hf: cpu, cuda, cuda:1 ..."),
    ctx: int = typer.Option(
        None,
        "--ctx",
        help="Tokens per request (gguf: 4096, hf: the model's; 0: the training one); gguf KV = ctx x max-seqs.",
    ),
    threads: int = typer.Option(None, "--threads", help="hf, gguf: CPU threads."),
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions with streaming and tools, /v1/completions)."""
    from exporter.chat import quantized_model, resolve_options
    from exporter.engine import Sampling
    from exporter.serve import ServeOptions, options_from_env, run

    load_kw = _engine_load_options(adapter, template, backend, dtype, device, max_seqs, ctx, threads)
    load_kw["max_waiting"] = max_waiting
    defaults = Sampling(max_new_tokens=1024, temperature=1.0)  # OpenAI's defaults for what a request leaves out
    load_opts, sampling, sys_prompt = resolve_options(model, load_kw, {"max_new_tokens": max_new_tokens}, system,
                                                      defaults, overrides or [])  # fmt: skip
    opts = options_from_env(ServeOptions(load_opts, default_system=sys_prompt, sampling=sampling))
    opts.host, opts.port = host or opts.host, port or opts.port
    opts.api_key, opts.model_name = api_key or opts.api_key, model_name or opts.model_name
    _setup(quantization=quantized_model(load_opts))
    code = run(opts)  # SIGINT / SIGTERM end the open requests and stop it: 130 / 143, as every verb
    if code:
        raise typer.Exit(code)


# webui: the board in a browser (exporter/webui/) ----------------------------------------------------------------
@app.command("webui")
def _webui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 opens it to the network)."),
    port: int = typer.Option(7860, "--port", help="Port."),
    share: bool = typer.Option(False, "--share", help="Also make a public Gradio share link (off unless asked)."),
    lang: str = typer.Option("en", "--lang", help="Labels: en or zh (switchable in the page)."),
    runs_dir: Path = typer.Option(
        Path("webui_runs"), "--runs-dir", help="Where the board saves the configs it runs and their logs."
    ),
) -> None:
    """LLaMA-Factory-style web board: train, evaluate, chat and export in a browser (needs exporter\\[webui])."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise UserError("exporter webui needs Gradio: pip install 'exporter[webui]'")
    if lang not in ("en", "zh"):
        raise UserError(f"--lang {lang!r}: expected en or zh")
    _setup(quantization=True)  # the Chat tab may load an `exporter quantize` output
    from exporter.webui import WebUIOptions, launch

    launch(WebUIOptions(host=host, port=port, share=share, lang=lang, runs_dir=str(runs_dir)))


def _repeated_option(argv: list[str]) -> str | None:
    """The first single-value option given twice to the command `argv` names (`gguf -t q4_k_m -t q8_0`: click keeps
    the last silently), as an error line; None when there is none. Options declared repeatable, flags, and commands
    that pass their flags through (train, predict, eval, export) are left alone."""
    cmd = typer.main.get_command(app)  # typer's own click: duck-typed
    args = list(argv)
    while hasattr(cmd, "commands"):  # the subcommand path; root options (--debug, --verbose) have no values
        while args and args[0].startswith("-"):
            args.pop(0)
        if not args or args[0] not in cmd.commands:
            return None
        cmd = cmd.commands[args.pop(0)]
    if cmd.context_settings.get("allow_extra_args"):
        return None
    value_opts = {}  # name -> option, for options that take a value
    for param in cmd.params:
        if param.param_type_name == "option" and not param.is_flag and not param.count:
            for name in param.opts + param.secondary_opts:
                value_opts[name] = param
    seen: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg == "--":
            break
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2] if arg.startswith("-") else None
        param = value_opts.get(name or "")
        if param is None:
            continue
        if name == arg:  # the value is the next argument
            i += 1
        if param.multiple:
            continue
        if param.name in seen:
            return f"{param.opts[0]} is given twice ({seen[param.name]} and {name}); it takes one value"
        seen[param.name] = name
    return None


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (`timeout`, a CI cancel, `docker stop`) unwinds like Ctrl-C: temporary outputs and locks are removed
    by the `finally` blocks on the way out; exit code 143 (128 + 15)."""
    raise SystemExit(128 + signum)


def _handle_sigterm() -> object:
    """Install `_on_sigterm` unless this is a torchrun worker (its launcher stops it) or a handler is already set;
    `serve` (uvicorn) and torchrun's launcher install their own while they run. Returns the handler to restore."""
    import os
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    if "TORCHELASTIC_RUN_ID" not in os.environ and previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    return signal.SIG_DFL if previous is None else previous


def main() -> None:
    """Console entry point: user errors (and a full disk, a read-only or forbidden path) become one line on stderr
    and exit code 2; any other error (or any with --debug) its traceback and exit code 1, printed here: Python keeps
    an uncaught error in `sys.last_exc` to the end, its frames and what they hold with it (a training run's process
    group, whose threads would then run into interpreter shutdown)."""
    import signal
    import traceback

    from exporter.atomic import os_error, os_error_text

    previous = _handle_sigterm()
    try:
        repeated = _repeated_option(sys.argv[1:])
        if repeated is not None:
            raise UserError(repeated)
        app()
    except UserError as e:
        if _state["debug"]:
            traceback.print_exc()
            sys.exit(1)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Exception as e:
        err = os_error(e)
        if err is None or _state["debug"]:
            traceback.print_exc()
            sys.exit(1)
        typer.echo(f"error: {os_error_text(err)}", err=True)
        sys.exit(2)
    finally:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, previous)  # as it was (`main` called in-process, e.g. by tests)


if __name__ == "__main__":
    main()
