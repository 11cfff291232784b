"""Qwen2/Qwen3 (and their MoE) configs with `use_sliding_window: true`: transformers gives some layers a sliding
window (Qwen2/Qwen3: from `max_window_layers` on; Qwen2-MoE: every other layer below it; Qwen3-MoE: all; or as
`layer_types` says), llama.cpp's qwen2/qwen3 graphs attend over the whole context in every layer. Such a model is
refused in one line naming the key and the layers; one whose config only looks like it (the window off, or no layer
sliding) converts. The reference for which layers slide is transformers itself: each attention module's own window.
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_arch_added import model_of

from exporter.errors import UserError

CASES = {  # per family: configs where transformers slides some layers and configs where it slides none
    "qwen2": [
        {"use_sliding_window": True, "max_window_layers": 1},  # layer 1 slides
        {"use_sliding_window": True, "max_window_layers": 2},  # none
        {"use_sliding_window": True, "max_window_layers": 0, "sliding_window": None},  # no window: none
        {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]},  # layer 0
        {"use_sliding_window": False, "max_window_layers": 0},  # the window is off: none
    ],
    "qwen3": [
        {"use_sliding_window": True, "max_window_layers": 0},  # both
        {"use_sliding_window": True, "max_window_layers": 2},  # none
    ],
    "qwen2_moe": [
        {"use_sliding_window": True, "max_window_layers": 2},  # layer 0 (every other one below 2)
        {"use_sliding_window": True, "max_window_layers": 0},  # none
    ],
    "qwen3_moe": [
        {"use_sliding_window": True},  # every layer
        {"use_sliding_window": False},  # none
    ],
}


def _sliding_in_transformers(model) -> list[int]:
    """The layers whose attention module transformers builds with a sliding window."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return [i for i, layer in enumerate(hf.model.layers) if getattr(layer.self_attn, "sliding_window", None)]


@pytest.mark.parametrize("family", CASES)
def test_sliding_layers_are_refused_as_transformers_slides_them(family, tmp_path):
    """Each config: refused (naming the key and transformers' sliding layers, no output) exactly when transformers
    slides a layer, converted otherwise; each family's cases have both outcomes."""
    from exporter import templates
    from exporter.gguf import export

    outcomes = set()
    for i, edit in enumerate(CASES[family]):
        model = shutil.copytree(model_of(family), tmp_path / f"m{i}")
        cfg = {k: v for k, v in json.loads((model / "config.json").read_text()).items() if k != "layer_types"}
        (model / "config.json").write_text(json.dumps({**cfg, "sliding_window": 4096, **edit}))
        sliding = _sliding_in_transformers(model)
        outcomes.add(bool(sliding))
        tpl, out = templates.resolve(model, None), tmp_path / f"out{i}"
        if sliding:
            shown = ", ".join(map(str, sliding))
            with pytest.raises(
                UserError, match=rf"use_sliding_window is true, so transformers gives layer\(s\) {shown} a"
            ):
                export(model, ["f16"], tpl, out)
            assert not out.exists(), edit
        else:
            assert export(model, ["f16"], tpl, out).files["f16"].is_file(), edit
    assert outcomes == {True, False}, f"{family}: the cases no longer cover both outcomes"


def test_sliding_key_types_are_checked(tmp_path):
    """A wrong type in the keys read is the usual one-line refusal."""
    from exporter import templates
    from exporter.gguf import export

    model = shutil.copytree(model_of("qwen2"), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": "yes"}))
    with pytest.raises(UserError, match="use_sliding_window is 'yes'; expected true or false"):
        export(model, ["f16"], templates.resolve(model, None), tmp_path / "out")
