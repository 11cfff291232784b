"""The engine's data: what to load, how to sample, what comes back. Plain dataclasses, no behaviour."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

BACKENDS = ("hf", "gguf", "vllm")
DTYPES = ("auto", "fp32", "bf16", "fp16")  # hf: --dtype
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class LoadOptions:
    """What to load. `model` is an HF dir (base, merged, `exporter quantize` output), a PEFT adapter dir (its base
    is read from `adapter_config.json`) or a `.gguf` file; `adapter` a PEFT dir (hf, vllm) or a GGUF LoRA (gguf).
    `backend` forces one of `BACKENDS` (default: `.gguf` -> gguf, a dir -> hf)."""

    model: str
    adapter: str | None = None
    backend: str | None = None
    template: str | None = None  # a LLaMA-Factory or family name (or .jinja file): the Jinja it means
    dtype: str = "auto"  # hf: auto (fp32 on CPU, the checkpoint's dtype on a GPU) | fp32 | bf16 | fp16
    device: str | None = None  # hf: cpu, cuda, cuda:1 ... (default: cuda when available)
    max_seqs: int = 8  # sequences decoded together (continuous batching); 1 = one at a time
    max_waiting: int = 256  # requests queued behind them before submit() raises QueueFull (0: no queue)
    ctx: int | None = None  # tokens a prompt + answer may hold; gguf: KV cells per sequence (default 4096 or the
    #                         training ctx if less); hf: default the model's max positions; vllm: max len; 0: the
    #                         model's training context
    threads: int | None = None  # gguf, hf: CPU threads (default: all cores; hf: torch's default)
    batch_tokens: int = 512  # gguf: tokens per llama_decode call (prompt chunks + one per decoding sequence)
    lora_scale: float = 1.0  # gguf: scale of the GGUF LoRA
    tensor_parallel: int = 1  # vllm: GPUs to shard the model over


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 (or top_k 1) is greedy; a seed makes sampling repeatable per request."""

    max_new_tokens: int = 512  # 0 only with prompt_logprobs: the prompt is read and scored, nothing generated
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # HF's: divides positive / multiplies negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of each token the answer already holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once for each time the answer already holds the token
    min_p: float = 0.0  # HF's MinPLogitsWarper (after top-p): drop tokens below min_p x the top token's probability
    seed: int | None = None
    stop: tuple[str, ...] = ()  # extra stop strings; the answer ends before them
    stop_ids: tuple[int, ...] = ()  # extra stop token ids, besides the model's end-of-turn ids
    ignore_eos: bool = False  # do not stop at the model's end-of-turn ids (benchmarks)
    logprobs: int | None = None  # None: no log-probs; k >= 0: the chosen token's and the top-k per step
    skip_special_tokens: bool = True  # in `text`: leave out special tokens (as LLaMA-Factory's default)
    prompt_logprobs: int | None = None  # k >= 0: each prompt token's log-prob (given those before it) and the top-k
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias in [-100, 100]) added to its logit
    grammar: str | None = None  # a GBNF grammar (llama.cpp's) the answer must follow (engine/grammar.py)

    def replace(self, **kw: object) -> Sampling:
        return dataclasses.replace(self, **kw)  # type: ignore[arg-type]

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and the `top` alternatives (token id, log-prob), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """One streaming event: new text (whole characters only) and the tokens behind it; the last one has a
    `finish_reason`. With `Sampling.prompt_logprobs`, one event (no text, no tokens) before the answer's first holds
    `prompt_logprobs`: one per prompt token, None for the first (nothing before it to predict it)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    """A finished answer. `token_ids` are the generated tokens, including the stop token that ended it (if one
    did); `text` is the answer without it and without a stop string. `finish_reason`: stop | length | cancelled."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with Sampling.prompt_logprobs (see Delta)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class EngineError(Exception):
    """A request the engine cannot serve (prompt longer than the context, bad sampling values ...)."""

    index: int | None = None  # Engine.generate: which of its prompts failed (0-based)


class ContextOverflow(EngineError):
    """The prompt alone fills the context (`prompt_tokens` >= `n_ctx`): no token of an answer fits."""

    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(f"the prompt is {prompt_tokens} tokens; the context holds {n_ctx}")
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx


class NonFiniteLogits(EngineError):
    """The model gave NaN/inf logits for a request (broken weights): that request fails, the others go on."""


class QueueFull(EngineError):
    """The bounded queue of waiting requests is full (a server answers 429)."""


class EngineClosed(EngineError):
    """The engine was closed, or its worker died (a server answers 503)."""
