"""`exporter predict`: batched generation over a held-out set with LLaMA-Factory's BLEU-4 / ROUGE scores.

Recipe (LF's `do_predict` + `predict_with_generate`, its YAML keys unchanged): load `eval_dataset` from
`dataset_info.json` (rows without a response kept with an empty answer, as LF predicts on them) -> for each sample,
the prompt is every turn before the last answer and the label what the template writes for that answer (LF's
`label` field: special tokens removed): for a LLaMA-Factory `template:` name LF's own `encode_oneturn` on its slots
(`lf_templates`, with `default_system`, `enable_thinking`, `tool_format`), else rendered through the model's chat
template (or the named family's), both cut to `cutoff_len` as LF cuts them -> generate through the inference
engine (HF, HF + adapter, GGUF or vLLM; continuous batching of `per_device_eval_batch_size` sequences; greedy unless
`do_sample`) with a progress bar -> `generated_predictions.jsonl` (`prompt`, `predict`, `label`) and
`predict_results.json` (`predict_bleu-4`, `predict_rouge-1/2/l`, runtime, samples/s; `exporter.metrics`).
`output_dir` must be absent, empty or an exporter output (a training run's dir, an earlier predict's), checked before
any work; its manifest records what predict wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from exporter.atomic import occupant
from exporter.data import check_max_samples
from exporter.errors import UserError
from exporter.hf_dir import NO_MODEL_CODE
from exporter.manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from collections.abc import Callable

    from exporter.data import Sample

    # one sample -> (prompt ids, label ids, the label text of (cut) label ids with/without special tokens)
    Encoder = Callable[[Sample], tuple[list[int], list[int], Callable[[list[int], bool], str]]]

PREDICTIONS = "generated_predictions.jsonl"
RESULTS = "predict_results.json"
COMBINED = "all_results.json"  # HF's save_metrics(combined=True): train and predict results together

# keys of LF's predict YAML that change nothing here, and why (said once when given)
NO_EFFECT = {
    "overwrite_cache": "overwrite_cache (no preprocessing cache)",
    "preprocessing_num_workers": "preprocessing_num_workers (tokenized in this process)",
    "overwrite_output_dir": "overwrite_output_dir (predict replaces its own files in output_dir)",
    "ddp_timeout": "ddp_timeout (one process)",
    "finetuning_type": "finetuning_type (an adapter is attached as it is)",
    "trust_remote_code": f"trust_remote_code ({NO_MODEL_CODE})",
    "report_to": "report_to (metrics go to predict_results.json)",
    "length_penalty": "length_penalty (beam search only)",
}


@dataclasses.dataclass
class PredictOptions:
    """LLaMA-Factory's predict keys (same names and meaning). Different on purpose: `do_sample` defaults to false
    (greedy, so runs are reproducible; LF samples by default) and `backend` picks hf/gguf/vllm from the path."""

    model_name_or_path: str
    output_dir: str
    eval_dataset: list[str] = dataclasses.field(default_factory=list)
    adapter_name_or_path: str | None = None
    template: str | None = None
    default_system: str | None = None
    enable_thinking: bool | None = True
    tool_format: str | None = None
    dataset_dir: str = "data"
    cutoff_len: int = 2048
    max_samples: int | None = None
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = "concat"
    interleave_probs: list[float] | None = None
    per_device_eval_batch_size: int = 8
    predict_with_generate: bool = True
    do_predict: bool = True
    stage: Literal["sft"] = "sft"
    do_sample: bool = False
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    max_new_tokens: int = 1024
    max_length: int | None = 1024  # LF's: the prompt and answer together, used when max_new_tokens <= 0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    seed: int = 42
    infer_backend: Literal["huggingface", "vllm"] = "huggingface"
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    backend: Literal["hf", "gguf", "vllm"] | None = None
    identity_name: str | None = None
    identity_author: str | None = None
    overwrite_cache: bool = False
    preprocessing_num_workers: int | None = None
    overwrite_output_dir: bool = False
    ddp_timeout: int = 1800
    finetuning_type: Literal["lora", "full", "freeze"] = "lora"
    trust_remote_code: bool = False
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["none"])


@dataclasses.dataclass
class Example:
    prompt_ids: list[int]
    label: str  # LF's label text (special tokens removed)
    label_raw: str  # the same with special tokens (skip_special_tokens: false)
    where: str


@dataclasses.dataclass
class PredictResult:
    metrics: dict[str, float]
    predictions: list[str]
    labels: list[str]
    output_dir: Path


def check(opts: PredictOptions) -> None:
    """Reject what LF's predict keys ask for that we cannot honour."""
    if not opts.eval_dataset:
        raise UserError("eval_dataset: name one or more datasets of dataset_info.json (eval_dataset: a,b)")
    if not opts.predict_with_generate:
        raise UserError("predict_with_generate: false scores token accuracy without generating; exporter predict "
                        "generates (set predict_with_generate: true)")  # fmt: skip
    if not opts.do_predict:
        raise UserError("do_predict is false: nothing to do")
    if opts.num_beams != 1:
        raise UserError(f"num_beams: {opts.num_beams}: beam search is not supported; use 1 (greedy or sampling)")
    if opts.per_device_eval_batch_size < 1 or opts.cutoff_len < 2:
        raise UserError("per_device_eval_batch_size must be >= 1 and cutoff_len >= 2")
    if opts.max_new_tokens < 1 and opts.max_length is None:
        raise UserError("max_new_tokens must be >= 1 (or set max_length)")
    check_max_samples(opts.max_samples)
    from exporter import lf_args, lf_names

    lf_args.check_mix(opts)
    from exporter import lf_templates as lf

    if lf_names.is_lf_name(opts.template):
        lf.with_options(lf.load(opts.template or ""), lf_options(opts))  # an unknown tool_format, before any work
    elif opts.enable_thinking is not True or opts.tool_format is not None:
        raise UserError("enable_thinking and tool_format shape LLaMA-Factory's template slots: set template: to a "
                        "LLaMA-Factory template name (exporter template list)")  # fmt: skip


