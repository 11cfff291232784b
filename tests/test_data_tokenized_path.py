"""LLaMA-Factory's `tokenized_path` (its qwen3_preprocess.yaml): the first run saves the tokenized splits with datasets'
`save_to_disk`, a later run trains on them without the raw data. Checked against LLaMA-Factory 0.9.5's own
`get_dataset`: its saved folder gives exporter the examples LF trains on, exporter's folder loads in LF with LF's
columns and types and gives LF exporter's examples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_lf_data_parity import run_lf

from exporter import data, lf_args
from exporter import train as T
from exporter.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

SFT = {"stage": "sft", "dataset": "ten", "template": "qwen", "cutoff_len": 64, "val_size": 0.2}
PT = {"stage": "pt", "dataset": "pt", "cutoff_len": 8}


def _data(d: Path) -> Path:
    d.mkdir()
    ten = [{"instruction": f"q{i}", "input": "", "output": f"a{i} " + "x " * (i % 4)} for i in range(10)]
    pt = [{"text": f"Document {i}: " + "alpha beta " * (i % 5) + "end."} for i in range(10)]
    (d / "ten.json").write_text(json.dumps(ten))
    (d / "pt.json").write_text(json.dumps(pt))
    info = {"ten": {"file_name": "ten.json"}, "pt": {"file_name": "pt.json", "columns": {"prompt": "text"}}}
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def _prep(model: Path, tmp: Path, save: bool = True, **cfg: Any) -> Any:
    """exporter's examples for an LF config, through the config parsing and checks."""
    conf, given = lf_args.config_from_dict({"model_name_or_path": str(model), "output_dir": str(tmp / "out"),
                                            "do_train": True, **cfg}, "test")  # fmt: skip
    lf_args.check(conf, given, "cpu", notes=False)
    return data.prepare_tokenized(conf, model, save=save)


def _rows(examples: list[Any], stage: str) -> list[dict[str, Any]]:
    return [{"input_ids": e.input_ids, **({"labels": e.labels} if stage == "sft" else {})} for e in examples]


