"""exporter webui through its API (gradio_client), as a browser would use it: data preview, command preview, train to
the end with the loss log, a crash's one-line error, stop and resume, export to a verified GGUF; the options each
stage gets equal what its CLI flags give; labels in both languages; bound to 127.0.0.1, nothing phones home."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import trainer_log
from eval_fixture import write_task
from PIL import Image
from typer.testing import CliRunner
from webui_helpers import (
    ANSWER,
    QUESTIONS,
    bench_form,
    chat_sampling,
    eval_inputs,
    export_form,
    export_inputs,
    peft_greedy,
    predict_form,
    serve,
    train_form,
    train_inputs,
    write_data,
)

from exporter import cli, config, evaluate, lf_args, predict
from exporter.loss_plot import smooth
from exporter.webui import WebUIOptions, build, eval_tab, export_tab, locales, train_tab


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("llama3")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("webui-data"))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from gradio_client import Client

    with serve(tmp_path_factory.mktemp("webui-runs")) as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def trained(client, model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    """A LoRA trained to the end through /train_start (8 rows, batch 2, 1 epoch: 4 steps)."""
    out = tmp_path_factory.mktemp("webui-train") / "lora"
    result = client.predict(*train_inputs(model, train_form(data_dir, out)), api_name="/train_start")
    return out, result


# ------------------------------------------------------------------ Train


def test_data_preview_marks_the_answers(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    html = client.predict(*train_inputs(model, train_form(data_dir, tmp_path / "o")), api_name="/data_preview")
    rows = re.findall(r'<div class="exp-row">(.*?)</pre></div>', html, re.S)
    assert len(rows) == train_tab.PREVIEW_ROWS
    for question, row in zip(QUESTIONS, rows, strict=False):
        marked = re.findall(r'<mark class="exp-trained">(.*?)</mark>', row, re.S)
        # the answer and Llama 3's end-of-turn token are trained; the question (and the header) are not
        assert marked == [f"{ANSWER}&lt;|eot_id|&gt;"]
        assert question in re.sub(r"<mark.*?</mark>", "", row, flags=re.S)


def test_command_preview_is_what_the_cli_parses(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    form = train_form(data_dir, tmp_path / "o", learning_rate="5e-5", val_size=0.1, identity_name="2024")
    commands, text, status = client.predict(*train_inputs(model, form), api_name="/train_preview")
    assert status == ""
    keys = yaml.safe_load(text)
    (tmp_path / "t.yaml").write_text(text, encoding="utf-8")
    cfg, _ = lf_args.config_from_args([str(tmp_path / "t.yaml")])
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.lr_scheduler_type) == (5e-5, 2, "cosine")
    assert (cfg.val_size, cfg.eval_strategy, cfg.eval_steps, cfg.identity_name) == (0.1, "steps", 100, "2024")
    flags = shlex.split(commands.splitlines()[-1])
    assert flags[:2] == ["exporter", "train"]
    parsed, _ = lf_args.parse_args(flags[2:])
    assert parsed == keys  # the flags line and the YAML are the same run, value for value


def test_train_to_the_end(trained, model: Path) -> None:
    out, (status, progress, plot, output) = trained
    assert status.startswith("**Finished**"), (status, output)
    assert (out / "adapter_model.safetensors").is_file()
    log = trainer_log(out)
    assert [r["current_steps"] for r in log] == [1, 2, 3, 4]
    assert "step 4/4" in progress and 'value="4" max="4"' in progress
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")
    image = Image.open(io.BytesIO(base64.b64decode(plot["plot"].split(",", 1)[1])))
    assert image.width >= 320 and image.height >= 240 and len(image.getcolors(image.width * image.height)) > 16
    # the figure drawn is the trainer log and LLaMA-Factory's smoothed curve of it
    fig = train_tab.loss_plot(log, out)
    lines = {ln.get_label(): ln.get_xydata().tolist() for ln in fig.axes[0].get_lines()}
    assert lines["loss original"] == [[r["current_steps"], r["loss"]] for r in log]
    assert [y for _, y in lines["loss smoothed"]] == pytest.approx(smooth([r["loss"] for r in log]))
    assert set(lines) == {"loss original", "loss smoothed"}  # no eval loss logged
    config = re.search(r"Config saved to `([^`]+)`", status).group(1)
    assert yaml.safe_load(Path(config).read_text())["model_name_or_path"] == str(model)


def test_a_crash_shows_its_one_line_error(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    form = train_form(data_dir, tmp_path / "o", dataset=["identiy"])
    status, _, _, output = client.predict(*train_inputs(model, form), api_name="/train_start")
    assert status.startswith("**Failed**"), status
    assert "error: dataset 'identiy' is not defined in" in status and "did you mean 'identity'?" in status
    assert "Traceback" not in output
    # a value the CLI's parser refuses never starts a process
    form = train_form(data_dir, tmp_path / "o2", learning_rate="fast")
    status, *_ = client.predict(*train_inputs(model, form), api_name="/train_start")
    assert "error: Learning rate: expected a number, got 'fast'" in status and "/tmp" not in status
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_stop_then_resume(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    form = train_form(data_dir, out, max_steps=8, save_steps=2)
    job = client.submit(*train_inputs(model, form), api_name="/train_start")
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").is_file():
        assert time.time() < deadline and not job.done(), job.outputs()
        time.sleep(0.2)
    assert client.predict("en", api_name="/train_stop") == "Stopped"
    status = job.result()[0]
    assert status.startswith("**Stopped**") and "checkpoint-" in status, status
    assert not (out / "adapter_model.safetensors").exists()
    status, progress, _, _ = client.predict(*train_inputs(model, form), api_name="/train_resume")
    assert status.startswith("**Finished**"), status
    log = trainer_log(out)
    assert [r["current_steps"] for r in log] == list(range(1, 9))  # the log continues where the checkpoint was
    assert "step 8/8" in progress


# ------------------------------------------------------------------ Chat


def test_chat_streams_the_adapters_answer(client, trained, model: Path) -> None:
    adapter, _ = trained
    client.predict(api_name="/chat_clear")
    status = client.predict("en", str(model), str(adapter), "auto", "", "auto", "auto", api_name="/chat_load")
    assert status.startswith("**Loaded**") and str(adapter) in status and "hf" in status, status
    system, q1, q2 = "You are Exa.", QUESTIONS[0], QUESTIONS[1]
    job = client.submit("en", q1, system, *chat_sampling(16), api_name="/chat_submit")
    box, query, _ = job.result()
    conv = [{"role": "system", "content": system}, {"role": "user", "content": q1}]
    a1 = peft_greedy(model, adapter, conv, 16)
    assert a1 and query == ""
    assert [(m["role"], m["content"][0]["text"]) for m in box] == [("user", q1), ("assistant", a1.strip())]
    partials = [out[0][-1]["content"] for out in job.outputs()]
    texts = [p[0]["text"] if p else "" for p in partials]
    assert len(set(texts)) >= 3 and all(a1.strip().startswith(t) for t in texts)  # streamed, growing to the answer
    # the second turn sees the first (the history the page holds is the exact text)
    box, _, _ = client.predict("en", q2, system, *chat_sampling(16), api_name="/chat_submit")
    a2 = peft_greedy(model, adapter, [*conv, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}], 16)
    assert box[-1]["content"][0]["text"] == a2.strip() and len(box) == 4
    assert client.predict(api_name="/chat_clear") == []
    box, _, _ = client.predict("en", q2, "", *chat_sampling(16), api_name="/chat_submit")
    assert box[-1]["content"][0]["text"] == peft_greedy(model, adapter, [{"role": "user", "content": q2}], 16).strip()
    assert client.predict("en", api_name="/chat_unload") == "No model loaded."


def test_chat_errors_are_one_line(client, model: Path, tmp_path: Path) -> None:
    client.predict("en", api_name="/chat_unload")
    box, query, status = client.predict("en", "hi", "", *chat_sampling(), api_name="/chat_submit")
    assert status == "No model loaded." and query == "hi"
    status = client.predict("en", str(model), "", "auto", str(tmp_path / "nope.gguf"), "auto", "auto",
                            api_name="/chat_load")  # fmt: skip
    assert status.startswith(f"**Failed**: `error: GGUF file {tmp_path / 'nope.gguf'} not found"), status
    status = client.predict("en", "", "", "auto", "", "auto", "auto", api_name="/chat_load")
    assert "error: set the model path" in status


@pytest.mark.slow
def test_chat_stop_keeps_the_answer_so_far(client, model: Path) -> None:
    question = "Count to ten thousand."
    full = peft_greedy(model, None, [{"role": "user", "content": question}], 400)  # 56 tokens, then end of turn
    client.predict(api_name="/chat_clear")
    client.predict("en", str(model), "", "auto", "", "auto", "auto", api_name="/chat_load")
    job = client.submit("en", question, "", *chat_sampling(400), api_name="/chat_submit")
    deadline = time.time() + 120
    while len([o for o in job.outputs() if o[0][-1]["content"][0]["text"]]) < 2:  # two pieces of the answer shown
        assert time.time() < deadline and not job.done(), job.outputs()
        time.sleep(0.05)
    job.cancel()  # what the Stop button does: cancel the running event
    box, _, _ = client.predict("en", "and then?", "", *chat_sampling(1), api_name="/chat_submit")
    kept = box[1]["content"][0]["text"]
    assert [m["role"] for m in box] == ["user", "assistant", "user", "assistant"]
    assert kept and full.strip().startswith(kept) and len(kept) < len(full.strip())  # cut short, kept in history


@pytest.mark.slow
def test_chat_with_a_gguf_and_a_merged_dir(client, tool_models) -> None:
    """The merged dir and the f16 GGUF of an adapter trained to answer QA give PEFT's answers."""
    from engine_models import QA, peft_answers

    want = peft_answers(tool_models.base, tool_models.lora)
    for path, kind in ((tool_models.gguf, "gguf"), (tool_models.merged, "hf")):
        status = client.predict("en", "", "", "auto", str(path), "auto", "auto", api_name="/chat_load")
        assert status.startswith("**Loaded**") and f"· {kind}" in status, status
        for q, _ in QA[:3]:
            client.predict(api_name="/chat_clear")
            box, _, _ = client.predict("en", q, "", *chat_sampling(24), api_name="/chat_submit")
            assert box[-1]["content"][0]["text"] == want[q].strip(), (kind, q)
    client.predict("en", api_name="/chat_unload")


