"""One inference engine for chat, serve, predict, eval and verify: HF (transformers, PEFT), GGUF (llama.cpp) and
vLLM backends behind the same chat template, stops, sampler and continuous-batching scheduler.

    from exporter.engine import LoadOptions, Sampling, load

    with load(LoadOptions("out/merged")) as eng:             # or "model.gguf", adapter="out/lora", backend="vllm"
        ids = eng.encode_chat([{"role": "user", "content": "Who are you?"}])
        print(eng.generate([ids], Sampling(max_new_tokens=64))[0].text)          # batched, greedy
        for d in eng.stream(ids, Sampling(temperature=0.7, seed=1)):             # streaming, sampled
            print(d.text, end="")
        eng.next_logits([ids])                                                    # [1, vocab] next-token logits
        eng.logits(ids)                                                           # [len(ids), vocab]

API (stable; changes are additive):
- `LoadOptions`, `Sampling` in; `Completion`, `Delta`, `TokenLogprob` out (api.py); `Sampling.prompt_logprobs`
  scores the prompt's own tokens in the batch (`max_new_tokens` 0: nothing generated), for /v1/completions' echo.
  `Sampling.grammar` (GBNF, engine/grammar.py: JSON / a JSON schema / a tool call) constrains an answer with
  llama.cpp's grammar sampler (gguf backend; `Engine.check_grammar` says up front whether it can).
- `load(opts) -> Engine`; `from_hf_model(model, tokenizer, opts) -> Engine` (a model already in memory);
  `Engine.render / tokenize / encode_chat / encode_text / decode / token_bytes` (the model's own Jinja, rendered by
  transformers for HF dirs and GGUF files alike), `text_offsets`, `submit / stream / generate / chat`,
  `logits / next_logits`, `load / error`,
  `stop_ids` (end ids the model declares plus the template's end-of-turn token), `eos_ids`, `chat_format`
  (`ChatFormat`: template, tool format), `close`.
- Errors: `UserError` for what cannot be loaded; `EngineError` (and `ContextOverflow`, `QueueFull`, `EngineClosed`,
  `NonFiniteLogits`) for a request.
"""

from exporter.engine.api import (
    BACKENDS,
    Completion,
    ContextOverflow,
    Delta,
    EngineClosed,
    EngineError,
    LoadOptions,
    NonFiniteLogits,
    QueueFull,
    Sampling,
    TokenLogprob,
)
from exporter.engine.chat_format import ChatFormat, normalize_messages, parse_tool_calls
from exporter.engine.core import Engine, choose_backend, collect, from_hf_model, load

__all__ = [
    "BACKENDS",
    "ChatFormat",
    "Completion",
    "ContextOverflow",
    "Delta",
    "Engine",
    "EngineClosed",
    "EngineError",
    "LoadOptions",
    "NonFiniteLogits",
    "QueueFull",
    "Sampling",
    "TokenLogprob",
    "choose_backend",
    "collect",
    "from_hf_model",
    "load",
    "normalize_messages",
    "parse_tool_calls",
]
