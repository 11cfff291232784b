"""`exporter train`: LoRA (or full) SFT and pretraining with LLaMA-Factory's config keys, in a plain PyTorch loop.

The recipe, `train(cfg)`: check the config (`lf_args`), prepare the examples (`examples.prepare`: data -> template
-> token ids and labels), prepare the output dir and the point to resume from (`checkpoint`), load the model, plan
the schedule, run the loop of `step()`s with logging, evaluation and checkpoints, then write the adapter (or full
model), tokenizer, logs, plots and manifest. The rich progress bar goes to stderr (EXPORTER_NO_PROGRESS=1 turns it
off, e.g. in benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from exporter import checkpoint
from exporter.config import did_you_mean
from exporter.errors import UserError
from exporter.examples import IGNORE, Example, Prepared, collate, plan_epoch
from exporter.lf_args import TrainConfig, check, config_from_dict, parse_args, say

# ------------------------------------------------------------------ model, loss, optimizer


def _attn_impl(cfg: TrainConfig) -> str | None:
    """transformers' attn_implementation; `auto` leaves it to transformers (SDPA where the model supports it, eager
    otherwise: Gemma 2's soft-capping has no SDPA path), as LLaMA-Factory does."""
    return {"disabled": "eager", "fa2": "flash_attention_2", "sdpa": "sdpa"}.get(cfg.flash_attn)


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
            model_dir, dtype=dtype, attn_implementation=_attn_impl(cfg),
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
        target, params = _targets(model, cfg)
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank * 2, lora_dropout=cfg.lora_dropout,
            target_modules=target, target_parameters=params or None, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:  # PEFT's target checks (e.g. gate_proj without up_proj on fused experts)
            raise UserError(f"lora_target {cfg.lora_target}: {e}") from None
    for p in model.parameters():  # trainable weights in fp32 (LLaMA-Factory's upcast)
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _expert_params(model: Any) -> list[str]:
    """MoE experts as transformers 5 holds them: 3-D parameters (experts, out, in) of `...experts` modules, named as
    PEFT's `target_parameters` matches them ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")."""
    out = set()
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if p.dim() == 3 and module.endswith(".experts"):
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
    import torch

    experts = _expert_params(model)
    if cfg.lora_target == ["all"]:
        target, params = "all-linear", experts
    else:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
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


# ------------------------------------------------------------------ loss plot


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


PLOT_COLORS = {"loss": "#1f77b4", "eval_loss": "#ff7f0e"}


def loss_figure(log: list[dict[str, Any]], keys: tuple[str, ...], title: str) -> Any:
    """A matplotlib figure (Agg) of each key's logged values (faint) and LLaMA-Factory's smoothed curve; None when
    the log has none of them. Shared by training_loss.png and the web board's live plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    series = {k: [(r["current_steps"], r[k]) for r in log if r.get(k) is not None] for k in keys}
    series = {k: pts for k, pts in series.items() if pts}
    if not series:
        return None
    fig = Figure()
    ax = fig.add_subplot()
    for key, pts in series.items():
        steps, vals = zip(*pts, strict=True)
        name = "" if len(keys) == 1 else f"{key} "
        ax.plot(steps, vals, color=PLOT_COLORS[key], alpha=0.4, label=f"{name}original")
        ax.plot(steps, smooth(list(vals)), color=PLOT_COLORS[key], label=f"{name}smoothed")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "loss")
    ax.legend()
    return fig


def plot(log: list[dict[str, Any]], out_dir: Path, title: str | None = None) -> list[Path]:
    """training_loss.png (and training_eval_loss.png) from the trainer log into `out_dir`; `title` names the run
    (default: out_dir)."""
    written = []
    for key in ("loss", "eval_loss"):
        fig = loss_figure(log, (key,), f"training {key} of {title or out_dir}")
        if fig is None:
            continue
        path = out_dir / f"training_{key}.png"
        fig.savefig(path, format="png", dpi=100)
        written.append(path)
    return written


# ------------------------------------------------------------------ schedule, state, log


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Steps of the run, HF's rules: a logging/saving/eval interval < 1 is a fraction of the total steps."""

    total: int
    warmup: int
    updates_per_epoch: int
    log_every: int
    save_every: int
    eval_every: int


def _steps(value: float, total: int) -> int:
    return max(1, math.ceil(value * total)) if 0 < value < 1 else int(value)


def schedule(cfg: TrainConfig, n_train: int) -> Schedule:
    """Total optimizer steps (max_steps, else epochs x updates per epoch), warmup and the intervals."""
    batches_per_epoch = math.ceil(n_train / cfg.per_device_train_batch_size)
    updates_per_epoch = max(math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps), 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * updates_per_epoch)
    warmup = _steps(cfg.warmup_steps, total) if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
    eval_every = _steps(cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps, total)
    return Schedule(total, warmup, updates_per_epoch, _steps(cfg.logging_steps, total), _steps(cfg.save_steps, total),
                    eval_every)  # fmt: skip


