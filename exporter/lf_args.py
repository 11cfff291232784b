"""LLaMA-Factory's training arguments: `TrainConfig` (same keys, defaults and meaning), the command line in both of
LF's styles (`CONFIG.yaml [key=value ...]` and `--key value` flags), and the checks of what exporter cannot honour.

A hand-written loop rather than transformers' `HfArgumentParser`: argparse exits on an unknown key without a
did-you-mean, cannot layer `key=value` overrides over a YAML file, and needs transformers imported to parse a command
line; `config.build` gives typed values and one-line errors for the YAML and the flags alike.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Literal

import yaml

from exporter import config as config_mod
from exporter import hf_dir
from exporter.data import check_max_samples
from exporter.errors import UserError

_QUANT_METHODS = ("bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8")  # LF's names
PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
_FSDP_WORDS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap", "no_shard")
_FREEZE_KEYS = ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_YAML_NULLS = ("", "~", "null", "Null", "NULL")  # key=value: still unsets a text key, as OmegaConf reads it
_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
               "inverse_sqrt")  # fmt: skip

# LLaMA-Factory / HF keys we know but cannot honour yet: an error, never silently ignored.
UNSUPPORTED = {
    "quantization_device_map": "placing a quantized model across devices",
    "ref_model": "a separate DPO/KTO reference model (the reference is the base model, adapter disabled)",
    "ref_model_adapters": "a separate DPO/KTO reference model",
    "ref_model_quantization_bit": "a separate DPO/KTO reference model",
    "pref_bco_weight": "BCO-weighted DPO",
    "ld_alpha": "LD-DPO",
    "freeze_multi_modal_projector": "multimodal models",
    "fsdp_config": "FSDP settings beyond the fsdp options (exporter shards each decoder layer, then the rest)",
    "use_unsloth": "Unsloth kernels",
    "use_galore": "GaLore",
    "use_badam": "BAdam",
    "use_apollo": "APOLLO",
    "pissa_init": "PiSSA initialisation",
    "additional_target": "extra trainable modules",
    "create_new_adapter": "stacking a new adapter on adapter_name_or_path",
    "save_total_limit": "rotating checkpoints",
    "streaming": "dataset streaming (LLaMA-Factory then reads rows through a shuffle buffer of buffer_size and needs "
    "max_steps; exporter reads the datasets into memory)",
    "rope_scaling": "RoPE scaling",
    "shift_attn": "shift short attention",
    "eval_on_each_dataset": "evaluating each eval_dataset separately",
    "enable_liger_kernel": "Liger kernels",
    "use_llama_pro": "LLaMA Pro",
    "group_by_length": "HF length grouping (exporter always batches by length within shuffled windows)",
}
# their LLaMA-Factory / HF defaults: a key given at its default asks for nothing and is accepted
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(UNSUPPORTED),
    **dict.fromkeys(("use_unsloth", "use_galore", "use_badam", "use_apollo", "pissa_init", "create_new_adapter",
                     "streaming", "shift_attn", "enable_liger_kernel", "use_llama_pro", "group_by_length",
                     "eval_on_each_dataset"), False),
    "pref_bco_weight": 0.0,
    "freeze_multi_modal_projector": True,
}  # fmt: skip
# More of LLaMA-Factory 0.9.5's keys (its hparams dataclasses; most in its examples/extras YAMLs) that exporter does not
# do: key -> (what it asks for, LF's default). Refused as not supported (they read as unknown keys, with a did-you-mean
# naming another key: `use_dft_loss` "did you mean 'pref_loss'?"), accepted at LF's default like the keys above.
_LF_KEYS: dict[str, tuple[str, Any]] = {
    **{k: ("the Adam-mini optimizer", d) for k, d in (("use_adam_mini", False),)},
    **{k: ("the Muon optimizer", d) for k, d in (("use_muon", False),)},
    **{k: ("the DFT loss", d) for k, d in (("use_dft_loss", False),)},
    **{k: ("the ASFT loss", d) for k, d in (("use_asft_loss", False), ("asft_alpha", 0.1))},
    **{k: ("the EAFT loss", d) for k, d in (("use_eaft_loss", False), ("eaft_alpha", 1.0))},
    **{k: ("GaLore", d) for k, d in (("galore_target", "all"), ("galore_rank", 16), ("galore_update_interval", 200),
                                     ("galore_scale", 2.0), ("galore_proj_type", "std"), ("galore_layerwise", False))},
    **{k: ("APOLLO", d) for k, d in (("apollo_target", "all"), ("apollo_rank", 16), ("apollo_update_interval", 200),
                                     ("apollo_scale", 32.0), ("apollo_proj", "random"), ("apollo_proj_type", "std"),
                                     ("apollo_scale_type", "channel"), ("apollo_layerwise", False),
                                     ("apollo_scale_front", False))},
    **{k: ("BAdam", d) for k, d in (("badam_mode", "layer"), ("badam_start_block", None),
                                    ("badam_switch_mode", "ascending"), ("badam_switch_interval", 50),
                                    ("badam_update_ratio", 0.05), ("badam_mask_mode", "adjacent"),
                                    ("badam_verbose", 0))},
    **{k: ("PiSSA initialisation", d) for k, d in (("pissa_iter", 16), ("pissa_convert", False))},
    **{k: ("OFT (finetuning_type: oft)", d) for k, d in (("oft_rank", 0), ("oft_block_size", 32),
                                                         ("oft_target", "all"), ("module_dropout", 0.0))},
    **{k: ("FP8 training (a GPU with FP8 and torchao or Transformer Engine)", d)
       for k, d in (("fp8", False), ("fp8_backend", "auto"), ("fp8_enable_fsdp_float8_all_gather", False))},
    **{k: ("Ray (exporter runs under torchrun)", d) for k, d in (("ray_num_workers", 1), ("ray_init_kwargs", None))},
    **{k: ("adding tokens to the vocabulary", d)
       for k, d in (("resize_vocab", False), ("add_tokens", None), ("add_special_tokens", None),
                    ("new_special_tokens_config", None), ("init_special_tokens", "noise_init"))},
    "pure_bf16": ("pure bf16 training (bf16 weights, no autocast)", False),
    "mixture_of_depths": ("mixture-of-depths", None),
    "train_from_scratch": ("training from randomly initialised weights", False),
    "upcast_layernorm": ("fp32 layer norms", False),
    "upcast_lmhead_output": ("fp32 lm_head outputs", False),
    "moe_aux_loss_coef": ("the MoE router's auxiliary loss", None),
    "block_diag_attn": ("block-diagonal attention (use neat_packing: true)", False),
    "split_special_tokens": ("splitting special tokens", False),
    "use_fast_tokenizer": ("slow tokenizers (the fast tokenizer is always used)", True),
    "use_unsloth_gc": ("Unsloth's gradient checkpointing", False),
    "model_revision": ("hub revisions", "main"),
    "compute_accuracy": ("token accuracy at evaluation", False),
    "disable_shuffling": ("training in dataset order", False),
    "early_stopping_steps": ("early stopping", None),
    "neftune_noise_alpha": ("NEFTune embedding noise", None),
    "label_smoothing_factor": ("label smoothing", 0.0),
    "logging_first_step": ("logging the first step", False),
    "logging_strategy": ("logging other than every logging_steps", "steps"),
    "data_seed": ("a data seed apart from seed", None),
    "torch_compile": ("torch.compile", False),
    "use_liger_kernel": ("Liger kernels", False),
    "load_best_model_at_end": ("keeping the best checkpoint", False),
    "push_to_hub": ("pushing to the hub", False),
    "hub_model_id": ("pushing to the hub", None),
    "use_mca": ("MCoreAdapter (Megatron)", False),
    "use_kt": ("KTransformers", False),
    "ignore_pad_token_for_loss": ("training on padding tokens (exporter never puts padding in the loss)", True),
    "use_swanlab": ("SwanLab logging (exporter logs to trainer_log.jsonl)", False),
    "predict_with_generate": ("evaluating by generation (BLEU/ROUGE; exporter predict does it after training)", False),
    "do_predict": ("predicting from here (exporter train's command line predicts after training)", False),
}  # fmt: skip
# LLaMA-Factory 0.9.5 keys that do nothing in an exporter train run, whatever their value, as they do nothing in LF
# without what they serve: key -> (why, LF's default). Accepted; a value other than the default is said once.
_GENERATION = "generation settings, used with do_predict / predict_with_generate: exporter predict takes them"
_IDLE_KEYS: dict[str, tuple[str, Any]] = {
    "buffer_size": ("LLaMA-Factory shuffles through it only with streaming: true", 16384),
    "data_shared_file_system": ("it picks the processes that fill LLaMA-Factory's dataset cache; exporter keeps none",
                                False),
    "media_dir": ("the images, videos and audios of multimodal datasets, which exporter does not read", None),
    **{k: (_GENERATION, d) for k, d in (("do_sample", True), ("temperature", 0.95), ("top_p", 0.7), ("top_k", 50),
                                        ("num_beams", 1), ("max_length", 1024), ("max_new_tokens", 1024),
                                        ("repetition_penalty", 1.0), ("length_penalty", 1.0),
                                        ("skip_special_tokens", True), ("eval_num_beams", None))},
    **{k: ("SwanLab settings, used only with use_swanlab: true", d)
       for k, d in (("swanlab_project", "llamafactory"), ("swanlab_workspace", None), ("swanlab_run_name", None),
                    ("swanlab_mode", "cloud"), ("swanlab_api_key", None), ("swanlab_logdir", None),
                    ("swanlab_lark_webhook_url", None), ("swanlab_lark_secret", None))},
}  # fmt: skip
UNSUPPORTED.update({k: why for k, (why, _) in _LF_KEYS.items()})
UNSUPPORTED_DEFAULTS.update({k: default for k, (_, default) in _LF_KEYS.items()})
# keys that name a run for report_to's trackers: no effect with report_to none, said once
_RUN_NAMES = ("run_name", "logging_dir")


@dataclasses.dataclass
class TrainConfig:
    """LLaMA-Factory's training keys (same names, same defaults, same meaning) plus identity fill values."""

    model_name_or_path: str
    output_dir: str
    adapter_name_or_path: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None  # a hub cache of its own (as HF_HUB_CACHE): hub ids are resolved there
    use_cpu: bool = False  # HF's: train on the CPU, GPUs visible or not (LF asks for it for bf16 on a CPU)
    stage: Literal["sft", "pt", "dpo", "kto"] = "sft"
    do_train: bool = True
    do_eval: bool = False
    finetuning_type: Literal["lora", "freeze", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_target: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    disable_gradient_checkpointing: bool = False
    use_reentrant_gc: bool = True  # LLaMA-Factory's default: torch's reentrant checkpoint (false: non-reentrant)
    freeze_trainable_layers: int = 2  # > 0: the last n decoder layers train, < 0: the first -n
    freeze_trainable_modules: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    freeze_extra_modules: list[str] | None = None  # modules outside the layers that train too (e.g. embed_tokens)
    quantization_bit: int | None = None  # QLoRA: 4 or 8 (bitsandbytes)
    quantization_method: Literal[_QUANT_METHODS] = "bnb"  # type: ignore[valid-type]
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    double_quantization: bool = True
    pref_beta: float = 0.1
    pref_ftx: float = 0.0
    pref_loss: Literal[PREF_LOSSES] = "sigmoid"  # type: ignore[valid-type]
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    dataset: list[str] = dataclasses.field(default_factory=list)
    eval_dataset: list[str] = dataclasses.field(default_factory=list)  # evaluated on instead of a val_size split
    dataset_dir: str = "data"
    template: str | None = None
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    # several datasets: concatenated, or interleaved as datasets' interleave_datasets (data.MIX_STRATEGIES)
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = "concat"
    interleave_probs: list[float] | None = None  # interleave_*: each dataset's chance to give the next row
    train_on_prompt: bool = False
    mask_history: bool = False  # these five: LLaMA-Factory template names only (exporter.lf_names)
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    default_system: str | None = None
    tool_format: str | None = None
    packing: bool | None = None
    neat_packing: bool = False
    preprocessing_num_workers: int | None = None
    tokenized_path: str | None = None  # LF saves its tokenized data there, or loads it: see check_tokenized_path
    preprocessing_batch_size: int = 1000  # rows per LF map batch: pt blocks, SFT packing and KTO's KL pairs per batch
    overwrite_cache: bool = False
    overwrite_output_dir: bool = False
    logging_steps: float = 500
    save_strategy: Literal["no", "steps", "epoch"] = "steps"  # HF's: also at the last step / each epoch's end
    save_steps: float = 500
    save_only_model: bool = False
    plot_loss: bool = False
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: Literal[_SCHEDULERS] = "linear"  # type: ignore[valid-type]
    warmup_ratio: float = 0.0
    warmup_steps: float = 0  # HF 5: a count, or a fraction of the total steps when < 1
    max_grad_norm: float = 1.0
    optim: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch_fused"  # HF 5's default
    bf16: bool = False
    fp16: bool = False
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: float | None = None
    resume_from_checkpoint: bool | str | None = None
    seed: int = 42
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["none"])
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = "auto"
    ddp_timeout: int = 1800
    fsdp: list[str] = dataclasses.field(default_factory=list)  # HF's option words: full_shard, shard_grad_op, offload
    deepspeed: str | None = None  # a DeepSpeed JSON config (LF's examples/deepspeed/ds_z*_config.json)
    dataloader_num_workers: int = 0
    include_num_input_tokens_seen: bool = False
    identity_name: str | None = None
    identity_author: str | None = None


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str], cls: type | None = None) -> tuple[dict[str, Any], str]:
    """`[CONFIG.yaml] [key=value ...] [--key value | --key=value | --flag ...]` -> (raw dict, where); `cls` (default
    TrainConfig) tells which keys are booleans, so a bare `--flag` means true."""
    data: dict[str, Any] = {}
    where = "command line"
    args = list(argv)
    hints = typing.get_type_hints(cls or TrainConfig)
    if args and not args[0].startswith("-") and "=" not in args[0]:
        where = args.pop(0)
        data.update(config_mod.read_yaml(where))
        texts = config_mod.scalar_texts(where)
        data.update({k: texts[k] for k, v in data.items() if text_key(k, cls) and v is not None and k in texts})
        if args:  # a bad value may be an override's (as pipeline.load_config says it)
            where = f"{where} with {' '.join(args)}"
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not sep:
                nxt = args[i + 1] if i + 1 < len(args) else None
                is_bool = hints.get(key) is bool
                bool_word = nxt is not None and nxt.lower() in ("true", "false", "1", "0", "yes", "no")
                if nxt is None or nxt.startswith("--") or (is_bool and not bool_word):
                    data[key] = True  # bare flag
                    i += 1
                    continue
                value = nxt
                i += 1
            text = text_key(key, cls) and value.strip()
            data[key] = value if text else yaml.safe_load(value) if value.strip() else None
        elif "=" in arg:
            key, _, value = arg.partition("=")
            text = text_key(key.strip(), cls) and value.strip() not in _YAML_NULLS
            data.update({key.strip(): value} if text else config_mod.parse_overrides([arg]))
        else:
            raise UserError(f"unexpected argument {arg!r}: expected CONFIG.yaml first, then key=value or --key value")
        i += 1
    return data, where


