"""A small MMLU / C-Eval / CMMLU fixture in the benchmarks' original CSV layouts (as LLaMA-Factory's loaders read
them) plus LF's mapping.json, written by the tests themselves: nothing comes from a hub."""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from pathlib import Path

# subject -> (display name, category); two LF categories, English and Chinese names
SUBJECTS = {
    "mmlu": {
        "abstract_algebra": ("abstract algebra", "STEM"),
        "world_religions": ("world religions", "Humanities"),
        "econometrics": ("econometrics", "Social Sciences"),
    },
    "ceval": {
        "computer_network": ("计算机网络", "STEM"),
        "art_studies": ("艺术学", "Humanities"),
    },
    "cmmlu": {
        "anatomy": ("解剖学", "STEM"),
        "chinese_history": ("中国历史", "Humanities"),
    },
}
WORDS_EN = "prime group ring field order element cycle faith ritual temple demand supply price model".split()
WORDS_ZH = "网络 协议 路由 艺术 绘画 历史 王朝 骨骼 肌肉 血管 器官 数据".split()


def _question(rng: random.Random, zh: bool, k: int) -> list[str]:
    words = WORDS_ZH if zh else WORDS_EN
    sep = "" if zh else " "
    q = sep.join(rng.choice(words) for _ in range(rng.randint(3, 9)))
    q = f"第{k}题：{q}，下列哪项正确？" if zh else f"Question {k}: which {q} is right?"
    opts = [sep.join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(4)]
    if k % 5 == 1:
        opts[2] = '含"引号", 逗号' if zh else 'a "quoted", comma\nand a newline'  # CSV quoting survives
    return [q, *opts, "ABCD"[rng.randrange(4)]]


def _csv(rows: list[list[str]], header: list[str] | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def task_files(name: str, n_dev: int = 5, n_eval: int = 6, seed: int = 0) -> dict[str, str]:
    """{relative path: text} of one benchmark in its original layout, mapping.json included."""
    rng = random.Random(f"{name}-{seed}")
    zh = name != "mmlu"
    files: dict[str, str] = {}
    mapping = {}
    for s, (display, category) in SUBJECTS[name].items():
        mapping[s] = {"name": display, "category": category}
        dev = [_question(rng, zh, k) for k in range(n_dev)]
        val = [_question(rng, zh, 100 + k) for k in range(n_eval)]
        test = [_question(rng, zh, 200 + k) for k in range(n_eval + 1)]
        if name == "mmlu":
            files[f"data/dev/{s}_dev.csv"] = _csv(dev, None)
            files[f"data/val/{s}_val.csv"] = _csv(val, None)
            files[f"data/test/{s}_test.csv"] = _csv(test, None)
        elif name == "ceval":
            head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
            files[f"dev/{s}_dev.csv"] = _csv([[str(i), *r, "因为"] for i, r in enumerate(dev)], head)
            files[f"val/{s}_val.csv"] = _csv([[str(i), *r, ""] for i, r in enumerate(val)], head)
            files[f"test/{s}_test.csv"] = _csv([[str(i), *r[:5]] for i, r in enumerate(test)], head[:6])
        else:
            head = ["", "Question", "A", "B", "C", "D", "Answer"]
            files[f"dev/{s}.csv"] = _csv([[str(i), *r] for i, r in enumerate(dev)], head)
            files[f"test/{s}.csv"] = _csv([[str(i), *r] for i, r in enumerate(test)], head)
    files["mapping.json"] = json.dumps(mapping, ensure_ascii=False, indent=2)
    return files


def write_task(task_dir: Path, name: str, as_zip: bool = False, **kw: int) -> Path:
    """Write benchmark `name` under `task_dir/name/` (unpacked, or as LF's `<name>.zip` + mapping.json)."""
    root = task_dir / name
    root.mkdir(parents=True, exist_ok=True)
    files = task_files(name, **kw)
    if as_zip:
        (root / "mapping.json").write_text(files.pop("mapping.json"), encoding="utf-8")
        with zipfile.ZipFile(root / f"{name}.zip", "w") as z:
            for rel, text in files.items():
                z.writestr(rel, text)
        return root
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root
