"""Preference losses as plain functions on sequence log-probabilities: DPO (`sigmoid`, `hinge`, `ipo`), the
reference-free `orpo` and `simpo`, and KTO — LLaMA-Factory's `pref_loss` / `stage: kto` keys with TRL's formulas.

Inputs are per-sequence sums of the completion's token log-probabilities (`sequence_logps`) and their token counts;
every function returns per-sequence losses and the detached rewards TRL logs. The tests hold each one equal to TRL
(`DPOTrainer`, `ORPOTrainer.odds_ratio_loss`, `CPOTrainer.cpo_loss` with `loss_type="simpo"`, `KTOTrainer`) on a
fixed batch: loss, rewards and gradients.

Where LLaMA-Factory and TRL name the same thing differently, LLaMA-Factory's keys win (they are what users write):
`pref_ftx` adds `pref_ftx * (-mean log-prob per token of the chosen answer)` per pair, and ORPO's NLL term is that
same per-sequence mean (TRL's ORPOTrainer averages over all chosen tokens of the batch instead; equal when the
chosen answers have the same length).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

IGNORE = -100

DPO_LOSSES = ("sigmoid", "hinge", "ipo")  # with a reference model
REFERENCE_FREE = ("orpo", "simpo")
PREF_LOSSES = DPO_LOSSES + REFERENCE_FREE


@dataclasses.dataclass
class PrefOut:
    """Per-sequence losses (differentiable) and the detached rewards of the chosen and rejected answers."""

    losses: Any
    chosen_rewards: Any
    rejected_rewards: Any
    kl: Any = None  # KTO's detached KL estimate


def token_logps(logits: Any, targets: Any) -> Any:
    """log p(target) per position from logits [N, V] (computed in fp32) and targets [N]."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logps(per_token: Any, rows: Any, n_rows: int) -> tuple[Any, Any]:
    """(sum of log-probs, token count) per row, from the log-probs of the trained positions and their row index."""
    import torch

    sums = torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    counts = torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, torch.ones_like(per_token)
    )
    return sums, counts


def dpo_loss(
    chosen: Any,
    rejected: Any,
    ref_chosen: Any,
    ref_rejected: Any,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_len: Any = None,
    rejected_len: Any = None,
    label_smoothing: float = 0.0,
) -> PrefOut:
    """DPO against a reference on summed log-probs: `sigmoid` (the paper's; with `label_smoothing` the
    conservative cDPO), `hinge` (SLiC), `ipo` (squared, on the per-token means of the log-ratios: lengths are
    needed). Rewards are beta * summed log-ratios (TRL)."""
    import torch
    import torch.nn.functional as F

    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo needs the completion lengths")
        delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    return PrefOut(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def orpo_loss(chosen_avg: Any, rejected_avg: Any, beta: float) -> PrefOut:
    """ORPO on per-token mean log-probs: NLL of the chosen answer + beta * -log sigmoid(log odds ratio)."""
    import torch
    import torch.nn.functional as F

    chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()

    def log1mexp(x: Any) -> Any:  # log(1 - exp(x)) for x < 0, stable at both ends
        return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return PrefOut(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def simpo_loss(chosen_avg: Any, rejected_avg: Any, beta: float, gamma: float) -> PrefOut:
    """SimPO on per-token mean log-probs: -log sigmoid(beta * (chosen - rejected) - gamma)."""
    import torch.nn.functional as F

    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg - gamma / beta))
    return PrefOut(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def kto_loss(
    chosen: Any,
    rejected: Any,
    kl_logps: Any,
    ref_chosen: Any,
    ref_rejected: Any,
    ref_kl_logps: Any,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: Any = None,
) -> PrefOut:
    """KTO (paper eq. 7) on summed log-probs of desirable (`chosen`) and undesirable (`rejected`) answers.

    The KL baseline is the mean policy-minus-reference log-ratio on mismatched prompt/answer pairs, detached and
    clamped at 0; pass `kl` to use one already averaged over processes. `losses` holds the weighted desirable losses
    followed by the undesirable ones (their mean is the loss)."""
    import torch

    if kl is None:
        kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_ratio))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return PrefOut(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), kl)


def pair_loss(
    loss_type: str,
    beta: float,
    chosen: Any,
    rejected: Any,
    chosen_len: Any,
    rejected_len: Any,
    ref_chosen: Any = None,
    ref_rejected: Any = None,
    ftx: float = 0.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PrefOut:
    """One `pref_loss` on summed log-probs and lengths, plus LLaMA-Factory's `pref_ftx` SFT term."""
    chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    if loss_type == "orpo":
        out = orpo_loss(chosen_avg, rejected_avg, beta)
    elif loss_type == "simpo":
        out = simpo_loss(chosen_avg, rejected_avg, beta, simpo_gamma)
    else:
        out = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, chosen_len, rejected_len, label_smoothing
        )
    if ftx > 0:
        out.losses = out.losses - ftx * chosen_avg
    return out


