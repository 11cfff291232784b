"""exporter verify: prove an export is faithful — templates, stop tokens, tokenizer, numbers and chat, compared
across the training renderer, the adapter (PEFT), the merged HF dir, every GGUF (llama.cpp) and every Modelfile.

One public entry, `verify(VerifyOptions) -> Report`. The checks, one module each (rows of the report, see `report`):
1. `template`  training renderer == exported HF Jinja == GGUF `tokenizer.chat_template` == Modelfile TEMPLATE;
2. `stops`     every end-of-turn token is EOG in each GGUF, a `PARAMETER stop` in each Modelfile, and in
               `generation_config.json` `eos_token_id`;
3. `tokenizer` HF ids == GGUF (llama.cpp) ids on a built-in multilingual corpus, rendered chats and the data texts;
4. `numbers`   perplexity, KL divergence and top-1 agreement of adapter vs merged vs each GGUF/quantized dir on the
               SAME token ids, each within a limit per type;
5. `chat`      greedy answers through the template: full-precision GGUFs match HF token for token;
6. `metadata`  each GGUF's context length, add_bos_token and RoPE scaling (factor tensors, scaling keys) are the
               HF model's (transformers' RoPE functions);
7. `modelfile` each Modelfile's FROM/ADAPTER resolve to files, a FROM file is a verified GGUF of the type the
               Modelfile's name says, and every PARAMETER is one `ollama create` accepts;
8. `accuracy`  (with `eval_dir`) MMLU/C-Eval/CMMLU accuracy of merged vs each GGUF on a small slice;
9. `weights`   each quantized GGUF's tensors, dequantized, within a bound per ggml type of a float GGUF's (`weights`).
`artifacts` holds the options and reads the inputs, `corpus` the built-in texts (data files in `corpora/`).
"""

from __future__ import annotations

import time

from exporter.converters.gguf_read import read_kv
from exporter.errors import UserError
from exporter.verify.accuracy import check_accuracy, pick_task
from exporter.verify.artifacts import (
    GGUFInfo,
    Modelfile,
    VerifyOptions,
    artifacts_json,
    check_inputs,
    collect,
    data_texts,
    discover,
    exported_templates,
    gen_eos,
    parse_modelfile,
    quantized_kind,
    read_gguf,
    tokenizer_source,
)
from exporter.verify.chat import check_chat
from exporter.verify.corpus import CHAT_PROMPTS, HELD_OUT_TEXT, PROBE_CONVERSATIONS, TOKENIZER_CORPUS
from exporter.verify.metadata import check_metadata
from exporter.verify.modelfile import check_modelfiles
from exporter.verify.numbers import (
    DEFAULT_KLD,
    DEFAULT_THRESHOLDS,
    DEFAULT_TOP1,
    LIMITS,
    check_numbers,
    check_thresholds,
    limits_of,
    load_hf,
    parse_thresholds,
    score,
    windows,
)
from exporter.verify.report import Check, Report
from exporter.verify.stops import check_stops, eot_ids
from exporter.verify.template import check_template, render_each, training_template
from exporter.verify.tokenizer import check_tokenizer
from exporter.verify.weights import check_weights

__all__ = [
    "CHAT_PROMPTS",
    "DEFAULT_KLD",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_TOP1",
    "HELD_OUT_TEXT",
    "LIMITS",
    "PROBE_CONVERSATIONS",
    "TOKENIZER_CORPUS",
    "Check",
    "GGUFInfo",
    "Modelfile",
    "Report",
    "VerifyOptions",
    "check_thresholds",
    "discover",
    "limits_of",
    "parse_modelfile",
    "parse_thresholds",
    "quantized_kind",
    "read_gguf",
    "read_kv",
    "score",
    "verify",
    "windows",
]


def _data(art: VerifyOptions) -> tuple[list[str], list[str]]:
    """Texts (at most 200) and user prompts of the training data files."""
    texts: list[str] = []
    prompts: list[str] = []
    for p in art.data:
        t, q = data_texts(p)
        texts, prompts = texts + t, prompts + q
    return list(dict.fromkeys(texts))[:200], list(dict.fromkeys(prompts))


def verify(opts: VerifyOptions) -> Report:
    """Run every check that the given artifacts allow; a pipeline `run_dir` fills in whatever is not given."""
    t0 = time.perf_counter()
    art = collect(opts)
    check_inputs(art)
    if art.eval_dir is not None:  # a bad benchmark dir fails before any model is loaded
        art.eval_task = pick_task(art.eval_dir, art.eval_task)
    limits = limits_of(art)
    quantized_kinds = [quantized_kind(q) for q in art.quantized]  # bad dirs fail before any model is loaded
    infos = [read_gguf(p) for p in art.ggufs]
    mfs = [parse_modelfile(p) for p in art.modelfiles]
    texts, data_prompts = _data(art)

    from exporter.hf_dir import load_tokenizer

    tok_dir = tokenizer_source(art)
    if tok_dir is None:
        raise UserError("verify needs an HF tokenizer: give --merged (or --adapter/--base) with the GGUF files")
    tok = load_tokenizer(tok_dir)  # one line when it cannot load, never the dir's code

    tpl, reason = training_template(art.template, art)
    exported = exported_templates(art.merged) if art.merged else {}
    checks = check_template(tpl, reason, tok, exported, infos, mfs)
    gen = gen_eos(art.merged) or []
    eot = eot_ids(tok, tpl, gen)
    checks += check_stops(eot, art.merged, infos, mfs, tok, gen, tpl.stop if tpl is not None else None)
    checks += check_metadata(infos, art.merged or art.base, tok)
    checks += check_modelfiles(mfs, infos)
    checks += check_weights(infos)
    chat_source = tpl.jinja if tpl is not None else tok.chat_template
    chat_texts = render_each(tok, chat_source, PROBE_CONVERSATIONS) if chat_source else []
    checks += check_tokenizer(tok, infos, texts, chat_texts)
    hf_model = load_hf(art.merged) if art.merged else None
    checks += check_numbers(art, tok, hf_model, infos, quantized_kinds, limits, art.ctx, art.max_windows)
    if art.eval_dir is not None:
        if art.merged is None:
            checks.append(Check("accuracy", "-", "skip", "eval_dir compares merged and the GGUFs: give merged"))
        else:
            checks += check_accuracy(art.eval_dir, art.eval_task, art.merged, infos, art.eval_questions)
    prompt_list = (data_prompts + CHAT_PROMPTS)[: art.prompts]
    checks += check_chat(tok, hf_model, chat_source, infos, prompt_list, gen or list(eot.values()), art.max_new_tokens)

    from exporter import manifest

    artifacts = {**artifacts_json(art), "template": tpl.name if tpl is not None else None}
    return Report(
        checks, artifacts, limits["ppl_threshold"], time.perf_counter() - t0, manifest.versions(),
        kld_thresholds=limits["kld_threshold"], top1_thresholds=limits["top1_threshold"],
    )  # fmt: skip
