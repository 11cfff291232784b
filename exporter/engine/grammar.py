"""Constrained decoding with llama.cpp's grammar engine: OpenAI's `response_format` (json_object, json_schema) and a
forced tool call, as GBNF grammars that mask each step's logits.

The grammar text comes from llama-cpp-python's own JSON-schema converter (`llama_cpp.llama_grammar`, a port of
llama.cpp's json_schema_to_grammar.py); the masking is llama.cpp's grammar sampler (`llama_sampler_init_grammar`)
applied to a `llama_token_data_array` built from our logits, then told each token picked. Our `Sampler` then picks
from what is left as it picks from any logits (penalties, temperature, top-k/p ...).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from exporter.engine.api import EngineError

# llama_token_data {id, logit, p}: a numpy view the sampler reads and writes in place
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)


def _llama_grammar() -> Any:
    try:
        from llama_cpp import llama_grammar
    except ImportError:
        raise EngineError("constrained decoding (response_format, a forced tool call) needs llama-cpp-python: "
                          "pip install 'exporter[gguf]'") from None  # fmt: skip
    return llama_grammar


# llama.cpp's JSON string character (common/json-schema-to-grammar.cpp): llama-cpp-python's port lets raw control
# characters (a newline) into a string, which no JSON parser reads
CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def _schema_gbnf(schema: dict[str, Any], what: str, prop_order: list[str] | None = None) -> str:
    """GBNF of `schema` by llama-cpp-python's converter, its string characters as llama.cpp's own. EngineError
    naming `what` when the converter cannot read it."""
    lg = _llama_grammar()
    try:
        text = lg.json_schema_to_gbnf(json.dumps(schema), prop_order)
    except Exception as e:  # the converter raises bare ValueError / KeyError / NotImplementedError ...
        raise EngineError(f"cannot turn {what} into a grammar: {type(e).__name__}: {e}") from None
    return "\n".join(CHAR_RULE if line.startswith("char ::= ") else line for line in text.splitlines()) + "\n"


def json_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF of a JSON value matching `schema` (None: any JSON object, llama.cpp's json.gbnf as llama-cpp-python's
    server uses for json_object). EngineError naming what the converter could not read."""
    if schema is None:
        return _llama_grammar().JSON_GBNF
    return _schema_gbnf(schema, "the JSON schema")


# tool format (engine/chat_format.py) -> (what opens a call, what closes it, the key of its arguments)
TOOL_CALL_SHAPES = {"hermes": ("<tool_call>\n", "\n</tool_call>", "arguments"),
                    "mistral": ("[TOOL_CALLS][", "]", "arguments"), "llama3": ("", "", "parameters")}  # fmt: skip


def tool_call_grammar(functions: list[dict[str, Any]], fmt: str) -> str:
    """GBNF of one call, in tool format `fmt` (a key of TOOL_CALL_SHAPES: Hermes / Qwen writes
    `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`), of one of `functions`, its arguments following
    the function's parameters schema."""
    prefix, suffix, key = TOOL_CALL_SHAPES[fmt]
    calls = [{"type": "object", "properties": {"name": {"const": fn["name"]},
                                               key: fn.get("parameters") or {"type": "object"}},
              "required": ["name", key], "additionalProperties": False} for fn in functions]  # fmt: skip
    names = ", ".join(repr(fn["name"]) for fn in functions)
    text = _schema_gbnf(calls[0] if len(calls) == 1 else {"anyOf": calls}, f"the parameters of {names}", ["name", key])
    body = [("call ::= " + line[len("root ::= ") :]) if line.startswith("root ::= ") else line
            for line in text.splitlines()]  # fmt: skip
    return "\n".join([f"root ::= {json.dumps(prefix)} call {json.dumps(suffix)}", *body]) + "\n"


# UTF-8 decoding states: 0 none owed; 1-3 that many continuation bytes (80-BF) owed; 4-7 the first of them
# restricted (no overlong form, no surrogate, nothing past U+10FFFF): state -> (lowest, highest, state after it)
_CONT = {1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0x80, 0xBF, 2), 4: (0xA0, 0xBF, 1), 5: (0x80, 0x9F, 1),
         6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}  # fmt: skip
_UTF8_STATES = 8


def _lead(b: int) -> int:
    """The state after a byte that starts a character (0 for ASCII, -1 for a byte no character starts with)."""
    if b < 0x80:
        return 0
    if 0xC2 <= b <= 0xDF:
        return 1
    return {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}.get(b, 2 if 0xE1 <= b <= 0xEF else 3 if 0xF1 <= b <= 0xF3 else -1)


def _utf8_after(state: int, data: bytes) -> int:
    """The decoding state after `data` from `state` (see _CONT); -1 when `data` breaks the text there."""
    for b in data:
        if state:
            lo, hi, state = _CONT[state]
            if not lo <= b <= hi:
                return -1
        elif (state := _lead(b)) < 0:
            return -1
    return state


