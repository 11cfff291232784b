"""exporter webui in a real headless browser (Debian's Chromium through selenium): train a tiny model to the end and
see the loss plot, chat with it and see the answer PEFT gives, export and see the verify table pass, predict with
the trained adapter and see the scores table, switch to Chinese; every request the page makes stays on
127.0.0.1. Screenshots are kept under the pytest tmp dir (the path is printed); with EXPORTER_WEBUI_SCREENSHOTS=DIR
they are also written, shrunk, into DIR (how docs/webui-*.png are made)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from webui_helpers import QUESTIONS, chromium, peft_greedy, requested_urls, serve, write_data

pytestmark = pytest.mark.slow


def _find(driver: Any, css: str) -> Any:
    return driver.find_element("css selector", css)


def _wait(driver: Any, what: str, check: Any, timeout: float) -> Any:
    """Poll `check(driver)` until it returns something truthy; fail naming `what` with the page's status texts."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = check(driver)
        except Exception:  # the element is being re-rendered
            got = None
        if got:
            return got
        time.sleep(0.5)
    ids = ("train_status", "train_output", "chat_status", "export_progress", "export_log")
    texts = {i: _text(driver, f"#{i}") for i in ids}
    shot = _full_page(driver, Path(tempfile.mkdtemp(prefix="webui-timeout-")) / "page.png")
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; page says {texts}; screenshot {shot}")


def _text(driver: Any, css: str) -> str:
    try:
        return _find(driver, css).text
    except Exception:
        return ""


