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
    assert [s.text for s in samples] == ["hello world"]
    assert drops.counts == {"rows with empty text": 1}


def test_num_samples_subset(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(10)]
    d = _write(tmp_path, {"a": {"file_name": "a.json", "num_samples": 3}}, {"a.json": rows})
    s1, _ = data.load(["a"], d, seed=1)
    s2, _ = data.load(["a"], d, seed=1)
    assert len(s1) == 3 and [s.messages[0]["content"] for s in s1] == [s.messages[0]["content"] for s in s2]


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
