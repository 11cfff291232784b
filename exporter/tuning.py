"""The model being trained: the base (dtype, attention, QLoRA's bitsandbytes quantization), which weights train
(LoRA, freeze tuning, full), the forward that scores only the trained tokens, and the optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter.config import did_you_mean
from exporter.distributed import whole_shape
from exporter.errors import UserError
from exporter.lf_args import TrainConfig, say


def _attn_impl(cfg: TrainConfig) -> str | None:
    """transformers' attn_implementation; `auto` leaves it to transformers (SDPA where the model supports it, eager
    otherwise: Gemma 2's soft-capping has no SDPA path), as LLaMA-Factory does."""
    return {"disabled": "eager", "fa2": "flash_attention_2", "sdpa": "sdpa"}.get(cfg.flash_attn)


@contextlib.contextmanager
def attention_kernels(device: str) -> Iterator[None]:
    """While training on CUDA, SDPA runs FlashAttention, else memory-efficient, else math kernels (torch's order
    before Hopper), never cuDNN's: on Hopper torch puts cuDNN first, whose attention graph is built for each new
    sequence length, measured on an H200 at 50-85 ms of host time per new length in the forward and again in the
    backward (0.1-0.2 ms per call once built), and a run's batches bring new lengths at most steps."""
    if not device.startswith("cuda"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # torch's global flags: the autograd thread's backward and checkpoint recomputes see them too
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
        yield


@contextlib.contextmanager
def without_grad(model: Any) -> Iterator[None]:
    """Forwards that need no gradients inside training (evaluation, DPO/KTO's reference, KTO's KL term, the
    reference log-probs computed before training): torch.no_grad, with the model in eval mode meanwhile (restored
    after, also after an error) so no layer is checkpointed (there is nothing to recompute, and torch's reentrant
    checkpoint warns without grad). dpo/kto train without dropout, so there eval mode changes nothing else."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def compute_dtype(cfg: TrainConfig) -> Any:
    """The dtype the frozen base computes in (LLaMA-Factory's compute_dtype): bf16/fp16 when asked, else fp32."""
    import torch

    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def base_dtype(cfg: TrainConfig, model_dir: Path, device: str = "cpu") -> tuple[Any, str | None]:
    """The dtype the base is loaded in on `device` (where it trains), and a note when it is not LLaMA-Factory's.
    LLaMA-Factory loads the base as the checkpoint stores it (`torch_dtype="auto"`) and upcasts only the trainable
    weights to fp32, so a LoRA's frozen base stays bf16 on a bf16 checkpoint, with or without `bf16: true`, and fp32
    on an fp32 one. Full tuning: fp32 (every weight trains). Freeze tuning without bf16/fp16: fp32, where
    LLaMA-Factory stops (a frozen bf16 embedding feeds an fp32 trainable layer, and without autocast the matmul
    refuses the mix); with them, the checkpoint's dtype under autocast, as LLaMA-Factory. DeepSpeed: the compute
    dtype, as before (its engine and ZeRO-3's partitioned loading set the dtypes). On a CPU without native bf16/fp16
    and without bf16/fp16 asked for, a half-precision base is upcast to fp32: torch emulates half-precision matmuls
    there (a 37M-parameter LoRA run went from 279 to 10 tokens/s), for losses that differ from LLaMA-Factory's by
    about 1e-4 relative."""
    import torch

    from exporter.config import read_json
    from exporter.lf_args import cpu_has_bf16, cpu_has_fp16

    if cfg.deepspeed:
        return (torch.float32 if cfg.finetuning_type == "full" else compute_dtype(cfg)), None
    if cfg.finetuning_type == "full" or (cfg.finetuning_type == "freeze" and not (cfg.bf16 or cfg.fp16)):
        return torch.float32, None
    c = read_json(Path(model_dir) / "config.json", optional=True) or {}
    name = c.get("dtype") or c.get("torch_dtype") or (c.get("text_config") or {}).get("dtype")
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return torch.float32, None
    native = {torch.bfloat16: cpu_has_bf16, torch.float16: cpu_has_fp16}.get(dtype)
    if native and device.split(":")[0] == "cpu" and not (cfg.bf16 or cfg.fp16) and not native():
        kind = str(dtype).removeprefix("torch.")
        return torch.float32, (
            f"the frozen base is loaded in fp32, not as its {kind} checkpoint as LLaMA-Factory keeps it: this CPU "
            f"has no native {kind} and torch emulates it, many times slower (losses differ by about 1e-4 relative)"
        )
    return dtype, None


def quantization_config(cfg: TrainConfig) -> Any:
    """bitsandbytes settings for QLoRA (LLaMA-Factory's: nf4/fp4, double quantization, the compute dtype)."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization_type, bnb_4bit_use_double_quant=cfg.double_quantization,
        bnb_4bit_compute_dtype=compute_dtype(cfg), bnb_4bit_quant_storage=compute_dtype(cfg),
    )  # fmt: skip


def check_inputs(cfg: TrainConfig, model_dir: Path) -> None:
    """Before anything is written: the base is a model, not a PEFT adapter (transformers would load the adapter's
    own base under it and PEFT stack a second adapter on that, which a merge into the base later drops), and its
    weights and text files, and adapter_name_or_path's, are readable (`hf_dir.check_readable`: one line naming a
    corrupt or truncated file, not a loader's traceback)."""
    from exporter import hf_dir, hub
    from exporter.config import read_json

    if (model_dir / "adapter_config.json").is_file():
        doc = read_json(model_dir / "adapter_config.json")
        base = doc.get("base_model_name_or_path") if isinstance(doc, dict) else None
        raise UserError(
            f"model_name_or_path {model_dir} is a PEFT adapter (it holds adapter_config.json), not a model: pass its "
            f"base model{f' ({base})' if base else ''} as model_name_or_path and {model_dir} as adapter_name_or_path"
        )
    check_not_prequantized(model_dir)
    hf_dir.check_readable(model_dir)
    if cfg.adapter_name_or_path:
        adapter = hub.resolve(cfg.adapter_name_or_path, "adapter", cfg.cache_dir)
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"adapter_name_or_path {adapter}: no adapter_config.json (not a PEFT adapter dir)")
        hf_dir.check_readable(adapter)
        from exporter.adapter import check_base

        if note := check_base(adapter, model_dir, str(adapter)):  # another base: one line
            say(note.removeprefix("note: "))


def check_not_prequantized(model_dir: Path) -> None:
    """A base saved already quantized (config.json `quantization_config`: LLaMA-Factory's train_qlora examples on
    GPTQ, AWQ or AQLM checkpoints) is one line: its kernels need a CUDA GPU (on CPU transformers stopped with a
    NameError from optimum), and an adapter trained on it has no 16-bit base to merge into. QLoRA here quantizes
    the 16-bit model at load (`quantization_bit`)."""
    from exporter import hf_dir

    if method := hf_dir.quant_method(model_dir):
        raise UserError(
            f"model_name_or_path {model_dir} is already quantized (config.json quantization_config: {method}): "
            "training on a pre-quantized base is not supported; train on its 16-bit original (add quantization_bit: "
            "4 for QLoRA)"
        )


def load_model(cfg: TrainConfig, model_dir: Path, device: str, empty: bool = False,
               train_device: str | None = None) -> Any:  # fmt: skip
    """Base model (quantized for QLoRA) with its trainable part set up: a PEFT LoRA wrapper, unfrozen layers
    (freeze), or every weight (full); trainable weights in fp32 (LLaMA-Factory's upcast). `empty`: built from
    config.json on the meta device, no weight read (an FSDP process that receives its shards from rank 0);
    `train_device`: where it trains when not on `device` (FSDP loads on the CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporter import hf_dir

    dtype, why = base_dtype(cfg, model_dir, train_device or device)
    if why and not empty:
        say(why)
    kw: dict[str, Any] = {}
    if cfg.quantization_bit:
        kw = {"quantization_config": quantization_config(cfg), "device_map": {"": device}}
        detail = f"{cfg.quantization_type}{', double quantization' if cfg.double_quantization else ''}, "
        computes = str(compute_dtype(cfg)).removeprefix("torch.")
        detail = (detail if cfg.quantization_bit == 4 else "") + f"compute in {computes}"
        say(f"QLoRA: base quantized to {cfg.quantization_bit}-bit by bitsandbytes at load ({detail})")
    try:
        if empty:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # never the dir's code
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=_attn_impl(cfg),
                                                         trust_remote_code=False)  # fmt: skip
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=_attn_impl(cfg),
                                                         trust_remote_code=False, **kw)  # fmt: skip
    except (OSError, ValueError) as e:
        raise UserError(f"model {model_dir}: cannot load it as a causal LM ({str(e).splitlines()[0]})") from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) on a .bin that would run code
        raise hf_dir.pickle_refused(model_dir) from None
    if not cfg.quantization_bit and not empty and not _partitioned(model):  # ZeRO-3 placed its partitions itself
        model.to(device)
    for m in model.modules():  # bitsandbytes repacks 4-bit weights for CPU inference on the first eval-mode
        if hasattr(m, "support_avx512bf16_for_cpu"):  # forward, and its training path cannot use that layout
            m.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    if Path(model_dir) != Path(cfg.model_name_or_path).expanduser():  # a hub id: the adapter's base_model_name_or_path
        model.config.name_or_path = model.name_or_path = cfg.model_name_or_path  # names it, as LLaMA-Factory's does
    if not cfg.disable_gradient_checkpointing:  # transformers makes the embeddings' output require grad for it
        kwargs = {"use_reentrant": cfg.use_reentrant_gc}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.finetuning_type == "freeze":
        _freeze(model, cfg)
    else:
        model = _lora(model, cfg, empty)
    for p in model.parameters():
        if p.requires_grad and not hasattr(p, "ds_id"):  # ZeRO-3's partitions: its engine sets the dtypes
            p.data = p.data.float()
    return model


def _partitioned(model: Any) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def checkpointing_unneeded(cfg: TrainConfig, given: set[str], model_dir: Path, device: str, rows: int) -> bool:
    """On CPU, LLaMA-Factory's default gradient checkpointing only costs time (about 30 %: every forward runs twice)
    when the activations it saves fit easily in memory: True when `disable_gradient_checkpointing` was not set and
    the activations of a micro-batch of `rows` tokens (estimated from the model's sizes) need under a quarter of
    the memory available now."""
    if device != "cpu" or cfg.disable_gradient_checkpointing or "disable_gradient_checkpointing" in given:
        return False
    from exporter.config import read_json

    c = read_json(Path(model_dir) / "config.json", optional=True)
    c = c.get("text_config", c)
    hidden, layers = c.get("hidden_size"), c.get("num_hidden_layers")
    if not hidden or not layers:
        return False
    inter = c.get("intermediate_size") or 4 * hidden
    per_token = layers * (8 * hidden + 4 * inter) * 4 * 3  # saved fp32 tensors per layer, x3 for autograd's extras
    need = rows * per_token  # (measured on the bench model: RSS grows by about this much without checkpointing)
    avail = _available_memory()
    if avail is None or need * 4 > avail:
        return False
    say(f"gradient checkpointing off on CPU: the activations need about {need / 2**30:.1f} GiB of the "
        f"{avail / 2**30:.0f} GiB free (set disable_gradient_checkpointing: false to keep it)")  # fmt: skip
    return True


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


# LoRA settings a continued adapter keeps from its adapter_config.json: (our key, PEFT's key)
_ADAPTER_KEYS = (("lora_rank", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                 ("use_rslora", "use_rslora"), ("use_dora", "use_dora"), ("lora_target", "target_modules"))  # fmt: skip


def _linear_names(model: Any) -> list[str]:
    """The leaf names of the model's linear layers (`q_proj`, `lm_head` …), PEFT's LoRA wrappers seen through: a
    wrapped layer's `base_layer` counts under its own name, its `lora_A`/`lora_B` not at all."""
    import torch

    names = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".lora_" not in name:
            parts = name.split(".")
            names.add(parts[-2] if parts[-1] == "base_layer" else parts[-1])
    return sorted(names)


def say_adapter_settings(model: Any, cfg: TrainConfig, given: set[str]) -> None:
    """Training on `adapter_name_or_path` keeps the adapter's own LoRA settings (as PEFT loads it): say once which
    given LoRA keys differ from them, with the adapter's values (`lora_target: all` is the model's linear layers)."""
    peft = getattr(model, "peft_config", {}).get("default")
    if peft is None:
        return
    differ = []
    for key, theirs_key in _ADAPTER_KEYS:
        if key not in given:
            continue
        ours, theirs = getattr(cfg, key), getattr(peft, theirs_key, None)
        if key == "lora_alpha":
            ours = ours or cfg.lora_rank * 2
        if key == "lora_target":
            theirs = sorted({str(t).rsplit(".", 1)[-1] for t in theirs}) if isinstance(theirs, (set, list, tuple)) \
                else [theirs]  # fmt: skip
            if ours == ["all"]:
                ours = [n for n in _linear_names(model) if n != "lm_head"]
                if theirs == ["all-linear"] or set(theirs) == set(ours):
                    continue
                ours = ["all"]
            elif set(ours) == set(theirs):
                continue
            ours, theirs = ",".join(ours), ",".join(theirs)
        if ours != theirs:
            differ.append(f"{key} {ours} (the adapter's: {theirs})")
    if differ:
        say(f"adapter_name_or_path {cfg.adapter_name_or_path} trains with its own LoRA settings, not these: "
            + "; ".join(differ))  # fmt: skip


def _lora(model: Any, cfg: TrainConfig, empty: bool = False) -> Any:
    """The PEFT LoRA wrapper: a new adapter, or `adapter_name_or_path` to train on (on an `empty` model its weights
    are assigned, not copied into meta tensors)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.adapter_name_or_path:
        from exporter import hub

        adapter = hub.resolve(cfg.adapter_name_or_path, "adapter", cfg.cache_dir)
        return PeftModel.from_pretrained(model, adapter, is_trainable=True, low_cpu_mem_usage=empty)
    target, params = _targets(model, cfg)
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank * 2, lora_dropout=cfg.lora_dropout,
        target_modules=target, target_parameters=params or None, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # PEFT's target checks (e.g. gate_proj without up_proj on fused experts)
        raise UserError(f"lora_target {cfg.lora_target}: {e}") from None


def _expert_params(model: Any) -> list[str]:
    """MoE experts as transformers 5 holds them: 3-D parameters (experts, out, in) of `...experts` modules, named as
    PEFT's `target_parameters` matches them ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")."""
    out = set()
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if len(whole_shape(p)) == 3 and module.endswith(".experts"):
            out.add(".".join(module.split(".")[-2:]) + "." + leaf)
    return sorted(out)


# transformers 4 names of MoE experts and routers (linear layers there) that PEFT maps onto transformers 5's fused
# expert parameters and router modules itself (peft.utils.transformers_weight_conversion)
_V4_MOE_NAMES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate")


def _targets(model: Any, cfg: TrainConfig) -> tuple[Any, list[str]]:
    """`lora_target` as PEFT's (target_modules, target_parameters): `all` is every linear layer plus every MoE expert
    parameter (all-linear alone would leave the experts of MoE types PEFT does not convert untrained); names are
    linear layers, expert parameters (`gate_up_proj`, `down_proj`, `experts` for both) or, on an MoE model, the
    transformers 4 expert/router names LLaMA-Factory configs use (PEFT converts those)."""
    experts = _expert_params(model)
    if cfg.lora_target == ["all"]:
        target, params = "all-linear", experts
    else:
        linear = _linear_names(model)
        leaves = {e.rsplit(".", 1)[-1]: e for e in experts}
        v4 = _V4_MOE_NAMES if experts else ()
        target, params = [], []
        for t in cfg.lora_target:
            if t in linear or t in v4:
                target.append(t)
            elif t in leaves or (t == "experts" and experts):
                params += [leaves[t]] if t in leaves else experts
            else:
                have = sorted({*linear, *leaves, *v4}) + (["experts"] if experts else [])
                raise UserError(
                    f"lora_target {t!r}: no linear layer or expert parameter of that name in the model"
                    f"{did_you_mean(t, have)} (have: {', '.join(have)}; or use all)"
                )
        params = sorted(set(params))
    touches_experts = bool(params) or (experts and any(t in _V4_MOE_NAMES for t in target if isinstance(target, list)))
    if touches_experts and (cfg.lora_dropout or cfg.use_dora):
        raise UserError(
            f"LoRA on MoE expert weights ({', '.join(experts)}) works without lora_dropout and DoRA only (PEFT's "
            "parameter LoRA); set lora_dropout: 0 and use_dora: false, or leave the experts out of lora_target"
        )
    return target or None, params


def _freeze(model: Any, cfg: TrainConfig) -> None:
    """LLaMA-Factory's freeze tuning: only `freeze_trainable_modules` ("all" or names inside a decoder layer, e.g.
    mlp, self_attn) of the last `freeze_trainable_layers` layers (the first -n when negative) train, plus
    `freeze_extra_modules` outside the layers (e.g. embed_tokens, norm, lm_head)."""
    layers = model.get_decoder().layers
    n, n_layers = cfg.freeze_trainable_layers, len(layers)
    if n == 0:
        raise UserError("freeze_trainable_layers must not be 0 (> 0: the last n layers train, < 0: the first -n)")
    chosen = range(max(0, n_layers - n), n_layers) if n > 0 else range(min(-n, n_layers))
    inside = sorted({name.split(".")[0] for name, _ in layers[0].named_parameters()})
    for m in cfg.freeze_trainable_modules:
        if m != "all" and m not in inside:
            raise UserError(f"freeze_trainable_modules: no module {m!r} in a decoder layer{did_you_mean(m, inside)} "
                            f"(have: {', '.join(inside)}, or all)")  # fmt: skip
    in_layers = {id(p) for p in layers.parameters()}
    outside = {name.rsplit(".", 2)[-2]: name for name, p in model.named_parameters() if id(p) not in in_layers}
    for m in cfg.freeze_extra_modules or []:
        if m not in outside:
            raise UserError(f"freeze_extra_modules: no module {m!r} outside the decoder layers"
                            f"{did_you_mean(m, outside)} (have: {', '.join(sorted(outside))})")  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    for i in chosen:
        for name, p in layers[i].named_parameters():
            if "all" in cfg.freeze_trainable_modules or name.split(".")[0] in cfg.freeze_trainable_modules:
                p.requires_grad_(True)
    for name, p in model.named_parameters():
        if id(p) not in in_layers and name.rsplit(".", 2)[-2] in (cfg.freeze_extra_modules or []):
            p.requires_grad_(True)
    n_train = sum(math.prod(whole_shape(p)) for p in model.parameters() if p.requires_grad)
    say(f"freeze tuning: layers {chosen.start}-{chosen.stop - 1} ({', '.join(cfg.freeze_trainable_modules)}) "
        f"{'+ ' + ', '.join(cfg.freeze_extra_modules) + ' ' if cfg.freeze_extra_modules else ''}train: "
        f"{n_train / 1e6:.2f}M parameters")  # fmt: skip


# ------------------------------------------------------------------ the forward on trained positions


def _parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder stack, output head, logit soft-cap) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


@functools.cache
def _scorer_class() -> type:
    import torch

    class Scorer(torch.nn.Module):
        """The model's logits at given flat positions (what DDP/FSDP wrap: one forward per batch).

        Fast path: the decoder, then the output head only on those positions (no full-vocabulary logits for prompt
        and padding tokens); otherwise the model's own forward."""

        def __init__(self, model: Any, fast: bool) -> None:
            super().__init__()
            self.model, self.fast = model, fast

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, index: Any) -> Any:
            inputs = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                "use_cache": False,
            }  # a cache would also turn off transformers' packed-sequence masks
            if not self.fast:
                return self.model(**inputs).logits.flatten(0, 1).index_select(0, index)
            decoder, head, cap = _parts(self.model)
            logits = head(decoder(**inputs).last_hidden_state.flatten(0, 1).index_select(0, index))
            return torch.tanh(logits / cap) * cap if cap else logits

    return Scorer