def lf_options(opts: PredictOptions) -> Any:
    """LF's data arguments that shape the predict prompt (`lf_templates.LFOptions`)."""
    from exporter import lf_templates as lf

    return lf.LFOptions(enable_thinking=opts.enable_thinking, default_system=opts.default_system,
                        tool_format=opts.tool_format)  # fmt: skip


def check_output(out: Path) -> None:
    """output_dir must be absent, an empty dir or an exporter output (a training run's dir, where `exporter train`
    with do_predict writes, or an earlier predict's): predict writes its files into it, never over a user's file."""
    if occupant(out) != "other":
        return
    if not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory; predict writes {PREDICTIONS} and {RESULTS} "
                        "into a directory: choose a new or empty one")  # fmt: skip
    raise UserError(f"output_dir {out} is not empty and not an exporter output (no {MANIFEST_NAME}); not writing "
                    f"{PREDICTIONS} and {RESULTS} into it: choose a new or empty directory")  # fmt: skip


def sampling(opts: PredictOptions, max_new_tokens: int, stop_ids: set[int] | None = None) -> Any:
    """The engine's Sampling for LF's generation keys (greedy unless do_sample), stopping also at `stop_ids`."""
    from exporter.engine import Sampling

    common = {"max_new_tokens": max_new_tokens, "repetition_penalty": opts.repetition_penalty,
              "skip_special_tokens": opts.skip_special_tokens, "stop_ids": tuple(sorted(stop_ids or ()))}  # fmt: skip
    if not opts.do_sample:
        return Sampling(temperature=0.0, **common)
    return Sampling(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed, **common)


def _label(eng: Any, answer: str, suffix: str, ids: list[int], skip_special: bool) -> str:
    """LF's label: the template's text for the answer with special tokens removed (ChatML: "answer\n"). The answer
    itself is taken as written, so labels are the same text whatever backend's detokenizer the model has."""
    if suffix.startswith(answer) and ids == eng.tokenize(suffix):
        return answer + eng.decode(eng.tokenize(suffix[len(answer) :]), skip_special)
    return eng.decode(ids, skip_special)


