"""`exporter chat`: a terminal chat on the engine, like `llamafactory-cli chat` (streamed answers, history,
`clear`, `exit`; Ollama's `/clear`, `/bye`, `/exit`, `/?` too); with stdin not a terminal it reads one prompt a
line and prints each answer whole on one line (newlines escaped as \\n, backslashes doubled; `[error: ...]` in its
place when it fails): scriptable.

Also here: LLaMA-Factory's inference YAML (`model_name_or_path`, `adapter_name_or_path`, `template`,
`infer_backend`, `default_system`, generation keys), read unchanged by `chat` and `serve`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from exporter.config import did_you_mean, parse_overrides, read_yaml
from exporter.engine import EngineError, LoadOptions, Sampling
from exporter.engine.sampling import check_sampling
from exporter.errors import UserError
from exporter.hf_dir import NO_MODEL_CODE

# LLaMA-Factory's generation defaults (its GeneratingArguments), used by `chat` as `llamafactory-cli chat` does.
LF_SAMPLING = Sampling(max_new_tokens=1024, temperature=0.95, top_p=0.7, top_k=50)
LF_BACKENDS = {"huggingface": "hf", "hf": "hf", "vllm": "vllm"}
# Inference keys with no effect here, said once: exporter never runs a model's remote code, and the rest only
# choose how transformers loads what we load anyway.
LF_NO_EFFECT = {
    "trust_remote_code": NO_MODEL_CODE,
    "use_fast_tokenizer": "the fast tokenizer is always used",
    "flash_attn": "attention is transformers' default (sdpa)",
    "finetuning_type": "an adapter_name_or_path is attached as a LoRA",
    "stage": "inference only",
}
LF_KEYS = {
    "model_name_or_path", "adapter_name_or_path", "template", "infer_backend", "default_system", "infer_dtype",
    "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "do_sample", "skip_special_tokens",
    "num_beams", "length_penalty", "vllm_maxlen",
}  # fmt: skip
_DTYPES = {"auto": "auto", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass
class ChatOptions:
    """What `exporter chat` runs: the model, sampling, a default system prompt, the input and output streams."""

    load: LoadOptions
    sampling: Sampling = LF_SAMPLING
    system: str | None = None
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stdout: TextIO = field(default_factory=lambda: sys.stdout)


@dataclass
class InferConfig:
    """An inference YAML as engine options: what to load, how to sample, the default system prompt."""

    load: dict[str, Any]
    sampling: dict[str, Any]
    system: str | None
    notes: list[str]


# the typed keys of an inference YAML (LF's GeneratingArguments / ModelArguments types)
_TYPES: dict[str, type] = {
    "temperature": float, "top_p": float, "repetition_penalty": float, "length_penalty": float, "top_k": int,
    "max_new_tokens": int, "num_beams": int, "vllm_maxlen": int, "do_sample": bool, "skip_special_tokens": bool,
}  # fmt: skip
_EXPECTED = {int: "an integer", float: "a number", bool: "true or false"}


def _typed(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """`data[key]` as `kind` (a quoted number reads as one; 2.5 is no integer, "yes" no boolean); anything else is
    one line naming the file, the key and the type expected."""
    v = data[key]
    if kind is bool:
        if isinstance(v, bool):
            return v
    elif isinstance(v, str):
        try:
            return kind(v.strip())
        except ValueError:
            pass
    elif not isinstance(v, bool) and (isinstance(v, int) or (kind is float and isinstance(v, float))):
        return kind(v)
    raise UserError(f"{where}: {key}: expected {_EXPECTED[kind]}, got {v!r}")


def read_infer_yaml(path: Path | str, overrides: Sequence[str] = ()) -> InferConfig:
    """LLaMA-Factory's inference YAML, with `key=value` overrides over it as `llamafactory-cli chat cfg.yaml k=v`
    takes them; an unknown key is an error with a did-you-mean, never ignored."""
    data = read_yaml(path) | parse_overrides(overrides)
    where = f"{path} with {' '.join(overrides)}" if overrides else str(path)  # a bad value may be an override's
    load: dict[str, Any] = {}
    samp: dict[str, Any] = {}
    notes = []
    for key in data:
        if key in LF_NO_EFFECT:
            notes.append(f"{where}: {key}: {LF_NO_EFFECT[key]}")
        elif key not in LF_KEYS:
            raise UserError(f"{where}: unknown inference key {key!r}{did_you_mean(key, LF_KEYS | set(LF_NO_EFFECT))}")
    if "model_name_or_path" not in data:
        raise UserError(f"{where}: model_name_or_path is required")
    load["model"] = str(data["model_name_or_path"])
    adapters = data.get("adapter_name_or_path")
    if adapters:
        names = [a.strip() for a in str(adapters).split(",") if a.strip()]
        if len(names) > 1:
            raise UserError(f"{where}: adapter_name_or_path: one adapter at a time (merge several with exporter merge)")
        load["adapter"] = names[0]
    if data.get("template"):
        load["template"] = str(data["template"])
    backend = str(data.get("infer_backend") or "huggingface")
    if backend not in LF_BACKENDS:
        raise UserError(f"{where}: infer_backend {backend!r}: expected huggingface or vllm")
    if not str(load["model"]).endswith(".gguf"):
        load["backend"] = LF_BACKENDS[backend]
    dtype = str(data.get("infer_dtype") or "auto")
    if dtype not in _DTYPES:
        raise UserError(f"{where}: infer_dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    load["dtype"] = _DTYPES[dtype]
    value = {k: _typed(data, k, kind, where) for k, kind in _TYPES.items() if data.get(k) is not None}
    if "vllm_maxlen" in value:
        if value["vllm_maxlen"] < 1:
            raise UserError(f"{where}: vllm_maxlen: expected a positive integer, got {value['vllm_maxlen']}")
        load["ctx"] = value["vllm_maxlen"]
    if value.get("num_beams", 1) != 1:
        raise UserError(f"{where}: num_beams {value['num_beams']}: beam search is not supported (use 1)")
    if value.get("length_penalty", 1.0) != 1.0:
        raise UserError(f"{where}: length_penalty applies to beam search only, which is not supported")
    for key in ("temperature", "top_p", "repetition_penalty", "top_k", "max_new_tokens", "skip_special_tokens"):
        if key in value:
            samp[key] = value[key]
    if value.get("do_sample") is False:
        samp["temperature"] = 0.0
    return InferConfig(load, samp, data.get("default_system"), notes)


def resolve_options(
    model: str,
    cli_load: dict[str, Any],
    cli_sampling: dict[str, Any],
    system: str | None,
    defaults: Sampling,
    overrides: Sequence[str] = (),
) -> tuple[LoadOptions, Sampling, str | None]:
    """MODEL (a model path or an inference YAML, with `key=value` `overrides` over it) + command-line values (which
    win) -> engine options."""
    load: dict[str, Any] = {"model": model}
    samp: dict[str, Any] = {}
    is_yaml = model.endswith((".yaml", ".yml")) and Path(model).is_file()
    if overrides and not is_yaml:
        raise UserError(f"{' '.join(overrides)}: key=value overrides apply to an inference YAML; {model} is not one "
                        "(give the settings as options, e.g. --max-new-tokens)")  # fmt: skip
    if is_yaml:
        cfg = read_infer_yaml(model, overrides)
        for note in cfg.notes:
            print(f"note: {note}", file=sys.stderr)
        load, samp, system = cfg.load, cfg.sampling, system or cfg.system
    load.update({k: v for k, v in cli_load.items() if v is not None})
    samp.update({k: v for k, v in cli_sampling.items() if v is not None})
    try:
        sampling = defaults.replace(**samp)
        check_sampling(sampling)  # a bad value is one line now, not an error per answer
        return LoadOptions(**load), sampling, system
    except TypeError as e:
        raise UserError(f"bad option: {e}") from None
    except EngineError as e:
        raise UserError(str(e)) from None


def quantized_model(opts: LoadOptions) -> bool:
    """Whether `opts.model` is an HF dir from `exporter quantize` (its loaders must stay importable)."""
    cfg = Path(opts.model).expanduser() / "config.json"
    try:
        return cfg.is_file() and "quantization_config" in cfg.read_text(encoding="utf-8")
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ the chat loop

WELCOME = "Welcome to the CLI application, use `clear` to remove the history, use `exit` to exit the application."
HELP = """Available commands:
  clear, /clear    Remove the history
  exit, /bye       Exit (also /exit, Ctrl-D)
  /?, /help        This help
