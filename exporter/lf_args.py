"""LLaMA-Factory's training arguments: `TrainConfig` (same keys, defaults and meaning), the command line in both of
LF's styles (`CONFIG.yaml [key=value ...]` and `--key value` flags), and the checks of what exporter cannot honour.

A hand-written loop rather than transformers' `HfArgumentParser`: argparse exits on an unknown key without a
did-you-mean, cannot layer `key=value` overrides over a YAML file, and needs transformers imported to parse a command
line; `config.build` gives typed values and one-line errors for the YAML and the flags alike.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Literal

import yaml

from exporter import config as config_mod
from exporter.errors import UserError

_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
               "inverse_sqrt")  # fmt: skip

# LLaMA-Factory / HF keys we know but cannot honour yet: an error, never silently ignored.
UNSUPPORTED = {
    "quantization_bit": "QLoRA (quantized base) training",
    "quantization_method": "QLoRA (quantized base) training",
    "neat_packing": "packing without cross-attention",
    "deepspeed": "DeepSpeed",
    "fsdp": "FSDP",
    "use_unsloth": "Unsloth kernels",
    "use_galore": "GaLore",
    "use_badam": "BAdam",
    "use_apollo": "APOLLO",
    "pissa_init": "PiSSA initialisation",
    "additional_target": "extra trainable modules",
    "create_new_adapter": "stacking a new adapter on adapter_name_or_path",
    "freeze_trainable_layers": "freeze tuning",
    "save_total_limit": "rotating checkpoints",
    "streaming": "dataset streaming",
    "tokenized_path": "cached tokenized datasets",
    "rope_scaling": "RoPE scaling",
    "shift_attn": "shift short attention",
    "mix_strategy": "interleaved dataset mixing",
    "enable_liger_kernel": "Liger kernels",
    "use_llama_pro": "LLaMA Pro",
    "group_by_length": "HF length grouping (exporter always batches by length within shuffled windows)",
}


@dataclasses.dataclass
class TrainConfig:
    """LLaMA-Factory's training keys (same names, same defaults, same meaning) plus identity fill values."""

    model_name_or_path: str
    output_dir: str
    adapter_name_or_path: str | None = None
    trust_remote_code: bool = False
    stage: Literal["sft", "pt"] = "sft"
    do_train: bool = True
    do_eval: bool = False
    finetuning_type: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_target: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    disable_gradient_checkpointing: bool = False
    dataset: list[str] = dataclasses.field(default_factory=list)
    dataset_dir: str = "data"
    template: str | None = None
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    train_on_prompt: bool = False
    mask_history: bool = False  # these five: LLaMA-Factory template names only (exporter.lf_names)
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    default_system: str | None = None
    tool_format: str | None = None
    packing: bool | None = None
    preprocessing_num_workers: int | None = None
    overwrite_cache: bool = False
    overwrite_output_dir: bool = False
    logging_steps: float = 500
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
    if args and not args[0].startswith("-") and "=" not in args[0]:
        where = args.pop(0)
        data.update(config_mod.read_yaml(where))
    hints = typing.get_type_hints(cls or TrainConfig)
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
            data[key] = yaml.safe_load(value) if value.strip() else None
        elif "=" in arg:
            data.update(config_mod.parse_overrides([arg]))
        else:
            raise UserError(f"unexpected argument {arg!r}: expected CONFIG.yaml first, then key=value or --key value")
        i += 1
    return data, where


def config_from_args(argv: list[str]) -> tuple[TrainConfig, set[str]]:
    """The TrainConfig for a command line, and the keys the user set explicitly."""
    return config_from_dict(*parse_args(argv))


def config_from_dict(data: dict[str, Any], where: str) -> tuple[TrainConfig, set[str]]:
    """The TrainConfig for parsed LF keys (`parse_args`), and the keys the user set explicitly."""
    for key in data:
        if key in UNSUPPORTED:
            raise UserError(f"{where}: {key}: {UNSUPPORTED[key]} is not supported yet")
    if isinstance(data.get("lora_target"), str) and data["lora_target"].strip() == "all":
        data["lora_target"] = ["all"]
    if isinstance(data.get("report_to"), str):
        data["report_to"] = [data["report_to"]]
    cfg = config_mod.build(TrainConfig, data, where)
    return cfg, set(data)


# ------------------------------------------------------------------ checks and notes


def say(msg: str) -> None:
    """A note on stderr (a setting without effect here, a resumed run, dropped rows)."""
    print(f"note: {msg}", file=sys.stderr)


