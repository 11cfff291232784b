"""Normal runs print no third-party banners or warnings; `exporter --verbose` shows everything.

The known noise and where it comes from:
- transformers probes torchao at `import transformers.modeling_utils` and peft probes GPT-QModel whenever it wraps a
  layer, importing them when installed (the [quant] extra installs both). torchao's import logs "Failed to load
  .../_C_mxfp8...so" for its CUDA kernels and registers enums with torch's pytree, which logs a deprecation warning
  per enum; GPT-QModel's import logs a banner; peft imports bitsandbytes, which logs that optional CPU kernels are
  missing. Commands that neither quantize nor load a quantized model mark these libraries absent
  (`without_libraries`), so nothing imports them.
- accelerate imports DeepSpeed, when installed, to unwrap a model transformers saves (a full or freeze training run's
  `save_pretrained`), and DeepSpeed's import sets up its own logger, which warns "Setting accelerator to CPU" on a
  CPU: runs without a `deepspeed` config mark it absent too.
- Where they are needed (quantize, verify --quantized), their loggers are turned down to errors instead.
- peft calls transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on every LoRA training run);
  transformers draws a "Loading weights" bar for every model it loads; llama.cpp logs context warnings to stderr;
  gguf-py's SpecialVocab warns about post-processor templates it cannot map to its flags; DeepSpeed on CPU prints
  that it built its shared-memory op at every start (`prints_dropped`).
- torchrun (`exporter train` under FORCE_TORCHRUN) prints a banner when it sets OpenMP threads (we set them), logs
  each failed rank and the SIGTERM to the others, and raises a report with a traceback; each rank has already said
  why in one line (`launcher`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

# imported by transformers' and peft's availability probes whenever installed; needed only to quantize or to load
# a quantized model
QUANT_LIBRARIES = ("gptqmodel", "torchao", "bitsandbytes")
# every library a command may mark absent (`without_libraries`): the quantization ones, and DeepSpeed where a run has
# no `deepspeed` config
OPTIONAL_LIBRARIES = (*QUANT_LIBRARIES, "deepspeed")
# loggers of known noise: torchao's kernel loading, torch's pytree deprecations, GPT-QModel (LogBar) and its tokenizer
# fixer (Tokenicer), bitsandbytes' optional kernels, gguf-py's SpecialVocab reading a tokenizer's post-processor
# (exporter writes add_bos/add_eos from what the HF tokenizer does instead, converters/gguf_vocab.py), DeepSpeed's
# accelerator and engine notes (train)
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "logbar", "gptqmodel", "tokenicer", "bitsandbytes", "gguf.vocab",
                 "DeepSpeed")  # fmt: skip
# (category, message regex) of known third-party warnings
KNOWN_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"MatMul8bitLt: inputs will be cast"),  # bitsandbytes' 8-bit QLoRA computing in fp32 on CPU
    # DeepSpeed's ZeRO calls torch.distributed collectives torch 2.13 deprecates (on every step)
    (FutureWarning, r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # PEFT 0.21 checks rank_pattern/alpha_pattern keys against the modules it targeted only, so the pattern it adds
    # itself for fused MoE experts (gate_up_proj at twice the rank, which it does apply to that expert parameter) is
    # reported as ignored on every MoE LoRA run
    (
        RuntimeWarning,
        r"The following (rank|alpha)_pattern keys did not match any targeted module and were ignored: "
        r"\['\.\*\\\\\.gate_up_proj'\]",
    ),
    # Gradio 6.31's queue (exporter webui) on pandas 3: its dataframe handling uses options pandas 4 drops
    (Warning, r"'future.no_silent_downcasting' is deprecated"),
    (Warning, r"The copy keyword is deprecated and will be removed"),
)

# (logger, message regex) of known third-party log lines: a GPT-QModel quantized model has no `loss_type`, and
# transformers says so as it falls back to the causal-LM loss the model would have had anyway
KNOWN_LOGS = (("transformers.modeling_utils", r"`loss_type=None` was set in the config but it is unrecognized"),)

# torchrun's launcher (`exporter train` under FORCE_TORCHRUN): it logs each failed rank and the SIGTERM to the others,
# each of which has said why in one line
LAUNCHER_LOGGERS = "torch.distributed.elastic"

_llama_log_callback = None
_verbose = False


def verbose() -> bool:
    """Whether this run was asked for everything (`--verbose`)."""
    return _verbose


def launcher() -> None:
    """Turn torchrun's launcher loggers down (they are set up, at WARNING, as their modules are imported)."""
    if _verbose:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(LAUNCHER_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def without_libraries(names: tuple[str, ...]) -> None:
    """Mark `names` absent in this process: `importlib.util.find_spec` then says None (so the probes of transformers,
    peft and accelerate skip them) and importing them raises ImportError. A library already imported stays."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def quiet(verbose: bool = False, transformers: bool = True) -> None:
    """Keep the known third-party noise out of normal output; `verbose` leaves everything as the libraries set it.
    `transformers`: the command uses it (its per-model "Loading weights" bar goes; our own bars stay)."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    loggers_down()
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message in KNOWN_LOGS:
        pattern = re.compile(message)
        logging.getLogger(name).addFilter(lambda record, p=pattern: not p.search(record.getMessage()))
    if transformers:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def loggers_down() -> None:
    """Turn the known noisy loggers down to errors (again after importing a library that sets its logger's level as it
    is imported, as GPT-QModel's LogBar does: INFO). No-op with --verbose."""
    if _verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def library_quiet() -> Iterator[None]:
    """Around a call that may import a library which logs a banner and sets its logger up as it is imported (loading a
    GPT-QModel quantized dir imports GPT-QModel): its prints go nowhere and the known loggers are turned down again
    after. --verbose keeps everything."""
    with prints_dropped():
        yield
    loggers_down()


@contextlib.contextmanager
def prints_dropped() -> Iterator[None]:
    """Around a third-party call that print()s a banner (DeepSpeed on CPU: "... shm_comm_op built successfully"):
    its stdout goes nowhere; its loggers and exceptions are untouched. --verbose keeps the prints."""
    if _verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def silence_llama_cpp() -> None:
    """Route libllama's log lines (context sizes, per-tensor quantization notes) to nowhere; our progress bars and
    reports say what matters. With --verbose, to llama.cpp's own logger (stderr). No-op without llama-cpp-python.

    The sink runs no Python code (a builtin, or no callback at all): Python runs a signal's handler only when Python
    code runs, and a Ctrl-C handled inside a ctypes callback has its KeyboardInterrupt printed ("Exception ignored on
    calling ctypes callback function") and dropped, so a GGUF load went on as if no Ctrl-C had come. This way the
    Ctrl-C is raised once the libllama call returns, as for any native call. llama-cpp-python's own logger (what it
    installs at import) is such a Python callback, and it fails on log lines that end inside a UTF-8 character."""
    global _llama_log_callback
    if _llama_log_callback is not None:
        return
    try:
        import llama_cpp
    except ImportError:
        return
    # `slice` takes the callback's three arguments (level, text, user data) and does nothing with them
    _llama_log_callback = llama_cpp.llama_log_callback() if _verbose else llama_cpp.llama_log_callback(slice)
    llama_cpp.llama_log_set(_llama_log_callback, None)


def _python_sink(level: int, text: bytes, user_data: object) -> None:
    """A libllama log line through Python code (`llama_log_in_python`): dropped, or written to stderr (--verbose)."""
    if _verbose:
        os.write(2, text)


_llama_python_callback = None


@contextlib.contextmanager
def llama_log_in_python() -> Iterator[None]:
    """Around a libllama call during which Python signal handlers that record a signal and return must run (each log
    line runs one: `gguf._signals_held`, which holds Ctrl-C through a K-quant and ends the run at a second one): its
    log lines go through a Python function for the call, then to `silence_llama_cpp`'s sink again."""
    global _llama_python_callback
    silence_llama_cpp()
    if _llama_log_callback is None:  # no llama-cpp-python
        yield
        return
    import llama_cpp

    if _llama_python_callback is None:
        _llama_python_callback = llama_cpp.llama_log_callback(_python_sink)
    llama_cpp.llama_log_set(_llama_python_callback, None)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_llama_log_callback, None)