def _lf_rows(ref: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return ref[split]


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory) -> dict[str, Any]:
    """exporter saves sft and pt folders; then one LF process: LF saves its own folders from the data, loads them
    back (the data removed), and loads exporter's folders."""
    from conftest import lf_python

    lf = lf_python()
    model = tiny_model("qwen2")
    tmp = tmp_path_factory.mktemp("tokenized")
    d = _data(tmp / "data")
    ours = {}
    for name, cfg in (("sft", SFT), ("pt", PT)):
        prep = _prep(model, tmp, dataset_dir=str(d), tokenized_path=str(tmp / f"ours-{name}"), **cfg)
        ours[name] = (_rows(prep.train, name), _rows(prep.val, name))
    empty = tmp / "nodata"
    empty.mkdir()
    base = {"do_train": True, "finetuning_type": "lora", "report_to": "none", "overwrite_cache": True,
            "model_name_or_path": str(model)}  # fmt: skip
    configs = []
    for k, (name, cfg) in enumerate((("sft", SFT), ("pt", PT))):
        for j, (where, folder) in enumerate(((d, "lf"), (empty, "lf"), (empty, "ours"))):  # save, load, load ours
            configs.append({**base, **cfg, "dataset_dir": str(where), "tokenized_path": str(tmp / f"{folder}-{name}"),
                            "output_dir": str(tmp / f"o{k}{j}")})  # fmt: skip
    refs = run_lf(lf, configs, tmp)
    assert not [r for r in refs if "error" in r], refs
    lf = {"sft": refs[0:3], "pt": refs[3:6]}
    return {"model": model, "tmp": tmp, "data": d, "ours": ours, "lf": lf}


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_lf_folder_gives_lf_examples(world: dict[str, Any], tmp_path: Path, stage: str) -> None:
    """LF's saved folder, the raw data gone: exporter's examples are those LF's second run trains on (and those LF
    tokenized and saved in its first run)."""
    saved, loaded, _ = world["lf"][stage]
    assert saved["train_dataset"] == loaded["train_dataset"]  # LF itself: what it saved is what it loads
    copy = tmp_path / "lf"
    shutil.copytree(world["tmp"] / f"lf-{stage}", copy)
    cfg = SFT if stage == "sft" else PT
    prep = _prep(world["model"], tmp_path, dataset_dir=str(tmp_path / "missing"), tokenized_path=str(copy), **cfg)
    assert _rows(prep.train, stage) == _lf_rows(loaded, "train_dataset")
    assert _rows(prep.val, stage) == _lf_rows(loaded, "eval_dataset")
    assert len(prep.train) == (8 if stage == "sft" else len(loaded["train_dataset"]))


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_our_folder_loads_in_lf(world: dict[str, Any], stage: str) -> None:
    """exporter's folder: LF 0.9.5 loads it (its load_from_disk branch) and gets exporter's examples; the columns
    and types are those LF saves itself."""
    train, val = world["ours"][stage]
    _, lf_own, lf_ours = world["lf"][stage]
    assert lf_ours["train_dataset"] == train and lf_ours["eval_dataset"] == val
    assert train == lf_own["train_dataset"] and val == lf_own["eval_dataset"]  # and those are LF's own examples
    for split in ("train", "validation") if val else ("train",):
        mine = json.loads((world["tmp"] / f"ours-{stage}" / split / "dataset_info.json").read_text())["features"]
        theirs = json.loads((world["tmp"] / f"lf-{stage}" / split / "dataset_info.json").read_text())["features"]
        assert mine == theirs
    splits = json.loads((world["tmp"] / f"ours-{stage}" / "dataset_dict.json").read_text())
    assert splits == json.loads((world["tmp"] / f"lf-{stage}" / "dataset_dict.json").read_text())


