"""Benchmark `exporter merge` against PEFT (load + merge_and_unload + save_pretrained), each in its own process.

    python scripts/bench/merge.py [--model DIR] [--work DIR] [--rank 16]

Without --model it builds a ~0.9B random bf16 Llama in 4 shards (scripts/make_tiny_model.py llama3 --size bench).
It writes a rank-16 all-linear LoRA with random non-zero B, runs both merges under
/usr/bin/time -v, prints wall time and peak RSS of both and the ratios, and checks the two outputs agree.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEER = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="2GB")
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""


def build_model(out: Path) -> None:
    """A ~0.9B random bf16 Llama 3 in 4 shards, from the fixture builder."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "llama3", str(out), "--size", "bench"],
        check=True,
    )


def build_adapter(model: Path, out: Path, rank: int) -> None:
    """A PEFT-format rank-`rank` LoRA on every linear layer, B random (non-zero), written tensor by tensor."""
    from safetensors import safe_open

    index = json.loads((model / "model.safetensors.index.json").read_text())
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, fname in sorted(index["weight_map"].items()):
        mod = name.removesuffix(".weight")
        if not name.endswith(".weight") or mod.rsplit(".", 1)[-1] not in LINEAR:
            continue
        with safe_open(model / fname, "pt") as f:
            rows, cols = f.get_slice(name).get_shape()
        tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) / cols**0.5
        tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.01
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": LINEAR,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model),
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run under /usr/bin/time -v; (wall seconds, peak RSS in GiB)."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", r.stderr).group(1)
    secs = sum(float(x) * 60**k for k, x in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return secs, rss_kb / 2**20


def compare(a: Path, b: Path) -> tuple[float, float]:
    """Largest |difference| between the two merged models and the fraction of elements that differ at all."""
    from safetensors import safe_open

    def files(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(d / "model.safetensors", "pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}

    fa, fb = files(a), files(b)
    assert set(fa) == set(fb), set(fa) ^ set(fb)
    worst, differ, total = 0.0, 0, 0
    for name in fa:
        with safe_open(fa[name], "pt") as x, safe_open(fb[name], "pt") as y:
            d = (x.get_tensor(name).float() - y.get_tensor(name).float()).abs()
        worst = max(worst, d.max().item())
        differ += int((d > 0).sum())
        total += d.numel()
    return worst, differ / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="base model dir (default: build a ~0.9B random Llama)")
    ap.add_argument("--work", type=Path, help="scratch dir (default: a temp dir, removed afterwards)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        model = args.model or work / "base"
        if not model.exists():
            print(f"building the base model in {model} ...", flush=True)
            build_model(model)
        adapter = work / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        build_adapter(model, adapter, args.rank)
        for f in model.glob("*.safetensors"):  # same warm page cache for both
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        from exporter.shards import numel, read_header

        params = sum(numel(t.shape) for f in model.glob("*.safetensors") for t in read_header(f).values())
        ours_out, peer_out = work / "ours", work / "peer"
        for d in (ours_out, peer_out):
            shutil.rmtree(d, ignore_errors=True)
        print(f"base: {params / 1e9:.2f}B params; LoRA rank {args.rank} on {', '.join(LINEAR)}", flush=True)
        peer_t, peer_rss = timed([sys.executable, "-c", PEER, str(model), str(adapter), str(peer_out)])
        ours_t, ours_rss = timed(
            [
                sys.executable,
                "-m",
                "exporter",
                "merge",
                "--base",
                str(model),
                "--adapter",
                str(adapter),
                "--out",
                str(ours_out),
            ]
        )
        diff, frac = compare(ours_out, peer_out)
        print(f"{'':24}{'wall s':>10}{'peak RSS GiB':>15}")
        print(f"{'exporter merge':24}{ours_t:>10.1f}{ours_rss:>15.2f}")
        print(f"{'PEFT merge_and_unload':24}{peer_t:>10.1f}{peer_rss:>15.2f}")
        print(f"{'ratio (ours / PEFT)':24}{ours_t / peer_t:>10.2f}{ours_rss / peer_rss:>15.2f}")
        print(f"targets: time <= 1.00x, peak RSS <= 0.25x; max |ours - PEFT| {diff:.3g}, {frac:.2%} of elements differ")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
