"""LLaMA-Factory 0.9.5's own example YAMLs (`examples/` at tag v0.9.5), replayed through `exporter train`: the keys
of the examples exporter does not do are refused by name in one line (they read as unknown keys, with a did-you-mean
naming another key: `use_dft_loss` "did you mean 'pref_loss'?"), accepted at LLaMA-Factory's defaults (held equal
to its hparams dataclasses in its own venv), and the train_qlora examples' pre-quantized bases (GPTQ/AWQ/AQLM
checkpoints) are one line, not optimum's NameError traceback; their `bf16: true` on a CPU that emulates bf16 is
said."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter import lf_args
from exporter.errors import UserError

# the keys each example sets that exporter does not do, at the values the example gives them (v0.9.5); those it sets
# at LF's defaults (apollo_scale_type: channel, badam_switch_interval: 50) ask for nothing and are accepted
EXAMPLE_KEYS = {
    "extras/adam_mini/qwen2_full_sft.yaml": {"use_adam_mini": True},
    "extras/muon/qwen2_full_sft.yaml": {"use_muon": True},
    "extras/dft/qwen2_full_sft.yaml": {"use_dft_loss": True},
    "extras/asft/qwen2_full_asft.yaml": {"use_asft_loss": True, "asft_alpha": 0.05},
    "extras/eaft/qwen25_05b_eaft_full.yaml": {"use_eaft_loss": True},
    "extras/fp8/llama3_fp8_fsdp_sft.yaml": {"fp8": True, "fp8_backend": "torchao",
                                            "fp8_enable_fsdp_float8_all_gather": True},
    "extras/mod/llama3_full_sft.yaml": {"mixture_of_depths": "convert", "pure_bf16": True},
    "extras/galore/llama3_full_sft.yaml": {"galore_layerwise": True, "galore_rank": 128, "pure_bf16": True},
    "extras/apollo/llama3_full_sft.yaml": {"apollo_rank": 128, "apollo_layerwise": True},
    "extras/badam/llama3_full_sft.yaml": {"badam_verbose": 2},
    "extras/pissa/llama3_lora_sft.yaml": {"pissa_convert": True},
    "train_lora/qwen3_lora_sft_ray.yaml": {"ray_num_workers": 4},
    "extras/multi_tokens (tokens_cfg.yaml)": {"add_special_tokens": "<|START_OF_SVG|>", "resize_vocab": True},
}  # fmt: skip
# LF keys users copy at their default values: nothing asked for, accepted
AT_DEFAULTS = {"pure_bf16": False, "use_fast_tokenizer": True, "logging_first_step": False, "resize_vocab": False,
               "upcast_layernorm": False, "disable_shuffling": False, "use_dft_loss": "false", "fp8": False,
               "ray_num_workers": 1, "neftune_noise_alpha": None, "model_revision": "main"}  # fmt: skip
BASE = {"model_name_or_path": "m", "output_dir": "o", "dataset": "identity", "template": "llama3"}


@pytest.mark.parametrize("example", sorted(EXAMPLE_KEYS))
def test_example_keys_are_refused_by_name(example: str) -> None:
    """Each key is refused on its own, named, as not supported; never as an unknown key with a did-you-mean."""
    for key, value in EXAMPLE_KEYS[example].items():
        with pytest.raises(UserError) as e:
            lf_args.config_from_dict({**BASE, key: value}, example)
        msg = str(e.value)
        assert f"{example}: {key}: " in msg and msg.endswith("is not supported yet"), msg
        assert "unknown key" not in msg and "did you mean" not in msg and "\n" not in msg, msg


def test_lf_keys_at_their_defaults_are_accepted(capsys) -> None:
    """LF's defaults ask for nothing; `run_name` (trackers' run name) is said to have no effect."""
    cfg, given = lf_args.config_from_dict({**BASE, **AT_DEFAULTS, "run_name": "llama3_fp8_fsdp_sft"}, "cfg.yaml")
    assert cfg.template == "llama3" and not set(AT_DEFAULTS) & given and "run_name" not in given
    assert "run_name: no effect" in capsys.readouterr().err


_LF_DEFAULTS = """
import dataclasses, json, os
os.environ["DISABLE_VERSION_CHECK"] = "1"
from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
from llamafactory.hparams.training_args import TrainingArguments
out = {}
for cls in (ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments, TrainingArguments):
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            d = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
        else:
            d = "<required>"
        try:
            json.dumps(d)
        except TypeError:
            d = repr(d)
        out[f.name] = d
