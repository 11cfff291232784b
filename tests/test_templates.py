"""Chat-template families: the training renderer, our HF Jinja (through transformers' apply_chat_template) and our
Ollama TEMPLATE (through real Go text/template) render every conversation of a corpus byte for byte alike; the
published templates shipped with llama.cpp render it the same where we claim to match them; detection and the
token-level encoder agree with the tokenizer.

BOS: HF Jinja renders BOS as text where the family's published template does (llama-2/llama-3.1/
mistral-nemo/gemma-3/deepseek-v3, base formats); Ollama/llama.cpp add BOS at tokenization, so the Go render is compared
with the Jinja render minus that leading BOS text.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from functools import cache
from pathlib import Path

import pytest
from conftest import DENSE, FAMILIES, ROOT, TEMPLATE_OF, detected_template, fixtures_root, llama_src, require_go

from exporter.errors import UserError
from exporter.render import encode, render_segments, render_text
from exporter.templates import (
    ChatTemplate,
    detect,
    detect_template_text,
    list_templates,
    load_template,
    resolve,
    write_into,
)

ALL = list_templates()
FIXTURE_OF = {TEMPLATE_OF[f]: f for f in DENSE}  # template family -> fixture family carrying its Jinja

# tool definitions as callers write them (OpenAI style: `properties` before `required`, parameter names unsorted)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "unit": {"type": "string", "enum": ["c", "f"], "description": "c or f"},
                    "city": {"type": "string", "description": "City name"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
]
# ... and as Ollama's TEMPLATE sees them (api/types.go Tool structs, template/template.go templateTool): struct field
# order, parameter names sorted; what the tool families' notes state ("tool definitions: Ollama decodes them ...")
TOOLS_AS_OLLAMA = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "description": "c or f", "enum": ["c", "f"]},
                },
            },
        },
    },
    TOOLS[1],
]

SYS = {"role": "system", "content": "You are a helpful assistant. 请简洁回答。"}
TRICKY = (
    "Template-like text: {{ messages }} {% if x %} {# c #} <|im_end|> <|eot_id|> [INST] </s> <end_of_turn>\n"
    "second line\n\n  indented fourth line"
)


def _pairs(n: int) -> list[dict]:
    out = []
    for k in range(n):
        out += [{"role": "user", "content": f"Question {k + 1}: what is {k} + {k}?"}]
        out += [{"role": "assistant", "content": f"{k} + {k} = {2 * k}."}]
    return out


CORPUS: dict[str, list[dict]] = {
    "one_turn": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    "system_one_turn": [SYS, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    "four_turns": _pairs(4),
    "system_four_turns": [SYS, *_pairs(4)],
    "unicode_chinese": [
        {"role": "system", "content": "Réponds en français ou 中文. Ünïcödé ✓"},
        {"role": "user", "content": "Über naïve café — 你好，世界！今天天气怎么样？🎉👍🏽"},
        {"role": "assistant", "content": "今天天气很好，阳光明媚。☀️ Très bien!"},
    ],
    "empty_content": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say something."},
        {"role": "assistant", "content": "Something."},
    ],
    "template_like_multiline": [
        {"role": "system", "content": "System with {{ braces }} and {% tags %}\nover two lines"},
        {"role": "user", "content": TRICKY},
        {"role": "assistant", "content": "```jinja\n{{ x | tojson }}\n```\n<|im_end|> is just text here.\n"},
    ],
    "padded_whitespace": [
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": " answer with spaces "},
    ],
    "long": [
        {"role": "user", "content": "Summarize: " + "lorem ipsum dolor sit amet " * 120},
        {"role": "assistant", "content": "A long text. " * 60},
    ],
}

_CALL1 = {"id": "call0A1b2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
_CALL2 = {
    "id": "call3C4d5",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}},
}
TOOL_CORPUS: dict[str, list[dict]] = {
    "tool_single": [
        SYS,
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_CALL1]},
        {"role": "tool", "tool_call_id": "call0A1b2", "name": "get_weather", "content": '{"temp": 21, "sky": "sun"}'},
        {"role": "assistant", "content": "It is 21 °C and sunny in Paris."},
    ],
    "tool_after_chat": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! Ask me about the weather."},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": "", "tool_calls": [_CALL2]},
        {"role": "tool", "tool_call_id": "call3C4d5", "name": "get_weather", "content": "晴，25度"},
        {"role": "assistant", "content": "北京今天晴，25度。"},
    ],
    "tool_parallel": [
        {"role": "user", "content": "Weather in Paris and Beijing?"},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [_CALL1, _CALL2]},
        {"role": "tool", "tool_call_id": "call0A1b2", "content": "21"},
        {"role": "tool", "tool_call_id": "call3C4d5", "content": "25"},
        {"role": "assistant", "content": "Paris 21, Beijing 25."},
    ],
}
# what each tool-capable family can express: llama3 takes one call per answer, mistral needs 9-char ids (we have)
TOOL_CASES = {
    "qwen-2.5": ["tool_single", "tool_after_chat", "tool_parallel"],
    "qwen-3": ["tool_single", "tool_after_chat", "tool_parallel"],
    "llama-3.1": ["tool_single", "tool_after_chat"],
    "mistral-nemo": ["tool_single", "tool_after_chat", "tool_parallel"],
    "glm-4.6": ["tool_single", "tool_after_chat", "tool_parallel"],
    "granite-3": ["tool_single", "tool_after_chat", "tool_parallel"],
}
# families carrying a published Jinja with a hand-written Go TEMPLATE (format kind jinja): what their `notes` say Go
# prints otherwise, applied to the Jinja's text; families whose Jinja strips answers (Go cannot: whitespace may differ)
STRIPS_ANSWERS = {"glm-4.6"}


def _go_expected(family: str, text: str, tools: list[dict] | None) -> str:
    """The Jinja's text with the differences the family's notes state replaced by what Ollama prints."""
    import datetime

    compact = lambda x: json.dumps(x, ensure_ascii=False, separators=(",", ":"))  # noqa: E731
    if tools and any(n.startswith("tool definitions: Ollama decodes") for n in tpl_for(family).notes):
        assert tools == TOOLS
        spaced = lambda x: json.dumps(x, ensure_ascii=False)  # noqa: E731
        indented = lambda x: json.dumps(x, ensure_ascii=False, indent=4)  # noqa: E731
        params = lambda ts: [t["function"]["parameters"] for t in ts]  # noqa: E731
        pairs = [
            (TOOLS, TOOLS_AS_OLLAMA),
            *zip(TOOLS, TOOLS_AS_OLLAMA, strict=True),
            *zip(params(TOOLS), params(TOOLS_AS_OLLAMA), strict=True),
        ]
        for dump in (compact, spaced, indented):
            for given, seen in pairs:
                text = text.replace(dump(given), dump(seen))
        tools = TOOLS_AS_OLLAMA
    if family == "glm-4.6":
        for tool in tools or []:
            text = text.replace(json.dumps(tool, ensure_ascii=False), compact(tool))
    if family == "granite-3":
        today = datetime.date.today()
        text = text.replace(today.strftime("%B %d, %Y"), today.isoformat())
        if tools:
            text = text.replace(json.dumps(tools, indent=4), compact(tools))
    return text


REASONING = [  # qwen3: explicit reasoning_content and inline <think> blocks
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"},
]


def _alternating(conv: list[dict]) -> bool:
    loop = conv[1:] if conv[0]["role"] == "system" else conv
    return all((m["role"] == "user") == (k % 2 == 0) for k, m in enumerate(loop))


def cases(family: str) -> list[tuple[str, list[dict], list[dict] | None]]:
    """(case name, messages, tools) of the corpus that `family` can express."""
    out = [(name, conv, None) for name, conv in CORPUS.items()]
    out += [(name, TOOL_CORPUS[name], TOOLS) for name in TOOL_CASES.get(family, [])]
    if family == "qwen-3":
        out.append(("reasoning", REASONING, None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# tokenizers: the fixture's for its family; for the other families a fixture tokenizer with their special tokens


def _special_tokens(tpl: ChatTemplate) -> list[str]:
    import re

    text = tpl.jinja + tpl.ollama + "".join(tpl.eot_tokens) + "".join(tpl.stop)
    found = re.findall(r"<\|[a-z_]+\|>|<｜[^｜]+｜>|<reserved_\d+>|\[gMASK\]|<sop>|<start_of_turn>|<end_of_turn>", text)
    return sorted(set(found))


@cache
def family_tokenizer(family: str):
    """A real tokenizer object carrying the family's special tokens and our Jinja as its chat_template."""
    from conftest import build_fixture
    from transformers import AutoTokenizer

    tpl = load_template(family)
    if family in FIXTURE_OF:
        tok = AutoTokenizer.from_pretrained(str(build_fixture(FIXTURE_OF[family])))
        assert tok.chat_template == tpl.jinja, "fixture was built from another version of the template"
        return tok
    # a tokenizer that adds <s> itself (like most base models), or none when the family renders its own BOS text
    tok = AutoTokenizer.from_pretrained(str(build_fixture("llama2" if tpl.bos_token is None else "qwen2")))
    extra = [t for t in _special_tokens(tpl) if t not in (tok.bos_token, tok.eos_token)]
    tok.add_special_tokens({"additional_special_tokens": extra})
    if tpl.bos_token:
        tok.bos_token = tpl.bos_token
    if tpl.eos_token:
        tok.eos_token = tpl.eos_token
    tok.chat_template = tpl.jinja
    return tok


