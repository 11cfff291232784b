"""The `gguf` backend: libllama through llama-cpp-python's low-level API, optionally with a GGUF LoRA.

One context for `max_seqs` sequences, each with its own `ctx` KV cells (llama.cpp's split, non-unified cache: a
token attends over its own sequence's cells only, so a step costs what its tokens cost, not the square of the
number of sequences); each step is one `llama_decode` whose batch holds one token per decoding sequence and chunks
of new prompts, each tagged with its sequence id and position, with logits asked for only where a next token is
needed. A released sequence's KV cells are cleared at once (`llama_memory_seq_rm`).
"""

from __future__ import annotations

import codecs
import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from exporter.engine.api import EngineError, LoadOptions
from exporter.engine.scheduler import Feed
from exporter.errors import UserError

DEFAULT_CTX = 4096


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UserError("the gguf backend needs llama-cpp-python: pip install 'exporter[gguf]'") from None
    from exporter.quiet import silence_llama_cpp

    silence_llama_cpp()
    return llama_cpp


def common_prefix(a: list[int], b: list[int], most: int) -> int:
    """How many leading tokens `a` and `b` share, at most `most`."""
    n = 0
    for x, y in zip(a, b[: max(most, 0)], strict=False):
        if x != y:
            break
        n += 1
    return n


