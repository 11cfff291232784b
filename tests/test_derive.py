"""Any model, any chat template: what is derived from a model's own Jinja, checked against transformers (the Jinja)
and real Go (the Modelfile TEMPLATE), on the published templates llama.cpp vendors and on Llama 3.0's format.

References: transformers' `apply_chat_template` rendering and tokenizer ids; real Go `text/template` fed what Ollama
feeds; llama.cpp's GGUF reader (gguf-py) for what the GGUF holds. Our own derivation is never the reference.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import llama_src, pipeline_yaml, random_lora, require_go, require_llama_cpp
from gguf import GGUFReader

from exporter import derive, gotemplate
from exporter.render import encode, render_segments
from exporter.templates import detect_template_text

# Meta-Llama-3-8B-Instruct's chat_template as published in its tokenizer_config.json (Llama 3.0 format: no system
# header unless a system message is given, no dates, content trimmed). Not in llama.cpp's vendored templates.
LLAMA3_0 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
MARK = re.compile(r"<[^<>\s]{1,64}>|<｜[^｜]{1,64}｜>|\[/?[A-Z][A-Z_]{1,30}\]")
PLAIN = derive.PLAIN_SHAPES


def _u(c: str) -> dict:
    return {"role": "user", "content": c}


def _a(c: str) -> dict:
    return {"role": "assistant", "content": c}


def _s(c: str) -> dict:
    return {"role": "system", "content": c}


def _published() -> dict[str, str]:
    root = llama_src() / "vendor" / "llama.cpp" / "models" / "templates"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(root.glob("*.jinja"))}


def _jinja_text(jinja: str, msgs: list[dict], gen: bool, bos: str, eos: str, **kw) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template(conversations=[msgs], chat_template=jinja, add_generation_prompt=gen, bos_token=bos,
                                 eos_token=eos, **kw)[0][0]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Llama 3.0's format, derived


def test_llama3_0_layout_and_go_template() -> None:
    require_go()
    tpl = detect_template_text(LLAMA3_0, BOS, EOT, [BOS, EOT, "<|start_header_id|>", "<|end_header_id|>"])
    assert tpl.name == "derived" and tpl.jinja == LLAMA3_0 and tpl.format["go"] == "derived"
    assert tpl.eot_tokens == [EOT] and EOT in tpl.stop and tpl.default_system is None
    user = [_u("Hi")]
    go = gotemplate.render_go(tpl.ollama, gotemplate.ollama_data(user))
    # Llama 3.0: no system header without a system message (3.1's always has one), BOS added by the tokenizer
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert go == header.format("user") + "Hi<|eot_id|>" + header.format("assistant")
    for msgs in ([_s("Be brief."), _u("Hi"), _a("Hello."), _u("Again")], [_u("A"), _a("B"), _u("C")]):
        want = _jinja_text(LLAMA3_0, msgs, True, BOS, EOT).removeprefix(BOS)
        assert gotemplate.render_go(tpl.ollama, gotemplate.ollama_data(msgs)) == want
    # Go cannot trim: stated, shape by shape, never silent
    assert tpl.format["differ"] == ["padded whitespace"]
    assert any("differs on padded whitespace: the Jinja trims" in n for n in tpl.notes)


def test_date_rendered_at_render_time_becomes_current_date() -> None:
    """Llama 3.2 prints today's date; Go has currentDate (YYYY-MM-DD): the TEMPLATE uses it and says the format
    differs. On a fixed day both render that day."""
    require_go()
    jinja = _published()["meta-llama-Llama-3.2-3B-Instruct"]
    tpl = detect_template_text(jinja, BOS, EOT)
    assert "{{ currentDate }}" in tpl.ollama
    assert any("today's date as '%d %b %Y'" in n for n in tpl.notes)
    go = gotemplate.render_go(tpl.ollama, gotemplate.ollama_data([_u("Hi")]), now="2026-03-07")
    assert "Today Date: 2026-03-07\n" in go


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("mistralai-Mistral-Nemo-Instruct-2407", "last"),  # system prompt goes into the last user turn
        ("google-gemma-2-2b-it", "none"),  # refuses system messages
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "turn"),  # system text right after BOS, "<think>" prompt
        ("Qwen-Qwen2.5-7B-Instruct", "turn"),  # default system prompt
    ],
)
def test_system_placement(name: str, mode: str) -> None:
    lay, _ = derive.derive_layout(_published()[name], "<s>", "</s>")
    assert lay.sys_mode == mode
    if name.startswith("Qwen"):
        assert lay.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    if name.startswith("deepseek"):
        assert lay.gen.endswith("<think>\n</think>") or lay.gen.endswith("<think>\n")


def test_glm_46_tool_turns_train_and_stop_on_observation() -> None:
    """GLM-4.6 (derived, Go TEMPLATE of family glm-4.6): an answer that calls a tool ends with <|observation|>, which
    is trained, an end-of-turn token and a stop, as <|user|> is for plain answers."""
    from exporter.templates import _TOOL, TOOL_PROBE

    jinja, markers = _published()["GLM-4.6"], ["<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"]
    tpl = detect_template_text(jinja, "", "<|endoftext|>", markers)
    assert tpl.name == "derived" and tpl.format["go"] == "glm-4.6"
    assert {"<|user|>", "<|observation|>"} <= set(tpl.eot_tokens) & set(tpl.stop)
    lacking = detect_template_text(jinja, "", "<|endoftext|>", markers[:2])  # a tokenizer without <|observation|>
    assert "<|observation|>" not in lacking.eot_tokens and "<|observation|>" in lacking.stop
    trained = [t for t, tr in render_segments(tpl, TOOL_PROBE, tools=[_TOOL], eos_token="<|endoftext|>") if tr]
    call = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
    assert trained == [f"\n<think></think>\n{call}<|observation|>", "\n<think></think>\nIt is 21 C and sunny.<|user|>"]


def test_template_that_fails_everywhere_is_stated_not_raised() -> None:
    tpl = detect_template_text("{{ raise_exception('no') }}", "", "</s>")
    assert tpl.name == "derived" and tpl.ollama == "" and tpl.stop == ["</s>"]
    assert any("no Ollama TEMPLATE" in n for n in tpl.notes)


# ---------------------------------------------------------------------------------------------------------------
# training with the model's own Jinja: ids == apply_chat_template ids, trained spans == what the model must produce

CORPUS = {
    "one_turn": [_u("Hi there"), _a("Hello! How can I help?")],
    "system_multi": [_s("Be brief."), _u("Q1?"), _a("A one."), _u("Q2?"), _a("A two.")],
    "multi": [_u("Count to three."), _a("One, two, three."), _u("Now backwards."), _a("Three, two, one.")],
    "unicode": [_s("Réponds en français. 用中文也可以。"), _u("¿Qué tal? 你好 🙂"), _a("Très bien, 谢谢！🎉")],
    "empty": [_u(""), _a(""), _u("Now say something."), _a("Something.")],
    "padded": [_u("  leading and trailing  \n"), _a(" answer with spaces ")],
}
TRAIN_TEMPLATES = [
    "meta-llama-Llama-3.1-8B-Instruct",  # trims content
    "meta-llama-Llama-3.2-3B-Instruct",  # today's date
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",  # "<think>\n" generation prompt, strips earlier thinking
    "Qwen-QwQ-32B",
    "Qwen3.5-4B",  # thinking block written into the last answer (not prefix-consistent)
    "mistralai-Mistral-Nemo-Instruct-2407",  # system prompt moves to the last user turn
    "google-gemma-2-2b-it",  # no system role
    "openai-gpt-oss-120b",  # <|end|> mid-conversation, <|return|> at the end
    "Apertus-8B-Instruct",  # leaves the final answer open
    "GLM-4.6",  # answers end with the next role token
    "ibm-granite-granite-3.3-2B-Instruct",
    "HuggingFaceTB-SmolLM3-3B",  # metadata system header, reasoning modes
]


def add_markers(tok_dir: Path, markers: list[str]) -> list[str]:
    """Add `markers` the tokenizer lacks as special tokens (ids after its last one, within config vocab_size)."""
    from tokenizers import Tokenizer

    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    limit = json.loads((tok_dir / "config.json").read_text())["vocab_size"] if (tok_dir / "config.json").exists() else 0
    tk = Tokenizer.from_str(json.dumps(tj))
    next_id = max(a["id"] for a in tj["added_tokens"]) + 1
    added = []
    for m in dict.fromkeys(markers):
        if tk.token_to_id(m) is not None or (limit and next_id >= limit):
            continue
        entry = {"content": m, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True}  # fmt: skip
        tj["added_tokens"].append({"id": next_id, **entry})
        cfg.setdefault("added_tokens_decoder", {})[str(next_id)] = entry
        added.append(m)
        next_id += 1
    (tok_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return added


def template_markers(jinja: str, bos: str, eos: str) -> list[str]:
    """Token-like marks in what `jinja` renders for the check shapes (the special tokens such a model has)."""
    out: list[str] = []
    shapes = [(msgs, True) for msgs in derive.SHAPES.values()] + [(msgs, False) for msgs in CORPUS.values()]
    for msgs, gen in shapes:
        for kw in ({}, {"tools": []}):
            try:
                out += MARK.findall(_jinja_text(jinja, msgs, gen, bos, eos, **kw))
                break
            except Exception:  # the template refuses the shape (or needs a tools list)
                continue
    return list(dict.fromkeys(out))


def with_template(src: Path, jinja: str, out: Path) -> Path:
    """A copy of fixture `src` (weights linked) whose chat_template.jinja is `jinja`, with its special tokens."""
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (out / f.name).symlink_to(f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, out / name)
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    add_markers(out, template_markers(jinja, cfg.get("bos_token") or "", cfg.get("eos_token") or ""))
    return out


def _incremental(jinja: str, msgs: list[dict], k: int, eot: list[str], bos: str, eos: str) -> str | None:
    """Reference for answer k where the Jinja is prefix-consistent: render(msgs[:k+1]) minus render(msgs[:k], gen),
    cut after the first end-of-turn token."""
    try:
        prompt = _jinja_text(jinja, msgs[:k], True, bos, eos)
        full = _jinja_text(jinja, msgs[: k + 1], False, bos, eos)
        rest = _jinja_text(jinja, msgs, False, bos, eos)
    except Exception:
        return None
    if not (full.startswith(prompt) and rest.startswith(full) and (rest.startswith(prompt))):
        return None
    tail = full[len(prompt) :]
    cut = min((tail.find(t) + len(t) for t in eot if t in tail), default=None)  # eot: the answer-closing tokens
    return tail[:cut] if cut is not None else None


@pytest.mark.parametrize("name", TRAIN_TEMPLATES)
def test_training_follows_the_models_own_jinja(name: str, tiny_model, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from exporter.templates import detect

    jinja = _published()[name]
    model = with_template(tiny_model("qwen2"), jinja, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model)
    tpl = detect(model)
    assert tpl.name == "derived" and tpl.eot_tokens, tpl.notes
    bos, eos = tok.bos_token or "", tok.eos_token or ""
    checked = 0
    for case, msgs in CORPUS.items():
        try:
            text = _jinja_text(jinja, msgs, False, bos, eos)
        except Exception:
            continue  # the model's own template refuses this conversation (e.g. Gemma 2: a system message)
        segs = render_segments(tpl, msgs, bos_token=bos, eos_token=eos)
        joined = "".join(t for t, _ in segs)
        closed = joined[len(text) :]  # what training appends to an answer the Jinja leaves open
        assert joined.startswith(text) and closed in ("", tpl.format["close"]), (case, closed)
        ids, labels = encode(tok, tpl, msgs)
        assert ids == tok(joined, add_special_tokens=False)["input_ids"], case  # == apply_chat_template ids
        trained = [t for t, tr in segs if tr]
        answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        assert len(trained) == len([k for k in answers if msgs[k]["content"] or tpl.eot_tokens]), (case, trained)
        for k, got in zip(answers, trained, strict=False):
            closers = tpl.format["closers"]  # gpt-oss: answers in history end with <|end|>, the last with <|return|>
            assert msgs[k]["content"].strip() in got and any(got.endswith(t) for t in closers), (case, got)
            assert not any(m["content"] and m["content"] in got for m in msgs if m["role"] != "assistant")
            ref = _incremental(jinja, msgs, k, closers, bos, eos)
            if ref is not None:
                assert got == ref, (case, k)
        trained_ids = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
        assert tok.decode(trained_ids) == "".join(trained), case  # the labels are exactly those characters
        checked += 1
    assert checked >= 4


# ---------------------------------------------------------------------------------------------------------------
# every published template llama.cpp vendors: merge and gguf succeed, the GGUF holds the Jinja verbatim, and the
# Modelfile TEMPLATE renders like the Jinja in real Go on the plain shapes, or says where it does not


def _stated(header: list[str]) -> set[str]:
    """Shapes the Modelfile header says differ ("# differs on a, b: why")."""
    out: set[str] = set()
    for line in header:
        if line.startswith("# differs on "):
            out |= {s.strip() for s in line[len("# differs on ") :].split(":")[0].split(",")}
    return out


@pytest.mark.slow
def test_every_published_template_exports(tiny_model, tmp_path: Path, capsys) -> None:
    from exporter.converters.modelfile import parse
    from gguf import GGUFReader

    from exporter import gguf, merge

    require_go()
    base = tiny_model("qwen2")
    adapter = random_lora(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    rows, counts = [], {"templates": 0, "converted": 0, "verbatim": 0, "template": 0, "all plain shapes": 0}
    counts |= {s: 0 for s in PLAIN} | {"tool calls": 0}
    for name, jinja in _published().items():
        counts["templates"] += 1
        model = with_template(base, jinja, tmp_path / name)
        merged = merge.merge(merge.MergeOptions(str(model), [str(adapter)], str(tmp_path / f"{name}-merged"))).out
        assert (merged / "chat_template.jinja").read_text(encoding="utf-8") == jinja, name  # carried byte for byte
        out = gguf.run(gguf.GGUFOptions(str(merged), ["f16"], str(tmp_path / f"{name}-gguf")))
        counts["converted"] += 1
        path = out.files["f16"]
        field = GGUFReader(path).fields["tokenizer.chat_template"]
        assert field.contents() == jinja, name
        counts["verbatim"] += 1
        text = out.modelfiles["f16"].read_text(encoding="utf-8")
        cmds = dict((c, v) for c, v in parse(text) if c != "parameter stop")
        header = [ln for ln in text.splitlines() if ln.startswith("#")]
        cfg = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
        bos, eos = cfg.get("bos_token") or "", cfg.get("eos_token") or ""
        cells = {}
        if "template" not in cmds:
            assert any("no Ollama TEMPLATE" in ln for ln in header), name  # stated, never silent
            cells = dict.fromkeys(PLAIN, "-")
        else:
            counts["template"] += 1
            refs, jobs = {}, []
            for shape in PLAIN:
                msgs = derive.SHAPES[shape]
                try:
                    refs[shape] = _jinja_text(jinja, msgs, True, bos, eos).removeprefix(bos) if bos else _jinja_text(
                        jinja, msgs, True, bos, eos)  # fmt: skip
                except Exception:
                    try:  # tool-use templates need a tools list
                        refs[shape] = _jinja_text(jinja, msgs, True, bos, eos, tools=[])
                    except Exception:
                        cells[shape] = "refused"
                        continue
                jobs.append((cmds["template"], gotemplate.ollama_data(msgs, system=cmds.get("system"))))
            stated = _stated(header)
            for shape, got in zip(refs, gotemplate.render_go_many(jobs), strict=True):
                if got == refs[shape]:
                    cells[shape] = "="
                    counts[shape] += 1
                else:
                    assert shape in stated, f"{name}: {shape} differs in Go and the Modelfile does not say so"
                    cells[shape] = "differs"
            counts["all plain shapes"] += all(cells[s] in ("=", "refused") for s in PLAIN)
        go = next((m.group(1) for ln in header if (m := re.search(r"Ollama TEMPLATE (derived|of family [\w.-]+)", ln))),
                  "none")  # fmt: skip
        # tool definitions, calls and results: translated in a family's format (its notes say what differs) or not
        tools = next((m.group(1) for ln in header if (m := re.search(r"tool calls: in family ([\w.-]+)'s", ln))),
                     "no" if any("are not translated" in ln for ln in header) else "-")  # fmt: skip
        counts["tool calls"] += tools not in ("no", "-")
        rows.append((name, go, *(cells[s] for s in PLAIN), tools))
        shutil.rmtree(tmp_path / f"{name}-gguf")
        shutil.rmtree(merged)
    with capsys.disabled():
        width = max(len(r[0]) for r in rows)
        columns = (*PLAIN, "tool calls")
        print(f"\n{'template':{width}}  {'Ollama TEMPLATE':28}  " + "  ".join(f"{s:17}" for s in columns))
        for r in rows:
            print(f"{r[0]:{width}}  {r[1][:28]:28}  " + "  ".join(f"{c:17}" for c in r[2:]))
        print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    assert counts["templates"] >= 70 and counts["converted"] == counts["verbatim"] == counts["templates"]
    assert counts["all plain shapes"] >= 60  # measured: see the README; a drop is a regression
    tools = {r[0]: r[-1] for r in rows}
    assert (tools["GLM-4.6"], tools["ibm-granite-granite-3.3-2B-Instruct"]) == ("glm-4.6", "granite-3")


@pytest.mark.slow
def test_llama3_0_tutorial_flow(tiny_model, tmp_path: Path) -> None:
    """The LLaMA-Factory tutorial model's format end to end, template never named: train (auto) -> merge -> gguf ->
    verify passes; every artifact carries Meta-Llama-3-8B-Instruct's Jinja verbatim; the Modelfile TEMPLATE is the
    Llama 3.0 format (checked in real Go), its one stated difference a WARN."""
    from exporter.converters.modelfile import parse

    from exporter import pipeline

    require_llama_cpp()
    require_go()
    base = with_template(tiny_model("llama3"), LLAMA3_0, tmp_path / "base")
    verify = {"max_new_tokens": 4, "ctx": 64, "max_windows": 2}
    path = pipeline_yaml(tmp_path, base, tmp_path / "run", None, train={"max_steps": 2, "max_samples": 8},
                         gguf={"ollama_name": "t"}, verify=verify)  # fmt: skip
    res = pipeline.run(pipeline.load_config(path, []))  # no `template`: the model's own
    run = tmp_path / "run"
    doc = json.loads(res.report.read_text())
    assert res.passed, [c for c in doc["checks"] if c["status"] == "fail"]
    assert (run / "merged" / "chat_template.jinja").read_text(encoding="utf-8") == LLAMA3_0
    (path,) = (run / "gguf").glob("*.gguf")
    assert GGUFReader(path).fields["tokenizer.chat_template"].contents() == LLAMA3_0
    mf = dict((c, v) for c, v in parse((run / "gguf" / "Modelfile.f16").read_text()) if c != "parameter stop")
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    got = gotemplate.render_go(mf["template"], gotemplate.ollama_data([_u("Who are you?")], system=mf.get("system")))
    assert got == header.format("user") + "Who are you?<|eot_id|>" + header.format("assistant")  # Llama 3.0
    go = next(c for c in doc["checks"] if c["check"] == "template" and c["target"] == "Modelfile.f16")
    assert go["status"] == "warn" and "trims" in go["detail"], go
    eog = next(c for c in doc["checks"] if c["check"] == "stops" and c["target"] == path.name)
    assert eog["status"] == "pass" and "'<|eot_id|>'" in eog["detail"]
    assert json.loads((run / "adapter" / "exporter_manifest.json").read_text())["settings"]["template"] == "derived"


def test_model_without_any_template(tiny_model, tmp_path: Path) -> None:
    """No chat template at all: gguf and merge go on (no TEMPLATE, no tokenizer.chat_template, stated), calibration
    reads the raw texts, training asks for --template."""
    from transformers import AutoTokenizer

    from exporter import calibration, gguf, merge
    from exporter.errors import UserError
    from exporter.templates import resolve

    model = with_template(tiny_model("qwen2"), "", tmp_path / "m")
    (model / "chat_template.jinja").unlink()
    out = gguf.run(gguf.GGUFOptions(str(model), ["f16"], str(tmp_path / "gguf")))
    text = out.modelfiles["f16"].read_text(encoding="utf-8")
    assert "\nTEMPLATE" not in text and "# the model has no chat template" in text
    assert "tokenizer.chat_template" not in GGUFReader(out.files["f16"]).fields
    adapter = random_lora(tiny_model("qwen2"), tmp_path / "ad", r=4, target_modules=["q_proj"])
    merged = merge.merge(merge.MergeOptions(str(model), [str(adapter)], str(tmp_path / "merged"))).out
    assert not (merged / "chat_template.jinja").exists()
    with pytest.raises(UserError, match="no chat_template.*--template"):
        resolve(model, None)
    tok = AutoTokenizer.from_pretrained(model)
    cal = calibration.build(tok, resolve(model, None, need=False), None, None, samples=2, max_length=32, seed=0)
    assert len(cal.blocks) == 2 and not cal.rejected


def test_a_template_with_its_own_encoder_encodes_itself() -> None:
    """The protocol for formats that tokenize piece by piece (LLaMA-Factory's): `encode` defers to `encoder`."""
    import dataclasses

    from exporter.templates import load_template

    calls = []

    def encoder(tokenizer, messages, tools=None, train_on_prompt=False, cutoff_len=None):
        calls.append((messages, tools, train_on_prompt, cutoff_len))
        return [1, 2, 3], [-100, 2, 3]

    tpl = dataclasses.replace(load_template("qwen-2.5"), encoder=encoder)
    msgs = [_u("Hi"), _a("Hello")]
    assert encode(None, tpl, msgs, train_on_prompt=True, cutoff_len=9) == ([1, 2, 3], [-100, 2, 3])
    assert calls == [(msgs, None, True, 9)]


def test_stops_are_end_of_turn_and_eos_without_the_user_prefix() -> None:
    """A template with an end-of-turn token stops on it and on eos; the next user header is a stop only for a
    template that has no such token (stops_for)."""
    tokens = [BOS, EOT, "<|start_header_id|>", "<|end_header_id|>"]
    assert detect_template_text(LLAMA3_0, BOS, EOT, tokens).stop == [EOT]
    assert detect_template_text(LLAMA3_0, BOS, "<|end_of_text|>", tokens).stop == [EOT, "<|end_of_text|>"]
