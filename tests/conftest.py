"""Shared test fixtures: tiny models of every family (built once per cache dir) and reference-availability helpers.

    def test_x(tiny_model, tmp_path):
        src = tiny_model("qwen2")                  # Path of a cached HF dir; never mutate it
        work = shutil.copytree(src, tmp_path / "m")  # copy first when a test writes into the model dir

`tiny_model(family, real_vocab=False)` builds with `scripts/make_tiny_model.py` into
`$EXPORTER_FIXTURES/<hash>/` (default `~/.cache/exporter/fixtures/<hash>/`), where the hash covers the script,
the corpus, the template families and the transformers/tokenizers versions; a file lock makes parallel sessions
safe and the build is renamed into place only when complete.
`llama_src()`, `require_go()`, `require_llama_cpp()`, `lf_python()` skip a test when a reference is missing locally
and fail it when `EXPORTER_REQUIRE_REFERENCES=1` (CI).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

# Child Pythons (`python -m exporter`, `python -c`, helper scripts) run from the repo root; without this they would
# import the source tree's `exporter/` ahead of the installed package, whose `exporter.families` and
# `exporter.converters` exist only once installed (they live in the top-level `templates/` and `converters/`).
os.environ["PYTHONSAFEPATH"] = "1"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _optional_libraries_unmarked() -> Iterator[None]:
    """A command run in this process (`cli.main()`) marks the libraries it does not need absent (exporter/quiet.py);
    after each test they are importable again, as in a new process, so a later test's `find_spec` still finds them."""
    from exporter import quiet

    before = {n for n in quiet.OPTIONAL_LIBRARIES if n not in sys.modules}
    yield
    for name in before:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


DENSE = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
MORE = ("qwen3_moe", "mixtral", "gemma2", "mistral_nemo", "glm4", "granite", "olmo2", "smollm3")
FAMILIES = DENSE + MORE
# exporter template family of each fixture family (granite and olmo2 have no family of their own yet: the
# plain base-model format; smollm3 speaks ChatML with thinking tags)
TEMPLATE_OF = {
    "llama2": "llama-2",
    "llama3": "llama-3.1",
    "mistral": "mistral-nemo",
    "qwen2": "qwen-2.5",
    "qwen3": "qwen-3",
    "gemma3": "gemma-3",
    "phi3": "phi-3",
    "qwen3_moe": "qwen-3",
    "mixtral": "mistral-nemo",
    "gemma2": "gemma-3",
    "mistral_nemo": "mistral-nemo",
    "glm4": "glm-4",
    "granite": "human-assistant",
    "olmo2": "human-assistant",
    "smollm3": "qwen-3",
}


def detected_template(family: str) -> str:
    """What template detection names a fixture's own: its family, or "derived" where it carries its model's published
    Jinja (no family renders every probe like it)."""
    return "derived" if load_maker().SPECS[family].real_template else TEMPLATE_OF[family]


def _missing(what: str) -> None:
    if os.environ.get("EXPORTER_REQUIRE_REFERENCES") == "1":
        pytest.fail(f"{what} is required here (EXPORTER_REQUIRE_REFERENCES=1) but missing")
    pytest.skip(f"{what} not available")


def llama_src() -> Path:
    """The llama-cpp-python sdist (llama.cpp converter, vocabularies, templates) from $EXPORTER_LLAMA_SRC."""
    value = os.environ.get("EXPORTER_LLAMA_SRC")
    if value and (Path(value) / "vendor" / "llama.cpp" / "models").is_dir():
        return Path(value)
    _missing(f"llama.cpp reference sdist (EXPORTER_LLAMA_SRC={value!r})")
    raise AssertionError("unreachable")


def require_go() -> str:
    """Path of the `go` binary (real Go text/template renders Ollama templates)."""
    go = shutil.which("go")
    if go:
        return go
    _missing("the Go toolchain (`go` on PATH)")
    raise AssertionError("unreachable")