def tpl_for(family: str) -> ChatTemplate:
    tok = family_tokenizer(family)
    return load_template(family).for_tokenizer(tok.bos_token, tok.eos_token)


def hf_render(family: str, conv: list[dict], tools=None, **kw) -> str:
    tok = family_tokenizer(family)
    return tok.apply_chat_template(copy.deepcopy(conv), tools=tools, tokenize=False, **kw)


def _strip_bos(family: str, text: str) -> str:
    tpl = tpl_for(family)
    bos = tpl.bos_token or ""
    if tpl.format.get("bos") or family == "llama-2":
        assert text.startswith(bos), f"{family}: the Jinja render does not start with BOS {bos!r}"
        return text[len(bos) :]
    return text


# ---------------------------------------------------------------------------------------------------------------
# 1 == 2: training renderer text == transformers apply_chat_template with our Jinja


@pytest.mark.parametrize("family", ALL)
def test_training_text_equals_apply_chat_template(family: str) -> None:
    tpl = tpl_for(family)
    checked = 0
    for name, conv, tools in cases(family):
        if tpl.format.get("alternate") and not _alternating(conv):
            continue
        for n in range(1, len(conv) + 1):
            prefix = conv[:n]
            if prefix[-1]["role"] == "system":
                continue
            for gen in (False, True):
                ref = hf_render(family, prefix, tools, add_generation_prompt=gen)
                ours = render_text(tpl, prefix, tools=tools, add_generation_prompt=gen)
                if tpl.kind == "jinja" and ours != ref:  # the Jinja leaves the final answer open: training closes it
                    ref += tpl.format["close"]
                assert ours == ref, f"{family}/{name}[:{n}] gen={gen}"
                checked += 1
    assert checked >= 40


