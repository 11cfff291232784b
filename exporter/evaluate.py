"""`exporter eval`: MMLU / C-Eval / CMMLU accuracy of any model we make, as LLaMA-Factory's `llamafactory-cli eval`.

Recipe: read LF's eval keys (its YAML unchanged: `task`, `task_dir`, `lang`, `n_shot`, `batch_size`, `save_dir`,
`template: fewshot` ...) -> load the benchmark from local CSV files (`exporter.benchmarks`) -> build every prompt
as LF does (same support draws, same token ids) -> one forward per batch through the inference engine (HF, HF +
adapter, GGUF, vLLM) -> the answer is the choice letter whose token has the largest logit after the prompt ->
accuracy per subject, per category and on average -> `results.json` (LF's per-question answers) and `results.log`
(LF's score lines), plus `scores.json` (per subject and category, with counts) in `save_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

from exporter import benchmarks
from exporter.errors import UserError
from exporter.hf_dir import NO_MODEL_CODE
from exporter.progress import progress

# keys of LF's eval YAML that change nothing here, and why (said once when given)
NO_EFFECT = {
    "finetuning_type": "finetuning_type (an adapter is attached as it is)",
    "download_mode": "download_mode (benchmarks are read from task_dir)",
    "cache_dir": "cache_dir (benchmarks are read from task_dir)",
    "trust_remote_code": f"trust_remote_code ({NO_MODEL_CODE})",
}


@dataclasses.dataclass
class EvalOptions:
    """LLaMA-Factory's eval keys (same names, defaults and meaning), plus `backend` and `max_questions`."""

    model_name_or_path: str
    task: str
    adapter_name_or_path: str | None = None
    template: str | None = None  # "fewshot" (LF's example): plain text; else a chat template family
    default_system: str | None = None  # LF's data arguments: the system prompt before the subject line
    enable_thinking: bool | None = True  # LF reasoning templates: false puts the empty thought into the prompt
    task_dir: str = "evaluation"
    lang: Literal["en", "zh"] = "en"
    n_shot: int = 5
    batch_size: int = 4
    seed: int = 42
    save_dir: str | None = None
    infer_backend: Literal["huggingface", "vllm"] = "huggingface"
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    backend: Literal["hf", "gguf", "vllm"] | None = None  # default: from the path (.gguf -> gguf)
    max_questions: int | None = None  # first N questions of each subject (a quick slice)
    finetuning_type: Literal["lora", "full", "freeze"] = "lora"
    download_mode: str | None = None
    cache_dir: str | None = None
    trust_remote_code: bool = False


@dataclasses.dataclass
class EvalResult:
    """Accuracy in percent per category ("Average" first) and per subject; LF's answers per subject."""

    categories: dict[str, float]
    subjects: dict[str, dict[str, Any]]
    answers: dict[str, list[str]]
    questions: int
    runtime: float
    save_dir: Path | None


DTYPES = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # LF infer_dtype -> engine


def say_no_effect(table: dict[str, str], given: set[str]) -> None:
    """One note line naming the given keys that have no effect here, and why."""
    keys = sorted(given & set(table))
    if keys:
        print(f"note: no effect here: {'; '.join(table[k] for k in keys)}", file=sys.stderr)


def engine_options(opts: Any, max_seqs: int, template: str | None) -> Any:
    """The engine's LoadOptions for LF's model keys (model_name_or_path, adapter_name_or_path, template,
    infer_backend, infer_dtype) plus exporter's `backend` (default: .gguf -> gguf, a dir -> hf)."""
    from exporter.engine import LoadOptions

    backend = opts.backend or ("vllm" if opts.infer_backend == "vllm" else None)
    return LoadOptions(opts.model_name_or_path, adapter=opts.adapter_name_or_path, backend=backend, template=template,
                       dtype=DTYPES[opts.infer_dtype], max_seqs=max_seqs)  # fmt: skip


def check(opts: EvalOptions) -> None:
    benchmarks.parse_task(opts.task)
    if opts.n_shot < 0 or opts.batch_size < 1:
        raise UserError(f"n_shot must be >= 0 and batch_size >= 1, got {opts.n_shot} and {opts.batch_size}")
    if opts.max_questions is not None and opts.max_questions < 1:
        raise UserError(f"max_questions must be >= 1, got {opts.max_questions}")
    from exporter import lf_names

    if opts.enable_thinking is not True and opts.template != "fewshot" and not lf_names.is_lf_name(opts.template):
        raise UserError("enable_thinking shapes a LLaMA-Factory reasoning template's prompt: set template: to a "
                        "LLaMA-Factory template name (exporter template list)")  # fmt: skip
    if opts.save_dir is not None and Path(opts.save_dir).exists():
        raise UserError(f"save_dir {opts.save_dir} already exists, use another one (as LLaMA-Factory requires)")