def check(cfg: TrainConfig, given: set[str], device: str) -> None:
    """Reject settings we cannot honour; say once which given keys have no effect on this machine."""
    if not cfg.do_train:
        raise UserError("do_train is false: exporter train only trains (do_eval runs alongside training)")
    if not cfg.dataset:
        raise UserError("dataset: give one or more dataset names from dataset_info.json (dataset: a,b)")
    if cfg.fp16 and cfg.bf16:
        raise UserError("bf16 and fp16 are both set; pick one")
    if cfg.fp16 and device == "cpu":
        raise UserError("fp16 needs a CUDA GPU (PyTorch has no fp16 training on CPU); use bf16: true or neither")
    if cfg.flash_attn == "fa2" and device == "cpu":
        raise UserError("flash_attn: fa2 needs a CUDA GPU with flash-attn installed; use auto or sdpa on CPU")
    if cfg.cutoff_len < 2:
        raise UserError(f"cutoff_len must be at least 2, got {cfg.cutoff_len}")
    if cfg.val_size < 0 or (cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size)):
        raise UserError(f"val_size must be a fraction in [0, 1) or a whole number of samples, got {cfg.val_size}")
    if cfg.eval_strategy != "no" and cfg.val_size == 0:
        raise UserError(f"eval_strategy: {cfg.eval_strategy} needs a validation split: set val_size")
    if cfg.do_eval and cfg.val_size == 0:
        raise UserError("do_eval needs a validation split: set val_size")
    if cfg.finetuning_type == "full" and cfg.adapter_name_or_path:
        raise UserError("adapter_name_or_path only applies to finetuning_type: lora")
    if cfg.adapter_name_or_path and "," in cfg.adapter_name_or_path:
        raise UserError("adapter_name_or_path: continuing from several adapters at once is not supported yet")
    if cfg.loraplus_lr_ratio is not None and cfg.finetuning_type != "lora":
        raise UserError("loraplus_lr_ratio only applies to finetuning_type: lora")
    if cfg.per_device_train_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise UserError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
    bad = [r for r in cfg.report_to if r not in ("none",)]
    if bad:
        raise UserError(f"report_to: {', '.join(bad)} is not supported yet (exporter logs to trainer_log.jsonl)")
    if "eval_steps" in given and cfg.eval_strategy != "steps":
        raise UserError(f"eval_steps is set but eval_strategy is {cfg.eval_strategy!r}; set eval_strategy: steps")
    notes = {
        "flash_attn": f"flash_attn={cfg.flash_attn}: "
        + ("FlashAttention does not exist on CPU; using PyTorch SDPA attention" if device == "cpu"
           else "using PyTorch SDPA attention"),
        "ddp_timeout": "ddp_timeout: one process, no distributed group to time out",
        "report_to": "report_to=none: metrics go to trainer_log.jsonl and all_results.json only",
        "preprocessing_num_workers": "preprocessing_num_workers: tokenization runs in this process (fast tokenizer)",
        "overwrite_cache": "overwrite_cache: exporter keeps no preprocessing cache; data are always re-read",
        "dataloader_num_workers": "dataloader_num_workers: batches are built in memory, no loader workers",
    }  # fmt: skip
    for key, msg in notes.items():
        if key in given and not (key == "flash_attn" and cfg.flash_attn == "disabled"):
            say(msg)


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
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    export_size: int = 5  # GB per shard
    export_device: Literal["cpu", "auto"] = "cpu"
    export_legacy_format: bool = False
    export_quantization_bit: int | None = None
    export_quantization_dataset: str | None = None
    export_quantization_nsamples: int = 128
    export_quantization_maxlen: int = 1024


# export keys LLaMA-Factory has that exporter does not do
EXPORT_UNSUPPORTED = {
    "export_hub_model_id": "pushing the export to the Hugging Face hub",
    "quantization_bit": "merging into a quantized base (LLaMA-Factory refuses it too: merge, then quantize)",
    "quantization_method": "merging into a quantized base (LLaMA-Factory refuses it too: merge, then quantize)",
}


def export_config_from_args(argv: list[str]) -> tuple[ExportConfig, set[str]]:
    """The ExportConfig for `exporter export CONFIG.yaml [key=value ...]` (or `--key value` flags)."""
    data, where = parse_args(argv, ExportConfig)
    for key in data:
        if key in EXPORT_UNSUPPORTED:
            raise UserError(f"{where}: {key}: {EXPORT_UNSUPPORTED[key]} is not supported")
    cfg = config_mod.build(ExportConfig, data, where)
    if cfg.export_legacy_format:
        raise UserError(
            f"{where}: export_legacy_format: true asks for pickled .bin weights; exporter writes safetensors only "
            "(pickle can run code when loaded): set it to false"
        )
    if cfg.export_quantization_bit is not None and not cfg.export_quantization_dataset:
        raise UserError(f"{where}: export_quantization_bit needs export_quantization_dataset (as in LLaMA-Factory)")
    if cfg.export_size < 1:
        raise UserError(f"{where}: export_size must be at least 1 (GB per shard), got {cfg.export_size}")
    return cfg, set(data)