print("LF-DEFAULTS " + json.dumps(out))
"""


def test_refused_keys_are_llamafactorys_with_its_defaults() -> None:
    """Every refused key is one of LLaMA-Factory 0.9.5's own (its hparams dataclasses, read in its venv) and the
    value accepted as asking for nothing is LF's default; every key of the examples above is LF's and known here."""
    from conftest import lf_python

    proc = subprocess.run([lf_python(), "-c", _LF_DEFAULTS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LF-DEFAULTS "))
    lf = json.loads(line.removeprefix("LF-DEFAULTS "))
    example_keys = {k for keys in EXAMPLE_KEYS.values() for k in keys} | set(AT_DEFAULTS)
    assert example_keys <= set(lf), example_keys - set(lf)
    assert example_keys <= set(lf_args.UNSUPPORTED), example_keys - set(lf_args.UNSUPPORTED)
    ours_only = {"group_by_length"}  # HF 4's key (HF 5: train_sampling_strategy), still refused by name
    for key in set(lf_args.UNSUPPORTED) - ours_only:
        assert key in lf, key
        assert lf[key] == lf_args.UNSUPPORTED_DEFAULTS[key], (key, lf[key], lf_args.UNSUPPORTED_DEFAULTS[key])
    for key, (_, default) in lf_args._IDLE_KEYS.items():  # accepted as doing nothing: LF's keys, LF's defaults
        assert key in lf and lf[key] == default, (key, lf.get(key), default)
    for key in ("mix_strategy", "interleave_probs", "tokenized_path", "cache_dir", "use_reentrant_gc"):  # honoured
        assert lf[key] == getattr(lf_args.TrainConfig("m", "o"), key), key


# keys LF's web board writes (its runner's _parse_train_args, the preview command and training_args.yaml) or its
# data arguments take, that exporter called unknown keys: refused by name where they ask for something exporter does
# not do, accepted and said where they do nothing in a training run
BOARD_REFUSED = {"ignore_pad_token_for_loss": False, "use_swanlab": True, "predict_with_generate": True,
                 "do_predict": True}  # fmt: skip
BOARD_IDLE = {"buffer_size": 1024, "data_shared_file_system": True, "media_dir": "data/media", "max_new_tokens": 512,
              "temperature": 0.5, "top_p": 0.9, "eval_num_beams": 2, "swanlab_project": "p"}  # fmt: skip


def test_board_and_data_keys_are_known() -> None:
    """Each refused key is named in one line as not supported (it was "unknown key 'use_swanlab' (did you mean
    'use_rslora'?)"); at LF's default it is accepted."""
    for key, value in BOARD_REFUSED.items():
        with pytest.raises(UserError) as e:
            lf_args.config_from_dict({**BASE, key: value}, "training_args.yaml")
        msg = str(e.value)
        assert msg.startswith(f"training_args.yaml: {key}: ") and msg.endswith("is not supported yet"), msg
        assert "unknown key" not in msg and "\n" not in msg, msg
    at_defaults = {k: lf_args.UNSUPPORTED_DEFAULTS[k] for k in BOARD_REFUSED}
    cfg, given = lf_args.config_from_dict({**BASE, **at_defaults}, "training_args.yaml")
    assert cfg.template == "llama3" and not given & set(BOARD_REFUSED)


def test_keys_without_effect_in_training_are_said(capsys) -> None:
    """buffer_size (streaming only), data_shared_file_system, media_dir (multimodal), generation and SwanLab
    settings do nothing in a training run, in LF as here: accepted, each said once with why; at LF's defaults not
    said."""
    cfg, given = lf_args.config_from_dict({**BASE, **BOARD_IDLE}, "cfg.yaml")
    assert not given & set(BOARD_IDLE)
    err = capsys.readouterr().err
    for key in BOARD_IDLE:
        assert err.count(key) == 1, (key, err)
    assert "streaming" in err and "multimodal" in err and "exporter predict" in err and "use_swanlab" in err
    defaults = {k: lf_args._IDLE_KEYS[k][1] for k in BOARD_IDLE}
    lf_args.config_from_dict({**BASE, **defaults}, "cfg.yaml")
    assert "no effect" not in capsys.readouterr().err


