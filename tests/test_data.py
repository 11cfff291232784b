"""Dataset registry: LLaMA-Factory's dataset_info.json entries, formats, file types and bad-input messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from exporter import data
from exporter.errors import UserError


def _write(d: Path, info: dict, files: dict[str, object]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "dataset_info.json").write_text(json.dumps(info))
    for name, content in files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            p.write_text("".join(json.dumps(r) + "\n" for r in content))  # type: ignore[union-attr]
        else:
            p.write_text(json.dumps(content))
    return d


def test_alpaca_defaults_history_system(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add", "input": "1 and 2", "output": "3", "sys": "Be exact.", "hist": [["hi", "hello"]]},
        {"instruction": "Only instruction", "input": "", "output": "ok"},
    ]
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "sys", "history": "hist"}
    d = _write(tmp_path, {"a": {"file_name": "a.json", "columns": columns}}, {"a.json": rows})
    samples, drops = data.load(["a"], d)
    assert not drops.counts
    assert samples[0].chat() == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n1 and 2"},  # LLaMA-Factory joins prompt and query with a newline
        {"role": "assistant", "content": "3"},
    ]
    assert samples[1].chat() == [
        {"role": "user", "content": "Only instruction"},
        {"role": "assistant", "content": "ok"},
    ]
    assert samples[0].where.endswith("a.json row 1")


def test_sharegpt_tags_system_tools(tmp_path: Path) -> None:
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather?"},
        {"role": "call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"role": "tool_out", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    info = {
        "s": {
            "file_name": "s.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "tools": "tools"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "function_tag": "call", "observation_tag": "tool_out", "system_tag": "system"},
        }
    }  # fmt: skip
    tools = json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])
    d = _write(tmp_path, info, {"s.jsonl": [{"messages": conv, "tools": tools}]})
    (s,), _ = data.load(["s"], d)
    assert s.chat() == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]  # fmt: skip
    assert s.tool_list() == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]


def test_sharegpt_default_tags_and_bad_roles_counted(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    two_users = {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]}
    odd = {"conversations": [{"from": "human", "value": "q"}]}
    unknown = {"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]}
    d = _write(tmp_path, {"g": {"file_name": "g.json", "formatting": "sharegpt"}},
               {"g.json": [good, two_users, odd, unknown, good]})  # fmt: skip
    samples, drops = data.load(["g"], d)
    assert len(samples) == 2
    assert drops.counts == {
        "rows whose roles do not alternate user/assistant": 1,
        "rows not ending with an assistant turn": 1,
        "rows with an unknown role 'bot'": 1,
    }
    assert drops.first["rows whose roles do not alternate user/assistant"].endswith("g.json row 2 message 2")
    d2 = _write(tmp_path / "x", {"g": {"file_name": "g.json", "formatting": "sharegpt"}}, {"g.json": [two_users, odd]})
    with pytest.raises(UserError, match=r"no usable samples in dataset\(s\) g: 1 rows whose roles do not alternate"
                       r".*g.json row 1 message 2.*1 rows not ending with an assistant turn"):  # fmt: skip
        data.load(["g"], d2)


def test_file_types_csv_parquet_directory(tmp_path: Path) -> None:
    import importlib.util

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
    d = tmp_path
    with open(d / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    (d / "dir").mkdir()
    for i in range(2):
        (d / "dir" / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2 * i : 2 * i + 2]))
    info = {"c": {"file_name": "c.csv"}, "p": {"file_name": "p.parquet"}, "dir": {"file_name": "dir"}}
    names = ["c", "dir"]
    if importlib.util.find_spec("pyarrow"):  # parquet is optional (pyarrow); without it the error is clear
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), d / "p.parquet")
        names.append("p")
    else:
        (d / "p.parquet").write_bytes(b"PAR1")
    (d / "dataset_info.json").write_text(json.dumps(info))
    for name in names:
        samples, _ = data.load([name], d)
        assert [s.messages[-1]["content"] for s in samples] == ["a0", "a1", "a2", "a3"], name
    if "p" not in names:
        with pytest.raises(UserError, match="reading parquet needs the pyarrow package"):
            data.load(["p"], d)
    both, _ = data.load(["c", "dir"], d, max_samples=2)
    assert [s.messages[0]["content"] for s in both] == ["q0", "q1", "q0", "q1"]


def test_identity_placeholders_filled(tmp_path: Path) -> None:
    rows = [{"instruction": "who are you", "input": "", "output": "I am {{name}}, made by {{author}}."}]
    d = _write(tmp_path, {"identity": {"file_name": "identity.json"}}, {"identity.json": rows})
    (s,), _ = data.load(["identity"], d, fill={"name": "Exa", "author": "Acme"})
    assert s.messages[1]["content"] == "I am Exa, made by Acme."
    (raw,), _ = data.load(["identity"], d)
    assert data.unfilled_placeholders([raw]) == {"name", "author"}


def test_pt_columns_rule(tmp_path: Path) -> None:
    # LLaMA-Factory: once `columns` is given, unnamed columns are unset (so a text-only file needs no output column)
    d = _write(tmp_path, {"c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}}},
               {"c4.jsonl": [{"text": "hello world"}, {"text": ""}]})  # fmt: skip
    samples, drops = data.load(["c4"], d, stage="pt")
    # an empty text is kept: LLaMA-Factory pretrains it as an eos-only document
    assert [s.text for s in samples] == ["hello world", ""]
    assert not drops.counts
    # calibration's text rows (convert without keep_empty) still leave it out
    sp = data.spec("c4", data.read_info(d), d)
    drops = data.Drops()
    assert [s.text for s in data.convert(sp, data.read_rows(sp), "pt", {}, drops)] == ["hello world"]
    assert drops.counts == {"rows with empty text": 1}


def _firsts(samples: list[data.Sample]) -> list[int]:
    return [int(s.messages[-2]["content"][1:]) for s in samples]


def test_num_samples_rows_of_llamafactory(tmp_path: Path) -> None:
    """num_samples picks LLaMA-Factory's rows (as LF 0.9.5 trains them with seed 42: a permutation's first n, then
    draws with replacement, on numpy's RNG as set_seed leaves it), the same whatever numpy's global RNG holds, and
    without touching it; an eval_dataset load given the training load's rng continues its draws."""
    import numpy as np

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    info = {"ns4": {"file_name": "a.json", "num_samples": 4}, "ns13": {"file_name": "a.json", "num_samples": 13}}
    d = _write(tmp_path, info, {"a.json": rows})
    np.random.seed(123)
    state = np.random.get_state()
    assert _firsts(data.load(["ns4"], d)[0]) == [8, 1, 5, 0]
    assert _firsts(data.load(["ns13"], d)[0]) == [8, 1, 5, 0, 7, 2, 9, 4, 3, 6, 2, 6, 7]
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(state, after, strict=True))
    rng = data.sampler(42)
    assert _firsts(data.load(["ns4"], d, rng=rng)[0]) == [8, 1, 5, 0]
    assert _firsts(data.load(["ns4"], d, rng=rng)[0]) != [8, 1, 5, 0]  # continued, not restarted
    with pytest.raises(UserError, match=r"^seed must be between 0 and 2\*\*32 - 1 .*got -1$"):
        data.load(["ns4"], d, seed=-1)