@pytest.mark.parametrize("family", ["qwen-3"])
def test_qwen3_enable_thinking_false(family: str) -> None:
    tpl = tpl_for(family)
    conv = CORPUS["system_one_turn"][:2]
    ref = hf_render(family, conv, add_generation_prompt=True, enable_thinking=False)
    assert ref.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_text(tpl, conv, add_generation_prompt=True, enable_thinking=False) == ref


def test_gemma_and_llama2_reject_non_alternating() -> None:
    conv = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for family in ("gemma-3", "llama-2"):
        with pytest.raises(UserError, match="alternate"):
            render_text(load_template(family), conv)


# ---------------------------------------------------------------------------------------------------------------
# 2 == 4: our Jinja == our Ollama TEMPLATE rendered by real Go text/template (what Ollama feeds it)


@pytest.mark.parametrize("family", ALL)
def test_go_template_equals_jinja(family: str) -> None:
    require_go()
    from exporter.gotemplate import ollama_data, render_go_many

    tpl = tpl_for(family)
    items, expected, labels = [], [], []
    for name, conv, tools in cases(family):
        if tpl.format.get("alternate") and not _alternating(conv):
            continue
        for n in range(1, len(conv) + 1):
            prefix = conv[:n]
            last = prefix[-1]
            if last["role"] == "system":
                continue
            if last["role"] == "assistant":
                # Ollama leaves a final answer open (prefill): HF's continue_final_message semantics
                if not last["content"] or last.get("tool_calls"):
                    continue
                ref = hf_render(family, prefix, tools, continue_final_message=True)
            else:
                ref = hf_render(family, prefix, tools, add_generation_prompt=True)
            items.append((tpl.ollama, ollama_data(prefix, tools, split_thinking="think" in tpl.format)))
            expected.append(_go_expected(family, _strip_bos(family, ref), tools))
            labels.append(f"{family}/{name}[:{n}]")
    got = render_go_many(items)
    for label, exp, g, (_, data) in zip(labels, expected, got, items, strict=True):
        answers = [m["content"] for m in data["Messages"] if m["role"] == "assistant"]
        if family in STRIPS_ANSWERS and any(c != c.strip() for c in answers):
            assert "".join(g.split()) == "".join(exp.split()), label
        else:
            assert g == exp, label
    assert len(items) >= 20


def test_go_qwen3_think_flag() -> None:
    require_go()
    from exporter.gotemplate import ollama_data, render_go

    tpl = tpl_for("qwen-3")
    conv = CORPUS["one_turn"][:1]
    ref = hf_render("qwen-3", conv, add_generation_prompt=True, enable_thinking=False)
    assert render_go(tpl.ollama, ollama_data(conv, think=False)) == ref
    assert render_go(tpl.ollama, ollama_data(conv, think=True)) == hf_render("qwen-3", conv, add_generation_prompt=True)


