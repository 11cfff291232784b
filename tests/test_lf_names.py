"""LLaMA-Factory names wherever a template is named: train's examples equal LLaMA-Factory's own training data
pipeline on the same config (its reference venv, $EXPORTER_LF_PYTHON); the adapter carries the Jinja and stop
tokens LF leaves in the tokenizer; `template list/show/render` know both kinds; resolution and its errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, lf_python

from exporter import lf_args, lf_names, lf_templates, render, templates
from exporter.errors import UserError

TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def _dataset(d: Path) -> Path:
    """Two LF datasets: sharegpt with system, tools, a function call and its observation, a thought, unicode;
    alpaca rows."""
    d.mkdir(parents=True, exist_ok=True)
    info = {
        "chat": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
        },
        "inst": {"file_name": "inst.json"},
    }
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    chat = [
        {
            "conversations": [
                {"from": "human", "value": "Hi there"},
                {"from": "gpt", "value": "Hello! How can I help?"},
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": json.dumps(call)},
                {"from": "observation", "value": "21 C"},
                {"from": "gpt", "value": "It is 21 °C."},
            ],
            "system": "Be brief.",
            "tools": json.dumps(TOOLS),
        },
        {
            "conversations": [
                {"from": "human", "value": "日本語で？ 😀"},
                {"from": "gpt", "value": "<think>\nok\n</think>\n\nはい。"},
                {"from": "human", "value": " and again "},
                {"from": "gpt", "value": "Sure: はい。 "},
            ],
            "system": "",
            "tools": "",
        },
    ]
    inst = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    ]
    (d / "dataset_info.json").write_text(json.dumps(info))
    (d / "chat.json").write_text(json.dumps(chat, ensure_ascii=False), encoding="utf-8")
    (d / "inst.json").write_text(json.dumps(inst))
    return d


def _lf_train(configs: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    """LF's training examples for each config (one LF process: its imports take most of the time)."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "HF_HOME": str(tmp / "hf")}
    base = {"stage": "sft", "do_train": True, "finetuning_type": "lora", "report_to": "none", "overwrite_cache": True}
    configs = [{**base, "output_dir": str(tmp / f"lf-out-{k}"), **c} for k, c in enumerate(configs)]
    proc = subprocess.run(
        [lf_python(), str(ROOT / "tests" / "lf_reference.py")],
        input=json.dumps({"train": configs}),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# (LF template, fixture, LF data arguments): native and foreign tokenizers, efficient_eos, reasoning, llama2-kind,
# a replaced Jinja, and LF's cutoff / mask_history / train_on_prompt / enable_thinking
CASES = [
    ("llama3", "llama3", {}),
    ("qwen", "qwen2", {"cutoff_len": 24}),
    ("qwen3", "qwen3", {"enable_thinking": False}),
    ("qwen3", "qwen3", {"mask_history": True}),
    ("gemma2", "gemma3", {}),
    ("mistral", "mistral", {"train_on_prompt": True}),
    ("chatml", "qwen2", {"default_system": "You are a cat."}),
    ("llama2", "llama2", {}),
]


def _args(name: str, model: Path, data: Path, extra: dict[str, Any]) -> dict[str, Any]:
    return {"model_name_or_path": str(model), "dataset": "chat,inst", "dataset_dir": str(data), "template": name,
            "cutoff_len": 1024, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def lf_examples(tiny_model, tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("lf-train")
    data = _dataset(tmp / "data")
    return data, _lf_train([_args(n, tiny_model(f), data, x) for n, f, x in CASES], tmp)


# One deliberate difference: with a SentencePiece tokenizer, transformers 5 (and so LF) writes no '▁' before text
# that follows a control token such as [INST]; exporter trains with the '▁' that llama.cpp and sentencepiece give,
# the ids the exported model sees when served (exporter/spm.py). The mistral case has such text.
_SPM_DRIFT = pytest.mark.xfail(strict=True, reason="exporter trains with llama.cpp's SentencePiece '▁' (spm.py)")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [pytest.param(i, marks=_SPM_DRIFT if c[0] == "mistral" else ()) for i, c in enumerate(CASES)],
    ids=[f"{c[0]}-{c[1]}-{len(c[2])}" for c in CASES],
)
def test_train_examples_equal_llamafactory(case, lf_examples, tiny_model, tmp_path) -> None:
    from exporter import examples

    name, fixture, extra = CASES[case]
    data, refs = lf_examples
    ref, model = refs[case], tiny_model(fixture)
    args = _args(name, model, data, extra)
    cfg = lf_args.TrainConfig(output_dir=str(tmp_path / "out"), **{**args, "dataset": ["chat", "inst"]})
    prep = examples.prepare(cfg, model)
    ours = [{"input_ids": e.input_ids, "labels": e.labels} for e in prep.train]
    # one deliberate difference: an example that cutoff_len leaves without a trained token is dropped (and said);
    # LF keeps it, and it trains nothing
    kept = [e for e in ref["examples"] if any(x != -100 for x in e["labels"][1:])]
    assert len(ours) == len(kept) and (len(kept) < len(ref["examples"])) == ("cutoff_len" in extra)
    for k, (a, b) in enumerate(zip(ours, kept, strict=True)):
        assert a == b, f"example {k}"
    assert prep.tokenizer.eos_token == ref["eos_token"]
    assert prep.tpl.jinja == ref["chat_template"]
    assert lf_templates.stop_token_ids(lf_templates.load(name), prep.tokenizer) == ref["stop_ids"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fixture"), [("chatml", "qwen2"), ("phi", "phi3")])
def test_adapter_carries_lf_jinja_and_stop_tokens(name, fixture, tiny_model, tmp_path) -> None:
    """chatml replaces the model's Jinja (replace_jinja_template); phi keeps it and replaces Phi-3's eos
    <|endoftext|> by <|end|> (replace_eos): the adapter's tokenizer and generation_config are what LF's tokenizer is
    after get_template_and_fix_tokenizer."""
    from transformers import AutoTokenizer

    from exporter import train

    model, data, out = tiny_model(fixture), _dataset(tmp_path / "data"), tmp_path / "adapter"
    args = {"model_name_or_path": str(model), "dataset_dir": str(data), "template": name}
    train.train(lf_args.TrainConfig(**args, output_dir=str(out), dataset=["chat", "inst"], max_steps=1,
                                    per_device_train_batch_size=2, logging_steps=1, save_steps=1000))  # fmt: skip
    ref = _lf_train([{**args, "dataset": "chat,inst"}], tmp_path)[0]
    saved, own = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(model)
    assert saved.chat_template == ref["chat_template"]
    assert (saved.chat_template == own.chat_template) == (name == "phi")
    assert saved.eos_token == ref["eos_token"] == ("<|end|>" if name == "phi" else "<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(ref["stop_ids"]) <= set([gen] if isinstance(gen, int) else gen)


def test_new_tokens_are_refused(tiny_model, tmp_path) -> None:
    """LF's qwen on a vocabulary without ChatML tokens: LF would add them and resize the embeddings; we refuse."""
    from exporter import train

    data = _dataset(tmp_path / "data")
    cfg = lf_args.TrainConfig(model_name_or_path=str(tiny_model("llama3")), output_dir=str(tmp_path / "o"),
                              dataset=["chat"], dataset_dir=str(data), template="qwen")  # fmt: skip
    with pytest.raises(UserError, match=r"needs tokens .*<\|im_end\|>.*resize_vocab"):
        train.train(cfg)
    assert not (tmp_path / "o").exists()


def test_resolution_order_and_errors(tiny_model) -> None:
    model = tiny_model("llama3")
    tpl = templates.resolve(model, "llama3")  # LF's llama3: the model's own Jinja is kept, LF's encoder trains
    assert tpl.kind == lf_names.KIND and tpl.encoder is not None
    assert tpl.jinja == (model / "chat_template.jinja").read_text()
    assert tpl.eot_tokens == ["<|eot_id|>", "<|eom_id|>"]
    assert templates.resolve(model, "llama-3.1").kind == "family"  # the official Llama 3.1 format
    with pytest.raises(UserError, match=r"unknown chat template 'qwen_3' \(did you mean 'qwen3'\?\)"):
        templates.resolve(model, "qwen_3")
    with pytest.raises(UserError, match="needs tokens .*resize_vocab"):
        templates.resolve(model, "phi4")
    cfg = lf_args.TrainConfig(model_name_or_path=str(model), output_dir="o", template="llama-3.1", mask_history=True)
    with pytest.raises(UserError, match="mask_history: only with a LLaMA-Factory template name"):
        lf_names.resolve_for_training(model, cfg)


def test_encoder_takes_hf_messages_like_lf_rows(tiny_model) -> None:
    """verify and calibration hand HF-style messages (system, tool_calls, tool) to the encoder: the same ids and
    labels as LF's own rows, and a conversation ending with a prompt encodes as that prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    tpl = templates.resolve(tiny_model("qwen2"), "qwen")
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    hf = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "21 C"},
        {"role": "assistant", "content": "21 °C."},
    ]
    rows = [
        {"role": "user", "content": "Weather?"},
        {"role": "function", "content": json.dumps(call)},
        {"role": "observation", "content": "21 C"},
        {"role": "assistant", "content": "21 °C."},
    ]
    lf = lf_templates.load("qwen")
    want = lf_templates.encode(tok, lf, rows, "Be brief.", json.dumps(TOOLS), lf_names.NO_CUT)
    assert render.encode(tok, tpl, hf, tools=TOOLS) == want
    prompt_ids, prompt_labels = render.encode(tok, tpl, hf[:2])
    assert set(prompt_labels) == {-100}
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def _cli(*args: str) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "exporter", "template", *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def test_template_cli_knows_both_kinds(tmp_path) -> None:
    rc, out, _ = _cli("list")
    assert rc == 0 and "official families" in out and "LLaMA-Factory 0.9.5 names" in out
    assert "qwen-2.5" in out and "qwen3_5_nothink" in out
    assert lf_names.same_text(templates.load_template("qwen-2.5"), "qwen")  # same text, different labels
    assert not lf_names.same_text(templates.load_template("llama-3.1"), "llama3")  # 3.1's dated system header
    rc, out, _ = _cli("show", "chatml")
    assert rc == 0 and out.rstrip("\n") == lf_templates.jinja(lf_templates.load("chatml"), None, "<|im_end|>")
    rc, out, _ = _cli("show", "llama3", "--format", "ollama", "--bos-token", "<|begin_of_text|>")
    assert rc == 0 and 'PARAMETER stop "<|eom_id|>"' in out and "TEMPLATE" in out
    rc, out, _ = _cli("show", "gpt_oss", "--format", "slots")
    assert rc == 0 and json.loads(out)["gpt_oss"]["efficient_eos"] is True
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]))
    rc, out, _ = _cli("render", "qwen3", str(conv))
    assert (
        rc == 0
        and out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nYo<|im_end|>\n"
    )
    model = tmp_path / "lf-exported"  # a model LLaMA-Factory exported with chatml carries chatml's generated Jinja
    model.mkdir()
    chatml = lf_templates.jinja(lf_templates.load("chatml"), None, "<|im_end|>")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml, "eos_token": "<|im_end|>"}))
    rc, out, _ = _cli("detect", str(model))
    assert rc == 0 and "LLaMA-Factory's generated Jinja of: chatml" in out
    rc, _, err = _cli("show", "qwen4")
    assert rc == 2 and "did you mean" in err


# Meta-Llama-3-8B-Instruct's published chat template (the Llama 3.0 format of the LLaMA-Factory tutorials: no dated
# system header, no forced system turn). The llama-cpp-python sdist ships only the 3.1+ templates, so it is here.
LLAMA3_0_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.slow
def test_tutorial_flow_llama3_0(tiny_model, tmp_path) -> None:
    """LF's tutorial: a Llama-3.0-format model, `--template llama3` with LF's flags, merge without --template,
    gguf, verify: it passes, and the Modelfile TEMPLATE renders conversations like the Llama 3.0 Jinja in real Go."""
    from conftest import require_go, require_llama_cpp

    from exporter.gotemplate import ollama_data, render_go
    from exporter.templates import _render_jinja

    require_go(), require_llama_cpp()
    model = tmp_path / "llama3.0"
    shutil.copytree(tiny_model("llama3"), model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA3_0_JINJA
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").write_text(LLAMA3_0_JINJA)
    env = {**os.environ, "PYTHONSAFEPATH": "1"}

    def run(*args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, f"{args[0]}: {r.stdout[-2000:]}{r.stderr[-3000:]}"

    adapter, merged, gguf = tmp_path / "lora", tmp_path / "merged", tmp_path / "gguf"
    run("train", "--stage", "sft", "--do_train", "--model_name_or_path", str(model), "--dataset", "identity",
        "--dataset_dir", str(ROOT / "data"), "--template", "llama3", "--finetuning_type", "lora", "--lora_target",
        "all", "--output_dir", str(adapter), "--per_device_train_batch_size", "4", "--max_steps", "3",
        "--learning_rate", "1e-3", "--identity_name", "Exa", "--identity_author", "Acme")  # fmt: skip
    assert (adapter / "chat_template.jinja").read_text() == LLAMA3_0_JINJA  # LF keeps the model's own for llama3
    run("merge", "--base", str(model), "--adapter", str(adapter), "--out", str(merged))
    run("gguf", str(merged), "--type", "f16", "--out", str(gguf))
    text = (gguf / "Modelfile.f16").read_text()
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "Cutting Knowledge Date" not in go
    u, a = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    for conv in ([u], [{"role": "system", "content": "Be brief."}, u], [u, a, u]):
        want = _render_jinja(LLAMA3_0_JINJA, conv, True, "<|begin_of_text|>", "<|eot_id|>")
        assert render_go(go, ollama_data(conv)) == want.removeprefix("<|begin_of_text|>")
    (f16,) = gguf.glob("*-f16.gguf")
    run("verify", "--merged", str(merged), "--gguf", str(f16), "--modelfile",
        str(gguf / "Modelfile.f16"), "--prompts", "1", "--max-new-tokens", "4", "--ctx", "64", "--max-windows", "2",
        "--report", str(tmp_path / "report.json"))  # fmt: skip


_LF_CHAT = """
import json, os, sys
os.environ["DISABLE_VERSION_CHECK"] = "1"
from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
from transformers import AutoTokenizer
out = []
for case in json.load(sys.stdin):
    tok = AutoTokenizer.from_pretrained(case["tokenizer"])
    tpl = get_template_and_fix_tokenizer(tok, DataArguments(template=case["template"], **case["data_args"]))
    messages = case["messages"] + [{"role": "assistant", "content": ""}]
    out.append(tpl.encode_oneturn(tok, messages, case["system"])[0])
print(json.dumps(out))
"""


@pytest.mark.parametrize(("name", "fixture", "data_args"), [("qwen3", "qwen3-real", {}),
                                                            ("qwen3", "qwen3-real", {"enable_thinking": False}),
                                                            ("llama3", "llama3-real", {})])  # fmt: skip
def test_chat_prompts_equal_llamafactory_chat(name: str, fixture: str, data_args: dict, tiny_model) -> None:
    """What chat/serve feed the model for an LF name is LF's own `encode_oneturn` (its ChatModel's prompt): earlier
    answers' thoughts dropped on a reasoning template, the thought words where LF puts them."""
    model = tiny_model(fixture.removesuffix("-real"), real_vocab=fixture.endswith("-real"))
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "<think>\nsay hello\n</think>\n\nHello!"},
               {"role": "user", "content": "And again?"}]  # fmt: skip
    case = {"tokenizer": str(model), "template": name, "data_args": data_args, "messages": history,
            "system": "Be brief."}  # fmt: skip
    proc = subprocess.run([lf_python(), "-c", _LF_CHAT], input=json.dumps([case]), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    tpl = lf_names.resolve(model, name, lf_templates.LFOptions(cutoff_len=1 << 30, **data_args))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids, labels = render.encode(tok, tpl, [{"role": "system", "content": "Be brief."}, *history])
    assert ids == want and set(labels) == {-100}
