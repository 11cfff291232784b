"""Datasets described by LLaMA-Factory's `dataset_info.json`, converted to one conversation format.

Every row becomes a `Sample`: `messages` (roles user / assistant / observation / function, alternating
user-side and assistant-side turns, ending with an assistant turn for SFT), an optional `system` and `tools`.
`Sample.chat()` gives the HF-style message list that `exporter.render.encode` consumes; the entries and the rows
of their files come from `exporter.dataset_info`.
Preference data (LLaMA-Factory's formats): a `ranking: true` dataset (stage dpo) gives samples whose last message
is the chosen answer and `rejected` the other one (alpaca `chosen`/`rejected` text columns, sharegpt messages
ending with the user turn plus `chosen`/`rejected` message objects); stage kto reads a `kto_tag` column (true:
a desirable answer, false: an undesirable one) next to ordinary SFT rows.
Rows that cannot be used are dropped and counted per reason; bad files and malformed rows are errors naming
the file and row.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.config import did_you_mean
from exporter.dataset_info import INFO_NAME, DatasetSpec, read_info, read_rows, spec
from exporter.errors import UserError

if TYPE_CHECKING:
    import numpy as np

STAGES = ("sft", "pt", "dpo", "kto")


@dataclasses.dataclass
class Sample:
    """One training example in the internal format; `where` names the file and row it came from."""

    messages: list[dict[str, str]]
    system: str | None = None
    tools: str | None = None
    where: str = ""
    rejected: dict[str, str] | None = None  # stage dpo: the rejected answer (the chosen one ends `messages`)
    kto_tag: bool | None = None  # stage kto: whether the answer ending `messages` is desirable

    def chat(self, rejected: bool = False) -> list[dict[str, Any]]:
        """HF-style messages: system first, observation -> `tool`, function call -> assistant `tool_calls`;
        `rejected=True` ends with the rejected answer instead of the chosen one."""
        out: list[dict[str, Any]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        messages = self.messages
        if rejected:
            if self.rejected is None:
                raise ValueError(f"{self.where}: not a preference pair")
            messages = messages[:-1] + [self.rejected]
        for m in messages:
            if m["role"] == "observation":
                out.append({"role": "tool", "content": m["content"]})
            elif m["role"] == "function":
                out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(m["content"], self.where)})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return out

    def tool_list(self) -> list[dict[str, Any]] | None:
        """The `tools` column parsed from JSON (a list of function schemas), or None."""
        if not self.tools:
            return None
        try:
            tools = json.loads(self.tools) if isinstance(self.tools, str) else self.tools
        except json.JSONDecodeError as e:
            raise UserError(f"{self.where}: tools is not valid JSON ({e})") from None
        tools = tools if isinstance(tools, list) else [tools]
        return [t if "function" in t else {"type": "function", "function": t} for t in tools]

    def capped(self, max_chars: int) -> Sample:
        """This sample with every text cut to `max_chars` characters and the turns that start after `max_chars`
        characters of conversation dropped, so a huge row costs bounded time and memory to tokenize.

        With `max_chars` >= cutoff_len x the longest token (in characters) plus a margin (`examples.max_chars`),
        what is cut lies beyond the first cutoff_len tokens of its text and a dropped turn starts after the cutoff
        budget is spent: a row with no longer text is returned as it is."""
        kept: list[dict[str, str]] = []
        seen = 0
        for i, m in enumerate(self.messages):
            if i % 2 == 0 and seen >= max_chars:
                break  # a whole turn after the budget: LLaMA-Factory's loop stops before it
            kept.append({**m, "content": m["content"][:max_chars]})
            seen += len(m["content"])
        system = self.system[:max_chars] if self.system else self.system
        if (
            len(kept) == len(self.messages)
            and system == self.system
            and all(len(m["content"]) <= max_chars for m in self.messages)
        ):
            return self
        return dataclasses.replace(self, messages=kept, system=system)

    @property
    def text(self) -> str:
        """Raw text for stage pt: the first message's content (LLaMA-Factory's rule)."""
        return self.messages[0]["content"]


def _tool_calls(content: str, where: str) -> list[dict[str, Any]]:
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: function call content is not valid JSON ({e})") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for c in calls:
        if not isinstance(c, dict) or "name" not in c:
            raise UserError(f"{where}: function call must be {{'name': ..., 'arguments': ...}}, got {c!r}")
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({"type": "function", "function": {"name": c["name"], "arguments": args}})
    return out


@dataclasses.dataclass
class Drops:
    """Rows dropped per reason, with the first place each reason was seen."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    first: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def summary(self) -> str:
        return "; ".join(f"{n} {r} (first: {self.first[r]})" for r, n in self.counts.most_common())


