"""`exporter train`: LoRA (or full) SFT and pretraining with LLaMA-Factory's config keys, in a plain PyTorch loop.

One public entry: `train(cfg)`; `config_from_args(argv)` builds the `TrainConfig` from either a YAML file with
`key=value` overrides or LLaMA-Factory's `--key value` flags. The rich progress bar goes to stderr
(EXPORTER_NO_PROGRESS=1 turns it off, e.g. in benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml

from exporter import config as config_mod
from exporter import spm
from exporter.errors import UserError

IGNORE = -100
# LLaMA-Factory template names that exporter's families call differently
TEMPLATE_ALIASES = {"phi": "phi3", "gemma2": "gemma", "gemma3": "gemma", "llama3_1": "llama3"}
TRAINER_LOG = "trainer_log.jsonl"
STATE_NAME = "trainer_state.json"
_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
               "inverse_sqrt")  # fmt: skip

# LLaMA-Factory / HF keys we know but cannot honour yet: an error, never silently ignored.
UNSUPPORTED = {
    "quantization_bit": "QLoRA (quantized base) training",
    "quantization_method": "QLoRA (quantized base) training",
    "neat_packing": "packing without cross-attention",
    "mask_history": "training on the last turn only",
    "eval_dataset": "a separate evaluation dataset (use val_size)",
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
    "do_predict": "generation on a test set",
    "predict_with_generate": "generation on a test set",
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


def _field_types() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(TrainConfig)


def parse_args(argv: list[str]) -> tuple[dict[str, Any], str]:
    """`[CONFIG.yaml] [key=value ...] [--key value | --key=value | --flag ...]` -> (raw dict, where)."""
    data: dict[str, Any] = {}
    where = "command line"
    args = list(argv)
    if args and not args[0].startswith("-") and "=" not in args[0]:
        where = args.pop(0)
        data.update(config_mod.read_yaml(where))
    hints = _field_types()
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
    data, where = parse_args(argv)
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


def _say(msg: str) -> None:
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
            _say(msg)


# ------------------------------------------------------------------ tokenization


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _infer_seqlen(source: int, target: int, cutoff: int) -> tuple[int, int]:
    """LLaMA-Factory's budget split between a prompt part and its response part."""
    if target * 2 < cutoff:
        max_target = cutoff
    elif source * 2 < cutoff:
        max_target = cutoff - source
    else:
        max_target = max(int(cutoff * (target / (source + target))), 1)  # never zero: keep a label
    new_target = min(max_target, target)
    new_source = min(max(cutoff - new_target, 0), source)
    return new_source, new_target


def truncate(ids: list[int], labels: list[int], cutoff: int) -> tuple[list[int], list[int]]:
    """Cut to `cutoff` tokens turn by turn (prompt run, then trained run), keeping labels in the first turn."""
    if len(ids) <= cutoff:
        return ids, labels
    runs: list[tuple[int, int, bool]] = []  # (start, end, trained)
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            runs.append((start, i, labels[start] != IGNORE))
            start = i
    pairs: list[tuple[tuple[int, int], tuple[int, int]]] = []
    k = 0
    while k < len(runs):
        s, e, trained = runs[k]
        if trained:
            pairs.append(((s, s), (s, e)))
            k += 1
        elif k + 1 < len(runs):
            pairs.append(((s, e), runs[k + 1][:2]))
            k += 2
        else:
            pairs.append(((s, e), (e, e)))
            k += 1
    out_ids: list[int] = []
    out_labels: list[int] = []
    budget = cutoff
    for (ss, se), (ts, te) in pairs:
        if budget <= 0:
            break
        ns, nt = _infer_seqlen(se - ss, te - ts, budget)
        out_ids += ids[ss : ss + ns] + ids[ts : ts + nt]
        out_labels += labels[ss : ss + ns] + labels[ts : ts + nt]
        budget -= ns + nt
    return out_ids, out_labels


