"""Each newer architecture through the whole chain with `exporter pipeline` and the model's own chat template (the
published one, derived, for Qwen3-MoE, Gemma 2, Mistral Nemo, GLM-4.6, Granite 3.3 and SmolLM3): LoRA training (MoE
experts included), merge, GGUF, and verify's checks (template, stops, tokenizer ids HF == llama.cpp, perplexity on the
same ids, greedy answers HF == llama.cpp token for token). Stage by stage references are in test_merge.py (PEFT),
test_gguf.py (llama.cpp's converter and runtime) and test_spm.py (tokenizers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MORE, pipeline_yaml, require_llama_cpp
from safetensors import safe_open

from exporter import pipeline
from exporter.adapter import load_adapter


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", MORE)
def test_chain(family, tiny_model, tmp_path: Path) -> None:
    require_llama_cpp()
    base = tiny_model(family)
    train = {"lora_target": "all", "lora_rank": 8, "max_steps": 2, "learning_rate": 5e-3, "logging_steps": 1,
             "max_samples": 8}  # fmt: skip
    # a random model's perplexity runs to 1e8: its answers sit far out in the tails, where the bf16 rounding of
    # the merged weights moves log-probabilities more than on a real model (KL stays ~1e-9, top-1 100%)
    verify = {"prompts": 2, "max_new_tokens": 8, "ctx": 64, "max_windows": 2, "ppl_threshold": {"adapter": 0.01}}
    path = pipeline_yaml(tmp_path, base, tmp_path / "run", None, train=train, gguf={"ollama_name": "t"}, verify=verify)
    res = pipeline.run(pipeline.load_config(path, []))
    checks = json.loads(res.report.read_text())["checks"]
    assert res.passed, [c for c in checks if c["status"] != "pass"]
    kinds = {c["check"] for c in checks if c["status"] == "pass"}
    assert {"template", "stops", "tokenizer", "perplexity", "chat"} <= kinds, kinds

    run = tmp_path / "run"
    adapter = load_adapter(run / "adapter", 1.0, "trained")
    merged, before = _tensors(run / "merged"), _tensors(base)
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert any(".q_proj." in k for k in changed), "attention LoRA did not reach the merged weights"
    if family in ("qwen3_moe", "mixtral"):  # `lora_target: all` trains the experts, and merge folds them in
        assert adapter.experts, "no LoRA on the experts"
        assert any(".experts.1." in k for k in changed), "expert LoRA did not reach the merged weights"


EXPERTS = {"down_proj", "gate_up_proj"}  # transformers 5's fused expert parameters


@pytest.mark.parametrize(
    ("lora_target", "modules", "params"),
    [
        # all-linear, which PEFT expands; PEFT adds the router (mlp.gate.weight) to the expert parameters
        ("all", {"q_proj", "k_proj", "v_proj", "o_proj"}, EXPERTS | {"weight"}),
        ("q_proj,experts", {"q_proj"}, EXPERTS),
        ("v_proj,gate_up_proj", {"v_proj"}, {"gate_up_proj"}),
        ("q_proj,gate_proj,up_proj,down_proj", {"q_proj"}, EXPERTS),  # LLaMA-Factory's names, which PEFT converts
    ],
)
def test_lora_target_on_moe_experts(lora_target, modules, params, tiny_model) -> None:
    """`lora_target` on an MoE model, as PEFT receives it: `all` adds the fused expert parameters all-linear does not
    reach; expert names select them; transformers 4 names (LLaMA-Factory configs) go to PEFT, which converts them;
    PEFT then really trains expert LoRA weights."""
    from exporter import lf_args, tuning

    base = tiny_model("qwen3_moe")
    cfg, _ = lf_args.config_from_args(
        ["--model_name_or_path", str(base), "--output_dir", "o", "--lora_target", lora_target, "--lora_rank", "4"]
    )
    model = tuning.load_model(cfg, base, "cpu")
    peft_cfg = model.peft_config["default"]
    assert set(peft_cfg.target_modules) == modules
    assert {p.rsplit(".", 1)[-1] for p in peft_cfg.target_parameters} == params
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "experts" in n and "lora_" in n]
    assert trained, f"lora_target {lora_target}: no trainable LoRA weights on the experts"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora_target", "experts", "--lora_dropout", "0.1"], "works without lora_dropout and DoRA only"),
        (["--lora_target", "all", "--use_dora", "true"], "works without lora_dropout and DoRA only"),
        (["--lora_target", "expert"], "no linear layer or expert parameter of that name.*did you mean 'experts'"),
    ],
)
def test_lora_target_on_moe_experts_refused(flags, message, tiny_model) -> None:
    from exporter import lf_args, tuning
    from exporter.errors import UserError

    base = tiny_model("qwen3_moe")
    cfg, _ = lf_args.config_from_args(["--model_name_or_path", str(base), "--output_dir", "o", *flags])
    with pytest.raises(UserError, match=message):
        tuning.load_model(cfg, base, "cpu")