# ---------------------------------------------------------------- converting rows


def _fill(value: Any, fill: dict[str, str]) -> Any:
    if isinstance(value, str) and "{{" in value:
        for key, sub in fill.items():
            value = value.replace("{{" + key + "}}", sub)
    return value


def _text(value: Any, what: str, where: str, optional: bool = True) -> str:
    if value is None and optional:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: malformed row: {what} must be a string, got {type(value).__name__}")
    return value


def _alpaca(
    sp: DatasetSpec,
    row: dict[str, Any],
    where: str,
    stage: str,
    drops: Drops,
    unlabeled: bool = False,
    keep_empty: bool = False,
) -> Sample | None:
    """One alpaca row; `unlabeled` (predict): a row without a response gets an empty answer, as LLaMA-Factory's
    unsupervised rows (`response = []`) are predicted on; `keep_empty`: see `convert`."""
    c = sp.columns
    messages: list[dict[str, str]] = []
    hist = row.get(c["history"]) if c["history"] else None
    if isinstance(hist, list):  # LLaMA-Factory's rule: anything else (a CSV cell's text, null) is no history
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in hist):
            raise UserError(f"{where}: malformed row: history must be a list of [prompt, response] pairs")
        for old_prompt, old_response in hist:
            messages.append({"role": "user", "content": _text(old_prompt, "history prompt", where, False)})
            messages.append({"role": "assistant", "content": _text(old_response, "history response", where, False)})
    query = []
    for key in ("prompt", "query"):
        if c[key]:
            value = _text(row.get(c[key]), c[key], where)
            if value:
                query.append(value)
    messages.append({"role": "user", "content": "\n".join(query)})
    rejected = None
    if stage == "dpo":
        pair = _answers(sp, row, where, drops)
        if pair is None:
            return None
        messages.append(pair[0])
        rejected = pair[1]
    elif stage in ("sft", "kto"):
        response = row.get(c["response"]) if c["response"] else None
        if response is None and unlabeled:
            response = ""
        if not isinstance(response, (str, int, float)) or isinstance(response, bool):
            if response is None:
                drops.add("rows without a response", where)
                return None
            raise UserError(f"{where}: malformed row: {c['response']} must be a string, got {type(response).__name__}")
        messages.append({"role": "assistant", "content": str(response)})
    elif not messages[0]["content"] and not keep_empty:
        drops.add("rows with empty text", where)
        return None
    system = _text(row.get(c["system"]), c["system"], where) if c["system"] else ""
    tools = row.get(c["tools"]) if c["tools"] else None
    return _finish(Sample(messages, system or None, tools or None, where, rejected), sp, row, stage, drops)


def _answers(
    sp: DatasetSpec, row: dict[str, Any], where: str, drops: Drops
) -> tuple[dict[str, str], dict[str, str]] | None:
    """The (chosen, rejected) answer messages of a ranking row: strings (alpaca) or message objects (sharegpt)."""
    t = sp.tags
    out = []
    for key in ("chosen", "rejected"):
        value = row.get(sp.columns[key])
        if value is None:
            drops.add("preference rows without both a chosen and a rejected answer", where)
            return None
        if isinstance(value, dict) and sp.formatting == "sharegpt":
            if t["role_tag"] not in value or t["content_tag"] not in value:
                raise UserError(
                    f"{where}: malformed row: {sp.columns[key]} must be a message with {t['role_tag']!r} and "
                    f"{t['content_tag']!r}, got {value!r}"
                )
            role = {t["assistant_tag"]: "assistant", t["function_tag"]: "function"}.get(value[t["role_tag"]])
            if role is None:
                drops.add(f"preference rows whose {key} answer is not an assistant turn", where)
                return None
            value = value[t["content_tag"]]
        else:
            role = "assistant"
        out.append({"role": role, "content": _text(value, sp.columns[key], where, optional=False)})
    return out[0], out[1]


