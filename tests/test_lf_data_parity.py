"""Training examples around the template encoding equal LLaMA-Factory 0.9.5's own `get_dataset` on the same config:
neat packing's cutoff, stage pt (end of document, BOS, block size), the `val_size` split of the rows, SFT packing's
bins, and LF's map batches of `preprocessing_batch_size` rows (pt blocks, packing bins, KTO's KL pairs).

All configs run through one LF process (its imports take most of the time); none sets `default_system`, which LF's
`get_template_and_fix_tokenizer` leaves in its template registry for the configs after it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from exporter import examples, lf_args
from exporter.errors import UserError

IGNORE = -100
# per test name: (config, LF's result) for each of its cases
Runs = dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]

# LF's side: per config the train and eval examples as get_dataset makes them, or the error LF raises
LF_SCRIPT = r"""
import contextlib, json, logging, os, sys, warnings
os.environ["DISABLE_VERSION_CHECK"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
with contextlib.redirect_stdout(sys.stderr):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
KEYS = ("input_ids", "labels", "position_ids", "kl_input_ids", "kl_labels", "kto_tags")
out = []
for args in json.load(sys.stdin):
    try:
        with contextlib.redirect_stdout(sys.stderr):  # LF prints an example
            model_args, data_args, training_args, _, _ = get_train_args(args)
            tokenizer = load_tokenizer(model_args)["tokenizer"]
            tpl = get_template_and_fix_tokenizer(tokenizer, data_args)
            stage = {"dpo": "rm"}.get(args["stage"], args["stage"])
            module = get_dataset(tpl, model_args, data_args, training_args, stage, tokenizer)
    except Exception as e:
        out.append({"error": f"{type(e).__name__}: {e}"})
        continue
    res = {"pad": tokenizer.pad_token_id}
    for split in ("train_dataset", "eval_dataset"):
        ds = module.get(split)
        res[split] = [] if ds is None else [{k: e[k] for k in KEYS if k in e} for e in ds]
    out.append(res)
json.dump(out, sys.stdout)
"""


def _rows() -> dict[str, list[dict[str, Any]]]:
    mix = [{"instruction": f"Q{i} " + "w " * (7 * i % 23), "input": "", "output": f"A{i} " + "x " * (5 * i % 11)}
           for i in range(12)]  # fmt: skip
    return {
        "long.json": [{"instruction": "word " * 80, "input": "", "output": "answer " * 30}],
        "ten.json": [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)],
        "pt.json": [{"text": f"Document {i}: " + "alpha beta " * (i % 5) + "end."} for i in range(10)],
        "mix.json": mix + [{"instruction": "long " * 60, "input": "", "output": "y"}],
        "kto.json": [{"instruction": f"q{i}", "input": "", "output": f"a {i}", "tag": i % 3 != 0} for i in range(10)],
    }


INFO = {
    "long": {"file_name": "long.json"},
    "ten": {"file_name": "ten.json"},
    "pt": {"file_name": "pt.json", "columns": {"prompt": "text"}},
    "mix": {"file_name": "mix.json"},
    "kto": {"file_name": "kto.json", "columns": {"prompt": "instruction", "response": "output", "kto_tag": "tag"}},
}
PT = {"stage": "pt", "dataset": "pt"}
TEN = {"dataset": "ten", "template": "qwen"}
MIX = {"dataset": "mix", "template": "qwen"}
KTO = {"stage": "kto", "dataset": "kto", "template": "qwen", "cutoff_len": 64}

# (test, fixture, config): every config runs once through LF and once through exporter; the real vocabularies where
# the tokenizer's own rules matter (BOS, <|end_of_text|>), the small ones elsewhere (fast)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("neat", "qwen2", {"dataset": "long", "template": "qwen", "cutoff_len": 64, "neat_packing": True}),
    ("pt_llama3", "llama3-real", {**PT, "template": "llama3", "cutoff_len": 32, "packing": False}),
    ("pt_bos", "llama3-real", {**PT, "cutoff_len": 16}),
    ("pt_bos", "llama2-real", {**PT, "template": "llama2", "cutoff_len": 16, "packing": False}),
    ("pt_bos", "gemma3-real", {**PT, "template": "gemma", "cutoff_len": 16}),
    ("pt_block", "qwen2", {**PT, "cutoff_len": 8, "packing": True}),
    ("val", "qwen2", {**TEN, "cutoff_len": 64, "val_size": 0.3}),
    ("val", "qwen2", {**TEN, "cutoff_len": 64, "val_size": 2}),
    ("val", "qwen2", {**MIX, "cutoff_len": 40, "val_size": 0.25, "packing": True}),
    ("val", "qwen2", {**PT, "cutoff_len": 8, "val_size": 3}),
    ("val_refused", "qwen2", {**TEN, "val_size": 1.0}),
    ("val_refused", "qwen2", {**TEN, "val_size": 10}),
    ("bins", "qwen2", {**MIX, "cutoff_len": 100, "packing": True}),
    ("bins", "qwen2", {**MIX, "cutoff_len": 48, "neat_packing": True}),
    ("batches", "qwen2", {**PT, "cutoff_len": 5, "preprocessing_batch_size": 4}),
    ("batches", "qwen2", {**MIX, "cutoff_len": 60, "packing": True, "preprocessing_batch_size": 4}),
    ("batches", "qwen2", {**KTO, "preprocessing_batch_size": 4}),
    ("batches", "qwen2", {**KTO, "val_size": 0.3, "preprocessing_batch_size": 3}),
]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> Runs:
    """Per test name: (config, LF's result) for each of its cases, from one LF process."""
    from conftest import lf_python

    lf = lf_python()
    tmp = tmp_path_factory.mktemp("lf-data")
    d = tmp / "data"
    d.mkdir()
    for name, rows in _rows().items():
        (d / name).write_text(json.dumps(rows))
    (d / "dataset_info.json").write_text(json.dumps(INFO))
    cases = [(test, tiny_model(family.removesuffix("-real"), real_vocab=family.endswith("-real")), cfg)
             for test, family, cfg in CASES]  # fmt: skip
    return lf_runs(lf, cases, d, tmp)


def lf_runs(lf: str, cases: list[tuple[str, Path, dict[str, Any]]], data_dir: Path, tmp: Path) -> Runs:
    """LF's `get_dataset` on each (test name, model, config) case, in one LF process: per test name, (the whole
    config, LF's result) for each of its cases."""
    configs = []
    for k, (_, model, cfg) in enumerate(cases):
        configs.append({"stage": "sft", "do_train": True, "finetuning_type": "lora", "report_to": "none",
                        "overwrite_cache": True, "model_name_or_path": str(model), "dataset_dir": str(data_dir),
                        "output_dir": str(tmp / f"out-{k}"), **cfg})  # fmt: skip
    out: Runs = {}
    for (test, _, _), cfg, ref in zip(cases, configs, run_lf(lf, configs, tmp), strict=True):
        out.setdefault(test, []).append((cfg, ref))
    return out


def run_lf(lf: str, configs: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    """LF's own `get_dataset` on each config (LF_SCRIPT in LF's venv, offline, caches under `tmp`): its ids/labels."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "HF_HOME": str(tmp / "hf"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([lf, "-c", LF_SCRIPT], input=json.dumps(configs), capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _ours(cfg: dict[str, Any]) -> dict[str, Any]:
    """exporter's examples for an LF config, through the command line's parsing and checks (once per config)."""
    return _prepared(json.dumps(cfg, sort_keys=True))


@functools.cache
def _prepared(config: str) -> dict[str, Any]:
    data = {k: v for k, v in json.loads(config).items() if k not in ("do_train", "report_to", "overwrite_cache")}
    try:
        conf, given = lf_args.config_from_dict(dict(data), "test")
        lf_args.check(conf, given, "cpu", notes=False)
        prep = examples.prepare(conf, Path(conf.model_name_or_path))
    except UserError as e:
        return {"error": str(e)}
    tok = prep.tokenizer
    return {"train_dataset": [_row(e) for e in prep.train], "eval_dataset": [_row(e) for e in prep.val],
            "add_bos_token": getattr(tok, "add_bos_token", False),
            "encode_adds_bos": tok("x")["input_ids"][0] == tok.bos_token_id}  # fmt: skip


def _row(e: Any) -> dict[str, Any]:
    if hasattr(e, "kl_ids"):
        return {"input_ids": e.input_ids, "labels": e.labels, "kl_input_ids": e.kl_ids, "kl_labels": e.kl_labels,
                "kto_tags": e.desirable}  # fmt: skip
    return {"input_ids": e.input_ids, "labels": e.labels, "segments": e.segments}


def _lf_row(ref: dict[str, Any], n: int, pad: int | None) -> dict[str, Any]:
    """LF's example without the padding LF puts after a packed sequence (pad ids, no label, position 0), and the
    lengths of the examples a packed sequence holds (its positions restart at 0 in each)."""
    out = dict(ref)
    tail = ref["input_ids"][n:]
    assert all(t == pad for t in tail) and all(x == IGNORE for x in ref.get("labels", [IGNORE] * len(tail))[n:])
    out["input_ids"] = ref["input_ids"][:n]
    out["labels"] = ref["labels"][:n] if "labels" in ref else ref["input_ids"][:n]  # pt: the ids are the labels
    pos = out.pop("position_ids", None)
    if pos is not None:
        starts = [i for i, p in enumerate(pos[:n]) if p == 0] + [n]
        out["segments"] = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return out


def _check(runs: list[tuple[dict[str, Any], dict[str, Any]]], neat: bool = False) -> None:
    for cfg, ref in runs:
        ours = _ours(cfg)
        assert "error" not in ref and "error" not in ours, (cfg, ref.get("error"), ours.get("error"))
        for split in ("train_dataset", "eval_dataset"):
            mine, theirs = ours[split], ref[split]
            assert len(mine) == len(theirs), (cfg, split, len(mine), len(theirs))
            for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                b = _lf_row(b, len(a["input_ids"]), ref["pad"])
                if "segments" in b and not a.get("segments"):  # plain packing: the order shows in the ids
                    b.pop("segments")
                a = {key: v for key, v in a.items() if v is not None}
                assert a == b, (cfg, split, k)


def test_neat_packing_cuts_at_cutoff_len_minus_one(runs) -> None:
    """neat_packing turns packing on, and LF's packing keeps one position free: 63 tokens for cutoff_len 64."""
    _check(runs["neat"])
    assert len(_ours(runs["neat"][0][0])["train_dataset"][0]["input_ids"]) == 63


def test_pt_llama3_ends_documents_with_end_of_text(runs) -> None:
    """Stage pt under template llama3: documents end with <|end_of_text|>, not the template's <|eot_id|>."""
    _check(runs["pt_llama3"])
    assert all(e["input_ids"][-1] == 128001 for e in runs["pt_llama3"][0][1]["train_dataset"])


def test_pt_bos_follows_add_bos_token(runs) -> None:
    """LF puts a BOS before a pt text (or over a block's first token) only when the tokenizer's add_bos_token is
    true: under transformers 5 it is false for llama3, llama2 and gemma3, which still add BOS in `encode`."""
    for cfg, _ in runs["pt_bos"]:
        ours = _ours(cfg)
        assert (ours["add_bos_token"], ours["encode_adds_bos"]) == (False, True), cfg["model_name_or_path"]
    _check(runs["pt_bos"])


def test_pt_explicit_packing_blocks_are_cutoff_len_minus_one(runs) -> None:
    """`packing: true` given explicitly makes blocks of cutoff_len - 1 (LF's DataArguments); pt's default 16."""
    _check(runs["pt_block"])
    assert {len(e["input_ids"]) for e in runs["pt_block"][0][1]["train_dataset"]} == {7}


def test_val_size_splits_rows_as_llamafactory(runs) -> None:
    """The same rows for validation (datasets' train_test_split by seed), in the same order, packed when packing."""
    _check(runs["val"])


def test_val_size_refusals_match_llamafactory(runs) -> None:
    """val_size 1.0 (a fraction) and a count of every row: LF refuses both, exporter in one line."""
    for cfg, ref in runs["val_refused"]:
        assert "error" in ref, cfg
        ours = _ours(cfg)
        assert "error" in ours and "val_size" in ours["error"] and "\n" not in ours["error"], (cfg, ours)


def test_sft_packing_bins_and_order(runs) -> None:
    """SFT packing: LF's greedy knapsack bins, each in its pick order (longest first), neat and plain."""
    _check(runs["bins"])


def test_map_batches_of_preprocessing_batch_size(runs) -> None:
    """pt blocks, SFT packing and KTO's KL pairs per LF map batch of preprocessing_batch_size rows."""
    _check(runs["batches"])


def test_lf_data_keys_not_supported_yet() -> None:
    """LF's eval_on_each_dataset is a known key, not supported yet; interleave_probs, as in LF, needs an interleaved
    mix_strategy; preprocessing_batch_size is a key of exporter's own."""
    base = {"model_name_or_path": "m", "output_dir": "o", "dataset": "a"}
    with pytest.raises(UserError, match="eval_on_each_dataset: .* is not supported yet"):
        lf_args.config_from_dict({**base, "eval_on_each_dataset": True}, "cmd")
    with pytest.raises(UserError, match="interleave_probs is only valid for interleaved mixing"):
        lf_args.check(lf_args.config_from_dict({**base, "interleave_probs": "0.5,0.5"}, "cmd")[0], set(), "cpu")
    cfg, _ = lf_args.config_from_dict({**base, "eval_on_each_dataset": False, "preprocessing_batch_size": 4}, "cmd")
    assert cfg.preprocessing_batch_size == 4
    with pytest.raises(UserError, match="preprocessing_batch_size must be"):
        lf_args.check(lf_args.config_from_dict({**base, "preprocessing_batch_size": 0}, "cmd")[0], set(), "cpu")
