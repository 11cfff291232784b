"""A sharded merge writes the same `model.safetensors.index.json` as transformers' `save_pretrained` of that model with
the same max_shard_size: the same shards, weight_map and metadata (total_size and total_parameters)."""

from __future__ import annotations

import json

import pytest
from conftest import random_lora

from exporter.merge import MergeOptions, merge


@pytest.mark.parametrize("family", ["llama3", "qwen2"])  # qwen2's fixture ties its embeddings (no lm_head written)
def test_sharded_index_equals_save_pretrained(tiny_model, tmp_path, family):
    from transformers import AutoModelForCausalLM

    base = tiny_model(family)
    ad = random_lora(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    ours = tmp_path / "ours"
    merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(ours), max_shard_size="300KB"))
    ref = tmp_path / "ref"
    AutoModelForCausalLM.from_pretrained(ours).save_pretrained(ref, max_shard_size="300KB")
    a, b = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (ours, ref))
    assert len(set(a["weight_map"].values())) > 1
    assert a == b
