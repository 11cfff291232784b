"""`load(LoadOptions) -> Engine`: the backend chosen from the path, the chat template and stops from the model."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.config import read_json, read_text
from exporter.engine.api import BACKENDS, DTYPES, Completion, Delta, EngineError, LoadOptions, Sampling
from exporter.engine.chat_format import ChatFormat
from exporter.engine.sampling import check_sampling
from exporter.engine.scheduler import Handle, Scheduler, Sink
from exporter.errors import UserError
from exporter.hf_dir import check_loadable, check_readable, tokenizer_dir


class Engine:
    """A loaded model: the chat template to render prompts, the stop ids, and generation through one scheduler.

    Thread-safe: `submit`/`stream`/`generate` may be called from any thread; the model runs on one worker thread
    that batches every live request (continuous batching). `logits`/`next_logits` score outside that batch."""

    def __init__(self, backend: Any, kind: str, name: str, fmt: ChatFormat, eos_ids: set[int], opts: LoadOptions):
        self.backend, self.kind, self.name, self.chat_format, self.options = backend, kind, name, fmt, opts
        self.eos_ids = frozenset(eos_ids)
        self.stop_ids = frozenset(eos_ids | _end_of_turn_ids(fmt, backend))
        self.vocab_size: int = backend.vocab_size
        self.n_ctx: int = backend.n_ctx
        self._lock = threading.RLock()
        self._sched = Scheduler(backend, self.stop_ids, opts.max_seqs, opts.max_waiting, self._lock)

    # ---- text

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt=True
    ) -> str:
        """The prompt text of a conversation through the model's chat template."""
        return self.chat_format.render(messages, tools, add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens parsed, nothing added (chat templates write their own BOS).
        EngineError when `text` is no valid Unicode (a lone surrogate: JSON's "\\ud800", or a byte that stdin could
        not decode), which no tokenizer takes."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EngineError(f"the text is not valid Unicode: it holds {text[e.start]!r} ({e.reason})") from None
        return self.backend.tokenize(text)

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt=True
    ) -> list[int]:
        """Prompt token ids of a conversation (render, then tokenize)."""
        return self.tokenize(self.render(messages, tools, add_generation_prompt))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a raw prompt (not a chat) as llama.cpp and the HF tokenizer encode one: the BOS the model
        asks to add first, special tokens parsed (POST /v1/completions, as llama-cpp-python's server)."""
        return self.backend.bos_prefix() + self.tokenize(text)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special)

    def text_offsets(self, ids: Sequence[int]) -> list[int]:
        """The length of the text of the tokens before each of `ids` (`decode(ids[:k], skip_special=False)`):
        /v1/completions' text_offset. A backend that can (gguf) counts it reading each token once."""
        fast = getattr(self.backend, "text_offsets", None)
        if fast is not None:
            return fast(list(ids))
        return [len(self.decode(ids[:k], skip_special=False)) for k in range(len(ids))]

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character: decode() gives U+FFFD)."""
        return self.backend.token_bytes(token)

    def check_grammar(self, gbnf: str) -> None:
        """EngineError when this engine cannot constrain an answer to `gbnf` (a GBNF grammar, `Sampling.grammar`):
        its backend has no grammar engine, or llama.cpp cannot parse the grammar."""
        make = getattr(self.backend, "grammar", None)
        if make is None:
            raise EngineError(f"the {self.kind} backend cannot constrain an answer (no grammar engine); serve the "
                              "model's GGUF (exporter gguf), whose backend decodes with llama.cpp's grammar "
                              "sampler")  # fmt: skip
        make(gbnf, frozenset()).close()

    # ---- generation

    def submit(self, prompt: Sequence[int], sampling: Sampling, sink: Sink, bounded: bool = True) -> Handle:
        """Queue one request; its `Delta`s (or an exception) go to `sink` from the worker thread, the last Delta
        with a finish_reason. `sink` must not block. Raises QueueFull when `bounded` and the queue is full."""
        check_sampling(sampling)
        if any(t < 0 or t >= self.vocab_size for t in prompt):
            raise EngineError(f"prompt token ids must be in [0, {self.vocab_size})")
        return self._sched.submit(prompt, sampling, sink, bounded)

    def stream(self, prompt: Sequence[int], sampling: Sampling = Sampling()) -> Iterator[Delta]:
        """Deltas of one answer as they come; closing the iterator early cancels the request."""
        q: queue.SimpleQueue[Delta | BaseException] = queue.SimpleQueue()
        handle = self.submit(prompt, sampling, q.put, bounded=False)
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            handle.cancel()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        progress: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Answers for many prompts, batched (up to `max_seqs` at a time; continuous batching). `progress(i, c)` is
        called as each finishes, from the caller's thread. A failed prompt raises its EngineError (`.index` = i)."""
        samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(samplings) != len(prompts):
            raise EngineError(f"{len(prompts)} prompts but {len(samplings)} sampling settings")
        for s in samplings:
            check_sampling(s)
        q: queue.SimpleQueue[tuple[int, Delta | BaseException]] = queue.SimpleQueue()
        parts: list[list[Delta]] = [[] for _ in prompts]
        handles = [
            self.submit(p, s, lambda d, i=i: q.put((i, d)), bounded=False)
            for i, (p, s) in enumerate(zip(prompts, samplings, strict=True))
        ]
        out: list[Completion | None] = [None] * len(prompts)
        try:
            for _ in range(len(prompts)):
                while True:
                    i, d = q.get()
                    if isinstance(d, EngineError):
                        d.index = i
                    if isinstance(d, BaseException):
                        raise d
                    parts[i].append(d)
                    if d.finish_reason is not None:
                        break
                out[i] = collect(parts[i], len(prompts[i]))
                if progress is not None:
                    progress(i, out[i])
        finally:
            for h in handles:
                h.cancel()
        return [c for c in out if c is not None]

    def chat(
        self, messages: list[dict[str, Any]], sampling: Sampling = Sampling(), tools: list[dict[str, Any]] | None = None
    ) -> Completion:
        """One answer to a conversation."""
        return self.generate([self.encode_chat(messages, tools)], sampling)[0]

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return self._sched.load()

    @property
    def error(self) -> str | None:
        """Why the engine serves no request (closed, or its worker died on an error); None while it serves."""
        return self._sched.error

    # ---- scoring

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), vocab] float32 logits at every position of one sequence (perplexity)."""
        with self._sched.borrow_slot() as slot, self._lock:
            return self.backend.logits(list(ids), slot)

    def next_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """[len(prompts), vocab] float32 logits after the last token of each prompt (multiple choice: compare the
        choice letters' columns). HF runs them as one left-padded batch."""
        if not prompts or any(not p for p in prompts):
            raise EngineError("next_logits needs non-empty prompts")
        with self._sched.borrow_slot() as slot, self._lock:
            return self.backend.next_logits([list(p) for p in prompts], slot)

    def close(self) -> None:
        self._sched.close()
        if hasattr(self.backend, "close"):
            with self._lock:
                self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(deltas: Sequence[Delta], prompt_tokens: int) -> Completion:
    """The Completion that a request's Deltas add up to."""
    lps = [lp for d in deltas for lp in (d.logprobs or [])]
    return Completion(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        finish_reason=deltas[-1].finish_reason or "stop",
        prompt_tokens=prompt_tokens,
        logprobs=lps if any(d.logprobs for d in deltas) else None,
        prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
    )


def _end_of_turn_ids(fmt: ChatFormat, backend: Any) -> set[int]:
    """The special token the template writes right after an answer (e.g. <|im_end|>): the model learned to emit it,
    so generation stops there even where generation_config or the GGUF's EOG list lacks it."""
    tail = fmt.end_of_turn()
    ids = backend.tokenize(tail) if tail else []
    return {ids[0]} if ids and ids[0] in backend.special_ids() else set()


# ---------------------------------------------------------------------------------------------------- loading


def choose_backend(opts: LoadOptions) -> str:
    """hf for a dir, gguf for a .gguf file, or `opts.backend`; UserError naming what was expected."""
    if opts.backend is not None:
        if opts.backend not in BACKENDS:
            raise UserError(f"--backend {opts.backend!r}: expected one of {', '.join(BACKENDS)}")
        return opts.backend
    p = Path(opts.model).expanduser()
    if p.suffix.lower() == ".gguf" and not p.is_dir():  # a missing one is "GGUF file ... not found", not a hub id
        return "gguf"
    if p.is_file():
        raise UserError(f"{p}: expected an HF model dir, a PEFT adapter dir or a .gguf file")
    return "hf"


def _model_and_adapter(opts: LoadOptions) -> tuple[Path, Path | None]:
    """(model dir, PEFT adapter dir): an adapter dir given as the model brings its base (adapter_config.json)."""
    from exporter import hub

    model = hub.resolve(opts.model, "model")
    adapter = hub.resolve(opts.adapter, "adapter") if opts.adapter else None
    if adapter is None and (model / "adapter_config.json").is_file() and not (model / "config.json").is_file():
        adapter = model
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"adapter {adapter}: no adapter_config.json (expected a PEFT LoRA dir)")
        if model == adapter:
            base = read_json(adapter / "adapter_config.json")
            if not base.get("base_model_name_or_path"):
                raise UserError(f"{adapter}/adapter_config.json has no base_model_name_or_path; pass the base model")
            model = hub.resolve(base["base_model_name_or_path"], "base model of the adapter")
    if not (model / "config.json").is_file():
        raise UserError(f"model {model}: no config.json (expected an HF model dir)")
    for d in (model, adapter) if adapter is not None else (model,):
        check_readable(d)
    # architecture and pickles: one line, no dir code; the tokenizer is checked as the backend loads it, first
    check_loadable(model, tokenizer_dir(model, adapter), tokenizer=False)
    if adapter is not None and adapter != model:
        from exporter.adapter import check_base

        if note := check_base(adapter, model, str(adapter)):  # refuses an adapter of another base; notes weaker signs
            print(note, file=sys.stderr)
    return model, adapter


