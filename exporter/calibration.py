"""Calibration token blocks for GPTQ/AWQ: the user's own data rendered through the chat template, packed.

Rows come from a dataset registered in a LLaMA-Factory `dataset_info.json` (or the built-in multilingual text set),
are rendered and tokenized exactly as in training (`exporter.render.encode`), shuffled with a seed, joined with
EOS and cut into `max_length` blocks: short conversations are packed together, long ones span blocks; nothing is
silently dropped. Rows that cannot be used are counted per reason and reported.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.errors import UserError

if TYPE_CHECKING:
    from exporter.quantize import Names

MIN_BLOCKS = 8  # fewer than min(samples, 8) full blocks of calibration tokens is too little to estimate activations


@dataclasses.dataclass
class Calibration:
    """Packed token blocks plus where they came from and what was left out."""

    blocks: list[list[int]]
    source: str
    rows_used: int
    rows_total: int
    rejected: Counter = dataclasses.field(default_factory=Counter)

    @property
    def tokens(self) -> int:
        return sum(len(b) for b in self.blocks)

    def describe(self) -> dict[str, Any]:
        """Settings-style summary for the manifest."""
        return {
            "source": self.source,
            "blocks": len(self.blocks),
            "tokens": self.tokens,
            "rows_used": self.rows_used,
            "rows_total": self.rows_total,
            "rejected": dict(self.rejected),
        }


def _default_conversations(seed: int) -> list[tuple[list[dict[str, Any]], Any]]:
    """The built-in paragraphs, shuffled and paired into user/assistant turns."""
    from exporter.calibration_texts import DEFAULT_TEXTS

    texts = list(DEFAULT_TEXTS)
    random.Random(seed).shuffle(texts)
    if len(texts) % 2:
        texts.append(texts[0])
    return [
        ([{"role": "user", "content": texts[i]}, {"role": "assistant", "content": texts[i + 1]}], None)
        for i in range(0, len(texts), 2)
    ]


def _dataset_conversations(
    names: list[str], dataset_dir: Path, seed: int, rejected: Counter
) -> list[tuple[list[dict[str, Any]], Any]]:
    """Conversations of the named datasets, via `exporter.data` (rows it drops are counted in `rejected`)."""
    from exporter import data

    samples, drops = data.load(names, dataset_dir, stage="sft", seed=seed)
    for reason, n in drops.counts.items():
        rejected[f"dataset: {reason}"] += n
    return [(s.chat(), s) for s in samples]


def _text_file_sequences(path: Path, tokenizer: Any, rejected: Counter) -> tuple[list[list[int]], int]:
    """Raw `text` rows of a JSON/JSONL/CSV/Parquet/Arrow/TXT file (LLaMA-Factory's export_quantization_dataset, e.g. its
    c4_demo.jsonl), tokenized as plain text with the tokenizer's own special tokens; (sequences, rows read)."""
    from exporter import data, dataset_info

    info = {path.name: {"file_name": path.name, "columns": {"prompt": "text"}}}
    sp = dataset_info.spec(path.name, info, path.parent)
    drops = data.Drops()
    samples = data.convert(sp, dataset_info.read_rows(sp), "pt", {}, drops)
    for reason, n in drops.counts.items():
        rejected[f"dataset: {reason}"] += n
    return [tokenizer(s.text)["input_ids"] for s in samples], len(samples) + sum(drops.counts.values())


def text_file(dataset: str | None) -> Path | None:
    """`dataset` as a file of raw `text` rows (tokenized as plain text), or None when it names datasets."""
    return Path(dataset) if dataset and Path(dataset).is_file() else None


def dataset_source(dataset: str, dataset_dir: Path | str | None) -> Path:
    """The file calibration reads for `dataset`: the text file itself, else the dataset_info.json naming it."""
    return text_file(dataset) or Path(dataset_dir or "data") / "dataset_info.json"


def check_inputs(
    dataset: str | None, dataset_dir: Path | str | None, samples: int, max_length: int, names: Names | None = None
) -> None:
    """The calibration settings, and that `dataset` is a file or names datasets of dataset_dir's dataset_info.json
    (before any model is loaded); `names`: what the user calls each option."""
    from exporter import dataset_info
    from exporter.config import did_you_mean

    if names is None:
        from exporter.quantize import FLAGS as names
    if samples < 1:
        raise UserError(f"{names.samples} must be at least 1, got {samples}")
    if max_length < 16:
        raise UserError(f"{names.max_length} must be at least 16 tokens, got {max_length}")
    if not dataset:
        if dataset_dir:
            raise UserError(f"{names.dataset_dir} given without {names.dataset}: name the dataset(s) to calibrate on")
        return
    if text_file(dataset):
        return
    said = f"{names.dataset} {dataset}"
    if Path(dataset).is_dir():
        raise UserError(f"{said}: a directory; give a file of raw `text` rows or dataset names from dataset_info.json")
    info_path = Path(dataset_dir or "data") / dataset_info.INFO_NAME
    if not info_path.is_file():
        raise UserError(f"{said}: no such file, and no {info_path} to look it up in as a dataset name")
    info = dataset_info.read_info(info_path.parent)
    for name in (n.strip() for n in dataset.split(",") if n.strip()):
        if name not in info:
            raise UserError(
                f"{said}: no such file, and dataset {name!r} is not defined in {info_path}{did_you_mean(name, info)}"
            )
        dataset_info.spec(name, info, info_path.parent)


