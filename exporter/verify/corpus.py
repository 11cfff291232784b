"""The built-in texts verify checks with, shipped as data files in `exporter/verify/corpora/`.

- `tokenizer_texts.json`: languages, scripts, code, emoji, digits and whitespace edge cases (tokenizer check);
- `conversations.json`: probe conversations, each ending with an assistant turn (template and tokenizer checks);
- `prompts.json`: greedy chat prompts (chat check), after any prompts from the training data;
- `held_out.txt`: held-out prose for perplexity when neither `--text` nor data is given.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any


def _read(name: str) -> str:
    return importlib.resources.files("exporter.verify.corpora").joinpath(name).read_text(encoding="utf-8")


def _json(name: str) -> Any:
    return json.loads(_read(name))


TOKENIZER_CORPUS: list[str] = _json("tokenizer_texts.json")
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = _json("conversations.json")
CHAT_PROMPTS: list[str] = _json("prompts.json")
HELD_OUT_TEXT: str = _read("held_out.txt")