def lf_encoder(eng: Any, opts: PredictOptions) -> tuple[Encoder, set[int]]:
    """(encoder, LF's stop ids) for the LLaMA-Factory template `opts.template`: LF's UnsupervisedDatasetProcessor, which
    `predict_with_generate` uses (`template.encode_oneturn` on its slots, the eos after the answer of `efficient_eos`
    templates), with `default_system`, `enable_thinking` and `tool_format` applied; labels decoded as LF decodes
    them."""
    from exporter import lf_names
    from exporter import lf_templates as lf
    from exporter.evaluate import LFVocab

    lf_opts = lf_options(opts)
    tpl = lf.with_options(lf.load(opts.template or ""), lf_opts)
    vocab = LFVocab(eng, tpl)

    def encode(s: Sample) -> tuple[list[int], list[int], Callable[[list[int], bool], str]]:
        tools = lf_names.tools_json(s.tools)
        prompt, answer = lf.encode_oneturn(vocab, tpl, s.messages, s.system, tools, lf_opts)
        if tpl.efficient_eos:
            answer = [*answer, vocab.eos_token_id]
        return prompt, answer, eng.decode

    return encode, vocab.stop_ids


def jinja_encoder(eng: Any, opts: PredictOptions) -> Encoder:
    """The encoder of a chat template rendered as Jinja (the model's own, a family name or a .jinja file):
    `default_system` is the system of rows without one (`check` refuses enable_thinking and tool_format here);
    the label is what the template writes after the prompt."""
    from exporter.engine import EngineError

    def encode(s: Sample) -> tuple[list[int], list[int], Callable[[list[int], bool], str]]:
        chat, tools = s.chat(), s.tool_list()
        if opts.default_system and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": opts.default_system}, *chat]
        if chat[-1]["role"] != "assistant":
            raise UserError(f"{s.where}: the last turn must be the answer to predict")
        try:
            prompt_text = eng.render(chat[:-1], tools, add_generation_prompt=True)
            full_text = eng.render(chat, tools, add_generation_prompt=False)
        except EngineError as e:  # the template's own raise_exception (e.g. Mistral's tool-call ids)
            raise UserError(f"{s.where}: {e}") from None
        # the label is what the template writes after the prompt (e.g. "answer<|im_end|>\n"); where the template
        # renders the history differently once answered (thinking blocks), the answer alone
        answer = chat[-1]["content"] or ""
        suffix = full_text[len(prompt_text) :] if full_text.startswith(prompt_text) else answer
        return eng.tokenize(prompt_text), eng.tokenize(suffix), lambda ids, skip: _label(eng, answer, suffix, ids, skip)

    return encode


def build_examples(eng: Any, samples: list[Any], cutoff_len: int, encode: Encoder) -> tuple[list[Example], int]:
    """(examples, how many were cut to cutoff_len): prompt ids and LF's label for each sample."""
    from exporter.examples import _infer_seqlen

    out, cut = [], 0
    for s in samples:
        prompt_ids, label_ids, label = encode(s)
        src, tgt = _infer_seqlen(len(prompt_ids), len(label_ids), cutoff_len)
        if (src, tgt) != (len(prompt_ids), len(label_ids)):
            cut += 1
            prompt_ids, label_ids = prompt_ids[:src], label_ids[:tgt]
        if not prompt_ids:
            raise UserError(f"{s.where}: cutoff_len {cutoff_len} leaves no prompt token")
        out.append(Example(prompt_ids, label(label_ids, True), label(label_ids, False), s.where))
    return out, cut


def _max_new(opts: PredictOptions, ex: Example) -> int:
    """LF's rule: max_new_tokens when > 0, else max_length (prompt + answer) minus the prompt."""
    if opts.max_new_tokens > 0 or opts.max_length is None:
        return max(opts.max_new_tokens, 1)
    left = opts.max_length - len(ex.prompt_ids)
    if left < 1:
        raise UserError(f"{ex.where}: the prompt has {len(ex.prompt_ids)} tokens, max_length is {opts.max_length}")
    return left


def _answer_ids(c: Any, stop_ids: set[int] | frozenset[int]) -> list[int]:
    ids = list(c.token_ids)
    return ids[:-1] if ids and c.finish_reason == "stop" and ids[-1] in stop_ids else ids


def _speed(n: int, batches: int, runtime: float) -> dict[str, float]:
    """HF Trainer's speed metrics (same names, same rounding)."""
    return {"predict_runtime": round(runtime, 4), "predict_samples_per_second": round(n / runtime, 3),
            "predict_steps_per_second": round(batches / runtime, 3)}  # fmt: skip


def _predict_only(out: Path) -> bool:
    """Whether `out` holds nothing but what predict writes (its files, its manifest, their temporaries): a dir of
    predict's own, whose manifest it may rewrite when it is unreadable (a kill or a full disk in an older version)."""
    from exporter.atomic import leftover

    ours = (PREDICTIONS, RESULTS, COMBINED, MANIFEST_NAME)
    return all(p.name in ours or (leftover(p.name) or ("",))[0] in ours for p in out.iterdir())


