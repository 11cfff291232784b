"""`exporter train`: LoRA / QLoRA, freeze or full tuning with LLaMA-Factory's config keys and stages (sft, pt, dpo,
kto), in a plain PyTorch loop, on one process or several (`exporter.distributed`).

The recipe, `train(cfg)`: check the config (`lf_args`), join the process group, prepare the examples
(`examples.prepare`: data -> template -> token ids and labels), prepare the output dir and the point to resume from
(`checkpoint`), load the model (`tuning`), plan the schedule, run the loop of `step()`s (the stage's loss:
`objective`) with logging, evaluation and checkpoints, then write the adapter (or model), tokenizer, logs, plots and
manifest. Only rank 0 writes. The rich progress bar goes to stderr (EXPORTER_NO_PROGRESS=1 turns it off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from exporter import checkpoint, objective
from exporter.atomic import claim
from exporter.distributed import Dist
from exporter.errors import UserError
from exporter.examples import Prepared, causal_only, length, plan_epoch, to_device
from exporter.lf_args import TrainConfig, check, config_from_dict, parse_args, say
from exporter.loss_plot import plot
from exporter.progress import progress

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


def schedule(cfg: TrainConfig, n_train: int, world: int = 1) -> Schedule:
    """Total optimizer steps (max_steps, else epochs x updates per epoch), warmup and the intervals."""
    batches_per_epoch = math.ceil(n_train / (cfg.per_device_train_batch_size * world))
    updates_per_epoch = max(math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps), 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * updates_per_epoch)
    warmup = _steps(cfg.warmup_steps, total) if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
    eval_every = _steps(cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps, total)
    return Schedule(total, warmup, updates_per_epoch, _steps(cfg.logging_steps, total), _steps(cfg.save_steps, total),
                    eval_every)  # fmt: skip


def _say_fractions(cfg: TrainConfig, sch: Schedule) -> None:
    """Say the step count an interval given as a fraction of the run (< 1) came to."""
    used = {"logging_steps": (True, sch.log_every), "save_steps": (cfg.save_strategy == "steps", sch.save_every),
            "eval_steps": (cfg.eval_strategy == "steps", sch.eval_every)}  # fmt: skip
    for key, (applies, every) in used.items():
        value = getattr(cfg, key)
        if applies and value is not None and 0 < value < 1:
            say(f"{key}={value:g}: every {every} of the {sch.total} steps")


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
    pending_metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # key -> [sum, count]
    loss_total: float = 0.0
    loss_steps: int = 0
    loss_scale: dict[str, Any] | None = None  # fp16's dynamic loss scale at the last checkpoint

    @property
    def epoch(self) -> float:
        """HF's Trainer's epoch: the epochs done plus the share of this epoch's batches used (an epoch whose batches
        do not fill the last accumulation is 1.0 only at its end)."""
        return self.epoch_index + (self.batches_done / len(self.order) if self.order else 0.0)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> State:
        return cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls) if f.name in doc})


class TrainerLog:
    """trainer_log.jsonl with LLaMA-Factory's fields (steps, percentage, elapsed and remaining time), and the clock."""

    def __init__(self, out: Path, state: State, sch: Schedule, with_tokens: bool, main: bool = True) -> None:
        self.state, self.sch, self.with_tokens = state, sch, with_tokens
        if state.global_step and main:  # resumed: the log up to the checkpoint
            with open(out / checkpoint.TRAINER_LOG, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(rec, allow_nan=False) + "\n" for rec in state.log_history)
        self.file = open(out / checkpoint.TRAINER_LOG, "a", encoding="utf-8") if main else None  # noqa: SIM115
        self.t0 = time.time() - state.elapsed  # the run's start, across resumes
        self.start, self.cpu_start, self.step_at_start = time.time(), time.process_time(), state.global_step

    def _line(self, rec: dict[str, Any]) -> dict[str, Any]:
        done, total = self.state.global_step, self.sch.total
        elapsed = time.time() - self.t0
        per_step = (time.time() - self.start) / max(done - self.step_at_start, 1)
        if "rewards/accuracies" in rec:  # LLaMA-Factory's field for it (its board shows it)
            rec = {**rec, "accuracy": rec["rewards/accuracies"]}
        full = {"current_steps": done, "total_steps": total, **rec, "epoch": round(self.state.epoch, 4),
                "percentage": round(done / total * 100, 2),
                "elapsed_time": str(timedelta(seconds=int(elapsed))),
                "remaining_time": str(timedelta(seconds=int((total - done) * per_step)))}  # fmt: skip
        if self.with_tokens:
            full["throughput"] = round(self.state.tokens_seen / max(elapsed, 1e-9), 2)
            full["total_tokens"] = self.state.tokens_seen
        return full

    def write(self, rec: dict[str, Any]) -> None:
        full = self._line(rec)
        self.state.log_history.append(full)
        if self.file:
            self.file.write(json.dumps(full, allow_nan=False) + "\n")
            self.file.flush()

    def closing(self) -> None:
        """LLaMA-Factory's last line, written when HF's Trainer logs its training summary: steps, epoch, time."""
        if self.file:
            self.file.write(json.dumps(self._line({})) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass
class Run:
    """What the loop works with."""

    cfg: TrainConfig
    prep: Prepared
    sch: Schedule
    model: Any  # the HF/PEFT model: saved, and switched to the reference (adapter disabled) for dpo/kto
    score: Any  # the Scorer the loss runs through: DDP/FSDP-wrapped or a DeepSpeed engine when distributed
    plain: Any  # the same Scorer unwrapped, for forwards without gradients
    opt: Any
    sched: Any
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    amp: Any  # autocast dtype or None
    device: str
    dist: Dist
    out: Path
    model_dir: Path  # the base model: tokenizer and generation_config of every written dir come from it
    state: State
    engine: str = "single"  # single | ddp | fsdp | deepspeed
    base: dict[str, Any] = dataclasses.field(default_factory=dict)  # adapter.base_fingerprint(model_dir), rank 0
    evaluated: tuple[int, dict[str, float], float] | None = None  # the last evaluation: step, metrics, seconds
    run_tokens: int = 0  # tokens seen in this run (all ranks), for tokens/s
    losses: list[Any] = dataclasses.field(default_factory=list)  # device-side step losses since the last flush
    sums: dict[str, Any] = dataclasses.field(default_factory=dict)  # device-side metric sums since the last flush
    counts: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return to_device(causal_only(batch) if self.device.startswith("cuda") else batch, self.device)

    def batch(self, items: list[Any]) -> dict[str, Any]:
        return self.to_device(objective.collate(self.cfg.stage, items, self.prep.pad_id))


class Diverged(UserError):
    """A non-finite loss, gradient or weight: training stops at that step; nothing of it is written."""

    def __init__(self, run: Run, what: str, at: int) -> None:
        last = checkpoint.latest(run.out)
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was written before it"
        super().__init__(
            f"training diverged at step {at} of {run.sch.total}: {what} "
            f"(learning_rate={run.cfg.learning_rate:g}); nothing was written for it and {kept}; lower the "
            "learning rate (or warm up longer) and run again"
        )


def _check_weights(run: Run) -> None:
    """Before anything is written, on every rank: every trainable weight finite (a finite loss can still step into
    inf), each rank checking its own shards where FSDP or ZeRO-3 shard them (QLoRA's frozen 4-bit base: never)."""
    import torch

    from exporter.distributed import all_agree, local_part

    parts = [local_part(p, run.dist) for p in run.model.parameters() if p.requires_grad]
    ok = not parts or bool(torch.stack([torch.isfinite(p).all() for p in parts]).all())
    if not all_agree(run.dist, ok):
        raise Diverged(run, "the weights became non-finite (inf/nan)", run.state.global_step)


def _weights_to_save(run: Run, bar: bool = False) -> tuple[dict[str, Any] | None, Any]:
    """Every rank, before a save: the weights checked (`_check_weights`), then how they are written: streamed by
    rank 0 as the ranks gather them (`distributed.weights_writer`; `bar`: with a progress bar), or gathered into one
    dict first (`distributed.full_state_dict`; None where the model is whole in memory). (full, weights)."""
    from exporter import distributed

    _check_weights(run)
    weights = distributed.weights_writer(run, bar)
    return (None if weights else distributed.full_state_dict(run)), weights


def _micro_batches(run: Run, group: list[list[int]], pool: list[Any]) -> list[tuple[list[Any], float]]:
    """This rank's examples of each global batch, with weight 1; a rank left without rows (a short last batch)
    reruns the batch's first example with weight 0, so every rank runs the same forwards and collectives."""
    from exporter.distributed import rows

    out = []
    for b in group:
        mine = rows(run.dist, b)
        out.append(([pool[i] for i in mine], 1.0) if mine else ([pool[b[0]]], 0.0))
    return out


def step(run: Run, group: list[list[int]]) -> float:
    """One optimizer update over the global batches of `group` (gradient accumulation; the loss averaged over all
    their units on every rank); returns the learning rate the update used, as HF's Trainer logs it. The step's loss
    and metrics stay on the device until the next flush (no per-step host sync)."""
    import contextlib

    import torch

    from exporter.examples import n_tokens

    cfg, d, pool = run.cfg, run.dist, run.prep.train
    n_units = sum(objective.units(cfg.stage, [pool[i] for i in b]) for b in group)
    totals = (n_units, sum(objective.desirable(cfg.stage, [pool[i] for i in b]) for b in group))
    parts = _micro_batches(run, group, pool)
    step_loss = torch.zeros((), device=run.device)
    for k, (items, weight) in enumerate(parts):
        last = k == len(parts) - 1
        sync = contextlib.nullcontext()
        if run.engine == "ddp" and not last:
            sync = run.score.no_sync()
        elif run.engine == "fsdp":
            run.score.set_requires_gradient_sync(last)
        batch = run.batch(items)
        with sync:
            with torch.autocast(run.device.split(":")[0], dtype=run.amp, enabled=run.amp is not None):
                loss_units, metrics = objective.micro_loss(run, batch, totals, weight)
            part = loss_units * (weight / max(n_units, 1))
            scaled = part * d.world  # DDP/FSDP/DeepSpeed average gradients over the ranks
            if run.engine == "deepspeed":  # our groups set the boundary: an epoch's short last group steps too
                run.score.set_gradient_accumulation_boundary(last)
                run.score.backward(scaled, scale_wrt_gas=False)
                run.score.step()
            else:
                (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        step_loss += part.detach()
        if weight:
            for key, v in metrics.items():
                run.sums[key] = run.sums.get(key, 0) + v.detach()
            for key, c in objective.metric_counts(cfg.stage, batch, len(items)).items():
                run.counts[key] = run.counts.get(key, 0) + c
    tokens = sum(n_tokens(pool[i]) for b in group for i in b)
    run.state.tokens_seen += tokens
    run.run_tokens += tokens
    run.losses.append(step_loss)
    if run.engine == "deepspeed":  # the engine clips, steps and zeroes at the accumulation boundary itself
        stepped = run.score.was_step_applied()
    else:
        if run.scaler:
            run.scaler.unscale_(run.opt)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        stepped = True
        if run.scaler:
            scale = run.scaler.get_scale()
            run.scaler.step(run.opt)
            run.scaler.update()
            stepped = run.scaler.get_scale() >= scale  # backed off: inf/NaN gradients, the update was skipped
        else:
            run.opt.step()
        run.opt.zero_grad(set_to_none=True)
    lr = run.sched.get_last_lr()[0]
    if stepped:  # a skipped update (fp16 overflow) leaves the lr schedule where it was, as HF's Trainer does
        run.sched.step()
    return lr


def flush(run: Run) -> None:
    """Step losses and metric sums from the device (summed over the ranks) into the state: one host sync, at log
    and checkpoint steps only; a non-finite step loss is a Diverged naming its step."""
    import torch

    from exporter.distributed import all_sum

    keys = sorted(set(run.sums) | set(run.counts))
    parts = [torch.stack(run.losses).float() if run.losses else torch.zeros(0, device=run.device)]
    parts += [torch.as_tensor(run.sums.get(k, 0.0), device=run.device, dtype=torch.float32).reshape(1) for k in keys]
    parts += [torch.tensor([float(run.counts.get(k, 0)) for k in keys], device=run.device)]
    flat = all_sum(run.dist, torch.cat(parts)).tolist()
    n = len(run.losses)
    st = run.state
    for i, loss in enumerate(flat[:n]):  # a non-finite step stops the run before it is logged or saved
        if not math.isfinite(loss):
            raise Diverged(run, f"the loss is {loss}", st.global_step - n + 1 + i)
    st.pending_losses += flat[:n]
    st.loss_total += sum(flat[:n])
    st.loss_steps += n
    for i, k in enumerate(keys):
        acc = st.pending_metrics.setdefault(k, [0.0, 0.0])
        acc[0] += flat[n + i]
        acc[1] += flat[n + len(keys) + i]
    run.losses, run.sums, run.counts = [], {}, {}


def evaluate(run: Run) -> dict[str, float]:
    """Loss on the validation examples (per trained token for sft/pt, per example for dpo/kto), and for dpo/kto
    the reward metrics, as `eval_*` keys; every rank scores its rows of each batch."""
    import torch

    from exporter import tuning
    from exporter.distributed import all_sum

    cfg, pool, bs = run.cfg, run.prep.val, run.cfg.per_device_eval_batch_size * run.dist.world
    keys = objective.PAIR_METRICS if cfg.stage == "dpo" else objective.KTO_METRICS if cfg.stage == "kto" else ()
    sums = torch.zeros(1 + len(keys), device=run.device, dtype=torch.float64)  # loss, metrics: on the device
    counts = [0.0] * (1 + len(keys))  # units, metric counts: on the host
    amp = torch.autocast(run.device.split(":")[0], dtype=run.amp, enabled=run.amp is not None)
    with tuning.without_grad(run.model), amp:
        batches = [list(range(s, min(s + bs, len(pool)))) for s in range(0, len(pool), bs)]
        for b, (items, weight) in zip(batches, _micro_batches(run, batches, pool), strict=True):
            batch = run.batch(items)
            totals = (len(b), objective.desirable(cfg.stage, [pool[i] for i in b]))  # the batch over all ranks
            loss_units, metrics = objective.micro_loss(run, batch, totals, weight)
            zero = loss_units.new_zeros(())
            sums += weight * torch.stack([loss_units, *(metrics.get(k, zero) for k in keys)]).double()
            cnt = objective.metric_counts(cfg.stage, batch, len(items))
            new = [objective.units(cfg.stage, items), *(cnt.get(k, 0) for k in keys)]
            counts = [c + weight * n for c, n in zip(counts, new, strict=True)]
    vals = all_sum(run.dist, torch.cat([sums, torch.tensor(counts, device=run.device, dtype=torch.float64)]))
    vals = vals.tolist()
    n = 1 + len(keys)
    if not math.isfinite(vals[0]):
        raise Diverged(run, f"the evaluation loss is {vals[0]}", run.state.global_step)
    out = {"eval_loss": round(vals[0] / max(vals[n], 1), 6)}
    found = objective.finish_metrics(cfg.stage, dict(zip(keys, vals[1:n], strict=True)),
                                     dict(zip(keys, vals[n + 1 :], strict=True)))  # fmt: skip
    return out | {f"eval_{k}": v for k, v in found.items()}


def _timed_evaluate(run: Run) -> tuple[dict[str, float], float]:
    """`evaluate` and its seconds, remembered with the step: the final evaluation after the last step reuses it (the
    weights have not changed since)."""
    if run.evaluated is None or run.evaluated[0] != run.state.global_step:
        start = time.time()
        found = evaluate(run)
        run.evaluated = (run.state.global_step, found, max(time.time() - start, 1e-9))
    return dict(run.evaluated[1]), run.evaluated[2]


def _next_group(run: Run) -> list[list[int]]:
    """The global batches of the next update; a new epoch's order when this one is used up."""
    st, cfg = run.state, run.cfg
    if st.order is None or st.batches_done >= len(st.order):
        if st.order is not None:
            st.epoch_index += 1
        lengths = [length(e) for e in run.prep.train]
        st.order = plan_epoch(lengths, cfg.per_device_train_batch_size * run.dist.world, cfg.seed, st.epoch_index)
        st.batches_done = 0
    return st.order[st.batches_done : st.batches_done + cfg.gradient_accumulation_steps]


def _log_line(run: Run, lr: float) -> dict[str, Any]:
    st = run.state
    rec: dict[str, Any] = {"loss": round(sum(st.pending_losses) / len(st.pending_losses), 6), "lr": lr}
    sums = {k: v[0] for k, v in st.pending_metrics.items()}
    rec |= objective.finish_metrics(run.cfg.stage, sums, {k: v[1] for k, v in st.pending_metrics.items()})
    st.pending_losses, st.pending_metrics = [], {}
    return rec


def loop(run: Run, log: TrainerLog) -> None:
    """Steps until the total: log every `log_every` (HF's rule: not at the last step unless it is one of them),
    evaluate and checkpoint as eval_strategy and save_strategy say (HF's rules: also at the last step)."""
    st, cfg, sch = run.state, run.cfg, run.sch
    with progress("train", "loss {task.fields[loss]}", sch.total, done=st.global_step, show=run.dist.main,
                  loss="-") as advance:  # fmt: skip
        while st.global_step < sch.total:
            group = _next_group(run)
            lr = step(run, group)
            st.batches_done += len(group)
            st.global_step += 1
            st.elapsed = time.time() - log.t0
            n = st.global_step
            if n % sch.log_every == 0 or n == sch.total:
                flush(run)  # the last steps count in train_loss also when they are not logged
            if n % sch.log_every == 0:
                rec = _log_line(run, lr)
                log.write(rec)
                advance(0, loss=f"{rec['loss']:.4f}")
            advance()
            last = n == sch.total  # HF's Trainer ends the epoch there: its epoch-end evaluation and save happen too
            epoch_end = st.batches_done >= len(st.order or []) or last
            if run.prep.val and _due(cfg.eval_strategy, n % sch.eval_every == 0 or last, epoch_end):
                log.write(_timed_evaluate(run)[0])
            if _due(cfg.save_strategy, n % sch.save_every == 0 or last, epoch_end):
                _checkpoint(run)


def _due(strategy: str, step_due: bool, epoch_end: bool) -> bool:
    """HF's DefaultFlowCallback: `steps` every interval and at the last step, `epoch` at each epoch's end (the
    last step ends one), `no` never."""
    return (strategy == "steps" and step_due) or (strategy == "epoch" and epoch_end)


def _checkpoint(run: Run) -> None:
    """checkpoint-N on rank 0, with the weights gathered from every rank; a sharded optimizer (FSDP, DeepSpeed) is
    written by each rank, its own part (gathered, every rank's part would pass through rank 0's memory)."""
    from exporter import distributed

    flush(run)
    full, weights = _weights_to_save(run)
    own = run.engine in ("fsdp", "deepspeed") and not run.cfg.save_only_model
    optim = None if run.cfg.save_only_model or own else distributed.full_optimizer_state(run)
    part = distributed.optimizer_part(run) if own else None
    rngs = distributed.gather(run.dist, checkpoint.rng_state())
    run.state.loss_scale = distributed.loss_scale(run)

    def parts(tmp: Path | None) -> None:  # every rank, at the same point
        distributed.write_parts(run.dist, tmp, lambda where: checkpoint.save_part(where, run.dist.rank, part))

    if run.dist.main:
        checkpoint.save(run.model, optim, run.sched, dataclasses.asdict(run.state), run.out, run.cfg, run.model_dir,
                        run.prep.tpl, run.base, state_dict=full, rngs=rngs, parts=parts if own else None,
                        weights=weights)  # fmt: skip
    else:  # in step with rank 0's save
        if weights:
            weights(None)
        if own:
            parts(None)
    distributed.barrier(run.dist)


# ------------------------------------------------------------------ the run


def _start(cfg: TrainConfig, prep: Prepared, model_dir: Path, out: Path, resume: Path | None, device: str,
           d: Dist) -> Run:  # fmt: skip
    """Seeded model, its scorer (wrapped for the distributed engine), optimizer and scheduler; the reference's
    log-probs for freeze/full dpo/kto; restored from `resume` when given."""
    import numpy as np
    import torch
    from transformers import get_scheduler

    from exporter import adapter, distributed, tuning

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    engine = "deepspeed" if cfg.deepspeed else "fsdp" if cfg.fsdp and d.active else "ddp" if d.active else "single"
    # FSDP: the weights stay on the CPU until fully_shard moves each layer to the device and shards it, so the model
    # never has to fit one GPU, and only rank 0 reads them, so the host holds one copy, not one per process (QLoRA's
    # 4-bit base is loaded by every rank, placed where bitsandbytes quantizes it)
    from_main = engine == "fsdp" and not cfg.quantization_bit
    ds = distributed.deepspeed_config(cfg, d, model_dir) if engine == "deepspeed" else None
    with distributed.zero3_loading(ds, cfg) as in_parts:  # ZeRO-3: no GPU holds the whole model either
        if from_main:
            model = distributed.load_on_main(d, lambda empty: tuning.load_model(cfg, model_dir, "cpu", empty, device))
        else:
            model = tuning.load_model(cfg, model_dir, device)
    model.train()
    if cfg.stage in ("dpo", "kto"):  # TRL and LLaMA-Factory train preferences without dropout
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    sch = schedule(cfg, len(prep.train), d.world)
    _say_fractions(cfg, sch)
    score = tuning.scorer(model)
    probe = to_device(objective.collate(cfg.stage, prep.train[: cfg.per_device_train_batch_size], prep.pad_id), device)
    if cfg.fsdp and not d.active:
        say("fsdp: one process, nothing to shard (run it under torchrun --nproc_per_node N)")
    if engine == "deepspeed":  # the scheduler drives the param groups DeepSpeed's optimizer wraps
        if not in_parts:  # on the weights as loaded, before DeepSpeed casts them
            score.fast = tuning.fast_path_ok(score, probe)
        opt = tuning.make_optimizer(model, cfg)
        wrapped = distributed.deepspeed_engine(score, opt, ds)
        if in_parts:  # ZeRO-3's hooks gather each layer's weights for the forwards
            score.fast = tuning.fast_path_ok(score, probe)
    else:
        wrapped = distributed.wrap(score, model, cfg, d, device, from_main)
        score.fast = tuning.fast_path_ok(score, probe)  # FSDP: every rank, on its shards
        opt = tuning.make_optimizer(model, cfg)  # after FSDP replaced the parameters with their shards
    if not score.fast:
        say("computing the loss through the model's own forward (its output head is not a plain projection)")
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=sch.warmup, num_training_steps=sch.total)
    # what a resume must match; not the total of steps, which a resume may extend (`checkpoint.read`)
    fingerprint = {"examples": len(prep.train), "tokens": sum(length(e) for e in prep.train),
                   "batch_size": cfg.per_device_train_batch_size, "accum": cfg.gradient_accumulation_steps,
                   "seed": cfg.seed, "world": d.world,
                   **{k: getattr(cfg, k) for k in checkpoint.OPTIMIZER_KEYS}}  # fmt: skip
    if engine == "deepspeed":  # its optimizer is saved as each rank's part: resumable with the same stage only
        fingerprint["deepspeed"] = wrapped.zero_optimization_stage()
    amp = (torch.bfloat16 if cfg.bf16 else torch.float16) if (cfg.bf16 or cfg.fp16) else None
    scaler = torch.amp.GradScaler(device.split(":")[0]) if cfg.fp16 and engine != "deepspeed" else None
    run = Run(cfg, prep, sch, model, wrapped, distributed.unwrapped(wrapped), opt, sched, scaler, amp, device, d, out,
              model_dir, State(fingerprint=fingerprint), engine)  # fmt: skip
    if d.main:  # what every checkpoint's and the final manifest record of the base (read once)
        run.base = adapter.base_fingerprint(model_dir)
    if cfg.stage in ("dpo", "kto") and cfg.finetuning_type != "lora" and cfg.pref_loss not in ("orpo", "simpo"):
        say("reference log-probs: computed once with the initial model (no second copy in memory)")
        objective.reference_logps(run, prep.train)
        objective.reference_logps(run, prep.val)
    if resume is not None:
        if engine == "single":
            run.state = State.from_dict(checkpoint.load(resume, model, opt, sched, cfg, fingerprint))
        elif engine == "deepspeed":
            run.state = State.from_dict(distributed.restore_deepspeed(resume, cfg, run))
        else:
            run.state = State.from_dict(distributed.restore(resume, cfg, run))
        distributed.set_loss_scale(run, run.state.loss_scale, resume)
    return run


def _results(run: Run, log: TrainerLog) -> dict[str, Any]:
    """all_results.json: LLaMA-Factory's train metrics (+ its eval metrics when evaluating: HF's evaluate() speed
    metrics, pt's perplexity), and CPU time of the loop."""
    st, cfg = run.state, run.cfg
    runtime, cpu_time = time.time() - log.start, time.process_time() - log.cpu_start
    results: dict[str, Any] = {
        "epoch": st.epoch,
        "train_loss": round(st.loss_total / max(st.loss_steps, 1), 6),
        "train_runtime": round(runtime, 3),
        "train_samples_per_second": round(len(run.prep.train) * st.epoch / max(runtime, 1e-9), 3),
        "train_steps_per_second": round((st.global_step - log.step_at_start) / max(runtime, 1e-9), 3),
        "train_tokens_per_second": round(run.run_tokens / max(runtime, 1e-9), 2),
        "train_cpu_seconds": round(cpu_time, 3),  # CPU time of the loop (this process): load-independent cost
    }
    if cfg.include_num_input_tokens_seen:
        results["num_input_tokens_seen"] = st.tokens_seen
    # HF's Trainer ends log_history with the training summary (trainer_state.json), before any final evaluation
    summary = {k: v for k, v in results.items() if k.startswith("train_") and k != "train_cpu_seconds"}
    st.log_history.append({"epoch": st.epoch, "step": st.global_step, **summary})
    if run.prep.val and (cfg.do_eval or cfg.eval_strategy != "no"):
        found, runtime = _timed_evaluate(run)
        if cfg.do_eval:
            log.write(found)
        batches = math.ceil(len(run.prep.val) / (cfg.per_device_eval_batch_size * run.dist.world))
        results |= found | {"eval_runtime": round(runtime, 4),
                            "eval_samples_per_second": round(len(run.prep.val) / runtime, 3),
                            "eval_steps_per_second": round(batches / runtime, 3)}  # fmt: skip
        if cfg.stage == "pt" and found["eval_loss"] < 700:  # LLaMA-Factory's pt adds it (exp overflows past 709)
            results["eval_perplexity"] = math.exp(found["eval_loss"])
    return results


def _write_outputs(tmp: Path, run: Run, results: dict[str, Any], full: Any, weights: Any) -> None:
    """Adapter (or model), tokenizer with the training template, generation_config, HF trainer_state, results, plots;
    `full`, `weights`: see `checkpoint.save_model`."""
    from exporter import hf_dir

    checkpoint.save_model(run.model, tmp, full, weights)
    hf_dir.finish(tmp, run.prep.tpl, run.model_dir, tokenizer_dir=run.model_dir)
    st, sch = run.state, run.sch
    renamed = {"lr": "learning_rate", "current_steps": "step"}
    skip = {"total_steps", "percentage", "elapsed_time", "remaining_time", "throughput", "total_tokens"}
    hf_log = [{renamed.get(k, k): v for k, v in r.items() if k not in skip} for r in st.log_history]
    hf_state = {"global_step": st.global_step, "max_steps": sch.total, "epoch": results["epoch"],
                "logging_steps": sch.log_every, "save_steps": sch.save_every, "log_history": hf_log}  # fmt: skip
    (tmp / checkpoint.STATE_NAME).write_text(json.dumps(hf_state, indent=2) + "\n", encoding="utf-8")
    (tmp / "all_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    train_only = {k: v for k, v in results.items() if not k.startswith("eval")}
    (tmp / "train_results.json").write_text(json.dumps(train_only, indent=2) + "\n", encoding="utf-8")
    eval_only = {k: v for k, v in results.items() if k.startswith("eval")}
    if eval_only:  # HF's save_metrics("eval"): the final evaluation and the epoch
        eval_only["epoch"] = results["epoch"]
        (tmp / "eval_results.json").write_text(json.dumps(eval_only, indent=2) + "\n", encoding="utf-8")
    if run.cfg.plot_loss:
        plot(st.log_history, tmp, title=str(run.out))


def _write_manifest(run: Run) -> None:
    from exporter import adapter, dataset_info, manifest

    cfg = run.cfg
    inputs: dict[str, Path | str] = {"model": str(run.model_dir)}
    if cfg.adapter_name_or_path:
        inputs["adapter"] = cfg.adapter_name_or_path
    if cfg.tokenized_path:  # what was trained on (saved from the datasets, or LF's run without them)
        inputs["tokenized_path"] = cfg.tokenized_path
    else:
        info = dataset_info.read_info(Path(cfg.dataset_dir))
        for name in cfg.dataset:
            inputs[f"dataset:{name}"] = dataset_info.spec(name, info, Path(cfg.dataset_dir)).source
        for name in cfg.eval_dataset:
            inputs[f"eval_dataset:{name}"] = dataset_info.spec(name, info, Path(cfg.dataset_dir)).source
    settings = dataclasses.asdict(cfg) | {"template": run.prep.tpl.name if run.prep.tpl else None,
                                          "packing": run.prep.packing, "total_steps": run.sch.total,
                                          "train_examples": len(run.prep.train), "val_examples": len(run.prep.val),
                                          "device": run.device, "processes": run.dist.world,
                                          "engine": run.engine,
                                          adapter.FINGERPRINT_KEY: run.base}  # fmt: skip
    manifest.write(run.out, "train", inputs=inputs, settings=settings)


@dataclasses.dataclass
class TrainResult:
    """What `train` wrote into output_dir (the adapter or full model, logs, plots, manifest) and its numbers."""

    out: Path
    steps: int
    template: str | None
    results: dict[str, Any]  # all_results.json


def train(cfg: TrainConfig, given: set[str] | None = None) -> TrainResult:
    """Train per `cfg` (`given`: the keys the user set, for the notes on keys without effect here); under torchrun
    every process calls it and rank 0 writes."""
    import atexit

    from exporter import distributed

    d, device = distributed.init(cfg.ddp_timeout, group_of_one=bool(cfg.deepspeed))
    try:
        result = _train(cfg, given if given is not None else set(), d, device)
    except BaseException as e:
        # the error's traceback holds the run (frames keep their closures' cells even when cleared), and the run the
        # process group, until the error is handled: leave the group at exit, once it is
        atexit.unregister(distributed.shutdown)  # once, however many runs in this process failed
        atexit.register(distributed.shutdown)
        lost = distributed.peer_lost(d, e)  # another rank failed (it said why): one line here, not a traceback
        if lost is not None:
            raise lost from None
        raise
    distributed.shutdown()
    return result


def _trained(start: int, done: int) -> str:
    """What this run trained: its steps, and where a resumed run took over."""
    if not start:
        return f"trained {done} step{'' if done == 1 else 's'}"
    if done == start:
        return f"trained no step (resumed at step {start}, the run's last)"
    if done == start + 1:
        return f"trained step {done} (resumed at step {start})"
    return f"trained steps {start + 1}-{done} (resumed at step {start})"


def _train(cfg: TrainConfig, given: set[str], d: Dist, device: str) -> TrainResult:
    """The run (see the module's recipe); what it built is released when it returns, before `train` leaves the
    process group."""
    from exporter import data, distributed, examples, hub, tuning

    if cfg.use_cpu and device != "cpu":  # HF's use_cpu: the CPU even where a GPU is visible
        if d.active or cfg.deepspeed:
            raise UserError(
                "use_cpu: true with several processes or DeepSpeed where GPUs are visible is not "
                "supported (their process group runs on NCCL): hide the GPUs (CUDA_VISIBLE_DEVICES=)"
            )
        device = "cpu"
    check(cfg, given, device.split(":")[0])
    model_dir = hub.resolve(cfg.model_name_or_path, "model", cfg.cache_dir)
    tuning.check_inputs(cfg, model_dir)  # corrupt weights, an adapter given as the model: one line, nothing written
    out = Path(cfg.output_dir)
    prep = data.prepare_tokenized(cfg, model_dir, save=d.main)  # data errors before anything is written
    checkpoint.check_not_input(cfg, out, model_dir)  # never into the base, the adapter or the data
    rows = cfg.per_device_train_batch_size * max(examples.n_tokens(e) for e in prep.train)
    if tuning.checkpointing_unneeded(cfg, given, model_dir, device, rows):
        cfg = dataclasses.replace(cfg, disable_gradient_checkpointing=True)
    with claim(out) if d.main else contextlib.nullcontext(), tuning.attention_kernels(device):  # one run per output_dir
        resume = distributed.on_main(d, lambda: checkpoint.prepare_output(cfg, out))  # checks only
        run = _start(cfg, prep, model_dir, out, resume, device, d)
        if cfg.adapter_name_or_path:
            tuning.say_adapter_settings(run.model, cfg, given)
        distributed.on_main(d, lambda: checkpoint.begin(cfg, out, resume))  # output_dir changes from here on
        log = TrainerLog(out, run.state, run.sch, cfg.include_num_input_tokens_seen, d.main)
        try:
            loop(run, log)
            log.closing()
            results = _results(run, log)
        finally:
            log.close()
        full, weights = _weights_to_save(run, bar=True)
        if d.main:
            checkpoint.write_final(out, lambda tmp: _write_outputs(tmp, run, results, full, weights))
            _write_manifest(run)
            print(
                f"{_trained(log.step_at_start, run.state.global_step)}, loss {results['train_loss']:.4f}, "
                f"{results['train_tokens_per_second']:.0f} tokens/s"
                + (f" on {d.world} processes ({run.engine})" if d.active else "")
                + f" -> {out}",
                file=sys.stderr,
            )
        elif weights:  # in step with rank 0's write
            weights(None)
        distributed.barrier(d)
    return TrainResult(out, run.state.global_step, prep.tpl.name if prep.tpl else None, results)


def main(argv: list[str], flags: Sequence[str] = ()) -> TrainResult | Any:
    """CLI entry: parse LLaMA-Factory style arguments; train (here, or under torchrun when LF's launcher rules say
    so; `flags`: the root options, such as --verbose, each rank gets), then predict when do_predict is set (LF's
    do_predict without do_train only predicts; under torchrun, rank 0 predicts). Returns the TrainResult, or the
    PredictResult when it predicted."""

    from exporter import distributed, predict

    raw, where = parse_args(argv)
    train_raw, predict_raw = predict.split_train_args(raw, where)
    result = None
    if train_raw is not None:
        cfg, given = config_from_dict(train_raw, where)
        code = distributed.relaunch(argv, flags)
        if code is not None:
            raise SystemExit(code)
        result = train(cfg, given)
    if predict_raw is not None and os.environ.get("RANK", "0") == "0":
        return predict.predict(*predict.options(predict_raw, where))
    return result