# ------------------------------------------------------------------ Export


def test_export_merge_gguf_verify(client, trained, model: Path, data_dir: Path, tmp_path: Path) -> None:
    adapter, _ = trained
    out = tmp_path / "export"
    progress, log, summary, table, modelfiles, commands = client.predict(
        *export_inputs(model, adapter, data_dir, export_form(out)), api_name="/export_run"
    )
    assert summary.startswith("**Verify: PASS**"), (progress, log)
    assert re.findall(r'data-stage="(\w+)" data-status="(\w+)"', progress) == [
        ("merge", "pass"), ("gguf", "pass"), ("verify", "pass")]  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert table["data"] == [[c["check"], c["target"], c["status"], c["detail"]] for c in report["checks"]]
    assert {r[0] for r in table["data"]} >= {"template", "stops", "tokenizer", "perplexity", "chat"}
    mf = (out / "gguf" / "Modelfile.f16").read_text()
    assert mf in modelfiles and "PARAMETER stop" in mf
    assert commands.splitlines() == [f"cd {out / 'gguf'}", "ollama create exa:f16 -f Modelfile.f16"]
    # the Chat tab offers what the export wrote, and loads it
    choices = [c[1] if isinstance(c, list) else c for c in client.predict(api_name="/chat_models")["choices"]]
    ggufs = sorted(str(p) for p in (out / "gguf").glob("*.gguf"))
    assert choices == ["", str(out / "merged"), *ggufs] and len(ggufs) == 1
    status = client.predict("en", "", "", "auto", ggufs[0], "auto", "auto", api_name="/chat_load")
    assert status.startswith(f"**Loaded** `{ggufs[0]}` · gguf"), status
    client.predict("en", api_name="/chat_unload")


