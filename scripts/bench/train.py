#!/usr/bin/env python
"""Benchmark `exporter train` against HF `Trainer` + PEFT with LLaMA-Factory's defaults and, when its venv is there
(EXPORTER_LF_PYTHON, see scripts/setup_lf.sh), LLaMA-Factory 0.9.5 itself on the same YAML.

    python scripts/bench/train.py [--steps 30] [--batch 8] [--rows 400] [--work DIR] [--bf16]

Same ~37M-parameter Llama model (random init, vocab 32000), same SFT data (alpaca rows of varied length), same LoRA
(r8, alpha 16, all linear layers), batch size, steps, optimizer and schedule; packing off; everything else at
LLaMA-Factory's defaults (gradient checkpointing on: exporter turns it off on CPU when memory allows and says so).
exporter and LLaMA-Factory read one YAML file; the HF Trainer peer trains on exporter's tokenized examples. Each runs
in its own process, in one run; prints per side: tokens/s (non-padding tokens per second of the training loop;
LLaMA-Factory reports its own count, padding included), process wall time and CPU seconds (user + system: robust
when the machine is shared), peak RSS, the loss curves, and the ratios, with the load average before and after.
Run with OMP_NUM_THREADS=1 on a busy machine (idle OpenMP threads spinning against other load distort every side).
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


def run_child(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, int, float]:
    """(wall seconds, peak RSS bytes, exit code, CPU seconds) of one child process, run in `cwd` (not the checkout's
    root, where `python -m exporter` would import the source folder instead of the installed package)."""
    t = time.time()
    p = subprocess.Popen(cmd, env=env, cwd=cwd)
    _, status, usage = os.wait4(p.pid, 0)
    return time.time() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


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


def lf_yaml(work: Path, model: Path, ddir: Path, steps: int, batch: int, bf16: bool, checkpointing: bool) -> Path:
    """The one YAML both exporter and LLaMA-Factory train from (LLaMA-Factory's keys; output_dir set per side)."""
    doc = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "lora_target": "all", "dataset": "bench", "dataset_dir": str(ddir), "template": "llama3",
           "per_device_train_batch_size": batch, "max_steps": steps, "logging_steps": 1, "save_steps": 10**9,
           "overwrite_output_dir": True, "report_to": "none", "bf16": bf16, "include_num_input_tokens_seen": True,
           **COMMON}  # fmt: skip
    if checkpointing:  # said explicitly: exporter keeps gradient checkpointing on CPU too
        doc["disable_gradient_checkpointing"] = False
    path = work / "bench.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in doc.items()))
    return path


