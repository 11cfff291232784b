"""MMLU, C-Eval and CMMLU from local files, read and turned into few-shot prompts as LLaMA-Factory 0.9.5 does.

Files are the benchmarks' original CSV layouts, as LLaMA-Factory's `evaluation/<task>/<task>.py` loaders read them,
either unpacked under `task_dir/<task>/` or as LF's `task_dir/<task>/<task>.zip`; `task_dir/<task>/mapping.json`
maps each subject to its display name and category (LF's file). Nothing is fetched from a hub.

Prompts follow LF's `eval/template.py` and `eval/evaluator.py`: each question is `question` + `\\nA. ...` ... +
`\\nAnswer:` (zh: `\\n答案：`), the support set comes first as user/assistant pairs, and the system line naming the
subject is prepended to the first user message. The support set is LF's: for every question, `dev.shuffle()`
(no seed, so the `datasets` library draws one from numpy's global generator, seeded by `set_seed(seed)`) and its
first `n_shot` rows; `support_rows` reproduces that draw sequence, so the prompts are LF's prompts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter.config import decode, read_json
from exporter.errors import UserError

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")  # LF's order in results.log, after "Average"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one benchmark keeps a subject's split, and how its CSV is laid out."""

    files: dict[str, str]  # LF split name -> path under the task dir ({s}: subject)
    header: bool  # first row names the columns
    columns: dict[str, str]  # our field -> CSV column name (or position, without a header)


# LF's loading scripts, as data: MMLU has no header; C-Eval and CMMLU have one (CMMLU: index column, Question/Answer).
LAYOUTS: dict[str, Layout] = {
    "mmlu": Layout(
        files={"train": "data/dev/{s}_dev.csv", "validation": "data/val/{s}_val.csv", "test": "data/test/{s}_test.csv"},
        header=False,
        columns={"question": "0", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "5"},
    ),
    "ceval": Layout(
        files={"train": "dev/{s}_dev.csv", "validation": "val/{s}_val.csv", "test": "test/{s}_test.csv"},
        header=True,
        columns={"question": "question", "A": "A", "B": "B", "C": "C", "D": "D", "answer": "answer"},
    ),
    "cmmlu": Layout(
        files={"train": "dev/{s}.csv", "test": "test/{s}.csv"},
        header=True,
        columns={"question": "Question", "A": "A", "B": "B", "C": "C", "D": "D", "answer": "Answer"},
    ),
}


@dataclasses.dataclass(frozen=True)
class EvalTemplate:
    """LF's eval template for one language: system line, choice line, answer cue."""

    system: str
    choice: str
    answer: str


EVAL_TEMPLATES = {
    "en": EvalTemplate(
        system="The following are multiple choice questions (with answers) about {subject}.\n\n",
        choice="\n{choice}. {content}",
        answer="\nAnswer:",
    ),
    "zh": EvalTemplate(
        system="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
        choice="\n{choice}. {content}",
        answer="\n答案：",
    ),
}


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    options: dict[str, str]  # "A".."D" -> text
    answer: str  # "A".."D" ("" where the split has no answers, e.g. C-Eval test)
    where: str  # file:row


@dataclasses.dataclass(frozen=True)
class Subject:
    key: str  # file-name stem, e.g. abstract_algebra
    name: str  # display name from mapping.json
    category: str
    dev: list[Question]
    questions: list[Question]  # the evaluated split


def parse_task(task: str) -> tuple[str, str]:
    """`mmlu_test` -> ("mmlu", "test"), as LF splits it; errors name what exists."""
    name, _, split = task.partition("_")
    if name not in LAYOUTS:
        raise UserError(f"task {task!r}: unknown benchmark {name!r}; use mmlu_test, ceval_validation or cmmlu_test")
    if split not in LAYOUTS[name].files or split == "train":
        splits = [s for s in LAYOUTS[name].files if s != "train"]
        raise UserError(f"task {task!r}: {name} has the tasks {' and '.join(f'{name}_{s}' for s in splits)}")
    return name, split


