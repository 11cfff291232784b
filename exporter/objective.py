"""What a training step minimises, per stage: next-token cross-entropy on the trained tokens (sft, pt), a preference
loss on chosen/rejected pairs against the reference (dpo: `exporter.preference`), or KTO on tagged answers.

Each micro-batch returns the *sum* of its loss over its units (trained tokens for sft/pt, examples for dpo/kto) and
sums of the logged metrics; the loop divides by the units of the whole global step (all micro-batches, all ranks),
so one process and several with the same global batch compute the same loss. The reference of dpo/kto is the model
with its LoRA adapter disabled (no second copy); for freeze/full tuning it is the initial model, whose log-probs
are computed once before training (`reference_logps`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from exporter import examples as ex
from exporter import preference, tuning

# the metrics each stage logs (sums per micro-batch, averaged over the counts `metric_counts` gives)
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")  # fmt: skip
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")


def units(stage: str, batch_examples: list[Any]) -> int:
    """What the loss is averaged over: trained tokens (sft, pt) or examples (dpo, kto)."""
    if stage in ("dpo", "kto"):
        return len(batch_examples)
    return sum(e.n_trained for e in batch_examples)


def collate(stage: str, batch_examples: list[Any], pad_id: int) -> dict[str, Any]:
    """The host-side batch of a stage (see examples.collate), with precomputed reference log-probs when present."""
    import torch

    if stage == "dpo":
        b = ex.collate_pairs(batch_examples, pad_id)
    elif stage == "kto":
        b = ex.collate_kto(batch_examples, pad_id)
    else:
        return ex.collate(batch_examples, pad_id)
    refs = [getattr(e, "ref", None) for e in batch_examples]
    if all(r is not None for r in refs):
        b["ref"] = torch.tensor([r for r, _ in refs] + ([r2 for _, r2 in refs] if stage == "dpo" else []))
        if stage == "kto":
            b["ref_kl"] = torch.tensor([r2 for _, r2 in refs])
    return b


@contextlib.contextmanager
def reference(model: Any) -> Iterator[None]:
    """The reference model: the PEFT model with its adapter disabled."""
    with tuning.without_grad(model), model.disable_adapter():
        yield


def _ref_logps(run: Any, batch: dict[str, Any], precomputed: Any) -> Any:
    """Reference log-probs of `batch`: precomputed (freeze/full), or the base under the disabled adapter."""
    if precomputed is not None:
        return precomputed
    with reference(run.model):
        return tuning.completion_logps(run.plain, batch)[0]


def desirable(stage: str, batch_examples: list[Any]) -> int:
    """KTO: how many of the examples are desirable (0 for the other stages)."""
    return sum(e.desirable for e in batch_examples) if stage == "kto" else 0


def micro_loss(run: Any, batch: dict[str, Any], totals: tuple[int, int] | None = None,
               weight: float = 1.0) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """(loss summed over the batch's units, metric sums) for one micro-batch of `run.cfg.stage`; `totals` are the
    units and desirable examples of the whole global step (all micro-batches, all ranks; default: this batch's);
    `weight` 0: a rank's stand-in rows (it has none of this global batch), which count in nothing."""
    stage = run.cfg.stage
    if stage in ("sft", "pt"):
        return tuning.loss_sum(run.score, batch), {}
    if stage == "dpo":
        return _dpo(run, batch)
    return _kto(run, batch, totals, weight)


def _dpo(run: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    cfg = run.cfg
    logps, lens = tuning.completion_logps(run.score, batch)
    c, r = logps.chunk(2)
    lc, lr = lens.chunk(2)
    ref_c = ref_r = None
    if cfg.pref_loss not in preference.REFERENCE_FREE:
        ref_c, ref_r = _ref_logps(run, batch, batch.get("ref")).chunk(2)
    out = preference.pair_loss(cfg.pref_loss, cfg.pref_beta, c, r, lc, lr, ref_c, ref_r, ftx=cfg.pref_ftx,
                               simpo_gamma=cfg.simpo_gamma, label_smoothing=cfg.dpo_label_smoothing)  # fmt: skip
    metrics = {k: v * len(c) for k, v in preference.pair_metrics(out, c, r).items()}  # means -> sums
    return out.losses.sum(), metrics


def _kto(run: Any, batch: dict[str, Any], totals: tuple[int, int] | None,
         weight: float = 1.0) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    import torch

    from exporter import distributed

    cfg, good, bad = run.cfg, batch["desirable"], batch["undesirable"]  # index tensors: no device sync
    logps, lens = tuning.completion_logps(run.score, batch)
    with tuning.without_grad(run.model):
        kl_logps = tuning.completion_logps(run.plain, batch["kl"])[0]
    ref = _ref_logps(run, batch, batch.get("ref"))
    ref_kl = _ref_logps(run, batch["kl"], batch.get("ref_kl"))
    # the KL baseline: the mean over the global micro-batch's rows, clamped at 0 (TRL's estimate); as a sum and a count
    # over the ranks, so that a batch the ranks split unevenly (2 rows and 1) equals one process (TRL, and this
    # before, averaged each process's mean); a rank's stand-in rows count in neither
    diff = (kl_logps - ref_kl).detach()
    kl = distributed.all_sum(run.dist, torch.stack([diff.sum(), diff.new_tensor(float(len(diff)))]) * weight)
    kl = (kl[0] / kl[1].clamp(min=1)).clamp(min=0)
    out = preference.kto_loss(logps[good], logps[bad], kl_logps, ref[good], ref[bad], ref_kl, cfg.pref_beta,
                              cfg.kto_chosen_weight, cfg.kto_rejected_weight, kl=kl)  # fmt: skip
    loss = out.losses.nanmean() * len(logps)
    n_all, n_good = totals or (len(logps), int(batch["n_desirable"]))
    if cfg.pref_ftx > 0 and n_good:
        # LLaMA-Factory's SFT term for KTO, ftx * mean(chosen NLL) / n_good * n, taken over the whole global step
        # (n, n_good: its counts) so that accumulation and several processes equal one batch: as a sum over this
        # batch's chosen answers, scaled by n (the loop divides by n)
        chosen_avg = logps[good] / lens[good].clamp(min=1)
        loss = loss + cfg.pref_ftx * (-chosen_avg).nansum() * (n_all / n_good) ** 2
    metrics = {"rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
               "logps/chosen": logps[good].detach().sum(), "logps/rejected": logps[bad].detach().sum(),
               "kl": kl}  # fmt: skip
    return loss, metrics


def metric_counts(stage: str, batch: dict[str, Any], n_units: int) -> dict[str, float]:
    """How many units each metric sum of a micro-batch covers (host-side counts)."""
    if stage == "dpo":
        return dict.fromkeys(PAIR_METRICS, n_units)
    if stage == "kto":
        good = int(batch["n_desirable"])
        bad = n_units - good
        return {"rewards/chosen": good, "rewards/rejected": bad, "logps/chosen": good, "logps/rejected": bad, "kl": 1}
    return {}


def finish_metrics(stage: str, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """Averages of the summed metrics (keys with no count left out); KTO's margin is the difference of means."""
    out = {k: round(sums[k] / counts[k], 6) for k in sums if counts.get(k)}
    if stage == "kto" and "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = round(out["rewards/chosen"] - out["rewards/rejected"], 6)
    return out


def reference_logps(run: Any, items: list[Any]) -> None:
    """Freeze/full tuning of dpo/kto: the initial model's log-probs of every example, once, before training (stored
    on the examples as `ref`). Each rank scores its rows of the same batches (equal forwards on every rank, as
    sharded engines need) and a sum over the ranks gives everyone all of them."""
    import torch

    from exporter.distributed import all_sum, rows

    d, bs, stage = run.dist, run.cfg.per_device_eval_batch_size * run.dist.world, run.cfg.stage
    found = torch.zeros(len(items), 2, dtype=torch.float64, device=run.device)
    with tuning.without_grad(run.model):
        for s in range(0, len(items), bs):
            idx = rows(d, list(range(s, min(s + bs, len(items)))))
            b = run.to_device(collate(stage, [items[i] for i in idx or [s]], run.prep.pad_id))
            if stage == "dpo":
                pair = torch.stack(tuning.completion_logps(run.plain, b)[0].chunk(2), dim=1)
            else:
                pair = torch.stack([tuning.completion_logps(run.plain, b)[0],
                                    tuning.completion_logps(run.plain, b["kl"])[0]], dim=1)  # fmt: skip
            if idx:
                found[idx] = pair.double()
    for e, (a, b2) in zip(items, all_sum(d, found).tolist(), strict=True):
        e.ref = (a, b2)
