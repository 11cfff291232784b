"""LLaMA-Factory's `mix_strategy: interleave_under | interleave_over` with and without `interleave_probs`: the training
(and eval) examples in the order LF 0.9.5's own `get_dataset` makes them (datasets' `interleave_datasets` seeded with
`seed`, after `max_samples`, before the `val_size` split; a row LF drops still takes its place in the draw and in the
split), and the settings LF refuses refused in one line.

The tokenized examples (ids and labels) are compared through `test_lf_data_parity`'s LF script and comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_lf_data_parity import Runs, _check, _ours, lf_runs

from exporter import data
from exporter.errors import UserError

# three datasets of 7, 3 and 5 rows, every answer distinct, so the order shows in the ids; one row of `a` has no
# answer (LF drops it after interleaving, so it still takes its turn)
ROWS = {
    "a": [{"instruction": f"alpha {i}", "input": "", "output": None if i == 2 else f"first {i}"} for i in range(7)],
    "b": [{"instruction": f"beta {i}", "input": "", "output": f"second {i} " + "x " * i} for i in range(3)],
    "c": [{"instruction": f"gamma {i}", "input": "", "output": f"third {i}"} for i in range(5)],
}
INFO = {name: {"file_name": f"{name}.json"} for name in ROWS}
SFT = {"template": "qwen", "cutoff_len": 64, "dataset": "a,b,c"}
UNDER = {**SFT, "mix_strategy": "interleave_under"}
OVER = {**SFT, "mix_strategy": "interleave_over"}
# (test, config): every config runs once through LF and once through exporter
CASES: list[tuple[str, dict[str, Any]]] = [
    ("round_robin", UNDER),
    ("round_robin", OVER),
    ("round_robin", {**OVER, "max_samples": 4}),
    ("probs", {**UNDER, "interleave_probs": "0.5,0.2,0.3"}),
    ("probs", {**OVER, "interleave_probs": "0.6,0.3,0.1", "seed": 7}),
    ("probs", {**OVER, "interleave_probs": [0.2, 0.5, 0.3], "val_size": 0.3}),
    ("probs", {**UNDER, "dataset": "a,c", "eval_dataset": "b,a", "interleave_probs": "0.3,0.7"}),
    ("val_dropped_row", {**SFT, "dataset": "a", "val_size": 0.3}),
    ("val_dropped_row", {**SFT, "dataset": "c,a", "val_size": 3}),
    ("refused", {**SFT, "interleave_probs": "0.5,0.2,0.3"}),
    ("refused", {**UNDER, "interleave_probs": "0.5,0.5"}),
    ("refused", {**SFT, "mix_strategy": "interleave_once"}),
]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> Runs:
    """Per test name: (config, LF's result) for each of its cases, from one LF process."""
    from conftest import lf_python

    lf = lf_python()
    tmp = tmp_path_factory.mktemp("lf-mix")
    d = tmp / "data"
    d.mkdir()
    for name, rows in ROWS.items():
        (d / f"{name}.json").write_text(json.dumps(rows))
    (d / "dataset_info.json").write_text(json.dumps(INFO))
    model = tiny_model("qwen2")
    return lf_runs(lf, [(test, model, cfg) for test, cfg in CASES], d, tmp)


def test_interleave_round_robin_as_llamafactory(runs) -> None:
    """interleave_under: a, b, c in turn up to the shortest (3 rows each, a's row 2 dropped after); interleave_over:
    up to the longest, the shorter ones wrapping around (7 x 3 rows less a's dropped row); after max_samples."""
    _check(runs["round_robin"])
    assert [len(ref["train_dataset"]) for _, ref in runs["round_robin"]] == [8, 20, 11]


def test_interleave_probs_as_llamafactory(runs) -> None:
    """interleave_probs: each row's dataset drawn as datasets draws it with the run's seed; the val_size split after
    the mix and an eval_dataset mixed with the same probabilities."""
    _check(runs["probs"])
    assert runs["probs"][3][1]["eval_dataset"]


def test_val_size_splits_rows_llamafactory_drops_later(runs) -> None:
    """LF splits val_size over every row and drops a row without an answer only when tokenizing: the row keeps its
    place in the split's permutation (plain concat too), so train and validation hold the same examples as LF's."""
    _check(runs["val_dropped_row"])
    # 3 rows for validation each time, one of them the dropped row
    assert [len(ref["eval_dataset"]) for _, ref in runs["val_dropped_row"]] == [2, 2]


def test_interleave_settings_llamafactory_refuses(runs) -> None:
    """interleave_probs with concat, a probability count that differs from the datasets', and interleave_once (the
    datasets LF allows has no all_exhausted_without_replacement): LF fails, exporter says so in one line."""
    for cfg, ref in runs["refused"]:
        assert "error" in ref, cfg
        ours = _ours(cfg)
        assert "error" in ours and "\n" not in ours["error"], (cfg, ours)
    errors = [_ours(cfg)["error"] for cfg, _ in runs["refused"]]
    assert "interleaved mixing" in errors[0] and "3 datasets" in errors[1] and "interleave_once" in errors[2]


def test_interleave_order_matches_datasets() -> None:
    """interleave_order equals datasets' own interleave_datasets (the indices it selects) where datasets is here."""
    datasets = pytest.importorskip("datasets")
    lengths = [4, 1, 6]
    parts = [datasets.Dataset.from_dict({"i": [(d, r) for r in range(n)]}) for d, n in enumerate(lengths)]
    for probs in (None, [0.1, 0.1, 0.8], [0.45, 0.1, 0.45]):
        for stopping in ("first_exhausted", "all_exhausted"):
            ref = datasets.interleave_datasets(parts, probabilities=probs, seed=3, stopping_strategy=stopping)["i"]
            assert data.interleave_order(lengths, probs, 3, stopping) == [tuple(x) for x in ref], (probs, stopping)


def test_interleave_refusals_in_one_line(tmp_path: Path) -> None:
    """An empty dataset, probabilities that do not sum to 1, and interleave_over with a probability of 0 (datasets
    would loop forever) are one line each."""
    for name, rows in {**ROWS, "empty": []}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({**INFO, "empty": {"file_name": "empty.json"}}))
    bad = [(["a", "empty"], "interleave_under", None, "has no rows"),
           (["a", "b"], "interleave_under", [0.5, 0.6], "sum to 1"),
           (["a", "b"], "interleave_over", [1.0, 0.0], "never ends")]  # fmt: skip
    for names, mix, probs, said in bad:
        with pytest.raises(UserError, match=said) as e:
            data.load(names, tmp_path, mix_strategy=mix, interleave_probs=probs)
        assert "\n" not in str(e.value)


