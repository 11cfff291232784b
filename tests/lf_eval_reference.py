"""Run LLaMA-Factory 0.9.5's own `Evaluator` (llamafactory.eval.evaluator) on a local benchmark fixture.

Runs under LF's reference venv ($EXPORTER_LF_PYTHON), called by tests/test_evaluate.py:
    python lf_eval_reference.py MODEL_DIR TASK_DIR TASK LANG N_SHOT BATCH_SIZE SAVE_DIR TEMPLATE INPUTS_JSON [EXTRA]
EXTRA, a JSON object, adds LF arguments (`default_system`, `enable_thinking` ...).
LF reads benchmarks through `datasets` loading scripts (evaluation/<task>/<task>.py in LF's repository), which
`datasets` 4 no longer runs; `load_dataset` is replaced by what those scripts do (pandas `read_csv` with each
benchmark's header and column rules, splits train=dev, validation=val, test=test). Everything else is LF's code:
the eval template, the `fewshot` chat template, the unseeded support-set shuffles, the batching and the argmax.
The token ids of every prompt LF scores are written to INPUTS_JSON, in LF's order.
"""

from __future__ import annotations

import json
import os
import sys

import datasets
import pandas as pd

FILES = {  # LF's loading scripts: split -> path under task_dir/<task> ({s}: subject)
    "mmlu": {"train": "data/dev/{s}_dev.csv", "validation": "data/val/{s}_val.csv", "test": "data/test/{s}_test.csv"},
    "ceval": {"train": "dev/{s}_dev.csv", "validation": "val/{s}_val.csv", "test": "test/{s}_test.csv"},
    "cmmlu": {"train": "dev/{s}.csv", "test": "test/{s}.csv"},
}


def _records(task: str, path: str) -> list[dict]:
    if task == "mmlu":
        df = pd.read_csv(path, header=None)
        df.columns = ["question", "A", "B", "C", "D", "answer"]
        rows = df.to_dict(orient="records")
    elif task == "ceval":
        rows = pd.read_csv(path, encoding="utf-8").to_dict(orient="records")
        for r in rows:
            r.setdefault("answer", "")
            r.setdefault("explanation", "")
    else:
        rows = []
        for r in pd.read_csv(path, header=0, index_col=0, encoding="utf-8").to_dict(orient="records"):
            r["question"], r["answer"] = r.pop("Question", ""), r.pop("Answer", "")
            rows.append(r)
    keep = ("question", "A", "B", "C", "D", "answer")
    return [{k: (None if pd.isna(r[k]) else str(r[k])) for k in keep} for r in rows]


def load_dataset(path: str, name: str, **_: object) -> datasets.DatasetDict:
    task = os.path.basename(path.rstrip("/"))
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(_records(task, os.path.join(path, rel.format(s=name))))
         for split, rel in FILES[task].items()}
    )  # fmt: skip


def main() -> None:
    model, task_dir, task, lang, n_shot, batch_size, save_dir, template, inputs_json = sys.argv[1:10]
    extra = json.loads(sys.argv[10]) if len(sys.argv) > 10 else {}
    from llamafactory.eval import evaluator

    evaluator.load_dataset = load_dataset
    seen: list[list[int]] = []
    batch_inference = evaluator.Evaluator.batch_inference

    def record(self, batch_input):  # type: ignore[no-untyped-def]
        for ids, mask in zip(batch_input["input_ids"].tolist(), batch_input["attention_mask"].tolist(), strict=True):
            seen.append([i for i, m in zip(ids, mask, strict=True) if m])
        return batch_inference(self, batch_input)

    evaluator.Evaluator.batch_inference = record
    args = {
        "model_name_or_path": model,
        "template": template,
        "task": task,
        "task_dir": task_dir,
        "lang": lang,
        "n_shot": int(n_shot),
        "batch_size": int(batch_size),
        "save_dir": save_dir,
        **extra,
    }
    evaluator.Evaluator(args).eval()
    with open(inputs_json, "w", encoding="utf-8") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
