"""Benchmark `exporter predict` (batched) against transformers `generate` one sample at a time (LLaMA-Factory's
`per_device_eval_batch_size: 1` default in its predict examples), on the same prompts, greedy.

    python scripts/bench/predict.py [--model DIR] [--size tiny|bench] [--samples 32] [--batch 16] [--max-new 32]

Without --model it builds a random qwen2 model (scripts/make_tiny_model.py qwen2 --size SIZE; `bench` is ~0.9B).
The prompts are the repo's demo datasets (identity, alpaca_en_demo, alpaca_zh_demo). Each side runs in its own
process, timed with wall clock and peak RSS (os.wait4):
  ours: `exporter predict` with `per_device_eval_batch_size: --batch` (continuous batching in the engine);
  peer: transformers `AutoModelForCausalLM.generate(do_sample=False)` one prompt at a time on the prompt token ids
        ours used (re-tokenized from generated_predictions.jsonl), stopping at the same end-of-turn ids.
Both are compared on the same work, generation: ours' samples/s is its `predict_runtime` (generation and scoring,
jieba's one-time dictionary build done before the timed window) less the scoring time, measured here by scoring the
written predictions again on a warmed jieba; `predict_samples_per_second` itself is printed too. The script checks
that every greedy answer is identical and prints the ratios. Third-party output (warnings, load bars) is kept out:
the model loads only in the child processes, whose stderr is dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STOPS = r"""
import json, sys
import torch
from exporter.engine import LoadOptions, load
with load(LoadOptions(sys.argv[1], max_seqs=1)) as eng:
    stops = sorted(eng.stop_ids)
print(json.dumps({"stops": stops, "device": "cuda" if torch.cuda.is_available() else "cpu"}))
"""
PEER = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, rows_file, stops, max_new, device = sys.argv[1:6]
stops, max_new = json.loads(stops), int(max_new)
tok = AutoTokenizer.from_pretrained(model_dir)
dtype = torch.float32 if device == "cpu" else "auto"
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
rows = [json.loads(l) for l in open(rows_file, encoding="utf-8")]
prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
out, tokens = [], 0
t0 = time.perf_counter()
with torch.inference_mode():
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                           eos_token_id=stops, pad_token_id=pad)[0, len(ids):].tolist()
        tokens += len(y)
        out.append(tok.decode(y, skip_special_tokens=True, clean_up_tokenization_spaces=False))
if device != "cpu":
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(json.dumps({"predictions": out, "seconds": dt, "tokens": tokens}))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MiB, exit code, stdout) of `cmd` in its own process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    out = p.stdout.read() if p.stdout else ""
    _, status, usage = os.wait4(p.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model dir (default: build a random qwen2 of --size)")
    ap.add_argument("--size", choices=("tiny", "bench"), default="bench")
    ap.add_argument("--work", type=Path, help="work dir (default: a temp dir under /tmp)")
    ap.add_argument("--samples", type=int, default=32, help="prompts (split over the three demo datasets)")
    ap.add_argument("--batch", type=int, default=16, help="ours: per_device_eval_batch_size")
    ap.add_argument("--max-new", type=int, default=32, help="max_new_tokens")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or work / f"model-{args.size}"
    if not (model / "config.json").is_file():
        print(f"[bench] building the {args.size} qwen2 model into {model}", flush=True)
        made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "qwen2", str(model),
                               "--size", args.size], capture_output=True, text=True)  # fmt: skip
        if made.returncode != 0:
            sys.exit(f"building the model failed (exit {made.returncode}):\n{made.stderr[-2000:]}")
    per_dataset = -(-args.samples // 3)
    out = work / "ours"
    ours_cmd = [sys.executable, "-m", "exporter", "predict", "--model_name_or_path", str(model), "--eval_dataset",
                "identity,alpaca_en_demo,alpaca_zh_demo", "--dataset_dir", str(ROOT / "data"), "--max_samples",
                str(per_dataset), "--max_new_tokens", str(args.max_new), "--per_device_eval_batch_size",
                str(args.batch), "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "EXPORTER_NO_PROGRESS": "1", "PYTHONSAFEPATH": "1"}  # the installed package, not ./exporter
    print(f"[bench] ours: exporter predict, batch {args.batch} ...", flush=True)
    ours = timed(ours_cmd, env)
    if ours[2] != 0:
        sys.exit(f"exporter predict failed (exit {ours[2]}); run it by hand: {' '.join(ours_cmd)}")
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    results = json.loads((out / "predict_results.json").read_text(encoding="utf-8"))

    probe = timed([sys.executable, "-c", STOPS, str(model)], env)  # the stop ids ours used, for the peer
    if probe[2] != 0:
        sys.exit(f"reading the stop ids failed (exit {probe[2]})")
    found = json.loads(probe[3])
    stops, device = found["stops"], found["device"]
    print("[bench] peer: transformers generate, one sample at a time ...", flush=True)
    peer_cmd = [sys.executable, "-c", PEER, str(model), str(out / "generated_predictions.jsonl"), json.dumps(stops),
                str(args.max_new), device]  # fmt: skip
    peer = timed(peer_cmd, env)
    if peer[2] != 0:
        sys.exit(f"the transformers peer failed (exit {peer[2]})")
    doc = json.loads(peer[3])
    same = sum(a == r["predict"] for a, r in zip(doc["predictions"], rows, strict=True))
    n = len(rows)
    from exporter import metrics

    metrics.warm()  # as predict does before its timed window
    t0 = time.perf_counter()
    metrics.similarity([r["predict"] for r in rows], [r["label"] for r in rows])
    scoring = time.perf_counter() - t0
    generation = results["predict_runtime"] - scoring
    ours_sps, peer_sps = n / generation, n / doc["seconds"]
    params = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**30
    print()
    print(f"model: {model} ({params:.2f} GiB safetensors), {n} prompts, greedy, max_new_tokens {args.max_new}, "
          f"device {device}; load: {os.getloadavg()[0]:.1f} (1-min average)")  # fmt: skip
    print(f"{'':40}{'samples/s':>10}{'wall s':>9}{'peak RSS MiB':>14}")
    print(f"{'ours: exporter predict, batch ' + str(args.batch):40}{ours_sps:>10.3f}{ours[0]:>9.1f}{ours[1]:>14.0f}")
    print(f"{'peer: transformers generate, batch 1':40}{peer_sps:>10.3f}{peer[0]:>9.1f}{peer[1]:>14.0f}")
    print(f"ratio ours/peer: samples/s {ours_sps / peer_sps:.2f}x, wall {ours[0] / peer[0]:.2f}x, "
          f"peak RSS {ours[1] / peer[1]:.2f}x")  # fmt: skip
    print(f"samples/s: generation alone on both sides (ours: predict_runtime {results['predict_runtime']:.3f} s less "
          f"{scoring:.3f} s of scoring; its predict_samples_per_second with scoring: "
          f"{results['predict_samples_per_second']:.3f})")  # fmt: skip
    print(f"identical greedy answers: {same}/{n}; peer generated {doc['tokens']} tokens")
    if same != n:
        sys.exit(1)


if __name__ == "__main__":
    main()
