"""Run manifest: what went in, what came out (sha256), versions and the command line."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from exporter.errors import UserError

MANIFEST_NAME = "exporter_manifest.json"
_PACKAGES = ("exporter", "torch", "transformers", "peft", "safetensors", "gguf", "tokenizers", "llama-cpp-python")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe(path: Path | str, root: Path | None = None) -> list[dict[str, Any]]:
    """Files under `path` (or the file itself) with size and sha256; names relative to `root` or `path`."""
    path = Path(path)
    if not path.exists():
        return [{"path": str(path), "missing": True}]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    base = root if root is not None else (path.parent if path.is_file() else path)
    files = [p for p in files if p.name != MANIFEST_NAME]
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:  # hashlib releases the GIL
        digests = list(pool.map(sha256_file, files))
    rows = zip(files, digests, strict=True)
    return [{"path": str(p.relative_to(base)), "bytes": p.stat().st_size, "sha256": h} for p, h in rows]


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape an output."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write(
    out_dir: Path,
    stage: str,
    inputs: dict[str, Path | str],
    settings: dict[str, Any] | None = None,
    outputs: Path | None = None,
) -> Path:
    """Write `exporter_manifest.json` into `out_dir` describing inputs (local paths hashed) and outputs."""
    ins: dict[str, Any] = {}
    for name, value in inputs.items():
        p = Path(value)
        ins[name] = {"source": str(value), "files": describe(p)} if p.exists() else {"source": str(value)}
    doc = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "versions": versions(),
        "settings": settings or {},
        "inputs": ins,
        "outputs": describe(outputs if outputs is not None else out_dir),
    }
    return save(Path(out_dir) / MANIFEST_NAME, doc)


def save(path: Path, doc: dict[str, Any]) -> Path:
    """Write the manifest `doc` to `path` atomically (a temporary beside it, renamed): a kill or a full disk leaves
    the previous manifest or none, never a truncated one; a full disk is one line naming `path`."""
    from exporter.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def mark(out_dir: Path, stage: str, outputs: list[str] | None = None) -> Path:
    """An incomplete manifest: `out_dir` is ours (an exporter output) while `stage` is still writing into it;
    `outputs`: names in it already known as ours."""
    doc = {"stage": stage, "complete": False, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": sys.argv, "outputs": [{"path": n} for n in outputs or []]}  # fmt: skip
    return save(Path(out_dir) / MANIFEST_NAME, doc)


def read(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of `out_dir` as a dict, or None (absent, empty, unreadable, not an object)."""
    try:
        doc = json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def changed(out_dir: Path) -> str | None:
    """Why the outputs of `out_dir` no longer match its manifest (missing, other size, other sha256), or None."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return f"{out_dir} has no {MANIFEST_NAME}"
    if (doc := read(out_dir)) is None:
        return f"{path} is not a readable manifest"
    if doc.get("complete") is False:
        writer = doc.get("pending") or doc.get("stage")  # `pending`: a predict replacing its files in it
        return f"{out_dir} is incomplete (the {writer} run writing it did not finish)"
    try:
        rows = doc["outputs"]
        expected = {str(r["path"]): (int(r["bytes"]), str(r["sha256"])) for r in rows}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{path} is not a readable manifest"
    files = {name: out_dir / name for name in expected}
    for name, p in files.items():
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != expected[name][0]:
            return f"{p} is {p.stat().st_size} bytes, the manifest says {expected[name][0]}"
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        digests = dict(zip(files, pool.map(sha256_file, files.values()), strict=True))
    for name, digest in digests.items():
        if digest != expected[name][1]:
            return f"{files[name]} changed since it was written (sha256 differs from {path.name})"
    return None


def check_stage(out: Path, stage: str) -> None:
    """`--force` replaces only an output of the same kind: an existing exporter output at `out` must have been
    written by `stage` (a merge never replaces a training run's dir, a gguf never a merged model)."""
    if not (Path(out) / MANIFEST_NAME).is_file():
        return
    found = (read(out) or {}).get("stage")
    if found != stage:
        what = f"an exporter {found} output" if isinstance(found, str) else f"not readable as a {stage} output"
        raise UserError(
            f"{out} is {what} ({MANIFEST_NAME}); --force replaces only a previous {stage} output: remove it "
            "yourself or choose another output path"
        )
