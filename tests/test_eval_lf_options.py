"""exporter eval with LLaMA-Factory's data arguments that shape the eval prompt (`default_system`,
`enable_thinking`), other n_shot / lang / batch_size settings and C-Eval's unanswered test split, against LF 0.9.5's
own Evaluator (`llamafactory-cli eval` parses DataArguments too, and its template applies them): identical prompt
ids, results.json and results.log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lf_python
from eval_fixture import write_task

from exporter import benchmarks, evaluate
from exporter.errors import UserError

HERE = Path(__file__).resolve().parent

CASES = {  # id: (fixture family, template, task, lang, n_shot, batch_size, LF arguments)
    # Qwen3 without thinking: LF's empty thought goes into the prompt (zh cue on an English benchmark, zero-shot)
    "qwen3-nothink": ("qwen3", "qwen3", "mmlu_test", "zh", 0, 1, {"enable_thinking": False}),
    # LF's plain few-shot template with a system prompt before the subject line
    "fewshot-system": ("llama3", "fewshot", "cmmlu_test", "zh", 2, 3, {"default_system": "你是考生。"}),
    # a system prompt in LF's llama3 slots
    "llama3-system": ("llama3", "llama3", "ceval_validation", "en", 5, 2, {"default_system": "Answer well."}),
    # C-Eval's test split has no answers: LF scores it (0) and writes the answers to submit in results.json
    "ceval-test": ("llama3", "fewshot", "ceval_test", "zh", 1, 4, {}),
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluation")
    for name in ("mmlu", "ceval", "cmmlu"):
        write_task(root, name, n_eval=3)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_lf_data_arguments_shape_eval_prompts_as_llamafactory(case: str, tiny_model, task_dir: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    from exporter.engine import LoadOptions, load

    lf = lf_python()
    family, template, task, lang, n_shot, batch, extra = CASES[case]
    model = tiny_model(family)
    cmd = [lf, str(HERE / "lf_eval_reference.py"), str(model), str(task_dir), task, lang, str(n_shot), str(batch),
           str(tmp_path / "lf"), template, str(tmp_path / "lf_inputs.json"), json.dumps(extra)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads((tmp_path / "lf_inputs.json").read_text())

    opts = evaluate.EvalOptions(str(model), task, template=template, task_dir=str(task_dir), lang=lang, n_shot=n_shot,
                                batch_size=batch, **extra)  # fmt: skip
    with load(LoadOptions(str(model))) as eng:
        chat_ids = evaluate.lf_prompt_ids(eng, template, opts) if template != "fewshot" else None
        subjects = benchmarks.load_task(task_dir, task, unanswered=True)
        ours = evaluate.build_prompts(opts, subjects, eng.tokenize, chat_ids)
    assert [ids for _, _, ids in ours] == theirs

    args = [f"--{k}={v}" for k, v in extra.items()]
    cmd = [sys.executable, "-m", "exporter", "eval", "--model_name_or_path", str(model), "--task", task, "--task_dir",
           str(task_dir), "--lang", lang, "--n_shot", str(n_shot), "--batch_size", str(batch), "--template", template,
           "--save_dir", str(tmp_path / "ours"), *args]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EXPORTER_NO_PROGRESS": "1"},
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in ("results.json", "results.log"):
        ours_text = (tmp_path / "ours" / name).read_text(encoding="utf-8")
        assert ours_text == (tmp_path / "lf" / name).read_text(encoding="utf-8"), name


def test_enable_thinking_needs_an_lf_template(task_dir: Path, tmp_path: Path) -> None:
    """A chat-template family has no LF slots for it: one line before any work."""
    opts = evaluate.EvalOptions(str(tmp_path / "none"), "mmlu_test", template="qwen-2.5", task_dir=str(task_dir),
                                enable_thinking=False)  # fmt: skip
    with pytest.raises(UserError, match="LLaMA-Factory template name"):
        evaluate.evaluate(opts)
