"""Training examples: samples -> token ids and labels through the chat template (only assistant turns and their
end-of-turn token trained), LLaMA-Factory's turn-by-turn truncation, packing (and neat packing: no attention across
packed examples), the validation split, and the batches of an epoch (length-sorted within shuffled windows,
right-padded). Preference stages get pairs (dpo) or tagged examples with KL pairs (kto) from `exporter.preference`.

As LLaMA-Factory 0.9.5 prepares them: `val_size` splits the rows before tokenizing (datasets' `train_test_split`),
and each split is tokenized in map batches of `preprocessing_batch_size` rows: pt blocks, SFT packing bins and KTO's
KL pairs never cross a batch.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import random
from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.lf_args import TrainConfig, say

IGNORE = -100


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    segments: list[int] | None = None  # neat packing: lengths of the packed examples (positions restart in each)

    @functools.cached_property
    def n_trained(self) -> int:
        """Positions with a next-token label (what the SFT loss averages over)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def _infer_seqlen(source: int, target: int, cutoff: int) -> tuple[int, int]:
    """LLaMA-Factory's budget split between a prompt part and its response part."""
    if target * 2 < cutoff:
        max_target = cutoff
    elif source * 2 < cutoff:
        max_target = cutoff - source
    else:
        max_target = max(int(cutoff * (target / (source + target))), 1)  # never zero: keep a label
    new_target = min(max_target, target)
    new_source = min(max(cutoff - new_target, 0), source)
    return new_source, new_target


def truncate(ids: list[int], labels: list[int], cutoff: int) -> tuple[list[int], list[int]]:
    """Cut to `cutoff` tokens turn by turn (prompt run, then trained run), keeping labels in the first turn."""
    if len(ids) <= cutoff:
        return ids, labels
    runs: list[tuple[int, int, bool]] = []  # (start, end, trained)
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            runs.append((start, i, labels[start] != IGNORE))
            start = i
    pairs: list[tuple[tuple[int, int], tuple[int, int]]] = []
    k = 0
    while k < len(runs):
        s, e, trained = runs[k]
        if trained:
            pairs.append(((s, s), (s, e)))
            k += 1
        elif k + 1 < len(runs):
            pairs.append(((s, e), runs[k + 1][:2]))
            k += 2
        else:
            pairs.append(((s, e), (e, e)))
            k += 1
    out_ids: list[int] = []
    out_labels: list[int] = []
    budget = cutoff
    for (ss, se), (ts, te) in pairs:
        if budget <= 0:
            break
        ns, nt = _infer_seqlen(se - ss, te - ts, budget)
        out_ids += ids[ss : ss + ns] + ids[ts : ts + nt]
        out_labels += labels[ss : ss + ns] + labels[ts : ts + nt]
        budget -= ns + nt
    return out_ids, out_labels


def check_template_tokens(tokenizer: Any, tpl: Any, model: str) -> None:
    """Every end-of-turn token of the template must be one token of the model's vocabulary."""
    for tok in tpl.eot_tokens:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        tid = tokenizer.convert_tokens_to_ids(tok)
        unk = tokenizer.unk_token_id if tok != tokenizer.unk_token else None  # Granite's unk is its eos
        if len(ids) != 1 or tid is None or (unk is not None and tid == unk):
            raise UserError(
                f"template {tpl.name!r} ends assistant turns with {tok!r}, but the tokenizer of {model} has no such "
                f"token (it splits into {len(ids)} pieces); pick the template of this model's family"
            )