def side(name: str, wall: float, rss: int, cpu: float, out: Path) -> dict:
    """One trainer's numbers from its process and its output dir (all_results.json, trainer_log.jsonl)."""
    res = json.loads((out / "all_results.json").read_text())
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    tokens = res.get("train_tokens_per_second") or res["num_input_tokens_seen"] / res["train_runtime"]
    return {"name": name, "tps": tokens, "wall": wall, "cpu": cpu, "rss": rss, "loop": res["train_runtime"],
            "losses": [r["loss"] for r in log if "loss" in r]}  # fmt: skip


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--work", type=Path, default=Path("/tmp/exporter-bench-train"))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on every side (for a GPU run)")
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="write disable_gradient_checkpointing: false into the YAML (exporter then keeps it on CPU)",
    )
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.peer:
        peer(a.work, a.steps, a.batch, a.bf16)
        return 0

    from transformers import AutoTokenizer

    from exporter import data, lf_args, templates
    from exporter import examples as E

    model = build_model(a.work)
    ddir = build_data(a.work, a.rows)
    yml = lf_yaml(a.work, model, ddir, a.steps, a.batch, a.bf16, a.checkpointing)
    cfg, _ = lf_args.config_from_args([str(yml), f"output_dir={a.work / 'ours-out'}"])
    tok = AutoTokenizer.from_pretrained(model)
    samples, drops = data.load(cfg.dataset, cfg.dataset_dir)
    examples = E.tokenize_sft(samples, tok, templates.resolve(model, cfg.template), cfg, drops)
    (a.work / "examples.json").write_text(json.dumps([[e.input_ids, e.labels] for e in examples]))
    lens = [len(e.input_ids) for e in examples]
    print(f"data: {len(examples)} examples, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")
    print(f"load average before: {load()} ({os.cpu_count()} CPUs)")

    env = dict(os.environ, EXPORTER_NO_PROGRESS="1")
    sides = []
    wall, rss, rc, cpu = run_child([sys.executable, "-m", "exporter", "train", str(yml),
                                    f"output_dir={a.work / 'ours-out'}"], env, a.work)  # fmt: skip
    if rc:
        print("exporter train failed", file=sys.stderr)
        return 1
    sides.append(side("exporter", wall, rss, cpu, a.work / "ours-out"))
    wall, rss, rc, cpu = run_child(
        [sys.executable, str(ROOT / "scripts" / "bench" / "train.py"), "--peer", "--work", str(a.work), "--steps",
         str(a.steps), "--batch", str(a.batch)]
        + (["--bf16"] if a.bf16 else []), env, a.work,
    )  # fmt: skip
    if rc:
        print("HF Trainer run failed", file=sys.stderr)
        return 1
    pr = json.loads((a.work / "peer.json").read_text())
    sides.append({"name": "HF Trainer+PEFT", "tps": pr["tokens"] / pr["seconds"], "wall": wall, "cpu": cpu,
                  "rss": rss, "loop": pr["seconds"], "losses": pr["losses"]})  # fmt: skip
    lf_python = os.environ.get("EXPORTER_LF_PYTHON")
    if lf_python:
        lf_out = a.work / "lf-out"
        wall, rss, rc, cpu = run_child([lf_python, "-m", "llamafactory.cli", "train", str(yml),
                                        f"output_dir={lf_out}"], env, a.work)  # fmt: skip
        if rc:
            print("LLaMA-Factory run failed", file=sys.stderr)
            return 1
        sides.append(side("LLaMA-Factory", wall, rss, cpu, lf_out))
    else:
        print("EXPORTER_LF_PYTHON is not set: no LLaMA-Factory column (bash scripts/setup_lf.sh prints it)")
    print(f"load average after: {load()}")
    report(sides)
    return 0


def report(sides: list[dict]) -> None:
    """The table: each side, then each peer's ratio to exporter (> 1: exporter is better)."""
    ours = sides[0]
    rows = [("tokens/s (loop)", "tps", "{:.0f}", True), ("wall (process) s", "wall", "{:.1f}", False),
            ("CPU s (process)", "cpu", "{:.1f}", False), ("peak RSS MiB", "rss", "{:.0f}", False)]  # fmt: skip
    print(f"\n{'':22}" + "".join(f"{s['name']:>18}" for s in sides) + "".join(
        f"{'vs ' + s['name'][:12]:>18}" for s in sides[1:]))  # fmt: skip
    for label, key, fmt, higher in rows:
        vals = [s[key] / (2**20 if key == "rss" else 1) for s in sides]
        ratios = [(ours[key] / s[key] if higher else s[key] / ours[key]) for s in sides[1:]]
        print(f"{label:22}" + "".join(f"{fmt.format(v):>18}" for v in vals)
              + "".join(f"{r:>17.2f}x" for r in ratios))  # fmt: skip
    k = max(1, len(ours["losses"]) // 3)
    print(f"{'loss first step':22}" + "".join(f"{s['losses'][0]:>18.4f}" for s in sides))
    print(f"{f'loss mean last {k}':22}" + "".join(f"{sum(s['losses'][-k:]) / k:>18.4f}" for s in sides))
    for s in sides:
        print(f"loss curve {s['name']:16}: " + " ".join(f"{x:.3f}" for x in s["losses"]))


if __name__ == "__main__":
    sys.exit(main())