def build_prompts(opts: EvalOptions, subjects: list[benchmarks.Subject], encode: Any, chat_ids: Any) -> list[Any]:
    """[(subject index, question, prompt ids)] in LF's order (subjects as in mapping.json, questions in file order;
    the first `max_questions` of each subject when set).

    `template: fewshot` is LF's plain template: `default_system` and each message tokenized alone (no BOS, no special
    tokens), answers followed by a blank line, concatenated. Any other template is `chat_ids` (`lf_prompt_ids` for a
    LLaMA-Factory name, else the turns rendered through the chat template, `default_system` as a system turn)."""
    from exporter import lf_names

    sampler = benchmarks.SupportSampler(opts.seed)
    template = benchmarks.EVAL_TEMPLATES[opts.lang]
    lf_name = lf_names.is_lf_name(opts.template)
    out = []
    for k, sub in enumerate(subjects):
        for n, q in enumerate(sub.questions):
            support = [sub.dev[i] for i in sampler.indices(len(sub.dev), opts.n_shot)]
            if opts.max_questions is not None and n >= opts.max_questions:
                continue  # drawn all the same: a slice's prompts are the full run's prompts
            messages = benchmarks.format_example(template, q, support, sub.name)[:-1]
            if opts.template == "fewshot":
                ids = encode(opts.default_system) if opts.default_system else []
                for m in messages:
                    ids += encode(m["content"] + ("\n\n" if m["role"] == "assistant" else ""))
            elif opts.default_system and not lf_name:
                ids = chat_ids([{"role": "system", "content": opts.default_system}, *messages])
            else:
                ids = chat_ids(messages)
            out.append((k, q, ids))
    return out


class LFVocab:
    """What LF's encoder (`lf_templates.piece_ids`) asks of a tokenizer, on the engine's own vocabulary (HF or GGUF):
    a text tokenized alone (special tokens parsed, nothing added: LF's `encode(add_special_tokens=False)`), token
    texts as ids, bos/eos as LF's `fix_special_tokens` leaves them (`replace_eos`: the first stop word), and
    `stop_ids`, LF's stop tokens (that eos and the stop words) as ids."""

    def __init__(self, eng: Any, tpl: Any) -> None:
        self._eng = eng
        special = eng.chat_format.special
        eos = tpl.stop_words[0] if tpl.replace_eos and tpl.stop_words else special.get("eos_token")
        missing = [w for w in tpl.stop_words if self._id(w) is None]
        if missing:
            raise UserError(f"template {tpl.name!r} needs tokens the vocabulary of {eng.name} lacks "
                            f"({', '.join(missing)}); pick the LLaMA-Factory template of this model's "
                            "format")  # fmt: skip
        self.bos_token_id, self.eos_token_id = self._id(special.get("bos_token")), self._id(eos)
        self.stop_ids = {i for i in (self.eos_token_id, *map(self._id, tpl.stop_words)) if i is not None}

    def _id(self, token: str | None) -> int | None:
        ids = self._eng.tokenize(token) if token else []
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._eng.tokenize(text)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._id(token)


def lf_prompt_ids(eng: Any, name: str, opts: EvalOptions | None = None) -> Any:
    """messages -> LF's `template.encode_oneturn` prompt ids for the LLaMA-Factory template `name` (what
    `llamafactory-cli eval` scores): LF's slots, each piece tokenized alone, the template's default system (or
    `opts.default_system`), `opts.enable_thinking` for reasoning templates (false: the empty thought in the prompt)."""
    from exporter import lf_names
    from exporter import lf_templates as lf

    lf_opts = lf.LFOptions() if opts is None else lf.LFOptions(enable_thinking=opts.enable_thinking,
                                                               default_system=opts.default_system)  # fmt: skip
    tpl = lf.with_options(lf.load(name), lf_opts)
    vocab = LFVocab(eng, tpl)

    def ids(messages: list[dict[str, Any]]) -> list[int]:
        system, msgs = lf_names.to_lf(messages, tpl.tool_call_words)
        turns = [*msgs, {"role": "assistant", "content": ""}]
        return lf.encode_oneturn(vocab, tpl, turns, system, "", lf_opts)[0]

    return ids


def choice_ids(encode: Any) -> list[int]:
    """LF's choice tokens: the last token of each letter encoded alone."""
    ids = []
    for c in benchmarks.CHOICES:
        enc = encode(c)
        if not enc:
            raise UserError(f"the tokenizer encodes choice {c!r} as no token")
        ids.append(enc[-1])
    return ids


def answer(eng: Any, prompts: list[list[int]], letters: list[int], batch_size: int, advance: Any = None) -> list[str]:
    """The choice letter whose token has the largest next-token logit after each prompt (LF's argmax; the first
    letter wins a tie), in batches of `batch_size`, longest prompts first (the first batch shows the peak memory)."""
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        logits = eng.next_logits([prompts[i] for i in batch])[:, letters]
        for i, row in zip(batch, logits, strict=True):
            if not all(math.isfinite(float(x)) for x in row):  # argmax of NaN is "A": a score of garbage
                shown = ", ".join(f"{float(x):g}" for x in row)
                raise UserError(
                    f"{eng.name}: the answer letters' logits are not finite ({shown}) for question {i + 1}: the "
                    "model's weights are broken; no accuracy is reported"
                )
            out[i] = benchmarks.CHOICES[int(row.argmax())]
        if advance is not None:
            advance(len(batch))
    return out