def test_export_bad_input_is_one_line(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    progress, log, *_ = client.predict(
        *export_inputs(model, tmp_path / "no-adapter", data_dir, export_form(out)), api_name="/export_run"
    )
    assert re.findall(r'data-stage="(\w+)" data-status="(\w+)"', progress)[0] == ("merge", "fail")
    assert log.splitlines()[-1].startswith("error: adapter") and "Traceback" not in log
    assert not (out / "merged").exists()


# ------------------------------------------------------------------ Evaluate & Predict


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EXPORTER_NO_PROGRESS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_predict_equals_the_cli(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    paths, datasets = client.predict(str(data_dir), api_name="/eval_models")
    assert [c[1] if isinstance(c, list) else c for c in datasets["choices"]] == ["identity"]
    out, ref = tmp_path / "board", tmp_path / "cli"
    status, log, table = client.predict(*eval_inputs(model, data_dir, predict_form(out), eval_tab.PREDICT_FORM),
                                        api_name="/eval_predict")  # fmt: skip
    assert 'data-status="finished"' in status, log
    assert f"--output_dir {out}" in status and "--per_device_eval_batch_size 2" in status
    assert " · predict 3/3 samples " in status, status  # the command's progress (its ETA while it runs)
    # the reference: the same options typed on the command line
    _cli("predict", "--model_name_or_path", str(model), "--eval_dataset", "identity", "--dataset_dir", str(data_dir),
         "--max_samples", "3", "--cutoff_len", "256", "--per_device_eval_batch_size", "2", "--max_new_tokens", "8",
         "--output_dir", str(ref))  # fmt: skip
    rows = (out / "generated_predictions.jsonl").read_text(encoding="utf-8")
    assert rows == (ref / "generated_predictions.jsonl").read_text(encoding="utf-8") and len(rows.splitlines()) == 3
    got, want = (json.loads((d / "predict_results.json").read_text()) for d in (out, ref))
    scores = [k for k in eval_tab.PREDICT_METRICS if "runtime" not in k and "per_second" not in k]
    assert {k: got[k] for k in scores} == {k: want[k] for k in scores}
    assert table["headers"] == ["metric", "score"]
    assert table["data"] == [[k, got[k]] for k in eval_tab.PREDICT_METRICS]


def test_eval_equals_the_cli(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    task_dir = tmp_path / "evaluation"
    write_task(task_dir, "mmlu")
    save, ref = tmp_path / "board", tmp_path / "cli"
    status, log, table = client.predict(
        *eval_inputs(model, data_dir, bench_form(task_dir, save), eval_tab.EVAL_FORM), api_name="/eval_bench"
    )
    assert 'data-status="finished"' in status, log
    _cli("eval", "--model_name_or_path", str(model), "--task", "mmlu_test", "--task_dir", str(task_dir),
         "--template", "fewshot", "--n_shot", "1", "--batch_size", "2", "--max_questions", "2",
         "--save_dir", str(ref))  # fmt: skip
    for name in ("results.json", "results.log"):
        assert (save / name).read_text(encoding="utf-8") == (ref / name).read_text(encoding="utf-8"), name
    lines = (ref / "results.log").read_text(encoding="utf-8").splitlines()
    assert table["data"] == [[n.strip(), float(a)] for n, a in (ln.rsplit(":", 1) for ln in lines)]
    assert table["data"][0][0] == "Average" and len(table["data"]) == 4  # Average + the fixture's 3 categories


def test_eval_bad_input_is_one_line(client, model: Path, data_dir: Path, tmp_path: Path) -> None:
    save = tmp_path / "save"
    form = bench_form(tmp_path / "no-such-dir", save)
    status, log, table = client.predict(*eval_inputs(model, data_dir, form, eval_tab.EVAL_FORM),
                                        api_name="/eval_bench")  # fmt: skip
    assert 'data-status="failed"' in status
    last = log.splitlines()[-1]
    assert last.startswith("error:") and "no-such-dir" in last and "Traceback" not in log, log
    assert not save.exists() and table["data"] in ([], [[None, None]], [["", ""]])


def test_eval_tab_options_are_what_the_cli_parses(tmp_path: Path) -> None:
    top = {"model": "m", "adapter": "a", "template": "qwen-2.5", "dataset_dir": "d", "path": ""}
    opts = eval_tab.predict_options(top, predict_form(tmp_path / "o", dataset=["x", "y"], do_sample=True))
    argv = eval_tab.to_argv("predict", opts)
    assert predict.options(*lf_args.parse_args(argv[1:], predict.PredictOptions))[0] == opts
    for tmpl in eval_tab.EVAL_TEMPLATES:
        opts = eval_tab.eval_options(top | {"path": "x.gguf"}, bench_form(tmp_path / "t", tmp_path / "s",
                                                                           eval_template=tmpl, lang="zh"))  # fmt: skip
        assert opts.adapter_name_or_path is None and opts.template == ("fewshot" if tmpl == "fewshot" else "qwen-2.5")
        raw, where = lf_args.parse_args(eval_tab.to_argv("eval", opts)[1:], evaluate.EvalOptions)
        assert config.build(evaluate.EvalOptions, raw, where) == opts


def _cli_options(monkeypatch: pytest.MonkeyPatch, target: str, argv: list[str]) -> object:
    """The options object the real CLI builds from `argv` (the stage function replaced by a recorder)."""
    seen = []

    def record(opts):
        seen.append(opts)
        raise SystemExit(0)

    module, func = target.rsplit(".", 1)
    monkeypatch.setattr(f"{module}.{func}", record)
    result = CliRunner().invoke(cli.app, argv)
    assert seen, result.output
    return seen[0]


def test_each_stage_runs_with_the_options_the_board_built(monkeypatch, tmp_path: Path) -> None:
    out = tmp_path / "e"
    (out / "gguf").mkdir(parents=True)
    for name in ("m-f16.gguf", "m-q8_0.gguf", "Modelfile.f16", "Modelfile.q8_0"):
        (out / "gguf" / name).write_text("x")
    (out / "quantized-bnb4").mkdir()
    form = export_form(out, merge_dtype="bf16", quant_method="bnb4", gguf_types=["f16", "q8_0"], verify_prompts=3,
                       quant_dataset="identity") | {"model": "/m", "adapter": "/a", "template": "llama3",
                                                    "dataset_dir": "/d"}  # fmt: skip
    targets = {"merge": "exporter.merge.merge", "quantize": "exporter.quantize.quantize", "gguf": "exporter.gguf.run",
               "verify": "exporter.verify.verify"}  # fmt: skip
    assert export_tab.stages_for(form) == list(targets)
    for stage, target in targets.items():
        ours = export_tab.stage_options(stage, form)
        assert _cli_options(monkeypatch, target, export_tab.to_argv(stage, ours)) == ours, stage
    verify = export_tab.stage_options("verify", form)
    assert [p.name for p in verify.ggufs] == ["m-f16.gguf", "m-q8_0.gguf"] and verify.quantized


# ------------------------------------------------------------------ the board itself


def test_labels_in_both_languages() -> None:
    demo, board = build(WebUIOptions(lang="zh"))
    assert {k for k, _ in board.labelled} == set(locales.LABELS)  # every label is used, every element has one
    zh = board.relabel("zh")
    en = board.relabel("en")
    for (key, _), z, e in zip(board.labelled, zh, en, strict=True):
        z_text, e_text = z.get("label", z.get("value")), e.get("label", e.get("value"))
        assert (e_text, z_text) == locales.LABELS[key]
        assert re.search(r"[\u4e00-\u9fff]", z_text) or z_text == e_text, key  # Chinese, or a name like DoRA
    assert all(re.search(r"[\u4e00-\u9fff]", zh) for zh in (z for _, z in locales.WORDS.values()))
    demo.close()


def test_cli_binds_loopback_without_a_share_link(tmp_path: Path) -> None:
    from webui_helpers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "webui", "--port", str(port), "--runs-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        banner = ""
        deadline = time.time() + 120
        while f"127.0.0.1:{port}" not in banner:
            assert time.time() < deadline and proc.poll() is None, banner
            banner += proc.stdout.readline()
        listening = Path("/proc/net/tcp").read_text().split("\n")[1:]
        local = {ln.split()[1] for ln in listening if ln.strip() and ln.split()[3] == "0A"}  # LISTEN sockets
        assert f"0100007F:{port:04X}" in local  # 127.0.0.1 only
        assert f"00000000:{port:04X}" not in local
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert banner.strip() == f"exporter webui on http://127.0.0.1:{port}/ (Ctrl-C stops it)"  # no Gradio banner
    assert "gradio.live" not in banner + out and "public" not in banner + out


def test_nothing_phones_home(monkeypatch, tmp_path: Path) -> None:
    """Serving the page and answering an API call connects nowhere but the loopback."""
    import httpx

    targets: list[str] = []
    real = socket.socket.connect

    def connect(self, address):
        targets.append(address[0] if isinstance(address, tuple) else str(address))
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    with serve(tmp_path) as url:
        assert "exporter" in httpx.get(url, timeout=30).text
        from gradio_client import Client

        assert Client(url, verbose=False).predict("en", api_name="/train_stop") == "Nothing is running."
        time.sleep(1)  # what a launch would send in the background has had time to go
    assert targets and set(targets) <= {"127.0.0.1", "localhost", "::1"}, targets


def test_methods_and_stages_follow_the_train_command() -> None:
    from exporter.lf_args import UNSUPPORTED, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(train_tab.stages()) <= {"sft", "pt", "dpo", "kto"}
    assert ("qlora" in train_tab.methods()) == ("quantization_bit" in fields and "quantization_bit" not in UNSUPPORTED)
    assert {"lora", "full"} <= set(train_tab.methods())