def utf8_table(pieces: list[bytes]) -> np.ndarray:
    """[8, n] int8: each token's decoding state after its bytes from each state before it (-1: the token breaks the
    UTF-8 text there). llama.cpp's grammar decodes UTF-8 more loosely than any JSON reader (it takes a surrogate,
    an overlong form, a lead byte F5-FF), so byte tokens could put a broken character (U+FFFD in the text) into a
    JSON string: this masks them."""
    table = np.full((_UTF8_STATES, len(pieces)), -1, dtype=np.int8)
    for t, data in enumerate(pieces):
        table[0, t] = _utf8_after(0, data)
        if data and 0x80 <= data[0] < 0xC0:  # only a token that opens with a continuation byte goes on from 1-7
            for state in range(1, _UTF8_STATES):
                table[state, t] = _utf8_after(state, data)
    return table


class LlamaGrammar:
    """A grammar over a llama.cpp vocabulary, for one answer: `mask(logits)` sets what the grammar forbids next to
    -inf, `accept(token)` advances it. `stops` (the request's stop ids) are allowed only where the grammar may end
    (where llama.cpp lets an end-of-generation token through), never fed to it; `banned` ids (control tokens, whose
    text the answer leaves out) never, nor (with `utf8`, see utf8_table) a token that would break a UTF-8 character.
    EngineError when llama.cpp cannot parse `gbnf`."""

    def __init__(self, L: Any, vocab: Any, n_vocab: int, gbnf: str, stops: Iterable[int], eog: Iterable[int],
                 banned: Iterable[int] = (), utf8: np.ndarray | None = None) -> None:  # fmt: skip
        self.L = L
        self.smpl = L.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self.smpl:
            raise EngineError("llama.cpp cannot parse the grammar")
        self.n = n_vocab
        self.stop_set = {t for t in stops if 0 <= t < n_vocab}
        self.eog_set = {t for t in eog if 0 <= t < n_vocab}
        self.banned_set = {t for t in banned if 0 <= t < n_vocab} - self.stop_set
        self.stops, self.eog, self.banned = (np.array(sorted(x), dtype=np.int64)
                                             for x in (self.stop_set, self.eog_set, self.banned_set))  # fmt: skip
        self.data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.data["id"] = np.arange(n_vocab)
        self.allowed: np.ndarray | None = None  # what the last mask() allowed
        self.approved: int | None = None  # the token the last allows() approved
        self.one = np.zeros(1, dtype=_TOKEN_DATA)
        self.utf8 = utf8  # utf8_table() of the vocabulary: no token may break a character
        self.owed = 0  # the text's UTF-8 decoding state (see _CONT)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` (one row of the model's vocabulary; ids past it stay forbidden) with every token the
        grammar forbids next at -inf. EngineError when it allows none."""
        n = min(self.n, logits.shape[0])
        d = self.data
        d["logit"][:n] = logits[:n]
        d["logit"][n:] = 0
        d["p"] = 0
        arr = self.L.llama_token_data_array(d.ctypes.data_as(self.L.llama_token_data_p), self.n, -1, False)
        self.L.llama_sampler_apply(self.smpl, ctypes.byref(arr))
        allowed = d["logit"] != -np.inf
        allowed[n:] = False
        if self.utf8 is not None:
            allowed &= self.utf8[self.owed] >= 0
        may_end = bool(allowed[self.eog].any()) if self.eog.size else False
        allowed[self.stops] = may_end
        allowed[self.banned] = False
        if not allowed.any():
            raise EngineError("the grammar allows no token here (no token of the vocabulary continues it)")
        self.allowed, self.approved = allowed, None
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        out[:n][allowed[:n]] = logits[:n][allowed[:n]]
        return out

    def allows(self, token: int) -> bool:
        """Does the grammar take `token` next: one token checked, not the whole vocabulary (greedy decoding checks its
        pick first, as llama.cpp's common sampler does, and masks only when the grammar refuses it)."""
        if not 0 <= token < self.n or token in self.banned_set:
            return False
        probe = token
        if token in self.stop_set:  # a stop: where the grammar may end, i.e. where it takes an end-of-generation id
            if not self.eog.size:
                return False
            probe = token if token in self.eog_set else int(self.eog[0])
        elif self.utf8 is not None and self.utf8[self.owed, token] < 0:
            return False
        one = self.one
        one["id"], one["logit"], one["p"] = probe, 0, 0
        arr = self.L.llama_token_data_array(one.ctypes.data_as(self.L.llama_token_data_p), 1, -1, False)
        self.L.llama_sampler_apply(self.smpl, ctypes.byref(arr))
        ok = bool(one["logit"][0] != -np.inf)
        self.approved = token if ok else None
        return ok

    def accept(self, token: int) -> None:
        """Advance past `token` (one `mask` allowed); a stop ends the answer and is not fed to the grammar."""
        if token in self.stop_set:
            return
        ok = token == self.approved or (self.allowed is not None and 0 <= token < self.n and self.allowed[token])
        self.allowed = self.approved = None
        if not ok:  # llama.cpp aborts the process on a token its grammar forbids
            raise EngineError(f"token {token} is not allowed by the grammar")
        self.L.llama_sampler_accept(self.smpl, token)
        if self.utf8 is not None:
            self.owed = int(self.utf8[self.owed, token])

    def close(self) -> None:
        if getattr(self, "smpl", None):
            self.L.llama_sampler_free(self.smpl)
            self.smpl = None

    def __del__(self) -> None:
        self.close()