def require_llama_cpp() -> ModuleType:
    """The `llama_cpp` module (llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        _missing("llama-cpp-python (`import llama_cpp`)")
        raise AssertionError("unreachable") from None
    return llama_cpp


def lf_python() -> str:
    """The Python of the LLaMA-Factory reference venv ($EXPORTER_LF_PYTHON, built by scripts/setup_lf.sh)."""
    value = os.environ.get("EXPORTER_LF_PYTHON")
    if value and Path(value).is_file():
        return value
    _missing(f"the LLaMA-Factory reference venv (EXPORTER_LF_PYTHON={value!r}; bash scripts/setup_lf.sh)")
    raise AssertionError("unreachable")


def require_quant() -> None:
    """The [quant] extra (gptqmodel, optimum, bitsandbytes): skip without it, fail when EXPORTER_REQUIRE_QUANT=1."""
    missing = [m for m in ("gptqmodel", "optimum", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    msg = f"the [quant] extra is not installed (missing {', '.join(missing)}; pip install 'exporter[quant]')"
    if os.environ.get("EXPORTER_REQUIRE_QUANT") == "1":
        pytest.fail(f"{msg}, but EXPORTER_REQUIRE_QUANT=1")
    pytest.skip(msg)


def load_maker() -> ModuleType:
    """`scripts/make_tiny_model.py` as a module (scripts/ is not a package)."""
    if "make_tiny_model" in sys.modules:
        return sys.modules["make_tiny_model"]
    path = ROOT / "scripts" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_tiny_model"] = module  # dataclasses need the module registered while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["make_tiny_model"]
        raise
    return module


@functools.cache
def fixtures_root() -> Path:
    """Cache directory of this version of the fixtures."""
    import sentencepiece
    import tokenizers
    import torch
    import transformers

    maker = load_maker()
    versions = [m.__version__ for m in (transformers, tokenizers, sentencepiece, torch)]
    h = hashlib.sha256("|".join([maker.source_hash(), *versions]).encode())
    base = Path(os.environ.get("EXPORTER_FIXTURES") or Path.home() / ".cache" / "exporter" / "fixtures")
    return base / h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_fixture(family: str, real_vocab: bool = False) -> Path:
    """Build (once per cache dir) and return the fixture dir of `family`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if real_vocab or load_maker().SPECS[family].real_template:  # real vocabularies and published templates
        os.environ["EXPORTER_LLAMA_SRC"] = str(llama_src())
    root = fixtures_root()
    out = root / (f"{family}-real" if real_vocab else family)
    if (out / "config.json").is_file():
        return out
    with _locked(root / f".{out.name}.lock"):
        if not (out / "config.json").is_file():  # another session may have built it while we waited
            load_maker().make(family, out, real_vocab=real_vocab, force=True)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Path]:
    """Factory: `tiny_model("qwen2")` / `tiny_model("llama3", real_vocab=True)` -> cached HF model dir (read-only)."""
    return build_fixture


@pytest.fixture(scope="session")
def tiny(tiny_model) -> Path:
    """The qwen2 fixture, the default model of the training tests."""
    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    """The qwen2 fixture as an f16 GGUF (with its Modelfile), built once per session; tests only read it."""
    require_llama_cpp()
    from exporter import gguf, templates

    hf = tiny_model("qwen2")
    return gguf.export(hf, ["f16"], templates.resolve(hf, None), tmp_path_factory.mktemp("gguf")).files["f16"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread (and do not fight other processes for cores); a module asks for it
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# the fields of LLaMA-Factory's closing trainer_log.jsonl line (steps, epoch, time; no loss, lr or metric)
_CLOSING = {"current_steps", "total_steps", "epoch", "percentage", "elapsed_time", "remaining_time", "throughput",
            "total_tokens"}  # fmt: skip


def trainer_log(out: Path) -> list[dict]:
    """The step and evaluation records of `out`'s trainer_log.jsonl: a finished run's closing line (LLaMA-Factory
    writes it when HF's Trainer logs its summary) left out."""
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if not set(r) <= _CLOSING]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server under test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int, timeout: float = 10) -> dict:
    """`GET /health` of an `exporter serve` on `port`, as JSON."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset_dir with one 8-row alpaca dataset `d` (a module may define its own `rows`)."""
    d = tmp_path_factory.mktemp("rows")
    data = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(8)]
    (d / "d.json").write_text(json.dumps(data))
    (d / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    return d


def train_config(model: Path, data: Path, out: Path, **kw: object) -> object:
    """A 2-step LoRA TrainConfig on dataset `d` of `data` (`rows`), `kw` over it."""
    from exporter import lf_args

    base = dict(model_name_or_path=str(model), output_dir=str(out), dataset=["d"], dataset_dir=str(data),
                template="qwen-2.5", per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2,
                logging_steps=1)  # fmt: skip
    return lf_args.TrainConfig(**(base | kw))


def random_lora(base: Path, out: Path, dtype: object = None, **config: object) -> Path:
    """A PEFT LoRA adapter on `base` (LoraConfig(**config)) with random non-zero B (seed 0), saved by PEFT into
    `out`; `dtype` loads the base in that torch dtype."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, **kw), LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def pipeline_yaml(tmp: Path, base: Path, run_dir: Path, template: str | None = "qwen-2.5", **stages: dict) -> Path:
    """`tmp/p.yaml`: the shortest pipeline run on the demo identity set (1 step, f16, a small verify); `stages`
    update the stage sections key by key; `template=None` leaves the model's own."""
    import yaml

    cfg: dict = {
        "base": str(base),
        "run_dir": str(run_dir),
        "template": template,
        "train": {
            "dataset": "identity",
            "dataset_dir": str(ROOT / "data" / "demo"),
            "identity_name": "Exa",
            "identity_author": "Acme",
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "save_steps": 1000,
            "cutoff_len": 64,
            "max_samples": 4,
        },
        "gguf": {"types": ["f16"]},
        "verify": {"prompts": 1, "max_new_tokens": 2, "ctx": 32, "max_windows": 1},
    }
    if template is None:
        del cfg["template"]
    for k, v in stages.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tool_models(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """qwen2 base + a LoRA trained to answer `engine_models.QA` and call a tool, its merge, f16 GGUF (chat, serve)."""
    require_llama_cpp()
    from engine_models import build_tool_models

    return build_tool_models(tiny_model("qwen2"), tmp_path_factory.mktemp("tool-models"))