@dataclasses.dataclass
class State:
    """Where the run is; saved as each checkpoint's trainer_state.json (with the data order) and restored on resume."""

    global_step: int = 0
    epoch_index: int = 0
    batches_done: int = 0
    order: list[list[int]] | None = None  # this epoch's batches (example indices)
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tokens_seen: int = 0
    elapsed: float = 0.0
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)
    pending_losses: list[float] = dataclasses.field(default_factory=list)  # since the last log line
    loss_total: float = 0.0
    loss_steps: int = 0

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> State:
        return cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls) if f.name in doc})


class TrainerLog:
    """trainer_log.jsonl with LLaMA-Factory's fields (steps, percentage, elapsed and remaining time), and the clock."""

    def __init__(self, out: Path, state: State, sch: Schedule, with_tokens: bool) -> None:
        self.state, self.sch, self.with_tokens = state, sch, with_tokens
        if state.global_step:  # resumed: the log up to the checkpoint
            with open(out / checkpoint.TRAINER_LOG, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in state.log_history)
        self.file = open(out / checkpoint.TRAINER_LOG, "a", encoding="utf-8")  # noqa: SIM115 (closed by close)
        self.t0 = time.time() - state.elapsed  # the run's start, across resumes
        self.start, self.cpu_start, self.step_at_start = time.time(), time.process_time(), state.global_step

    def write(self, rec: dict[str, Any]) -> None:
        done, total = self.state.global_step, self.sch.total
        elapsed = time.time() - self.t0
        per_step = (time.time() - self.start) / max(done - self.step_at_start, 1)
        epoch = round(done / self.sch.updates_per_epoch, 4)
        full = {"current_steps": done, "total_steps": total, **rec, "epoch": epoch,
                "percentage": round(done / total * 100, 2),
                "elapsed_time": str(timedelta(seconds=int(elapsed))),
                "remaining_time": str(timedelta(seconds=int((total - done) * per_step)))}  # fmt: skip
        if self.with_tokens:
            full["throughput"] = round(self.state.tokens_seen / max(elapsed, 1e-9), 2)
            full["total_tokens"] = self.state.tokens_seen
        self.state.log_history.append(full)
        self.file.write(json.dumps(full) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False, disable=os.environ.get("EXPORTER_NO_PROGRESS") == "1",
    )  # fmt: skip


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass
class Run:
    """What the loop works with."""

    cfg: TrainConfig
    prep: Prepared
    sch: Schedule
    model: Any
    opt: Any
    sched: Any
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    amp: Any  # autocast dtype or None
    device: str
    fast: bool  # loss through the decoder + head on labelled positions only (see loss_sum)
    out: Path
    model_dir: Path  # the base model: tokenizer and generation_config of every written dir come from it
    state: State
    run_tokens: int = 0  # tokens seen in this process (for tokens/s)

    def batch(self, examples: list[Example]) -> dict[str, Any]:
        return {
            k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in collate(examples, self.prep.pad_id).items()
        }


def step(run: Run, batches: list[dict[str, Any]]) -> tuple[float, float]:
    """One optimizer update over `batches` (gradient accumulation, the loss normalised by all their trained tokens);
    returns (loss, learning rate after the scheduler step, as HF logs it)."""
    import torch

    n_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    step_loss = 0.0
    for b in batches:
        with torch.autocast(run.device, dtype=run.amp, enabled=run.amp is not None):
            ls, _ = loss_sum(run.model, b, run.fast)
        loss = ls / max(n_tok, 1)
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        step_loss += float(loss.detach())
        run.state.tokens_seen += b["tokens"]
        run.run_tokens += b["tokens"]
    if run.scaler:
        run.scaler.unscale_(run.opt)
    if run.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], run.cfg.max_grad_norm)
    if run.scaler:
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.step()
    run.sched.step()
    lr = run.sched.get_last_lr()[0]
    run.opt.zero_grad(set_to_none=True)
    return step_loss, lr


def evaluate(run: Run) -> float:
    """Mean loss per trained token on the validation examples."""
    import torch

    run.model.eval()
    tot, n, bs = 0.0, 0, run.cfg.per_device_eval_batch_size
    with torch.no_grad(), torch.autocast(run.device, dtype=run.amp, enabled=run.amp is not None):
        for s in range(0, len(run.prep.val), bs):
            ls, k = loss_sum(run.model, run.batch(run.prep.val[s : s + bs]), run.fast)
            tot, n = tot + float(ls), n + k
    run.model.train()
    return tot / max(n, 1)