def test_preprocess_example_tokenized_path(tmp_path: Path, capsys) -> None:
    """LF's train_lora/qwen3_preprocess.yaml: `tokenized_path` names a folder LF fills with the tokenized dataset; an
    empty one says the dataset will be saved there, a filled one says it is trained on, and a run exporter cannot
    save in LF's format (sft packing) refuses a filled one in one line."""
    args = {**BASE, "tokenized_path": str(tmp_path / "saves" / "dataset" / "sft")}
    cfg, given = lf_args.config_from_dict(dict(args), "qwen3_preprocess.yaml")
    lf_args.check(cfg, given, "cpu")
    assert "will be saved in" in capsys.readouterr().err
    saved = tmp_path / "saves" / "dataset" / "sft"
    saved.mkdir(parents=True)
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    cfg, given = lf_args.config_from_dict(dict(args), "qwen3_preprocess.yaml")
    lf_args.check(cfg, given, "cpu")
    assert "training on the tokenized dataset saved in" in capsys.readouterr().err
    cfg, given = lf_args.config_from_dict({**args, "packing": True}, "qwen3_preprocess.yaml")
    with pytest.raises(UserError, match="holds a saved tokenized dataset") as e:
        lf_args.check(cfg, given, "cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("value", "counted", "said"),
    [("non_padding", True, False), ("no", False, False), ("all", True, True), (True, True, True)],
)
def test_include_num_input_tokens_seen_takes_hf5_values(capsys, value: object, counted: bool, said: bool) -> None:
    """LF 0.9.5's transformers 5 takes no | all | non_padding (a bool: all / no); `non_padding` was refused ("must
    be true or false"). exporter counts the examples' tokens, HF's non_padding: all/true is said to differ."""
    cfg, _ = lf_args.config_from_dict({**BASE, "include_num_input_tokens_seen": value}, "cfg.yaml")
    assert cfg.include_num_input_tokens_seen is counted
    assert ("HF's all (or true) also counts each batch's padding" in capsys.readouterr().err) == said


@pytest.mark.parametrize(
    ("native", "device", "said"), [(False, "cpu", True), (True, "cpu", False), (False, "cuda", False)]
)
def test_bf16_on_a_cpu_without_native_bf16_is_said(monkeypatch, capsys, native: bool, device: str, said: bool) -> None:
    """Every LF example sets bf16: true; on a CPU without native bf16 torch emulates it (qwen3_lora_sft on the tiny
    Qwen3 with the real 151k vocabulary: 4 tokens/s against 86 in fp32, 2-core AVX2): said once, as a note."""
    monkeypatch.setattr(lf_args, "cpu_has_bf16", lambda: native)
    cfg = lf_args.TrainConfig(model_name_or_path="m", output_dir="o", dataset=["d"], bf16=True)
    lf_args.check(cfg, {"bf16"}, device)
    err = capsys.readouterr().err
    assert ("note: bf16: this CPU has no native bf16" in err) == said, err
    assert err.count("bf16: false") == said


def test_prequantized_base_is_one_line(tiny_model, tmp_path: Path) -> None:
    """LF's train_qlora/llama3_lora_sft_gptq.yaml (and _awq, _aqlm) trains on a checkpoint saved quantized: one line
    naming config.json's quantization_config and its method, exit 2, nothing written (it was optimum's NameError
    traceback, exit 1)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model("llama3"), base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (base / "config.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.json").write_text(json.dumps([{"instruction": f"Q{i}?", "input": "", "output": f"A{i}."}
                                             for i in range(4)]))  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    cfg = {"model_name_or_path": str(base), "trust_remote_code": True, "stage": "sft", "do_train": True,
           "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "dataset": "d", "dataset_dir": str(data),
           "template": "llama3", "cutoff_len": 64, "output_dir": str(tmp_path / "out"), "max_steps": 1,
           "per_device_train_batch_size": 1, "learning_rate": 1.0e-4}  # fmt: skip
    (tmp_path / "gptq.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "exporter", "train", str(tmp_path / "gptq.yaml")], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    errors = [x for x in r.stderr.splitlines() if not x.startswith("note: ")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "quantization_config: gptq" in errors[0] and "quantization_bit" in errors[0], errors
    assert not (tmp_path / "out").exists()
