"""Check 3, tokenizer: HF ids == GGUF (llama.cpp) ids on the built-in multilingual corpus, the data texts (with the
tokenizer's own BOS/EOS) and rendered chats (special tokens parsed)."""

from __future__ import annotations

from typing import Any

from exporter.diff import first_diff
from exporter.verify.artifacts import GGUFInfo, GGUFLoadError, load_llama
from exporter.verify.corpus import TOKENIZER_CORPUS
from exporter.verify.report import Check


def _check_one(tok: Any, g: GGUFInfo, plain: list[str], chat_texts: list[str]) -> Check:
    try:
        llm = load_llama(g, vocab_only=True)
    except GGUFLoadError as e:
        return Check("tokenizer", g.path.name, "fail", str(e), {"pre": g.pre})
    mismatches: list[dict[str, Any]] = []
    for text, special in [(t, False) for t in plain] + [(t, True) for t in chat_texts]:
        want = tok(text, add_special_tokens=not special)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=not special, special=special)
        if list(got) != list(want):
            i = first_diff(got, want)
            mismatches.append({"text": text[:200], "position": i, "hf": want[i : i + 6], "gguf": got[i : i + 6]})
    llm.close()
    n = len(plain) + len(chat_texts)
    if mismatches:
        m = mismatches[0]
        detail = (
            f"{len(mismatches)}/{n} texts tokenize differently (tokenizer.ggml.pre={g.pre!r}); first: "
            f"{m['text'][:60]!r} at token {m['position']}: HF {m['hf']} vs GGUF {m['gguf']}"
        )
    else:
        detail = f"{n} texts: identical ids"
    metrics = {"texts": n, "mismatches": len(mismatches), "pre": g.pre, "examples": mismatches[:5]}
    return Check("tokenizer", g.path.name, "fail" if mismatches else "pass", detail, metrics)


def check_tokenizer(tok: Any, ggufs: list[GGUFInfo], data_texts: list[str], chat_texts: list[str]) -> list[Check]:
    """HF ids == llama.cpp ids: plain texts with the tokenizer's own BOS/EOS, rendered chats with special tokens."""
    plain = TOKENIZER_CORPUS + data_texts
    return [_check_one(tok, g, plain, chat_texts) for g in ggufs]
