"""Named chat templates (tokenizer_config `chat_template` as a list): the GGUF holds each as llama.cpp's converter
writes them, read back by gguf-py and by llama.cpp (llama-cpp-python's metadata)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import require_llama_cpp
from gguf import GGUFReader

from exporter import gguf

DEFAULT = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
TOOL_USE = "{{ tools | tojson }}" + DEFAULT
RAG = "RAG " + DEFAULT


def _model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = [{"name": "default", "template": DEFAULT}, {"name": "tool_use", "template": TOOL_USE},
                            {"name": "rag", "template": RAG}]  # fmt: skip
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def _field(reader: GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_named_chat_templates_are_written(tiny_model, tmp_path: Path) -> None:
    model = _model(tiny_model("qwen2"), tmp_path / "m")
    out = gguf.run(gguf.GGUFOptions(str(model), ["f16"], str(tmp_path / "g")))
    reader = GGUFReader(out.files["f16"])
    assert _field(reader, "tokenizer.chat_template") == DEFAULT
    assert _field(reader, "tokenizer.chat_template.tool_use") == TOOL_USE
    assert _field(reader, "tokenizer.chat_template.rag") == RAG
    assert _field(reader, "tokenizer.chat_templates") == ["tool_use", "rag"]
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(out.files["f16"]), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == DEFAULT
    assert llm.metadata["tokenizer.chat_template.tool_use"] == TOOL_USE
    # --template replaces the default: the model's other named templates do not go with it
    out = gguf.run(gguf.GGUFOptions(str(model), ["f16"], str(tmp_path / "g2"), template="qwen-2.5"))
    reader = GGUFReader(out.files["f16"])
    assert "tokenizer.chat_template" in reader.fields and "tokenizer.chat_templates" not in reader.fields
