"""What verify looks at: the artifacts given or found in a run dir, read into what the checks need.

GGUF metadata comes from the fast header reader (`converters/gguf_read.py`), Modelfiles from the one Ollama-rules
parser (`converters/modelfile.py`); every bad input is a UserError before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.config import read_json, read_text
from exporter.errors import UserError


@dataclasses.dataclass
class VerifyOptions:
    """What `exporter verify` takes (CLI flags and the pipeline's `verify:` block): the artifacts to look at (any
    may be missing: the checks that need it are not run) and the check settings."""

    base: Path | None = None
    adapter: Path | None = None
    merged: Path | None = None
    ggufs: list[Path] = dataclasses.field(default_factory=list)
    modelfiles: list[Path] = dataclasses.field(default_factory=list)
    quantized: list[Path] = dataclasses.field(default_factory=list)
    data: list[Path] = dataclasses.field(default_factory=list)  # training data: its texts and prompts are checked
    text: Path | None = None  # held-out text for perplexity (default: built-in)
    run_dir: Path | None = None  # a pipeline run dir: fills in what is not given
    template: str | None = None  # the training chat-template family (default: detected)
    ppl_threshold: dict[str, float] = dataclasses.field(default_factory=dict)  # per type, over DEFAULT_THRESHOLDS
    kld_threshold: dict[str, float] = dataclasses.field(default_factory=dict)  # per type, over DEFAULT_KLD
    top1_threshold: dict[str, float] = dataclasses.field(default_factory=dict)  # per type, over DEFAULT_TOP1
    prompts: int = 4
    ctx: int = 128
    max_windows: int = 8
    max_new_tokens: int = 24
    eval_dir: Path | None = None  # LF's evaluation/ dir: accuracy of merged vs each GGUF on a slice (`accuracy`)
    eval_task: str | None = None  # mmlu_test | ceval_validation | cmmlu_test (default: the first in eval_dir)
    eval_questions: int = 5  # questions per subject


# the artifacts among the options, as the report lists them
ARTIFACTS = ("base", "adapter", "merged", "ggufs", "modelfiles", "quantized", "data", "text")


def artifacts_json(opts: VerifyOptions) -> dict[str, Any]:
    """The artifacts, paths as strings, for the report."""
    out: dict[str, Any] = {}
    for k in ARTIFACTS:
        v = getattr(opts, k)
        out[k] = str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v
    return out


def discover(run_dir: Path) -> VerifyOptions:
    """Artifacts of a pipeline run dir: adapter/, merged/, gguf/*.gguf, Modelfiles, and the recorded base/data."""
    if not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: not a directory")
    art = VerifyOptions()
    state = run_dir / "pipeline.json"
    if state.is_file():
        doc = read_json(state)
        art.base = Path(doc["base"]) if doc.get("base") else None
        art.data = [Path(p) for p in doc.get("data") or []]
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and ".tmp-" not in p.name):
        if (d / "adapter_config.json").is_file() and art.adapter is None:
            art.adapter = d
        elif d.name != "base" and (d / "config.json").is_file() and any(d.glob("*.safetensors")) and not art.merged:
            art.merged = d
    art.ggufs = sorted(p for p in run_dir.rglob("*.gguf") if ".tmp-" not in str(p))
    art.modelfiles = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name.startswith("Modelfile"))
    if not state.is_file() and not (art.adapter or art.merged or art.ggufs or art.modelfiles):
        raise UserError(_not_a_run(run_dir))
    return art


def _not_a_run(run_dir: Path) -> str:
    """Why `run_dir` has nothing to verify, and which option takes what it is when it is a model or adapter dir."""
    what = (
        ": it is a PEFT adapter dir, give it as --adapter"
        if (run_dir / "adapter_config.json").is_file()
        else ": it is an HF model dir, give it as --merged"
        if (run_dir / "config.json").is_file()
        else ""
    )
    return (
        f"--run-dir {run_dir}: not a pipeline run dir (expected pipeline.json, an adapter/ and merged/ or model/ "
        f"dir, or gguf/*.gguf in it; found none){what}"
    )


def _files_in(paths: list[Path], option: str, wanted: Callable[[Path], bool]) -> list[Path]:
    """`paths` with each directory replaced by the files in it that `option` takes (`--gguf out/gguf`: its GGUFs)."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            out.append(p)
            continue
        found = sorted(f for f in p.iterdir() if f.is_file() and wanted(f) and ".tmp-" not in f.name)
        if not found:
            raise UserError(f"{option} {p}: a directory with no {option[2:]} file in it")
        out += found
    return out


def collect(opts: VerifyOptions) -> VerifyOptions:
    """The options with paths as Paths, what is not given filled in from a pipeline `run_dir`, and the base of an
    adapter from its config."""
    found = discover(Path(opts.run_dir)) if opts.run_dir is not None else VerifyOptions()
    art = dataclasses.replace(opts)
    for name in ("base", "adapter", "merged", "text"):
        value = getattr(opts, name) or (getattr(found, name) if name != "text" else None)
        setattr(art, name, Path(value) if value else None)
    for name in ("ggufs", "modelfiles", "quantized", "data"):
        setattr(art, name, [Path(p) for p in getattr(opts, name)] or getattr(found, name))
    art.ggufs = _files_in(art.ggufs, "--gguf", lambda p: p.suffix == ".gguf")
    art.modelfiles = _files_in(art.modelfiles, "--modelfile", lambda p: p.name.startswith("Modelfile"))
    if art.adapter is not None and art.base is None and (art.adapter / "adapter_config.json").is_file():
        cfg = read_json(art.adapter / "adapter_config.json")
        if cfg.get("base_model_name_or_path"):
            from exporter import hub

            art.base = hub.resolve(cfg["base_model_name_or_path"], "base model of the adapter")
    return art


def tokenizer_source(art: VerifyOptions) -> Path | None:
    """The dir verify reads the HF tokenizer from: the merged model's, else the adapter's own when it has one (as
    the engine loads it), else the base's; None when none is given."""
    from exporter.hf_dir import tokenizer_dir

    if art.merged is not None:
        return Path(art.merged)
    if art.base is not None:
        return tokenizer_dir(Path(art.base), Path(art.adapter) if art.adapter is not None else None)
    return Path(art.adapter) if art.adapter is not None else None


def check_inputs(art: VerifyOptions) -> None:
    """Every given path exists and is the kind of thing its flag names; there is something to verify."""
    if art.eval_dir is None and (art.eval_task is not None or art.eval_questions != 5):
        raise UserError("--eval-task / --eval-questions (eval_task / eval_questions) choose what the accuracy check "
                        "asks: give the benchmark dir with --eval (eval_dir)")  # fmt: skip
    for name in ("base", "adapter", "merged"):
        p = getattr(art, name)
        if p is not None and not Path(p).is_dir():
            raise UserError(f"--{name} {p}: not a directory")
    for q in art.quantized:
        if not (Path(q) / "config.json").is_file():
            raise UserError(f"--quantized {q}: no config.json (expected an `exporter quantize` output dir)")
    if art.merged is not None and not (art.merged / "config.json").is_file():
        raise UserError(f"--merged {art.merged}: no config.json (expected an exported HF model dir)")
    if art.adapter is not None and not (art.adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter {art.adapter}: no adapter_config.json (expected a PEFT adapter dir)")
    for p in art.ggufs + art.modelfiles + art.data + ([art.text] if art.text else []):
        if not Path(p).exists():
            raise UserError(f"{p}: no such file")
    if art.text:
        read_text(art.text)  # not UTF-8: one line naming the byte, before any model is loaded
    from exporter.hf_dir import check_loadable, check_readable

    for d in (art.base, art.adapter, art.merged, *art.quantized):
        if d is not None and Path(d).is_dir():
            check_readable(Path(d))  # truncated weights, non-UTF-8 files: one line naming the file, not a traceback
    tok = tokenizer_source(art)  # verify loads that one itself: its tokenizer is checked then, not loaded twice
    for d in (art.base, art.merged, *art.quantized):  # the models loaded: tokenizer, architecture, pickles, no code run
        if d is not None and Path(d).is_dir():
            check_loadable(Path(d), tokenizer=Path(d) != tok)
    if art.base is not None and art.adapter is not None:
        from exporter import adapter

        note = adapter.check_base(Path(art.adapter), Path(art.base), str(art.adapter))
        if note:
            print(note, file=sys.stderr)
    if art.quantized and art.merged is None:
        raise UserError("--quantized needs --merged: quantized dirs are scored against the unquantized model")
    if art.merged is None and art.adapter is None and not art.ggufs and not art.modelfiles:
        if art.run_dir is not None:  # a run dir whose pipeline has not written a model yet
            raise UserError(
                f"--run-dir {art.run_dir}: nothing to verify yet (pipeline.json but no adapter/, merged/, model/ or "
                "gguf/*.gguf in it: run the pipeline first)"
            )
        raise UserError("nothing to verify: give --merged, --adapter, --gguf, --modelfile or --run-dir")


# ----------------------------------------------------------------------------------------------------- data


def data_texts(path: Path, limit: int = 200) -> tuple[list[str], list[str]]:
    """(texts, user prompts) from a JSON/JSONL data file or dir (every string value; user turns as prompts)."""
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.name != "dataset_info.json")
    )
    texts: list[str] = []
    prompts: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            if x.strip():
                texts.append(x)
        elif isinstance(x, dict):
            role = x.get("role", x.get("from"))
            content = x.get("content", x.get("value"))
            if role in ("user", "human") and isinstance(content, str):
                prompts.append(content)
            if isinstance(x.get("instruction"), str):
                prompts.append((x["instruction"] + ("\n" + x["input"] if x.get("input") else "")).strip())
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for f in files:
        try:
            raw = read_text(f)
            records = (
                [json.loads(line) for line in raw.splitlines() if line.strip()]
                if f.suffix == ".jsonl"
                else [json.loads(raw)]
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"data {f}: not readable JSON ({e})") from None
        walk(records)
    if path.is_file() and not texts:  # a file given by name that adds nothing is not silently ignored
        raise UserError(
            f"data {path}: no text in any row; expected rows with string values (messages with content, "
            "instruction/input/output, or text)"
        )
    return list(dict.fromkeys(texts))[:limit], list(dict.fromkeys(prompts))


# ----------------------------------------------------------------------------------------------------- HF dirs


def exported_templates(model_dir: Path) -> dict[str, str]:
    """The chat templates an exported HF dir carries, by where they are ('' when it has none)."""
    out: dict[str, str] = {}
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        v = read_json(cfg).get("chat_template")
        if isinstance(v, str):
            out[f"{model_dir.name}/tokenizer_config.json"] = v
    jf = model_dir / "chat_template.jinja"
    if jf.is_file():
        out[f"{model_dir.name}/chat_template.jinja"] = read_text(jf)
    if not out:
        out[f"{model_dir.name}/tokenizer_config.json"] = ""
    return out


def gen_eos(model_dir: Path | None) -> list[int] | None:
    """`eos_token_id` of a dir's generation_config.json as a list (None without the file)."""
    if model_dir is None or not (model_dir / "generation_config.json").is_file():
        return None
    v = read_json(model_dir / "generation_config.json").get("eos_token_id")
    return [] if v is None else ([int(v)] if isinstance(v, int) else [int(x) for x in v])


def quantized_kind(model_dir: Path) -> str:
    """`gptq4`, `gptq8`, `awq4`, `bnb4` or `bnb8` from a quantized HF dir's `quantization_config`."""
    q = read_json(model_dir / "config.json").get("quantization_config")
    if not isinstance(q, dict):
        raise UserError(f"--quantized {model_dir}: config.json has no quantization_config (not a quantized model)")
    method = str(q.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        return "bnb4" if q.get("load_in_4bit") or q.get("_load_in_4bit") else "bnb8"
    if method in ("gptq", "awq"):
        return f"{method}{int(q.get('bits', 4))}"
    raise UserError(f"--quantized {model_dir}: quant_method {method!r} is not one of gptq, awq, bitsandbytes")


# ----------------------------------------------------------------------------------------------------- Modelfile


@dataclasses.dataclass
class Modelfile:
    """The parts of an Ollama Modelfile that verify checks."""

    path: Path
    from_: str
    template: str | None
    system: str | None
    stops: list[str]
    froms: list[str] = dataclasses.field(default_factory=list)  # every FROM, in order (Ollama reads each)
    adapters: list[str] = dataclasses.field(default_factory=list)
    parameters: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, value), stop included


def parse_modelfile(path: Path) -> Modelfile:
    """FROM / ADAPTER / TEMPLATE / SYSTEM / PARAMETERs of an Ollama Modelfile, read with Ollama's parsing rules."""
    from exporter.converters.modelfile import parse

    try:
        commands = parse(read_text(path))  # not UTF-8: one line naming the byte and line
    except ValueError as e:
        raise UserError(f"Modelfile {path}: {e}") from None
    last = {cmd: value for cmd, value in commands}
    stops = [value for cmd, value in commands if cmd == "parameter stop"]
    return Modelfile(
        path, last["model"], last.get("template"), last.get("system"), stops,
        froms=[value for cmd, value in commands if cmd == "model"],
        adapters=[value for cmd, value in commands if cmd == "adapter"],
        parameters=[(cmd.removeprefix("parameter "), value) for cmd, value in commands if cmd.startswith("parameter ")],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------- GGUF


@dataclasses.dataclass
class GGUFInfo:
    """Metadata of one GGUF that the checks need."""

    path: Path
    arch: str
    file_type: str
    chat_template: str | None
    pre: str | None
    eog_ids: dict[str, int]  # key name -> id, for eos/eot/eom
    bos_id: int | None
    eos_ids: list[int]  # tokenizer.ggml.eos_token_ids when present
    tokens: list[str]
    token_types: list[int]
    context_length: int | None = None  # `{arch}.context_length`: Ollama cuts num_ctx to it, llama.cpp's -c 0 uses it
    add_bos: bool | None = None  # tokenizer.ggml.add_bos_token; None when the key is absent


def read_gguf(path: Path) -> GGUFInfo:
    """Read the metadata verify needs; UserError when the file is not a GGUF."""
    from gguf import LlamaFileType

    from exporter.converters.gguf_read import read_kv

    kv = read_kv(path)
    try:
        ftype = LlamaFileType(int(kv.get("general.file_type"))).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        ftype = ftype.lower()
    except (TypeError, ValueError):
        ftype = "unknown"
    eog = {
        n: int(kv[f"tokenizer.ggml.{n}_token_id"])
        for n in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{n}_token_id" in kv
    }
    eos_ids = kv.get("tokenizer.ggml.eos_token_ids")
    arch = str(kv.get("general.architecture"))
    n_ctx = kv.get(f"{arch}.context_length")
    add_bos = kv.get("tokenizer.ggml.add_bos_token")
    return GGUFInfo(
        path=path,
        arch=arch,
        file_type=ftype,
        chat_template=kv.get("tokenizer.chat_template"),
        pre=kv.get("tokenizer.ggml.pre"),
        eog_ids=eog,
        bos_id=int(kv["tokenizer.ggml.bos_token_id"]) if "tokenizer.ggml.bos_token_id" in kv else None,
        eos_ids=[int(x) for x in eos_ids] if eos_ids is not None else [],
        tokens=list(kv.get("tokenizer.ggml.tokens") or []),
        token_types=[int(x) for x in kv.get("tokenizer.ggml.token_type", [])],
        context_length=int(n_ctx) if n_ctx is not None else None,
        add_bos=bool(add_bos) if add_bos is not None else None,
    )


class GGUFLoadError(Exception):
    """llama.cpp refused the file."""


class Vocab:
    """A GGUF's vocabulary as llama.cpp loads it, without weights or a context (a context over a vocab-only load
    makes llama.cpp warn about a training context of 0, which the file does not have)."""

    def __init__(self, info: GGUFInfo) -> None:
        import llama_cpp

        from exporter.quiet import silence_llama_cpp

        silence_llama_cpp()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(info.path).encode(), params)
        if not self.model:
            raise GGUFLoadError(
                f"llama.cpp cannot load the vocabulary of {info.path.name} (arch {info.arch!r}, "
                f"tokenizer.ggml.pre={info.pre!r})"
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        import llama_cpp

        n_max = len(text) + 8
        for _ in range(2):
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, text, len(text), buf, n_max, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n
        raise GGUFLoadError("llama_tokenize kept asking for a larger buffer")

    def n_tokens(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        import llama_cpp

        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def load_llama(info: GGUFInfo, **kwargs: Any) -> Any:
    """The GGUF loaded by llama.cpp; GGUFLoadError (a failed check, not a crash) when it refuses it."""
    from llama_cpp import Llama

    from exporter.quiet import silence_llama_cpp

    silence_llama_cpp()
    try:
        return Llama(model_path=str(info.path), verbose=False, **kwargs)
    except Exception as e:
        raise GGUFLoadError(
            f"llama.cpp cannot load {info.path.name} ({e}; arch {info.arch!r}, tokenizer.ggml.pre={info.pre!r})"
        ) from None
