"""LLaMA-Factory template names mean LLaMA-Factory's formats: ids, labels, eos, stop ids and Jinja identical to
LLaMA-Factory 0.9.5's own encoding, run in its reference venv ($EXPORTER_LF_PYTHON, scripts/setup_lf.sh).

Every LF name runs on tokenizers of four kinds (SentencePiece llama2, byte-level BPE llama3 and qwen2, gemma3),
each carrying the special tokens of every format's markers, over a corpus with system prompts, multi-turn,
unicode, empty system and content, tool calls (single, parallel, with text around them), thoughts, braces and
quotes, and LF's data arguments (train_on_prompt, mask_history, cutoff_len, enable_thinking, default_system,
tool_format). The test prints a names x tokenizers table.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, build_fixture, lf_python

from exporter import lf_templates

# The template names the issue lists (every one exists in LLaMA-Factory 0.9.5).
LF_NAMES = (
    "llama2 llama3 llama4 mistral mistral_small ministral qwen qwen3 qwen3_nothink qwen3_5 qwen3_5_nothink chatml "
    "yi gemma gemma2 gemma3 glm4 deepseek deepseek3 deepseekr1 phi phi4 phi4_mini cohere gpt_oss granite3 granite4 "
    "smollm smollm2 olmo openchat zephyr intern2 alpaca vicuna default empty"
).split()
BASES = ("llama2", "llama3", "qwen2", "gemma3")
# the markers that are special tokens in the real models of these formats
MARKERS = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|header_start|>", "<|header_end|>",
    "<|eot|>", "<|eom|>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
    "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<|im_start|>", "<|im_end|>",
    "<|im_sep|>", "<start_of_turn>", "<end_of_turn>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>",
    "<|observation|>", "<|end|>", "<|tool|>", "<|/tool|>", "<｜User｜>", "<｜Assistant｜>", "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|start|>", "<|message|>",
    "<|channel|>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|endoftext|>",
]  # fmt: skip

TOOLS = json.dumps(
    [
        {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["city"],
            },
        },
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    ],
    ensure_ascii=False,
)
CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TWO_CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'


def _u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# (id, messages, system, tools): LF's roles, alternating, ending with the answer
CORPUS: list[tuple[str, list[dict[str, str]], str, str]] = [
    ("system", [_u("Hello!"), _a("Hi there. How can I help?")], "You are a helpful assistant.", ""),
    ("multi", [_u(" What is 2+2?\n"), _a("4"), _u("And 3+3?"), _a(" 6 \n"), _u("Bye"), _a("Bye!")], "", ""),
    ("unicode", [_u("Größe? 😀 naïve café — 日本語"), _a("答案：42 ✓")], "你是一个乐于助人的助手。", ""),
    ("empty", [_u(""), _a("Okay."), _u("Thanks"), _a("")], "", ""),
    ("placeholder", [_u("Describe <image> and <video>."), _a("No media here.")], "", ""),
    ("braces", [_u("Say {{content}} and {{idx}} 'quoted'"), _a("{{content}} it's {x}")], "Use 'quotes'.", ""),
    (
        "tools",
        [
            _u("Weather in Paris?"),
            {"role": "function", "content": CALL},
            {"role": "observation", "content": '{"temp": 21}'},
            _a("It is 21 °C in Paris."),
        ],
        "",
        TOOLS,
    ),
    (
        "tools_parallel",
        [
            _u("Weather and time?"),
            {"role": "function", "content": "I will check.<tool_call>" + TWO_CALLS + "</tool_call>"},
            {"role": "observation", "content": "21 °C; 10:00"},
            _a("21 °C at 10:00."),
        ],
        "Be brief.",
        TOOLS,
    ),
    (
        "think",
        [_u("2+2?"), _a("<think>\nEasy.\n</think>\n\n4"), _u("3+3?"), _a("6")],
        "",
        "",
    ),
    (
        "think_tool",
        [
            _u("Weather?"),
            {"role": "function", "content": "<think>\nNeed the tool.\n</think>\n\n" + CALL},
            {"role": "observation", "content": "sunny"},
            _a("Sunny."),
        ],
        "",
        TOOLS,
    ),
]
VARIANTS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("", {}, tuple(c[0] for c in CORPUS)),
    ("train_on_prompt", {"train_on_prompt": True}, ("multi", "tools")),
    ("mask_history", {"mask_history": True}, ("multi", "think")),
    ("cutoff_len=20", {"cutoff_len": 20}, ("multi", "unicode", "tools")),
    ("no_thinking", {"enable_thinking": False}, ("think", "multi")),
    ("default_system", {"default_system": "Custom 'system'."}, ("multi",)),
    ("tool_format=qwen", {"tool_format": "qwen"}, ("tools",)),
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each base fixture's tokenizer with every marker as a special token and no chat template of its own (so
    LF generates its Jinja for every name, which is then compared too)."""
    from transformers import AutoTokenizer

    out = {}
    for base in BASES:
        tok = AutoTokenizer.from_pretrained(build_fixture(base))
        tok.add_tokens([m for m in MARKERS if m not in tok.get_vocab()], special_tokens=True)
        tok.chat_template = None
        d = tmp_path_factory.mktemp(f"tok-{base}")
        tok.save_pretrained(d)
        for f in ("chat_template.jinja",):
            (d / f).unlink(missing_ok=True)
        out[base] = d
    return out


