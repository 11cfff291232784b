"""The `vllm` backend (optional extra, GPU machines): vLLM's `LLMEngine` does the batching and paging; prompts,
stops, stop strings and text streaming stay ours, so answers end exactly where the hf and gguf backends end them.

Not exercised by the test suite (no GPU on the test machines): only the not-installed error is tested.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from exporter.engine.api import ContextOverflow, Delta, EngineClosed, EngineError, LoadOptions, Sampling, TokenLogprob
from exporter.engine.chat_format import ChatFormat
from exporter.engine.core import Engine, _chat_format, _model_and_adapter
from exporter.engine.sampling import RANDOM_SEED, TextStream, check_sampling
from exporter.engine.scheduler import Sink
from exporter.errors import UserError
from exporter.hf_dir import load_tokenizer, tokenizer_dir


def _vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise UserError(
            "the vllm backend needs vLLM and a GPU: pip install 'exporter[vllm]' (or use --backend hf / a .gguf)"
        ) from None
    return vllm


class _Request:
    def __init__(self, rid: str, n_prompt: int, sampling: Sampling, stops: frozenset[int], sink: Sink, text: Any):
        self.rid, self.n_prompt, self.sampling, self.stops = rid, n_prompt, sampling, stops
        self.sink, self.text = sink, text
        self.seen = 0
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VLLMEngine(Engine):
    """`Engine` on vLLM: same template, tokenizer, stops and text streaming; vLLM's scheduler and kernels."""

    def __init__(self, opts: LoadOptions) -> None:
        vllm = _vllm()

        model_dir, adapter = _model_and_adapter(opts)
        self.tok = load_tokenizer(tokenizer_dir(model_dir, adapter))
        from exporter.engine import hf

        args = vllm.EngineArgs(
            model=str(model_dir),
            tokenizer=str(model_dir),
            tensor_parallel_size=opts.tensor_parallel,
            max_num_seqs=opts.max_seqs,
            enable_lora=adapter is not None,
            dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(opts.dtype, "auto"),
            **({"max_model_len": opts.ctx} if opts.ctx else {}),
        )
        self.llm = vllm.LLMEngine.from_engine_args(args)
        from vllm.lora.request import LoRARequest

        self.lora = LoRARequest("adapter", 1, str(adapter)) if adapter else None
        self._vllm = vllm
        special = {k: v for k, v in self.tok.special_tokens_map.items() if isinstance(v, str)}
        template = self.tok.chat_template if isinstance(self.tok.chat_template, str) else None
        fmt: ChatFormat = _chat_format(template, opts.template, special, str(adapter or model_dir))
        self.kind, self.name, self.chat_format, self.options = "vllm", (adapter or model_dir).resolve().name, fmt, opts
        self.backend = self  # tokenize/decode/special_ids below serve the shared helpers
        self.vocab_size = len(self.tok)
        self.n_ctx = int(self.llm.model_config.max_model_len)
        self.eos_ids = frozenset(hf.eos_ids(model_dir, self.tok))
        ends = self.tokenize(fmt.end_of_turn()) if fmt.end_of_turn() else []
        self.stop_ids = self.eos_ids | ({ends[0]} if ends and ends[0] in self.special_ids() else set())
        self._lock = threading.RLock()
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine-vllm", daemon=True)
        self._thread.start()

    # Backend-side helpers used by Engine's text methods.
    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def bos_prefix(self) -> list[int]:
        from exporter.engine import hf

        return hf.bos_prefix(self.tok)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def token_bytes(self, token: int) -> bytes:
        from exporter.engine import hf

        return hf.token_bytes(self.tok, token)

    def special_ids(self) -> set[int]:
        return set(self.tok.all_special_ids) | {i for i, t in self.tok.added_tokens_decoder.items() if t.special}

    def submit(self, prompt: Sequence[int], sampling: Sampling, sink: Sink, bounded: bool = True) -> Any:
        check_sampling(sampling)
        if sampling.prompt_logprobs is not None:
            raise EngineError("the vllm backend gives no prompt log-probs; score with the hf or gguf backend")
        if sampling.grammar is not None:
            raise EngineError("the vllm backend cannot constrain an answer to a grammar; the gguf backend can")
        if self._closed:
            raise EngineClosed("the engine is closed")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        stops = frozenset(sampling.stop_ids) | (frozenset() if sampling.ignore_eos else self.stop_ids)
        skip = sampling.skip_special_tokens
        text = TextStream(lambda ids, skip=skip: self.decode(ids, skip), sampling.stop)
        req = _Request(f"r{next(self._ids)}", len(prompt), sampling, stops, sink, text)
        params = self._vllm.SamplingParams(
            n=1,
            max_tokens=min(sampling.max_new_tokens, self.n_ctx - len(prompt)),
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,  # vLLM's: OpenAI's, over the answer so far, as ours
            frequency_penalty=sampling.frequency_penalty,
            seed=None if sampling.seed in (None, RANDOM_SEED) else sampling.seed % 2**63,
            ignore_eos=True,  # our stop ids decide (below), as on the other backends
            logprobs=sampling.logprobs,
            logit_bias=dict(sampling.logit_bias) or None,
            detokenize=False,
        )
        with self._lock:
            self.llm.add_request(req.rid, {"prompt_token_ids": list(prompt)}, params, lora_request=self.lora)
        self._inbox.put(req)
        return req

    def _run(self) -> None:
        live: dict[str, _Request] = {}
        while not self._closed:
            while True:
                try:
                    item = self._inbox.get(block=not live)
                except queue.Empty:
                    break
                if item is None:
                    return
                live[item.rid] = item
            for rid in [r for r, q in live.items() if q.cancelled]:
                self._end(live.pop(rid), "cancelled")
            with self._lock:
                outs = self.llm.step() if live else []
            for out in outs:
                req = live.get(out.request_id)
                if req is not None and self._advance(req, out):
                    live.pop(out.request_id, None)

    def _advance(self, req: _Request, out: Any) -> bool:
        """Hand new tokens to the sink; True when the request is over."""
        comp = out.outputs[0]
        new = list(comp.token_ids[req.seen :])
        lps = comp.logprobs[req.seen :] if comp.logprobs else None
        for k, t in enumerate(new):
            req.seen += 1
            lp = None
            if lps is not None:
                top = sorted(((i, float(v.logprob)) for i, v in lps[k].items()), key=lambda x: -x[1])
                chosen = next((v for i, v in top if i == t), float("nan"))
                lp = [TokenLogprob(t, chosen, top[: req.sampling.logprobs])]
            if t in req.stops:
                req.sink(Delta("", [t], None, lp))
                return self._end(req, "stop")
            text, hit = req.text.push(t)
            req.sink(Delta(text, [t], None, lp))
            if hit:
                return self._end(req, "stop")
        if out.finished:
            return self._end(req, "length")
        return False

    def _end(self, req: _Request, reason: str) -> bool:
        with self._lock:
            self.llm.abort_request([req.rid])
        tail = req.text.finish() if reason != "cancelled" else ""
        req.sink(Delta(tail, [], reason))
        return True

    def load(self) -> tuple[int, int]:
        return self.llm.get_num_unfinished_requests(), 0

    @property
    def error(self) -> str | None:
        return "the engine is closed" if self._closed else None

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        raise EngineError("the vllm backend gives no full logits; score with the hf or gguf backend")

    def next_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        raise EngineError("the vllm backend gives no full logits; score with the hf or gguf backend")

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join()


def load(opts: LoadOptions) -> Engine:
    return VLLMEngine(opts)
