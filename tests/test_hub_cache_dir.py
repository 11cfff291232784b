"""LLaMA-Factory's `cache_dir` key (ModelArguments: a hub cache of its own) in an export YAML: hub ids are resolved in
that cache (`models--owner--name/snapshots/<commit>`, as huggingface_hub lays it out; offline, a snapshot already
there) where `exporter export` said "unknown key 'cache_dir'" (exit 2). The cache is built here, no download."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_lora
from safetensors import safe_open

YAML = "model_name_or_path: {base}\nadapter_name_or_path: {adapter}\ntemplate: qwen\nexport_dir: {out}\n{extra}"


def _cache(root: Path, repo: str, src: Path) -> Path:
    """`src` as huggingface_hub stores repo `repo` in the hub cache `root` (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    d = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, d / "snapshots" / commit)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(commit)
    return d / "snapshots" / commit


def _export(cfg: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # never the network: the snapshot in cache_dir is what is used
    return subprocess.run([sys.executable, "-m", "exporter", "export", str(cfg)], capture_output=True, text=True,
                          env=env)  # fmt: skip


def _tensors(d: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out |= {k: sf.get_tensor(k).view(torch.uint8).numpy().tobytes() for k in sf.keys()}
    return out


def test_export_resolves_hub_ids_in_cache_dir(tiny_model, tmp_path: Path) -> None:
    base = tiny_model("qwen2")
    adapter = random_lora(base, tmp_path / "adapter", r=4, lora_alpha=8)
    cache = tmp_path / "hf"
    _cache(cache, "acme/tiny", base)
    _cache(cache, "acme/tiny-lora", adapter)
    ref = tmp_path / "ref.yaml"
    ref.write_text(YAML.format(base=base, adapter=adapter, out=tmp_path / "ref", extra=""))
    assert (r := _export(ref)).returncode == 0, r.stderr[-2000:]
    cfg = tmp_path / "e.yaml"
    cfg.write_text(
        YAML.format(base="acme/tiny", adapter="acme/tiny-lora", out=tmp_path / "m", extra=f"cache_dir: {cache}")
    )
    r = _export(cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _tensors(tmp_path / "m") == _tensors(tmp_path / "ref") != {}
    cfg.write_text(
        YAML.format(base="acme/other", adapter="acme/tiny-lora", out=tmp_path / "n", extra=f"cache_dir: {cache}")
    )
    r = _export(cfg)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: model 'acme/other': not a local directory, and fetching it from the Hugging "
                               f"Face hub into cache_dir {cache} failed"), lines  # fmt: skip
    assert not (tmp_path / "n").exists()


def test_resolve_without_cache_dir_is_unchanged(tmp_path: Path) -> None:
    from exporter import hub
    from exporter.errors import UserError

    (tmp_path / "m").mkdir()
    assert hub.resolve(tmp_path / "m", "model", cache_dir=tmp_path / "hf") == tmp_path / "m"  # a local dir wins
    with pytest.raises(UserError, match=r"^model 'no such dir!': no such directory"):
        hub.resolve("no such dir!", "model", cache_dir=tmp_path / "hf")
