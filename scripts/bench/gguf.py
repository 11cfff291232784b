#!/usr/bin/env python
"""Benchmark `exporter gguf` against llama.cpp's convert_hf_to_gguf.py (and libllama's quantizer for K-quants).

    EXPORTER_LLAMA_SRC=/path/to/llama_cpp_python-0.3.36 python scripts/bench/gguf.py [--model DIR] [--work DIR]

Without --model it builds the ~0.9B random bf16 Llama in 4 shards (`make_tiny_model.py llama2 --size bench`;
the SentencePiece family, because llama.cpp's converter refuses byte-level BPE vocabularies it has no hash for).
Every measured command runs as its own child process; wall time and peak RSS (the child's ru_maxrss, read by a
small wrapper process that runs only that child) are printed for ours and the peer, with ratios.

  1. ours: one `exporter gguf --type f16,q8_0` process (one pass, both files)
     peer: `convert_hf_to_gguf.py --outtype f16` and `--outtype q8_0` (default lazy mode), two processes
  2. K-quant q4_k_m from the same f16 GGUF: ours (exporter's quantize step) vs the peer's llama-quantize
     equivalent (a bare `llama_cpp.llama_model_quantize` call). Both run the same libllama code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t
err = rc.stderr.decode("utf-8", "replace")[-2000:]
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": rc.returncode, "wall": wall, "rss": peak, "err": err}))
"""

_PEER_KQUANT = r"""
import os, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = len(os.sched_getaffinity(0))
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""

_OURS_KQUANT = r"""
import sys
from pathlib import Path
from exporter.converters.gguf_kquant import quantize
quantize(Path(sys.argv[1]), Path(sys.argv[2]), "q4_k_m")
"""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd` as the only child of a wrapper process; wall seconds and the child's peak RSS in bytes."""
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"command failed ({res['rc']}): {' '.join(cmd)}\n{res['err']}")
    return res


def _row(label: str, res: dict) -> str:
    return f"  {label:<44} {res['wall']:8.1f} s   {res['rss'] / 2**30:6.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF model dir (default: build the bench Llama)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "exporter-bench-gguf")
    ap.add_argument("--template", default="llama2", help="template family of the model (default llama2)")
    args = ap.parse_args()
    src = os.environ.get("EXPORTER_LLAMA_SRC")
    if not src:
        raise SystemExit("set EXPORTER_LLAMA_SRC to the unpacked llama-cpp-python sdist")
    convert = Path(src) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = args.work / "llama2-bench"
        if not (model / "config.json").is_file():
            print(f"building the bench model in {model} ...", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "scripts" / "make_tiny_model.py"),
                    "llama2",
                    str(model),
                    "--size",
                    "bench",
                    "--force",
                ],
                check=True,
            )
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"model: {model} ({size / 2**30:.2f} GiB safetensors, {len(list(model.glob('*.safetensors')))} shards)")
    out_ours, out_peer = args.work / "ours", args.work / "peer"
    shutil.rmtree(out_ours, ignore_errors=True)
    shutil.rmtree(out_peer, ignore_errors=True)
    out_peer.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(src) / "vendor" / "llama.cpp" / "gguf-py")}

    ours = measure(
        [
            sys.executable,
            "-m",
            "exporter",
            "gguf",
            str(model),
            "--type",
            "f16,q8_0",
            "--out",
            str(out_ours),
            "--template",
            args.template,
        ]
    )
    peer = {}
    for t in ("f16", "q8_0"):
        peer[t] = measure(
            [sys.executable, str(convert), str(model), "--outtype", t, "--outfile", str(out_peer / f"peer-{t}.gguf")],
            env=env,
        )
    peer_wall = sum(r["wall"] for r in peer.values())
    peer_rss = max(r["rss"] for r in peer.values())
    print("\nf16 + q8_0 from the HF model")
    print(_row("ours: exporter gguf --type f16,q8_0 (1 process)", ours))
    for t, r in peer.items():
        print(_row(f"llama.cpp convert_hf_to_gguf.py --outtype {t}", r))
    print(
        f"  ratio ours/llama.cpp: time {ours['wall'] / peer_wall:.2f}x (target <= 0.5x), "
        f"peak RSS {ours['rss'] / peer_rss:.2f}x (target <= 0.5x)"
    )

    (f16,) = out_ours.glob("*-f16.gguf")
    kq_ours = measure([sys.executable, "-c", _OURS_KQUANT, str(f16), str(args.work / "ours-q4_k_m.gguf")])
    kq_peer = measure([sys.executable, "-c", _PEER_KQUANT, str(f16), str(args.work / "peer-q4_k_m.gguf")])
    print("\nq4_k_m from the same f16 GGUF (both are libllama's llama_model_quantize)")
    print(_row("ours: exporter.converters.gguf_kquant.quantize", kq_ours))
    print(_row("peer: llama_model_quantize (llama-quantize's code)", kq_peer))
    print(
        f"  ratio ours/peer: time {kq_ours['wall'] / kq_peer['wall']:.2f}x, "
        f"peak RSS {kq_ours['rss'] / kq_peer['rss']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