def _next_group(run: Run) -> list[list[int]]:
    """The batches of the next update; a new epoch's order when this one is used up."""
    st, cfg = run.state, run.cfg
    if st.order is None or st.batches_done >= len(st.order):
        if st.order is not None:
            st.epoch_index += 1
        lengths = [len(e.input_ids) for e in run.prep.train]
        st.order = plan_epoch(lengths, cfg.per_device_train_batch_size, cfg.seed, st.epoch_index)
        st.batches_done = 0
    return st.order[st.batches_done : st.batches_done + cfg.gradient_accumulation_steps]


def loop(run: Run, log: TrainerLog) -> None:
    """Steps until the total: log every `log_every`, evaluate as eval_strategy says, checkpoint every `save_every`."""
    st, cfg, sch = run.state, run.cfg, run.sch
    with _progress() as progress:
        task = progress.add_task("train", total=sch.total, completed=st.global_step, loss="-")
        while st.global_step < sch.total:
            group = _next_group(run)
            step_loss, lr = step(run, [run.batch([run.prep.train[i] for i in b]) for b in group])
            st.batches_done += len(group)
            st.global_step += 1
            st.elapsed = time.time() - log.t0
            st.pending_losses.append(step_loss)
            st.loss_total += step_loss
            st.loss_steps += 1
            n = st.global_step
            progress.update(task, completed=n, loss=f"{step_loss:.4f}")
            if n % sch.log_every == 0 or n == sch.total:
                log.write({"loss": round(sum(st.pending_losses) / len(st.pending_losses), 6), "lr": lr})
                st.pending_losses = []
            epoch_end = st.batches_done >= len(st.order or [])
            if run.prep.val and ((cfg.eval_strategy == "steps" and n % sch.eval_every == 0)
                                 or (cfg.eval_strategy == "epoch" and epoch_end)):  # fmt: skip
                log.write({"eval_loss": round(evaluate(run), 6)})
            if n % sch.save_every == 0 and n < sch.total:
                checkpoint.save(run.model, run.opt, run.sched, dataclasses.asdict(st), run.out, cfg, run.model_dir,
                                run.prep.tpl)  # fmt: skip


# ------------------------------------------------------------------ the run


def _start(cfg: TrainConfig, prep: Prepared, model_dir: Path, out: Path, resume: Path | None, device: str) -> Run:
    """Seeded model, optimizer and scheduler; restored from `resume` when given."""
    import numpy as np
    import torch
    from transformers import get_scheduler

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg, model_dir, device)
    model.train()
    sch = schedule(cfg, len(prep.train))
    opt = make_optimizer(model, cfg)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=sch.warmup, num_training_steps=sch.total)
    fingerprint = {"examples": len(prep.train), "tokens": sum(len(e.input_ids) for e in prep.train),
                   "batch_size": cfg.per_device_train_batch_size, "accum": cfg.gradient_accumulation_steps,
                   "seed": cfg.seed, "total_steps": sch.total}  # fmt: skip
    state = State(fingerprint=fingerprint)
    if resume is not None:
        state = State.from_dict(checkpoint.load(resume, model, opt, sched, cfg))
        if state.fingerprint != fingerprint:
            raise UserError(
                f"resume_from_checkpoint {resume}: saved for different data or batch settings "
                f"({state.fingerprint} vs now {fingerprint})"
            )
    amp = (torch.bfloat16 if cfg.bf16 else torch.float16) if (cfg.bf16 or cfg.fp16) else None
    scaler = torch.amp.GradScaler("cuda") if cfg.fp16 else None
    run = Run(cfg, prep, sch, model, opt, sched, scaler, amp, device, True, out, model_dir, state)
    lengths = [len(e.input_ids) for e in prep.train]
    probe = run.batch([prep.train[i] for i in plan_epoch(lengths, cfg.per_device_train_batch_size, cfg.seed, 0)[0]])
    run.fast = fast_path_ok(model, probe)
    if not run.fast:
        say("computing the loss through the model's own forward (its output head is not a plain projection)")
    return run


def _results(run: Run, log: TrainerLog) -> dict[str, Any]:
    """all_results.json: LLaMA-Factory's train metrics (+ eval_loss when evaluating), and CPU time of the loop."""
    st, cfg = run.state, run.cfg
    runtime, cpu_time = time.time() - log.start, time.process_time() - log.cpu_start
    results: dict[str, Any] = {
        "epoch": round(st.global_step / run.sch.updates_per_epoch, 4),
        "train_loss": round(st.loss_total / max(st.loss_steps, 1), 6),
        "train_runtime": round(runtime, 3),
        "train_samples_per_second": round(
            len(run.prep.train) * st.global_step / run.sch.updates_per_epoch / max(runtime, 1e-9), 3
        ),
        "train_steps_per_second": round((st.global_step - log.step_at_start) / max(runtime, 1e-9), 3),
        "train_tokens_per_second": round(run.run_tokens / max(runtime, 1e-9), 2),
        "train_cpu_seconds": round(cpu_time, 3),  # CPU time of the loop (all threads): load-independent cost
    }
    if cfg.include_num_input_tokens_seen:
        results["num_input_tokens_seen"] = st.tokens_seen
    if run.prep.val and (cfg.do_eval or cfg.eval_strategy != "no"):
        results["eval_loss"] = round(evaluate(run), 6)
        if cfg.do_eval:
            log.write({"eval_loss": results["eval_loss"]})
    return results