def test_go_default_system_from_modelfile() -> None:
    """Ollama prepends the Modelfile SYSTEM; qwen's template also carries the default itself: both render alike."""
    require_go()
    from exporter.gotemplate import ollama_data, render_go

    tpl = tpl_for("qwen-2.5")
    conv = CORPUS["one_turn"][:1]
    ref = hf_render("qwen-2.5", conv, add_generation_prompt=True)
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in ref
    assert render_go(tpl.ollama, ollama_data(conv)) == ref
    assert render_go(tpl.ollama, ollama_data(conv, system=tpl.default_system)) == ref


# ---------------------------------------------------------------------------------------------------------------
# token level: encode ids == tokenizer ids of the apply_chat_template text; labels on answers only


def _expected_ids(tok, text: str) -> list[int]:
    """What the tokenizer makes of the text as a prompt: its own special tokens, one BOS at most at the start."""
    ids = tok(text)["input_ids"]
    if tok.bos_token_id is not None and ids[:2] == [tok.bos_token_id, tok.bos_token_id]:
        ids = ids[1:]
    return ids


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _expected_answers(family: str, conv: list[dict], tok) -> list[str]:
    """Trained text of each answer, written from the conversation (not from our renderer)."""
    eot = {
        "qwen-2.5": "<|im_end|>",
        "qwen-3": "<|im_end|>",
        "yi-1.5": "<|im_end|>",
        "llama-3.1": "<|eot_id|>",
        "gemma-3": "<end_of_turn>",
        "phi-3": "<|end|>",
        "deepseek-v3": "<｜end▁of▁sentence｜>",
    }.get(family, tok.eos_token)
    answers = [m for m in conv if m["role"] == "assistant"]
    out = []
    for k, m in enumerate(answers):
        content = m["content"]
        if family == "qwen-3" and k == len(answers) - 1:
            content = "<think>\n\n</think>\n\n" + content
        if family in ("llama-2", "vicuna-1.1", "human-assistant"):
            content = " " + content
        if family == "llama-2":
            content += " "
        if family == "glm-4":  # answers end when the model emits the next role token; the last one with eos
            eot = "<|user|>" if k < len(answers) - 1 else tok.eos_token
        out.append(content + eot)
    # phi3's published template closes a finished conversation with eos after <|end|>: context, not a target
    # (the answer already ended with <|end|>), so it is not among the trained runs.
    return out


@pytest.mark.parametrize("family", ALL)
def test_encode_matches_tokenizer_and_masks_answers(family: str) -> None:
    tok = family_tokenizer(family)
    tpl = tpl_for(family)
    if tpl.kind == "jinja":
        pytest.skip("trains from its published Jinja: tests/test_derive.py::test_training_follows_the_models_own_jinja")
    for name, conv, tools in cases(family):
        if tpl.format.get("alternate") and not _alternating(conv):
            continue
        if tools or name == "reasoning":
            continue
        text = hf_render(family, conv)
        ids, labels = encode(tok, tpl, conv)
        assert ids == _expected_ids(tok, text), f"{family}/{name}"
        assert len(labels) == len(ids)
        if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
            assert ids[1] != tok.bos_token_id, f"{family}/{name}: double BOS"
        runs = [tok.decode(r) for r in _runs(ids, labels)]
        want = _expected_answers(family, conv, tok)
        if family == "phi-3" and len(runs) == len(want) - 1:  # <|end|> swallowed the newline before eos (rstrip)
            want = want[:-2] + [want[-2] + want[-1]]
        # empty answers merge with nothing: compare the non-empty trained texts, whitespace-exact for byte-level
        # tokenizers and modulo SentencePiece's leading-space marker otherwise
        norm = (lambda s: s) if family in ("qwen-2.5", "qwen-3", "llama-3.1") else (lambda s: "".join(s.split()))
        assert [norm(r) for r in runs] == [norm(w) for w in want if norm(w)], f"{family}/{name}"


def test_encode_train_on_prompt_and_cutoff() -> None:
    tok, tpl = family_tokenizer("qwen-2.5"), tpl_for("qwen-2.5")
    conv = CORPUS["long"]
    ids, labels = encode(tok, tpl, conv)
    ids_all, labels_all = encode(tok, tpl, conv, train_on_prompt=True)
    assert ids_all == ids and labels_all == ids
    first = next(k for k, x in enumerate(labels) if x != -100)
    assert first > 50  # the long prompt comes first
    # a cut that keeps part of the answer is a plain head cut
    cut_ids, cut_labels = encode(tok, tpl, conv, cutoff_len=first + 5)
    assert cut_ids == ids[: first + 5] and cut_labels == labels[: first + 5]
    # a cut that would drop every answer token keeps a window ending inside the answer instead
    cut_ids, cut_labels = encode(tok, tpl, conv, cutoff_len=20)
    assert len(cut_ids) == 20 and any(x != -100 for x in cut_labels)
    assert cut_ids == ids[first + 10 - 20 : first + 10]
    assert encode(tok, tpl, conv, cutoff_len=10**6) == (ids, labels)
    with pytest.raises(UserError):
        encode(tok, tpl, conv, cutoff_len=1)