def _at_default(value: Any, default: Any) -> bool:
    """Whether a key's given value is `default` (`streaming=false`, `--mix_strategy concat`, `ref_model: null`)."""
    if isinstance(default, bool) and isinstance(value, str):
        value = _BOOL_WORDS.get(value.lower(), value)
    if default is None and isinstance(value, str) and value.strip() in _YAML_NULLS:
        value = None
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == default
    return type(value) is type(default) and value == default


def text_key(key: str, cls: type | None = None) -> bool:
    """Whether `key` takes text (str or str | None): its command-line value is kept as typed, as LF's argparse keeps
    it (`--output_dir 0123` is the directory 0123, not YAML's octal 83). Lists (`dataset: [a, b]` or `a,b`) are
    parsed as YAML, as before."""
    hint = typing.get_type_hints(cls or TrainConfig).get(key)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return hint is str or (union and [a for a in typing.get_args(hint) if a is not type(None)] == [str])


def config_from_args(argv: list[str]) -> tuple[TrainConfig, set[str]]:
    """The TrainConfig for a command line, and the keys the user set explicitly."""
    return config_from_dict(*parse_args(argv))


def config_from_dict(data: dict[str, Any], where: str) -> tuple[TrainConfig, set[str]]:
    """The TrainConfig for parsed LF keys (`parse_args`), and the keys the user set explicitly."""
    for key in [k for k in data if k in UNSUPPORTED]:
        if not _at_default(data[key], UNSUPPORTED_DEFAULTS[key]):
            raise UserError(f"{where}: {key}: {UNSUPPORTED[key]} is not supported yet")
        del data[key]
    seen = data.get("include_num_input_tokens_seen")  # HF 5 (LF 0.9.5): no | all | non_padding, or a bool
    seen = seen.strip().lower() if isinstance(seen, str) else seen
    if seen in ("no", "all", "non_padding"):
        data["include_num_input_tokens_seen"] = seen != "no"
    if seen is True or seen == "all":
        say(
            "include_num_input_tokens_seen: exporter counts the examples' tokens (HF's non_padding); HF's all (or "
            "true) also counts each batch's padding"
        )
    idle: dict[str, list[str]] = {}
    for key in [k for k in data if k in _IDLE_KEYS]:
        why, default = _IDLE_KEYS[key]
        if not _at_default(data.pop(key), default):
            idle.setdefault(why, []).append(key)
    for why, keys in idle.items():
        say(f"{', '.join(keys)}: no effect in exporter train ({why})")
    for key in [k for k in data if k in _RUN_NAMES]:  # HF's: they name a run for wandb/tensorboard
        if data.pop(key) is not None:
            say(f"{key}: no effect (it names the run for report_to's trackers; exporter logs to trainer_log.jsonl)")
    if isinstance(data.get("lora_target"), str) and data["lora_target"].strip() == "all":
        data["lora_target"] = ["all"]
    for key in ("eval_strategy", "save_strategy"):
        if data.get(key) is False:  # YAML reads a bare `no` as false
            data[key] = "no"
    for key in ("report_to", "fsdp"):
        if isinstance(data.get(key), str):  # HF takes space- (or comma-) separated words
            data[key] = [w for w in data[key].replace(",", " ").split() if w]
    if isinstance(data.get("val_size"), float) and data["val_size"] == 1:  # LF: test_size=1.0, a fraction
        raise UserError(f"{where}: val_size: 1.0 is a fraction of the rows: give one below 1, or a count (val_size: 1)")
    if data.get("eval_steps") is not None and "eval_strategy" not in data and "evaluation_strategy" not in data:
        data["eval_strategy"] = "steps"  # the tutorials' `--val_size 0.1 --eval_steps 50`
        every = data["eval_steps"]
        if not isinstance(every, (int, float)) or every >= 1:  # a fraction is said once resolved (train's schedule)
            say(f"eval_steps={every} without eval_strategy: evaluating every {every} steps")
    cfg = config_mod.build(TrainConfig, data, where)
    return cfg, set(data)


