"""`exporter gguf`: HF model dir -> GGUF files (several types in one pass) + one Ollama Modelfile per file."""

from __future__ import annotations

import errno
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from exporter import __version__
from exporter.atomic import atomic_dir, check_free_space, check_target
from exporter.config import did_you_mean, read_json
from exporter.converters.gguf_kquant import ALIASES, KQUANT_TYPES, refusal
from exporter.errors import UserError
from exporter.hf_dir import check_readable
from exporter.quiet import llama_log_in_python

NUMPY_KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0")
KQUANT_KINDS = tuple(KQUANT_TYPES)  # written by libllama's llama_model_quantize
ALL_KINDS = NUMPY_KINDS + KQUANT_KINDS
# bytes per parameter, about 7% over llama-quantize's Llama-3-8B sizes (tools/quantize/quantize.cpp QUANT_OPTIONS:
# q4_k_m 4.58G of 8.03B parameters = 0.57) or, without one there, its bits per weight / 8
_BYTES_PER_PARAM = {
    "f32": 4,
    "f16": 2,
    "bf16": 2,
    "q8_0": 1.07,
    "q4_0": 0.57,
    "q2_k": 0.4,
    "q3_k_s": 0.46,
    "q3_k_m": 0.5,
    "q3_k_l": 0.54,
    "q4_k_s": 0.59,
    "q4_k_m": 0.61,
    "q5_k_s": 0.7,
    "q5_k_m": 0.71,
    "q6_k": 0.83,
    "q4_1": 0.64,
    "q5_0": 0.7,
    "q5_1": 0.76,
    "iq4_nl": 0.61,
    "iq4_xs": 0.58,
    "iq3_s": 0.47,
    "iq3_m": 0.5,
}

console = Console(stderr=True)


@dataclass
class GGUFOptions:
    """What `exporter gguf` takes (CLI flags and the pipeline's `gguf:` block)."""

    model: str  # HF model dir or hub id; with `adapter`: the base model
    types: list[str] = field(default_factory=lambda: ["f16"])
    out: str | None = None  # default: <model>-gguf (or <adapter>-gguf) beside it
    ollama_name: str | None = None  # default: the model dir's name
    template: str | None = None  # chat-template family (default: detected)
    adapter: str | None = None  # a PEFT LoRA adapter: write a GGUF LoRA + Modelfile with ADAPTER
    base_gguf: str | None = None  # with `adapter`: FROM of the Modelfile
    force: bool = False