def test_dataset_named_twice_is_loaded_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LLaMA-Factory keys the datasets by name: a repeated name trains its rows once (at its first place), and a
    note says so naming the file."""
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    d = _write(tmp_path, {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}},
               {"a.json": rows, "b.json": rows[:1]})  # fmt: skip
    samples, _ = data.load(["a", "b", "a"], d)
    assert _firsts(samples) == [0, 1, 2, 0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dataset 'a' ({d / 'a.json'}) named more than once in a,b,a" in err
    data.load(["a", "b"], d)
    assert capsys.readouterr().err == ""


def test_history_that_is_not_a_list_is_no_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LLaMA-Factory's rule: only a list is a history. An empty CSV cell is no history; text (any CSV cell, a JSON
    string) trains without one, with one note per dataset naming the file and column; a bad list is an error."""
    columns = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}
    (tmp_path / "h.csv").write_text('instruction,input,output,history\nHi,,Hello,\nAdd,,5,"[[""q"",""a""]]"\n'
                                    'Sub,,1,"[[""r"",""b""]]"\n')  # fmt: skip
    rows = [{"instruction": "x", "input": "", "output": "y", "history": h} for h in ([["q", "a"]], "[]", 3)]
    info = {"h": {"file_name": "h.csv", "columns": columns}, "j": {"file_name": "j.json", "columns": columns},
            "bad": {"file_name": "bad.json", "columns": columns}}  # fmt: skip
    d = _write(tmp_path, info, {"j.json": rows, "bad.json": [{**rows[0], "history": [1]}]})
    samples, drops = data.load(["h"], d)
    assert not drops.counts and [len(s.messages) for s in samples] == [2, 2, 2]
    (err,) = capsys.readouterr().err.splitlines()
    assert f"dataset 'h' ({d / 'h.csv'}): history column 'history' is not a list in 2 row(s) (first: " in err
    assert f"{d / 'h.csv'} row 2)" in err
    samples, _ = data.load(["j"], d)
    assert [len(s.messages) for s in samples] == [4, 2, 2]
    assert "is not a list in 2 row(s)" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"bad.json row 1: malformed row: history must be a list of \[prompt, resp"):
        data.load(["bad"], d)