def test_encode_cutoff_keeps_bos() -> None:
    tok, tpl = family_tokenizer("llama-3.1"), tpl_for("llama-3.1")
    conv = CORPUS["long"]
    ids, labels = encode(tok, tpl, conv)
    cut_ids, cut_labels = encode(tok, tpl, conv, cutoff_len=16)
    assert len(cut_ids) == 16 and cut_ids[0] == tok.bos_token_id and cut_labels[0] == -100
    assert any(x != -100 for x in cut_labels)


def test_encode_bos_exactly_once() -> None:
    """Template renders BOS text (llama3) -> one BOS; template renders none but the tokenizer adds one (phi3, like
    llama.cpp at inference) -> one BOS prepended; no BOS anywhere (qwen) -> none."""
    conv = CORPUS["one_turn"]
    for family, want in (("llama-3.1", 1), ("gemma-3", 1), ("mistral-nemo", 1), ("phi-3", 1), ("qwen-2.5", 0)):
        tok = family_tokenizer(family)
        ids, labels = encode(tok, tpl_for(family), conv)
        bos = tok.bos_token_id
        assert (ids.count(bos) if bos is not None else 0) == want, family
        if want:
            assert ids[0] == bos and labels[0] == -100


# ---------------------------------------------------------------------------------------------------------------
# real vocabularies (llama.cpp's ggml-vocab-*.gguf rebuilt by transformers; cached after the first conversion)

REAL_VOCAB = {
    "llama-2": "llama-spm",
    "mistral-nemo": "llama-spm",
    "phi-3": "phi-3",
    "qwen-2.5": "qwen2",
    "qwen-3": "qwen2",
    "llama-3.1": "llama-bpe",
    # gemma: transformers 5.23 cannot rebuild a tokenizer from ggml-vocab-gemma-4.gguf (config validation error)
}


@cache
def real_tokenizer(vocab: str):
    import transformers
    from transformers import AutoTokenizer

    # keyed by transformers version only (not by the template files, unlike the model fixtures): conversion is slow
    cached = fixtures_root().parent / f"vocab-{vocab}-transformers-{transformers.__version__}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    models = llama_src() / "vendor" / "llama.cpp" / "models"
    tok = AutoTokenizer.from_pretrained(str(models), gguf_file=f"ggml-vocab-{vocab}.gguf")
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, cached)
    except OSError:  # another session finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(cached))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(REAL_VOCAB))
def test_encode_real_vocabulary(family: str) -> None:
    llama_src()
    tok = real_tokenizer(REAL_VOCAB[family])
    tpl = load_template(family)
    tok.chat_template = tpl.jinja
    tpl = tpl.for_tokenizer(tok.bos_token, tok.eos_token)
    for name in ("system_four_turns", "unicode_chinese", "template_like_multiline"):
        conv = CORPUS[name]
        text = tok.apply_chat_template(copy.deepcopy(conv), tokenize=False, bos_token=tpl.bos_token or tok.bos_token)
        assert render_text(tpl, conv) == text
        ids, labels = encode(tok, tpl, conv)
        assert ids == _expected_ids(tok, text), f"{family}/{name}"
        answers = sum(m["role"] == "assistant" for m in conv)
        assert len(_runs(ids, labels)) in (answers, answers + (family == "phi-3")), f"{family}/{name}"


# ---------------------------------------------------------------------------------------------------------------
# published templates (llama.cpp's models/templates, read at test time) render our corpus identically


def _published(name: str) -> str:
    path = llama_src() / "vendor" / "llama.cpp" / "models" / "templates" / f"{name}.jinja"
    assert path.is_file(), path
    return path.read_text(encoding="utf-8")


def _no_padding(conv: list[dict]) -> bool:
    return all(m["content"] == m["content"].strip() for m in conv)


def _no_system(conv: list[dict]) -> bool:
    return all(m["role"] != "system" for m in conv)