"""
# the commands each word is (LLaMA-Factory's chat: exit, clear; `ollama run`: /bye, /exit, /clear, /?, /help)
COMMANDS = {"exit": "exit", "/bye": "exit", "/exit": "exit", "clear": "clear", "/clear": "clear", "/?": "help",
            "/help": "help"}  # fmt: skip


def command(query: str) -> str | None:
    """`exit`, `clear` or `help` when the line is a chat command, else None. LF's `exit` and `clear` are the whole
    line; Ollama's slash commands its first word, as `ollama run` reads them (`/? shortcuts` is help too)."""
    if query in ("exit", "clear"):
        return query
    words = query.split(maxsplit=1)
    return COMMANDS.get(words[0]) if words and words[0].startswith("/") else None


_ONE_LINE = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r"})


def one_line(text: str) -> str:
    """`text` as one output line, for a script reading answers (stdin not a terminal): backslashes doubled, line
    feeds and carriage returns written as \\n and \\r, so the k-th line out answers the k-th prompt."""
    return text.translate(_ONE_LINE)


def _end(out: TextIO, interactive: bool, streamed: list[str], note: str) -> None:
    """An answer that stopped: `note` on a line of its own (piped: in place of the answer, on its line)."""
    if interactive:
        out.write(("\n" if any(streamed) else "") + f"{note}\n")
    else:
        out.write(f"{one_line(note)}\n")
    out.flush()


