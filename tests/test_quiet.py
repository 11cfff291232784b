"""Normal runs print no third-party banners, load failures or deprecation warnings; `--verbose` shows them.

The CLI on a fixture, as the demo runs it: train a LoRA adapter, then verify it against its base (PEFT wraps the
layers, transformers loads the models: the paths where transformers and peft probe torchao and GPT-QModel).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# what the demo printed before exporter/quiet.py, and what any third-party library's warning looks like
NOISE = re.compile(
    r"Failed to load|GPT-?QModel|gptqmodel|torchao|_pytree|FutureWarning|DeprecationWarning|UserWarning|"
    r"Loading weights|llama_context|deprecated|(?-i:[A-Z][a-z]*Warning)|(?-i:\[WARNING\]|\bINFO\b|^WARN )|"
    r"real_accelerator|Tokenicer|GIL is enabled",
    re.IGNORECASE,
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    base = tiny_model("qwen2")
    out = tmp_path_factory.mktemp("quiet") / "adapter"
    r = _cli("train", "--model_name_or_path", str(base), "--dataset", "identity", "--dataset_dir",
             str(ROOT / "data" / "demo"), "--template", "qwen", "--output_dir", str(out), "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--cutoff_len", "64", "--max_samples", "4",
             "--identity_name", "Exa", "--identity_author", "Acme")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return base, out, r


def test_train_and_verify_print_no_third_party_noise(trained, tmp_path: Path) -> None:
    base, adapter, train = trained
    report = tmp_path / "report.json"
    verify = _cli("verify", "--base", str(base), "--adapter", str(adapter), "--template", "qwen", "--prompts", "0",
                  "--ctx", "32", "--max-windows", "1", "--report", str(report))  # fmt: skip
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]
    assert ("perplexity", "adapter") in {(c["check"], c["target"]) for c in json.loads(report.read_text())["checks"]}
    for r in (train, verify):
        noise = [line for line in (r.stdout + r.stderr).splitlines() if NOISE.search(line)]
        assert not noise, noise


def test_moe_lora_training_prints_no_third_party_noise(tiny_model, tmp_path: Path) -> None:
    """LoRA on every linear layer and the experts of an MoE model: PEFT adds a rank pattern for the fused gate_up_proj
    experts and then warns that it matched no module (it matched their parameter: rank 2r there)."""
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    r = _cli("train", "--model_name_or_path", str(tiny_model("qwen3_moe")), "--dataset", "identity", "--dataset_dir",
             str(ROOT / "data" / "demo"), "--lora_target", "all", "--output_dir", str(out), "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--cutoff_len", "64", "--max_samples", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    noise = [line for line in (r.stdout + r.stderr).splitlines() if NOISE.search(line)]
    assert not noise, noise
    config = json.loads((out / "adapter_config.json").read_text())
    rank = config["rank_pattern"][r".*\.gate_up_proj"]
    assert rank == 2 * config["r"]  # what the warning called ignored is applied: gate_up_proj's LoRA has rank 2r
    experts = json.loads((tiny_model("qwen3_moe") / "config.json").read_text())["num_local_experts"]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape[0] == rank * experts


def test_verbose_shows_what_is_hidden(tiny_model, tmp_path: Path) -> None:
    base = tiny_model("qwen2")
    r = _cli("--verbose", "train", "--model_name_or_path", str(base), "--dataset", "identity", "--dataset_dir",
             str(ROOT / "data" / "demo"), "--template", "qwen", "--output_dir", str(tmp_path / "a"), "--max_steps",
             "1", "--per_device_train_batch_size", "2", "--cutoff_len", "64", "--max_samples", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is_gradient_checkpointing" in r.stderr and "Loading weights" in r.stderr  # peft's FutureWarning, HF's bar


def _noise(*runs: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for r in runs for line in (r.stdout + r.stderr).splitlines() if NOISE.search(line)]


def test_full_training_prints_no_deepspeed_warning(tiny_model, tmp_path: Path) -> None:
    """A full fine-tune saves through transformers, whose accelerate unwrapping imports DeepSpeed when installed; its
    import set up a logger that warned "Setting accelerator to CPU". A run without a `deepspeed` config never imports
    it."""
    r = _cli("train", "--model_name_or_path", str(tiny_model("qwen2")), "--dataset", "identity", "--dataset_dir",
             str(ROOT / "data" / "demo"), "--finetuning_type", "full", "--output_dir", str(tmp_path / "full"),
             "--max_steps", "1", "--per_device_train_batch_size", "2", "--cutoff_len", "64",
             "--max_samples", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert not _noise(r), _noise(r)


def test_quantize_and_its_verify_print_no_gptqmodel_noise(tiny_model, tmp_path: Path) -> None:
    """GPT-QModel logs a banner and INFO tables as it is imported (its LogBar logger set to INFO then) and draws a bar
    per module and batch: `exporter quantize` shows its own bar over the layers instead, and verify --quantized (whose
    load imports GPT-QModel through transformers) prints nothing of it."""
    pytest.importorskip("gptqmodel")
    base = tiny_model("qwen2")
    out = tmp_path / "gptq"
    q = _cli("quantize", str(base), "--method", "gptq", "--out", str(out), "--dataset-dir", str(ROOT / "data" / "demo"),
             "--dataset", "identity", "--samples", "4", "--max-length", "32")  # fmt: skip
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert re.search(rf"gptq layers .* {layers}/{layers}", q.stderr), q.stderr  # every layer counted, once
    printed = q.stdout + q.stderr
    assert not re.search(r"Quantizing|Forward|Loading checkpoint|Model loading", printed), printed
    # a random tiny model (ppl ~3.6e9 on 15 tokens): its gptq4 perplexity moved 11.3 % on an AVX2-only EPYC, KL 2e-8
    v = _cli("verify", "--merged", str(base), "--quantized", str(out), "--prompts", "0", "--ctx", "32",
             "--max-windows", "1", "--ppl-threshold", "gptq4=0.5")  # fmt: skip
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
    assert not _noise(q, v), _noise(q, v)


# loads a GGUF again and again, libllama logging each load through the sink `silence_llama_cpp` installs, until a
# Ctrl-C ends it (exit 130) or 8 s have gone by (exit 0)
_LOAD_LOOP = """
import sys, time
import llama_cpp
from exporter import quiet
quiet._verbose = sys.argv[2] == "verbose"
quiet.silence_llama_cpp()
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
print("loading", flush=True)
start = time.monotonic()
try:
    while time.monotonic() - start < 8:
        llama_cpp.llama_model_free(llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params))
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_ctrl_c_during_a_gguf_load_stops_the_run(tiny_gguf: Path, mode: str) -> None:
    """Ctrl-C while libllama loads a GGUF (verify, chat, serve, predict, eval) is raised once the load returns; a
    Python log callback had it printed as "Exception ignored on calling ctypes callback function" and dropped."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", _LOAD_LOOP, str(tiny_gguf), mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, errors="replace", env=env)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == "loading\n", p.communicate()[1][-2000:]
    time.sleep(0.5)
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert time.monotonic() - sent < 5
    assert "Exception ignored" not in err and "Traceback" not in err, err[-2000:]
