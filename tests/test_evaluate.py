"""exporter eval: local MMLU/C-Eval/CMMLU files read as LLaMA-Factory reads them, LF's prompts, and accuracy equal to
a plain transformers reference (HF) and to llama.cpp through llama-cpp-python (GGUF); LF's own Evaluator when its
reference venv is there ($EXPORTER_LF_PYTHON)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import lf_python, require_llama_cpp
from eval_fixture import SUBJECTS, write_task
from sharp_model import sharpen

from exporter import benchmarks, evaluate
from exporter.errors import UserError

HERE = Path(__file__).resolve().parent
SYSTEM = {
    "en": "The following are multiple choice questions (with answers) about {}.\n\n",
    "zh": "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n",
}
CUE = {"en": "\nAnswer:", "zh": "\n答案："}
TASKS = [("mmlu_test", "en"), ("ceval_validation", "zh"), ("cmmlu_test", "zh")]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluation")
    for name in ("mmlu", "ceval", "cmmlu"):
        write_task(root, name)
    return root


@pytest.fixture(scope="module")
def sharp_model(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama3 with answers that differ from question to question (the plain one answers C everywhere)."""
    return sharpen(tiny_model("llama3"), tmp_path_factory.mktemp("sharp") / "llama3-sharp")


# ---------------------------------------------------------------------------------------------- files and layouts


def test_layouts_read_like_lf(task_dir: Path, tmp_path: Path) -> None:
    for task, _ in TASKS:
        name = task.split("_")[0]
        subjects = benchmarks.load_task(task_dir, task)
        assert [s.key for s in subjects] == list(SUBJECTS[name])
        assert [(s.name, s.category) for s in subjects] == list(SUBJECTS[name].values())
        for s in subjects:
            assert len(s.dev) == 5 and all(q.answer in "ABCD" for q in s.dev + s.questions)
            assert len(s.questions) == (7 if task.endswith("test") else 6)
        # a quoted cell with a comma, quotes and a newline survives
        assert any('"' in q.options["C"] for s in subjects for q in s.dev)
        # LF's zip (mapping.json beside <task>.zip) reads the same
        write_task(tmp_path / "z", name, as_zip=True)
        zipped = benchmarks.load_task(tmp_path / "z", task)
        strip = [(s.key, [(q.question, q.options, q.answer) for q in s.dev + s.questions]) for s in subjects]
        assert strip == [(s.key, [(q.question, q.options, q.answer) for q in s.dev + s.questions]) for s in zipped]