def _check_template_file(template: str | None) -> None:
    """A template given as a .jinja file must compile as transformers compiles it: a syntax error is one line naming
    the file and line before the weights load, not an `[error: ...]` for every answer."""
    path = Path(template).expanduser() if template else None
    if path is None or not path.is_file():
        return
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(read_text(path))
    except TemplateSyntaxError as e:
        raise UserError(f"{path}: not a valid Jinja chat template: line {e.lineno}: {e.message}") from None


def _template_override(name: str, own: str | None, special: dict[str, str]) -> str:
    """A LLaMA-Factory name (the Jinja LF leaves in the tokenizer: the model's own unless the LF template replaces
    it), a family name or a .jinja file -> Jinja."""
    p = Path(name).expanduser()
    if p.is_file():
        return read_text(p)
    from exporter import lf_names, lf_templates, templates

    bos, eos = special.get("bos_token"), special.get("eos_token")
    if lf_names.is_lf_name(name):
        if own and not lf_templates.load(name).replace_jinja_template:
            return own
        return lf_names.for_texts(name, bos, eos).jinja
    return templates.load_template(name).for_tokenizer(bos, eos).jinja


def _chat_format(own: str | None, override: str | None, special: dict[str, str], where: str) -> ChatFormat:
    """The model's own template, or the override; none at all is allowed (prompts as token ids still work)."""
    if override:
        return ChatFormat(_template_override(override, own, special), special, where)
    return ChatFormat(own or "", special, where)