# ------------------------------------------------------------------ checks and notes


def say(msg: str) -> None:
    """A note on stderr (a setting without effect here, a resumed run, dropped rows); rank 0 only under torchrun."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"note: {msg}", file=sys.stderr)


def _check_numbers(cfg: TrainConfig) -> None:
    """Numbers that would train nothing, train on garbage, or crash later: each named with what is expected."""
    import math

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UserError(f"{key} must be {expected}, got {getattr(cfg, key)!r}")

    floats = ("learning_rate", "num_train_epochs", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
              "max_grad_norm", "warmup_ratio", "warmup_steps", "lora_dropout", "logging_steps",
              "save_steps")  # fmt: skip
    for key in floats:
        need(math.isfinite(getattr(cfg, key)), key, "a finite number")
    need(cfg.learning_rate > 0, "learning_rate", "a positive number")
    need(cfg.max_steps > 0 or cfg.num_train_epochs > 0, "num_train_epochs",
         "positive (or set max_steps > 0): otherwise the run plans 0 training steps")  # fmt: skip
    need(cfg.weight_decay >= 0, "weight_decay", ">= 0")
    need(0 <= cfg.adam_beta1 < 1, "adam_beta1", "in [0, 1)")
    need(0 <= cfg.adam_beta2 < 1, "adam_beta2", "in [0, 1)")
    need(cfg.adam_epsilon > 0, "adam_epsilon", "positive")
    need(0 <= cfg.warmup_ratio <= 1, "warmup_ratio", "in [0, 1]")
    need(cfg.warmup_steps >= 0, "warmup_steps", ">= 0")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "in [0, 1)")
    for key in ("logging_steps", "save_steps", "eval_steps"):  # HF's rule: a whole count, or a fraction when < 1
        value = getattr(cfg, key)
        need(value is None or (value > 0 and (value < 1 or value == int(value))), key,
             "positive: a whole number of steps, or a fraction of the run's steps when < 1")  # fmt: skip
    if cfg.finetuning_type == "lora" and not cfg.adapter_name_or_path:
        need(cfg.lora_rank >= 1, "lora_rank", "a positive integer")
        need(cfg.lora_alpha is None or cfg.lora_alpha > 0, "lora_alpha", "positive")


def check(cfg: TrainConfig, given: set[str], device: str, notes: bool = True) -> None:
    """Reject settings we cannot honour; say once which given keys have no effect on this machine (unless `notes` is
    false: the pipeline checks a train block before training checks it again)."""
    if not cfg.do_train:
        raise UserError("do_train is false: exporter train only trains (do_eval runs alongside training)")
    if not cfg.dataset:
        raise UserError("dataset: give one or more dataset names from dataset_info.json (dataset: a,b)")
    if cfg.fp16 and cfg.bf16:
        raise UserError("bf16 and fp16 are both set; pick one")
    if cfg.fp16 and device == "cpu" and not cpu_has_fp16():
        raise UserError("fp16: this CPU has no native fp16 (torch emulates it: training ran 59x slower than fp32 "
                        "here); use bf16: true or neither")  # fmt: skip
    if cfg.bf16 and device == "cpu" and notes and not cpu_has_bf16():
        say("bf16: this CPU has no native bf16 (AVX512-BF16 / AMX, as oneDNN reports it) and torch emulates it: "
            "LLaMA-Factory's qwen3_lora_sft example (bf16: true) trained 10-21x slower than in fp32 on a 2-core "
            "AVX2 CPU; bf16: false trains in fp32")  # fmt: skip
    if cfg.flash_attn == "fa2" and device == "cpu":
        raise UserError("flash_attn: fa2 needs a CUDA GPU with flash-attn installed; use auto or sdpa on CPU")
    if cfg.cutoff_len < 2:
        raise UserError(f"cutoff_len must be at least 2, got {cfg.cutoff_len}")
    check_max_samples(cfg.max_samples)
    if cfg.val_size < 0 or (cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size)):
        raise UserError(f"val_size must be a fraction in [0, 1) or a whole number of samples, got {cfg.val_size}")
    if cfg.preprocessing_batch_size < 1:
        raise UserError(f"preprocessing_batch_size must be a number of rows >= 1, got {cfg.preprocessing_batch_size}")
    check_mix(cfg)
    check_tokenized_path(cfg, notes)
    if cfg.eval_dataset and cfg.val_size:  # LLaMA-Factory's split_dataset refuses it too
        raise UserError("val_size and eval_dataset both name a validation set; set one of them")
    if cfg.eval_strategy != "no" and not cfg.val_size and not cfg.eval_dataset:
        raise UserError(f"eval_strategy: {cfg.eval_strategy} needs a validation set: set val_size or eval_dataset")
    if cfg.do_eval and not cfg.val_size and not cfg.eval_dataset:
        raise UserError("do_eval needs a validation set: set val_size or eval_dataset")
    if cfg.finetuning_type == "full" and cfg.adapter_name_or_path:
        raise UserError("adapter_name_or_path only applies to finetuning_type: lora")
    if cfg.adapter_name_or_path and "," in cfg.adapter_name_or_path:
        raise UserError("adapter_name_or_path: continuing from several adapters at once is not supported yet")
    for key, scope, acts in _SCOPED_ERRORS:  # as LLaMA-Factory refuses them
        if _differs(cfg, key) and not acts(cfg):
            raise UserError(f"{key} only applies to {scope} (stage is {cfg.stage}, "
                            f"finetuning_type {cfg.finetuning_type})")  # fmt: skip
    if cfg.per_device_train_batch_size < 1 or cfg.gradient_accumulation_steps < 1 or cfg.per_device_eval_batch_size < 1:
        raise UserError(
            "per_device_train_batch_size, per_device_eval_batch_size and gradient_accumulation_steps must be >= 1"
        )
    _check_numbers(cfg)
    bad = [r for r in cfg.report_to if r not in ("none",)]
    if bad:
        raise UserError(f"report_to: {', '.join(bad)} is not supported yet (exporter logs to trainer_log.jsonl)")
    if "eval_steps" in given and cfg.eval_strategy != "steps":
        raise UserError(f"eval_steps is set but eval_strategy is {cfg.eval_strategy!r}; set eval_strategy: steps")
    _check_methods(cfg, device)
    idle = [f"{', '.join(ks)} (only with {scope})" for keys, scope, acts in _SCOPED if not acts(cfg)
            for ks in [[k for k in keys if k in given and _differs(cfg, k)]] if ks]  # fmt: skip
    if notes and idle:
        run = f"stage {cfg.stage}, finetuning_type {cfg.finetuning_type}"
        run += f", quantization_bit {cfg.quantization_bit}" if cfg.quantization_bit else ""
        say(f"no effect in this run ({run}): {'; '.join(idle)}")
    said = {
        "flash_attn": f"flash_attn={cfg.flash_attn}: "
        + ("FlashAttention does not exist on CPU; using PyTorch SDPA attention" if device == "cpu"
           else "using PyTorch SDPA attention"),
        "ddp_timeout": "ddp_timeout: one process, no distributed group to time out",
        "report_to": "report_to=none: metrics go to trainer_log.jsonl and all_results.json only",
        "preprocessing_num_workers": "preprocessing_num_workers: tokenization runs in this process (fast tokenizer)",
        "overwrite_cache": "overwrite_cache: exporter keeps no preprocessing cache; data are always re-read",
        "dataloader_num_workers": "dataloader_num_workers: batches are built in memory, no loader workers",
        "save_steps": f"save_steps: no effect with save_strategy: {cfg.save_strategy} (as in HF's Trainer)",
        "trust_remote_code": f"trust_remote_code: {hf_dir.NO_MODEL_CODE} (a model that needs its own code is refused)",
    }  # fmt: skip
    skip = {
        "flash_attn": cfg.flash_attn == "disabled",
        "ddp_timeout": _distributed(),
        "save_steps": cfg.save_strategy == "steps",
        "trust_remote_code": not cfg.trust_remote_code,
    }
    for key, msg in said.items():
        if notes and key in given and not skip.get(key):
            say(msg)


# keys that act only in some stages or methods (LLaMA-Factory ignores them elsewhere): (keys, where they act, whether
# they act for a config); given elsewhere with another value than the default, they are said once to have no effect
_SCOPED: tuple[tuple[tuple[str, ...], str, typing.Callable[[TrainConfig], bool]], ...] = (
    (("pref_beta", "pref_ftx"), "stage: dpo or kto", lambda c: c.stage in ("dpo", "kto")),
    (("pref_loss", "dpo_label_smoothing"), "stage: dpo", lambda c: c.stage == "dpo"),
    (("simpo_gamma",), "stage: dpo with pref_loss: simpo", lambda c: c.stage == "dpo" and c.pref_loss == "simpo"),
    (("kto_chosen_weight", "kto_rejected_weight"), "stage: kto", lambda c: c.stage == "kto"),
    (("packing",), "stage: sft or pt", lambda c: c.stage in ("sft", "pt")),
    (("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "loraplus_lr_embedding"), "finetuning_type: lora",
     lambda c: c.finetuning_type == "lora"),
    (_FREEZE_KEYS, "finetuning_type: freeze", lambda c: c.finetuning_type == "freeze"),
    (("quantization_type", "double_quantization"), "quantization_bit: 4", lambda c: c.quantization_bit == 4),
)  # fmt: skip
# settings LLaMA-Factory 0.9.5 refuses outside where they act: (key, where it acts, whether it acts for a config)
_SCOPED_ERRORS: tuple[tuple[str, str, typing.Callable[[TrainConfig], bool]], ...] = (
    ("train_on_prompt", "stage: sft", lambda c: c.stage == "sft"),
    ("mask_history", "stage: sft", lambda c: c.stage == "sft"),
    ("use_rslora", "finetuning_type: lora", lambda c: c.finetuning_type == "lora"),
    ("use_dora", "finetuning_type: lora", lambda c: c.finetuning_type == "lora"),
    ("loraplus_lr_ratio", "finetuning_type: lora", lambda c: c.finetuning_type == "lora"),
)


def check_tokenized_path(cfg: TrainConfig, notes: bool = True) -> None:
    """LF's `tokenized_path`: a folder holding data (LF's `has_tokenized_data`) is LF's saved tokenized dataset, which
    LF (and exporter, `data.prepare_tokenized`) trains on instead of `dataset`, ignoring the other data keys;
    otherwise the dataset is tokenized, saved there and trained on. What exporter cannot save in LF's format (stages
    dpo/kto, sft packing) trains without saving (said), and such a saved folder is refused."""
    import os

    from exporter.data import has_tokenized, tokenized_unsupported

    path = cfg.tokenized_path
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"tokenized_path: {path} is a file, not a folder")
    why = tokenized_unsupported(cfg.stage, bool(cfg.packing or cfg.neat_packing))
    if has_tokenized(path):
        if why:
            raise UserError(f"tokenized_path: {path} holds a saved tokenized dataset (LLaMA-Factory's "
                            f"save_to_disk), which exporter cannot read {why}; remove tokenized_path to tokenize "
                            "dataset again")  # fmt: skip
        if notes:
            say(f"tokenized_path: training on the tokenized dataset saved in {path}; dataset, val_size, cutoff_len "
                "and the other data keys are ignored, as LLaMA-Factory does")  # fmt: skip
    elif notes:
        say(f"tokenized_path: {path} is not written {why}: exporter tokenizes the dataset in memory on each run" if why
            else f"tokenized_path: the tokenized dataset will be saved in {path} (LLaMA-Factory's format: a later "
            "run, LLaMA-Factory's or exporter's, trains on it)")  # fmt: skip


def check_mix(cfg: Any) -> None:
    """mix_strategy and interleave_probs as LLaMA-Factory 0.9.5's DataArguments checks them (its messages), for
    training's and predict's options."""
    if cfg.mix_strategy == "interleave_once":
        raise UserError("mix_strategy: interleave_once asks datasets for all_exhausted_without_replacement, which the "
                        "datasets LLaMA-Factory 0.9.5 allows (<= 4.0.0) refuses; use interleave_under or "
                        "interleave_over")  # fmt: skip
    if cfg.interleave_probs is None:
        return
    if cfg.mix_strategy == "concat":
        raise UserError("interleave_probs is only valid for interleaved mixing (mix_strategy: interleave_under or "
                        "interleave_over)")  # fmt: skip
    for key in ("dataset", "eval_dataset"):
        names = getattr(cfg, key, None)
        if names and len(names) != len(cfg.interleave_probs):
            raise UserError(f"interleave_probs: {len(cfg.interleave_probs)} probabilities for the {len(names)} "
                            f"datasets of {key} ({','.join(names)}); give one per dataset")  # fmt: skip


def _differs(cfg: TrainConfig, key: str) -> bool:
    """Whether `key` holds another value than its default (an unset `packing` and false are the same)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == key)
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
    value = getattr(cfg, key)
    return value != default and not (default is None and value is False)