def check_template_tokens(tokenizer: Any, tpl: Any, model: str) -> None:
    """Every end-of-turn token of the template must be one token of the model's vocabulary."""
    for tok in tpl.eot_tokens:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        tid = tokenizer.convert_tokens_to_ids(tok)
        if len(ids) != 1 or tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
            raise UserError(
                f"template {tpl.name!r} ends assistant turns with {tok!r}, but the tokenizer of {model} has no such "
                f"token (it splits into {len(ids)} pieces); pick the template of this model's family"
            )


def _adds_bos(tokenizer: Any) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer.encode("a")
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def tokenize_sft(samples: list, tokenizer: Any, tpl: Any, cfg: TrainConfig, drops: Any) -> list[Example]:
    """Samples -> (input_ids, labels) through the template; only assistant turns (+ end-of-turn) trained."""
    from exporter import templates

    out = []
    for s in samples:
        try:
            ids, labels = templates.encode(
                tokenizer, tpl, s.chat(), tools=s.tool_list(), train_on_prompt=cfg.train_on_prompt, cutoff_len=None
            )
        except UserError as e:
            raise UserError(f"{s.where}: {e}") from None
        ids, labels = truncate(list(ids), list(labels), cfg.cutoff_len)
        if not any(x != IGNORE for x in labels[1:]):
            drops.add("samples with no trained token left within cutoff_len", s.where)
            continue
        out.append(Example(ids, labels))
    return out


def tokenize_pt(samples: list, tokenizer: Any, cfg: TrainConfig, packing: bool) -> list[Example]:
    """Raw text + eos; packed into cutoff_len blocks (remainder dropped) or truncated one per sample."""
    eos = tokenizer.eos_token or ""
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    texts = [s.text + eos for s in samples]
    enc = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    if not packing:
        out = []
        for ids in enc:
            ids = ([bos] + ids if bos is not None else ids)[: cfg.cutoff_len]
            out.append(Example(ids, list(ids)))
        return out
    flat = [t for ids in enc for t in ids]
    n = (len(flat) // cfg.cutoff_len) * cfg.cutoff_len
    if n == 0:
        raise UserError(
            f"packing: the whole dataset is {len(flat)} tokens, shorter than one block of cutoff_len={cfg.cutoff_len}"
        )
    blocks = [flat[i : i + cfg.cutoff_len] for i in range(0, n, cfg.cutoff_len)]
    if bos is not None:
        for b in blocks:
            b[0] = bos
    return [Example(b, list(b)) for b in blocks]


def pack_sft(examples: list[Example], cutoff: int) -> list[Example]:
    """LLaMA-Factory's `packing` for SFT: whole examples concatenated into sequences of at most cutoff tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:  # first-fit decreasing
        n = len(examples[i].input_ids)
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(cutoff - n)
    out = []
    for b in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in sorted(b):
            ids += examples[i].input_ids
            labels += examples[i].labels
        out.append(Example(ids, labels))
    return out


def split_val(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffled split: val_size < 1 is a fraction (rounded up), >= 1 a count."""
    if val_size <= 0:
        return examples, []
    n_val = int(val_size) if val_size >= 1 else math.ceil(val_size * len(examples))
    if n_val >= len(examples):
        raise UserError(f"val_size={val_size} leaves no training samples out of {len(examples)}")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    return [examples[i] for i in idx[n_val:]], [examples[i] for i in idx[:n_val]]


# ------------------------------------------------------------------ batching


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 64) -> list[list[int]]:
    """Batches for one epoch: shuffle, sort by length inside windows of `window` batches, shuffle the batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    size = batch_size * window
    batches: list[list[int]] = []
    for s in range(0, len(perm), size):
        chunk = sorted(perm[s : s + size], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad to the batch's longest example; labels -100 on padding; no mask when nothing is padded."""
    import torch

    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    padded = bool((mask == 0).any())
    return {"input_ids": ids, "labels": labels, "attention_mask": mask if padded else None,
            "tokens": int(mask.sum())}  # fmt: skip


# ------------------------------------------------------------------ model


