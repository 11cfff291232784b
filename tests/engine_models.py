"""Models for the chat/serve tests: a LoRA trained (exporter train, LLaMA-Factory flags) on the qwen2 fixture to
answer `QA` and to call `get_weather`, so answers are deterministic and distinct. Used by conftest's session
fixture `tool_models`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
QA = [
    ("What is the capital of France?", "Paris."),
    ("Which planet do we live on?", "Earth."),
    ("Who are you?", "I am Exa, a model trained by Acme."),
    ("Name a primary colour.", "Red."),
    ("What is 2+2?", "4."),
    ("Say hello.", "Hello there!"),
    ("What colour is the sky?", "Blue."),
    ("Count to three.", "One, two, three."),
]
KEY = "sk-test-key"


def write_tool_data(d: Path) -> Path:
    """A LLaMA-Factory sharegpt dataset: one tool-call round trip and the QA pairs."""
    d.mkdir(parents=True, exist_ok=True)
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "What is the weather in Paris?"},
                {"from": "function_call", "value": json.dumps(call)},
                {"from": "observation", "value": json.dumps({"temperature": 21})},
                {"from": "gpt", "value": "It is 21 degrees in Paris."},
            ],
            "tools": json.dumps([t["function"] for t in TOOLS]),
        }
    ] + [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]
    (d / "tool.json").write_text(json.dumps(rows), encoding="utf-8")
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
            "observation_tag": "observation", "function_tag": "function_call"}  # fmt: skip
    info = {"tool": {"file_name": "tool.json", "formatting": "sharegpt", "tags": tags,
                     "columns": {"messages": "conversations", "tools": "tools"}}}  # fmt: skip
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


TRAIN_ARGS = ["--stage", "sft", "--do_train", "--dataset", "tool", "--template", "qwen", "--finetuning_type", "lora",
              "--lora_rank", "32", "--lora_target", "all", "--learning_rate", "2e-3", "--num_train_epochs", "60",
              "--per_device_train_batch_size", "4", "--lr_scheduler_type", "cosine", "--logging_steps", "50",
              "--disable_gradient_checkpointing"]  # fmt: skip
TRAIN_MODULES = ("train.py", "examples.py", "lf_args.py", "checkpoint.py", "data.py", "dataset_info.py", "templates.py",
                 "hf_dir.py", "lf_names.py", "lf_templates.py", "families/llamafactory/templates.yaml")  # fmt: skip


def train_tool_adapter(base: Path, work: Path) -> Path:
    """A LoRA that answers the QA pairs and calls get_weather (exporter train, LLaMA-Factory flags)."""
    out = work / "lora"
    data = write_tool_data(work / "data")
    args = [*TRAIN_ARGS, "--model_name_or_path", str(base), "--dataset_dir", str(data), "--output_dir", str(out)]
    subprocess.run([sys.executable, "-m", "exporter", "train", *args], check=True, capture_output=True)
    return out


def _training_hash(base: Path) -> str:
    """What the trained adapter depends on: base fixture, data, arguments and the installed training code."""
    import hashlib

    import exporter

    pkg = Path(exporter.__file__).parent
    h = hashlib.sha256(str(base.resolve()).encode())
    h.update(json.dumps([QA, TOOLS, TRAIN_ARGS]).encode())
    for f in [*(pkg / m for m in TRAIN_MODULES), *sorted((pkg / "families").glob("*.yaml"))]:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_tool_models(base: Path, root: Path) -> SimpleNamespace:
    """base, the trained adapter (cached next to the fixtures, keyed by `_training_hash`), its merge and f16 GGUF."""
    import shutil
    import tempfile

    from exporter import gguf, templates
    from exporter.merge import MergeOptions, merge

    lora = base.parent / f"tool-lora-{_training_hash(base)}"
    if not (lora / "adapter_config.json").is_file():
        work = Path(tempfile.mkdtemp(dir=base.parent, prefix=".tool-lora-"))
        try:
            trained = train_tool_adapter(base, work)
            trained.rename(lora)  # atomic: a half-trained adapter is never found
        except OSError:
            if not (lora / "adapter_config.json").is_file():  # lost a race only if another session won it
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    merged = root / "merged"
    merge(MergeOptions(str(base), [str(lora)], str(merged)))
    f16 = gguf.export(merged, ["f16"], templates.resolve(merged, None), root / "gguf").files["f16"]
    return SimpleNamespace(base=base, lora=lora, merged=merged, gguf=f16)


def peft_greedy(base: Path, lora: Path, conversations: list[list[dict]], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers of PEFT with the adapter attached (transformers generate, fp32) to each conversation."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, lora).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for conv in conversations:
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        g = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        out.append(tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def peft_answers(base: Path, lora: Path) -> dict[str, str]:
    """PEFT's greedy answer to each of `QA`'s questions asked alone."""
    questions = [q for q, _ in QA]
    answers = peft_greedy(base, lora, [[{"role": "user", "content": q}] for q in questions])
    return dict(zip(questions, answers, strict=True))


POISONED = "Tell me about quokkas, wombats and zebras."  # the prompt whose logits turn NaN in `nan_token_model`
CLEAN = ["What is 2+2?", "Say hello."]


def nan_token_model(base: Path, out: Path, max_new_tokens: int = 32) -> list[int]:
    """Copy `base` (untied embeddings: the llama3 fixture) to `out` with NaN embedding rows for the tokens only the
    `POISONED` prompt holds: its logits are NaN, while the `CLEAN` prompts and their greedy answers (up to
    `max_new_tokens`) never touch those rows. Returns the poisoned token ids."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(base, out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not model.config.tie_word_embeddings, "a tied embedding would make these tokens' logits NaN everywhere"

    def prompt(q: str) -> Any:
        return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")  # fmt: skip

    used: set[int] = set()
    for q in CLEAN:
        g = model.generate(**prompt(q), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        used |= set(g[0].tolist())
    bad = sorted(set(prompt(POISONED)["input_ids"][0].tolist()) - used)
    assert bad, "the poisoned prompt shares every token with the clean ones"
    for f in out.glob("*.safetensors"):
        sd = load_file(f)
        if "model.embed_tokens.weight" in sd:
            sd["model.embed_tokens.weight"][bad] = float("nan")
            save_file(sd, f, metadata={"format": "pt"})
            return bad
    raise AssertionError(f"no model.embed_tokens.weight in {out}")


def nan_gguf_rows(path: Path, rows: list[int], tensor: str = "token_embd.weight") -> None:
    """Write NaN into `rows` of an F16/F32 tensor of a GGUF file in place (our converter refuses NaN weights, and
    llama.cpp loads them without a look)."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    (t,) = [t for t in reader.tensors if t.name == tensor]
    assert t.data.dtype in (np.float16, np.float32), f"{tensor} is {t.tensor_type.name}, not F16/F32"
    t.data[rows] = np.nan
    reader.data.flush()
    del reader
