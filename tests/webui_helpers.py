"""Shared by the webui tests: the board served on a free 127.0.0.1 port, the form values its API takes, a small
dataset, and headless Chromium (Debian's chromium + chromium-driver) driven by selenium."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.webui import WebUIOptions, export_tab, launch, train_tab

ANSWER = "I am Exa, an assistant made by Acme."
QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "hi", "hello",
             "What are you?", "Tell me about yourself."]  # fmt: skip


def write_data(d: Path) -> Path:
    """A dataset_info.json with one alpaca dataset `identity` (8 rows, one answer)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": q, "input": "", "output": ANSWER} for q in QUESTIONS]
    (d / "identity.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}), encoding="utf-8")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(runs_dir: Path, lang: str = "en") -> Iterator[str]:
    """The board on 127.0.0.1:<free port>; yields its URL."""
    port = free_port()
    demo = launch(WebUIOptions(port=port, runs_dir=str(runs_dir), lang=lang), block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def train_form(data_dir: Path, out: Path, **over: Any) -> dict[str, Any]:
    """Train tab values: LLaMA-Factory's board defaults, sized for a tiny model on CPU."""
    d = train_tab.LF_DEFAULTS
    form = {
        "stage": "sft", "method": "lora", "dataset_dir": str(data_dir), "dataset": ["identity"],
        "learning_rate": "1e-3", "num_train_epochs": "1.0", "max_grad_norm": d["max_grad_norm"],
        "max_samples": d["max_samples"], "compute_type": "fp32", "cutoff_len": 256, "batch_size": 2,
        "gradient_accumulation_steps": 1, "val_size": 0.0, "lr_scheduler_type": d["lr_scheduler_type"],
        "logging_steps": 1, "save_steps": d["save_steps"], "warmup_steps": 0, "max_steps": -1, "optim": d["optim"],
        "seed": 42, "packing": False, "train_on_prompt": False, "identity_name": "", "identity_author": "",
        "lora_rank": d["lora_rank"], "lora_alpha": d["lora_alpha"], "lora_dropout": d["lora_dropout"],
        "loraplus_lr_ratio": d["loraplus_lr_ratio"], "lora_target": "", "use_rslora": False, "use_dora": False,
        "output_dir": str(out), "overwrite_output_dir": False, "extra_args": "{}",
    }  # fmt: skip
    form.update(over)
    return form


def train_inputs(model: Path, form: dict[str, Any], adapter: str = "", template: str = "auto") -> list[Any]:
    """The train_* endpoints' inputs: lang, model, adapter, template, then the form in train_tab.FORM order."""
    return ["en", str(model), adapter, template, *(form[k] for k in train_tab.FORM)]


def export_form(out: Path, **over: Any) -> dict[str, Any]:
    form = {"export_out": str(out), "merge_dtype": "auto", "quant_method": "none", "quant_bits": "4",
            "quant_dataset": "", "gguf_types": ["f16"], "ollama_name": "exa", "verify": True,
            "verify_prompts": 1}  # fmt: skip
    form.update(over)
    return form


def export_inputs(model: Path, adapter: Path | str, data_dir: Path, form: dict[str, Any]) -> list[Any]:
    """The export_run endpoint's inputs: lang, model, adapter, template, dataset dir, then export_tab.FORM."""
    return ["en", str(model), str(adapter), "auto", str(data_dir), *(form[k] for k in export_tab.FORM)]


def chat_sampling(max_new_tokens: int = 24) -> list[Any]:
    """The Chat tab's sampling inputs (chat_tab.SAMPLING order): greedy."""
    return [max_new_tokens, 0.0, 1.0, 0, 1.0]


def peft_greedy(base: Path, adapter: Path | None, conversation: list[dict[str, str]], max_new_tokens: int) -> str:
    """The reference answer: transformers' greedy `generate` (fp32) of the base with the PEFT adapter attached,
    stopping at the model's end ids and the template's end-of-turn token, special tokens left out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    eos = model.generation_config.eos_token_id
    stops = sorted({*([eos] if isinstance(eos, int) else eos or []), tok.convert_tokens_to_ids("<|eot_id|>")})
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    g = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                       pad_token_id=stops[0])  # fmt: skip
    return tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


# ------------------------------------------------------------------ the browser


CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1366,1000", "--lang=en-US")  # fmt: skip


def require_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths; a missing browser skips locally and fails in CI."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.environ.get("EXPORTER_REQUIRE_REFERENCES") == "1":
        pytest.fail("chromium and chromium-driver are required here (scripts/setup.sh installs them)")
    pytest.skip("chromium / chromium-driver not installed (apt-get install chromium chromium-driver)")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium with a fresh profile and network logging, driven by selenium through chromium-driver (no
    Selenium Manager: both binaries are given, nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = require_chromium()
    os.environ.setdefault("SE_AVOID_STATS", "true")
    os.environ.setdefault("SE_OFFLINE", "true")
    profile = tempfile.mkdtemp(prefix="exporter-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def requested_urls(driver: Any) -> set[str]:
    """Every URL the page requested since the last call (Chrome's performance log)."""
    urls = set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.add(msg["params"].get("request", {}).get("url") or msg["params"].get("url", ""))
    return urls


def predict_form(out: Path, **over: Any) -> dict[str, Any]:
    """Evaluate & Predict tab values for predict (eval_tab.PREDICT_FORM): 3 samples, greedy, short answers."""
    form = {"dataset": ["identity"], "max_samples": "3", "cutoff_len": 256, "batch_size": 2, "max_new_tokens": 8,
            "do_sample": False, "temperature": 0.95, "top_p": 0.7, "output_dir": str(out)}  # fmt: skip
    form.update(over)
    return form


def bench_form(task_dir: Path, save: Path, **over: Any) -> dict[str, Any]:
    """Evaluate & Predict tab values for eval (eval_tab.EVAL_FORM): LF's fewshot template, 2 questions a subject."""
    form = {"task": "mmlu_test", "task_dir": str(task_dir), "eval_template": "fewshot", "n_shot": 1, "lang": "en",
            "eval_batch_size": 2, "max_questions": 2, "save_dir": str(save)}  # fmt: skip
    form.update(over)
    return form


def eval_inputs(model: Path, data_dir: Path, form: dict[str, Any], keys: tuple[str, ...], path: str = "") -> list:
    """The eval_predict / eval_bench inputs: lang, model, adapter, template, dataset dir, path, then the form."""
    return ["en", str(model), "", "auto", str(data_dir), path, *(form[k] for k in keys)]