@pytest.mark.parametrize("n", [0, -1])
def test_max_samples_below_one_is_refused(tmp_path: Path, n: int) -> None:
    """rows[:-1] would silently drop the last row, rows[:0] all of them: one line, for every caller of `load`."""
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(3)]
    d = _write(tmp_path, {"a": {"file_name": "a.json"}}, {"a.json": rows})
    assert len(data.load(["a"], d, max_samples=2)[0]) == 2
    with pytest.raises(UserError, match=rf"^max_samples must be a positive number of rows per dataset .*got {n}$"):
        data.load(["a"], d, max_samples=n)


ROW = {"instruction": "x", "output": "y"}
BAD_INPUT = [
    ({"a": {"file_name": "a.json"}}, {}, ["a"], r"dataset 'a': file .*a.json not found"),
    (
        {"alpaca_en": {"file_name": "a.json"}},
        {},
        ["alpaca_em"],
        r"'alpaca_em' is not defined .*did you mean 'alpaca_en'",
    ),
    (
        {"a": {"file_name": "a.json", "columns": {"prompt": "question"}}},
        {"a.json": [ROW]},
        ["a"],
        r"no column 'question' \(prompt\) in the data; columns found: instruction, output",
    ),
    ({"a": {"file_name": "a.json"}}, {"a.json": [ROW, [1]]}, ["a"], r"a.json row 2: malformed row: expected an object"),
    (
        {"a": {"file_name": "a.json"}},
        {"a.json": [{"instruction": "x", "output": {"k": 1}}]},
        ["a"],
        r"a.json row 1: malformed row: output must be a string, got dict",
    ),
    (
        {"a": {"file_name": "a.json", "formatting": "sharegpt"}},
        {"a.json": [{"conversations": [{"role": "user"}]}]},
        ["a"],
        r"a.json row 1: malformed row: message 1 must be an object with 'from' and 'value'",
    ),
    (
        {"a": {"file_name": "a.json", "formating": "x"}},
        {},
        ["a"],
        r"unknown key 'formating' \(did you mean 'formatting'",
    ),
    ({"a": {"file_name": "a.json", "columns": {"images": "img"}}}, {}, ["a"], r"column 'images' .* not supported"),
    ({"a": {"file_name": "a.json"}}, {"a.json": []}, ["a"], r"no usable samples .* 1 empty datasets"),
    ({"a": {"script_url": "x"}}, {}, ["a"], r"script_url; loading scripts is not supported"),
]


@pytest.mark.parametrize(("info", "files", "names", "message"), BAD_INPUT)
def test_bad_input_messages(tmp_path: Path, info: dict, files: dict, names: list[str], message: str) -> None:
    d = _write(tmp_path, info, files)
    with pytest.raises(UserError, match=message):
        data.load(names, d)


