#!/usr/bin/env python
"""Benchmark `exporter gguf` against llama.cpp's convert_hf_to_gguf.py (and libllama's quantizer for K-quants).

    EXPORTER_LLAMA_SRC=/path/to/llama_cpp_python-0.3.36 python scripts/bench/gguf.py [--model DIR] [--work DIR]

Without --model it builds the ~0.9B random bf16 Llama in 4 shards (`make_tiny_model.py llama2 --size bench
--dtype bfloat16`; the SentencePiece family, because llama.cpp's converter refuses byte-level BPE vocabularies it
has no hash for). Every measured command runs as its own child process; wall time and peak RSS (the child's
ru_maxrss, read by a small wrapper process that runs only that child) are printed for ours and the peer, with
ratios. Before each run the inputs are read once (so every command finds them in the page cache) and `sync` flushes
what earlier runs wrote; each command runs --repeat times and the median is compared.

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
import statistics
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


def warm(paths: list[Path]) -> None:
    """Read files once so the measured command finds them in the page cache (as the one before it did), and flush
    what earlier commands wrote, so no command pays for another's writeback."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    os.sync()


def measure(cmd: list[str], inputs: list[Path], output: Path, repeat: int, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` `repeat` times, each as the only child of a wrapper process, from warm inputs and without `output`;
    the median wall seconds (all of them in "walls") and the largest peak RSS in bytes."""
    walls, rss = [], 0
    for _ in range(repeat):
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink(missing_ok=True)
        warm(inputs)
        r = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if res["rc"] != 0:
            raise SystemExit(f"command failed ({res['rc']}): {' '.join(cmd)}\n{res['err']}")
        walls.append(res["wall"])
        rss = max(rss, res["rss"])
    return {"wall": statistics.median(walls), "walls": walls, "rss": rss}


def _row(label: str, res: dict) -> str:
    runs = ", ".join(f"{w:.1f}" for w in res["walls"])
    return f"  {label:<50} {res['wall']:7.1f} s   {res['rss'] / 2**30:5.2f} GiB   (runs: {runs} s)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF model dir (default: build the bench Llama)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "exporter-bench-gguf")
    ap.add_argument("--template", default="llama-2", help="template family of the model (default llama-2)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command; the median is reported (default 3)")
    args = ap.parse_args()
    src = os.environ.get("EXPORTER_LLAMA_SRC")
    if not src:
        raise SystemExit("set EXPORTER_LLAMA_SRC to the unpacked llama-cpp-python sdist")
    convert = Path(src) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = args.work / "llama2-bench-bf16"
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
                    "--dtype",
                    "bfloat16",
                    "--force",
                ],
                check=True,
            )
    weights = sorted(model.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    print(f"model: {model} ({size / 2**30:.2f} GiB safetensors, {len(list(model.glob('*.safetensors')))} shards)")
    out_ours, out_peer = args.work / "ours", args.work / "peer"
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
        ],
        weights,
        out_ours,
        args.repeat,
    )
    peer = {}
    for t in ("f16", "q8_0"):
        peer[t] = measure(
            [sys.executable, str(convert), str(model), "--outtype", t, "--outfile", str(out_peer / f"peer-{t}.gguf")],
            weights,
            out_peer / f"peer-{t}.gguf",
            args.repeat,
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
    kq = {}
    for who, code in (("ours", _OURS_KQUANT), ("peer", _PEER_KQUANT)):
        dest = args.work / f"{who}-q4_k_m.gguf"
        kq[who] = measure([sys.executable, "-c", code, str(f16), str(dest)], [f16], dest, args.repeat)
    kq_ours, kq_peer = kq["ours"], kq["peer"]
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
