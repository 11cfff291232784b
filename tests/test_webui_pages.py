"""The board used from several pages, reloaded, and with bad values in its number boxes:

- Start (Train, Export) in a second page while a run goes says at once that a run is in progress (it used to wait
  unseen in Gradio's queue for the run's end, then start a second run nobody asked for any more), and a page loaded
  while a training runs gets that run's form back (it showed the defaults: Resume there failed or went elsewhere);
- an export goes on when its page is closed or reloaded mid-chain, and a page loaded later follows it to its verify
  table (the chain used to stop after the stage that was running, unrecorded, so running it again failed with
  "merged already exists");
- a cleared number box or a non-number is one line naming the field (it was Gradio's bare "Error" and a traceback
  in the board's log), and a value the train command refuses names the field too.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import random_lora, require_llama_cpp

pytest.importorskip("gradio")
pytestmark = pytest.mark.usefixtures("one_thread")

from webui_helpers import (  # noqa: E402
    eval_inputs,
    export_form,
    export_inputs,
    predict_form,
    serve,
    train_form,
    train_inputs,
    write_data,
)

from exporter.webui import WebUIOptions, build, eval_tab, train_tab  # noqa: E402

BUSY = "A run is already in progress; stop it first."


def _fn(demo, name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == name)


def _wait_for(what: str, check, timeout: float, job=None) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}" + (f": {job.outputs()[-1:]}" if job else "")
        time.sleep(0.2)


def test_bad_numbers_are_one_line_naming_the_field(tmp_path: Path) -> None:
    demo, _ = build(WebUIOptions(runs_dir=str(tmp_path / "runs")))
    preview = _fn(demo, "train_preview")
    data = write_data(tmp_path / "data")
    form = train_form(data, tmp_path / "o", seed=None)  # the Seed box cleared
    _, _, status = preview(*train_inputs(tmp_path, form))
    assert status == "**Failed**: `error: Seed: expected an integer, got nothing`", status
    _, _, status = preview(*train_inputs(tmp_path, train_form(data, tmp_path / "o", learning_rate="-1")))
    assert status == "**Failed**: `error: Learning rate: expected a positive number, got -1.0`", status
    (*_, last) = _fn(demo, "train_start")(*train_inputs(tmp_path, train_form(data, tmp_path / "o", seed=None)))
    assert last[0] == "**Failed**: `error: Seed: expected an integer, got nothing`", last
    html = _fn(demo, "data_preview")(*train_inputs(tmp_path, form))
    assert html == "<p><code>error: Seed: expected an integer, got nothing</code></p>", html
    inputs = eval_inputs(tmp_path, data, predict_form(tmp_path / "p", max_samples="abc"), eval_tab.PREDICT_FORM)
    (*_, last) = _fn(demo, "eval_predict")(*inputs)
    assert last[1] == "error: Max samples per dataset: expected an integer, got 'abc'", last
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p").exists() and not (tmp_path / "o").exists()
    demo.close()


@pytest.mark.slow
def test_second_page_gets_the_runs_form_and_start_says_busy(tiny_model, tmp_path: Path) -> None:
    from gradio_client import Client

    model, data = tiny_model("llama3"), write_data(tmp_path / "data")
    runs, first, second = tmp_path / "runs", tmp_path / "first", tmp_path / "second"
    with serve(runs) as url:
        page1, page2 = Client(url, verbose=False), Client(url, verbose=False)
        long_run = train_form(data, first, max_steps=2000, logging_steps=1)
        job = page1.submit(*train_inputs(model, long_run), api_name="/train_start")
        _wait_for("the first run's steps", lambda: (first / "trainer_log.jsonl").is_file(), 240, job)
        # a page loaded now (or reloaded) gets the running run's form back, as LLaMA-Factory's board does: Stop then
        # Resume there continue this run, not a default output dir
        monitor = page2.submit("en", api_name="/train_monitor")
        _wait_for("the monitor's first update", lambda: bool(monitor.outputs()), 60)
        restored = monitor.outputs()[0][4:]
        monitor.cancel()
        sent = train_inputs(model, long_run)[1:]
        keys = ("model", "adapter", "template", *train_tab.FORM)
        got, want = dict(zip(keys, restored, strict=True)), dict(zip(keys, sent, strict=True))
        for key in ("model", "dataset_dir", "dataset", "learning_rate", "max_steps", "logging_steps", "output_dir"):
            assert got[key] == want[key], key
        again = page2.submit(*train_inputs(model, train_form(data, second, max_steps=2)), api_name="/train_start")
        try:
            status = again.result(timeout=30)[0]  # was: queued behind the first run, no word shown
        finally:
            assert page2.predict("en", api_name="/train_stop") == "Stopped"
        assert status == f"**{BUSY}**"
        assert job.result(timeout=60)[0].startswith("**Stopped**")
        time.sleep(3)  # a queued Start would start its run now
        assert not second.exists() and len(list(runs.glob("train-*.yaml"))) == 1
        # the same for Export: a second page's Export while one runs
        base = tiny_model("qwen2")
        adapter = random_lora(base, tmp_path / "lora", r=4, target_modules=["q_proj"])
        form = export_form(tmp_path / "export", gguf_types=[], verify=False)
        export = page1.submit(*export_inputs(base, adapter, data, form), api_name="/export_run")
        _wait_for("merge to start", lambda: bool(export.outputs()) and "running" in export.outputs()[-1][0], 120)
        busy = page2.submit(*export_inputs(base, adapter, data, export_form(tmp_path / "e2")), api_name="/export_run")
        progress = busy.result(timeout=30)[0]
        assert progress == f"<p>{BUSY}</p>" and not (tmp_path / "e2").exists()
        assert re.findall(r'data-stage="(\w+)" data-status="(\w+)"', export.result(timeout=300)[0]) == [
            ("merge", "pass")]  # fmt: skip


@pytest.mark.slow
def test_export_goes_on_when_its_page_goes(tiny_model, tmp_path: Path) -> None:
    from gradio_client import Client

    require_llama_cpp()
    base = tiny_model("qwen2")
    adapter = random_lora(base, tmp_path / "lora", r=4, target_modules=["q_proj"])
    out, data = tmp_path / "export", write_data(tmp_path / "data")
    form = export_form(out, gguf_types=["f16"], ollama_name="exa", verify=False)
    with serve(tmp_path / "runs") as url:
        page = Client(url, verbose=False)
        job = page.submit(*export_inputs(base, adapter, data, form), api_name="/export_run")
        _wait_for("merge to run", lambda: bool(job.outputs()) and 'data-status="running"' in job.outputs()[-1][0], 120)
        job.cancel()  # the page closed or reloaded: Gradio ends its event
        gguf = out / "gguf" / "Modelfile.f16"
        _wait_for("the gguf stage after the page went", gguf.is_file, 180)  # was: the chain stopped after merge
        progress, log, _, _, modelfiles, commands = Client(url, verbose=False).predict("en", api_name="/export_monitor")
        stages = re.findall(r'data-stage="(\w+)" data-status="(\w+)"', progress)
        assert stages == [("merge", "pass"), ("gguf", "pass")], log
        assert commands.splitlines()[-1] == "ollama create exa:f16 -f Modelfile.f16" and "PARAMETER stop" in modelfiles
        # run again: every stage was recorded as finished, so it is skipped (was: "merged already exists")
        progress, *_ = page.predict(*export_inputs(base, adapter, data, form), api_name="/export_run")
        stages = re.findall(r'data-stage="(\w+)" data-status="(\w+)"', progress)
        assert stages == [("merge", "skipped"), ("gguf", "skipped")], progress


def test_a_page_loaded_later_shows_the_predict_run(tmp_path: Path) -> None:
    """Evaluate & Predict: a page (re)loaded while a predict/eval command runs, or after it ended, follows it (it
    showed nothing: the scores or the error of a run started before the reload were lost)."""
    demo, board = build(WebUIOptions(runs_dir=str(tmp_path / "runs")))
    inputs = eval_inputs(tmp_path / "no-model", write_data(tmp_path / "data"), predict_form(tmp_path / "p"),
                         eval_tab.PREDICT_FORM)  # fmt: skip
    started = _fn(demo, "eval_predict")(*inputs)
    next(started)  # the command runs; this page goes away
    started.close()
    status, log, _ = list(_fn(demo, "eval_monitor")("en"))[-1]
    assert 'data-status="failed"' in status and f"--output_dir {tmp_path / 'p'}" in status, status
    assert log.splitlines()[-1].startswith("error: ") and "no-model" in log.splitlines()[-1], log
    demo.close()


def test_predict_sampling_fields_take_input_only_when_they_act() -> None:
    """Predict is greedy unless do_sample: its temperature and top-p sliders did nothing yet took input (LLaMA-Factory's
    board samples with them always); now they are greyed out until do_sample is ticked."""
    demo, _ = build(WebUIOptions())
    comps = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    assert comps["eval_temperature"].interactive is False and comps["eval_top_p"].interactive is False
    toggle = next(f for f in demo.fns.values() if [o.elem_id for o in f.outputs] == ["eval_temperature", "eval_top_p"])
    assert [i.elem_id for i in toggle.inputs] == ["eval_do_sample"]
    assert [u["interactive"] for u in toggle.fn(True)] == [True, True]
    assert [u["interactive"] for u in toggle.fn(False)] == [False, False]
    demo.close()