def _finish(sample: Sample, sp: DatasetSpec, row: dict[str, Any], stage: str, drops: Drops) -> Sample | None:
    """Stage kto: attach the row's `kto_tag` (true/false; csv's "true"/"false" too) or drop a row without one."""
    if stage != "kto":
        return sample
    value = row.get(sp.columns["kto_tag"])
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        value = value.strip().lower() in ("true", "1")
    if value is None:
        drops.add("rows without a kto_tag", sample.where)
        return None
    if not isinstance(value, bool):
        raise UserError(
            f"{sample.where}: malformed row: {sp.columns['kto_tag']} (kto_tag) must be true or false, got {value!r}"
        )
    sample.kto_tag = value
    return sample


def _sharegpt(
    sp: DatasetSpec, row: dict[str, Any], where: str, stage: str, drops: Drops, keep_empty: bool = False
) -> Sample | None:
    c, t = sp.columns, sp.tags
    msgs = row.get(c["messages"])
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise UserError(f"{where}: malformed row: {c['messages']} must be a list of messages") from None
    if not isinstance(msgs, list):
        raise UserError(
            f"{where}: malformed row: {c['messages']} must be a list of messages, got {type(msgs).__name__}"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or t["role_tag"] not in m or t["content_tag"] not in m:
            raise UserError(
                f"{where}: malformed row: message {i + 1} must be an object with {t['role_tag']!r} and "
                f"{t['content_tag']!r} (set tags.role_tag / tags.content_tag in dataset_info.json), got {m!r}"
            )
    system = ""
    if t["system_tag"] and msgs and msgs[0][t["role_tag"]] == t["system_tag"]:
        system = _text(msgs[0][t["content_tag"]], "system message", where)
        msgs = msgs[1:]
    elif c["system"]:
        system = _text(row.get(c["system"]), c["system"], where)
    roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant"}
    if t["observation_tag"]:
        roles[t["observation_tag"]] = "observation"
    if t["function_tag"]:
        roles[t["function_tag"]] = "function"
    odd, even = {"user", "observation"}, {"assistant", "function"}
    messages = []
    for i, m in enumerate(msgs):
        tag = m[t["role_tag"]]
        if tag not in roles:
            drops.add(f"rows with an unknown role {tag!r}", f"{where} message {i + 1}")
            return None
        role = roles[tag]
        if role not in (odd if i % 2 == 0 else even):
            drops.add("rows whose roles do not alternate user/assistant", f"{where} message {i + 1}")
            return None
        messages.append({"role": role, "content": _text(m[t["content_tag"]], f"message {i + 1} content", where)})
    if not messages:
        drops.add("rows with no messages", where)
        return None
    if stage in ("sft", "kto") and len(messages) % 2:
        drops.add("rows not ending with an assistant turn", where)
        return None
    rejected = None
    if stage == "dpo":
        if not len(messages) % 2:
            drops.add("preference rows whose conversation does not end with a user turn", where)
            return None
        pair = _answers(sp, row, where, drops)
        if pair is None:
            return None
        messages.append(pair[0])
        rejected = pair[1]
    if stage == "pt" and not messages[0]["content"] and not keep_empty:
        drops.add("rows with empty text", where)
        return None
    tools = row.get(c["tools"]) if c["tools"] else None
    return _finish(Sample(messages, system or None, tools or None, where, rejected), sp, row, stage, drops)


def _check_columns(sp: DatasetSpec, rows: list[tuple[str, Any]], stage: str) -> None:
    """A configured column that no row has is a mistake in dataset_info.json or the file: say so once."""
    if not rows:
        return
    seen: set[str] = set()
    for _, row in rows[:1000]:
        if isinstance(row, dict):
            seen.update(row)
    needed = {k for k in sp.explicit if sp.columns.get(k)}
    needed |= {"messages"} if sp.formatting == "sharegpt" else {"prompt"}
    if sp.formatting == "alpaca" and stage in ("sft", "kto"):
        needed.add("response")
    needed |= {"chosen", "rejected"} if stage == "dpo" else {"kto_tag"} if stage == "kto" else set()
    for key in sorted(needed):
        col = sp.columns.get(key)
        if col and col not in seen:
            raise UserError(
                f"dataset {sp.name!r} ({sp.source}): no column {col!r} ({key}) in the data; columns found: "
                f"{', '.join(sorted(seen)) or 'none'}{did_you_mean(col, seen)} — set columns.{key} in {INFO_NAME}"
            )


def convert(
    sp: DatasetSpec,
    rows: list[tuple[str, Any]],
    stage: str,
    fill: dict[str, str],
    drops: Drops,
    unlabeled: bool = False,
    keep_empty: bool = False,
) -> list[Sample]:
    """Rows of one dataset -> Samples (placeholders `{{key}}` filled from `fill`; `unlabeled`: see `_alpaca`).
    `keep_empty` (training): a stage pt row with empty text is kept, as LLaMA-Factory pretrains it (an eos-only
    document); without it such a row is dropped (calibration text)."""
    return [s for s in convert_rows(sp, rows, stage, fill, drops, unlabeled, keep_empty) if s is not None]


def convert_rows(
    sp: DatasetSpec,
    rows: list[tuple[str, Any]],
    stage: str,
    fill: dict[str, str],
    drops: Drops,
    unlabeled: bool = False,
    keep_empty: bool = False,
) -> list[Sample | None]:
    """`convert`, one entry per row: its Sample, or None where the row is dropped (counted in `drops`)."""
    _check_columns(sp, rows, stage)
    out: list[Sample | None] = []
    unused_history: list[str] = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: malformed row: expected an object, got {type(row).__name__}")
        row = {k: _fill(v, fill) for k, v in row.items()}
        for key in ("chosen", "rejected"):  # sharegpt preference answers are message objects
            col = sp.columns[key]
            if col and isinstance(row.get(col), dict):
                row[col] = {k: _fill(v, fill) for k, v in row[col].items()}
        if sp.formatting == "sharegpt" and isinstance(row.get(sp.columns["messages"]), list):
            row[sp.columns["messages"]] = [
                {k: _fill(v, fill) for k, v in m.items()} if isinstance(m, dict) else m
                for m in row[sp.columns["messages"]]
            ]
        if sp.formatting == "alpaca":
            hist = row.get(sp.columns["history"]) if sp.columns["history"] else None
            if hist not in (None, "") and not isinstance(hist, list):
                unused_history.append(where)
            sample = _alpaca(sp, row, where, stage, drops, unlabeled, keep_empty)
        else:
            sample = _sharegpt(sp, row, where, stage, drops, keep_empty)
        out.append(sample)
    if unused_history:
        _say(
            f"dataset {sp.name!r} ({sp.source}): history column {sp.columns['history']!r} is not a list in "
            f"{len(unused_history)} row(s) (first: {unused_history[0]}); those rows train without a history, as "
            "LLaMA-Factory ignores one that is not a list (a CSV cell is text: give histories in a JSON file)"
        )
    return out


def _say(msg: str) -> None:
    from exporter.lf_args import say  # lf_args imports this module

    say(msg)


def _check_stage(sp: DatasetSpec, stage: str, dataset_dir: Path) -> None:
    """LLaMA-Factory's rule: ranking datasets for stage dpo only, and only they; stage kto needs a kto_tag column."""
    where = f"{Path(dataset_dir) / INFO_NAME}: dataset {sp.name!r}"
    if stage == "dpo" and not sp.ranking:
        raise UserError(
            f'{where}: stage dpo needs a preference dataset: set "ranking": true and its chosen/rejected columns'
        )
    if stage != "dpo" and sp.ranking:
        raise UserError(f"{where} is a ranking (preference) dataset: it trains with stage: dpo, not {stage}")
    if stage == "kto" and not sp.columns.get("kto_tag"):
        raise UserError(
            f'{where}: stage kto needs a kto_tag column: set "columns": {{"kto_tag": "label", ...}} (true marks a '
            "desirable answer, false an undesirable one)"
        )


def unfilled_placeholders(samples: list[Sample]) -> set[str]:
    """`{{key}}` placeholders left in the samples (e.g. identity.json without identity_name)."""
    import re

    found: set[str] = set()
    for s in samples[:2000]:
        for m in s.messages + ([s.rejected] if s.rejected else []):
            found.update(re.findall(r"\{\{(\w+)\}\}", m["content"]))
    return found


def check_max_samples(max_samples: int | None) -> None:
    """`max_samples` is a number of rows per dataset (None: all); rows[:-1] would silently drop the last row."""
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
        raise UserError(f"max_samples must be a positive number of rows per dataset (or unset for all), got "
                        f"{max_samples}")  # fmt: skip


def sampler(seed: int) -> np.random.RandomState:
    """The random state LLaMA-Factory draws `num_samples` subsets from: numpy's global one as `set_seed(seed)`
    leaves it (nothing draws from it before the datasets load). One per run: the training datasets' loads draw
    first, then the eval_dataset ones continue from where they left off."""
    import numpy as np

    if not 0 <= seed < 2**32:
        raise UserError(f"seed must be between 0 and 2**32 - 1 (numpy's random seed, as LLaMA-Factory's), got {seed}")
    return np.random.RandomState(seed)


def _subset(rows: list[Any], n: int, rng: np.random.RandomState) -> list[Any]:
    """`num_samples`: LLaMA-Factory's rows — a random permutation's first n, and with n beyond the dataset, every row
    once followed by rows drawn with replacement."""
    idx = list(rng.permutation(len(rows))[:n])
    if n > len(rows):
        idx += list(rng.choice(len(rows), n - len(rows)))
    return [rows[i] for i in idx]


# LLaMA-Factory's mix_strategy -> datasets' stopping_strategy (None: concatenated). LF 0.9.5's interleave_once asks
# for all_exhausted_without_replacement, which the datasets it allows (<= 4.0.0) refuses: lf_args refuses it too.
MIX_STRATEGIES = {"concat": None, "interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


def interleave_order(lengths: list[int], probs: list[float] | None, seed: int, stopping: str) -> list[tuple[int, int]]:
    """(dataset, row) pairs in the order datasets' `interleave_datasets` (map-style, 4.0.0, the version LLaMA-Factory
    0.9.5 pins) takes them: without `probs` round robin, one row of each in turn, up to the shortest dataset
    (first_exhausted) or the longest, shorter ones wrapping around (all_exhausted); with `probs`, each row's dataset
    drawn by `np.random.default_rng(seed).choice` in blocks of 1000, each dataset's rows in order and wrapping
    around, until the first dataset (first_exhausted) or every dataset (all_exhausted) has given all its rows."""
    import numpy as np

    n = len(lengths)
    if probs is None:
        if stopping == "first_exhausted":
            return [(d, r) for r in range(min(lengths)) for d in range(n)]
        return [(d, r % lengths[d]) for r in range(max(lengths)) for d in range(n)]
    rng = np.random.default_rng(seed)
    stop = all if stopping == "all_exhausted" else any
    exhausted = [False] * n
    current = [0] * n
    out: list[tuple[int, int]] = []
    while True:
        for d in (int(i) for i in rng.choice(n, size=1000, p=probs)):
            if stop(exhausted):
                return out
            out.append((d, current[d]))
            current[d] += 1
            if current[d] >= lengths[d]:
                exhausted[d], current[d] = True, 0


def _interleave(
    picked: list[tuple[DatasetSpec, list[tuple[str, Any]]]],
    probs: list[float] | None,
    seed: int,
    stopping: str,
    convert_one: Any,
) -> list[Sample | None]:
    """The rows of several datasets in `interleave_order`, converted (each row once; a row taken twice by
    all_exhausted is the same Sample twice; None: a dropped row); the rows it never takes are not read."""
    for sp, rows in picked:
        if not rows:  # datasets would take another dataset's row for it, or stop at once
            raise UserError(f"dataset {sp.name!r} ({sp.source}) has no rows: interleaved mixing needs rows in each")
    if probs is not None and len(probs) != len(picked):
        raise UserError(f"interleave_probs gives {len(probs)} probabilities for {len(picked)} different datasets "
                        f"({', '.join(sp.name for sp, _ in picked)})")  # fmt: skip
    if probs is not None and stopping == "all_exhausted" and min(probs) <= 0:
        raise UserError("interleave_probs: mix_strategy interleave_over never ends with a probability of 0 (a "
                        "dataset never drawn is never exhausted; LLaMA-Factory's datasets loops forever)")  # fmt: skip
    try:
        order = interleave_order([len(rows) for _, rows in picked], probs, seed, stopping)
    except ValueError as e:  # numpy's checks of the probabilities: negative, not summing to 1
        raise UserError(f"interleave_probs {','.join(map(str, probs or []))}: {e}") from None
    converted: list[dict[int, Sample | None]] = []
    for d, (sp, rows) in enumerate(picked):
        used = sorted({r for k, r in order if k == d})
        converted.append(dict(zip(used, convert_one(sp, [rows[r] for r in used]), strict=True)))
    return [converted[d][r] for d, r in order]


def load(
    names: list[str],
    dataset_dir: Path | str,
    stage: str = "sft",
    max_samples: int | None = None,
    fill: dict[str, str] | None = None,
    seed: int = 42,
    unlabeled: bool = False,
    rng: np.random.RandomState | None = None,
    mix_strategy: str = "concat",
    interleave_probs: list[float] | None = None,
) -> tuple[list[Sample], Drops]:
    """`load_rows` without the dropped rows' places."""
    rows, drops = load_rows(names, dataset_dir, stage, max_samples, fill, seed, unlabeled, rng, mix_strategy,
                            interleave_probs)  # fmt: skip
    return [s for s in rows if s is not None], drops


def load_rows(
    names: list[str],
    dataset_dir: Path | str,
    stage: str = "sft",
    max_samples: int | None = None,
    fill: dict[str, str] | None = None,
    seed: int = 42,
    unlabeled: bool = False,
    rng: np.random.RandomState | None = None,
    mix_strategy: str = "concat",
    interleave_probs: list[float] | None = None,
) -> tuple[list[Sample | None], Drops]:
    """Load and convert the named datasets (concatenated in order, or interleaved as LLaMA-Factory's `mix_strategy`
    interleave_under / interleave_over with `interleave_probs` and `seed`). Errors if nothing usable is left.
    `unlabeled` (predict): alpaca rows without a response are kept with an empty answer. `rng`: where
    `num_samples` subsets are drawn from (default: a fresh `sampler(seed)`; pass the training load's to an
    eval_dataset load). A row that cannot be used keeps its place as None (counted in the Drops): LLaMA-Factory
    drops it only when tokenizing, after its `val_size` split of all the rows.

    A name given twice is loaded once, at its first place (LLaMA-Factory keys the datasets by name: its later
    load replaces the earlier one, each drawing its `num_samples` subset)."""
    if mix_strategy not in MIX_STRATEGIES:
        raise UserError(f"mix_strategy must be one of {', '.join(MIX_STRATEGIES)}, got {mix_strategy!r}")
    if stage not in STAGES:
        raise UserError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if not names:
        raise UserError("no dataset given (set dataset: name1,name2 from dataset_info.json)")
    check_max_samples(max_samples)
    dataset_dir = Path(dataset_dir)
    info = read_info(dataset_dir)
    drops = Drops()
    read: dict[str, list[tuple[str, Any]]] = {}
    picked: dict[str, tuple[DatasetSpec, list[tuple[str, Any]]]] = {}
    for name in names:
        sp = spec(name, info, dataset_dir)
        _check_stage(sp, stage, dataset_dir)
        if name not in read:
            read[name] = read_rows(sp)
        rows = read[name]
        if sp.num_samples is not None and rows:
            rng = rng if rng is not None else sampler(seed)
            rows = _subset(rows, sp.num_samples, rng)
        if max_samples is not None:
            rows = rows[:max_samples]
        picked[name] = (sp, rows)
    twice = [n for n, k in Counter(names).items() if k > 1]
    if twice:
        _say(
            f"{', '.join(f'dataset {n!r} ({picked[n][0].source})' for n in twice)} named more than once in "
            f"{','.join(names)}: loaded once, as LLaMA-Factory does (to repeat rows, give the file a second "
            f"{INFO_NAME} entry)"
        )
    samples: list[Sample | None] = []
    stopping = MIX_STRATEGIES[mix_strategy]
    if stopping is not None and len(picked) > 1:  # LF's merge_dataset: one dataset is taken as it is

        def rows_of(sp: DatasetSpec, rows: list[tuple[str, Any]]) -> list[Sample | None]:
            return convert_rows(sp, rows, stage, fill or {}, drops, unlabeled, keep_empty=True)

        samples = _interleave(list(picked.values()), interleave_probs, seed, stopping, rows_of)
    else:
        for name, (sp, rows) in picked.items():
            samples += convert_rows(sp, rows, stage, fill or {}, drops, unlabeled, keep_empty=True)
            if not rows:
                drops.add("empty datasets", f"{name} ({sp.source})")
    if not any(s is not None for s in samples):
        raise UserError(
            f"no usable samples in dataset(s) {', '.join(names)}: {drops.summary() or 'the files hold no rows'}"
        )
    return samples, drops


# LLaMA-Factory's `tokenized_path`: its get_dataset saves the tokenized splits with datasets' `save_to_disk` (Arrow
# files and JSON, no pickle) and, when the folder holds data, trains on them with `load_from_disk` instead of
# `dataset`. Stages sft (unpacked) and pt, with the columns and types LF 0.9.5's processors give them.
TOKENIZED_SPLITS = ("train", "validation")


def has_tokenized(path: str | None) -> bool:
    """LF's `has_tokenized_data`: the folder exists and holds something."""
    import os

    return path is not None and os.path.isdir(path) and bool(os.listdir(path))


def tokenized_unsupported(stage: str, packing: bool) -> str:
    """Why exporter does not save or read LF's tokenized dataset for this run ("" when it does): dpo/kto have
    other columns, LF saves packed sft rows padded with position_ids, and `datasets` (optional) writes the format."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        return "without the datasets package (pip install datasets)"
    if stage not in ("sft", "pt"):
        return f"for stage {stage} (only sft and pt)"
    if stage == "sft" and packing:
        return "with sft packing / neat_packing (LLaMA-Factory saves padded packed rows with position_ids)"
    return ""


def _datasets(path: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(f"tokenized_path: {path}: reading or writing LLaMA-Factory's tokenized dataset needs the "
                        "datasets package (pip install datasets)") from None  # fmt: skip
    return datasets


def _features(datasets: Any, stage: str) -> Any:
    """The columns and types LF 0.9.5 saves: pt the tokenizer's input_ids/attention_mask, sft also labels and its
    (empty) media columns."""
    cols = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "attention_mask": datasets.List(datasets.Value("int8")),
    }
    if stage == "sft":
        cols["labels"] = datasets.List(datasets.Value("int64"))
        cols.update({k: datasets.Value("null") for k in ("images", "videos", "audios")})
    return datasets.Features(cols)


def save_tokenized(path: str, stage: str, train: list[Any], val: list[Any]) -> None:
    """Write the examples as LF's get_dataset saves them (a DatasetDict with train and, when there is one,
    validation); the folder appears whole or not at all."""
    import os
    import shutil
    import tempfile

    datasets = _datasets(path)
    features = _features(datasets, stage)

    def split(examples: list[Any]) -> Any:
        cols: dict[str, list[Any]] = {"input_ids": [e.input_ids for e in examples],
                                      "attention_mask": [[1] * len(e.input_ids) for e in examples]}  # fmt: skip
        if stage == "sft":
            cols["labels"] = [e.labels for e in examples]
            cols.update({k: [None] * len(examples) for k in ("images", "videos", "audios")})
        return datasets.Dataset.from_dict(cols, features=features)

    parts = {"train": split(train), **({"validation": split(val)} if val else {})}
    target = Path(path).absolute()
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        datasets.DatasetDict(parts).save_to_disk(str(tmp / "d"))
        os.replace(tmp / "d", target)  # onto a missing or empty folder
    except OSError as e:
        raise UserError(f"tokenized_path: cannot write {path} ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(f"tokenized_path: saved the tokenized dataset ({', '.join(f'{k} {len(v)}' for k, v in parts.items())} "
         f"examples) to {path}")  # fmt: skip


def load_tokenized(path: str, stage: str) -> tuple[list[Any], list[Any]]:
    """The train and validation examples of a folder LF's (or our) `tokenized_path` run saved, in their saved
    order; one line naming the folder, split and column when it is not a tokenized dataset of this stage."""
    from exporter.examples import Example

    datasets = _datasets(path)
    try:
        got = datasets.load_from_disk(path)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"tokenized_path: {path} holds files but is not a dataset saved by save_to_disk "
                        f"({first}); empty it or name another folder") from None  # fmt: skip
    parts = dict(got) if isinstance(got, datasets.DatasetDict) else {"train": got}
    other = sorted(set(parts) - set(TOKENIZED_SPLITS))
    if other or "train" not in parts:
        raise UserError(f"tokenized_path: {path} has splits {', '.join(sorted(parts))}; exporter trains on 'train' "
                        "and evaluates on 'validation' (not eval_on_each_dataset's validation_<name>)")  # fmt: skip

    def examples(name: str) -> list[Any]:
        ds = parts[name].with_format(None)
        where = f"tokenized_path: {path} split {name!r}"
        cols = set(ds.column_names)
        saved_for = ("dpo" if "chosen_input_ids" in cols else "kto" if "kto_tags" in cols
                     else "sft" if "labels" in cols else "pt")  # fmt: skip
        if saved_for != stage:
            raise UserError(f"{where} holds stage {saved_for}'s tokenized data, not stage {stage}'s")
        if "position_ids" in cols or "packing_params" in cols:
            raise UserError(f"{where} holds packed examples (packing / neat_packing), which exporter does not read "
                            "back; save it again without packing")  # fmt: skip
        if "input_ids" not in cols:
            raise UserError(f"{where} has no input_ids column (columns: {', '.join(sorted(cols))})")
        ids = ds["input_ids"]
        labels = ds["labels"] if stage == "sft" else [list(x) for x in ids]
        masks = ds["attention_mask"] if "attention_mask" in cols else [None] * len(ids)
        out = []
        for i, (x, y, m) in enumerate(zip(ids, labels, masks, strict=True)):
            if not x or len(y) != len(x) or (m is not None and (len(m) != len(x) or any(v != 1 for v in m))):
                raise UserError(f"{where} row {i + 1}: expected non-empty input_ids with labels and an "
                                "attention_mask of 1s of the same length")  # fmt: skip
            out.append(Example(list(x), list(y)))
        if name == "train" and not out:
            raise UserError(f"{where} holds no examples")
        return out

    return examples("train"), examples("validation") if "validation" in parts else []


def prepare_tokenized(cfg: Any, model_dir: Path, save: bool = True) -> Any:
    """`examples.prepare` with LF's `tokenized_path`: a folder holding data gives the examples (the tokenizer and
    template still come from the model, for padding and the saved chat template); otherwise the dataset is
    tokenized and, when `save` (the main process), saved there."""
    from exporter import examples, hf_dir, lf_names

    path = cfg.tokenized_path
    if not has_tokenized(path):
        prep = examples.prepare(cfg, model_dir)
        if path is not None and save and not tokenized_unsupported(cfg.stage, bool(cfg.packing or cfg.neat_packing)):
            save_tokenized(path, cfg.stage, prep.train, prep.val)
        return prep
    train, val = load_tokenized(path, cfg.stage)
    tokenizer = hf_dir.load_tokenizer(model_dir, sentencepiece_prefix=True)
    tpl = None
    if cfg.stage != "pt" or cfg.template:
        tpl = lf_names.resolve_for_training(model_dir, cfg)
        if tpl.tokenizer_fix is not None:
            tpl.tokenizer_fix(tokenizer)
        examples.check_template_tokens(tokenizer, tpl, str(model_dir))
        for note in tpl.notes:
            examples.say(note)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError(f"model {model_dir}: tokenizer has neither a pad nor an eos token")
    vocab = len(tokenizer)
    for e in train + val:
        if max(e.input_ids) >= vocab or min(e.input_ids) < 0:
            raise UserError(f"tokenized_path: {path} holds token ids outside the vocabulary of {model_dir} "
                            f"({vocab} tokens): it was tokenized for another model")  # fmt: skip
    packing = cfg.stage == "pt" and cfg.packing is not False
    return examples.Prepared(tokenizer, tpl, train, val, pad_id, packing)
