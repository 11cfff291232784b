"""Benchmark `exporter serve` against llama-cpp-python's own OpenAI server on the same GGUF.

    python scripts/bench/serve.py [--gguf FILE] [--clients 1,8,64] [--max-tokens 64] [--threads 2] [--work DIR]

Without --gguf it builds a random qwen2-style model (scripts/make_tiny_model.py, --hidden 768 --layers 12 by
default, ~80M parameters) whose end-of-turn rows of lm_head are zeroed, so no answer ends before --max-tokens, and
exports it to GGUF f16 with `exporter gguf` (setup, not timed). Then, for each server in turn, as its own
process on 127.0.0.1 with the same threads and context:
  ours: `exporter serve GGUF --max-seqs 64` (continuous batching: one llama_decode for every live request);
  peer: `python -m llama_cpp.server --model GGUF` (one request at a time);
and at each number of concurrent clients, every client sends streaming greedy chat requests (different prompts),
measuring time to first token and generated tokens per second over the whole run. Prints both, the ratios, the
load average it ran under, and fails (exit 1) on any failed or short request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def size(hidden: int, layers: int) -> dict[str, int]:
    """A qwen2-style shape: head_dim 64, 4 KV heads, MLP 8/3 x hidden rounded up to 256 (K-quant rows)."""
    return dict(hidden=hidden, intermediate=-(-hidden * 8 // 3 // 256) * 256, layers=layers, heads=hidden // 64,
                kv_heads=4, head_dim=64)  # fmt: skip


TOPICS = ["the sea", "a city at night", "mountains", "a library", "winter", "a train", "the moon", "gardens"]


def build_model(work: Path, hidden: int, layers: int) -> Path:
    """The random qwen2-style GGUF (built once into `work`)."""
    work = work / f"h{hidden}-l{layers}"
    gguf = work / "gguf" / "serve-f16.gguf"
    if gguf.is_file():
        return gguf
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tiny_model as maker
    from safetensors.torch import load_file, save_file

    maker.SIZES["serve"] = size(hidden, layers)
    hf = work / "serve"
    if not (hf / "config.json").is_file():
        maker.make("qwen2", hf, size="serve", force=True)
        gen = json.loads((hf / "generation_config.json").read_text())
        eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        for f in hf.glob("*.safetensors"):
            tensors = load_file(f)
            for name in ("lm_head.weight", "model.embed_tokens.weight"):
                if name in tensors:
                    tensors[name][eos] = 0.0  # logit 0: never the argmax of a random model's spread
            save_file(tensors, f, metadata={"format": "pt"})
    subprocess.run(
        [sys.executable, "-m", "exporter", "gguf", str(hf), "--type", "f16", "--out", str(work / "gguf"), "--force"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int, str]:
    """(time to first token, content chunks, finish_reason) of one streaming request (the `openai` client)."""
    t0 = time.perf_counter()
    ttft, n, finish = float("nan"), 0, ""
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        async for chunk in stream:
            for c in chunk.choices:
                if c.delta.content:
                    if n == 0:
                        ttft = time.perf_counter() - t0
                    n += 1
                finish = c.finish_reason or finish
    except Exception as e:  # a failed request is counted, never hidden
        return ttft, n, f"{type(e).__name__}: {e}"
    return ttft, n, finish


async def load_test(base: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=900)

    async def worker(k: int) -> list[tuple[float, int, str]]:
        return [await one(client, model, f"Write about {TOPICS[(k + r) % 8]} ({k}.{r}).", max_tokens)
                for r in range(rounds)]  # fmt: skip

    t0 = time.perf_counter()
    results = [x for batch in await asyncio.gather(*(worker(k) for k in range(clients))) for x in batch]
    wall = time.perf_counter() - t0
    await client.close()
    ttfts = [t for t, _, _ in results]
    tokens = sum(n for _, n, _ in results)
    failed = [f for _, n, f in results if f != "length" or n < max_tokens * 0.9]
    if failed:
        print(f"  failed: {failed[:3]}", flush=True)
    return {
        "requests": len(results),
        "failed": len(failed),
        "tokens": tokens,
        "wall": wall,
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_max": max(ttfts),
    }


def serve(cmd: list[str], port: int, env: dict[str, str]) -> subprocess.Popen:
    import urllib.request

    log = tempfile.TemporaryFile()  # not a pipe: a chatty server would block on a full one
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--rounds", type=int, default=0, help="requests per client (default: 4 at 1 client, else 1-2)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ctx", type=int, default=512, help="context per sequence (ours) = the peer's one context")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "exporter" / "bench-serve")
    ap.add_argument("--only", choices=["ours", "peer"], help="run one server (debugging)")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size of the built model")
    ap.add_argument("--layers", type=int, default=12, help="layers of the built model")
    args = ap.parse_args()
    gguf = args.gguf or build_model(args.work, args.hidden, args.layers)
    levels = [int(x) for x in args.clients.split(",")]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    name = gguf.stem
    t = str(args.threads)
    servers = {
        "ours": [sys.executable, "-m", "exporter", "serve", str(gguf), "--max-seqs", str(max(levels)), "--ctx",
                 str(args.ctx), "--threads", t, "--model-name", name],  # --ctx: tokens per sequence
        "peer": [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", str(args.ctx),
                 "--n_threads", t, "--n_threads_batch", t, "--model_alias", name,
                 "--interrupt_requests", "False"],  # its default aborts a running stream when another arrives
    }  # fmt: skip
    results: dict[str, dict[int, dict]] = {}
    rss: dict[str, float] = {}
    load_before = os.getloadavg()
    for who, cmd in servers.items():
        if args.only and who != args.only:
            continue
        port = free_port()
        proc = serve([*cmd, "--port", str(port), "--host", "127.0.0.1"], port, env)
        try:
            base = f"http://127.0.0.1:{port}/v1"
            asyncio.run(load_test(base, name, 1, 1, 8))  # warm-up
            results[who] = {}
            for c in levels:
                rounds = args.rounds or (4 if c == 1 else 2 if c <= 8 else 1)
                r = asyncio.run(load_test(base, name, c, rounds, args.max_tokens))
                results[who][c] = r
                print(f"{who:4} {c:3} clients: {r['requests']} requests, {r['tokens']} tokens in {r['wall']:.1f} s = "
                      f"{r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f} s max {r['ttft_max']:.2f} s, "
                      f"{r['failed']} failed", flush=True)  # fmt: skip
            rss[who] = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    load_after = os.getloadavg()
    print(f"\nmodel {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB), {args.threads} threads, --max-tokens "
          f"{args.max_tokens}, load average before {load_before[0]:.1f} after {load_after[0]:.1f}")  # fmt: skip
    print("| clients | ours tok/s | peer tok/s | ratio | ours TTFT p50 | peer TTFT p50 | failed |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for c in levels:
        o, p = results.get("ours", {}).get(c), results.get("peer", {}).get(c)
        if o is None or p is None:
            continue
        bad += o["failed"] + p["failed"]
        print(f"| {c} | {o['tok_s']:.1f} | {p['tok_s']:.1f} | **{o['tok_s'] / p['tok_s']:.2f}×** | "
              f"{o['ttft_p50']:.2f} s | {p['ttft_p50']:.2f} s | {o['failed']} / {p['failed']} |")  # fmt: skip
    if rss:
        print("peak RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