def _value(driver: Any, elem_id: str) -> str:
    return _find(driver, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value") or ""


def _type(driver: Any, elem_id: str, value: str) -> None:
    box = _wait(driver, f"#{elem_id}", lambda d: _find(d, f"#{elem_id} textarea, #{elem_id} input"), 20)
    box.clear()
    box.send_keys(value)


def _choose(driver: Any, elem_id: str, option: str) -> None:
    """Pick `option` in a Gradio dropdown (single or multiselect); while Gradio refreshes its choices (after the
    data dir changed) a pending spinner covers it, so the click is retried until it lands."""

    def click(d: Any) -> bool:
        _find(d, f"#{elem_id} input").click()
        return True

    _wait(driver, f"#{elem_id} to take a click", click, 20)
    _wait(driver, f"option {option!r} of #{elem_id}",
          lambda d: next((li for li in d.find_elements("css selector", "li[role=option]")
                          if li.get_attribute("aria-label") == option), None), 20).click()  # fmt: skip


def _tab(driver: Any, name: str) -> None:
    _wait(
        driver,
        f"tab {name!r}",
        lambda d: next(
            (b for b in d.find_elements("css selector", "button[role=tab]") if b.text.strip() == name), None
        ),
        20,
    ).click()


def _blue_pixels(element: Any) -> int:
    """How many pixels of the element are blue (the loss curves, exporter.loss_plot.PLOT_COLORS["loss"], and their
    legend; the rest of the figure is black, grey and white)."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((b - r > 80) & (b > g)).sum())


def _full_page(driver: Any, path: Path) -> Path:
    """The whole page as PNG (the window grown to the document's height, then back)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1366, min(max(height, 800), 4000))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    driver.save_screenshot(str(path))
    driver.set_window_size(1366, 1000)
    return path


def _screenshot(driver: Any, folder: Path, name: str) -> Path:
    """The whole page (the window grown to the document's height) as PNG; also shrunk into
    $EXPORTER_WEBUI_SCREENSHOTS when set."""
    path = _full_page(driver, folder / f"webui-{name}.png")
    docs = os.environ.get("EXPORTER_WEBUI_SCREENSHOTS")
    if docs:
        from PIL import Image

        img = Image.open(path).convert("RGB")
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
        img.quantize(colors=64).save(Path(docs) / path.name, optimize=True)
    return path


def test_train_export_and_language_in_a_browser(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = tiny_model("llama3")
    work = tmp_path_factory.mktemp("webui-browser")
    shots = tmp_path_factory.mktemp("webui-screenshots")
    print(f"\nscreenshots: {shots}")
    data_dir = write_data(work / "data")
    out = work / "lora"
    with serve(work / "runs") as url, chromium() as d:
        d.get(url)
        _wait(d, "the board", lambda d: _text(d, "#train_start") == "Start", 60)
        # ---- Train: model, data, a few settings; preview the data and the command; run it to the end
        _type(d, "model", str(model))
        _find(d, "#dataset_dir textarea").click()  # leaving the model box sets the default output dir
        _wait(d, "the default output dir", lambda d: f"saves/{model.name}/lora/" in _value(d, "output_dir"), 30)
        _type(d, "dataset_dir", str(data_dir))
        _choose(d, "dataset", "identity")
        _type(d, "learning_rate", "1e-3")
        _type(d, "num_train_epochs", "2")
        _type(d, "gradient_accumulation_steps", "1")
        _find(d, "#extra_tab").click()
        _type(d, "logging_steps", "1")
        _type(d, "output_dir", str(out))
        assert _value(d, "output_dir") == str(out)
        _find(d, "#data_preview_btn").click()
        marks = _wait(d, "the data preview", lambda d: d.find_elements("css selector", "#data_preview mark"), 120)
        assert marks[0].text == "I am Exa, an assistant made by Acme.<|eot_id|>"
        _find(d, "#train_preview").click()
        _wait(d, "the YAML preview", lambda d: "logging_steps: 1" in _text(d, "#train_yaml"), 60)
        _find(d, "#train_start").click()
        _wait(d, "training to finish", lambda d: "Finished" in _text(d, "#train_status"), 600)
        assert "step 8/8" in _text(d, "#train_progress")
        assert (out / "adapter_model.safetensors").is_file()
        _wait(d, "the loss curves drawn", lambda d: _blue_pixels(_find(d, "#loss_plot")) > 250, 30)
        train_png = _screenshot(d, shots, "train")
        # ---- Chat: the model + the adapter just trained, greedy: the chat box shows the answer PEFT gives
        _type(d, "adapter", str(out))
        _tab(d, "Chat")
        _find(d, "#chat_load").click()
        _wait(d, "the model loaded", lambda d: "Loaded" in _text(d, "#chat_status"), 300)
        _type(d, "temperature", "0")
        _type(d, "max_new_tokens", "16")
        _type(d, "chat_query", QUESTIONS[0])
        _find(d, "#chat_send").click()
        want = " ".join(peft_greedy(model, out, [{"role": "user", "content": QUESTIONS[0]}], 16).split())
        _wait(d, f"the answer {want!r}", lambda d: " ".join(_text(d, "#chatbot .bot-row").split()) == want, 120)
        assert " ".join(_text(d, "#chatbot .user-row").split()) == QUESTIONS[0]
        chat_png = _screenshot(d, shots, "chat")
        # ---- Export: merge -> gguf -> verify, the verify table and the Ollama commands
        _tab(d, "Export")
        tabs = [b.text for b in d.find_elements("css selector", "button[role=tab]")]
        assert tabs == ["Train", "Evaluate & Predict", "Chat", "Export"]
        _type(d, "export_out", str(work / "export"))
        _type(d, "ollama_name", "exa")
        _find(d, "#export_run").click()
        _wait(d, "verify to finish", lambda d: "Verify: PASS" in _text(d, "#verify_summary"), 900)
        checks = json.loads((work / "export" / "report.json").read_text())["checks"]
        grid = _find(d, "#verify_table [role=grid]")
        assert int(grid.get_attribute("aria-rowcount")) == len(checks) + 1 and len(checks) >= 10
        assert "pass" in grid.text and "fail" not in grid.text
        assert "ollama create exa:f16 -f Modelfile.f16" in _text(d, "#ollama_commands")
        export_png = _screenshot(d, shots, "export")
        # ---- Evaluate & Predict: predict 2 samples with the model + adapter, the scores table
        _tab(d, "Evaluate & Predict")
        _choose(d, "eval_dataset", "identity")
        _type(d, "eval_max_samples", "2")
        _type(d, "eval_max_new_tokens", "8")
        _type(d, "eval_output_dir", str(work / "predict"))
        _find(d, "#eval_predict").click()
        _wait(d, "predict to finish", lambda d: "Finished" in _text(d, "#eval_status"), 300)
        scores = json.loads((work / "predict" / "predict_results.json").read_text())
        assert f"{scores['predict_bleu-4']}" in _find(d, "#eval_table [role=grid]").text
        eval_png = _screenshot(d, shots, "eval")
        # ---- Chinese labels
        _choose(d, "lang", "中文")
        _wait(d, "Chinese labels", lambda d: _text(d, "#eval_predict") == "开始预测", 30)
        _tab(d, "训练")
        zh_png = _screenshot(d, shots, "train-zh")
        urls = requested_urls(d)
    local = url.rstrip("/")
    outside = {u for u in urls if not u.startswith((local, local.replace("http", "ws"), "data:", "blob:", "chrome"))}
    assert not outside, f"the page requested outside the board: {sorted(outside)}"
    for png in (train_png, eval_png, chat_png, export_png, zh_png):
        assert png.stat().st_size > 10_000
