"""Picking the next token from logits, and turning tokens into text as they come (stop strings included).

One implementation for every backend, so greedy means the same argmax everywhere and a seed the same draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from exporter.engine.api import EngineError, NonFiniteLogits, Sampling, TokenLogprob

RANDOM_SEED = -1  # llama.cpp's convention (its server, llama-cpp-python): a seed of -1 means "draw a fresh one"
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's presence_penalty / frequency_penalty range
LOGIT_BIAS = 100  # OpenAI's logit_bias values: -100 (bans the token) to 100 (forces it)


def check_sampling(s: Sampling) -> None:
    """EngineError naming the first out-of-range value."""
    if s.seed is not None and (isinstance(s.seed, bool) or not isinstance(s.seed, int)):
        raise EngineError(f"seed must be an integer, got {s.seed!r}")
    if s.max_new_tokens < (0 if s.prompt_logprobs is not None else 1):
        raise EngineError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if not s.temperature >= 0:
        raise EngineError(f"temperature must be >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise EngineError(f"top_k must be >= 0, got {s.top_k}")
    if not s.repetition_penalty > 0:
        raise EngineError(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not PENALTY_RANGE[0] <= getattr(s, name) <= PENALTY_RANGE[1]:
            raise EngineError(f"{name} must be between {PENALTY_RANGE[0]:g} and {PENALTY_RANGE[1]:g}, "
                              f"got {getattr(s, name)}")  # fmt: skip
    if not 0 <= s.min_p <= 1:
        raise EngineError(f"min_p must be between 0 and 1, got {s.min_p}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(s, name)
        if k is not None and not 0 <= k <= 20:
            raise EngineError(f"{name} must be between 0 and 20, got {k}")
    for token, bias in s.logit_bias:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise EngineError(f"logit_bias: token ids must be integers >= 0, got {token!r}")
        if not -LOGIT_BIAS <= bias <= LOGIT_BIAS:
            raise EngineError(f"logit_bias of token {token} must be between -{LOGIT_BIAS} and {LOGIT_BIAS}, got {bias}")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _top_p_cut(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most likely tokens whose mass reaches top_p (exact, without a full sort); of
    tokens tied at the edge, the later ids stay, as transformers' TopPLogitsWarper (an ascending stable sort) keeps."""
    n = probs.shape[0]
    k = min(64, n)
    while True:
        idx = np.argpartition(-probs, k - 1)[:k] if k < n else np.arange(n)
        idx = idx[np.lexsort((-idx, -probs[idx]))]
        csum = np.cumsum(probs[idx])
        if csum[-1] >= top_p or k >= n:
            return idx[: int(np.searchsorted(csum, top_p)) + 1]
        k = min(n, k * 4)


def rng(seed: int | None) -> np.random.Generator:
    """A request's random generator: any integer seeds it (a negative one as its 64-bit two's complement), None or
    `RANDOM_SEED` draws fresh entropy."""
    return np.random.default_rng(None if seed is None or seed == RANDOM_SEED else seed % 2**64)


def seed_of_choice(seed: int | None, i: int) -> int | None:
    """The seed of the i-th of n answers to one request (OpenAI's `n`): seed + i, so answer 0 is what n=1 gives."""
    return seed if seed is None or seed == RANDOM_SEED else seed + i


