"""Preference data in LLaMA-Factory's formats (ranking alpaca/sharegpt, kto_tag) and their tokenization through the
training template: labels only on the final answer, chosen and rejected sharing one prompt and one budget; with a
LLaMA-Factory template name, the examples equal LLaMA-Factory's own data pipeline on the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter import data, preference, render, templates
from exporter.errors import UserError

IGNORE = -100


def _write(d: Path, info: dict, files: dict[str, object]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (d / name).write_text(json.dumps(rows))
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


@pytest.fixture()
def prefdir(tmp_path: Path) -> Path:
    alpaca = [
        {"instruction": f"Add {i} and 1", "input": "", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(4)
    ]
    sharegpt = [  # LLaMA-Factory's dpo_en_demo.json shape
        {
            "conversations": [
                {"from": "system", "value": "Be exact."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": f"Name {i}?"},
            ],
            "chosen": {"from": "gpt", "value": f"It is {i}."},
            "rejected": {"from": "gpt", "value": "No idea at all, sorry about that."},
        }
        for i in range(3)
    ]
    kto = [  # LLaMA-Factory's kto_en_demo.json shape
        {
            "messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}],
            "label": i % 2 == 0,
        }
        for i in range(4)
    ] + [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    info = {
        "pairs_alpaca": {"file_name": "a.json", "ranking": True, "columns": {"prompt": "instruction",
                         "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "pairs_sharegpt": {"file_name": "s.json", "formatting": "sharegpt", "ranking": True,
                           "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "k.json", "formatting": "sharegpt",
                "columns": {"messages": "messages", "kto_tag": "label"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}},
        "plain": {"file_name": "a.json", "columns": {"prompt": "instruction", "response": "chosen"}},
        "ranking_no_columns": {"file_name": "a.json", "ranking": True},
    }  # fmt: skip
    return _write(tmp_path / "d", info, {"a.json": alpaca, "s.json": sharegpt, "k.json": kto})


def test_ranking_formats(prefdir: Path) -> None:
    samples, drops = data.load(["pairs_alpaca", "pairs_sharegpt"], prefdir, stage="dpo")
    assert len(samples) == 7 and not drops.counts
    a, s = samples[0], samples[4]
    assert a.chat() == [{"role": "user", "content": "Add 0 and 1"}, {"role": "assistant", "content": "1"}]
    assert a.chat(rejected=True)[-1] == {"role": "assistant", "content": "2"}
    assert s.chat()[0] == {"role": "system", "content": "Be exact."}
    assert [m["role"] for m in s.chat()] == ["system", "user", "assistant", "user", "assistant"]
    assert s.chat()[-1]["content"] == "It is 0." and s.chat(rejected=True)[-1]["content"].startswith("No idea")
    assert s.chat()[:-1] == s.chat(rejected=True)[:-1]


def test_kto_tags(prefdir: Path) -> None:
    samples, drops = data.load(["kto"], prefdir, stage="kto")
    assert [s.kto_tag for s in samples] == [True, False, True, False]
    assert drops.counts["rows without a kto_tag"] == 1


def test_stage_dataset_rules(prefdir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"stage dpo needs a preference dataset"):
        data.load(["plain"], prefdir, stage="dpo")
    with pytest.raises(UserError, match=r"ranking \(preference\) dataset: it trains with stage: dpo, not sft"):
        data.load(["pairs_alpaca"], prefdir, stage="sft")
    with pytest.raises(UserError, match=r"name its answer columns"):
        data.load(["ranking_no_columns"], prefdir, stage="dpo")
    with pytest.raises(UserError, match=r"stage kto needs a kto_tag column"):
        data.load(["plain"], prefdir, stage="kto")
    bad = _write(
        tmp_path / "bad",
        {"k": {"file_name": "k.json", "columns": {"response": "output", "kto_tag": "tag"}}},
        {"k.json": [{"instruction": "q", "output": "a", "tag": "maybe"}]},
    )
    with pytest.raises(UserError, match=r"k.json row 1: malformed row: tag \(kto_tag\) must be true or false"):
        data.load(["k"], bad, stage="kto")


def _encoder(tiny_model):
    from transformers import AutoTokenizer

    path = tiny_model("qwen2")
    tok = AutoTokenizer.from_pretrained(path)
    tpl = templates.resolve(path, "qwen-2.5")

    def encode(messages, tools):
        return render.encode(tok, tpl, messages, tools=tools)

    return tok, encode


def test_pairs_train_only_the_final_answer(tiny_model, prefdir: Path) -> None:
    tok, encode = _encoder(tiny_model)
    samples, drops = data.load(["pairs_sharegpt"], prefdir, stage="dpo")
    pairs = preference.encode_pairs(samples, encode, cutoff=1024, drops=drops)
    assert len(pairs) == 3
    for p, s in zip(pairs, samples, strict=True):
        full_ids, full_labels = encode(s.chat(), None)
        assert p.chosen_ids == full_ids  # nothing cut at 1024
        trained = [t for t, lab in zip(p.chosen_ids, p.chosen_labels, strict=True) if lab != IGNORE]
        assert tok.decode(trained) == s.chat()[-1]["content"] + "<|im_end|>"  # "Hello." (an earlier answer) is prompt
        start = p.chosen_labels.index(next(x for x in p.chosen_labels if x != IGNORE))
        assert p.rejected_ids[:start] == p.chosen_ids[:start]  # same prompt
        assert tok.decode([t for t, lab in zip(p.rejected_ids, p.rejected_labels, strict=True) if lab != IGNORE])\
            .startswith("No idea")  # fmt: skip


def test_pairs_cut_with_one_budget(tiny_model, prefdir: Path) -> None:
    tok, encode = _encoder(tiny_model)
    samples, drops = data.load(["pairs_sharegpt"], prefdir, stage="dpo")
    full = preference.encode_pairs(samples[:1], encode, cutoff=1024, drops=drops)[0]
    cut = preference.encode_pairs(samples[:1], encode, cutoff=20, drops=drops)[0]
    assert len(cut.chosen_ids) <= 20 and len(cut.rejected_ids) <= 20
    n_prompt = cut.chosen_labels.index(next(x for x in cut.chosen_labels if x != IGNORE))
    assert cut.rejected_labels[:n_prompt] == [IGNORE] * n_prompt and cut.rejected_labels[n_prompt] != IGNORE
    assert cut.chosen_ids[:n_prompt] == full.chosen_ids[:n_prompt]  # the prompt's head is kept (LLaMA-Factory)
    assert 0 < n_prompt < 20


def test_kto_examples_carry_kl_pairs(tiny_model, prefdir: Path) -> None:
    tok, encode = _encoder(tiny_model)
    samples, drops = data.load(["kto"], prefdir, stage="kto")
    ex = preference.encode_kto(samples, encode, cutoff=1024, drops=drops)
    assert [e.desirable for e in ex] == [True, False, True, False]

    def answer(ids, labels):
        return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])

    for k, e in enumerate(ex):
        assert answer(e.input_ids, e.labels) == f"A{k}<|im_end|>"
        assert answer(e.kl_ids, e.kl_labels) == f"A{(k - 1) % 4}<|im_end|>"  # previous sample's answer
        assert f"Q{k}" in tok.decode(e.kl_ids)


# ------------------------------------------------------------------ against LLaMA-Factory's own data pipeline

# (stage, LF template, fixture, cutoff_len): LF's pairwise and feedback processors, whole and cut
LF_CASES = [("dpo", "qwen", "qwen2", 1024), ("dpo", "llama3", "llama3", 14), ("kto", "qwen", "qwen2", 1024),
            ("kto", "llama3", "llama3", 9)]  # fmt: skip


def test_preference_examples_equal_llamafactory(tiny_model, tmp_path: Path) -> None:
    """stage dpo/kto examples equal what LLaMA-Factory's get_dataset makes of the same config (pairs: one prompt,
    one answer budget; kto: the KL pair from the previous row), multi-turn sharegpt and alpaca with a system."""
    from conftest import lf_python

    lf_python()
    from test_lf_names import _lf_train

    from exporter import examples, lf_args

    rows = [{"instruction": f"Add {i} and 1", "input": "x" * i, "system": "Be exact.", "chosen": f"{i + 1}",
             "rejected": f"It is {i + 2}, I think.", "output": f"{i + 1}" * (i + 1), "tag": i % 3 != 0}
            for i in range(4)]  # fmt: skip
    multi = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                {"from": "human", "value": f"Name {i}?"}],
              "chosen": {"from": "gpt", "value": f"It is {i}."}, "rejected": {"from": "gpt", "value": "No idea."}}
             for i in range(2)]  # fmt: skip
    alpaca = {"prompt": "instruction", "query": "input", "system": "system"}
    info = {
        "pairs": {"file_name": "a.json", "ranking": True,
                  "columns": alpaca | {"chosen": "chosen", "rejected": "rejected"}},
        "multi": {"file_name": "m.json", "formatting": "sharegpt", "ranking": True,
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "a.json", "columns": alpaca | {"response": "output", "kto_tag": "tag"}},
    }  # fmt: skip
    d = _write(tmp_path / "data", info, {"a.json": rows, "m.json": multi})
    datasets = {"dpo": ["multi", "pairs"], "kto": ["kto"]}
    configs = [{"stage": stage, "model_name_or_path": str(tiny_model(fix)), "dataset": ",".join(datasets[stage]),
                "dataset_dir": str(d), "template": name, "cutoff_len": cut}
               for stage, name, fix, cut in LF_CASES]  # fmt: skip
    refs = _lf_train(configs, tmp_path)
    for (stage, name, fixture, cut), ref in zip(LF_CASES, refs, strict=True):
        cfg = lf_args.TrainConfig(stage=stage, model_name_or_path=str(tiny_model(fixture)), dataset=datasets[stage],
                                  dataset_dir=str(d), template=name, cutoff_len=cut,
                                  output_dir=str(tmp_path / "o"))  # fmt: skip
        prep = examples.prepare(cfg, Path(cfg.model_name_or_path))
        if stage == "dpo":
            ours = [{"chosen_input_ids": e.chosen_ids, "chosen_labels": e.chosen_labels,
                     "rejected_input_ids": e.rejected_ids, "rejected_labels": e.rejected_labels}
                    for e in prep.train]  # fmt: skip
        else:
            ours = [{"input_ids": e.input_ids, "labels": e.labels, "kl_input_ids": e.kl_ids, "kl_labels": e.kl_labels,
                     "kto_tags": e.desirable} for e in prep.train]  # fmt: skip
        # the stated difference (as for sft): an example cutoff_len leaves without an answer token is dropped (and
        # said); LLaMA-Factory keeps it, and it trains nothing
        trained = [k for k in ("labels", "chosen_labels", "rejected_labels") if k in ref["examples"][0]]
        kept = [e for e in ref["examples"] if all(any(x != IGNORE for x in e[k][1:]) for k in trained)]
        assert len(ours) == len(kept), (stage, name)
        if cut < 1024:  # the cut bites
            assert max(len(e[k]) for e in ours for k in e if k.endswith("input_ids")) == cut
        for k, (a, b) in enumerate(zip(ours, kept, strict=True)):
            assert a == b, (stage, name, cut, k)