class _Source:
    """Files of one benchmark: an unpacked dir, or LF's `<task>.zip` beside mapping.json."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.zip = root, None
        archive = root / f"{name}.zip"
        unpacked = any((root / p.split("/")[0]).is_dir() for p in LAYOUTS[name].files.values())
        if not unpacked and archive.is_file():
            self.zip = zipfile.ZipFile(archive)
            self.names = set(self.zip.namelist())

    def read(self, rel: str) -> tuple[str, str] | None:
        """(text, where) of `rel`, or None when it does not exist."""
        if self.zip is None:
            path = self.root / rel
            return (decode(path.read_bytes(), str(path)), str(path)) if path.is_file() else None
        # LF's zips hold the layout at the top or under one folder named like the task
        for name in (rel, f"{self.root.name}/{rel}"):
            if name in self.names:
                where = f"{self.root / self.zip.filename}:{name}"
                return decode(self.zip.read(name), where), where
        return None


def _rows(text: str, where: str, layout: Layout) -> Iterator[tuple[str, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    for n, row in enumerate(reader, start=1):
        if layout.header and header is None:
            header = row
            missing = [c for c in layout.columns.values() if c not in header]
            if missing and missing != [layout.columns["answer"]]:  # C-Eval's test files have no answer column
                raise UserError(f"{where}: header lacks column(s) {', '.join(missing)}; got {', '.join(header)}")
            continue
        if not row or not any(cell.strip() for cell in row):
            continue
        if header is None:
            cells = {str(i): v for i, v in enumerate(row)}
            if len(row) != len(layout.columns):
                raise UserError(f"{where}:{n}: expected {len(layout.columns)} columns (question,A,B,C,D,answer), "
                                f"got {len(row)}")  # fmt: skip
        else:
            if len(row) != len(header):
                raise UserError(f"{where}:{n}: expected {len(header)} columns as in the header, got {len(row)}")
            cells = dict(zip(header, row, strict=True))
        yield f"{where}:{n}", {field: cells.get(col, "") for field, col in layout.columns.items()}


def read_split(source: _Source, layout: Layout, subject: str, split: str, need_answers: bool) -> list[Question]:
    """The questions of one subject's split; a missing file or a bad answer letter is a UserError."""
    rel = layout.files[split].format(s=subject)
    found = source.read(rel)
    if found is None:
        raise UserError(f"{source.root}: no {rel} (subject {subject!r} of mapping.json, split {split})")
    text, where = found
    out = []
    for at, row in _rows(text, where, layout):
        answer = row["answer"].strip()
        if need_answers and answer not in CHOICES:
            hint = " (C-Eval publishes no test answers: use task ceval_validation)" if not answer else ""
            raise UserError(f"{at}: answer must be one of A, B, C, D, got {answer!r}{hint}")
        out.append(Question(row["question"], {c: row[c] for c in CHOICES}, answer, at))
    if not out:
        raise UserError(f"{where}: no questions")
    return out


def load_task(task_dir: Path | str, task: str, unanswered: bool = False) -> list[Subject]:
    """Every subject of `mapping.json` (in its order) with its dev set and the evaluated split. `unanswered`: C-Eval's
    test split, which has no answers, is read as LF's loader reads it (answers "", scored 0; LF's results.json is
    then the file to submit) instead of refused."""
    name, split = parse_task(task)
    root = Path(task_dir) / name
    mapping_path = root / "mapping.json"
    if not mapping_path.is_file():
        raise UserError(
            f"{mapping_path} not found: task_dir must hold {name}/mapping.json and the {name} CSV files "
            f"(LLaMA-Factory's evaluation/ folder layout)"
        )
    mapping = read_json(mapping_path)
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{mapping_path}: expected {{subject: {{name, category}}}}")
    layout, source = LAYOUTS[name], _Source(root, name)
    subjects = []
    for key, info in mapping.items():
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or "category" not in info:
            raise UserError(f"{mapping_path}: {key}: expected {{'name': ..., 'category': ...}}, got {info!r}")
        dev = read_split(source, layout, key, "train", need_answers=True)
        need = not (unanswered and (name, split) == ("ceval", "test"))
        questions = read_split(source, layout, key, split, need_answers=need)
        subjects.append(Subject(key, info["name"], str(info["category"]), dev, questions))
    return subjects


def _parse(template: EvalTemplate, q: Question) -> tuple[str, str]:
    choices = "".join(template.choice.format(choice=c, content=q.options[c]) for c in CHOICES)
    return q.question + choices + template.answer, q.answer


def format_example(template: EvalTemplate, target: Question, support: list[Question], subject: str) -> list[dict]:
    """LF's `EvalTemplate.format_example`: user/assistant pairs, the subject line before the first user turn."""
    messages: list[dict[str, Any]] = []
    for q in [*support, target]:
        prompt, answer = _parse(template, q)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    messages[0]["content"] = template.system.format(subject=subject) + messages[0]["content"]
    return messages


class SupportSampler:
    """LF's few-shot draw: `dataset["train"].shuffle().select(range(min(n_shot, len)))` once per question.

    `datasets` takes an unseeded shuffle's seed from numpy's global MT19937 state (the key at the current position)
    and advances that state by one `random()`; LF seeds it with `transformers.set_seed(seed)` first."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self._np = np
        self._state = np.random.RandomState(seed)

    def indices(self, n_dev: int, n_shot: int) -> list[int]:
        _, keys, pos, *_ = self._state.get_state()
        seed = keys[pos] if pos < 624 else keys[0]
        self._state.random_sample()
        perm = self._np.random.default_rng(seed).permutation(n_dev)
        return [int(i) for i in perm[: min(n_shot, n_dev)]]