class GGUFBackend:
    """A GGUF model and context behind the scheduler's `Backend` protocol, plus scoring."""

    chunked_prefill = True

    def __init__(self, path: Path, lora: Path | None, opts: LoadOptions) -> None:
        L = self.L = _llama()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise UserError(f"{path}: llama.cpp refused the file (see `exporter verify --gguf` for why)")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.vocab_size = int(L.llama_vocab_n_tokens(self.vocab))
        n_train = int(L.llama_model_n_ctx_train(self.model)) or DEFAULT_CTX
        per_seq = n_train if opts.ctx == 0 else opts.ctx or min(DEFAULT_CTX, n_train)  # 0: llama.cpp's n_ctx 0
        self.batch_tokens = max(opts.batch_tokens, opts.max_seqs + 1)
        cp = L.llama_context_default_params()
        cp.n_ctx = per_seq * opts.max_seqs
        cp.n_batch = cp.n_ubatch = self.batch_tokens
        cp.n_seq_max = opts.max_seqs
        cp.kv_unified = False
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama-cpp-python's Llama (verify's reference)
        threads = opts.threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise UserError(f"{path}: llama.cpp cannot create a context of {per_seq} x {opts.max_seqs} sequences")
        # llama.cpp rounds the cells up (to 256) but caps n_batch/n_ubatch at the n_ctx asked for: a step never
        # holds more tokens than it accepts (a larger batch aborts the process), and a sequence holds what was asked
        self.batch_tokens = min(self.batch_tokens, int(L.llama_n_batch(self.ctx)), int(L.llama_n_ubatch(self.ctx)))
        self.n_ctx = min(int(L.llama_n_ctx_seq(self.ctx)), n_train, per_seq)
        self.mem = L.llama_get_memory(self.ctx)
        self.lora = None
        if lora is not None:
            self.lora = L.llama_adapter_lora_init(self.model, str(lora).encode())
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(self.lora)
            scales = (ctypes.c_float * 1)(opts.lora_scale)
            if not self.lora or L.llama_set_adapters_lora(self.ctx, adapters, 1, scales):
                self.close()
                raise UserError(f"{lora}: llama.cpp cannot apply this GGUF LoRA to {path.name}")
        self.batch = L.llama_batch_init(self.batch_tokens, 0, 1)
        self.cells: dict[int, list[int]] = {}  # the tokens in each sequence's KV cells (kept after release)
        flag = self.meta("tokenizer.ggml.add_space_prefix")  # llama.cpp's default: SPM vocabularies prefix one
        spm = L.llama_vocab_type(self.vocab) == L.LLAMA_VOCAB_TYPE_SPM
        self.space_prefix = flag == "true" if flag is not None else spm  # the first decoded piece drops it
        self._vocab_table: tuple[set[int], set[int], Any] | None = None  # (end-of-generation ids, control ids,
        #                                                                    utf8_table): grammar()

    def close(self) -> None:
        L = self.L
        if getattr(self, "batch", None) is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.lora:
            L.llama_adapter_lora_free(self.lora)
            self.lora = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    # ---- metadata and text

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self.L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = self.L.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        raw = self.L.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's piece (special tokens as their text), also a part of a UTF-8 character."""
        return self._piece(token, 0, True)

    def _piece(self, token: int, lstrip: int, special: bool) -> bytes:
        """`llama_token_to_piece`: the token's bytes, `lstrip` leading spaces removed; a control token is empty
        unless `special`."""
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), lstrip, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), lstrip, special)
        return buf.raw[: max(n, 0)]

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / ... texts for the chat template, from the vocabulary's special ids."""
        L, out = self.L, {}
        getters = (("bos_token", L.llama_vocab_bos), ("eos_token", L.llama_vocab_eos), ("pad_token", L.llama_vocab_pad))
        for name, fn in getters:
            tid = int(fn(self.vocab))
            if 0 <= tid < self.vocab_size:
                out[name] = self.token_text(tid)
        return out

    def eog_ids(self) -> set[int]:
        return {t for t in range(self.vocab_size) if self.L.llama_vocab_is_eog(self.vocab, t)}

    def special_ids(self) -> set[int]:
        L = self.L
        attrs = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED
        return {t for t in range(self.vocab_size) if L.llama_vocab_get_attr(self.vocab, t) & attrs}

    def grammar(self, gbnf: str, stops: frozenset[int], skip_special: bool = True) -> Any:
        """A `LlamaGrammar` of `gbnf` over this vocabulary for one answer (engine/grammar.py); with `skip_special`
        (the answer's text leaves control tokens out) no control token other than `stops` is allowed. EngineError
        when llama.cpp cannot parse it."""
        from exporter.engine.grammar import LlamaGrammar, utf8_table

        if self._vocab_table is None:  # read once: a pass over the vocabulary
            control = self.L.LLAMA_TOKEN_ATTR_CONTROL
            ctl = {t for t in range(self.vocab_size) if self.L.llama_vocab_get_attr(self.vocab, t) & control}
            pieces = [self._piece(t, 0, True) for t in range(self.vocab_size)]  # as llama.cpp's grammar reads them
            self._vocab_table = (self.eog_ids(), ctl, utf8_table(pieces))
        eog, control, utf8 = self._vocab_table
        banned = control if skip_special else set()
        return LlamaGrammar(self.L, self.vocab, self.vocab_size, gbnf, stops, eog, banned, utf8)

    def bos_prefix(self) -> list[int]:
        """[BOS] when the vocabulary asks for one before a text (tokenizer.ggml.add_bos_token), else []."""
        bos = int(self.L.llama_vocab_bos(self.vocab))
        return [bos] if self.L.llama_vocab_get_add_bos(self.vocab) and 0 <= bos < self.vocab_size else []

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode("utf-8")
        n_max = len(raw) + 8
        buf = (self.L.llama_token * n_max)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, False, True)
        if n < 0:
            raise EngineError(f"llama.cpp could not tokenize a text of {len(raw)} bytes")
        return list(buf[:n])

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """The pieces of `ids` joined, the first without the space the tokenizer prefixes (`add_space_prefix`), as
        `llama_detokenize` builds the text but without its `clean_spaces` pass: on llama-bpe and gpt-2 vocabularies
        (Llama 3) that drops the space before `. , ! ?` and around `'` (`x != 0 .` -> `x!= 0.`), text the model
        wrote, which HF's decode and llama-cpp-python's `detokenize` keep."""
        lead = int(self.space_prefix)
        pieces = (self._piece(t, lead if k == 0 else 0, not skip_special) for k, t in enumerate(ids))
        return b"".join(pieces).decode("utf-8", errors="replace")

    def text_offsets(self, ids: list[int]) -> list[int]:
        """`len(self.decode(ids[:k], False))` for each k, each token's piece read once (decoding every prefix again
        costs the square of the length: seconds on a long prompt); a prefix ending inside a UTF-8 character counts
        it as the one U+FFFD that decode() gives."""
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        out, n, lead = [], 0, int(self.space_prefix)
        for k, t in enumerate(ids):
            out.append(n + (1 if dec.getstate()[0] else 0))
            n += len(dec.decode(self._piece(t, lead if k == 0 else 0, True)))
        return out

    # ---- forward passes

    def _decode(self, items: list[tuple[int, list[int], list[bool]]]) -> np.ndarray:
        """One llama_decode of (seq, tokens, want-logits per token); the wanted logits rows, in batch order."""
        b, n, outs = self.batch, 0, 0
        for seq, ids, want in items:
            cells = self.cells.setdefault(seq, [])
            for j, t in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, len(cells) + j, 1, want[j]
                b.seq_id[n][0] = seq
                n += 1
                outs += want[j]
            cells += ids
        b.n_tokens = n
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            for seq, ids, _ in items:  # the KV cache is restored on failure: so are the positions
                del self.cells[seq][len(self.cells[seq]) - len(ids) :]
            what = "no room left in the KV cache" if rc == 1 else f"llama_decode returned {rc}"
            raise EngineError(f"{what} ({n} tokens in the batch, {self.n_ctx} cells per sequence)")
        if not outs:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        ptr = self.L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(outs, self.vocab_size)).copy()

    def step(self, feeds: list[Feed]) -> list[np.ndarray]:
        rows = self._decode([(f.seq, f.ids, [f.every] * (len(f.ids) - 1) + [f.want or f.every]) for f in feeds])
        if not any(f.every for f in feeds):
            return list(rows)
        out, k = [], 0
        for f in feeds:
            if f.every:
                out.append(rows[k : k + len(f.ids)])
                k += len(f.ids)
            elif f.want:
                out.append(rows[k])
                k += 1
        return out

    def prefix(self, seq: int, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens `seq`'s cells hold already (see `reuse`)."""
        return common_prefix(self.cells.get(seq, []), prompt, len(prompt) - 1)

    def reuse(self, seq: int, prompt: list[int]) -> int:
        """Keep the longest prefix of `prompt` that `seq`'s cells already hold (at most all but its last token, whose
        logits are needed), drop the rest; its length (prompt tokens not to feed again). As llama-cpp-python's
        server does, a new turn or a shared system prompt is not computed twice."""
        cells = self.cells.setdefault(seq, [])
        keep = self.prefix(seq, prompt)
        if keep < len(cells) and not self.L.llama_memory_seq_rm(self.mem, seq, keep, -1):
            self.release(seq)  # a cache that cannot drop a tail (recurrent models): start afresh
            return 0
        del cells[keep:]
        return keep

    def release(self, seq: int, broken: bool = False) -> None:
        """Free `seq`'s KV cells. `broken`: they may hold NaN/inf (a request stopped on non-finite logits). llama.cpp
        keeps a freed cell's values and masks them with -inf, and NaN - inf is NaN: the next request on this slot would
        read NaN, so they are first overwritten with finite ones (a run of token 0 as long as the sequence was)."""
        n = len(self.cells.get(seq, []))
        self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.cells.pop(seq, None)
        if broken and n:
            for i in range(0, n, self.batch_tokens):
                k = min(self.batch_tokens, n - i)
                self._decode([(seq, [0] * k, [False] * k)])
            self.release(seq)

    # ---- scoring (on a free sequence slot lent by the scheduler, in chunks of the batch size)

    def logits(self, ids: list[int], seq: int) -> np.ndarray:
        """[len(ids), vocab] float32 logits of one sequence."""
        out = []
        self.release(seq)
        try:
            for i in range(0, len(ids), self.batch_tokens):
                chunk = ids[i : i + self.batch_tokens]
                out.append(self._decode([(seq, chunk, [True] * len(chunk))]))
        finally:
            self.release(seq)
        return np.concatenate(out)

    def next_logits(self, prompts: list[list[int]], seq: int) -> np.ndarray:
        """[len(prompts), vocab] logits after the last token of each prompt (one after another on `seq`)."""
        return np.stack([self._last(p, seq) for p in prompts])

    def _last(self, ids: list[int], seq: int) -> np.ndarray:
        row = None
        self.release(seq)
        try:
            for i in range(0, len(ids), self.batch_tokens):
                chunk = ids[i : i + self.batch_tokens]
                rows = self._decode([(seq, chunk, [False] * (len(chunk) - 1) + [i + len(chunk) == len(ids)])])
                row = rows[-1] if len(rows) else row
        finally:
            self.release(seq)
        assert row is not None
        return row
