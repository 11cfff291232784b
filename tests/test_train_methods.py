"""exporter train beyond plain LoRA SFT: preference stages (dpo, kto), QLoRA through merge and verify, freeze tuning,
neat packing, and several processes (torchrun: DDP, FSDP2; DeepSpeed where installed) against one process."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import trainer_log
from test_train_dtype_lf import fp32_copy

from exporter import examples as E
from exporter import lf_args
from exporter import train as T
from exporter.errors import UserError
from exporter.manifest import MANIFEST_NAME

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

WORDS = "apple river stone cloud green music table light quiet storm bread paper".split()


@pytest.fixture(scope="module")
def pdata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pairwise set (chosen = the prompt's words repeated, rejected = other words), its KTO form, and SFT rows."""
    d = tmp_path_factory.mktemp("pref")
    rng = random.Random(0)
    pairs = []
    for _ in range(32):
        q = " ".join(rng.choice(WORDS) for _ in range(4))
        other = " ".join(rng.choice(WORDS) for _ in range(4))
        pairs.append({"instruction": f"Repeat: {q}", "input": "", "chosen": q, "rejected": other})
    kto = [{"instruction": p["instruction"], "output": p["chosen"] if i % 2 == 0 else p["rejected"], "tag": i % 2 == 0}
           for i, p in enumerate(pairs)]  # fmt: skip
    sft = [{"instruction": p["instruction"], "output": p["chosen"]} for p in pairs]
    for name, rows in (("pairs", pairs), ("kto", kto), ("sft", sft)):
        (d / f"{name}.json").write_text(json.dumps(rows))
    info = {
        "pairs": {"file_name": "pairs.json", "ranking": True,
                  "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "kto.json", "columns": {"prompt": "instruction", "response": "output", "kto_tag": "tag"}},
        "sft": {"file_name": "sft.json"},
    }  # fmt: skip
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def _cfg(model: Path, data: Path, out: Path, **kw) -> lf_args.TrainConfig:
    base = dict(
        model_name_or_path=str(model), output_dir=str(out), dataset=["sft"], dataset_dir=str(data), template="qwen",
        per_device_train_batch_size=4, learning_rate=5e-3, max_steps=4, logging_steps=1, save_steps=1000,
        disable_gradient_checkpointing=True,
    )  # fmt: skip
    base.update(kw)
    return lf_args.TrainConfig(**base)


# ------------------------------------------------------------------ preference stages


@pytest.mark.parametrize(("pref_loss", "finetuning_type"), [("sigmoid", "lora"), ("simpo", "lora"),
                                                           ("sigmoid", "freeze")])  # fmt: skip
def test_dpo_reward_accuracy_rises(tiny: Path, pdata: Path, tmp_path: Path, pref_loss: str,
                                   finetuning_type: str) -> None:  # fmt: skip
    cfg = _cfg(tiny, pdata, tmp_path / "o", stage="dpo", dataset=["pairs"], pref_loss=pref_loss, max_steps=14,
               logging_steps=2, finetuning_type=finetuning_type, plot_loss=True,
               learning_rate=5e-3 if finetuning_type == "lora" else 1e-3)  # fmt: skip
    out = T.train(cfg).out
    log = trainer_log(out)
    if pref_loss == "sigmoid":  # step 1: the policy is the reference, so the loss is -log sigmoid(0) = log 2
        first = T.train(_cfg(tiny, pdata, tmp_path / "first", stage="dpo", dataset=["pairs"], max_steps=1,
                             finetuning_type=finetuning_type)).out  # fmt: skip
        assert trainer_log(first)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert trainer_log(first)[0]["rewards/accuracies"] == 0.0  # equal rewards are not "chosen > rejected"
        assert trainer_log(first)[0]["accuracy"] == 0.0  # LLaMA-Factory's name for it in trainer_log.jsonl
    assert log[-1]["rewards/accuracies"] > 0.5 and log[-1]["rewards/margins"] > 0
    assert log[-1]["loss"] < log[0]["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in log[-1]
    assert (out / "training_rewards_accuracies.png").is_file() and (out / "training_loss.png").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert "rewards/accuracies" in state["log_history"][-2]  # where LLaMA-Factory's plots read it
    assert "train_loss" in state["log_history"][-1]  # HF's training summary ends it
    assert (out / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors")).is_file()


def test_kto_margin_rises_with_eval(tiny: Path, pdata: Path, tmp_path: Path) -> None:
    # val_size 5: LLaMA-Factory's split (seed 42) puts rows 31, 19, 7, 27 (undesirable) and 26 (desirable) in eval
    cfg = _cfg(tiny, pdata, tmp_path / "o", stage="kto", dataset=["kto"], max_steps=12, logging_steps=3,
               val_size=5, eval_strategy="steps", eval_steps=12, kto_rejected_weight=1.2)  # fmt: skip
    out = T.train(cfg).out
    log = trainer_log(out)
    train_lines = [r for r in log if "loss" in r]
    assert train_lines[-1]["rewards/margins"] > 0 and train_lines[-1]["rewards/chosen"] > 0
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert train_lines[0]["kl"] >= 0
    ev = [r for r in log if "eval_loss" in r]
    assert ev and {"eval_rewards/chosen", "eval_rewards/rejected", "eval_kl"} <= set(ev[-1])
    assert "eval_loss" in json.loads((out / "all_results.json").read_text())


# ------------------------------------------------------------------ QLoRA


@pytest.mark.slow
def test_qlora_trains_merges_into_16bit_base_and_verifies(tiny: Path, pdata: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from conftest import require_llama_cpp, require_quant, trainer_log

    require_quant()
    require_llama_cpp()
    from exporter import gguf, merge, templates
    from exporter import verify as V

    out = T.train(_cfg(tiny, pdata, tmp_path / "qlora", quantization_bit=4, max_steps=10, logging_steps=2,
                       learning_rate=1e-2)).out  # fmt: skip
    err = capsys.readouterr().err
    assert "QLoRA: base quantized to 4-bit by bitsandbytes at load (nf4, double quantization" in err
    losses = [r["loss"] for r in trainer_log(out)]
    assert losses[-1] < losses[0] - 1.0
    manifest = json.loads((out / "exporter_manifest.json").read_text())
    assert manifest["settings"]["quantization_bit"] == 4
    # the adapter reloads like any other: PEFT on the 16-bit base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
    merged = merge.merge(merge.MergeOptions(str(tiny), [str(out)], str(tmp_path / "merged"))).out
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "trained with QLoRA on a 4-bit nf4 quantization of its base; merging it into the original 16-bit" in err
    res = gguf.export(merged, ["f16"], templates.resolve(merged, "qwen"), tmp_path / "gguf")
    rep = V.verify(V.VerifyOptions(base=tiny, adapter=out, merged=merged, ggufs=[res.files["f16"]],
                                   modelfiles=[res.modelfiles["f16"]], prompts=2, max_new_tokens=8, ctx=64,
                                   max_windows=3))  # fmt: skip
    assert rep.passed, [(c.check, c.target, c.detail) for c in rep.failures]
    quantized = tmp_path / "q"  # merging into quantized weights is refused
    shutil.copytree(tiny, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(UserError, match="is a quantized model .bitsandbytes.: merge into the original 16-bit base"):
        merge.merge(merge.MergeOptions(str(quantized), [str(out)], str(tmp_path / "m2")))


def test_qlora_8bit_steps(tiny: Path, pdata: Path, tmp_path: Path) -> None:
    from conftest import require_quant

    require_quant()
    out = T.train(_cfg(tiny, pdata, tmp_path / "q8", quantization_bit=8, max_steps=3)).out
    assert (out / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(r["loss"]) for r in trainer_log(out))


def test_qlora_keys_reach_bitsandbytes(tiny: Path, pdata: Path, tmp_path: Path) -> None:
    """quantization_type, double_quantization and the compute dtype as bitsandbytes holds them on the loaded base."""
    from conftest import require_quant

    require_quant()
    from exporter import tuning

    for qtype, double, bf16 in (("fp4", False, True), ("nf4", True, False)):
        cfg = _cfg(tiny, pdata, tmp_path, quantization_bit=4, quantization_type=qtype, double_quantization=double,
                   bf16=bf16)  # fmt: skip
        model = tuning.load_model(cfg, tiny, "cpu")
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        state = q_proj.base_layer.weight.quant_state
        assert (state.quant_type, state.nested) == (qtype, double)
        assert q_proj.base_layer.compute_dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert q_proj.lora_A["default"].weight.dtype == torch.float32  # trainable weights upcast, like LLaMA-Factory


# ------------------------------------------------------------------ freeze tuning, neat packing


def test_freeze_trains_the_named_modules_of_the_last_layers(tiny: Path, pdata: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _cfg(tiny, pdata, tmp_path / "f", finetuning_type="freeze", freeze_trainable_layers=1,
               freeze_trainable_modules=["mlp"], freeze_extra_modules=["norm"], learning_rate=1e-3)  # fmt: skip
    out = T.train(cfg).out
    before = load_file(tiny / "model.safetensors")
    after = load_file(out / "model.safetensors")
    n_layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    expected = {k for k in before if k.startswith(f"model.layers.{n_layers - 1}.mlp.")} | {"model.norm.weight"}
    assert changed == expected
    with pytest.raises(UserError, match="freeze_trainable_modules: no module 'mpl' in a decoder layer"):
        T.train(_cfg(tiny, pdata, tmp_path / "g", finetuning_type="freeze", freeze_trainable_modules=["mpl"]))


def test_neat_packing_keeps_examples_apart(tiny: Path, pdata: Path) -> None:
    """A neat-packed row scores each example as if it were alone (reference: transformers' forward per example)."""
    from transformers import AutoModelForCausalLM

    from exporter import tuning

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    rng = random.Random(1)
    exs = [E.Example(ids := [rng.randrange(5, 300) for _ in range(n)], [-100] * 2 + ids[2:]) for n in (7, 5, 9, 4)]
    packed = E.pack_sft(exs, cutoff=30, neat=True)
    assert len(packed) == 1 and packed[0].segments == [9, 7, 5, 4]  # LLaMA-Factory's order: the longest first
    batch = E.collate(packed + [E.Example(exs[0].input_ids, exs[0].labels)], pad_id=0)  # a padded second row
    assert batch["attention_mask"] is None and batch["position_ids"][0].tolist()[:10] == [*range(9), 0]
    with torch.no_grad():
        ours, n = tuning.completion_logps(tuning.scorer(model), batch)
        ref = 0.0
        for e in exs:
            ids = torch.tensor([e.input_ids])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            ref += float(lp[torch.arange(1, len(e.input_ids)) - 1, ids[0, 1:]][1:].sum())
    assert float(ours[0]) == pytest.approx(ref, rel=1e-5)
    plain = E.collate(E.pack_sft(exs, cutoff=30), pad_id=0)  # plain packing attends across examples
    with torch.no_grad():
        crossed = tuning.completion_logps(tuning.scorer(model), plain)[0]
    assert abs(float(crossed[0]) - ref) > 1e-3


# ------------------------------------------------------------------ several processes


# Runs `exporter train` as `-m exporter` does, and at interpreter exit (after every atexit handler of the run) writes
# the names of the process's threads: a process group that outlives the run keeps gloo's threads into interpreter
# finalization, where a rank can abort ("terminate called without an active exception") after a finished run.
_EXIT_PROBE = """import atexit, os, sys
out, sys.argv = sys.argv[1], ["exporter", *sys.argv[2:]]
def names():
    with open(os.path.join(out, "threads-" + os.environ["RANK"]), "w") as f:
        f.write(" ".join(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
atexit.register(names)
{before}
from exporter.cli import main
main()
"""


# The most tensor bytes one object collective (gather_object, scatter_object_list, ...) was handed on this rank, written
# at exit as carried-<rank>: state sent through one passes whole through rank 0's memory (under NCCL, its GPU's).
_CARRIED = """import torch, torch.distributed as dist
carried = [0]
def _bytes(o):
    if isinstance(o, torch.Tensor):
        return o.numel() * o.element_size()
    if isinstance(o, dict):
        return sum(_bytes(v) for v in o.values())
    return sum(_bytes(v) for v in o) if isinstance(o, (list, tuple)) else 0
def _watch(real):
    def call(*a, **k):
        carried[0] = max(carried[0], _bytes([a, k]))
        return real(*a, **k)
    return call
for name in ("gather_object", "scatter_object_list", "broadcast_object_list", "all_gather_object"):
    setattr(dist, name, _watch(getattr(dist, name)))
atexit.register(lambda: open(os.path.join(out, "carried-" + os.environ["RANK"]), "w").write(str(carried[0])))
"""


def _carried(tmp_path: Path, n: int = 2) -> int:
    return max(int((tmp_path / f"carried-{r}").read_text()) for r in range(n))


# a CPU without AVX512-FP16 emulates fp16 (59x slower than fp32), which exporter refuses; told it has it, it runs the
# GPU's fp16 path
_CPU_FP16 = "import exporter.lf_args\nexporter.lf_args.cpu_has_fp16 = lambda: True"


def _torchrun(n: int, args: list[str], tmp_path: Path, fails: bool = False, before: str = "") -> str:
    """Run under torchrun; every rank must exit 0 (`fails`: a rank must exit 2 with a one-line error instead), with
    no gloo thread left at interpreter exit; `before`: code each rank runs first. Returns what the ranks printed
    (stdout, then stderr)."""
    env = dict(os.environ, EXPORTER_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    probe = tmp_path / "exit_probe.py"
    probe.write_text(_EXIT_PROBE.replace("{before}", before))
    for old in tmp_path.glob("threads-*"):
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), str(probe),
           str(tmp_path), "train", *args]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    if fails:
        assert p.returncode != 0 and "exitcode  : 2" in p.stderr, p.stderr[-3000:]
    else:
        assert p.returncode == 0, p.stderr[-3000:]
    if sys.platform == "linux":  # after a failure torchrun may stop a rank before its exit: the ranks that got there
        left = {r: (tmp_path / f"threads-{r}").read_text() for r in range(n) if (tmp_path / f"threads-{r}").exists()}
        assert left if fails else len(left) == n, left
        assert not any("gloo" in names for names in left.values()), left
    return p.stderr if fails else p.stdout + p.stderr


@pytest.fixture(scope="session")
def tiny32(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qwen2 fixture in fp32: the base of runs compared across batch layouts (`fp32_copy`)."""
    return fp32_copy(tiny, tmp_path_factory.mktemp("tiny32"))


def _flags(**kw) -> list[str]:
    return [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def _one_process(flags: list[str]) -> Path:
    cfg, given = lf_args.config_from_args(flags)
    return T.train(cfg, given).out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "engine"),
    [("dpo", "ddp"), ("kto", "ddp"), ("kto", "ddp-ftx"), ("sft", "fsdp"), ("sft", "fsdp-fp16-full"),
     ("sft", "fsdp-offload")],
)  # fmt: skip
def test_two_processes_equal_one(tiny32: Path, pdata: Path, tmp_path: Path, stage: str, engine: str,
                                 monkeypatch) -> None:  # fmt: skip
    """torchrun --nproc_per_node 2 (gloo) gives one process's loss curve for the same global batch, and one set of
    outputs written by rank 0. fp16 under FSDP: the ranks agree on skipping an overflowing update (each holds only
    its shards' gradients), as one process skips it. Under FSDP only rank 0 reads the weights: rank 1 builds the
    model empty and gets its shards from rank 0 (before, each process loaded the whole model). FSDP's `offload` runs
    on a CPU too (it was a traceback: torch cannot pin memory without a GPU). KTO's pref_ftx term is normalised over
    the global step (it took each micro-batch's own count of desirable answers)."""
    data = {"sft": "sft", "dpo": "pairs", "kto": "kto"}[stage]
    common = _flags(stage=stage, model_name_or_path=tiny32, dataset=data, dataset_dir=pdata, template="qwen",
                    max_steps=4, logging_steps=1, learning_rate=5e-3, gradient_accumulation_steps=2,
                    disable_gradient_checkpointing=True, max_samples=24)  # fmt: skip
    common += _flags(pref_ftx=0.5) if engine.endswith("ftx") else []
    fp16 = engine.endswith("fp16-full")  # whole micro-batches: an early update overflows at the initial scale
    common += ["--fp16", "--finetuning_type", "full", "--gradient_accumulation_steps", "1"] if fp16 else []
    if fp16:  # a CPU may emulate fp16: told it has it, it runs the GPU's path
        monkeypatch.setattr(lf_args, "cpu_has_fp16", lambda: True)
    one = _one_process(common + _flags(per_device_train_batch_size=4, output_dir=tmp_path / "one"))
    offload, engine = engine.endswith("offload"), engine.split("-")[0]
    extra = ["--fsdp", "full_shard offload" if offload else "full_shard"] if engine == "fsdp" else []
    out = _torchrun(2, common + _flags(per_device_train_batch_size=2, output_dir=tmp_path / "two") + extra, tmp_path,
                    before=(_CPU_FP16 + "\n" if fp16 else "") + _LOADED)  # fmt: skip
    assert "Warning" not in out and "WARNING" not in out, out
    for rank in (0, 1):
        held = json.loads((tmp_path / f"loaded-{rank}").read_text())
        assert held and all(h == (w if rank == 0 or engine == "ddp" else 0) for _, h, w in held), (rank, held)
    a, b = trainer_log(one), trainer_log(tmp_path / "two")
    assert [r["current_steps"] for r in b] == [1, 2, 3, 4]  # one log, each step once
    if fp16:  # an update skipped (its lr repeats in the log), by both at the same step
        lrs = [r["lr"] for r in a]
        assert len(set(lrs)) < len(lrs) and [r["lr"] for r in b] == lrs
    # fp16 keeps 11 bits (rounding 4.9e-4 relative), and how the batch is split changes what rounds: with native fp16
    # kernels (AVX512-FP16) 2 processes were 2.1e-4 relative off one at step 3; emulated, within 1e-4
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4, rel=1e-3 if fp16 else 0)
        for key in ("rewards/accuracies", "rewards/margins", "kl"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-4), key
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in one.iterdir())
    settings = json.loads((tmp_path / "two" / "exporter_manifest.json").read_text())["settings"]
    assert settings["processes"] == 2 and settings["engine"] == engine


@pytest.mark.slow
def test_fsdp_trains_a_given_adapter(tiny32: Path, pdata: Path, tmp_path: Path) -> None:
    """`adapter_name_or_path` under FSDP: rank 1, which builds the model empty, takes the adapter's structure without
    copying its weights into meta tensors (torch's no-op warning), gets base and adapter from rank 0, and the run
    continues the adapter as one process does."""
    common = _flags(model_name_or_path=tiny32, dataset="sft", dataset_dir=pdata, template="qwen", max_steps=3,
                    logging_steps=1, learning_rate=5e-3, disable_gradient_checkpointing=True)  # fmt: skip
    first = _one_process(common + _flags(per_device_train_batch_size=4, output_dir=tmp_path / "first"))
    common += _flags(adapter_name_or_path=first)
    one = _one_process(common + _flags(per_device_train_batch_size=4, output_dir=tmp_path / "one"))
    out = _torchrun(2, common + _flags(per_device_train_batch_size=2, output_dir=tmp_path / "two", fsdp="full_shard"),
                    tmp_path, before=_LOADED)  # fmt: skip
    assert "Warning" not in out and "WARNING" not in out, out
    held = json.loads((tmp_path / "loaded-1").read_text())
    assert all(h == 0 for n, h, _ in held if "lora_" not in n) and any("lora_" in n for n, _, _ in held)
    a, b = trainer_log(one), trainer_log(tmp_path / "two")
    assert a[0]["loss"] < trainer_log(first)[0]["loss"]  # it went on from the adapter, not from a new one
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)


def test_fp16_resume_keeps_the_loss_scale(tiny: Path, pdata: Path, tmp_path: Path, monkeypatch) -> None:
    """fp16 (torch's loss scaling; a CPU may emulate fp16: told it has it, it runs the GPU's path): the
    first update overflows at the initial scale and is skipped without moving the lr schedule; the checkpoint keeps
    the backed-off scale, so the resumed run does not start again at 65536 (and skip another update) but continues
    exactly as the run that went on."""
    from safetensors.torch import load_file

    monkeypatch.setattr(lf_args, "cpu_has_fp16", lambda: True)  # as on a GPU, or a CPU with AVX512-FP16
    kw = dict(fp16=True, finetuning_type="full", max_steps=6, save_steps=2)
    a = T.train(_cfg(tiny, pdata, tmp_path / "a", **kw), set()).out
    ckpt = a / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["loss_scale"]["scale"] == 32768.0
    la = trainer_log(a)
    assert [r["lr"] for r in la[:3]] == pytest.approx([5e-3, 5e-3, 5e-3 * 5 / 6])  # step 1 skipped: the lr stayed
    b = T.train(_cfg(tiny, pdata, tmp_path / "b", resume_from_checkpoint=str(ckpt), **kw), set()).out
    for ra, rb in zip(la, trainer_log(b), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4) and rb["lr"] == pytest.approx(ra["lr"], abs=1e-12)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # an edited loss scale: the manifest catches it; without a manifest (an older checkpoint) it is one line too
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["loss_scale"]["scale"] = float("nan")
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    edited = ((False, "the manifest says|changed since"), (True, r"loss_scale.scale must be a finite number, got nan"))
    for drop_manifest, msg in edited:
        if drop_manifest:
            (ckpt / MANIFEST_NAME).unlink()
        with pytest.raises(UserError, match=msg):
            T.train(_cfg(tiny, pdata, tmp_path / "c", resume_from_checkpoint=str(ckpt), **kw), set())
        assert not (tmp_path / "c" / "model.safetensors").exists()


def _ds_config(tmp_path: Path, zero: int) -> Path:
    """LLaMA-Factory's examples/deepspeed/ds_z{2,3}_config.json keys."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    ds = tmp_path / f"ds_z{zero}.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
                              "zero_optimization": {"stage": zero, "reduce_bucket_size": "auto"}}))  # fmt: skip
    return ds


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "ddp", "zero0", "zero2", "zero3", "zero3-full", "fsdp-fp16-full",
                                    "fsdp-qlora"])  # fmt: skip
def test_two_processes_resume_equals_uninterrupted(tiny32: Path, pdata: Path, tmp_path: Path, engine: str) -> None:
    """A 2-process run resumed from its checkpoint-2 in a new process group continues exactly as the run that went
    on (loss curve, final weights): weights, optimizer state gathered from the ranks (DeepSpeed: each rank's part,
    master weights included, written and read by the rank itself), scheduler, each rank's RNG (LoRA dropout draws
    on it)."""
    from safetensors.torch import load_file

    common = _flags(model_name_or_path=tiny32, dataset="sft", dataset_dir=pdata, template="qwen", max_steps=4,
                    save_steps=2, logging_steps=1, learning_rate=5e-3, gradient_accumulation_steps=2,
                    per_device_train_batch_size=2, lora_dropout=0.1, lr_scheduler_type="cosine", warmup_steps=1,
                    disable_gradient_checkpointing=True, max_samples=24)  # fmt: skip
    common += ["--fsdp", "full_shard"] if engine.startswith("fsdp") else []
    deepspeed = engine.startswith("zero")
    common += _flags(deepspeed=_ds_config(tmp_path, int(engine[4]))) if deepspeed else []
    common += _flags(finetuning_type="full") if "full" in engine else []
    common += ["--fp16"] if "fp16" in engine else []  # its loss scale is resumed too
    if "qlora" in engine:  # the 4-bit base sharded too; its optimizer parts hold the LoRA weights' shards
        from conftest import require_quant

        require_quant()
        common += _flags(quantization_bit=4)
    weights = "model.safetensors" if "full" in engine else "adapter_model.safetensors"
    a, b = tmp_path / "a", tmp_path / "b"
    before = _CPU_FP16 if "fp16" in engine else _CARRIED if deepspeed else ""
    _torchrun(2, common + _flags(output_dir=a), tmp_path, before=before)
    ckpt = a / "checkpoint-2"
    carried = _carried(tmp_path) if deepspeed else 0
    assert (json.loads((ckpt / "trainer_state.json").read_text())["loss_scale"] is not None) == ("fp16" in engine)
    files = {"optimizer.safetensors", "rng_state.safetensors", "rng_state_1.safetensors"}
    sharded = deepspeed or engine.startswith("fsdp")  # each rank wrote its own part of the sharded optimizer
    files |= {"optimizer_1.safetensors"} if sharded else set()
    assert files <= {p.name for p in ckpt.iterdir()}
    if engine.startswith("fsdp"):  # FSDP's parts: every AdamW moment once, rank 0's half in its own file
        parts = [load_file(ckpt / name) for name in ("optimizer.safetensors", "optimizer_1.safetensors")]
        moments = [sum(v.numel() for k, v in part.items() if not k.endswith(".step")) for part in parts]
        trained = sum(v.numel() for v in load_file(ckpt / weights).values())
        assert sum(moments) == 2 * trained and 0 < moments[0] < sum(moments), (moments, trained)
    assert not any(p.suffix in (".pt", ".pth", ".bin") for p in ckpt.rglob("*"))  # nothing that unpickles
    err = _torchrun(2, common + _flags(output_dir=b, resume_from_checkpoint=ckpt), tmp_path, before=before)
    assert "trained steps 3-4 (resumed at step 2)" in err
    if deepspeed:  # no rank's optimizer part went through a collective (the largest was the RNG states)
        part = min((ckpt / name).stat().st_size for name in ("optimizer.safetensors", "optimizer_1.safetensors"))
        assert max(carried, _carried(tmp_path)) < part / 4, (carried, _carried(tmp_path), part)
    la, lb = trainer_log(a), trainer_log(b)
    assert [r["current_steps"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4) and rb["lr"] == pytest.approx(ra["lr"], abs=1e-12)
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    if "full" in engine:  # ZeRO-3's shards were gathered: the whole model, shape for shape
        assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in load_file(tiny32 / weights).items()}
    before = load_file(ckpt / weights)  # the resumed steps did train
    assert any(not torch.allclose(before[k], wb[k], atol=1e-5) for k in wa)
    if engine == "fsdp":  # its optimizer parts are FSDP's shards: resumed under DDP, one line, exit 2
        ddp = [x for x in common if x not in ("--fsdp", "full_shard")]
        err = _torchrun(2, ddp + _flags(output_dir=tmp_path / "c", resume_from_checkpoint=ckpt), tmp_path, fails=True)
        assert "its optimizer is sharded by process (an FSDP run); resume it with fsdp set as it was" in err
        (ckpt / MANIFEST_NAME).unlink()  # rank 1's part not where rank 1 looks (another node's disk, say)
        (ckpt / "optimizer_1.safetensors").unlink()
        err = _torchrun(2, common + _flags(output_dir=tmp_path / "d", resume_from_checkpoint=ckpt), tmp_path,
                        fails=True)  # fmt: skip
        assert "process 1 finds no optimizer_1.safetensors there (under several nodes the checkpoint" in err
        assert "another process could not read its optimizer part" in err
    if engine == "zero2":  # its optimizer parts fit ZeRO-2 on 2 processes only: another stage is one line, exit 2
        other = common[: common.index("--deepspeed")] + _flags(deepspeed=_ds_config(tmp_path, 3))
        err = _torchrun(2, other + _flags(output_dir=tmp_path / "c", resume_from_checkpoint=ckpt), tmp_path, fails=True)
        assert "optimizer or process settings (deepspeed 2 in the checkpoint, 3 now)" in err
        (ckpt / MANIFEST_NAME).unlink()  # an older checkpoint, whose rank-1 part is cut short: that rank's one line
        part = (ckpt / "optimizer_1.safetensors").read_bytes()
        (ckpt / "optimizer_1.safetensors").write_bytes(part[: len(part) // 2])
        err = _torchrun(2, common + _flags(output_dir=tmp_path / "d", resume_from_checkpoint=ckpt), tmp_path,
                        fails=True)  # fmt: skip
        assert "optimizer_1.safetensors is unreadable (" in err, err[-2000:]
        assert not (tmp_path / "d" / weights).exists()
        # rank 1 cannot write its part (another node's output_dir, say): every rank stops, nothing half-written stays
        lost = ("import exporter.checkpoint as C\nif os.environ['RANK'] == '1':\n"
                "    C.save_part = lambda tmp, rank, part: open(tmp / 'elsewhere' / 'x', 'wb')")  # fmt: skip
        err = _torchrun(2, common + _flags(output_dir=tmp_path / "e"), tmp_path, fails=True, before=lost)
        assert "process 1 cannot write" in err and "output_dir must be a directory every node sees" in err, err[-2000:]
        assert "another process could not write its part; nothing was saved" in err
        assert not [p.name for p in (tmp_path / "e").iterdir() if p.name.startswith("checkpoint")]


_STREAMED = """import exporter.distributed as D
D._SHARD_BYTES = 300_000  # several shards from the tiny model
_gather_all = D.full_state_dict
def _adapter_only(run):
    assert run.cfg.finetuning_type == "lora", "the whole model was gathered into one dict"
    return _gather_all(run)
D.full_state_dict = _adapter_only"""

_DISK_FULL = """
import errno, exporter.shards as S
_write = S.ShardWriter.write
def _full(self, chunk):
    if self.written:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    _write(self, chunk)
if os.environ["RANK"] == "0":
    S.ShardWriter.write = _full"""

_NAN_ON_RANK_1 = """
import torch, exporter.train as T
_results = T._results
def _poisoned(run, log):  # after the last step: a non-finite weight in rank 1's shard only
    out = _results(run, log)
    if os.environ["RANK"] == "1":
        p = next(p for p in run.model.parameters() if p.requires_grad)
        with torch.no_grad():
            (p.to_local() if hasattr(p, "to_local") else p.ds_tensor).fill_(float("nan"))
    return out
T._results = _poisoned"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_full_run_streams_its_weights(tiny: Path, pdata: Path, tmp_path: Path, engine: str) -> None:
    """Full fine-tuning under FSDP or ZeRO-3 writes the model tensor by tensor, each gathered whole to rank 0 and
    appended to its shard at once (never the whole model in one rank's memory), laid out as save_pretrained lays it
    out: shards and their index, save_pretrained's metadata, the tensors of one process's save_pretrained output.
    transformers loads it whole, a resume from its checkpoint continues the run, and a rank 0 that cannot write a
    shard stops every rank in one line, with nothing half-written."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    common = _flags(model_name_or_path=tiny, dataset="sft", dataset_dir=pdata, template="qwen", max_steps=2,
                    save_steps=1, logging_steps=1, learning_rate=5e-3, gradient_accumulation_steps=2,
                    disable_gradient_checkpointing=True, max_samples=24, finetuning_type="full")  # fmt: skip
    one = _one_process(common + _flags(per_device_train_batch_size=4, output_dir=tmp_path / "one"))
    common += ["--fsdp", "full_shard"] if engine == "fsdp" else _flags(deepspeed=_ds_config(tmp_path, 3))
    common += _flags(per_device_train_batch_size=2)
    two = tmp_path / "two"
    _torchrun(2, common + _flags(output_dir=two), tmp_path, before=_STREAMED)

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("model*.safetensors")):
            with safe_open(f, "pt") as st:
                assert st.metadata() == {"format": "pt"}, f
                out |= {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 - safe_open has no iteration
        return out

    for d, ref in ((two, tensors(one)), (two / "checkpoint-1", tensors(one / "checkpoint-1"))):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and not (d / "model.safetensors").exists()
        got = tensors(d)
        assert sorted(index["weight_map"]) == sorted(got) and index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in got.values())  # fmt: skip
        assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in ref.items()}
        # a 2-way split of the batch rounds its gradients otherwise, and Adam's first updates are about lr * g / |g|:
        # up to 4e-5 apart on an AVX512 Xeon, more on an AVX2-only EPYC (weights ~0.1: a tensor written under
        # another's name would be ~0.1 off)
        worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        assert worst < 2e-3, worst
    model, info = AutoModelForCausalLM.from_pretrained(two, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    err = _torchrun(2, common + _flags(output_dir=tmp_path / "r", resume_from_checkpoint=two / "checkpoint-1"),
                    tmp_path, before=_STREAMED)  # fmt: skip
    assert "trained step 2 (resumed at step 1)" in err
    for ra, rb in zip(trainer_log(two), trainer_log(tmp_path / "r"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
    err = _torchrun(2, common + _flags(output_dir=tmp_path / "e", max_steps=1), tmp_path, fails=True,
                    before=_STREAMED + _DISK_FULL)  # fmt: skip
    assert "No space left on device" in err and "another process could not write the model's weights" in err, err
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").glob("*.safetensors"))
    # a non-finite weight in one rank's shard: every rank stops with the same line before anything is written
    err = _torchrun(2, common + _flags(output_dir=tmp_path / "n", max_steps=1), tmp_path, fails=True,
                    before=_STREAMED + _NAN_ON_RANK_1)  # fmt: skip
    assert err.count("training diverged at step 1 of 1: the weights became non-finite (inf/nan)") == 2, err
    assert not any((tmp_path / "n").glob("*.safetensors")) and not (tmp_path / "n" / "all_results.json").exists()


@pytest.mark.slow
def test_deepspeed_fp16_resume_keeps_the_loss_scale(tiny: Path, pdata: Path, tmp_path: Path) -> None:
    """DeepSpeed's fp16: where its accelerator says the device has none (a CPU without AVX512-FP16), one line, exit 2.
    Told it has it, the GPU's fp16 optimizer runs here: the updates it skips leave the lr schedule where it was, its
    dynamic loss scaler's counters go into the checkpoint, and a run resumed after an overflow continues exactly as
    the run that went on (restarted counters would skip or scale otherwise)."""
    from safetensors.torch import load_file

    common = _flags(model_name_or_path=tiny, dataset="sft", dataset_dir=pdata, template="qwen", max_steps=6,
                    save_steps=3, logging_steps=1, learning_rate=5e-3, gradient_accumulation_steps=2,
                    per_device_train_batch_size=2, disable_gradient_checkpointing=True, max_samples=24,
                    deepspeed=_ds_config(tmp_path, 2)) + ["--fp16"]  # fmt: skip
    told = _CPU_FP16 + "\nimport deepspeed.accelerator as A\nA.get_accelerator().is_fp16_supported = lambda: {}"
    err = _torchrun(2, common + _flags(output_dir=tmp_path / "x"), tmp_path, fails=True, before=told.format(False))
    assert "fp16: DeepSpeed has no fp16 on this device (cpu); use bf16: true" in err
    fp16 = told.format(True)
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(2, common + _flags(output_dir=a), tmp_path, before=fp16)
    ckpt = a / "checkpoint-3"
    assert json.loads((ckpt / "trainer_state.json").read_text())["loss_scale"]["last_overflow_iter"] >= 0
    la = trainer_log(a)
    assert any(r["lr"] == prev["lr"] for prev, r in zip(la, la[1:], strict=False))  # a skipped update: lr stayed
    _torchrun(2, common + _flags(output_dir=b, resume_from_checkpoint=ckpt), tmp_path, before=fp16)
    for ra, rb in zip(la, trainer_log(b), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4) and rb["lr"] == pytest.approx(ra["lr"], abs=1e-12)
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# Each rank's model as `tuning.load_model` returns it, before any engine: per parameter, (name, elements this process
# holds (0 on the meta device), elements of the whole), written as loaded-<rank>
_LOADED = """import json, math, exporter.tuning as T
_load = T.load_model
def _probe(*a, **k):
    m = _load(*a, **k)
    held = [(n, 0 if p.is_meta else getattr(p, "ds_tensor", p).numel(), math.prod(getattr(p, "ds_shape", p.shape)))
            for n, p in m.named_parameters()]
    open(os.path.join(out, "loaded-" + os.environ["RANK"]), "w").write(json.dumps(held))
    return m
T.load_model = _probe
"""


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["2", "3", "3-freeze"])
def test_deepspeed_on_cpu(tiny32: Path, pdata: Path, tmp_path: Path, zero: str) -> None:
    """2 processes under DeepSpeed give one process's loss curve and trained weights, also through an epoch's short
    last group (8 batches in groups of 3: its 2 micro-batches make an update too), with no third-party warnings or
    banners. Under ZeRO-3 the model loads straight into its partitions (HF's zero.Init loading): no process holds a
    base weight whole, before the engine too (before, each loaded the whole model on its device and the engine
    partitioned it), and the fast loss path is still taken."""
    ds = _ds_config(tmp_path, int(zero[0]))
    common = _flags(model_name_or_path=tiny32, dataset="sft", dataset_dir=pdata, template="qwen", max_steps=4,
                    logging_steps=1, learning_rate=5e-3, gradient_accumulation_steps=3,
                    disable_gradient_checkpointing=True)  # fmt: skip
    if zero.endswith("freeze"):
        common += _flags(finetuning_type="freeze", freeze_trainable_layers=1, freeze_extra_modules="norm")
    one = _one_process(common + _flags(per_device_train_batch_size=4, output_dir=tmp_path / "one"))
    err = _torchrun(2, common + _flags(per_device_train_batch_size=2, output_dir=tmp_path / "two", deepspeed=ds),
                    tmp_path, before=_LOADED)  # fmt: skip
    assert "Warning" not in err and "WARNING" not in err and "built successfully" not in err, err
    assert "the model's own forward" not in err  # the fast path's check ran through ZeRO-3's hooks
    for ra, rb in zip(trainer_log(one), trainer_log(tmp_path / "two"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
    for rank in (0, 1):
        base = [(n, held, whole) for n, held, whole in json.loads((tmp_path / f"loaded-{rank}").read_text())
                if "lora_" not in n]  # fmt: skip
        assert base and all(held <= (whole + 1) // 2 if zero[0] == "3" else held == whole for _, held, whole in base)
    from safetensors.torch import load_file  # the trained weights gathered from the shards equal one process's

    weights = "model.safetensors" if zero.endswith("freeze") else "adapter_model.safetensors"
    a, b = load_file(one / weights), load_file(tmp_path / "two" / weights)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_in_one_process(tiny32: Path, pdata: Path, tmp_path: Path, zero: int) -> None:
    """`deepspeed:` without torchrun (one GPU, as LLaMA-Factory runs it without FORCE_TORCHRUN) trains in a process
    group of its own and gives the plain run's loss curve and adapter (it used to stop with a traceback: DeepSpeed,
    finding no group, looked for MPI)."""
    common = _flags(model_name_or_path=tiny32, dataset="sft", dataset_dir=pdata, template="qwen", max_steps=3,
                    logging_steps=1, learning_rate=5e-3, per_device_train_batch_size=2,
                    disable_gradient_checkpointing=True)  # fmt: skip
    one = _one_process(common + _flags(output_dir=tmp_path / "one"))
    cmd = [sys.executable, "-m", "exporter", "train", *common, "--output_dir", str(tmp_path / "ds"), "--deepspeed",
           str(_ds_config(tmp_path, zero))]  # fmt: skip
    r = subprocess.run(cmd, env=dict(os.environ, EXPORTER_NO_PROGRESS="1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "WARNING" not in r.stderr, r.stderr
    for ra, rb in zip(trainer_log(one), trainer_log(tmp_path / "ds"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(one / "adapter_model.safetensors"), load_file(tmp_path / "ds" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_deepspeed_missing_is_one_line(tiny: Path, pdata: Path, tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    cfg, given = lf_args.config_from_args(["--model_name_or_path", "m", "--output_dir", "o", "--dataset", "a",
                                           "--deepspeed", "ds_z3_config.json"])  # fmt: skip
    with pytest.raises(UserError, match=r"deepspeed: ds_z3_config.json: the deepspeed package is not installed"):
        lf_args.check(cfg, given, "cpu")


def test_deepspeed_nvme_offload_needs_save_only_model(tmp_path: Path) -> None:
    """Checkpoints hold the optimizer state DeepSpeed keeps in memory; offloaded to NVMe it is not there: refused up
    front in one line, before DeepSpeed starts."""
    from exporter import distributed

    ds = _ds_config(tmp_path, 3)
    doc = json.loads(ds.read_text())
    doc["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": str(tmp_path)}
    ds.write_text(json.dumps(doc))
    cfg, _ = lf_args.config_from_args(["--model_name_or_path", "m", "--output_dir", "o", "--dataset", "a",
                                       "--deepspeed", str(ds)])  # fmt: skip
    with pytest.raises(UserError, match=r"offload_optimizer to nvme .* set save_only_model: true"):
        distributed.deepspeed_config(cfg, distributed.Dist(), tmp_path)


def test_force_torchrun_relaunches_with_lf_variables(monkeypatch, tmp_path: Path) -> None:
    from exporter import distributed

    seen = {}

    def fake_run(args):
        seen["cmd"] = [sys.executable, "-m", "torch.distributed.run", *args]
        return 0

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed, "_torchrun", fake_run)
    for k, v in {"FORCE_TORCHRUN": "1", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "3",
                 "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    assert distributed.relaunch(["cfg.yaml"]) == 0
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 3))  # the cores shared out, not 1 each
    monkeypatch.delenv("MASTER_PORT")  # several nodes need one rendezvous: a port picked here would differ per node
    with pytest.raises(UserError, match=r"NNODES=2: MASTER_PORT not set; every node needs the same MASTER_ADDR"):
        distributed.relaunch(["cfg.yaml"])
    monkeypatch.setenv("NODE_RANK", "2")
    with pytest.raises(UserError, match=r"NNODES='2', NODE_RANK='2': expected NNODES nodes numbered 0 to NNODES-1"):
        distributed.relaunch(["cfg.yaml"])
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29501")
    cmd = seen["cmd"]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-4:] == ["-m", "exporter", "train", "cfg.yaml"]
    flags = dict(zip(cmd[3:-4:2], cmd[4:-4:2], strict=True))
    assert flags == {"--nnodes": "2", "--node_rank": "1", "--nproc_per_node": "3", "--master_addr": "10.0.0.1",
                     "--master_port": "29501"}  # fmt: skip
    for k in ("FORCE_TORCHRUN", "NPROC_PER_NODE"):  # LLaMA-Factory's automatic torchrun: one process per visible GPU
        monkeypatch.delenv(k)
    monkeypatch.setattr(distributed, "_gpu_count", lambda: 2)
    assert distributed.relaunch(["cfg.yaml"]) == 0 and seen["cmd"][seen["cmd"].index("--nproc_per_node") + 1] == "2"
    assert distributed.relaunch(["cfg.yaml"], ["--verbose"]) == 0  # `exporter --verbose train`: every rank verbose
    assert seen["cmd"][-5:] == ["-m", "exporter", "--verbose", "train", "cfg.yaml"]
    monkeypatch.setattr(distributed, "_gpu_count", lambda: 1)
    seen.clear()
    assert distributed.relaunch(["cfg.yaml"]) is None and not seen
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")  # already under torchrun: train here
    assert distributed.relaunch(["cfg.yaml"]) is None


@pytest.mark.slow
def test_force_torchrun_trains_and_fails_in_one_line(tiny: Path, pdata: Path, tmp_path: Path) -> None:
    """`FORCE_TORCHRUN=1 exporter train`, as LLaMA-Factory's users launch several processes: it trains on 2 processes
    without torchrun's banner; bad data stops every process with its one line and exit code 2, without torchrun's
    failure log and report (a traceback)."""
    env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", EXPORTER_NO_PROGRESS="1")
    env.pop("OMP_NUM_THREADS", None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.json").write_text('[{"instruction": "a", "output": "b"}, {broken')
    (bad / "dataset_info.json").write_text(json.dumps({"b": {"file_name": "b.json"}}))
    runs = {}
    for name, data in (("ok", _flags(dataset="sft", dataset_dir=pdata)), ("bad", _flags(dataset="b", dataset_dir=bad))):
        args = _flags(model_name_or_path=tiny, template="qwen", max_steps=1, per_device_train_batch_size=2,
                      disable_gradient_checkpointing=True, output_dir=tmp_path / name) + data  # fmt: skip
        runs[name] = subprocess.run([sys.executable, "-m", "exporter", "train", *args], env=env, capture_output=True,
                                    text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    ok, bad_run = runs["ok"], runs["bad"]
    assert ok.returncode == 0 and "on 2 processes (ddp)" in ok.stderr, ok.stderr[-3000:]
    assert "OMP_NUM_THREADS" not in ok.stdout + ok.stderr
    assert bad_run.returncode == 2, bad_run.stderr[-3000:]
    lines = [line for line in bad_run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors and all("b.json" in line for line in errors), bad_run.stderr[-3000:]
    assert not [line for line in lines if not line.startswith(("error:", "note:"))], bad_run.stderr[-3000:]
    # Ctrl-C of the launcher once the ranks run: every rank stops, exit 130 as one process, no traceback
    args = _flags(model_name_or_path=tiny, template="qwen", max_steps=10000, per_device_train_batch_size=2,
                  dataset="sft", dataset_dir=pdata, output_dir=tmp_path / "int")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-m", "exporter", "train", *args], env=env, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)  # fmt: skip
    seen = []
    for line in p.stderr:
        seen.append(line)
        if not line.startswith("note: launching"):  # a rank runs (it prints its notes as it prepares the data)
            p.send_signal(signal.SIGINT)
            break
    rest = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and "Traceback" not in rest and "SignalException" not in rest, "".join(seen) + rest


def test_qlora_cli_prints_no_third_party_noise(tiny: Path, pdata: Path, tmp_path: Path) -> None:
    """QLoRA keeps bitsandbytes importable (the quantization libraries' loggers turned down instead)."""
    from conftest import require_quant
    from test_quiet import NOISE

    require_quant()
    r = subprocess.run([sys.executable, "-m", "exporter", "train", *_flags(
        model_name_or_path=tiny, dataset="sft", dataset_dir=pdata, template="qwen", output_dir=tmp_path / "q",
        max_steps=1, per_device_train_batch_size=2, quantization_bit=4)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "QLoRA: base quantized to 4-bit" in r.stderr
    assert not [line for line in (r.stdout + r.stderr).splitlines() if NOISE.search(line)]


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "bits"), [("ddp", 4), ("zero2", 4), ("zero3", 4), ("fsdp", 4), ("zero3", 8)])
def test_qlora_two_processes_equal_one(tiny32: Path, pdata: Path, tmp_path: Path, engine: str, bits: int) -> None:
    """QLoRA on 2 processes gives one process's loss curve and adapter for the same global batch: DDP, DeepSpeed
    ZeRO-2 (it shards only the LoRA weights' gradients and optimizer state), and ZeRO-3 and FSDP2, which shard the
    quantized base too (its 4-bit weights packed in the compute dtype, `bnb_4bit_quant_storage`, as LLaMA-Factory
    does)."""
    from safetensors.torch import load_file

    common = _flags(model_name_or_path=tiny32, dataset="sft", dataset_dir=pdata, template="qwen", max_steps=3,
                    logging_steps=1, learning_rate=5e-3, gradient_accumulation_steps=2, quantization_bit=bits,
                    disable_gradient_checkpointing=True, max_samples=24)  # fmt: skip
    one = _one_process(common + _flags(per_device_train_batch_size=4, output_dir=tmp_path / "one"))
    extra = _flags(deepspeed=_ds_config(tmp_path, int(engine[-1]))) if engine.startswith("zero") else []
    extra += ["--fsdp", "full_shard"] if engine == "fsdp" else []
    _torchrun(2, common + _flags(per_device_train_batch_size=2, output_dir=tmp_path / "two") + extra, tmp_path)
    for ra, rb in zip(trainer_log(one), trainer_log(tmp_path / "two"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
    a, b = load_file(one / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_qlora_8bit_with_fsdp_is_one_line(tmp_path: Path) -> None:
    """FSDP2 replaces bitsandbytes' 8-bit weights by plain ones (tried: AttributeError at the first forward)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    cfg, given = lf_args.config_from_args(["--model_name_or_path", "m", "--output_dir", "o", "--dataset", "a",
                                           "--quantization_bit", "8", "--fsdp", "full_shard"])  # fmt: skip
    with pytest.raises(UserError, match="quantization_bit: 8 with fsdp is not supported"):
        lf_args.check(cfg, given, "cpu")


# Each rank records the use_reentrant of every checkpointed layer call (transformers' checkpoint function) in
# reentrant-<rank>
_REENTRANT = """import transformers.modeling_utils as _M
_real = _M.checkpoint
def _spy(fn, *a, **k):
    open(os.path.join(out, "reentrant-" + os.environ["RANK"]), "a").write(f"{k.get('use_reentrant')}\\n")
    return _real(fn, *a, **k)
_M.checkpoint = _spy
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lora", "lora-nonreentrant", "freeze", "kto", "dpo-ddp", "fsdp", "zero3"])
def test_gradient_checkpointing_keeps_the_loss_curve(tiny32: Path, pdata: Path, tmp_path: Path, how: str,
                                                     monkeypatch) -> None:  # fmt: skip
    """LLaMA-Factory's `use_reentrant_gc` (default true: torch's reentrant checkpoint, as in LF; false: the
    non-reentrant one) with checkpointing kept (`disable_gradient_checkpointing: false`) gives the losses of a run
    without it: LoRA on a frozen base (transformers makes the embeddings' output require grad), freeze tuning, KTO
    and DPO under DDP (their reference and KL forwards run without grad, in eval mode: not checkpointed, no warning),
    FSDP2 and DeepSpeed ZeRO-3."""
    import warnings

    import transformers.modeling_utils as M

    stage = how.split("-")[0] if how.startswith(("dpo", "kto")) else "sft"
    common = _flags(stage=stage, model_name_or_path=tiny32, dataset={"sft": "sft", "dpo": "pairs", "kto": "kto"}[stage],
                    dataset_dir=pdata, template="qwen", max_steps=3, logging_steps=1, learning_rate=5e-3,
                    max_samples=24, gradient_accumulation_steps=2)  # fmt: skip
    common += _flags(finetuning_type="freeze") if how == "freeze" else []
    plain = _one_process(common + _flags(per_device_train_batch_size=4, disable_gradient_checkpointing=True,
                                         output_dir=tmp_path / "plain"))  # fmt: skip
    reentrant = how != "lora-nonreentrant"
    kept = common + _flags(disable_gradient_checkpointing=False, use_reentrant_gc=reentrant,
                           output_dir=tmp_path / "kept")  # fmt: skip
    if how in ("dpo-ddp", "fsdp", "zero3"):
        extra = {"fsdp": ["--fsdp", "full_shard"], "zero3": _flags(deepspeed=_ds_config(tmp_path, 3))}.get(how, [])
        out = _torchrun(2, kept + _flags(per_device_train_batch_size=2) + extra, tmp_path, before=_REENTRANT)
        assert "Warning" not in out and "WARNING" not in out, out
        seen = {x for r in (0, 1) for x in (tmp_path / f"reentrant-{r}").read_text().split()}
    else:
        calls: list = []
        real = M.checkpoint
        monkeypatch.setattr(
            M, "checkpoint", lambda fn, *a, **k: calls.append(k.get("use_reentrant")) or real(fn, *a, **k)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _one_process(kept + _flags(per_device_train_batch_size=4))
        assert not [w for w in caught if "requires_grad" in str(w.message)]
        seen = {str(x) for x in calls}
    assert seen == {str(reentrant)}  # every layer was checkpointed, the way asked
    a, b = trainer_log(plain), trainer_log(tmp_path / "kept")
    tol = 1e-5 if how in ("dpo-ddp", "fsdp", "zero3") else 1e-6
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=tol)