def _load_hf(opts: LoadOptions) -> Engine:
    from exporter.engine import hf

    model_dir, adapter = _model_and_adapter(opts)
    model, tok, device = hf.load_model(model_dir, adapter, opts)
    eos = hf.eos_ids(model_dir, tok) | (hf.eos_ids(adapter, tok) if adapter else set())
    return _hf_engine(model, tok, device, eos, (adapter or model_dir).resolve().name, opts, str(adapter or model_dir))


def _hf_engine(model: Any, tok: Any, device: str, eos: set[int], name: str, opts: LoadOptions, where: str) -> Engine:
    from exporter.engine import hf

    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    fmt = _chat_format(template, opts.template, special, where)
    return Engine(hf.HFBackend(model, tok, device, opts.ctx), "hf", name, fmt, eos, opts)


def from_hf_model(model: Any, tokenizer: Any, opts: LoadOptions | None = None) -> Engine:
    """An Engine on a transformers model (or PeftModel) already in memory, e.g. one that is also scored.
    `opts.model` only names it; stops come from the tokenizer and the model's generation_config."""
    opts = opts or LoadOptions(getattr(model, "name_or_path", "") or "model")
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids = {int(x) for x in ([eos] if isinstance(eos, int) else eos or [])}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    device = str(next(model.parameters()).device)
    return _hf_engine(model, tokenizer, device, ids, Path(opts.model).name, opts, opts.model)


