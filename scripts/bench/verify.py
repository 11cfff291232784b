"""Benchmark `exporter verify` against llama.cpp's perplexity over the same tokens (via llama-cpp-python).

    python scripts/bench/verify.py [--model DIR] [--work DIR] [--ctx 128] [--windows 8]

Without --model it builds the ~0.9B random bf16 qwen2 model (scripts/make_tiny_model.py qwen2 --size bench) and
exports GGUF f16 + q8_0 + q4_k_m with `exporter gguf` (setup, not timed). Then, each in its own process, timed with
wall clock and peak RSS (os.wait4):
  ours: `exporter verify --merged M --gguf f16 --gguf q8_0 --gguf q4_k_m --modelfile ...` (every check: templates
        with Go, stops, tokenizer, HF + 3 GGUF perplexities, greedy chat HF vs each GGUF);
  peer: llama.cpp's perplexity (windows of --ctx tokens, first -> BOS, second half scored) of the 3 GGUFs over
        the same token ids, through llama-cpp-python — what a user would run to compare quantizations.
Prints both, the ratio, and checks that the GGUF perplexities of both agree.
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
TYPES = ["f16", "q8_0", "q4_k_m"]
PEER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
ids_file, ctx, windows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
doc = json.loads(open(ids_file).read())
ids, bos = doc["ids"], doc["bos"]
out = {}
for path in sys.argv[4:]:
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False)
    nll, n = 0.0, 0
    for k in range(min(len(ids) // ctx, windows)):
        w = list(ids[k * ctx:(k + 1) * ctx])
        if bos is not None:
            w[0] = bos
        llm.reset()
        llm.eval(w)
        first = ctx // 2
        logits = np.array(llm.scores[first:ctx - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        tgt = np.array(w[first + 1:])
        nll -= lp[np.arange(len(tgt)), tgt].sum()
        n += len(tgt)
    out[path] = float(np.exp(nll / n))
    llm.close()
print(json.dumps(out))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MiB, exit code, stdout) of `cmd` in its own process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    out = p.stdout.read() if p.stdout else ""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, p.returncode, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model dir (default: build the ~0.9B qwen2 bench model)")
    ap.add_argument("--work", type=Path, help="work dir (default: a temp dir under /tmp)")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or work / "model"
    if not (model / "config.json").is_file():
        print(f"[bench] building the ~0.9B bench model into {model}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "qwen2", str(model),
                        "--size", "bench"], check=True)  # fmt: skip
    gdir = work / "gguf"
    if not (gdir / "exporter_manifest.json").is_file():
        print(f"[bench] exporting GGUF {', '.join(TYPES)} into {gdir}", flush=True)
        code = (
            "from exporter import gguf; "
            f"gguf.run(gguf.GGUFOptions(model={str(model)!r}, types={TYPES!r}, out={str(gdir)!r}, force=True))"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    ggufs = [next(gdir.glob(f"*-{t}.gguf")) for t in TYPES]
    modelfiles = [gdir / f"Modelfile.{t}" for t in TYPES]

    # the token ids, once, with the HF tokenizer (what verify does internally too)
    from transformers import AutoTokenizer

    from exporter.verify import HELD_OUT_TEXT

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(HELD_OUT_TEXT, add_special_tokens=False)["input_ids"]
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else None
    (work / "ids.json").write_text(json.dumps({"ids": ids, "bos": bos}))

    report = work / "report.json"
    ours_cmd = [sys.executable, "-m", "exporter", "verify", "--merged", str(model), "--report", str(report),
                "--ctx", str(args.ctx), "--max-windows", str(args.windows), "--prompts", str(args.prompts)]  # fmt: skip
    for g, m in zip(ggufs, modelfiles, strict=True):
        ours_cmd += ["--gguf", str(g), "--modelfile", str(m)]
    peer_cmd = [sys.executable, "-c", PEER, str(work / "ids.json"), str(args.ctx), str(args.windows)]
    peer_cmd += [str(g) for g in ggufs]
    print("[bench] ours: exporter verify (all checks) ...", flush=True)
    ours = timed(ours_cmd)
    print("[bench] peer: llama.cpp perplexity via llama-cpp-python ...", flush=True)
    peer = timed(peer_cmd)
    doc = json.loads(report.read_text())
    our_ppl = {c["target"]: c["metrics"]["ppl"] for c in doc["checks"] if c["check"] == "perplexity"}
    peer_ppl = {Path(k).name: v for k, v in json.loads(peer[3]).items()}
    print()
    print(f"model: {model}  ({sum(p.stat().st_size for p in model.glob('*.safetensors')) / 2**30:.2f}"
          f" GiB safetensors); GGUF: {', '.join(g.name for g in ggufs)}; ctx {args.ctx}")  # fmt: skip
    print(f"{'':28}{'wall s':>10}{'peak RSS MiB':>15}{'exit':>6}")
    print(f"{'ours: exporter verify':28}{ours[0]:>10.1f}{ours[1]:>15.0f}{ours[2]:>6}")
    print(f"{'peer: llama.cpp perplexity':28}{peer[0]:>10.1f}{peer[1]:>15.0f}{peer[2]:>6}")
    print(f"ratio ours/peer: wall {ours[0] / peer[0]:.2f}x, peak RSS {ours[1] / peer[1]:.2f}x")
    print(f"verify verdict: {'PASSED' if doc['passed'] else 'FAILED'} {doc['summary']}")
    for name, ppl in peer_ppl.items():
        mine = our_ppl.get(name)
        agree = "" if mine is None else f"  ours {mine:.4f}  rel diff {abs(mine - ppl) / ppl:.1e}"
        print(f"  ppl {name}: llama.cpp {ppl:.4f}{agree}")
    print(f"  ppl merged (HF): {our_ppl.get('merged', float('nan')):.4f}")


if __name__ == "__main__":
    main()