def _write_outputs(tmp: Path, run: Run, results: dict[str, Any]) -> None:
    """Adapter (or model), tokenizer with the training template, generation_config, HF trainer_state, results, plots."""
    from exporter import hf_dir

    run.model.save_pretrained(tmp, safe_serialization=True)
    hf_dir.finish(tmp, run.prep.tpl, run.model_dir, tokenizer_dir=run.model_dir)
    st, sch = run.state, run.sch
    hf_log = [
        {k: v for k, v in (("loss", r.get("loss")), ("eval_loss", r.get("eval_loss")), ("learning_rate", r.get("lr")),
                           ("epoch", r["epoch"]), ("step", r["current_steps"])) if v is not None}
        for r in st.log_history
    ]  # fmt: skip
    hf_state = {"global_step": st.global_step, "max_steps": sch.total, "epoch": results["epoch"],
                "logging_steps": sch.log_every, "save_steps": sch.save_every, "log_history": hf_log}  # fmt: skip
    (tmp / checkpoint.STATE_NAME).write_text(json.dumps(hf_state, indent=2) + "\n", encoding="utf-8")
    (tmp / "all_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    train_only = {k: v for k, v in results.items() if not k.startswith("eval")}
    (tmp / "train_results.json").write_text(json.dumps(train_only, indent=2) + "\n", encoding="utf-8")
    if run.cfg.plot_loss:
        plot(st.log_history, tmp, title=str(run.out))


def _write_manifest(run: Run) -> None:
    from exporter import data, manifest

    cfg = run.cfg
    inputs: dict[str, Path | str] = {"model": str(run.model_dir)}
    if cfg.adapter_name_or_path:
        inputs["adapter"] = cfg.adapter_name_or_path
    info = data.read_info(Path(cfg.dataset_dir))
    for name in cfg.dataset:
        inputs[f"dataset:{name}"] = data.spec(name, info, Path(cfg.dataset_dir)).source
    settings = dataclasses.asdict(cfg) | {"template": run.prep.tpl.name if run.prep.tpl else None,
                                          "packing": run.prep.packing, "total_steps": run.sch.total,
                                          "train_examples": len(run.prep.train), "val_examples": len(run.prep.val),
                                          "device": run.device}  # fmt: skip
    manifest.write(run.out, "train", inputs=inputs, settings=settings)


@dataclasses.dataclass
class TrainResult:
    """What `train` wrote into output_dir (the adapter or full model, logs, plots, manifest) and its numbers."""

    out: Path
    steps: int
    template: str | None
    results: dict[str, Any]  # all_results.json


def train(cfg: TrainConfig, given: set[str] | None = None) -> TrainResult:
    """Train per `cfg` (`given`: the keys the user set, for the notes on keys without effect here)."""
    import torch

    from exporter import examples, hub

    given = given if given is not None else set()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(cfg, given, device)
    model_dir = hub.resolve(cfg.model_name_or_path, "model")
    out = Path(cfg.output_dir)
    prep = examples.prepare(cfg, model_dir)  # every data error surfaces before anything is written
    resume = checkpoint.prepare_output(cfg, out)
    run = _start(cfg, prep, model_dir, out, resume, device)
    log = TrainerLog(out, run.state, run.sch, cfg.include_num_input_tokens_seen)
    try:
        loop(run, log)
        results = _results(run, log)
    finally:
        log.close()
    checkpoint.write_final(out, lambda tmp: _write_outputs(tmp, run, results))
    _write_manifest(run)
    print(
        f"trained {run.state.global_step} steps, loss {results['train_loss']:.4f}, "
        f"{results['train_tokens_per_second']:.0f} tokens/s -> {out}",
        file=sys.stderr,
    )
    return TrainResult(out, run.state.global_step, prep.tpl.name if prep.tpl else None, results)


def main(argv: list[str]) -> TrainResult | Any:
    """CLI entry: parse LLaMA-Factory style arguments; train, then predict when do_predict is set (LF's do_predict
    without do_train only predicts). Returns the TrainResult, or the PredictResult when it predicted."""
    from exporter import predict

    raw, where = parse_args(argv)
    train_raw, predict_raw = predict.split_train_args(raw, where)
    result = train(*config_from_dict(train_raw, where)) if train_raw is not None else None
    if predict_raw is not None:
        return predict.predict(*predict.options(predict_raw, where))
    return result