@dataclass
class GGUFResult:
    """What `run` wrote."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # kind -> gguf
    modelfiles: dict[str, Path] = field(default_factory=dict)  # kind -> Modelfile
    names: dict[str, str] = field(default_factory=dict)  # kind -> Ollama model name for `ollama create`
    fallbacks: dict[str, list[str]] = field(default_factory=dict)  # kind -> per-tensor notes
    commands: list[str] = field(default_factory=list)


def parse_types(types: str | Sequence[str]) -> list[str]:
    """`"f16,q8_0"` -> ["f16", "q8_0"]; unknown names are a UserError with a suggestion."""
    items = types.split(",") if isinstance(types, str) else [t for x in types for t in x.split(",")]
    kinds = []
    for raw in items:
        kind = raw.strip().lower()
        if not kind:
            continue
        kind = ALIASES.get(kind, kind)  # llama-quantize's `Q4_K` is Q4_K_M
        why = refusal(kind)
        if why is not None:
            raise UserError(f"--type {raw.strip()!r}: {why}")
        if kind not in ALL_KINDS:
            raise UserError(
                f"--type {raw!r} is not a GGUF type{did_you_mean(kind, ALL_KINDS)}; use {', '.join(ALL_KINDS)}"
            )
        if kind not in kinds:
            kinds.append(kind)
    if not kinds:
        raise UserError(f"--type is empty; use one or more of {', '.join(ALL_KINDS)}")
    return kinds


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _safe_name(name: str) -> str:
    """An ASCII file stem and Ollama name from a dir name: accents dropped (`ünï` -> `uni`), any other character
    but letters, digits and `-_.` made `-`, at most 80 characters (Ollama's limit); `model` when nothing is left."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in plain)
    return safe.strip("-.")[:80].rstrip("-.") or "model"


_OLLAMA_NAME = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]{0,79}/){0,2}[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


def check_ollama_name(name: str | None) -> None:
    """An `ollama create` name Ollama accepts (its parts: letters, digits, `_ . -`; up to 80 each); the tag is ours."""
    if name is not None and not _OLLAMA_NAME.fullmatch(name):
        raise UserError(
            f"--ollama-name {name!r}: expected [namespace/]name of letters, digits, '_', '.', '-' (up to 80 each, "
            "starting with a letter, digit or '_'); the :tag is added per type"
        )


def ollama_names(model_dir: Path, kinds: list[str], ollama_name: str | None = None) -> dict[str, str]:
    """The `ollama create` name of each type's model: `<name>:<type>`, the name defaulting to the dir's."""
    name = ollama_name or default_ollama_name(model_dir)
    return {kind: f"{name}:{kind}" for kind in kinds}


def default_ollama_name(path: Path) -> str:
    """The Ollama name from a dir's name: `_safe_name` in lower case, one `check_ollama_name` accepts."""
    name = _safe_name(path.resolve().name).lower()
    check_ollama_name(name)
    return name


def modelfile_header(kind: str, source: str, tpl: Any, ollama_name: str, gguf_name: str) -> list[str]:
    """Provenance comment lines for a Modelfile, with what is known to differ between its TEMPLATE and the Jinja."""
    return [
        f"Ollama Modelfile for {gguf_name}, written by exporter {__version__}",
        f"source model: {source}",
        f"GGUF type: {kind}; chat template: {tpl.name}",
        *(n.replace("\n", "\\n") for n in tpl.notes),
        f"create with: ollama create {ollama_name} -f Modelfile.{kind}",
    ]


def modelfile_spec(tpl: Any, model_dir: Path | None, from_: str, header: Sequence[str] = (), **more: Any) -> Any:
    """The one `ModelfileSpec` of every Modelfile exporter writes (a GGUF's, an adapter's, a merged dir's `FROM .`):
    `tpl`'s TEMPLATE, stops and SYSTEM, and the sampling PARAMETERs of `model_dir`'s generation_config.json
    (`modelfile.sampling_parameters`; a comment in the header when it has sampling keys that do not apply)."""
    from exporter.converters.modelfile import ModelfileSpec, sampling_parameters

    parameters, why_none = sampling_parameters(model_dir)
    if why_none and header:
        header = [*header[:-1], why_none, header[-1]]
    return ModelfileSpec(from_=from_, template=tpl.ollama or None, stops=list(tpl.stop), system=tpl.default_system,
                         header=header, parameters=parameters, **more)  # fmt: skip


def dir_modelfile(tpl: Any, source: str, model_dir: Path | None = None) -> str:
    """An Ollama Modelfile `FROM .` for the HF dir it is written into (`model_dir`, whose generation_config.json
    gives the sampling PARAMETERs), as LLaMA-Factory's export writes one: Ollama converts the safetensors itself,
    for the architectures it supports."""
    from exporter.converters.modelfile import render

    header = [
        f"Ollama Modelfile for the safetensors model in this dir, written by exporter {__version__}",
        f"source model: {source}",
        f"chat template: {tpl.name}",
        *(n.replace("\n", "\\n") for n in tpl.notes),
        "create with: ollama create NAME -f Modelfile (Ollama converts the weights of the architectures it supports;",
        "`exporter gguf` on this dir writes GGUFs and Modelfiles that `exporter verify` checks)",
    ]
    return render(modelfile_spec(tpl, model_dir, ".", header))


def default_out(src: Path) -> Path:
    """`<src>-gguf` beside `src`, from its resolved path (`exporter gguf .` -> `../<dir>-gguf`, not `-gguf` in it)."""
    src = src.resolve()
    return src.parent / f"{src.name}-gguf"


def create_command(name: str, modelfile: Path) -> str:
    """The `ollama create` line printed for a Modelfile, shell-quoted (paths with spaces or parentheses)."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile))}"


def base_from_line(base_gguf: str | None, base_dir: Path, out: Path) -> str:
    """FROM of an adapter's Modelfile: `base_gguf` as given when it is an Ollama model name, an existing path
    relative to the Modelfile's dir `out` (Ollama resolves a relative FROM there, not in the cwd); else the base."""
    if base_gguf is None:
        return str(base_dir.resolve())
    path = Path(base_gguf).expanduser()
    if not path.exists():
        return base_gguf
    rel = os.path.relpath(path.resolve(), out.resolve())
    return rel if rel.startswith("..") else f"./{rel}"


def check_modelfile(tpl: Any, model_dir: Path | None = None) -> None:
    """A Modelfile with `tpl`'s TEMPLATE, stops and SYSTEM and `model_dir`'s sampling PARAMETERs can be written:
    refused (naming the character and its offset, or the generation_config key) before anything is converted."""
    from exporter.converters.modelfile import render

    render(modelfile_spec(tpl, model_dir, "./model.gguf"))


def export(
    model_dir: Path,
    kinds: list[str],
    tpl: Any,
    out: Path,
    ollama_name: str | None = None,
    force: bool = False,
    source_label: str | None = None,
) -> GGUFResult:
    """Write the GGUF files and Modelfiles for `kinds` into `out` (atomically) using chat template `tpl`; every
    refusal comes before the first line printed."""
    from exporter import manifest
    from exporter.converters import gguf_convert, gguf_vocab
    from exporter.converters.modelfile import render

    check_target(out, force, [model_dir])
    manifest.check_stage(out, "gguf")  # --force replaces a previous gguf output only
    arch, hp, src = gguf_convert.plan(model_dir)  # unsupported architecture / missing weights fail before any write
    src.close()
    # the tokenizer's refusals (none, ids past vocab_size, an end-of-turn token it lacks) before any line too
    vocab = gguf_vocab.build_vocab(model_dir, hp, arch, list(tpl.eot_tokens))
    params = sum(math.prod(shape) for shape in src.shapes.values())
    stem = _safe_name(model_dir.resolve().name)
    names = ollama_names(model_dir, kinds, ollama_name)
    kquants = [k for k in kinds if k in KQUANT_KINDS]
    numpy_kinds = [k for k in kinds if k in NUMPY_KINDS]
    temp_f16 = bool(kquants) and "f16" not in numpy_kinds
    if temp_f16:
        numpy_kinds.append("f16")
    # the peak on disk: every type asked for, and the f16 that K-quants are made from until the last is written
    need = int(params * sum(_BYTES_PER_PARAM[k] for k in dict.fromkeys([*kinds, *numpy_kinds])))
    check_free_space(out.parent, need)
    check_modelfile(tpl, model_dir)
    result = GGUFResult(out)
    with atomic_dir(out, force, [model_dir], need) as tmp:
        _say_template(tpl)  # once `out` is claimed: a path that cannot be written is refused before any line too
        paths = {k: tmp / f"{stem}-{k}.gguf" for k in numpy_kinds}
        if temp_f16:
            paths["f16"] = tmp / f".{stem}-f16.for-kquant.gguf"
        with _progress() as prog:
            task = prog.add_task(f"GGUF {','.join(numpy_kinds)}", total=None)
            written, vocab = gguf_convert.convert(
                model_dir,
                paths,
                tpl.jinja or None,
                list(tpl.eot_tokens),
                progress=lambda done, total: prog.update(task, completed=done, total=total),
                vocab=vocab,
            )
            for rec in written:
                result.fallbacks[rec.kind] = rec.fallbacks
            for kind in kquants:
                ktask = prog.add_task(f"GGUF {kind} (libllama)", total=None)
                path = tmp / f"{stem}-{kind}.gguf"
                result.fallbacks[kind] = _kquant(paths["f16"], path, kind, int(params * _BYTES_PER_PARAM[kind]))
                paths[kind] = path
                prog.update(ktask, total=path.stat().st_size, completed=path.stat().st_size)
        if temp_f16:
            paths.pop("f16").unlink()
        for note in vocab.notes:
            console.print(f"[yellow]tokenizer:[/] {note}")
        for kind in kinds:
            gguf_name = paths[kind].name
            mf = tmp / f"Modelfile.{kind}"
            header = modelfile_header(kind, source_label or str(model_dir), tpl, names[kind], gguf_name)
            text = render(modelfile_spec(tpl, model_dir, f"./{gguf_name}", header))
            mf.write_text(text, encoding="utf-8")
            result.files[kind] = out / gguf_name
            result.modelfiles[kind] = out / mf.name
            result.names[kind] = names[kind]
            result.commands.append(create_command(names[kind], out / mf.name))
        manifest.write(
            tmp,
            "gguf",
            inputs={"model": source_label or model_dir},
            settings={"types": kinds, "template": tpl.name, "ollama_names": names, "fallbacks": result.fallbacks},
        )
    return result


def _kquant(f16: Path, path: Path, kind: str, expected: int) -> list[str]:
    """libllama's K-quant of `f16` at `path` (`gguf_kquant.quantize`; about `expected` bytes), Ctrl-C held until it
    returns (`_signals_held`); a failure on a disk that cannot hold the rest of the file is the full disk it is (the
    atomic writer's one line), not libllama's bare return code."""
    from exporter.converters import gguf_kquant

    try:
        with _signals_held(f"the {kind} GGUF"):
            return gguf_kquant.quantize(f16, path, kind)
    except UserError:
        written = path.stat().st_size if path.exists() else 0
        if shutil.disk_usage(path.parent).free < expected - written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


@contextmanager
def _signals_held(what: str) -> Iterator[None]:
    """Hold Ctrl-C (and a Python SIGTERM handler, the CLI's) while libllama runs, its log lines through Python code
    (`quiet.llama_log_in_python`) so that the holding handler runs during the call (one that raised there would have
    its exception printed and dropped by ctypes, and the run would go on to the end). The first signal is raised once
    the native call returns, which removes the partial output on the way out; a second ends the process at once, as a
    kill does (the next run writing the output removes what it left)."""
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(s))]
    if threading.current_thread() is not threading.main_thread() or not held:
        yield
        return
    previous: dict[int, Callable[..., Any]] = {s: signal.getsignal(s) for s in held}  # type: ignore[misc]
    got: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if got:  # the second: now, the way a kill ends it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        got.append(signum)
        print(f"\nstopping once libllama has written {what} (press Ctrl-C again to stop at once; the next run "
              "removes what it leaves)", file=sys.stderr, flush=True)  # fmt: skip

    for s in held:
        signal.signal(s, hold)
    try:
        with llama_log_in_python():
            yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got:
        previous[got[0]](got[0], None)  # Python's KeyboardInterrupt, the CLI's SystemExit(143)