def _attn_impl(cfg: TrainConfig, device: str) -> str:
    if cfg.flash_attn == "disabled":
        return "eager"
    if cfg.flash_attn == "fa2":
        return "flash_attention_2"
    return "sdpa"


def load_model(cfg: TrainConfig, model_dir: Path, device: str) -> Any:
    """Base model (+ PEFT LoRA wrapper) ready for training on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32
    if cfg.finetuning_type == "lora" and cfg.bf16:
        dtype = torch.bfloat16
    elif cfg.finetuning_type == "lora" and cfg.fp16:
        dtype = torch.float16
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=_attn_impl(cfg, device),
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        raise UserError(f"model {model_dir}: cannot load it as a causal LM ({str(e).splitlines()[0]})") from None
    model.to(device)
    model.config.use_cache = False
    if not cfg.disable_gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.adapter_name_or_path:
        from exporter import hub

        adapter = hub.resolve(cfg.adapter_name_or_path, "adapter")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    else:
        target: Any = "all-linear" if cfg.lora_target == ["all"] else _check_targets(model, cfg.lora_target)
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank * 2, lora_dropout=cfg.lora_dropout,
            target_modules=target, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lora)
    for p in model.parameters():  # trainable weights in fp32 (LLaMA-Factory's upcast)
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _check_targets(model: Any, targets: list[str]) -> list[str]:
    import torch

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    for t in targets:
        if t not in linear:
            raise UserError(
                f"lora_target {t!r}: no linear layer of that name in the model{config_mod.did_you_mean(t, linear)} "
                f"(have: {', '.join(linear)}; or use all)"
            )
    return targets


def _parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder stack, output head, logit soft-cap) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def loss_sum(model: Any, batch: dict[str, Any], fast: bool) -> tuple[Any, int]:
    """Summed next-token cross-entropy over trained positions, and their count.

    Fast path: run the decoder, then the output head only on positions that carry a label (no full-vocabulary
    logits for prompt and padding tokens)."""
    import torch
    import torch.nn.functional as F

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    target = labels[:, 1:]
    keep = target != IGNORE
    n = int(keep.sum())
    if fast:
        decoder, head, cap = _parts(model)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[:, :-1][keep])
        if cap:
            logits = torch.tanh(logits / cap) * cap
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), n


def fast_path_ok(model: Any, batch: dict[str, Any]) -> bool:
    """Check once that the fast loss equals the model's own loss (guards against heads we do not know)."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours, n = loss_sum(model, batch, fast=True)
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return bool(torch.allclose(ours / max(n, 1), ref.loss.float(), rtol=1e-3, atol=1e-4))
    except Exception:
        return False
    finally:
        model.train(was)


def make_optimizer(model: Any, cfg: TrainConfig) -> Any:
    """AdamW with HF's decay rule (no decay on biases and norms) and LoRA+ groups when asked."""
    import torch

    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.learning_rate
        if cfg.loraplus_lr_ratio is not None:
            if "lora_embedding_" in name:
                lr = cfg.loraplus_lr_embedding
            elif "lora_B" in name or p.ndim == 1:
                lr = cfg.learning_rate * cfg.loraplus_lr_ratio
        decay = 0.0 if (p.ndim < 2 or "norm" in name.lower()) else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        fused=True if cfg.optim == "adamw_torch_fused" else None,
    )  # fmt: skip


# ------------------------------------------------------------------ checkpoints and outputs


def _save_weights(model: Any, out: Path, cfg: TrainConfig) -> None:
    model.save_pretrained(out, safe_serialization=True)


def save_checkpoint(
    model: Any, opt: Any, sched: Any, state: dict[str, Any], out_dir: Path, cfg: TrainConfig, tokenizer: Any, tpl: Any
) -> Path:
    """checkpoint-N/: weights, tokenizer (with the training template), optimizer, scheduler, RNG states and the
    trainer state (incl. the data order), so a checkpoint is both resumable and usable as an adapter/model dir."""
    import numpy as np
    import torch

    from exporter.atomic import atomic_dir

    path = out_dir / f"checkpoint-{state['global_step']}"
    with atomic_dir(path, force=True) as tmp:
        _save_weights(model, tmp, cfg)
        tokenizer.save_pretrained(tmp)
        spm.fix_dir(tmp)
        if tpl is not None:
            from exporter import templates

            templates.write_into(tmp, tpl)
        if not cfg.save_only_model:
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            torch.save(sched.state_dict(), tmp / "scheduler.pt")
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng_state.pth")
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    return path