def _begin(out: Path) -> None:
    """Mark `out` incomplete before its files are replaced, so that a kill in between never leaves new predictions
    beside old scores under a manifest that looks whole: predict's own dir gets an incomplete predict manifest;
    another stage's finished output (a training run's dir) keeps its manifest, marked `complete: false` with
    `pending: predict` until `_record` completes it; anything else (a run still writing it) is left as it is."""
    from exporter import manifest

    doc = manifest.read(out)
    if doc is None and (not (out / MANIFEST_NAME).exists() or _predict_only(out)):
        manifest.mark(out, "predict")
    elif doc is not None and doc.get("stage") in (None, "predict"):
        manifest.mark(out, "predict")
    elif doc is not None and doc.get("complete") is not False and isinstance(doc.get("outputs"), list):
        manifest.save(out / MANIFEST_NAME, doc | {"complete": False, "pending": "predict"})


def _write_outputs(out: Path, examples: list[Example], eng: Any, preds: list[str], metrics: dict) -> list[str]:
    """Write LF's files into `out` (marked incomplete first, `_begin`, so that a crash midway leaves a dir the
    next run may reuse and nobody takes for whole); returns their names."""
    from exporter.atomic import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    _begin(out)
    with atomic_file(out / PREDICTIONS) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for ex, pred in zip(examples, preds, strict=True):
            row = {"prompt": eng.decode(ex.prompt_ids, False), "predict": pred, "label": ex.label}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with atomic_file(out / RESULTS) as tmp:
        tmp.write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    combined = out / COMBINED
    merged = json.loads(combined.read_text(encoding="utf-8")) if combined.is_file() else {}
    with atomic_file(combined) as tmp:
        tmp.write_text(json.dumps(merged | metrics, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    return [PREDICTIONS, RESULTS, combined.name]


def _record(out: Path, opts: PredictOptions, written: list[str]) -> None:
    """The manifest of `out`: predict's own (its settings and dataset files), or, in another stage's output (a
    training run's dir), that manifest with the rows of the files predict wrote replaced, so it still matches."""
    from exporter import dataset_info, manifest

    doc = manifest.read(out)
    if doc is None and not _predict_only(out):
        return  # another stage's unreadable manifest: not ours to repair
    if doc is not None and doc.get("stage") not in (None, "predict"):
        pending = doc.pop("pending", None) == "predict"  # `_begin`'s mark
        if (doc.get("complete") is False and not pending) or not isinstance(doc.get("outputs"), list):
            return  # a run still writing it (or an unreadable one) keeps its manifest as it is
        if pending:
            doc.pop("complete", None)
        kept = [r for r in doc["outputs"] if not (isinstance(r, dict) and r.get("path") in written)]
        doc["outputs"] = kept + [row for name in written for row in manifest.describe(out / name, out)]
        manifest.save(out / MANIFEST_NAME, doc)
        return
    info = dataset_info.read_info(Path(opts.dataset_dir))
    inputs = {f"dataset:{n}": dataset_info.spec(n, info, Path(opts.dataset_dir)).source for n in opts.eval_dataset}
    manifest.write(out, "predict", inputs=inputs, settings=dataclasses.asdict(opts))


def predict(opts: PredictOptions, given: set[str] | None = None) -> PredictResult:
    """Generate an answer for every sample of `eval_dataset`, score them as LF does, write LF's files."""
    from exporter.atomic import claim

    check(opts)
    out = Path(opts.output_dir)
    with claim(out):  # one run per output_dir, checked before any work
        check_output(out)
        return _predict(opts, given, out)


def _predict(opts: PredictOptions, given: set[str] | None, out: Path) -> PredictResult:
    """`predict` with `out` claimed and checked."""
    from exporter import data, lf_names, metrics
    from exporter.engine import EngineError, load
    from exporter.evaluate import engine_options, say_no_effect
    from exporter.progress import progress

    say_no_effect(NO_EFFECT, given or set())
    metrics.warm()  # fail on a missing [eval] extra before the model loads; jieba's dictionary outside the timing
    fill = {k: v for k, v in (("name", opts.identity_name), ("author", opts.identity_author)) if v}
    samples, drops = data.load(opts.eval_dataset, opts.dataset_dir, "sft", opts.max_samples, fill, opts.seed,
                               unlabeled=True, mix_strategy=opts.mix_strategy,
                               interleave_probs=opts.interleave_probs)  # fmt: skip
    if drops.counts:
        print(f"note: dropped {sum(drops.counts.values())} sample(s): {drops.summary()}", file=sys.stderr)
    with load(engine_options(opts, opts.per_device_eval_batch_size, opts.template)) as eng:
        if lf_names.is_lf_name(opts.template):
            encode, stops = lf_encoder(eng, opts)
        else:
            encode, stops = jinja_encoder(eng, opts), set()
        examples, cut = build_examples(eng, samples, opts.cutoff_len, encode)
        if cut:
            print(f"note: {cut} sample(s) cut to cutoff_len={opts.cutoff_len} as LLaMA-Factory cuts them",
                  file=sys.stderr)  # fmt: skip
        start = time.perf_counter()
        with progress("predict", "samples", len(examples)) as advance:
            try:
                done = eng.generate(
                    [e.prompt_ids for e in examples],
                    [sampling(opts, _max_new(opts, e), stops) for e in examples],
                    progress=lambda i, c: advance(),
                )  # fmt: skip
            except EngineError as e:  # NaN logits, a failed forward: one line naming the sample, nothing written
                where = examples[e.index].where if e.index is not None else opts.eval_dataset
                raise UserError(f"{where}: {e}") from None
        answers = [_answer_ids(c, eng.stop_ids | stops) for c in done]
        preds = [eng.decode(a, True) for a in answers]
        labels = [e.label for e in examples]
        scores = metrics.similarity(preds, labels)  # LF scores the texts without special tokens
        runtime = time.perf_counter() - start
        result = {f"predict_{k}": v for k, v in scores.items()}
        batches = math.ceil(len(examples) / opts.per_device_eval_batch_size)
        result |= _speed(len(examples), batches, runtime)
        if opts.skip_special_tokens:
            written = _write_outputs(out, examples, eng, preds, result)
        else:
            raw = [dataclasses.replace(e, label=e.label_raw) for e in examples]
            written = _write_outputs(out, raw, eng, [eng.decode(a, False) for a in answers], result)
    _record(out, opts, written)
    print("***** predict metrics *****")
    for k in sorted(result):
        print(f"  {k:<28} = {result[k]}")
    print(f"wrote {out / PREDICTIONS} and {out / RESULTS}", file=sys.stderr)
    return PredictResult(result, preds, labels, out)


def options(raw: dict[str, Any], where: str) -> tuple[PredictOptions, set[str]]:
    """PredictOptions from LF keys; training-only keys (a training YAML reused for prediction) are said, not fatal."""
    from exporter import config as config_mod
    from exporter.lf_args import TrainConfig

    fields = {f.name for f in dataclasses.fields(PredictOptions)}
    train_only = sorted(k for k in raw if k not in fields and k in {f.name for f in dataclasses.fields(TrainConfig)})
    if train_only:
        print(f"note: no effect without do_train: {', '.join(train_only)}", file=sys.stderr)
    kept = {k: v for k, v in raw.items() if k not in train_only}
    return config_mod.build(PredictOptions, kept, where), set(kept)


def split_train_args(raw: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """LF's `do_predict` in an `exporter train` config: (training keys or None, prediction keys or None).

    Without do_train (LF's default) a do_predict config only predicts; with both, prediction runs on the freshly
    trained output_dir (the adapter, or the full model)."""
    if not raw.get("do_predict"):
        return raw, None
    if not raw.get("do_train"):
        return None, raw
    fields = {f.name for f in dataclasses.fields(PredictOptions)}
    from exporter.lf_args import TrainConfig

    shared = {f.name for f in dataclasses.fields(TrainConfig)} & fields
    train = {k: v for k, v in raw.items() if k not in fields or k in shared}
    pred = {k: v for k, v in raw.items() if k in fields}
    if raw.get("finetuning_type", "lora") == "lora":
        pred["adapter_name_or_path"] = raw.get("output_dir")
    else:
        pred["model_name_or_path"] = raw.get("output_dir")
    return train, pred


def main(argv: list[str]) -> PredictResult:
    """CLI entry: LLaMA-Factory style arguments (YAML + key=value, or --key value)."""
    from exporter.lf_args import parse_args

    raw, where = parse_args(argv, PredictOptions)
    return predict(*options(raw, where))