def _load_gguf(opts: LoadOptions) -> Engine:
    from exporter.engine import gguf

    path = Path(opts.model).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found")
    lora = Path(opts.adapter).expanduser() if opts.adapter else None
    if lora is not None and not lora.is_file():
        raise UserError(f"--adapter {lora}: the gguf backend takes a GGUF LoRA file (exporter gguf --adapter)")
    backend = gguf.GGUFBackend(path, lora, opts)
    try:
        special = backend.special_tokens()
        fmt = _chat_format(backend.chat_template(), opts.template, special, str(path))
        return Engine(backend, "gguf", path.stem, fmt, backend.eog_ids(), opts)
    except BaseException:
        backend.close()
        raise


# the load options a backend may not use: field -> (flag, the backends that honour it)
_APPLIES = {"dtype": ("--dtype", ("hf", "vllm")), "device": ("--device", ("hf",)),
            "threads": ("--threads", ("hf", "gguf"))}  # fmt: skip
_ON = {"gguf": "on a GGUF model (llama.cpp runs it on the CPU, with the tensor types the file stores)",
       "vllm": "on the vllm backend (vLLM places the model itself)"}  # fmt: skip


def check_options(opts: LoadOptions, kind: str) -> list[str]:
    """UserError (one line) for a value no backend takes; the notes to print for options the chosen backend does
    not use (as the inference YAML's keys with no effect are noted)."""
    if opts.dtype not in DTYPES:
        raise UserError(f"--dtype {opts.dtype!r}: expected one of {', '.join(DTYPES)}")
    if opts.ctx is not None and opts.ctx < 0:
        raise UserError(f"--ctx {opts.ctx}: expected a number of tokens (0: the model's training context)")
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"--threads {opts.threads}: expected a positive number of CPU threads")
    notes = []
    for key, (flag, backends) in _APPLIES.items():
        value = getattr(opts, key)
        if value not in (None, "auto") and kind not in backends:
            notes.append(f"note: {flag} {value} has no effect {_ON[kind]}")
    return notes


def load(opts: LoadOptions) -> Engine:
    """Load `opts.model` on the backend its path calls for (or `opts.backend`)."""
    if opts.max_seqs < 1:
        raise UserError(f"max_seqs must be >= 1, got {opts.max_seqs}")
    if opts.max_waiting < 0:
        raise UserError(f"max_waiting must be >= 0 (0: no queue, a request runs only when a slot is free), "
                        f"got {opts.max_waiting}")  # fmt: skip
    _check_template_file(opts.template)
    kind = choose_backend(opts)
    for note in check_options(opts, kind):
        print(note, file=sys.stderr)
    if kind == "gguf":
        return _load_gguf(opts)
    if kind == "vllm":
        from exporter.engine import vllm

        return vllm.load(opts)
    return _load_hf(opts)