def _encoded(
    convs: list[tuple[list[dict[str, Any]], Any]], tokenizer: Any, tpl: Any, rejected: Counter
) -> Iterator[list[int]]:
    """Token ids of each conversation, rendered through the chat template (a model without one: its messages' text
    joined by blank lines); failures are counted, not raised."""
    from exporter import render

    for messages, sample in convs:
        try:
            tools = sample.tool_list() if sample is not None else None
            if tpl.kind == "none":
                text = "\n\n".join(str(m.get("content") or "") for m in messages)
                ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            else:
                ids, _ = render.encode(tokenizer, tpl, messages, tools=tools)
        except UserError as e:
            rejected[f"template {tpl.name!r} cannot render it: {str(e)[:120]}"] += 1
            continue
        if not ids:
            rejected["renders to no tokens"] += 1
            continue
        yield ids


def pack(
    seqs: Iterator[list[int]], eos_id: int | None, max_length: int, n_blocks: int, enders: frozenset[int] = frozenset()
) -> tuple[list[list[int]], int]:
    """Join sequences with EOS and cut into `max_length` blocks.

    No EOS is added after a sequence whose last two ids hold EOS or one of `enders` (the template's end-of-turn
    tokens, which ChatML-style templates follow with a newline): such a sequence is already terminated.

    Stops once `n_blocks` full blocks exist; a shorter last block is kept only when fewer than `n_blocks` full
    blocks could be made. Returns (blocks, sequences consumed).
    """
    stream: list[int] = []
    used = 0
    need = n_blocks * max_length
    for ids in seqs:
        stream.extend(ids)
        if eos_id is not None and not ({eos_id, *enders} & set(ids[-2:])):
            stream.append(eos_id)
        used += 1
        if len(stream) >= need:
            break
    blocks = [stream[i : i + max_length] for i in range(0, min(len(stream), need), max_length)]
    return blocks, used


def build(
    tokenizer: Any,
    tpl: Any,
    dataset: str | None,
    dataset_dir: Path | str | None,
    samples: int,
    max_length: int,
    seed: int,
    names: Names | None = None,
) -> Calibration:
    """Calibration blocks of `max_length` tokens (at most `samples` of them) from `dataset` (dataset_info.json names,
    or a file of raw `text` rows) or the built-in texts; `names`: what the user calls each option."""
    if names is None:
        from exporter.quantize import FLAGS as names
    check_inputs(dataset, dataset_dir, samples, max_length, names)
    rejected: Counter = Counter()
    eos = tokenizer.eos_token_id
    text = text_file(dataset)
    if text is not None:
        seqs, rows_total = _text_file_sequences(text, tokenizer, rejected)
        order = list(range(len(seqs)))
        random.Random(seed).shuffle(order)
        blocks, used = pack(iter([seqs[i] for i in order]), eos, max_length, samples)
        cal = Calibration(blocks, f"text file {dataset}", rows_used=used, rows_total=rows_total, rejected=rejected)
        return _enough(cal, samples, max_length, names)
    if dataset:
        sets = [n.strip() for n in dataset.split(",") if n.strip()]
        ddir = Path(dataset_dir) if dataset_dir else Path("data")
        convs = _dataset_conversations(sets, ddir, seed, rejected)
        source = f"dataset {','.join(sets)} from {ddir / 'dataset_info.json'}"
    else:
        convs = _default_conversations(seed)
        source = "built-in multilingual texts"
    rows_total = len(convs) + sum(rejected.values())  # rows exporter.data dropped count too
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    enders = frozenset(i for i in tokenizer.convert_tokens_to_ids(list(tpl.eot_tokens)) if i is not None)
    seqs = _encoded([convs[i] for i in order], tokenizer, tpl, rejected)
    blocks, used = pack(seqs, eos, max_length, samples, enders)
    cal = Calibration(blocks, source, rows_used=used, rows_total=rows_total, rejected=rejected)
    return _enough(cal, samples, max_length, names)


def _enough(cal: Calibration, samples: int, max_length: int, names: Names) -> Calibration:
    """`cal`, or a UserError saying what was found and why rows were left out when it is too little."""
    need_blocks = min(samples, MIN_BLOCKS)
    if cal.tokens < need_blocks * max_length:
        why = "; ".join(f"{n} rows: {r}" for r, n in cal.rejected.most_common()) or "no rows were rejected"
        lower = f"lower {names.max_length}"
        fix = f", {lower}, or omit {names.dataset} for the built-in set" if names.builtin else f" or {lower}"
        raise UserError(
            f"calibration set too small: {cal.source} gives {cal.tokens} tokens from {cal.rows_used} usable rows "
            f"(of {cal.rows_total}), need at least {need_blocks * max_length} ({need_blocks} blocks of "
            f"{names.max_length} {max_length}); rejected: {why}. Add rows{fix}"
        )
    return cal
