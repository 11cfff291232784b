#!/usr/bin/env python
"""Time exporter's numpy GGUF encoders against gguf-py's on one block of rows (what the converter hands a thread).

    python scripts/bench/gguf_encoders.py [--rows 128] [--cols 2048] [--repeat 200]

Both run in this process on the same random bf16 weights; the outputs are checked equal before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # scripts/bench/gguf.py (the stage benchmark) would shadow the gguf package

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from exporter.converters import gguf_quant  # noqa: E402

T = gguf.GGMLQuantizationType


def per_call_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    raw = (x.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits, as read from a bf16 checkpoint
    f32 = gguf_quant.bf16_to_f32(raw).copy()
    scratch = gguf_quant.Scratch()
    cases = {
        "f16 from bf16": (
            lambda: gguf_quant.bf16_to_f16(raw, scratch),
            lambda: gguf.quants.quantize(gguf_quant.bf16_to_f32(raw), T.F16),
        ),
        "q8_0 from f32": (lambda: gguf_quant.q8_0(f32, scratch), lambda: gguf.quants.quantize(f32, T.Q8_0)),
    }
    print(f"one block of {args.rows} x {args.cols} elements, {args.repeat} calls each")
    for name, (ours, ref) in cases.items():
        if np.asarray(ours()).tobytes() != np.asarray(ref()).tobytes():
            raise SystemExit(f"{name}: outputs differ")
        a, b = per_call_ms(ours, args.repeat), per_call_ms(ref, args.repeat)
        print(f"  {name:<14} ours {a:6.2f} ms   gguf-py {b:6.2f} ms   ratio ours/gguf-py {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
