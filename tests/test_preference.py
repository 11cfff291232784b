"""Preference losses against TRL (the reference): DPO sigmoid/hinge/ipo through `DPOTrainer._compute_loss`, KTO
through `KTOTrainer._compute_loss`, ORPO and SimPO through `ORPOTrainer.odds_ratio_loss` / `CPOTrainer.cpo_loss`
on TRL's own log-probs: same loss, rewards and gradients on a fixed batch."""

from __future__ import annotations

import logging
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from exporter import examples as E
from exporter import preference as P
from exporter import tuning

trl = pytest.importorskip("trl", reason="trl (the preference-loss reference) is in the dev extra")

BETA = 0.25
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("trl").setLevel(logging.ERROR)


def _batch(n_pairs: int, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids for n_pairs (chosen rows, then rejected rows), right padding, prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n_pairs
    ids = torch.randint(5, 200, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    for r in range(rows):
        pad = (r * 3) % 3  # 0..2 padded positions
        prompt = 2 + r % 3
        if pad:
            mask[r, -pad:] = 0
        completion[r, prompt : length - pad] = 1
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, E.IGNORE)


def _our_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our summed completion log-probs and lengths per row, through exporter's collate and training forward."""
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], _labels(batch), strict=True):
        n = int(mask.sum())
        rows.append(E.Example(ids[:n].tolist(), labels[:n].tolist()))
    return tuning.completion_logps(tuning.scorer(model), E.collate(rows, pad_id=0))


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_equal(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys() and ours
    for name in ref:
        # fp32 summation order differs (fused vs full-vocabulary head): compare at the tensor's own scale
        scale = float(ref[name].abs().max())
        assert float((ours[name] - ref[name]).abs().max()) <= 2e-5 * scale + 1e-9, name


def _peft(tiny_model):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("qwen2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the policy differs from the reference from the start
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return model, AutoTokenizer.from_pretrained(path), lora


@pytest.fixture(scope="module")
def dpo_trainer(tiny_model, tmp_path_factory):
    _quiet()
    from datasets import Dataset

    model, tok, lora = _peft(tiny_model)
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-dpo")), beta=BETA, report_to="none", per_device_train_batch_size=2,
        use_cpu=True, gradient_checkpointing=False, bf16=False, disable_tqdm=True,
    )  # fmt: skip
    ds = Dataset.from_list([{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 2)
    tr = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    tr.model.train()
    return tr


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("ftx", [0.0, 0.5])
def test_dpo_equals_trl(dpo_trainer, loss_type: str, ftx: float) -> None:
    tr, model = dpo_trainer, dpo_trainer.model
    batch = _batch(3)
    tr.loss_types, tr.loss_weights = [loss_type], [1.0]
    tr._metrics["train"].clear()
    model.zero_grad(set_to_none=True)
    ref_loss = tr._compute_loss(model, batch, False)
    if ftx:  # LLaMA-Factory's pref_ftx: + ftx * mean over pairs of the chosen answer's per-token NLL
        labels = _labels(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))[..., 0]
        keep = (labels[:, 1:] != E.IGNORE).float()
        avg = (lp * keep).sum(-1) / keep.sum(-1)
        ref_loss = ref_loss + ftx * (-avg[:3]).mean()
    ref_loss.backward()
    ref_grads = _grads(model)
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}

    logps, lens = _our_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref_logps, _ = _our_logps(model, batch)
    c, r = logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    lc, lr = lens.chunk(2)
    out = P.pair_loss(loss_type, BETA, c, r, lc, lr, rc, rr, ftx=ftx)
    loss = out.losses.mean()
    loss.backward()

    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_equal(_grads(model), ref_grads)
    ours = {k: float(v) for k, v in P.pair_metrics(out, c, r).items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert ours[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key


def _trl_avg_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_equal_trl(loss_type: str) -> None:
    """ORPO's odds-ratio term and rewards from TRL's ORPOTrainer, SimPO from CPOTrainer(loss_type=simpo), both on
    TRL's per-token mean log-probs; the ORPO NLL term is LLaMA-Factory's per-pair mean (see exporter.preference)."""
    _quiet()
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(3)
    n, length, vocab = 4, 8, 200
    logits = (torch.randn(2 * n, length, vocab) * 2).requires_grad_(True)
    batch = _batch(n, length, seed=4)
    labels = _labels(batch)
    stub = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0,
                           loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.0)  # fmt: skip

    avg = _trl_avg_logps(logits, labels)
    c_avg, r_avg = avg.chunk(2)
    if loss_type == "orpo":
        ratio_terms, c_rew, r_rew, _, _ = ORPOTrainer.odds_ratio_loss(stub, c_avg, r_avg)
        ref_loss = -c_avg.mean() - ratio_terms.mean()
    else:
        losses, c_rew, r_rew = CPOTrainer.cpo_loss(stub, c_avg, r_avg)
        ref_loss = losses.mean()
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)

    keep = labels[:, 1:] != E.IGNORE
    rows = keep.nonzero()[:, 0]
    per_token = P.token_logps(logits[:, :-1][keep], labels[:, 1:][keep])
    sums, lens = P.sequence_logps(per_token, rows, 2 * n)
    c, r = sums.chunk(2)
    lc, lr = lens.chunk(2)
    out = P.pair_loss(loss_type, BETA, c, r, lc, lr, simpo_gamma=0.7)
    loss = out.losses.mean()
    (grad,) = torch.autograd.grad(loss, logits)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(out.chosen_rewards, c_rew)
    torch.testing.assert_close(out.rejected_rewards, r_rew)


def test_cdpo_label_smoothing_equals_trl() -> None:
    """dpo_label_smoothing (cDPO) is TRL's label-smoothed sigmoid (CPOTrainer's formula on the log-ratio margin)."""
    _quiet()
    from trl.experimental.cpo import CPOTrainer

    torch.manual_seed(5)
    c, r, rc, rr = (torch.randn(6, dtype=torch.float64) * 3 for _ in range(4))
    c.requires_grad_(True)
    stub = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0,
                           loss_type="sigmoid", simpo_gamma=0.0, label_smoothing=0.2)  # fmt: skip
    ref, _, _ = CPOTrainer.cpo_loss(stub, c - rc, r - rr)
    out = P.dpo_loss(c, r, rc, rr, BETA, "sigmoid", label_smoothing=0.2)
    torch.testing.assert_close(out.losses, ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), c)
    (g,) = torch.autograd.grad(out.losses.sum(), c)
    torch.testing.assert_close(g, g_ref)


