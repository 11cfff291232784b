#!/usr/bin/env python
"""Benchmark `exporter train` against HF `Trainer` + PEFT configured with LLaMA-Factory's defaults.

    python scripts/bench/train.py [--steps 30] [--batch 8] [--rows 400] [--work DIR]

Same ~37M-parameter Llama model (random init, vocab 32000), same tokenized SFT data (alpaca rows of varied length,
tokenized once by exporter's template pipeline), same LoRA (r8, alpha 16, all linear layers), batch size, steps,
optimizer and schedule; gradient checkpointing on for both (LLaMA-Factory's default); packing off.
Each side runs in its own process; prints tokens/s (non-padding tokens per second of training-loop time),
tokens per CPU-second of the loop (robust on a shared machine), wall time, peak RSS, the loss curves, and the
ratios. Run with OMP_NUM_THREADS=1 on a busy machine (idle OpenMP threads spinning against other load distort both).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_model(work: Path) -> Path:
    """A Llama model of ~37M parameters with the llama3 fixture's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = work / "model"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    maker = importlib.util.module_from_spec(spec)
    sys.modules["make_tiny_model"] = maker
    spec.loader.exec_module(maker)
    tiny = maker.make("llama3", work / "tiny-llama3", force=True)
    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.1f}M parameters (Llama, vocab 32000, hidden 512, 6 layers)")
    return out


