"""Check 6 (optional, `--eval TASK_DIR`): multiple-choice accuracy of the merged model and of each GGUF on a small
slice of MMLU / C-Eval / CMMLU, scored exactly as `exporter eval` scores (LF's prompts, argmax of the choice
letters). Every model gets the same token ids (the merged model's tokenizer), so a difference is numeric, not
tokenization. A GGUF fails when its accuracy drops more than its type's allowance below the merged model's (at
least one question's worth of the slice); how many answers agree with the merged model is reported too."""

from __future__ import annotations

from pathlib import Path

from exporter.progress import progress
from exporter.verify.artifacts import GGUFInfo
from exporter.verify.report import Check

# percentage points of accuracy a GGUF type may lose against the merged model
DROP_ALLOWED = {"f32": 0.0, "f16": 1.0, "bf16": 1.0, "q8_0": 2.0}
DROP_ALLOWED_DEFAULT = 5.0  # 4-6 bit K-quants and q4_0
TASKS = ("mmlu_test", "ceval_validation", "cmmlu_test")


def pick_task(task_dir: Path, task: str | None) -> str:
    """`task`, or the first of LF's three tasks whose mapping.json is in task_dir; its files are read once here so
    that a bad benchmark dir is a UserError before any model loads."""
    from exporter.benchmarks import load_task, parse_task
    from exporter.errors import UserError

    if not task:
        found = [t for t in TASKS if (task_dir / parse_task(t)[0] / "mapping.json").is_file()]
        if not found:
            raise UserError(f"--eval {task_dir}: no mmlu/, ceval/ or cmmlu/ with a mapping.json (LF's evaluation/)")
        task = found[0]
    load_task(task_dir, task)
    return task


def check_accuracy(task_dir: Path, task: str | None, merged: Path, infos: list[GGUFInfo], per_subject: int) -> list:
    """One `accuracy` row for the merged model and one per GGUF."""
    from exporter import benchmarks, evaluate
    from exporter.engine import LoadOptions, load

    task = task or pick_task(task_dir, task)
    lang = "en" if task.startswith("mmlu") else "zh"
    opts = evaluate.EvalOptions(str(merged), task, template="fewshot", task_dir=str(task_dir), lang=lang,
                                max_questions=per_subject)  # fmt: skip
    subjects = benchmarks.load_task(task_dir, task)
    with load(LoadOptions(str(merged), max_seqs=opts.batch_size)) as eng:
        prompts = evaluate.build_prompts(opts, subjects, eng.tokenize, None)
        letters = evaluate.choice_ids(eng.tokenize)
        ids, truth = [p for _, _, p in prompts], [q.answer for _, q, _ in prompts]
        with progress(f"accuracy {task}", "", len(ids) * (1 + len(infos)), transient=True) as advance:
            ref = evaluate.answer(eng, ids, letters, opts.batch_size, advance)
            ref_acc = 100 * sum(a == t for a, t in zip(ref, truth, strict=True)) / len(truth)
            base = {"task": task, "questions": len(truth), "n_shot": opts.n_shot, "ref_accuracy": ref_acc}
            checks = [Check("accuracy", "merged", "pass", f"{ref_acc:.2f}% on {len(truth)} {task} questions",
                            {"accuracy": ref_acc, **base})]  # fmt: skip
            for g in infos:
                with load(LoadOptions(str(g.path), max_seqs=opts.batch_size)) as gguf:
                    got = evaluate.answer(gguf, ids, letters, opts.batch_size, advance)
                checks.append(_judge(g, got, ref, truth, ref_acc, base))
    return checks


def _judge(g: GGUFInfo, got: list[str], ref: list[str], truth: list[str], ref_acc: float, base: dict) -> Check:
    acc = 100 * sum(a == t for a, t in zip(got, truth, strict=True)) / len(truth)
    agree = 100 * sum(a == r for a, r in zip(got, ref, strict=True)) / len(ref)
    allowed = max(DROP_ALLOWED.get(g.file_type, DROP_ALLOWED_DEFAULT), 100 / len(truth))
    detail = (f"{acc:.2f}% vs merged {ref_acc:.2f}% ({acc - ref_acc:+.2f} points, allowed -{allowed:.2f}); "
              f"{agree:.1f}% of answers agree")  # fmt: skip
    metrics = {"accuracy": acc, "agreement": agree, "allowed_drop": allowed, "type": g.file_type, **base}
    return Check("accuracy", g.path.name, "pass" if acc >= ref_acc - allowed else "fail", detail, metrics)