@pytest.fixture(scope="module")
def kto_trainer(tiny_model, tmp_path_factory):
    _quiet()
    from datasets import Dataset

    model, tok, lora = _peft(tiny_model)
    args = trl.KTOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-kto")), beta=BETA, report_to="none", per_device_train_batch_size=2,
        use_cpu=True, gradient_checkpointing=False, bf16=False, disable_tqdm=True, desirable_weight=1.0,
        undesirable_weight=1.5,
    )  # fmt: skip
    ds = Dataset.from_list([{"prompt": "hi", "completion": "a", "label": True}, {"prompt": "yo", "completion": "b",
                                                                               "label": False}])  # fmt: skip
    tr = trl.KTOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    tr.model.train()
    return tr


def test_kto_equals_trl(kto_trainer) -> None:
    tr, model = kto_trainer, kto_trainer.model
    main, kl = _batch(3, seed=5), _batch(3, seed=6)
    tags = torch.tensor([True, False, True, True, False, False])
    inputs = {**main, "label": tags, **{f"KL_{k}": v for k, v in kl.items()}}
    tr._metrics["train"].clear()
    model.zero_grad(set_to_none=True)
    ref_loss = tr._compute_loss(model, inputs, False)
    ref_loss.backward()
    ref_grads = _grads(model)
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}

    logps, _ = _our_logps(model, main)
    with torch.no_grad():
        kl_logps, _ = _our_logps(model, kl)
        with model.disable_adapter():
            ref_logps, _ = _our_logps(model, main)
            ref_kl, _ = _our_logps(model, kl)
    out = P.kto_loss(logps[tags], logps[~tags], kl_logps, ref_logps[tags], ref_logps[~tags], ref_kl, BETA, 1.0, 1.5)
    loss = out.losses.nanmean()
    loss.backward()

    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_equal(_grads(model), ref_grads)
    assert float(out.kl) == pytest.approx(metrics["kl"], rel=1e-5, abs=1e-7)
    assert float(out.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], rel=1e-5)
    assert float(out.rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"], rel=1e-5)


def test_orpo_of_near_certain_answers_equals_trl_in_float64() -> None:
    """Per-token mean log-probs near 0 (answers the model is sure of): the float32 ORPO loss stays finite and equals
    TRL's odds-ratio loss computed in float64 (log(1 - exp(x)) loses everything in float32 there)."""
    _quiet()
    from trl.experimental.orpo import ORPOTrainer

    c64 = torch.tensor([-1e-9, -1e-6, -1e-4, -0.3, -2.0], dtype=torch.float64)
    r64 = torch.tensor([-2e-9, -3e-7, -2.0, -1e-5, -0.7], dtype=torch.float64)
    stub = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_terms, c_rew, r_rew, _, _ = ORPOTrainer.odds_ratio_loss(stub, c64, r64)
    out = P.orpo_loss(c64.float(), r64.float(), BETA)
    assert torch.isfinite(out.losses).all(), out.losses
    torch.testing.assert_close(out.losses.double(), -c64 - ratio_terms, rtol=1e-4, atol=1e-9)