def _cases() -> list[tuple[str, dict[str, Any], tuple[str, list[dict[str, str]], str, str]]]:
    by_id = {c[0]: c for c in CORPUS}
    return [(label, args, by_id[cid]) for label, args, cids in VARIANTS for cid in cids]


def _ours(tok_dir: Path, name: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, use_fast=True, split_special_tokens=False, padding_side="right")
    tpl = lf_templates.load(name)
    new = lf_templates.fix_tokenizer(tok, tpl)
    result: dict[str, Any] = {
        "chat_template": lf_templates.chat_template_for(tpl, tok),
        "eos_token": tok.eos_token,
        "stop_ids": lf_templates.stop_token_ids(tpl, tok),
        "new_tokens": new,
        "cases": [],
    }
    for _, args, (_, messages, system, tools) in _cases():
        try:
            ids, labels = lf_templates.encode(tok, tpl, messages, system, tools, lf_templates.LFOptions(**args))
            result["cases"].append({"input_ids": ids, "labels": labels})
        except Exception as e:
            result["cases"].append({"error": f"{type(e).__name__}: {e}"})
    return result


def _reference(tokenizer_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    groups = []
    for name in LF_NAMES:
        for base in BASES:
            cases = [
                {"prompt": m[:-1], "response": m[-1:], "system": s, "tools": t, "data_args": args}
                for _, args, (_, m, s, t) in _cases()
            ]
            groups.append({"template": name, "tokenizer": str(tokenizer_dirs[base]), "cases": cases})
    proc = subprocess.run(
        [lf_python(), str(ROOT / "tests" / "lf_reference.py")],
        input=json.dumps({"groups": groups}),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _first_diff(ours: dict[str, Any], ref: dict[str, Any]) -> str | None:
    if "error" in ours or "error" in ref:
        return None if ("error" in ours) == ("error" in ref) else f"ours {ours.get('error')} / LF {ref.get('error')}"
    for key in ("input_ids", "labels"):
        a, b = ours[key], ref[key]
        if a != b:
            k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            return f"{key} differ at {k}: ours {a[k : k + 6]} LF {b[k : k + 6]} (lengths {len(a)}/{len(b)})"
    return None


@pytest.mark.slow
def test_lf_names_reproduce_llamafactory(tokenizer_dirs: dict[str, Path]) -> None:
    reference = _reference(tokenizer_dirs)
    cases = _cases()
    failures, rows = [], []
    it = iter(reference)
    for name in LF_NAMES:
        row = [name]
        for base in BASES:
            ref, ours = next(it), _ours(tokenizer_dirs[base], name)
            bad = [
                f"{name}/{base}: {key} ours {ours[key]!r} LF {ref[key]!r}"
                for key in ("chat_template", "eos_token", "stop_ids")
                if ours[key] != ref[key]
            ]
            for (label, _, (cid, *_)), o, r in zip(cases, ours["cases"], ref["cases"], strict=True):
                diff = _first_diff(o, r)
                if diff:
                    bad.append(f"{name}/{base} {cid} {label}: {diff}")
            errors = sum("error" in r for r in ref["cases"])
            row.append(("ok" if not bad else f"{len(bad)} DIFF") + (f" ({errors} refused)" if errors else ""))
            failures += bad
        rows.append(row)
    width = max(len(n) for n in LF_NAMES)
    print(f"\n{'LF name':<{width}}  " + "  ".join(f"{b:<18}" for b in BASES))
    for row in rows:
        print(f"{row[0]:<{width}}  " + "  ".join(f"{c:<18}" for c in row[1:]))
    n = len(LF_NAMES) * len(BASES)
    print(f"{n - len({f.split(':')[0].split()[0] for f in failures})}/{n} name x tokenizer pairs identical, "
          f"{len(cases)} examples each")  # fmt: skip
    assert not failures, "\n".join(failures[:40])


def test_every_listed_name_is_in_the_table() -> None:
    assert sorted(LF_NAMES) == lf_templates.names()
