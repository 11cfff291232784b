"""Continuous batching: one worker thread owns the model and decodes every live sequence in one forward per step.

Each step feeds one token per decoding sequence plus prompt tokens of newly admitted ones (in chunks where the
backend allows), picks each sequence's next token with its own `Sampler`, and hands the new text to that request's
sink. Requests wait in a bounded queue; a finished or cancelled sequence frees its slot (and KV cells) at once, and
the next waiting one takes it in the same step. Outputs never mix: each sequence has its own KV cache rows and
sampler, and its events go to its own sink. An exception while serving one request fails that request only; should
the worker itself die, every request gets EngineClosed naming why, and so does every later `submit`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from exporter.engine.api import (
    ContextOverflow,
    Delta,
    EngineClosed,
    EngineError,
    NonFiniteLogits,
    QueueFull,
    Sampling,
    TokenLogprob,
)
from exporter.engine.sampling import Constraint, Sampler, TextStream, token_logprob

Sink = Callable[[Delta | BaseException], None]


@dataclass
class Feed:
    """Tokens to append to sequence `seq`; `want`: return the logits after the last of them; `every`: return the
    logits after each of them instead ([len(ids), vocab]: prompt log-probs)."""

    seq: int
    ids: list[int]
    want: bool = True
    every: bool = False


class Backend(Protocol):
    """What the scheduler needs from a backend (see hf.py, gguf.py)."""

    n_ctx: int  # most tokens one sequence may hold
    batch_tokens: int | None  # most tokens in one step (None: no limit)
    chunked_prefill: bool  # may a prompt be fed over several steps

    # per feed, in order: [len(ids), vocab] logits for one with `every`, else one row for one with `want`
    def step(self, feeds: list[Feed]) -> list[np.ndarray]: ...

    def release(self, seq: int, broken: bool = False) -> None: ...  # broken: its cache may hold NaN/inf

    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...

    # optional, grammar(gbnf, stops, skip_special) -> Constraint: constrained decoding (gguf)
    # optional, a prefix cache (gguf): a finished sequence's cells stay until its slot is taken again;
    # prefix(seq, prompt): how many prompt tokens the slot holds; reuse(seq, prompt): keep those, drop the rest


@dataclass(eq=False)
class _Seq:
    prompt: list[int]
    sampling: Sampling
    stops: frozenset[int]
    sink: Sink
    slot: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    out: list[int] = field(default_factory=list)
    cancelled: bool = False
    sampler: Sampler | None = None
    text: TextStream | None = None
    scored: list[TokenLogprob | None] | None = None  # prompt log-probs so far (Sampling.prompt_logprobs)


class Handle:
    """A submitted request; `cancel()` frees its slot at the next step (a client that went away)."""

    def __init__(self, seq: _Seq, wake: Callable[[], None]) -> None:
        self._seq, self._wake = seq, wake

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._wake()


class Scheduler:
    """Owns `backend` from its worker thread; `submit` is thread-safe. `lock` serializes other uses of the model
    (scoring) with the steps."""

    def __init__(
        self, backend: Backend, stop_ids: frozenset[int], max_seqs: int, max_waiting: int, lock: threading.RLock
    ) -> None:
        self.backend, self.stop_ids, self.max_seqs, self.max_waiting = backend, stop_ids, max_seqs, max_waiting
        self.lock = lock
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._live: list[_Seq] = []
        self._free = list(range(max_seqs - 1, -1, -1))
        self._closed = False
        self._died: str | None = None  # why the worker thread stopped on an error
        self._thread: threading.Thread | None = None

    # ---- client side

    def budget(self, prompt_len: int, max_new: int) -> int:
        """`max_new` cut to what the context holds after the prompt; EngineError when the prompt alone is too long."""
        room = self.backend.n_ctx
        if prompt_len >= room:
            raise ContextOverflow(prompt_len, room)
        return min(max_new, room - prompt_len)

    def submit(self, prompt: Sequence[int], sampling: Sampling, sink: Sink, bounded: bool = True) -> Handle:
        if not prompt:
            raise EngineError("empty prompt")
        max_new = self.budget(len(prompt), sampling.max_new_tokens)
        stops = frozenset(sampling.stop_ids) | (frozenset() if sampling.ignore_eos else self.stop_ids)
        seq = _Seq(list(prompt), sampling.replace(max_new_tokens=max_new), stops, sink)
        with self._cond:
            if self._closed:
                raise EngineClosed(self._died or "the engine is closed")
            if bounded and len(self._waiting) >= self.max_waiting + len(self._free):  # a free slot takes one now
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()
        return Handle(seq, self._wake)

    @contextlib.contextmanager
    def borrow_slot(self) -> Iterator[int]:
        """A free sequence slot for scoring outside the batch (EngineError when every slot is decoding)."""
        with self._cond:
            if not self._free:
                raise EngineError("every sequence slot is busy generating; score when fewer requests run")
            slot = self._free.pop()
        try:
            yield slot
        finally:
            with self._cond:
                self._free.append(slot)
                self._cond.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cond:
            return len(self._live), len(self._waiting)

    @property
    def error(self) -> str | None:
        """Why no request can be served (closed, or the worker died), None while it serves."""
        with self._cond:
            return (self._died or "the engine is closed") if self._closed else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- worker side

    def _admit(self) -> None:
        """Move waiting requests into free slots, first come, first served."""
        while self._waiting and self._free:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                seq.sink(Delta("", [], "cancelled"))
                continue
            self._waiting.popleft()
            if hasattr(self.backend, "reuse"):  # the free slot that holds the longest start of this prompt
                seq.slot = max(reversed(self._free), key=lambda s: self.backend.prefix(s, seq.prompt))
                self._free.remove(seq.slot)
            else:
                seq.slot = self._free.pop()
            self._live.append(seq)
            try:
                if seq.sampling.prompt_logprobs is not None:  # every prompt token is read (and scored) again
                    seq.scored = [None]
                    if hasattr(self.backend, "reuse"):
                        with self.lock:
                            self.backend.release(seq.slot)
                elif hasattr(self.backend, "reuse"):
                    with self.lock:
                        seq.fed = self.backend.reuse(seq.slot, seq.prompt)
                seq.sampler = Sampler(seq.sampling, seq.prompt, self._constraint(seq))
                skip = seq.sampling.skip_special_tokens
                seq.text = TextStream(lambda ids, skip=skip: self.backend.decode(ids, skip), seq.sampling.stop)
            except Exception as e:  # this request fails; the worker goes on
                self._finish(seq, None, _failed(e))

    def _constraint(self, seq: _Seq) -> Constraint | None:
        """The grammar of a request that asks for one, over the backend's vocabulary (EngineError where the backend
        has no grammar engine)."""
        if seq.sampling.grammar is None:
            return None
        make = getattr(self.backend, "grammar", None)
        if make is None:
            raise EngineError(f"the {getattr(self.backend, 'kind', type(self.backend).__name__)} backend cannot "
                              "constrain an answer to a grammar")  # fmt: skip
        return make(seq.sampling.grammar, seq.stops, seq.sampling.skip_special_tokens)

    def _finish(self, seq: _Seq, reason: str | None, error: BaseException | None = None) -> None:
        self._live.remove(seq)
        if seq.sampler is not None:
            seq.sampler.close()
        try:
            if error is not None or not hasattr(self.backend, "reuse"):  # else its cells stay for the next prompt
                with self.lock:
                    self.backend.release(seq.slot, isinstance(error, NonFiniteLogits))
        finally:
            self._free.append(seq.slot)
            if error is not None:
                _send(seq, error)
            elif reason is not None:
                tail = seq.text.finish() if reason != "cancelled" and seq.text is not None else ""
                _send(seq, Delta(tail, [], reason))

    def _feeds(self) -> list[tuple[_Seq, Feed, int]]:
        """(sequence, feed, prompt tokens in it) for this step: one token per decoding sequence, then prompt tokens
        of new ones (oldest first) in what is left of the step's token budget."""
        room = self.backend.batch_tokens or 1 << 30
        feeds = []
        for seq in self._live:
            if seq.fed == len(seq.prompt):
                feeds.append((seq, Feed(seq.slot, [seq.out[-1]]), 0))
                room -= 1
        for seq in self._live:
            left = len(seq.prompt) - seq.fed
            if left == 0:
                continue
            n = min(left, room) if self.backend.chunked_prefill else left
            if n <= 0 or (n > room and feeds):
                continue
            every = seq.scored is not None
            feeds.append((seq, Feed(seq.slot, seq.prompt[seq.fed : seq.fed + n], want=n == left, every=every), n))
            room -= n
        return feeds

    def _run(self) -> None:
        """The worker: steps until closed; if it dies on an error, every request fails naming it."""
        try:
            self._loop()
        except BaseException as e:  # reported to every request, and by `error` (a server's /health)
            with self._cond:
                self._closed = True
                self._died = f"the engine's worker stopped: {type(e).__name__}: {e}"
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        """Closed: every running and waiting request gets EngineClosed (nothing of the backend is touched)."""
        with self._cond:
            error = EngineClosed(self._died or "the engine was closed")
            for seq in self._live + list(self._waiting):
                _send(seq, error)
            self._live.clear()
            self._waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._live:
                    self._cond.wait()
                if self._closed:
                    break
                for seq in [s for s in self._live if s.cancelled]:
                    self._finish(seq, "cancelled")
                self._admit()
                feeds = self._feeds()
            if not feeds:
                continue
            try:
                with self.lock:
                    rows = self.backend.step([f for _, f, _ in feeds])
            except Exception as e:  # a failed forward fails the requests in it, not the server
                with self._cond:
                    for seq in {s for s, _, _ in feeds}:
                        self._finish(seq, None, _failed(e))
                continue
            with self._cond:
                it = iter(rows)
                for seq, feed, n_prompt in feeds:
                    start, seq.fed = seq.fed, seq.fed + n_prompt
                    if feed.want or feed.every:
                        row: np.ndarray | None = next(it)
                        try:
                            if feed.every:
                                row = self._score(seq, start, row)
                            if feed.want and row is not None:
                                self._advance(seq, row)
                        except Exception as e:  # this request fails; the others in the batch go on
                            if seq in self._live:
                                self._finish(seq, None, _failed(e))

    def _score(self, seq: _Seq, start: int, rows: np.ndarray) -> np.ndarray | None:
        """The log-probs of the prompt tokens that `rows` (the logits after each of prompt[start:...]) predict; once
        the whole prompt is read they go out in one Delta. The row to sample the answer's first token from, or None
        (more prompt to read, or `max_new_tokens` 0: the request ends here)."""
        assert seq.scored is not None and seq.sampling.prompt_logprobs is not None
        k = seq.sampling.prompt_logprobs
        for j, row in enumerate(rows[: len(seq.prompt) - start - 1]):
            seq.scored.append(lp := token_logprob(row, seq.prompt[start + j + 1], k))
            if not np.isfinite(lp.logprob):  # broken weights: no NaN goes out as a log-prob
                raise NonFiniteLogits(f"the model's logits are not finite at prompt token {start + j + 1}: its "
                                      "weights are broken")  # fmt: skip
        if seq.fed < len(seq.prompt):
            return None
        _send(seq, Delta("", [], None, prompt_logprobs=seq.scored))
        if seq.sampling.max_new_tokens == 0:
            self._finish(seq, "length")
            return None
        return rows[-1]

    def _advance(self, seq: _Seq, logits: np.ndarray) -> None:
        assert seq.sampler is not None and seq.text is not None
        token, lp = seq.sampler(logits)
        seq.out.append(token)
        if token in seq.stops:
            _send(seq, Delta("", [token], None, [lp] if lp else None))
            self._finish(seq, "stop")
            return
        text, hit = seq.text.push(token)
        _send(seq, Delta(text, [token], None, [lp] if lp else None))
        if hit:
            self._finish(seq, "stop")
        elif len(seq.out) >= seq.sampling.max_new_tokens:
            self._finish(seq, "length")


def _failed(e: Exception) -> EngineError:
    """The error a request gets when serving it raised `e` (an EngineError, e.g. NonFiniteLogits, as it is)."""
    return e if isinstance(e, EngineError) else EngineError(f"generation failed: {type(e).__name__}: {e}")


def _send(seq: _Seq, item: Delta | BaseException) -> None:
    """Hand `item` to the request's sink; a sink that raises (its client's event loop is gone) cancels the request
    instead of stopping the worker."""
    try:
        seq.sink(item)
    except Exception:
        seq.cancelled = True