# (family, published template, which prefixes must render identically: why ours differs elsewhere)
PUBLISHED = [
    ("qwen-2.5", "Qwen-Qwen2.5-7B-Instruct", lambda c, gen: True),
    ("qwen-3", "Qwen-Qwen3-0.6B", lambda c, gen: True),
    # Llama 3.x and Gemma trim content; Ollama cannot trim, so ours keeps whitespace as given
    ("llama-3.1", "meta-llama-Llama-3.1-8B-Instruct", lambda c, gen: _no_padding(c)),
    ("llama-3.1", "meta-llama-Llama-3.3-70B-Instruct", lambda c, gen: _no_padding(c)),
    # Gemma 2 rejects system messages; ours folds them into the first user turn (Gemma 3)
    ("gemma-3", "google-gemma-2-2b-it", lambda c, gen: _no_padding(c) and _no_system(c)),
    ("phi-3", "microsoft-Phi-3.5-mini-instruct", lambda c, gen: True),
    # Nemo puts the system prompt into the final message only when it is a user message; ours always uses the last
    # user message, so a training conversation keeps its system prompt
    ("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407", lambda c, gen: _no_system(c) or c[-1]["role"] == "user"),
    # R1 distills force "<think>\n" into the generation prompt; complete conversations match
    ("deepseek-v3", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", lambda c, gen: not gen),
    ("deepseek-v3", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", lambda c, gen: not gen),
]


@pytest.mark.parametrize(("family", "published", "claim"), PUBLISHED, ids=[p[1] for p in PUBLISHED])
def test_matches_published_template(family: str, published: str, claim) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    reference = _published(published)
    tpl = tpl_for(family)
    compared = 0
    for name, conv, tools in cases(family):
        if tools or (family in ("gemma-3",) and not _alternating(conv)):
            continue  # tool JSON: ours is compact (Ollama's `json`), published ones use Python's spaced dumps
        for n in range(1, len(conv) + 1):
            prefix = conv[:n]
            if prefix[-1]["role"] == "system":
                continue
            gen = prefix[-1]["role"] == "user"
            if not claim(prefix, gen):
                continue
            kw = {"bos_token": tpl.bos_token or "", "eos_token": tpl.eos_token or "", "add_generation_prompt": gen}
            ref, _ = render_jinja_template(conversations=[copy.deepcopy(prefix)], chat_template=reference, **kw)
            ours, _ = render_jinja_template(conversations=[copy.deepcopy(prefix)], chat_template=tpl.jinja, **kw)
            assert ours[0] == ref[0], f"{family} vs {published}: {name}[:{n}]"
            compared += 1
    assert compared >= 10


TOOL_PUBLISHED = [
    ("qwen-2.5", "Qwen-Qwen2.5-7B-Instruct", ["tool_single", "tool_after_chat", "tool_parallel"]),
    ("qwen-3", "Qwen-Qwen3-0.6B", ["tool_single", "tool_after_chat", "tool_parallel"]),
    ("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407", ["tool_after_chat", "tool_parallel"]),
]


@pytest.mark.parametrize(("family", "published", "names"), TOOL_PUBLISHED, ids=[p[0] for p in TOOL_PUBLISHED])
def test_tool_turns_match_published_up_to_json_spacing(family: str, published: str, names: list[str]) -> None:
    """Tool turns lay out like the published template; only JSON spacing differs (ours is compact, as Ollama's
    `json` prints it). llama3 is left out: its published template also JSON-quotes string tool results."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tpl = tpl_for(family)
    for name in names:
        conv = TOOL_CORPUS[name]
        for gen, msgs in ((False, conv), (True, conv[:-1])):
            kw = {"bos_token": tpl.bos_token or "", "eos_token": tpl.eos_token or "", "add_generation_prompt": gen}
            ref = render_jinja_template(
                conversations=[copy.deepcopy(msgs)], chat_template=_published(published), tools=TOOLS, **kw
            )
            ours = render_jinja_template(
                conversations=[copy.deepcopy(msgs)], chat_template=tpl.jinja, tools=TOOLS, **kw
            )
            assert ours[0][0] != ref[0][0]  # the JSON spacing really differs
            assert "".join(ours[0][0].split()) == "".join(ref[0][0].split()), f"{family}/{name} gen={gen}"


def test_known_differences_from_published_are_real() -> None:
    """The exclusions above are real differences (so the claims are not vacuous)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def both(family: str, published: str, conv: list[dict], gen: bool) -> tuple[str, str]:
        tpl = tpl_for(family)
        kw = {"bos_token": tpl.bos_token or "", "eos_token": tpl.eos_token or "", "add_generation_prompt": gen}
        a = render_jinja_template(conversations=[conv], chat_template=_published(published), **kw)[0][0]
        b = render_jinja_template(conversations=[conv], chat_template=tpl.jinja, **kw)[0][0]
        return a, b

    a, b = both("llama-3.1", "meta-llama-Llama-3.1-8B-Instruct", CORPUS["padded_whitespace"], False)
    assert a != b and "  leading" in b and "  leading" not in a
    a, b = both("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407", CORPUS["system_one_turn"], False)
    assert SYS["content"] not in a and SYS["content"] in b


# ---------------------------------------------------------------------------------------------------------------
# detection by content


@pytest.mark.parametrize("fixture", FAMILIES)
def test_detect_fixture_models(fixture: str, tiny_model) -> None:
    """A fixture carrying one of our families' Jinja detects as that family; one carrying its model's published
    Jinja (Qwen3, Gemma 2, Mistral Nemo, GLM-4.6, Granite 3.3, SmolLM3) as derived from it, kept verbatim."""
    model = tiny_model(fixture)
    tpl = detect(model)
    assert tpl.name == detected_template(fixture)
    assert tpl.jinja == (model / "chat_template.jinja").read_text(encoding="utf-8") and tpl.ollama


# published template -> (detected name, whose Go TEMPLATE, bos, eos): a family only where every probe (whitespace,
# unicode, tool calls included) renders exactly alike; else derived, with a family's Go TEMPLATE where that renders
# at least as many shapes like the Jinja in Go and has the same tool format up to JSON spacing
DETECTS = {
    "Qwen-Qwen2.5-7B-Instruct": ("derived", "qwen-2.5", "", "<|im_end|>"),  # tool JSON spacing
    "Qwen-Qwen3-0.6B": ("derived", "qwen-3", "", "<|im_end|>"),  # tool JSON spacing
    "meta-llama-Llama-3.1-8B-Instruct": ("derived", "derived", "<|begin_of_text|>", "<|eot_id|>"),  # trims
    "meta-llama-Llama-3.3-70B-Instruct": ("derived", "derived", "<|begin_of_text|>", "<|eot_id|>"),
    "google-gemma-2-2b-it": ("derived", "gemma-3", "<bos>", "<eos>"),  # trims, refuses system messages
    "microsoft-Phi-3.5-mini-instruct": ("phi-3", None, "<s>", "<|endoftext|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("derived", "mistral-nemo", "<s>", "</s>"),  # tool JSON spacing
}


@pytest.mark.parametrize("published", sorted(DETECTS))
def test_detect_published_templates(published: str, tmp_path: Path) -> None:
    name, go, bos, eos = DETECTS[published]
    cfg = {"chat_template": _published(published), "bos_token": bos, "eos_token": eos}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tpl = detect(tmp_path)
    assert (tpl.name, tpl.format.get("go")) == (name, go)
    assert tpl.jinja == _published(published)  # the model's own Jinja, whatever renders the Go side
    if go not in (None, "derived"):
        assert tpl.ollama == load_template(go).for_tokenizer(bos or None, eos or None).ollama
    assert resolve(tmp_path, None).name == name
    assert resolve(tmp_path, "yi-1.5").name == "yi-1.5"  # the override wins


@pytest.mark.parametrize(
    ("published", "bos", "eos", "nearest", "differs"),
    [
        ("openai-gpt-oss-120b", "<|startoftext|>", "<|return|>", None, []),
        ("meta-llama-Llama-3.2-3B-Instruct", "<|begin_of_text|>", "<|eot_id|>", "llama-3.1", ["user"]),  # today's date
        ("Qwen-QwQ-32B", "", "<|im_end|>", None, []),
    ],
)
def test_detect_unknown_published_template_derives(published, bos, eos, nearest, differs, tmp_path) -> None:
    (tmp_path / "chat_template.jinja").write_text(_published(published), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    tpl = detect(tmp_path)
    assert tpl.name == "derived" and tpl.jinja == _published(published) and tpl.ollama
    assert any(re.match(r"nearest family is '([\w.-]+)'.*differs at char \d+", n) for n in tpl.notes)
    if nearest:
        assert any(f"nearest family is {nearest!r}" in n for n in tpl.notes)
    assert set(differs) <= set(tpl.format["differ"])
    if "user" in differs:  # Llama 3.2 prints today's date as "01 Dec 2026"; Ollama's currentDate is YYYY-MM-DD
        assert "{{ currentDate }}" in tpl.ollama and any("'%d %b %Y'" in n for n in tpl.notes)


def test_detect_near_miss_names_nearest_and_diff() -> None:
    chatml_other_default = load_template("qwen-2.5").jinja.replace(
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "You are a helpful assistant."
    )
    tpl = detect_template_text(chatml_other_default, "", "<|im_end|>")
    msg = "\n".join(tpl.notes)
    assert tpl.name == "derived" and tpl.default_system == "You are a helpful assistant."
    assert "nearest family is 'qwen-2.5'" in msg and "differs at char 27 of probe 0" in msg
    assert "model renders 'a helpful assistant.<|im_end|>" in msg and "qwen-2.5 renders 'Qwen, created by" in msg


def test_detect_without_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(UserError, match="no chat_template"):
        detect(tmp_path)
    with pytest.raises(UserError, match="no chat_template"):
        resolve(tmp_path, None)  # training needs a template
    none = resolve(tmp_path, None, need=False)  # merge, quantize and gguf go on without one
    assert (none.name, none.jinja, none.ollama, none.stop) == ("none", "", "", ["</s>"])


def test_detect_every_family_detects_itself() -> None:
    for family in ALL:
        tpl = load_template(family).for_tokenizer("<s>", "</s>")
        got = detect_template_text(tpl.jinja, tpl.bos_token or "", tpl.eos_token or "")
        if tpl.kind == "jinja":  # a published Jinja: derived from, with this family's Go TEMPLATE picked by rendering
            assert (got.name, got.format["go"], got.ollama) == ("derived", family, tpl.ollama), got.notes
            assert all(n in got.notes for n in tpl.notes)
            assert any(f"tool calls: in family {family}'s format" in n for n in got.notes) == tpl.tools
        else:
            assert got.name == family


# ---------------------------------------------------------------------------------------------------------------
# family data, write_into


def test_load_template_unknown_suggests() -> None:
    with pytest.raises(UserError, match="did you mean 'qwen-3'"):
        load_template("qwen-3.0")
    with pytest.raises(UserError, match="did you mean 'qwen3'.*LLaMA-Factory names: .*qwen3_nothink"):
        load_template("qwen_3")


@pytest.mark.parametrize("family", ALL)
def test_family_data_is_consistent(family: str) -> None:
    tpl = load_template(family)
    assert tpl.name == family and tpl.jinja and tpl.ollama and tpl.stop and tpl.eot_tokens
    assert all(isinstance(s, str) and s for s in tpl.stop)
    filled = tpl.for_tokenizer("<s>", "</s>")
    # every end-of-turn token appears in what the templates render after an answer
    segs = render_segments(filled, CORPUS["four_turns"])
    trained = "".join(t for t, tr in segs if tr)
    for eot in filled.eot_tokens:
        if eot != "<|observation|>":  # glm4: ends answers before tool results, which the corpus has none of
            assert eot in trained or eot in "".join(t for t, _ in segs), (family, eot)
    assert "{eos_token}" not in filled.ollama
    # the never-ending-answer trap: every end-of-turn token is also a Modelfile stop
    assert set(filled.eot_tokens) <= set(filled.stop), (family, filled.eot_tokens, filled.stop)


def test_write_into(tiny_model, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = Path(shutil.copytree(tiny_model("qwen2"), tmp_path / "m"))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "chat_template.jinja").write_text("{{ messages }}")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "do_sample": False}))
    write_into(out, load_template("qwen-2.5"))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == load_template("qwen-2.5").jinja
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == load_template("qwen-2.5").jinja
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [5, tok.convert_tokens_to_ids("<|im_end|>")] and gen["do_sample"] is False
    # a family whose end-of-turn token the tokenizer lacks: error, nothing changed
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="<end_of_turn>"):
        write_into(out, load_template("gemma-3"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_write_into_base_format_uses_tokenizer_eos(tiny_model, tmp_path: Path) -> None:
    out = Path(shutil.copytree(tiny_model("llama2"), tmp_path / "m"))
    (out / "generation_config.json").unlink(missing_ok=True)
    write_into(out, load_template("stanford-alpaca"))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2  # </s>
    assert resolve(out, None).name == "stanford-alpaca"
    assert resolve(out, None).eot_tokens == ["</s>"]


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "exporter", "template", *args], capture_output=True, text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def test_cli(tiny_model, tmp_path: Path) -> None:
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"messages": CORPUS["system_one_turn"]}, ensure_ascii=False), encoding="utf-8")
    rc, out, _ = _cli("list")
    assert rc == 0 and all(f in out for f in ALL)
    rc, out, _ = _cli("show", "llama-3.1")
    assert rc == 0 and out.rstrip("\n") == load_template("llama-3.1").jinja
    rc, out, _ = _cli("show", "qwen-2.5", "--format", "ollama")
    assert rc == 0 and 'PARAMETER stop "<|im_end|>"' in out and out.startswith('TEMPLATE """')
    rc, out, _ = _cli("render", "qwen-2.5", str(conv))
    assert rc == 0 and out == hf_render("qwen-2.5", CORPUS["system_one_turn"])
    rc, out, _ = _cli("render", "qwen-2.5", str(conv), "--format", "jinja")
    assert rc == 0 and out == hf_render("qwen-2.5", CORPUS["system_one_turn"])
    rc, out, _ = _cli("detect", str(tiny_model("gemma3")))
    assert rc == 0 and out.splitlines()[0] == "gemma-3" and "renders every probe exactly like family 'gemma-3'" in out
    if shutil.which("go"):
        rc, out, _ = _cli("render", "qwen-2.5", str(conv), "--format", "ollama")
        assert rc == 0 and out == hf_render("qwen-2.5", CORPUS["system_one_turn"], continue_final_message=True)
    for bad in (("show", "qwen4"), ("render", "qwen-2.5", str(tmp_path / "missing.json")), ("detect", str(tmp_path))):
        rc, _, err = _cli(*bad)
        assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, bad