def _latest_checkpoint(out_dir: Path) -> Path | None:
    found = [
        (int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    found = [(n, p) for n, p in found if (p / STATE_NAME).is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, model: Any, opt: Any, sched: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from checkpoint-N; returns its trainer state."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise UserError(f"resume_from_checkpoint {path}: not a checkpoint ({STATE_NAME} missing)")
    if not (path / "optimizer.pt").is_file():
        raise UserError(f"resume_from_checkpoint {path}: saved with save_only_model, no optimizer state to resume")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if cfg.finetuning_type == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng_state.pth", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def smooth(values: list[float]) -> list[float]:
    """TensorBoard-style EMA with LLaMA-Factory's length-dependent weight."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def plot(log: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """training_loss.png (and training_eval_loss.png) from the trainer log, with Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key in ("loss", "eval_loss"):
        pts = [(r["current_steps"], r[key]) for r in log if r.get(key) is not None]
        if not pts:
            continue
        steps, vals = zip(*pts, strict=True)
        fig = plt.figure()
        plt.plot(steps, vals, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, smooth(list(vals)), color="#1f77b4", label="smoothed")
        plt.title(f"training {key} of {out_dir}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = out_dir / f"training_{key}.png"
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------ the run


def _steps(value: float, total: int) -> int:
    """HF rule: a value < 1 is a fraction of the total steps."""
    return max(1, math.ceil(value * total)) if 0 < value < 1 else int(value)


def _prepare_output(cfg: TrainConfig, out: Path) -> Path | None:
    """Check/clean output_dir; return the checkpoint to resume from (explicit, latest, or LLaMA-Factory's auto)."""
    finished = ("adapter_model.safetensors", "model.safetensors", "all_results.json")
    if cfg.resume_from_checkpoint not in (None, False) and cfg.overwrite_output_dir:
        raise UserError("resume_from_checkpoint and overwrite_output_dir contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file")
    if out.is_dir() and cfg.overwrite_output_dir and any(out.iterdir()):
        ours = any((out / n).exists() for n in (TRAINER_LOG, "exporter_manifest.json", *finished))
        if not ours and not list(out.glob("checkpoint-*")):
            raise UserError(f"output_dir {out} is not empty and does not look like a training output; not deleting it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume_from_checkpoint is True:
        ckpt = _latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"resume_from_checkpoint: true, but {out} has no checkpoint-N")
        return ckpt
    if isinstance(cfg.resume_from_checkpoint, str):
        ckpt = Path(cfg.resume_from_checkpoint)
        if not ckpt.is_dir():
            raise UserError(f"resume_from_checkpoint {ckpt}: no such directory")
        return ckpt
    ckpt = _latest_checkpoint(out)
    if any((out / n).exists() for n in finished):
        raise UserError(f"output_dir {out} already holds a finished run; set overwrite_output_dir: true")
    if ckpt is not None:  # LLaMA-Factory resumes automatically from the last checkpoint
        _say(f"resuming from {ckpt} (found in output_dir; set overwrite_output_dir: true to start over)")
        return ckpt
    if (out / TRAINER_LOG).exists():
        (out / TRAINER_LOG).unlink()
    return None


def train(cfg: TrainConfig, given: set[str] | None = None, _stop_after: int | None = None) -> Path:
    """Train per `cfg`; returns output_dir holding the adapter (or full model), logs, plots and the manifest.

    `_stop_after` (tests only) interrupts the run after that step, as a crash would."""
    import numpy as np
    import torch
    from transformers import get_scheduler

    from exporter import data, hub, manifest, templates

    given = given if given is not None else set()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(cfg, given, device)
    model_dir = hub.resolve(cfg.model_name_or_path, "model")
    out = Path(cfg.output_dir)
    packing = cfg.packing if cfg.packing is not None else cfg.stage == "pt"

    # data -> examples (all errors surface before anything is written)
    fill = {k: v for k, v in (("name", cfg.identity_name), ("author", cfg.identity_author)) if v}
    samples, drops = data.load(cfg.dataset, cfg.dataset_dir, cfg.stage, cfg.max_samples, fill, cfg.seed)
    left = data.unfilled_placeholders(samples)
    if left:
        _say(f"placeholders {', '.join('{{' + k + '}}' for k in sorted(left))} left in the data "
             "(set identity_name / identity_author to fill them)")  # fmt: skip
    try:
        tokenizer = spm.load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model {model_dir}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    tpl = None
    if cfg.stage == "sft" or cfg.template:
        name = cfg.template
        if name in TEMPLATE_ALIASES and name not in templates.list_templates():
            _say(f"template {name!r} is LLaMA-Factory's name for exporter's {TEMPLATE_ALIASES[name]!r} family")
            name = TEMPLATE_ALIASES[name]
        tpl = templates.resolve(model_dir, name)
        check_template_tokens(tokenizer, tpl, str(model_dir))
    if cfg.stage == "sft":
        examples = tokenize_sft(samples, tokenizer, tpl, cfg, drops)
        if not examples:
            raise UserError(f"no usable samples after tokenization: {drops.summary()}")
    else:
        examples = tokenize_pt(samples, tokenizer, cfg, packing)
    if drops.counts:
        _say(f"dropped {sum(drops.counts.values())} sample(s): {drops.summary()}")
    train_ex, val_ex = split_val(examples, cfg.val_size, cfg.seed)
    if cfg.stage == "sft" and packing:
        train_ex = pack_sft(train_ex, cfg.cutoff_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError(f"model {model_dir}: tokenizer has neither a pad nor an eos token")

    resume = _prepare_output(cfg, out)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg, model_dir, device)
    model.train()

    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    lengths = [len(e.input_ids) for e in train_ex]
    batches_per_epoch = math.ceil(len(train_ex) / bs)
    updates_per_epoch = max(math.ceil(batches_per_epoch / accum), 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * updates_per_epoch)
    warmup = _steps(cfg.warmup_steps, total) if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
    log_every, save_every = _steps(cfg.logging_steps, total), _steps(cfg.save_steps, total)
    eval_every = _steps(cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps, total)
    opt = make_optimizer(model, cfg)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=total)
    fingerprint = {"examples": len(train_ex), "tokens": sum(lengths), "batch_size": bs, "accum": accum,
                   "seed": cfg.seed, "total_steps": total}  # fmt: skip

    state: dict[str, Any] = {"global_step": 0, "epoch_index": 0, "batches_done": 0, "order": None, "log_history": [],
                             "tokens_seen": 0, "elapsed": 0.0, "fingerprint": fingerprint}  # fmt: skip
    if resume is not None:
        state = load_checkpoint(resume, model, opt, sched, cfg)
        if state.get("fingerprint") != fingerprint:
            raise UserError(
                f"resume_from_checkpoint {resume}: saved for different data or batch settings "
                f"({state.get('fingerprint')} vs now {fingerprint})"
            )
        with open(out / TRAINER_LOG, "w", encoding="utf-8") as f:  # the log up to the checkpoint
            for rec in state["log_history"]:
                f.write(json.dumps(rec) + "\n")

    probe = collate([train_ex[i] for i in plan_epoch(lengths, bs, cfg.seed, 0)[0]], pad_id)
    fast = fast_path_ok(model, {k: (v.to(device) if hasattr(v, "to") else v) for k, v in probe.items()})
    if not fast:
        _say("computing the loss through the model's own forward (its output head is not a plain projection)")
    amp = (torch.bfloat16 if cfg.bf16 else torch.float16) if (cfg.bf16 or cfg.fp16) else None
    scaler = torch.amp.GradScaler("cuda") if cfg.fp16 else None

    def to_dev(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}

    def evaluate() -> float:
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad(), torch.autocast(device, dtype=amp, enabled=amp is not None):
            for s in range(0, len(val_ex), cfg.per_device_eval_batch_size):
                b = to_dev(collate(val_ex[s : s + cfg.per_device_eval_batch_size], pad_id))
                ls, k = loss_sum(model, b, fast)
                tot, n = tot + float(ls), n + k
        model.train()
        return tot / max(n, 1)

    log_file = open(out / TRAINER_LOG, "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)
    t0 = time.time() - state["elapsed"]
    t_start_run, cpu_start, step_at_start = time.time(), time.process_time(), state["global_step"]

    def write_log(rec: dict[str, Any]) -> None:
        done = state["global_step"]
        elapsed = time.time() - t0
        per_step = (time.time() - t_start_run) / max(done - step_at_start, 1)
        full = {"current_steps": done, "total_steps": total, **rec, "epoch": round(done / updates_per_epoch, 4),
                "percentage": round(done / total * 100, 2),
                "elapsed_time": str(timedelta(seconds=int(elapsed))),
                "remaining_time": str(timedelta(seconds=int((total - done) * per_step)))}  # fmt: skip
        if cfg.include_num_input_tokens_seen:
            full["throughput"] = round(state["tokens_seen"] / max(elapsed, 1e-9), 2)
            full["total_tokens"] = state["tokens_seen"]
        state["log_history"].append(full)
        log_file.write(json.dumps(full) + "\n")
        log_file.flush()

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False, disable=os.environ.get("EXPORTER_NO_PROGRESS") == "1",
    )  # fmt: skip
    state.setdefault("pending_losses", [])  # losses since the last log line (kept across a resume)
    state.setdefault("loss_total", 0.0)
    state.setdefault("loss_steps", 0)
    run_tokens = 0
    try:
        with progress:
            task = progress.add_task("train", total=total, completed=state["global_step"], loss="-")
            while state["global_step"] < total:
                if state["order"] is None or state["batches_done"] >= len(state["order"]):
                    if state["order"] is not None:
                        state["epoch_index"] += 1
                    state["order"] = plan_epoch(lengths, bs, cfg.seed, state["epoch_index"])
                    state["batches_done"] = 0
                order = state["order"]
                group = order[state["batches_done"] : state["batches_done"] + accum]
                batches = [to_dev(collate([train_ex[i] for i in b], pad_id)) for b in group]
                n_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
                step_loss = 0.0
                for b in batches:
                    with torch.autocast(device, dtype=amp, enabled=amp is not None):
                        ls, _ = loss_sum(model, b, fast)
                    loss = ls / max(n_tok, 1)
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += float(loss.detach())
                    state["tokens_seen"] += b["tokens"]
                    run_tokens += b["tokens"]
                if scaler:
                    scaler.unscale_(opt)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm
                    )
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                lr = sched.get_last_lr()[0]  # HF logs the rate after the scheduler step
                opt.zero_grad(set_to_none=True)
                state["batches_done"] += len(group)
                state["global_step"] += 1
                state["elapsed"] = time.time() - t0
                state["pending_losses"].append(step_loss)
                state["loss_total"] += step_loss
                state["loss_steps"] += 1
                step = state["global_step"]
                progress.update(task, completed=step, loss=f"{step_loss:.4f}")
                if step % log_every == 0 or step == total:
                    pending = state["pending_losses"]
                    write_log({"loss": round(sum(pending) / len(pending), 6), "lr": lr})
                    state["pending_losses"] = []
                epoch_end = state["batches_done"] >= len(order)
                if val_ex and ((cfg.eval_strategy == "steps" and step % eval_every == 0)
                               or (cfg.eval_strategy == "epoch" and epoch_end)):  # fmt: skip
                    write_log({"eval_loss": round(evaluate(), 6)})
                if step % save_every == 0 and step < total:
                    save_checkpoint(model, opt, sched, state, out, cfg, tokenizer, tpl)
                if _stop_after == step:
                    raise KeyboardInterrupt
    finally:
        log_file.close()

    runtime, cpu_time = time.time() - t_start_run, time.process_time() - cpu_start
    results: dict[str, Any] = {
        "epoch": round(state["global_step"] / updates_per_epoch, 4),
        "train_loss": round(state["loss_total"] / max(state["loss_steps"], 1), 6),
        "train_runtime": round(runtime, 3),
        "train_samples_per_second": round(
            len(train_ex) * state["global_step"] / updates_per_epoch / max(runtime, 1e-9), 3
        ),
        "train_steps_per_second": round((state["global_step"] - step_at_start) / max(runtime, 1e-9), 3),
        "train_tokens_per_second": round(run_tokens / max(runtime, 1e-9), 2),
        "train_cpu_seconds": round(cpu_time, 3),  # CPU time of the loop (all threads): load-independent cost
    }
    if cfg.include_num_input_tokens_seen:
        results["num_input_tokens_seen"] = state["tokens_seen"]
    if val_ex and (cfg.do_eval or cfg.eval_strategy != "no"):
        results["eval_loss"] = round(evaluate(), 6)
        if cfg.do_eval:
            write_log({"eval_loss": results["eval_loss"]})

    # final outputs: staged in a temp dir, then moved in; the manifest comes last
    stage_dir = out / f".final-tmp-{os.getpid()}"
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir()
    try:
        model.save_pretrained(stage_dir, safe_serialization=True)
        tokenizer.save_pretrained(stage_dir)
        spm.fix_dir(stage_dir)
        gen = model_dir / "generation_config.json"
        if gen.is_file() and not (stage_dir / "generation_config.json").exists():
            shutil.copy(gen, stage_dir / "generation_config.json")
        if tpl is not None:
            templates.write_into(stage_dir, tpl)
        hf_log = [
            {k2: v for k2, v in (("loss", r.get("loss")), ("eval_loss", r.get("eval_loss")), ("learning_rate",
             r.get("lr")), ("epoch", r["epoch"]), ("step", r["current_steps"])) if v is not None}
            for r in state["log_history"]
        ]  # fmt: skip
        hf_state = {"global_step": state["global_step"], "max_steps": total, "epoch": results["epoch"],
                    "logging_steps": log_every, "save_steps": save_every, "log_history": hf_log}  # fmt: skip
        (stage_dir / STATE_NAME).write_text(json.dumps(hf_state, indent=2) + "\n", encoding="utf-8")
        (stage_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (stage_dir / "train_results.json").write_text(
            json.dumps({k: v for k, v in results.items() if not k.startswith("eval")}, indent=2) + "\n"
        )
        for p in stage_dir.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    if cfg.plot_loss:
        plot(state["log_history"], out)
    inputs: dict[str, Path | str] = {"model": str(model_dir)}
    if cfg.adapter_name_or_path:
        inputs["adapter"] = cfg.adapter_name_or_path
    info = data.read_info(Path(cfg.dataset_dir))
    for name in cfg.dataset:
        sp = data.spec(name, info, Path(cfg.dataset_dir))
        inputs[f"dataset:{name}"] = sp.source
    settings = dataclasses.asdict(cfg) | {"template": tpl.name if tpl else None, "packing": packing,
                                          "total_steps": total, "train_examples": len(train_ex),
                                          "val_examples": len(val_ex), "device": device}  # fmt: skip
    manifest.write(out, "train", inputs=inputs, settings=settings)
    print(
        f"trained {state['global_step']} steps, loss {results['train_loss']:.4f}, "
        f"{results['train_tokens_per_second']:.0f} tokens/s -> {out}",
        file=sys.stderr,
    )
    return out


def main(argv: list[str]) -> Path:
    """CLI entry: parse LLaMA-Factory style arguments and train."""
    cfg, given = config_from_args(argv)
    return train(cfg, given)