class Sampler:
    """Per-request token picker: OpenAI's logit_bias (added to the model's logits before anything else, as
    llama-cpp-python's server applies it: a logits processor ahead of its sampler chain), then in transformers'
    order: repetition penalty (HF's, over the prompt and the answer), presence and frequency penalties (OpenAI's,
    over the answer so far), then greedy, or temperature -> top-k -> top-p -> min-p -> draw. A `constraint` (a
    grammar: `mask(logits)` -> logits with what it forbids at -inf, `allows(token)`, `accept(token)`, `close()`)
    masks the logits after the penalties (greedy: only when it refuses the top token) and is told each token
    picked."""

    def __init__(self, s: Sampling, prompt: Sequence[int], constraint: Constraint | None = None) -> None:
        self.s = s
        self.constraint = constraint
        self.rng = rng(s.seed)
        self.seen: set[int] = set(prompt) if s.repetition_penalty != 1.0 else set()
        self.counts: dict[int, int] = {}  # answer token -> times picked (presence / frequency penalties)
        self.n = 0  # tokens picked so far

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        """The logits after the bias and the penalties (a float32 copy where one applies). logit_bias: added to its
        token's logit (ids past the vocabulary ignored). Repetition: a seen token's logit is divided by the penalty
        when positive, else multiplied (transformers' RepetitionPenaltyLogitsProcessor); then OpenAI's
        `logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`."""
        s = self.s
        additive = bool(self.counts) and (s.presence_penalty != 0 or s.frequency_penalty != 0)
        if not self.seen and not additive and not s.logit_bias:
            return logits
        logits = logits.astype(np.float32, copy=True)
        for token, bias in s.logit_bias:
            if token < logits.shape[0]:
                logits[token] += np.float32(bias)
        if self.seen:
            ids = np.fromiter(self.seen, dtype=np.int64)
            ids = ids[ids < logits.shape[0]]
            v = logits[ids]
            logits[ids] = np.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
        if additive:
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            inside = ids < logits.shape[0]
            logits[ids[inside]] -= n[inside] * np.float32(s.frequency_penalty) + np.float32(s.presence_penalty)
        return logits

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) a sampled token is drawn from, for (penalized) `logits`: softmax of logits /
        temperature over the top-k (every token tied with the k-th kept, as transformers' TopKLogitsWarper), cut to
        top-p, then to the tokens at least min_p x the top one's probability. NonFiniteLogits on NaN/+inf."""
        s = self.s
        x = logits.astype(np.float64) / s.temperature
        top = x.max()  # NaN when any is: checked before anything else
        _finite(top, self.n)
        n = x.shape[0]
        cand = np.flatnonzero(x >= np.partition(x, n - s.top_k)[n - s.top_k]) if 0 < s.top_k < n else np.arange(n)
        p = np.exp(x[cand] - top)
        p /= p.sum()
        if s.top_p < 1.0:
            keep = _top_p_cut(p, s.top_p)
            cand, p = cand[keep], p[keep] / p[keep].sum()
        if s.min_p > 0:
            keep = p >= s.min_p * p.max()
            cand, p = cand[keep], p[keep] / p[keep].sum()
        return cand, p

    def __call__(self, logits: np.ndarray) -> tuple[int, TokenLogprob | None]:
        """The next token (and its log-probs, of the raw logits, when asked). NonFiniteLogits when the row holds a
        NaN or +inf, or is all -inf: the check costs one element, since argmax and max return a NaN where there is
        one."""
        s = self.s
        self.n += 1
        raw = logits
        logits = self.penalized(logits)
        c = self.constraint
        if s.greedy:
            token = int(np.argmax(logits))
            if c is not None and np.isfinite(logits[token]) and not c.allows(token):  # else mask the whole row
                logits = c.mask(logits)
                token = int(np.argmax(logits))
            _finite(logits[token], self.n)
        else:
            if c is not None:
                logits = c.mask(logits)
            cand, p = self.distribution(logits)
            token = int(cand[min(int(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum())), len(p) - 1)])
        if c is not None:
            c.accept(token)
        if s.repetition_penalty != 1.0:
            self.seen.add(token)
        if s.presence_penalty != 0 or s.frequency_penalty != 0:
            self.counts[token] = self.counts.get(token, 0) + 1
        return token, (token_logprob(raw, token, s.logprobs) if s.logprobs is not None else None)

    def close(self) -> None:
        """Free the constraint's resources (a llama.cpp sampler); the answer is over."""
        if self.constraint is not None:
            self.constraint.close()


class Constraint(Protocol):
    """What constrains a `Sampler` (engine/grammar.py's `LlamaGrammar`)."""

    def mask(self, logits: np.ndarray) -> np.ndarray: ...

    def allows(self, token: int) -> bool: ...

    def accept(self, token: int) -> None: ...

    def close(self) -> None: ...


def _finite(top: float, n: int) -> None:
    if not np.isfinite(top):
        raise NonFiniteLogits(f"the model's logits are not finite ({float(top)}) at answer token {n}: its weights are "
                              "broken; this answer stops here")  # fmt: skip


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The chosen token's log-prob and the k best (ties in id order), from raw logits."""
    lp = log_softmax(logits)
    top: list[tuple[int, float]] = []
    if k > 0:
        idx = np.argpartition(-lp, k - 1)[:k]
        idx = idx[np.lexsort((idx, -lp[idx]))]
        top = [(int(i), float(lp[i])) for i in idx]
    return TokenLogprob(token, float(lp[token]), top)


class TextStream:
    """Tokens in, text out: only whole characters (a token may end mid UTF-8 sequence), and never text that may
    be the start of a stop string. `decode` turns a list of token ids into text."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (the context for the next token)
        self.read = 0
        self.held = ""  # decoded, not yet emitted: could be the start of a stop string
        self.text = ""  # emitted so far

    def push(self, token: int) -> tuple[str, bool]:
        """(new text, hit a stop string) after one more token."""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return "", False
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit(self.held + after[len(before) :])

    def finish(self) -> str:
        """Whatever is held back at the end of the answer (text that turned out not to be a stop string)."""
        tail = self.decode(self.ids[self.prefix :])[len(self.decode(self.ids[self.prefix : self.read])) :]
        out, self.held = self.held + tail, ""
        self.text += out
        return out

    def _emit(self, pending: str) -> tuple[str, bool]:
        hits = [(pending.find(s), s) for s in self.stops if s in pending]
        if hits:
            at = min(hits)[0]
            self.held = ""
            self.text += pending[:at]
            return pending[:at], True
        keep = 0
        for s in self.stops:  # the longest tail of `pending` that starts some stop string
            for n in range(min(len(s) - 1, len(pending)), keep, -1):
                if s.startswith(pending[-n:]):
                    keep = n
                    break
        out = pending[: len(pending) - keep]
        self.held = pending[len(pending) - keep :]
        self.text += out
        return out, False