def test_bad_json_and_missing_registry(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no dataset_info.json"):
        data.load(["a"], tmp_path)
    d = _write(tmp_path, {"a": {"file_name": "a.jsonl"}}, {})
    (d / "a.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": oops}\n')
    with pytest.raises(UserError, match=r"a.jsonl line 2: not valid JSON"):
        data.load(["a"], d)


def test_hub_dataset_offline_or_without_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d = _write(tmp_path, {"h": {"hf_hub_url": "someone/not-cached-dataset"}}, {})
    expected = r"dataset 'h'.*(install the `datasets` package|from the Hugging Face hub failed)"
    with pytest.raises(UserError, match=expected):
        data.load(["h"], d)


# LLaMA-Factory's get_dataset on each config (one process: its imports take most of the time): per config the
# train and eval examples' input_ids and labels (pt: input_ids), as `llamafactory-cli train` prepares them
_LF_SCRIPT = """
import contextlib, json, logging, os, sys, warnings
os.environ["DISABLE_VERSION_CHECK"] = "1"
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
with contextlib.redirect_stdout(sys.stderr):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
out = []
for args in json.load(sys.stdin):
    with contextlib.redirect_stdout(sys.stderr):
        model_args, data_args, training_args, _, _ = get_train_args(args)
        tokenizer = load_tokenizer(model_args)["tokenizer"]
        tpl = get_template_and_fix_tokenizer(tokenizer, data_args)
        mod = get_dataset(tpl, model_args, data_args, training_args, args["stage"], tokenizer)
    out.append({split: [{k: e[k] for k in ("input_ids", "labels") if k in e} for e in mod[split]]
                for split in ("train_dataset", "eval_dataset") if split in mod})
json.dump(out, sys.stdout)
"""


def test_rows_equal_llamafactory(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Which rows train equals LLaMA-Factory 0.9.5's own pipeline on the same config: a CSV history column (an
    empty cell and text are no history), num_samples subsets (train draws, then eval_dataset draws continuing
    them), a dataset named twice (loaded once; a num_samples one keeps its last draw), stage pt's empty text
    (an eos-only document, packed or not)."""
    import os
    import subprocess

    from conftest import lf_python

    from exporter import examples, lf_args

    lf = lf_python()
    model = str(tiny_model("qwen2", real_vocab=True))
    columns = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}
    info = {"h": {"file_name": "h.csv", "columns": columns}, "pt": {"file_name": "pt.json", "columns": {"prompt": "x"}},
            **{f"ns{n}": {"file_name": "ten.json", "num_samples": n} for n in (3, 4, 13)}}  # fmt: skip
    ten = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    pt = [{"x": "Hello world"}, {"x": ""}, {"x": "Second doc here"}, {"x": ""}]
    d = _write(tmp_path / "data", info, {"ten.json": ten, "pt.json": pt})
    (d / "h.csv").write_text('instruction,input,output,history\nHi,,Hello,\nAdd 2 and 3,,5,"[[""q"",""a""]]"\n')
    sft = {"stage": "sft", "template": "qwen", "cutoff_len": 64}
    configs = [
        {**sft, "dataset": "h,ns4,ns13,ns4", "eval_dataset": "ns3,ns3", "seed": 7},
        {"stage": "pt", "dataset": "pt", "cutoff_len": 4},
        {"stage": "pt", "dataset": "pt", "cutoff_len": 8, "packing": False},
    ]
    base = {"do_train": True, "finetuning_type": "lora", "report_to": "none", "overwrite_cache": True,
            "model_name_or_path": model, "dataset_dir": str(d)}  # fmt: skip
    lf_configs = [{**base, "output_dir": str(tmp_path / f"lf-{k}"), **c} for k, c in enumerate(configs)]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([lf, "-c", _LF_SCRIPT], input=json.dumps(lf_configs), capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = json.loads(proc.stdout)
    assert [len(r["train_dataset"]) for r in refs] == [2 + 4 + 13, 2, 4]  # ns4 once; pt's empty rows kept
    for k, (c, ref) in enumerate(zip(configs, refs, strict=True)):
        names = {key: c[key].split(",") for key in ("dataset", "eval_dataset") if key in c}
        cfg = lf_args.TrainConfig(**{**c, **names, "model_name_or_path": model, "dataset_dir": str(d),
                                     "output_dir": str(tmp_path / "o")})  # fmt: skip
        prep = examples.prepare(cfg, Path(model))
        for split, ours in (("train_dataset", prep.train), ("eval_dataset", prep.val)):
            keys = ("input_ids",) if c["stage"] == "pt" else ("input_ids", "labels")
            got = [{key: getattr(e, key) for key in keys} for e in ours]
            assert got == [{key: e[key] for key in keys} for e in ref.get(split, [])], (k, c, split)
    err = capsys.readouterr().err
    assert err.count("history column 'history' is not a list in 1 row(s)") == 1  # the empty cell: silently
    assert err.count("named more than once") == 2  # 'ns4' in dataset, 'ns3' in eval_dataset