def export_adapter(
    adapter_dir: Path,
    base_dir: Path,
    kinds: list[str],
    tpl: Any,
    out: Path,
    ollama_name: str | None = None,
    force: bool = False,
    base_gguf: str | None = None,
) -> GGUFResult:
    """A PEFT LoRA adapter as a GGUF LoRA file plus a Modelfile `FROM <base>` + `ADAPTER ./<file>.gguf`; an adapter
    trained on another base is refused (`adapter.check_base`). Nothing is printed before the file is converted."""
    from exporter import manifest
    from exporter.adapter import check_base
    from exporter.converters.gguf_lora import LORA_KINDS, convert_lora
    from exporter.converters.modelfile import render

    if len(kinds) != 1 or kinds[0] not in LORA_KINDS:
        raise UserError(f"with --adapter, --type is one of {', '.join(LORA_KINDS)} (the LoRA matrices' type)")
    kind = kinds[0]
    check_target(out, force, [adapter_dir, base_dir])
    manifest.check_stage(out, "gguf")
    note = check_base(adapter_dir, base_dir, str(adapter_dir))
    # the sampling the model was published with: the adapter's own generation_config.json, else the base's
    sampling_dir = adapter_dir if (adapter_dir / "generation_config.json").is_file() else base_dir
    check_modelfile(tpl, sampling_dir)
    stem = _safe_name(adapter_dir.resolve().name)
    name = ollama_name or default_ollama_name(adapter_dir)
    base_from = base_from_line(base_gguf, base_dir, out)
    need = _lora_bytes(adapter_dir, kind)
    check_free_space(out.parent, need)
    result = GGUFResult(out)
    with atomic_dir(out, force, [adapter_dir, base_dir], need) as tmp:
        path = tmp / f"{stem}-lora-{kind}.gguf"
        ranks = convert_lora(adapter_dir, base_dir, path, kind)
        _say_template(tpl)
        if note:
            console.print(note, highlight=False, markup=False, soft_wrap=True)
        header = modelfile_header(kind, f"{adapter_dir} on {base_dir}", tpl, name, path.name)
        header[-1] = (
            f"create with: ollama create {name} -f Modelfile (FROM must be the base model the adapter was trained on)"
        )
        text = render(modelfile_spec(tpl, sampling_dir, base_from, header, adapter=f"./{path.name}"))
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        manifest.write(
            tmp,
            "gguf",
            inputs={"adapter": adapter_dir, "base": base_dir},
            settings={"mode": "adapter", "type": kind, "template": tpl.name, "lora_tensors": len(ranks)},
        )
    result.files[kind] = out / path.name
    result.modelfiles[kind] = out / "Modelfile"
    result.names[kind] = name
    result.commands.append(create_command(name, out / "Modelfile"))
    return result