def test_train_runs_on_lf_folder_without_data(world: dict[str, Any], tmp_path: Path) -> None:
    """`exporter train` with tokenized_path naming LF's folder trains without the dataset files, leaves the folder as
    it is, and its loss is that of training from the raw data."""
    copy = tmp_path / "lf"
    shutil.copytree(world["tmp"] / "lf-sft", copy)
    before = sorted((p.relative_to(copy), p.read_bytes()) for p in copy.rglob("*") if p.is_file())
    cfg = {**SFT, "model_name_or_path": str(world["model"]), "output_dir": str(tmp_path / "out"), "do_train": True,
           "dataset_dir": str(tmp_path / "missing"), "tokenized_path": str(copy), "max_steps": 2,
           "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 1000}  # fmt: skip
    conf, given = lf_args.config_from_dict(dict(cfg), "test")
    res = T.train(conf, given)
    assert res.steps == 2
    raw = {**cfg, "dataset_dir": str(world["data"]), "output_dir": str(tmp_path / "raw"), "tokenized_path": None}
    conf, given = lf_args.config_from_dict(raw, "test")
    assert res.results["train_loss"] == T.train(conf, given).results["train_loss"]  # the same examples, trained alike
    assert before == sorted((p.relative_to(copy), p.read_bytes()) for p in copy.rglob("*") if p.is_file())


UNSUPPORTED = [({"stage": "dpo", "dataset": "ten"}, "for stage dpo"), ({**SFT, "packing": True}, "with sft packing"),
               ({**SFT, "neat_packing": True}, "with sft packing")]  # fmt: skip


@pytest.mark.parametrize(("cfg", "why"), UNSUPPORTED)
def test_unsupported_trains_without_saving(world: dict[str, Any], tmp_path: Path, capsys, cfg: dict, why: str) -> None:
    """What exporter cannot save in LF's format (dpo/kto columns, LF's padded packed rows) trains as before, without
    writing the folder, and says why."""
    conf, given = lf_args.config_from_dict({"model_name_or_path": str(world["model"]), "do_train": True,
                                            "output_dir": str(tmp_path / "o"), "dataset_dir": str(world["data"]),
                                            "tokenized_path": str(tmp_path / "t"), **cfg}, "c")  # fmt: skip
    lf_args.check(conf, given, "cpu")
    assert f"tokenized_path: {tmp_path / 't'} is not written {why}" in capsys.readouterr().err
    if conf.stage == "sft":
        assert data.prepare_tokenized(conf, world["model"]).train
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(("cfg", "why"), UNSUPPORTED)
def test_unsupported_refuses_saved_folder(world: dict[str, Any], tmp_path: Path, cfg: dict, why: str) -> None:
    """A saved folder that such a run cannot read (LF would train on it) is one line saying why."""
    conf, given = lf_args.config_from_dict({"model_name_or_path": "m", "output_dir": str(tmp_path / "o"),
                                            "do_train": True, "tokenized_path": str(world["tmp"] / "lf-sft"), **cfg},
                                           "c")  # fmt: skip
    with pytest.raises(UserError, match=f"holds a saved tokenized dataset .*cannot read {why}") as e:
        lf_args.check(conf, given, "cpu", notes=False)
    assert "\n" not in str(e.value)


def test_bad_folders_are_one_line(world: dict[str, Any], tmp_path: Path) -> None:
    """A folder with files that are not a saved dataset, and a folder saved for the other stage, name the folder."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a dataset saved by save_to_disk") as e:
        data.load_tokenized(str(junk), "sft")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="holds stage pt's tokenized data, not stage sft's"):
        data.load_tokenized(str(world["tmp"] / "lf-pt"), "sft")
    with pytest.raises(UserError, match="holds stage sft's tokenized data, not stage pt's"):
        data.load_tokenized(str(world["tmp"] / "lf-sft"), "pt")


def test_save_is_whole_or_nothing(world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails half-way is one line and leaves no folder (the next run would take a partial one for LF's
    data)."""
    import datasets

    def boom(self: Any, path: str, **kw: Any) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "dataset_dict.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", boom)
    with pytest.raises(UserError, match=f"tokenized_path: cannot write {tmp_path / 't'} \\(disk full\\)"):
        _prep(world["model"], tmp_path, dataset_dir=str(world["data"]), tokenized_path=str(tmp_path / "t"), **SFT)
    assert not (tmp_path / "t").exists() and list(tmp_path.iterdir()) == []


def test_without_datasets_package(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` is optional: without it a run trains as before without saving (said), and a saved folder is one
    line asking for it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    args = {"model_name_or_path": "m", "output_dir": str(tmp_path / "o"), "do_train": True, **SFT}
    conf, given = lf_args.config_from_dict({**args, "tokenized_path": str(tmp_path / "t")}, "c")
    lf_args.check(conf, given, "cpu")
    assert "is not written without the datasets package (pip install datasets)" in capsys.readouterr().err
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    conf, given = lf_args.config_from_dict({**args, "tokenized_path": str(tmp_path / "saved")}, "c")
    with pytest.raises(UserError, match="cannot read without the datasets package"):
        lf_args.check(conf, given, "cpu", notes=False)


def test_saves_into_an_empty_folder(world: dict[str, Any], tmp_path: Path) -> None:
    """An existing empty folder is not LF's data (its has_tokenized_data): a run saves there, the next reads it."""
    (tmp_path / "t").mkdir()
    first = _prep(world["model"], tmp_path, dataset_dir=str(world["data"]), tokenized_path=str(tmp_path / "t"), **PT)
    assert (tmp_path / "t" / "dataset_dict.json").is_file()
    again = _prep(
        world["model"], tmp_path, dataset_dir=str(tmp_path / "gone"), tokenized_path=str(tmp_path / "t"), **PT
    )
    assert _rows(again.train, "pt") == _rows(first.train, "pt") == world["ours"]["pt"][0]