def test_bad_files_are_one_line_errors(task_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ceval_validation"):
        benchmarks.parse_task("ceval_dev")
    with pytest.raises(UserError, match="unknown benchmark"):
        benchmarks.parse_task("gsm8k_test")
    with pytest.raises(UserError, match="mapping.json not found"):
        benchmarks.load_task(tmp_path, "mmlu_test")
    with pytest.raises(UserError, match="publishes no test answers"):
        benchmarks.load_task(task_dir, "ceval_test")  # verify --eval needs answers
    # exporter eval reads them as LF's loader does, with empty answers (scored 0)
    unanswered = benchmarks.load_task(task_dir, "ceval_test", unanswered=True)
    assert {q.answer for s in unanswered for q in s.questions} == {""}
    bad = tmp_path / "bad"
    shutil.copytree(task_dir / "mmlu", bad / "mmlu")
    f = bad / "mmlu" / "data" / "test" / "econometrics_test.csv"
    f.write_text(f.read_text(encoding="utf-8").replace(",A\n", ",E\n", 1), encoding="utf-8")
    with pytest.raises(UserError, match=r"econometrics_test.csv:\d+: answer must be one of A, B, C, D, got 'E'"):
        benchmarks.load_task(bad, "mmlu_test")
    (bad / "mmlu" / "data" / "dev" / "world_religions_dev.csv").unlink()
    with pytest.raises(UserError, match="no data/dev/world_religions_dev.csv"):
        benchmarks.load_task(bad, "mmlu_test")


def test_non_utf8_csv_names_file_and_byte(task_dir: Path, tmp_path: Path) -> None:
    """A CSV saved in another encoding is one line naming the file (or zip member), byte offset and line; a UTF-8
    BOM is read as pandas reads it."""
    bad = tmp_path / "bad"
    shutil.copytree(task_dir / "ceval", bad / "ceval")
    f = bad / "ceval" / "val" / "art_studies_val.csv"
    text = f.read_text(encoding="utf-8")
    plain = benchmarks.load_task(bad, "ceval_validation")
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [s.questions for s in benchmarks.load_task(bad, "ceval_validation")] == [s.questions for s in plain]
    raw = text.encode("gbk")
    at = next(i for i, (a, b) in enumerate(zip(raw, text.encode("utf-8"), strict=False)) if a != b)
    f.write_bytes(raw)
    line = raw.count(b"\n", 0, at) + 1
    with pytest.raises(
        UserError, match=rf"^{f}: not UTF-8 text: byte {at} \(line {line}\) is .*; save the file as UTF-8$"
    ):
        benchmarks.load_task(bad, "ceval_validation")
    write_task(tmp_path / "z", "ceval", as_zip=True)
    archive = next((tmp_path / "z" / "ceval").glob("*.zip"))
    with zipfile.ZipFile(archive) as zin:
        members = {n: zin.read(n) for n in zin.namelist()}
    name = next(n for n in members if n.endswith("val/art_studies_val.csv"))
    members[name] = members[name].decode("utf-8").encode("gbk")
    with zipfile.ZipFile(archive, "w") as zout:
        for n, data in members.items():
            zout.writestr(n, data)
    with pytest.raises(UserError, match=rf"{archive.name}:{name}: not UTF-8 text: byte \d+ \(line \d+\)"):
        benchmarks.load_task(tmp_path / "z", "ceval_validation")


# ---------------------------------------------------------------------------------------------- reference


def _reference_prompts(task_dir: Path, task: str, lang: str, encode, n_shot: int = 5) -> list[tuple[str, list[int]]]:
    """LF's prompts written out here: numpy's global generator seeded 42, one unseeded `datasets` shuffle per
    question (the key at the state's position seeds PCG64, then one random() step), the first n_shot dev rows;
    each message tokenized alone and concatenated (template `fewshot`)."""
    rs = np.random.RandomState(42)
    out = []
    for s in benchmarks.load_task(task_dir, task):
        for q in s.questions:
            _, keys, pos, *_ = rs.get_state()
            rs.random_sample()
            perm = np.random.default_rng(keys[pos] if pos < 624 else keys[0]).permutation(len(s.dev))
            shots = [s.dev[i] for i in perm[:n_shot]]
            ids = []
            for k, x in enumerate([*shots, q]):
                text = x.question + "".join(f"\n{c}. {x.options[c]}" for c in "ABCD") + CUE[lang]
                ids += encode((SYSTEM[lang].format(s.name) if k == 0 else "") + text)
                if x is not q:
                    ids += encode(x.answer + "\n\n")
            out.append((s.key, ids))
    return out


def _run_eval(model: Path | str, task_dir: Path, task: str, lang: str, save: Path, *extra: str,
              template: str = "fewshot") -> None:  # fmt: skip
    cmd = [sys.executable, "-m", "exporter", "eval", "--model_name_or_path", str(model), "--task", task,
           "--task_dir", str(task_dir), "--lang", lang, "--n_shot", "5", "--template", template,
           "--save_dir", str(save), *extra]  # fmt: skip
    env = {**os.environ, "EXPORTER_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr


def _accuracy_lines(answers: dict[str, list[str]], task_dir: Path, task: str) -> str:
    subjects = benchmarks.load_task(task_dir, task)
    cats: dict[str, list[bool]] = {"Average": [], "STEM": [], "Social Sciences": [], "Humanities": [], "Other": []}
    for s in subjects:
        hits = [a == q.answer for a, q in zip(answers[s.key], s.questions, strict=True)]
        cats[s.category] += hits
        cats["Average"] += hits
    return "\n".join(f"{c:>15}: {100 * np.mean(h):.2f}" for c, h in cats.items() if h)


@pytest.mark.parametrize("task,lang", TASKS)
def test_hf_equals_plain_transformers(sharp_model: Path, task_dir: Path, tmp_path: Path, task: str, lang: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sharp_model)
    model = AutoModelForCausalLM.from_pretrained(sharp_model, dtype=torch.float32).eval()
    letters = [tok.encode(c, add_special_tokens=False)[-1] for c in "ABCD"]
    expected: dict[str, list[str]] = {}
    for key, ids in _reference_prompts(task_dir, task, lang, lambda t: tok.encode(t, add_special_tokens=False)):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1, letters]
        expected.setdefault(key, []).append("ABCD"[int(logits.argmax())])
    assert len({a for v in expected.values() for a in v}) > 1, "the fixture model must give varied answers"

    _run_eval(sharp_model, task_dir, task, lang, tmp_path / "out")
    got = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert got == {k: {str(i): a for i, a in enumerate(v)} for k, v in expected.items()}
    log = (tmp_path / "out" / "results.log").read_text(encoding="utf-8")
    assert log == _accuracy_lines(expected, task_dir, task)
    scores = json.loads((tmp_path / "out" / "scores.json").read_text(encoding="utf-8"))
    assert f"{scores['categories']['Average']:.2f}" == log.splitlines()[0].split(": ")[1]


@pytest.mark.llama
def test_gguf_equals_llama_cpp(sharp_model: Path, task_dir: Path, tmp_path: Path) -> None:
    """The GGUF backend against llama.cpp itself (llama-cpp-python's Llama, one prompt at a time), and f16 vs HF."""
    llama_cpp = require_llama_cpp()
    subprocess.run([sys.executable, "-m", "exporter", "gguf", str(sharp_model), "--type", "f16,q8_0",
                    "--out", str(tmp_path / "gguf")], check=True, capture_output=True)  # fmt: skip
    task, lang = "mmlu_test", "en"
    _run_eval(sharp_model, task_dir, task, lang, tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "results.json").read_text(encoding="utf-8"))
    for kind in ("f16", "q8_0"):
        path = next((tmp_path / "gguf").glob(f"*-{kind}.gguf"))
        llm = llama_cpp.Llama(str(path), n_ctx=2048, n_batch=2048, n_ubatch=2048, logits_all=True, verbose=False)

        def encode(text: str, llm=llm) -> list[int]:
            return llm.tokenize(text.encode(), add_bos=False, special=True)

        letters = [encode(c)[-1] for c in "ABCD"]
        expected: dict[str, list[str]] = {}
        for key, ids in _reference_prompts(task_dir, task, lang, encode):
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[llm.n_tokens - 1])[letters]
            expected.setdefault(key, []).append("ABCD"[int(logits.argmax())])
        llm.close()
        _run_eval(path, task_dir, task, lang, tmp_path / kind)
        got = json.loads((tmp_path / kind / "results.json").read_text(encoding="utf-8"))
        assert got == {k: {str(i): a for i, a in enumerate(v)} for k, v in expected.items()}, kind
        assert (tmp_path / kind / "results.log").read_text() == _accuracy_lines(expected, task_dir, task)
        if kind == "f16":
            assert got == hf  # f16 keeps every answer of the fp32 model on this fixture