def scorer(model: Any, fast: bool = True) -> Any:
    """A `Scorer` module around `model` (shares its weights)."""
    return _scorer_class()(model, fast)


def trained_logits(score: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Logits of the positions that predict a trained token, those tokens, and the row of each (`collate` computes
    the positions on the host, so nothing here waits for the device)."""
    logits = score(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["index"])
    return logits, batch["target"], batch["rows"]


def loss_sum(score: Any, batch: dict[str, Any]) -> Any:
    """Summed next-token cross-entropy over the trained positions (their count is `batch["n_trained"]`)."""
    import torch.nn.functional as F

    logits, target, _ = trained_logits(score, batch)
    return F.cross_entropy(logits.float(), target, reduction="sum")


def completion_logps(score: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed log-probabilities of the trained tokens per row, and their count (preference stages)."""
    from exporter import preference

    logits, target, rows = trained_logits(score, batch)
    return preference.sequence_logps(preference.token_logps(logits, target), rows, batch["input_ids"].shape[0])


def fast_path_ok(score: Any, batch: dict[str, Any]) -> bool:
    """Check once that the fast path (`Scorer`: the output head on the trained positions only) gives the loss the
    model's own logits give (guards against heads we do not know); the caller sets `score.fast` from it. Under FSDP
    every rank runs it alike (its forwards gather the shards)."""
    import torch

    was = score.training
    score.eval()
    try:
        _parts(score.model)  # a model without a decoder and a head we know: no forward started
        with torch.no_grad():
            score.fast = True
            ours = loss_sum(score, batch)
            score.fast = False
            ref = loss_sum(score, batch)
        n = max(batch["n_trained"], 1)
        return bool(torch.allclose(ours / n, ref / n, rtol=1e-3, atol=1e-4))
    except Exception:
        return False
    finally:
        score.train(was)


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
            elif "lora_B" in name or len(whole_shape(p)) == 1:
                lr = cfg.learning_rate * cfg.loraplus_lr_ratio
        decay = 0.0 if (len(whole_shape(p)) < 2 or "norm" in name.lower()) else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        fused=True if cfg.optim == "adamw_torch_fused" else None,
    )  # fmt: skip