def _line_editing() -> bool:
    """Load GNU readline (or libedit), so that `input()` at a terminal edits the line: arrow keys, Home/End, a
    character erased whole, Up for earlier questions, as `llamafactory-cli chat` (which imports it) and Python's
    own prompt. False where the platform has none."""
    try:
        import readline  # noqa: F401
    except ImportError:
        return False
    return True


def read_line(stdin: TextIO, out: TextIO, interactive: bool, editing: bool) -> str | None:
    """The next line of input, None at its end. At a terminal with `editing`, through `input()` (readline's line
    editing); else as bytes, decoded in stdin's encoding. ValueError when the line is not text in that encoding, so
    that one bad line is an error in its place, not the end of the chat."""
    encoding = getattr(stdin, "encoding", None) or "utf-8"
    try:
        if editing:
            try:
                line = input("\nUser: ")
            except EOFError:
                return None
        else:
            if interactive:
                out.write("\nUser: ")
                out.flush()
            raw = getattr(stdin, "buffer", None)
            line = raw.readline().decode(encoding) if raw is not None else stdin.readline()
            if not line:
                return None
        line.encode("utf-8")  # lone surrogates: bytes a surrogateescape stream could not decode
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise ValueError(f"is not {encoding} text; set the terminal or the file to UTF-8") from None
    return line


def fit_history(engine: Any, system: str | None, history: list[dict[str, Any]], max_new: int) -> tuple[list[int], int]:
    """(prompt ids, how many of the oldest messages to drop) so that the system prompt, the newest turns and
    `max_new` answer tokens fit the context (whole user/assistant pairs go; the new question always stays).
    EngineError when the question alone (with the system prompt) leaves no room for an answer."""
    head = [{"role": "system", "content": system}] if system else []
    drop = 0
    while True:
        prompt = engine.encode_chat(head + history[drop:])
        if len(prompt) + max_new <= engine.n_ctx or drop + 1 >= len(history):
            break
        drop += 2 if history[drop]["role"] == "user" and drop + 2 < len(history) else 1
    if len(prompt) >= engine.n_ctx:
        raise EngineError(f"the question alone is {len(prompt)} tokens with the chat template; the context holds "
                          f"{engine.n_ctx} (--ctx)")  # fmt: skip
    return prompt, drop


def chat(opts: ChatOptions) -> None:
    """Run the chat until `exit` or end of input."""
    from exporter.engine import load

    interactive = opts.stdin.isatty()
    editing = interactive and opts.stdin is sys.stdin and opts.stdout is sys.stdout and _line_editing()
    out = opts.stdout
    with load(opts.load) as engine:
        engine.chat_format.require()
        history: list[dict[str, Any]] = []
        said = False  # the note that old turns are dropped, once
        if interactive:
            out.write(f"{WELCOME}\n")
        number = 0  # of the input line
        while True:
            number += 1
            try:
                line = read_line(opts.stdin, out, interactive, editing)
            except KeyboardInterrupt:
                line = None
            except ValueError as e:  # not text: said in its answer's place, and the chat goes on (as LF's)
                _end(out, interactive, [], f"[error: input line {number} {e}]")
                continue
            if line is None:
                if interactive:  # Ctrl-D / Ctrl-C: the shell's prompt on a line of its own
                    out.write("\n")
                    out.flush()
                break
            query = line.rstrip("\n").strip()
            what = command(query)
            if what == "exit":
                break
            if what == "clear":
                history = []
                if interactive:
                    out.write("History has been removed.\n")
                continue
            if what == "help":  # on stderr when piped: stdout holds one line per question
                (out if interactive else sys.stderr).write(HELP)
                continue
            if interactive and re.fullmatch(r"/[A-Za-z?]+", query.split(maxsplit=1)[0] if query else ""):
                out.write(f"Unknown command '{query.split()[0]}'. Type /? for help\n")  # as `ollama run` says
                continue
            if not query:
                continue
            history.append({"role": "user", "content": query})
            if interactive:
                out.write("Assistant: ")
            answer = []
            try:
                prompt, dropped = fit_history(engine, opts.system, history, opts.sampling.max_new_tokens)
                if dropped and not said:
                    said = True
                    print(f"note: the conversation outgrew the context ({engine.n_ctx} tokens): the oldest turns are "
                          "dropped to fit each new question and its answer (`clear` empties the history)",
                          file=sys.stderr)  # fmt: skip
                del history[:dropped]
                for d in engine.stream(prompt, opts.sampling):
                    answer.append(d.text)
                    if interactive:  # streamed; piped, the answer is written whole, on its line
                        out.write(d.text)
                        out.flush()
            except EngineError as e:  # e.g. NaN logits: this answer stops, the chat goes on
                history.pop()
                _end(out, interactive, answer, f"[error: {e}]")
                continue
            except KeyboardInterrupt:  # Ctrl-C stops this answer (its slot is freed), not the chat
                history.pop()
                _end(out, interactive, answer, "[interrupted]")
                continue
            text = "".join(answer)
            out.write("\n" if interactive else f"{one_line(text)}\n")
            out.flush()
            history.append({"role": "assistant", "content": text})