# ---------------------------------------------------------------------------------------------- LLaMA-Factory itself


@pytest.mark.parametrize("task,lang", TASKS)
def test_same_prompts_and_answers_as_llamafactory(sharp_model: Path, task_dir: Path, tmp_path: Path, task, lang):
    """LF 0.9.5's own Evaluator on the same files: identical prompt token ids, answers and results.log."""
    from transformers import AutoTokenizer

    lf = lf_python()
    cmd = [lf, str(HERE / "lf_eval_reference.py"), str(sharp_model), str(task_dir), task, lang, "5", "4",
           str(tmp_path / "lf"), "fewshot", str(tmp_path / "lf_inputs.json")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(sharp_model)
    opts = evaluate.EvalOptions(str(sharp_model), task, template="fewshot", task_dir=str(task_dir), lang=lang)
    ours = evaluate.build_prompts(
        opts, benchmarks.load_task(task_dir, task), lambda t: tok.encode(t, add_special_tokens=False), None
    )
    assert [ids for _, _, ids in ours] == json.loads((tmp_path / "lf_inputs.json").read_text())
    _run_eval(sharp_model, task_dir, task, lang, tmp_path / "ours")
    for name in ("results.json", "results.log"):
        assert (tmp_path / "ours" / name).read_text(encoding="utf-8") == (tmp_path / "lf" / name).read_text(
            encoding="utf-8"
        ), name


@pytest.mark.parametrize("family,template", [("llama3", "llama3"), ("qwen2", "qwen")])
def test_lf_template_name_gives_lf_prompts(tiny_model, sharp_model: Path, task_dir: Path, tmp_path: Path, family: str,
                                           template: str) -> None:  # fmt: skip
    """`template: llama3` means LF's llama3 slots, as in `llamafactory-cli eval` (before, the model's own Llama 3.1
    Jinja put a dated system block in front): identical prompt ids, answers and results.log."""
    from exporter.engine import LoadOptions, load

    lf = lf_python()
    model = sharp_model if family == "llama3" else tiny_model(family)
    task, lang = "mmlu_test", "en"
    cmd = [lf, str(HERE / "lf_eval_reference.py"), str(model), str(task_dir), task, lang, "5", "4",
           str(tmp_path / "lf"), template, str(tmp_path / "lf_inputs.json")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads((tmp_path / "lf_inputs.json").read_text())
    opts = evaluate.EvalOptions(str(model), task, template=template, task_dir=str(task_dir), lang=lang)
    with load(LoadOptions(str(model))) as eng:
        chat_ids = evaluate.lf_prompt_ids(eng, template)
        ours = evaluate.build_prompts(opts, benchmarks.load_task(task_dir, task), eng.tokenize, chat_ids)
    assert [ids for _, _, ids in ours] == theirs
    _run_eval(model, task_dir, task, lang, tmp_path / "ours", template=template)
    for name in ("results.json", "results.log"):
        assert (tmp_path / "ours" / name).read_text(encoding="utf-8") == (tmp_path / "lf" / name).read_text(
            encoding="utf-8"
        ), name


@pytest.mark.llama
def test_verify_eval_compares_merged_and_gguf(sharp_model: Path, tiny_model, task_dir: Path, tmp_path: Path) -> None:
    """`exporter verify --eval`: the merged model's accuracy on the slice equals the plain transformers reference,
    its f16 GGUF agrees on every answer; a GGUF of another model is judged by the stated allowance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_llama_cpp()
    for src, out in ((sharp_model, "sharp"), (tiny_model("llama3"), "plain")):
        subprocess.run([sys.executable, "-m", "exporter", "gguf", str(src), "--type", "f16", "--out",
                        str(tmp_path / out)], check=True, capture_output=True)  # fmt: skip
    sharp_f16, plain_f16 = next((tmp_path / "sharp").glob("*.gguf")), next((tmp_path / "plain").glob("*.gguf"))
    r = subprocess.run([sys.executable, "-m", "exporter", "verify", "--merged", str(sharp_model), "--gguf",
                        str(sharp_f16), "--gguf", str(plain_f16), "--eval", str(task_dir), "--eval-questions", "3",
                        "--prompts", "0", "--report", str(tmp_path / "report.json")],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    rows = {c["target"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]
            if c["check"] == "accuracy"}  # fmt: skip
    assert set(rows) == {"merged", sharp_f16.name, plain_f16.name}, r.stderr

    tok = AutoTokenizer.from_pretrained(sharp_model)
    model = AutoModelForCausalLM.from_pretrained(sharp_model, dtype=torch.float32).eval()
    letters = [tok.encode(c, add_special_tokens=False)[-1] for c in "ABCD"]
    prompts = _reference_prompts(task_dir, "mmlu_test", "en", lambda t: tok.encode(t, add_special_tokens=False))
    truth = [q.answer for s in benchmarks.load_task(task_dir, "mmlu_test") for q in s.questions]
    hits, seen = [], {}
    for (key, ids), answer in zip(prompts, truth, strict=True):
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= 3:  # the slice: the first 3 questions of each subject (the support draws still run)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1, letters]
            hits.append("ABCD"[int(logits.argmax())] == answer)
    assert rows["merged"]["metrics"]["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    assert rows["merged"]["metrics"]["questions"] == len(hits) == 9
    f16 = rows[sharp_f16.name]
    assert f16["status"] == "pass" and f16["metrics"]["agreement"] == 100.0
    other = rows[plain_f16.name]["metrics"]
    assert other["agreement"] < 100.0
    expected = "pass" if other["accuracy"] >= other["ref_accuracy"] - other["allowed_drop"] else "fail"
    assert rows[plain_f16.name]["status"] == expected