def build_data(work: Path, rows: int) -> Path:
    """Alpaca rows with prompt and answer lengths spread like real SFT data (short prompts, longer answers)."""
    d = work / "data"
    d.mkdir(parents=True, exist_ok=True)
    words = (ROOT / "data" / "corpus" / "en.txt").read_text(encoding="utf-8").split()
    rng = random.Random(0)

    def text(lo: int, hi: int) -> str:
        n = int(rng.lognormvariate(0, 0.8) * lo) + lo
        return " ".join(rng.choice(words) for _ in range(min(n, hi)))

    data = [{"instruction": text(6, 60), "input": "", "output": text(20, 200)} for _ in range(rows)]
    (d / "bench.json").write_text(json.dumps(data))
    (d / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
    return d


COMMON = dict(
    lora_rank=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_ratio=0.1,
    cutoff_len=1024, seed=42, max_grad_norm=1.0, weight_decay=0.0,
)  # fmt: skip


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    t = time.time()
    p = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    return time.time() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def peer(work: Path, steps: int, batch: int, bf16: bool = False) -> None:
    """HF Trainer + PEFT with LLaMA-Factory's defaults on exporter's tokenized examples."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    examples = json.loads((work / "examples.json").read_text())
    tok = AutoTokenizer.from_pretrained(work / "model")
    if tok.pad_token is None:  # LLaMA-Factory does the same
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # LF default
    model.enable_input_require_grads()
    lora = LoraConfig(
        r=COMMON["lora_rank"], lora_alpha=COMMON["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    base = DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, label_pad_token_id=-100)  # LF's SFT collator
    counted = {"tokens": 0}

    def collate(features):
        batch = base(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t, self.cpu = time.time(), time.process_time()

        def on_train_end(self, args, state, control, **kw):
            self.seconds, self.cpu_seconds = time.time() - self.t, time.process_time() - self.cpu

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(work / "peer-out"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=COMMON["learning_rate"], max_steps=steps, lr_scheduler_type="cosine", warmup_steps=0.1,
        logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False, seed=42,
        max_grad_norm=1.0, ddp_find_unused_parameters=False, disable_tqdm=True, bf16=bf16,
    )  # fmt: skip
    data = [{"input_ids": e[0], "attention_mask": [1] * len(e[0]), "labels": e[1]} for e in examples]
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[clock])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {"tokens": counted["tokens"], "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, "losses": losses}
    (work / "peer.json").write_text(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--work", type=Path, default=Path("/tmp/exporter-bench-train"))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (for a GPU run)")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.peer:
        peer(a.work, a.steps, a.batch, a.bf16)
        return 0

    from transformers import AutoTokenizer

    from exporter import data, templates
    from exporter.examples import tokenize_sft
    from exporter.lf_args import TrainConfig

    model = build_model(a.work)
    ddir = build_data(a.work, a.rows)
    cfg = TrainConfig(
        model_name_or_path=str(model), output_dir=str(a.work / "ours-out"), dataset=["bench"], dataset_dir=str(ddir),
        template="llama3", per_device_train_batch_size=a.batch, max_steps=a.steps, logging_steps=1,
        save_steps=10**9, overwrite_output_dir=True, bf16=a.bf16, **COMMON,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model)
    samples, drops = data.load(cfg.dataset, cfg.dataset_dir)
    tpl = templates.resolve(model, cfg.template)
    examples = tokenize_sft(samples, tok, tpl, cfg, drops)
    (a.work / "examples.json").write_text(json.dumps([[e.input_ids, e.labels] for e in examples]))
    lens = [len(e.input_ids) for e in examples]
    print(f"data: {len(examples)} examples, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")

    yml = a.work / "ours.yaml"
    yml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in vars(cfg).items() if v is not None))
    env = dict(os.environ, EXPORTER_NO_PROGRESS="1")
    ours_wall, ours_rss, rc = run_child([sys.executable, "-m", "exporter", "train", str(yml)], env)
    if rc:
        print("exporter train failed", file=sys.stderr)
        return 1
    res = json.loads((a.work / "ours-out" / "all_results.json").read_text())
    log = [json.loads(x) for x in (a.work / "ours-out" / "trainer_log.jsonl").read_text().splitlines()]
    ours_losses = [r["loss"] for r in log if "loss" in r]
    ours_tps = res["train_tokens_per_second"]

    peer_wall, peer_rss, rc = run_child(
        [sys.executable, __file__, "--peer", "--work", str(a.work), "--steps", str(a.steps), "--batch", str(a.batch)]
        + (["--bf16"] if a.bf16 else []),
        env,
    )
    if rc:
        print("HF Trainer run failed", file=sys.stderr)
        return 1
    pr = json.loads((a.work / "peer.json").read_text())
    peer_tps = pr["tokens"] / pr["seconds"]
    ours_tokens = ours_tps * res["train_runtime"]
    ours_cpu_tps, peer_cpu_tps = ours_tokens / res["train_cpu_seconds"], pr["tokens"] / pr["cpu_seconds"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    k = max(1, len(ours_losses) // 3)
    print(f"\n{'':24}{'exporter':>14}{'HF Trainer+PEFT':>18}{'ratio':>10}")
    print(f"{'tokens/s (loop)':24}{ours_tps:>14.0f}{peer_tps:>18.0f}{ours_tps / peer_tps:>9.2f}x")
    print(f"{'tokens per CPU-second':24}{ours_cpu_tps:>14.0f}{peer_cpu_tps:>18.0f}{ours_cpu_tps / peer_cpu_tps:>9.2f}x")
    print(f"{'wall (process) s':24}{ours_wall:>14.1f}{peer_wall:>18.1f}{peer_wall / ours_wall:>9.2f}x")
    print(f"{'peak RSS MiB':24}{ours_rss / 2**20:>14.0f}{peer_rss / 2**20:>18.0f}{ours_rss / peer_rss:>9.2f}")
    print(f"{'loss first step':24}{ours_losses[0]:>14.4f}{pr['losses'][0]:>18.4f}")
    print(f"{f'loss mean last {k} steps':24}{mean(ours_losses[-k:]):>14.4f}{mean(pr['losses'][-k:]):>18.4f}")
    print("loss curve exporter:", " ".join(f"{x:.3f}" for x in ours_losses))
    print("loss curve HF      :", " ".join(f"{x:.3f}" for x in pr["losses"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