def _lora_bytes(adapter_dir: Path, kind: str) -> int:
    """About what the GGUF LoRA of `adapter_dir` takes at `kind` (f32/f16): every tensor of its weights file at that
    width (a `.bin` file: its size at 16 bits a value)."""
    from exporter.safetensors_file import read_header

    width = _BYTES_PER_PARAM[kind]
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        return int(width * sum(math.prod(e.shape) for e in read_header(st).values()))
    return int(width * sum(p.stat().st_size for p in adapter_dir.glob("adapter_model*.bin")) / 2)


def check_options(opts: GGUFOptions) -> list[str]:
    """The types, the Ollama name and `base_gguf`, checked before any stage runs; returns the parsed types."""
    kinds = parse_types(opts.types)
    check_ollama_name(opts.ollama_name)
    if opts.base_gguf is not None and opts.adapter is None:
        raise UserError(
            f"--base-gguf {opts.base_gguf!r} is the FROM of an adapter's Modelfile: it needs --adapter (a full "
            "model's Modelfile is FROM its own GGUF)"
        )
    return kinds


def run(opts: GGUFOptions) -> GGUFResult:
    """The `exporter gguf` stage: convert a model (or, with `adapter`, a LoRA adapter) and print how to import it."""
    from exporter import hub, templates
    from exporter.converters.gguf_arch import arch_for, load_hparams

    kinds = check_options(opts)
    model_dir = hub.resolve(opts.model, "model")
    arch_for(load_hparams(model_dir), model_dir)  # an unsupported architecture is the first thing to report
    check_readable(model_dir)  # truncated weights, non-UTF-8 tokenizer files: one line, not the converter's traceback
    if opts.adapter is not None:
        adapter_dir = hub.resolve(opts.adapter, "adapter")
        if adapter_dir.is_dir():
            check_readable(adapter_dir)
        has_template = (adapter_dir / "chat_template.jinja").is_file() or "chat_template" in read_json(
            adapter_dir / "tokenizer_config.json", optional=True
        )
        tpl = templates.resolve(adapter_dir if has_template else model_dir, opts.template, need=False)
        out = Path(opts.out) if opts.out is not None else default_out(adapter_dir)
        result = export_adapter(adapter_dir, model_dir, kinds, tpl, out, opts.ollama_name, opts.force, opts.base_gguf)
    else:
        tpl = templates.resolve(model_dir, opts.template, need=False)
        out = Path(opts.out) if opts.out is not None else default_out(model_dir)
        result = export(model_dir, kinds, tpl, out, opts.ollama_name, opts.force, source_label=str(opts.model))
    _report(result)
    return result


def _say_template(tpl: Any) -> None:
    """What the export does with the chat template, and what differs in Ollama (stdout: a person reads it)."""
    print(f"chat template: {tpl.name}")
    for note in tpl.notes:
        print(f"  {note}")


def _report(result: GGUFResult) -> None:
    for kind, notes in result.fallbacks.items():
        for note in notes:
            console.print(f"[dim]{kind}: {note}[/]")
    for kind, path in result.files.items():
        size = path.stat().st_size / 2**20 if path.exists() else 0
        console.print(f"wrote {path} ({size:.1f} MiB) and {result.modelfiles[kind].name}")
    print("Import into Ollama with:")
    for cmd in result.commands:
        print(f"  {cmd}")