def summarize(subjects: list[benchmarks.Subject], prompts: list[Any], answers: list[str]) -> tuple[dict, dict, dict]:
    """(categories, per-subject scores, per-subject answers) with LF's category order and Average first."""
    per: dict[int, list[bool]] = {}
    given: dict[str, list[str]] = {s.key: [] for s in subjects}
    for (k, q, _), a in zip(prompts, answers, strict=True):
        per.setdefault(k, []).append(a == q.answer)
        given[subjects[k].key].append(a)
    cats: dict[str, list[bool]] = {"Average": [], **{c: [] for c in benchmarks.CATEGORIES}}
    scores = {}
    for k, sub in enumerate(subjects):
        hits = per.get(k, [])
        cats.setdefault(sub.category, []).extend(hits)
        cats["Average"].extend(hits)
        scores[sub.key] = {"name": sub.name, "category": sub.category, "correct": sum(hits), "total": len(hits),
                           "accuracy": 100 * sum(hits) / len(hits)}  # fmt: skip
    categories = {c: 100 * sum(h) / len(h) for c, h in cats.items() if h}
    return categories, scores, given


def score_lines(categories: dict[str, float]) -> str:
    """LF's results.log text: one `{category:>15}: {accuracy:.2f}` line per category."""
    return "\n".join(f"{name:>15}: {acc:.2f}" for name, acc in categories.items())


def _write(save_dir: Path, result: EvalResult, opts: EvalOptions) -> None:
    from exporter.atomic import atomic_dir

    with atomic_dir(save_dir) as tmp:
        lf = {key: {str(i): a for i, a in enumerate(ans)} for key, ans in result.answers.items()}
        with open(tmp / "results.json", "w", encoding="utf-8", newline="\n") as f:
            json.dump(lf, f, indent=2)
        with open(tmp / "results.log", "w", encoding="utf-8", newline="\n") as f:
            f.write(score_lines(result.categories))
        scores = {"task": opts.task, "model": opts.model_name_or_path, "adapter": opts.adapter_name_or_path,
                  "n_shot": opts.n_shot, "lang": opts.lang, "template": opts.template, "questions": result.questions,
                  "runtime": round(result.runtime, 4), "categories": result.categories,
                  "subjects": result.subjects}  # fmt: skip
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def evaluate(opts: EvalOptions, given: set[str] | None = None) -> EvalResult:
    """Score `opts.task` on the model; write LF's results.json/results.log (+ scores.json) into save_dir."""
    from exporter.engine import load

    check(opts)
    say_no_effect(NO_EFFECT, given or set())
    from exporter import lf_names

    subjects = benchmarks.load_task(opts.task_dir, opts.task, unanswered=True)
    if any(not q.answer for s in subjects for q in s.questions):
        print(f"note: {opts.task} has no answers (C-Eval's test split): accuracy is 0 as in LLaMA-Factory; "
              "results.json in save_dir holds the answers to submit", file=sys.stderr)  # fmt: skip
    lf_name = lf_names.is_lf_name(opts.template)  # LF's prompt, as `llamafactory-cli eval` builds it
    own = opts.template == "fewshot" or lf_name
    with load(engine_options(opts, max_seqs=opts.batch_size, template=None if own else opts.template)) as eng:
        chat_ids = lf_prompt_ids(eng, opts.template, opts) if lf_name else eng.encode_chat
        prompts = build_prompts(opts, subjects, eng.tokenize, chat_ids)
        start = time.perf_counter()
        with progress(f"eval {opts.task}", "questions", len(prompts)) as advance:
            answers = answer(eng, [ids for _, _, ids in prompts], choice_ids(eng.tokenize), opts.batch_size, advance)
        runtime = time.perf_counter() - start
    categories, scores, given_answers = summarize(subjects, prompts, answers)
    save = Path(opts.save_dir) if opts.save_dir else None
    result = EvalResult(categories, scores, given_answers, len(prompts), runtime, save)
    print(score_lines(categories))
    if save is not None:
        _write(save, result, opts)
        print(f"wrote {save / 'results.json'}, results.log and scores.json", file=sys.stderr)
    return result


def main(argv: list[str]) -> EvalResult:
    """CLI entry: LLaMA-Factory style arguments (YAML + key=value, or --key value)."""
    from exporter import config as config_mod
    from exporter.lf_args import parse_args

    raw, where = parse_args(argv, EvalOptions)
    return evaluate(config_mod.build(EvalOptions, raw, where), set(raw))