def cpu_has_fp16() -> bool:
    """Whether this CPU computes fp16 natively (AVX512-FP16 / AMX-FP16, as oneDNN reports it, the test DeepSpeed's
    CPU accelerator uses). There fp16 trains as on a GPU (autocast and loss scaling); elsewhere torch emulates it."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX-BF16, as oneDNN reports it); elsewhere torch
    emulates it, many times slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _distributed() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _check_methods(cfg: TrainConfig, device: str) -> None:
    """Preference stages, QLoRA, freeze tuning, packing and the distributed engines: what fits together."""
    if cfg.pref_loss in ("orpo", "simpo") and cfg.stage != "dpo":
        raise UserError(f"pref_loss: {cfg.pref_loss} is a loss of stage: dpo (stage is {cfg.stage})")
    if cfg.pref_beta <= 0:
        raise UserError(f"pref_beta must be positive, got {cfg.pref_beta}")
    if cfg.dpo_label_smoothing and (cfg.pref_loss != "sigmoid" or not 0 <= cfg.dpo_label_smoothing < 0.5):
        raise UserError("dpo_label_smoothing (cDPO) applies to pref_loss: sigmoid, with a value in [0, 0.5)")
    if cfg.stage == "kto" and cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps < 2:
        raise UserError("stage kto estimates its KL baseline over a batch: use a batch of at least 2 examples")
    if cfg.quantization_bit is not None:
        if cfg.quantization_method != "bnb":
            raise UserError(
                f"quantization_method: {cfg.quantization_method} is not supported for training; use bnb (bitsandbytes)"
            )
        if cfg.quantization_bit not in (4, 8):
            raise UserError(f"quantization_bit must be 4 or 8 with bitsandbytes, got {cfg.quantization_bit}")
        if cfg.finetuning_type != "lora":
            raise UserError("quantization_bit (QLoRA) trains LoRA adapters on a quantized base: finetuning_type: lora")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("quantization_bit needs bitsandbytes: pip install 'exporter[quant]'")
        if cfg.fsdp and cfg.quantization_bit == 8:  # tried: AttributeError 'Parameter' object has no attribute 'CB'
            raise UserError("quantization_bit: 8 with fsdp is not supported (FSDP2 replaces bitsandbytes' 8-bit "
                            "weights by plain ones, losing their scales); use 4, or DDP / DeepSpeed")  # fmt: skip
    if cfg.neat_packing and cfg.stage != "sft":
        raise UserError("neat_packing packs SFT examples: stage: sft")
    bad = [w for w in cfg.fsdp if w not in _FSDP_WORDS]
    if bad:
        raise UserError(f"fsdp: unknown option {bad[0]!r}{config_mod.did_you_mean(bad[0], _FSDP_WORDS)}")
    if cfg.deepspeed and cfg.fsdp:
        raise UserError("deepspeed and fsdp are both set; pick one")
    if cfg.deepspeed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                f"deepspeed: {cfg.deepspeed}: the deepspeed package is not installed (pip install deepspeed); "
                "without it, run torchrun (DDP) or set fsdp: full_shard (FSDP2)"
            )


# ------------------------------------------------------------------ export (merge / quantize) arguments


@dataclasses.dataclass
class ExportConfig:
    """LLaMA-Factory's `llamafactory-cli export` keys (same names, defaults and meaning)."""

    model_name_or_path: str
    export_dir: str
    adapter_name_or_path: str | None = None  # comma-separated: merged in order
    template: str | None = None
    finetuning_type: Literal["lora", "full", "freeze"] = "lora"
    trust_remote_code: bool = False
    cache_dir: str | None = None  # a hub cache of its own (as HF_HUB_CACHE): hub ids are resolved there
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    export_size: int = 5  # GB per shard
    export_device: Literal["cpu", "auto"] = "cpu"
    export_legacy_format: bool = False
    export_quantization_bit: int | None = None
    export_quantization_dataset: str | None = None
    export_quantization_nsamples: int = 128
    export_quantization_maxlen: int = 1024
    # the tokens training added (LF repeats them at export): each must be in the tokenizer the export carries
    add_tokens: str | None = None
    add_special_tokens: str | None = None
    resize_vocab: bool = False  # the vocabulary size comes from the adapter's saved embeddings