def max_chars(tokenizer: Any, cutoff_len: int, floor: int = 2**16) -> int:
    """Where a text is cut before tokenizing: past `floor` characters and past cutoff_len x the vocabulary's longest
    token (plus a margin), so the cut cannot change the text's first cutoff_len tokens.

    A message longer than that is a row LLaMA-Factory would tokenize whole (a 50 MB row: minutes and tens of GB);
    exporter keeps what cutoff_len keeps of it, with one difference: when a turn's prompt and answer are both longer
    than half the budget, LF splits the budget by their full lengths, exporter by the cut ones (fewer answer tokens
    kept). Rows with no such message are tokenized exactly as LF does."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max(cutoff_len * max(longest, 1) + 4096, floor)


def tokenize_sft(
    samples: list, tokenizer: Any, tpl: Any, cfg: TrainConfig, drops: Any, limit: int | None = None
) -> list[Example]:
    """Samples -> (input_ids, labels) through the template; only assistant turns (+ end-of-turn) trained. Texts
    longer than `limit` (default `max_chars`) are cut before tokenizing (bounded time and memory for a huge row)."""
    from exporter import lf_names, render

    lf = tpl.kind == lf_names.KIND  # LF's encoder takes the rows as LF reads them and truncates as LF does
    out = []
    limit = limit or max_chars(tokenizer, cfg.cutoff_len)
    for s in samples:
        s = s.capped(limit)
        chat, tools = (lf_names.sample_messages(s), s.tools) if lf else (s.chat(), s.tool_list())
        try:
            ids, labels = render.encode(tokenizer, tpl, chat, tools=tools, train_on_prompt=cfg.train_on_prompt,
                                           cutoff_len=lf_names.cutoff(cfg) if lf else None)  # fmt: skip
        except UserError as e:
            raise UserError(f"{s.where}: {e}") from None
        if not lf:
            ids, labels = truncate(list(ids), list(labels), lf_names.cutoff(cfg))
        if not any(x != IGNORE for x in labels[1:]):
            drops.add("samples with no trained token left within cutoff_len", s.where)
            continue
        out.append(Example(ids, labels))
    return out


def tokenize_pt(batch: list, tokenizer: Any, cfg: TrainConfig, packing: bool, limit: int | None) -> list[Example]:
    """LLaMA-Factory's pretraining examples of one map batch: each text + the end of a document (`<|end_of_text|>`
    under template llama3, else eos); packing: the texts concatenated and cut into blocks (the remainder dropped),
    else one truncated example per text (each first cut to `limit` characters). A BOS only where the tokenizer's
    `add_bos_token` says so (LF's rule): it replaces the first token of a block, or goes before a text."""
    from exporter import lf_names

    eos = "<|end_of_text|>" if cfg.template == "llama3" else tokenizer.eos_token or ""
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    size = lf_names.cutoff(cfg)  # an explicit `packing: true` keeps one position free, pt's default packing not
    enc = [tokenizer.encode(s.text[:limit] + eos, add_special_tokens=False) for s in batch]
    if not packing:
        return [Example(ids, list(ids)) for e in enc for ids in [([bos] + e if bos is not None else e)[:size]]]
    flat = [t for ids in enc for t in ids]
    blocks = [flat[i : i + size] for i in range(0, len(flat) // size * size, size)]
    for b in blocks:
        b[0] = b[0] if bos is None else bos
    return [Example(b, list(b)) for b in blocks]


def batches(rows: list[Any], size: int) -> list[list[Any]]:
    """LLaMA-Factory's map batches: consecutive runs of `size` rows (preprocessing_batch_size)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def knapsack(lengths: list[int], capacity: int) -> list[list[int]]:
    """LLaMA-Factory's greedy knapsack on example lengths: each bin takes, again and again, the longest example that
    still fits (of equal lengths the last one first); the indexes of each bin in the order taken."""
    where: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        where.setdefault(n, []).append(i)
    pool = sorted(lengths)
    bins = []
    while pool:
        room, taken = capacity, []
        while (k := bisect.bisect(pool, room)) or not taken:  # an over-long example gets a bin of its own
            n = pool.pop(k - 1 if k else 0)
            room -= n
            taken.append(where[n].pop())
        bins.append(taken)
    return bins


def pack_sft(examples: list[Example], cutoff: int, neat: bool = False) -> list[Example]:
    """LLaMA-Factory's `packing` for SFT (one map batch): whole examples concatenated, in its knapsack's bins and
    order, into sequences of at most cutoff tokens; `neat` keeps each example's length so that positions restart
    and attention stays inside each example."""
    out = []
    for b in knapsack([len(e.input_ids) for e in examples], cutoff):
        ids = [t for i in b for t in examples[i].input_ids]
        labels = [t for i in b for t in examples[i].labels]
        out.append(Example(ids, labels, [len(examples[i].input_ids) for i in b] if neat else None))
    return out


def split_rows(rows: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """LLaMA-Factory's `val_size` split of the rows before tokenizing (datasets' `train_test_split`: a numpy
    permutation by seed, the first val_size rows of it for validation; a fraction rounded up, >= 1 a count). Both
    parts come in the permutation's order."""
    import numpy as np

    if val_size <= 1e-6:  # LF's threshold
        return rows, []
    n_val = int(val_size) if val_size >= 1 else math.ceil(val_size * len(rows))
    if n_val >= len(rows):
        raise UserError(f"val_size={val_size:g} takes {n_val} of the {len(rows)} rows for validation: none to train on")
    perm = np.random.default_rng(seed).permutation(len(rows)).tolist()
    return [rows[i] for i in perm[n_val:]], [rows[i] for i in perm[:n_val]]


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 64) -> list[list[int]]:
    """Batches for one epoch: shuffle, sort by length inside windows of `window` batches, shuffle the batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    size = batch_size * window
    batches: list[list[int]] = []
    for s in range(0, len(perm), size):
        chunk = sorted(perm[s : s + size], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def length(example: Any) -> int:
    """Tokens an example puts in each row of its batch (a pair: its longer answer's row)."""
    if isinstance(example, Example):
        return len(example.input_ids)
    if hasattr(example, "chosen_ids"):
        return max(len(example.chosen_ids), len(example.rejected_ids))
    return max(len(example.input_ids), len(example.kl_ids))


def n_tokens(example: Any) -> int:
    """Tokens an example feeds the model in a step (both rows of a pair; a KTO example and its KL pair)."""
    if isinstance(example, Example):
        return len(example.input_ids)
    if hasattr(example, "chosen_ids"):
        return len(example.chosen_ids) + len(example.rejected_ids)
    return len(example.input_ids) + len(example.kl_ids)


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad to the batch's longest example (labels -100 there; no mask when nothing is padded). Also, computed
    here on the host so the device never waits: the flat positions that predict a trained token (`index`), those
    tokens (`target`), their rows, and the counts. Neat-packed rows get restarting `position_ids` and no mask
    (transformers then keeps attention inside each packed example; padding becomes a segment of its own)."""
    import torch

    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    neat = any(e.segments for e in examples)
    pos = torch.zeros((len(examples), longest), dtype=torch.long) if neat else None
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
        if pos is not None:
            pos[r] = torch.cat([torch.arange(k) for k in [*(e.segments or [n]), longest - n] if k])
    padded = bool((mask == 0).any())
    keep = labels[:, 1:] != IGNORE
    rows, cols = keep.nonzero(as_tuple=True)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask if padded and not neat else None,
            "position_ids": pos, "index": rows * longest + cols, "target": labels[:, 1:][keep], "rows": rows,
            "tokens": int(mask.sum()), "n_trained": int(rows.numel())}  # fmt: skip


def causal_only(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its padding mask (training on CUDA). Rows are right-padded, so under causal attention no
    real token attends to a later pad, and pads are never scored (`index` skips them): the logits that count are the
    same, while SDPA runs its causal kernels instead of building and reading an L x L mask in every layer and
    attending to the whole square. Neat-packed batches have no mask already (their segments are in position_ids)."""
    return {k: None if k == "attention_mask" else causal_only(v) if isinstance(v, dict) else v
            for k, v in batch.items()}  # fmt: skip


def collate_pairs(pairs: list[Any], pad_id: int) -> dict[str, Any]:
    """DPO: one batch of the chosen rows followed by the rejected rows."""
    rows = [Example(p.chosen_ids, p.chosen_labels) for p in pairs]
    rows += [Example(p.rejected_ids, p.rejected_labels) for p in pairs]
    return collate(rows, pad_id)


def collate_kto(examples: list[Any], pad_id: int) -> dict[str, Any]:
    """KTO: the examples' batch, their KL pairs' batch (under "kl"), and which answers are desirable."""
    import torch

    batch = collate([Example(e.input_ids, e.labels) for e in examples], pad_id)
    batch["kl"] = collate([Example(e.kl_ids, e.kl_labels) for e in examples], pad_id)
    batch["desirable"] = torch.tensor([i for i, e in enumerate(examples) if e.desirable], dtype=torch.long)
    batch["undesirable"] = torch.tensor([i for i, e in enumerate(examples) if not e.desirable], dtype=torch.long)
    batch["n_desirable"] = sum(e.desirable for e in examples)
    return batch


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    """Tensors to `device`; on CUDA through pinned memory with non-blocking copies."""
    pin = device != "cpu"
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = to_device(v, device)
        elif hasattr(v, "to"):
            out[k] = (v.pin_memory() if pin else v).to(device, non_blocking=pin)
        else:
            out[k] = v
    return out


@dataclasses.dataclass
class Prepared:
    """Everything the loop needs from the data: the tokenizer, the template, and the examples split and packed."""

    tokenizer: Any
    tpl: Any  # ChatTemplate, or None for pretraining without a template
    train: list[Any]  # Example; PairExample (dpo); KTOExample (kto)
    val: list[Any]
    pad_id: int
    packing: bool


def prepare(cfg: TrainConfig, model_dir: Path) -> Prepared:
    """Datasets -> examples through the template; every data error surfaces here, before anything is written."""
    from exporter import data, hf_dir, lf_names

    packing = cfg.neat_packing or (cfg.packing if cfg.packing is not None else cfg.stage == "pt")
    fill = {k: v for k, v in (("name", cfg.identity_name), ("author", cfg.identity_author)) if v}
    rng = data.sampler(cfg.seed)  # num_samples subsets: the training loads draw first, eval_dataset's continue
    mix = {"mix_strategy": cfg.mix_strategy, "interleave_probs": cfg.interleave_probs}
    rows, drops = data.load_rows(cfg.dataset, cfg.dataset_dir, cfg.stage, cfg.max_samples, fill, cfg.seed, rng=rng,
                                 **mix)  # fmt: skip
    samples = [s for s in rows if s is not None]
    left = data.unfilled_placeholders(samples)
    if left:
        say(f"placeholders {', '.join('{{' + k + '}}' for k in sorted(left))} left in the data "
            "(set identity_name / identity_author to fill them)")  # fmt: skip
    tokenizer = hf_dir.load_tokenizer(model_dir, sentencepiece_prefix=True)  # one line if it cannot, no dir code run
    tpl = None
    if cfg.stage != "pt" or cfg.template:
        tpl = lf_names.resolve_for_training(model_dir, cfg)  # an LF name first, then a family, else the model's
        if tpl.tokenizer_fix is not None:
            tpl.tokenizer_fix(tokenizer)
        check_template_tokens(tokenizer, tpl, str(model_dir))
        for note in tpl.notes:
            say(note)

    # once: it reads the whole vocabulary; pt's packing trains on every token
    limit = None if cfg.stage == "pt" and packing else max_chars(tokenizer, cfg.cutoff_len)

    def tokenize(samples: list[Any], drops: Any, what: str) -> list[Any]:
        examples: list[Any] = []
        for batch in batches(samples, cfg.preprocessing_batch_size):  # LF's map batches
            if cfg.stage == "pt":
                examples += tokenize_pt(batch, tokenizer, cfg, packing, limit)
            elif cfg.stage == "sft":
                got = tokenize_sft(batch, tokenizer, tpl, cfg, drops, limit)
                examples += pack_sft(got, lf_names.cutoff(cfg), cfg.neat_packing) if packing else got
            else:
                examples += _tokenize_preference(batch, tokenizer, tpl, cfg, drops)
        if not examples:
            why = drops.summary()
            if cfg.stage == "pt" and packing:
                why = (f"no batch of preprocessing_batch_size={cfg.preprocessing_batch_size} rows fills one block of "
                       f"{lf_names.cutoff(cfg)} tokens (cutoff_len)")  # fmt: skip
            raise UserError(f"no usable {what} samples after tokenization: {why}")
        if drops.counts:
            say(f"dropped {sum(drops.counts.values())} {what} sample(s): {drops.summary()}")
        good = sum(e.desirable for e in examples) if cfg.stage == "kto" else -1
        if what == "training" and good in (0, len(examples)):
            say(f"kto: all {len(examples)} examples are {'desirable' if good else 'undesirable'}; KTO learns from "
                "both kinds")  # fmt: skip
        return examples

    if cfg.eval_dataset:  # LLaMA-Factory's eval_dataset: read and tokenized as the training sets, never split
        val_samples, val_drops = data.load(cfg.eval_dataset, cfg.dataset_dir, cfg.stage, cfg.max_samples, fill,
                                           cfg.seed, rng=rng, **mix)  # fmt: skip
        train_rows, val_rows, what = samples, val_samples, "eval_dataset"
    else:  # rows, before tokenizing, as LF splits them
        train_rows, val_rows = (  # a row LF drops when tokenizing still counts in its split
            [s for s in part if s is not None] for part in split_rows(rows, cfg.val_size, cfg.seed)
        )
        val_drops, what = data.Drops(), "validation"
    train_ex = tokenize(train_rows, drops, "training")
    val_ex = tokenize(val_rows, val_drops, what) if val_rows else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError(f"model {model_dir}: tokenizer has neither a pad nor an eos token")
    return Prepared(tokenizer, tpl, train_ex, val_ex, pad_id, packing)


def _tokenize_preference(samples: list, tokenizer: Any, tpl: Any, cfg: TrainConfig, drops: Any) -> list[Any]:
    """dpo: chosen/rejected pairs; kto: tagged examples with KL pairs (LF's warning when one kind is missing)."""
    from exporter import lf_names, preference, render

    lf = tpl.kind == lf_names.KIND  # LF's encoder takes the rows as LF reads them; the answer budget cuts, not it

    def lf_chat(s: Any, rejected: bool) -> tuple[list[dict[str, Any]], Any]:
        messages = lf_names.sample_messages(s)
        return (messages[:-1] + [s.rejected] if rejected else messages), s.tools

    chat = lf_chat if lf else preference.hf_chat

    def encode(messages: list[dict[str, Any]], tools: Any) -> tuple[list[int], list[int]]:
        return render.encode(
            tokenizer, tpl, messages, tools=tools, cutoff_len=lf_names.NO_CUT.cutoff_len if lf else None
        )

    if cfg.stage == "dpo":
        return preference.encode_pairs(samples, encode, cfg.cutoff_len, drops, chat)
    return preference.encode_kto(samples, encode, cfg.cutoff_len, drops, chat)
