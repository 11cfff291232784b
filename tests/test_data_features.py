"""dataset_info.json features as LLaMA-Factory 0.9.5 reads them (its `get_dataset`, run in its own venv on the same
config): the file types it accepts beyond json/csv/parquet (`.txt`, as its own `wiki_demo` entry uses, and `.arrow`),
CSV cells that `datasets` reads as null (empty, "NA", "None": a row without an answer is dropped, an NA input adds
nothing), a folder's files in `os.listdir` order (what `max_samples` keeps), `split` slices of a local file (and a
split a local file does not have), a .jsonl file that holds one JSON array, and JSON lines split at "\n" only.

The tokenized examples (ids and labels) are compared, through `test_lf_data_parity`'s LF script and comparison.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_lf_data_parity import Runs, _check, _ours, lf_runs

from exporter import data
from exporter.errors import UserError

TXT = "First line of the wiki.\r\nSecond line, a little longer than the first one.\n\nThird\rFourth line\n"
CSV_ROWS = [
    ["instruction", "input", "output"],
    ["q1", "", "a1"],
    ["q2", "", ""],  # empty answer: null, LF drops the row
    ["q3", "NA", "a3"],  # NA input: null, the prompt is q3 alone
    ["q4", "x", "None"],  # "None": null too
    ["q5", "N/A", "ok"],
    ["q6", "y", "null"],
]
ROWS = [{"instruction": f"q{i}", "input": "", "output": f"answer {i}"} for i in range(10)]
DIR_NAMES = ["e", "10", "c", "2", "a", "d"]

INFO: dict[str, Any] = {
    "wiki": {"file_name": "wiki.txt", "columns": {"prompt": "text"}},
    "arrow_stream": {"file_name": "stream.arrow"},
    "arrow_file": {"file_name": "file.arrow"},
    "nulls": {"file_name": "nulls.csv"},
    "folder": {"file_name": "parts"},
    "head": {"file_name": "ten.json", "split": "train[:3]"},
    "middle": {"file_name": "ten.json", "split": "train[25%:75%]"},
    "tail_pct": {"file_name": "ten.json", "split": "train[-30%:]"},
    "joined": {"file_name": "ten.json", "split": "train[7:]+train[:2]"},
    "other_split": {"file_name": "ten.json", "split": "test"},
    "jsonl_array": {"file_name": "array.jsonl"},
    "line_separators": {"file_name": "separators.jsonl"},
}
SFT = {"template": "qwen", "cutoff_len": 64}
# (test, config): every config runs once through LF and once through exporter
CASES: list[tuple[str, dict[str, Any]]] = [
    ("txt", {"stage": "pt", "dataset": "wiki", "cutoff_len": 8, "packing": False}),
    ("txt", {"stage": "pt", "dataset": "wiki", "cutoff_len": 8}),
    ("arrow", {**SFT, "dataset": "arrow_stream"}),
    ("arrow", {**SFT, "dataset": "arrow_file"}),
    ("csv", {**SFT, "dataset": "nulls"}),
    ("folder", {**SFT, "dataset": "folder", "max_samples": 3}),
    ("folder", {**SFT, "dataset": "folder", "val_size": 2}),
    ("split", {**SFT, "dataset": "head"}),
    ("split", {**SFT, "dataset": "middle"}),
    ("split", {**SFT, "dataset": "tail_pct"}),
    ("split", {**SFT, "dataset": "joined"}),
    ("split_refused", {**SFT, "dataset": "other_split"}),
    ("jsonl_array", {**SFT, "dataset": "jsonl_array"}),
    ("line_separators", {**SFT, "dataset": "line_separators"}),
]


def _write_data(d: Path) -> None:
    import pyarrow as pa

    d.mkdir()
    (d / "wiki.txt").write_bytes(TXT.encode())
    table = pa.Table.from_pylist(ROWS[:4])
    with pa.ipc.new_stream(d / "stream.arrow", table.schema) as w:  # Dataset.save_to_disk's format
        w.write_table(table)
    with pa.ipc.new_file(d / "file.arrow", table.schema) as w:
        w.write_table(table)
    with open(d / "nulls.csv", "w", newline="") as f:
        csv.writer(f).writerows(CSV_ROWS)
    (d / "parts").mkdir()
    for k, name in enumerate(DIR_NAMES):
        (d / "parts" / f"{name}.json").write_text(json.dumps([ROWS[k]]))
    (d / "ten.json").write_text(json.dumps(ROWS))
    (d / "array.jsonl").write_text(json.dumps(ROWS[:3], indent=1))
    rows = [{**r, "output": f"{r['output']}\u2028second\x85third"} for r in ROWS[:2]]  # raw in JSON strings: valid
    (d / "separators.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (d / "dataset_info.json").write_text(json.dumps(INFO))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> Runs:
    """Per test name: (config, LF's result) for each of its cases, from one LF process."""
    from conftest import lf_python

    pytest.importorskip("pyarrow")
    lf = lf_python()
    tmp = tmp_path_factory.mktemp("lf-features")
    d = tmp / "data"
    _write_data(d)
    model = tiny_model("qwen2")
    return lf_runs(lf, [(test, model, cfg) for test, cfg in CASES], d, tmp)


def test_txt_files_as_llamafactory(runs) -> None:
    """LF's own `wiki_demo` entry is a .txt file: one row per line (\\n, \\r\\n or \\r), an empty line an eos-only
    document; pt examples packed and unpacked equal LF's."""
    _check(runs["txt"])
    assert len(runs["txt"][0][1]["train_dataset"]) == 5


def test_arrow_files_stream_and_file_format(runs) -> None:
    """.arrow in the IPC stream format (Dataset.save_to_disk) and the file format, as datasets' arrow builder."""
    _check(runs["arrow"])


def test_csv_null_cells_as_llamafactory(runs) -> None:
    """Empty, "NA", "None", "null" cells are null in datasets' CSV reader: the rows without an answer are dropped,
    an NA input adds nothing to the prompt."""
    _check(runs["csv"])
    assert len(runs["csv"][0][1]["train_dataset"]) == 3


def test_folder_rows_in_listdir_order(runs) -> None:
    """A folder's files come in os.listdir order, as LF lists them: max_samples keeps the same rows, val_size
    splits the same rows."""
    files = os.listdir(Path(runs["folder"][0][0]["dataset_dir"]) / "parts")
    if files == sorted(files):  # pragma: no cover - depends on the file system's directory order
        pytest.skip("this file system lists the folder in sorted order: nothing to tell apart")
    _check(runs["folder"])


def test_split_slices_a_local_file(runs) -> None:
    """`split: train[:3]`, `train[25%:75%]`, `train[-30%:]`, `train[7:]+train[:2]`: the rows datasets selects."""
    _check(runs["split"])
    counts = [len(ref["train_dataset"]) for _, ref in runs["split"]]
    assert counts == [3, 6, 3, 5]  # 25%..75% of 10 rows: rows 2..7 (round(2.5) = 2, round(7.5) = 8)


def test_split_a_local_file_lacks_is_refused(runs) -> None:
    """A local file has one split, train: LF refuses `split: test`, exporter in one line naming the split."""
    ((cfg, ref),) = runs["split_refused"]
    assert "error" in ref
    ours = _ours(cfg)
    assert "error" in ours and "'test'" in ours["error"] and "\n" not in ours["error"], ours


def test_jsonl_file_holding_a_json_array(runs) -> None:
    """A .jsonl file that holds one JSON array: datasets falls back to reading it whole, as a .json file."""
    _check(runs["jsonl_array"])
    assert len(runs["jsonl_array"][0][1]["train_dataset"]) == 3


def test_jsonl_lines_end_at_newline_only(runs) -> None:
    """U+2028 and U+0085 unescaped inside JSON strings (json.dumps(ensure_ascii=False) writes them) are text, not
    line ends: the rows and their answers equal LF's."""
    _check(runs["line_separators"])
    assert len(runs["line_separators"][0][1]["train_dataset"]) == 2


def test_json_object_files_are_one_row_or_one_line_error(tmp_path: Path) -> None:
    """A .json file holding one object (pretty-printed too) is one row, so a wrapper object names its key among the
    columns found; a malformed one-line object is one line naming the file, not a traceback."""
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS[:2]}, indent=2))
    (tmp_path / "broken.json").write_text('{"instruction": "q", "output": "a",}')
    info = {"wrapped": {"file_name": "wrapped.json"}, "broken": {"file_name": "broken.json"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"no column 'instruction' \(prompt\) in the data; columns found: data"):
        data.load(["wrapped"], tmp_path)
    with pytest.raises(UserError, match=r"broken.json line 1: not valid JSON"):
        data.load(["broken"], tmp_path)


def test_split_spec_errors(tmp_path: Path) -> None:
    """Split specs datasets refuses are one line naming the dataset and the spec."""
    (tmp_path / "ten.json").write_text(json.dumps(ROWS))
    bad = {"x": "train[:5](pct1_dropremainder)", "y": "train[:150%]", "z": "train[1:2](closest)", "w": "train[a:]",
           "v": "train[:2] + train[5:]"}  # fmt: skip
    info = {k: {"file_name": "ten.json", "split": v} for k, v in bad.items()}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    for name, split in bad.items():
        with pytest.raises(UserError) as e:
            data.load([name], tmp_path)
        assert f"dataset {name!r}" in str(e.value) and repr(split) in str(e.value) and "\n" not in str(e.value)