# export keys LLaMA-Factory has that exporter does not do
EXPORT_UNSUPPORTED = {
    "export_hub_model_id": "pushing the export to the Hugging Face hub",
    "quantization_bit": "merging into a quantized base (LLaMA-Factory refuses it too: merge, then quantize)",
    "quantization_method": "merging into a quantized base (LLaMA-Factory refuses it too: merge, then quantize)",
    "new_special_tokens_config": "a YAML of new special tokens (name them in add_special_tokens)",
}


def export_config_from_args(argv: list[str]) -> tuple[ExportConfig, set[str]]:
    """The ExportConfig for `exporter export CONFIG.yaml [key=value ...]` (or `--key value` flags)."""
    data, where = parse_args(argv, ExportConfig)
    for key in data:
        if key in EXPORT_UNSUPPORTED:
            raise UserError(f"{where}: {key}: {EXPORT_UNSUPPORTED[key]} is not supported")
    cfg = config_mod.build(ExportConfig, data, where)
    if cfg.export_quantization_bit is not None and not cfg.export_quantization_dataset:
        raise UserError(f"{where}: export_quantization_bit needs export_quantization_dataset (as in LLaMA-Factory)")
    if cfg.export_size < 1:
        raise UserError(f"{where}: export_size must be at least 1 (GB per shard), got {cfg.export_size}")
    return cfg, set(data)