def pair_metrics(out: PrefOut, chosen: Any, rejected: Any) -> dict[str, Any]:
    """TRL's logged preference metrics (tensors: the caller averages them over log steps and processes)."""
    c, r = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "rewards/margins": (c - r).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }


# ------------------------------------------------------------------ examples


@dataclasses.dataclass
class PairExample:
    """A prompt with its chosen and rejected answers (labels only on the answer)."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    ref: tuple[float, float] | None = None  # the reference's summed log-probs (chosen, rejected), when precomputed


@dataclasses.dataclass
class KTOExample:
    """A prompt with one answer and whether it is desirable, plus the KL pair: the same prompt with the answer of
    the previous example (TRL's and LLaMA-Factory's mismatched pairs)."""

    input_ids: list[int]
    labels: list[int]
    kl_ids: list[int]
    kl_labels: list[int]
    desirable: bool
    ref: tuple[float, float] | None = None  # the reference's summed log-probs (answer, KL pair), when precomputed


Encode = Callable[[list[dict[str, Any]], Any], tuple[list[int], list[int]]]  # (conversation, tools) -> ids, labels
Chat = Callable[[Any, bool], tuple[list[dict[str, Any]], Any]]  # (sample, rejected) -> (conversation, tools)


def hf_chat(sample: Any, rejected: bool) -> tuple[list[dict[str, Any]], Any]:
    """A sample as HF-style messages ending with its chosen (or rejected) answer, and its parsed tools."""
    return sample.chat(rejected=rejected), sample.tool_list()


def last_answer(labels: list[int]) -> int | None:
    """Where the last trained run (the final answer and its end-of-turn token) starts; None without one."""
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE):
            return i
    return None


def cut_answer(ids: list[int], labels: list[int], start: int, width: int, cutoff: int) -> tuple[list[int], list[int]]:
    """Prompt `ids[:start]` (untrained, earlier answers included) + the answer, cut to `cutoff` with
    LLaMA-Factory's prompt/answer split for an answer budget of `width` tokens (the longer answer of a pair)."""
    from exporter.lf_templates import seqlen

    n_prompt, n_answer = seqlen(start, width, cutoff)
    return ids[:n_prompt] + ids[start : start + n_answer], [IGNORE] * n_prompt + labels[start : start + n_answer]


def _encoded(
    encode: Encode, messages: list[dict[str, Any]], tools: Any, sample: Any
) -> tuple[list[int], list[int], int | None]:
    from exporter.errors import UserError

    try:
        ids, labels = encode(messages, tools)
    except UserError as e:
        raise UserError(f"{sample.where}: {e}") from None
    return list(ids), list(labels), last_answer(list(labels))


def encode_pairs(samples: list, encode: Encode, cutoff: int, drops: Any, chat: Chat = hf_chat) -> list[PairExample]:
    """Preference samples (data.Sample with `rejected`) -> PairExample; both answers get the same budget."""
    out = []
    for s in samples:
        c_ids, c_labels, c_start = _encoded(encode, *chat(s, False), s)
        r_ids, r_labels, r_start = _encoded(encode, *chat(s, True), s)
        if c_start is None or r_start is None:
            drops.add("preference pairs with an answer that has no trained token", s.where)
            continue
        width = max(len(c_ids) - c_start, len(r_ids) - r_start)
        chosen = cut_answer(c_ids, c_labels, c_start, width, cutoff)
        rejected = cut_answer(r_ids, r_labels, r_start, width, cutoff)
        if not _trained(chosen[1]) or not _trained(rejected[1]):
            drops.add("preference pairs with no answer token left within cutoff_len", s.where)
            continue
        out.append(PairExample(*chosen, *rejected))
    return out


def encode_kto(samples: list, encode: Encode, cutoff: int, drops: Any, chat: Chat = hf_chat) -> list[KTOExample]:
    """KTO samples (data.Sample with `kto_tag`) -> KTOExample, each with its KL pair: the previous sample's answer,
    the last sample's for the first (LLaMA-Factory's, per map batch: `examples.prepare` passes one batch)."""
    out = []
    for k, s in enumerate(samples):
        messages, tools = chat(s, False)
        ids, labels, start = _encoded(encode, messages, tools, s)
        kl = messages[:-1] + chat(samples[k - 1], False)[0][-1:]
        kl_ids, kl_labels, kl_start = _encoded(encode, kl, tools, s)
        if start is None or kl_start is None:
            drops.add("samples with an answer that has no trained token", s.where)
            continue
        main = cut_answer(ids, labels, start, len(ids) - start, cutoff)
        kl = cut_answer(kl_ids, kl_labels, kl_start, len(kl_ids) - kl_start, cutoff)
        if not _trained(main[1]):  # a KL pair may keep no answer token (LLaMA-Factory's cut): it adds zero
            drops.add("samples with no answer token left within cutoff_len", s.where)
            continue
        out.append(KTOExample(*main, *kl, bool(s.kto_tag)))
    return out


def _trained(labels: list[int]) -> bool:
    return any(x != IGNORE for x in labels[1:])