def test_hub_registry_dataset_dir_is_one_line() -> None:
    """LF's `dataset_dir: REMOTE:<repo>` (dataset_info.json from the hub) and `ONLINE` (each dataset a hub id): one
    line saying they are not supported and what to do (it was "no dataset_info.json" in a folder named REMOTE:...)."""
    for where in ("REMOTE:llamafactory/demo_data", "ONLINE"):
        with pytest.raises(UserError, match="hub registries .* are not supported") as e:
            data.load(["identity"], where)
        assert where in str(e.value) and "\n" not in str(e.value)


def test_predict_mixes_eval_datasets(tiny_model, tmp_path: Path) -> None:
    """`exporter predict` with LF's mix_strategy/interleave_probs predicts on the interleaved rows (in the order the
    training load above matches to LF), not on the concatenation."""
    for name, rows in ROWS.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps(INFO))
    mix = {"mix_strategy": "interleave_under", "interleave_probs": [0.3, 0.7]}
    want = data.load(["b", "a"], tmp_path, unlabeled=True, **mix)[0]
    concat = data.load(["b", "a"], tmp_path, unlabeled=True)[0]
    assert [s.messages[-1]["content"] for s in want] != [s.messages[-1]["content"] for s in concat]
    r = subprocess.run([sys.executable, "-m", "exporter", "predict", "--model_name_or_path", str(tiny_model("qwen2")),
                        "--eval_dataset", "b,a", "--dataset_dir", str(tmp_path), "--template", "qwen",
                        "--mix_strategy", "interleave_under", "--interleave_probs", "0.3,0.7", "--max_new_tokens", "1",
                        "--output_dir", str(tmp_path / "pred")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EXPORTER_NO_PROGRESS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "no effect" not in r.stderr, r.stderr
    lines = (tmp_path / "pred" / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["label"].strip() for x in lines] == [s.messages[-1]["content"].strip() for s in want]
