"""Adapters whose init_lora_weights changes the base (PiSSA, OLoRA: LLaMA-Factory's `pissa_init` without
`pissa_convert` leaves exactly such an adapter in its output_dir) merge as PEFT merges them: PEFT subtracts the
base's top-r part when it creates the adapter and again whenever it loads it, and the trained A and B apply to that
residual. References: PEFT's `merge_and_unload` after `PeftModel.from_pretrained`, and the logits of the model PEFT
trained (the residual it started from plus the trained A and B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_merge import DT, _check_tensors, _ours

from exporter.errors import UserError
from exporter.merge import MergeOptions, merge

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]  # PEFT leaves the embedding's base as it is


def _trained(base: Path, out: Path, init: str, ids: torch.Tensor) -> torch.Tensor:
    """A PEFT adapter created with `init` on the float32 base, then "trained" (A and B moved); saved by PEFT.
    Returns the trained model's logits on `ids`: the truth a merge must reproduce."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=init))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.02 * torch.randn_like(p))
        truth = pm(ids).logits.float()
    pm.save_pretrained(out)
    return truth


def _ids(base: Path) -> torch.Tensor:
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _peft_merged(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits.float()


@pytest.mark.parametrize(("init", "dtype"), [("pissa", "bf16"), ("olora", "fp32")])
def test_pissa_and_olora_merge_like_peft(tiny_model, tmp_path, init, dtype, capfd):
    """Every tensor within 1 ulp of PEFT's float32 merge rounded to the output dtype (and no farther from its float64
    merge than PEFT's merge in that dtype); the merged model's logits are the trained model's."""
    base = tiny_model("llama3")
    ids = _ids(base)
    ad = tmp_path / "ad"
    truth = _trained(base, ad, init, ids)
    assert json.loads((ad / "adapter_config.json").read_text())["init_lora_weights"] == init
    out = tmp_path / "m"
    merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(out), dtype=dtype))
    said = capfd.readouterr().err
    ours = _ours(out)
    peft32 = _peft_merged(base, ad, torch.float32)
    native = _peft_merged(base, ad, DT[dtype])
    # PEFT refuses to initialise PiSSA/OLoRA in float64: the float64 reference is its float32 merge
    _check_tensors(ours, peft32, native, {k: v.double() for k, v in peft32.items()}, DT[dtype])
    mine = _logits(out, ids)
    rel = ((mine - truth).abs().max() / truth.abs().max()).item()
    assert rel <= {"bf16": 0.03, "fp32": 1e-4}[dtype], f"merged logits differ from the trained model's by {rel:.2e}"
    assert f"has init_lora_weights={init}" in said, said


def _decaying_spectrum(src: Path, out: Path) -> Path:
    """`src` with every targeted weight's singular values made to fall off (0.6**i), as trained models' do: the top-r
    part randomized SVD finds is then the one it found at training (a random fixture's flat spectrum makes it
    arbitrary)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    for name, t in tensors.items():
        if any(f"{m}.weight" in name for m in TARGETS[:-1]):
            u, sv, vh = torch.linalg.svd(t.float(), full_matrices=False)
            sv = sv[0] * 0.6 ** torch.arange(len(sv), dtype=torch.float32)
            tensors[name] = (u @ torch.diag(sv) @ vh).to(t.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_pissa_niter_residual_is_recomputed(tiny_model, tmp_path, capfd):
    """LLaMA-Factory's default `pissa_iter: 16` (`pissa_niter_16`: randomized SVD): the merge recomputes the residual
    as PEFT's load does, and lands on the trained model."""
    base = _decaying_spectrum(tiny_model("llama3"), tmp_path / "base")
    ids = _ids(base)
    ad = tmp_path / "ad"
    truth = _trained(base, ad, "pissa_niter_16", ids)
    (ad / "pissa_converted").mkdir()
    (ad / "pissa_converted" / "adapter_config.json").write_text("{}")
    out = tmp_path / "m"
    merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(out), dtype="fp32"))
    said = capfd.readouterr().err
    rel = ((_logits(out, ids) - truth).abs().max() / truth.abs().max()).item()
    assert rel <= 1e-3, f"merged logits differ from the trained model's by {rel:.2e}"
    assert "randomized SVD" in said and "pissa_converted" in said, said


def test_base_changing_inits_refused_or_weighted(tiny_model, tmp_path):
    """A weight other than 1 has no meaning for a residual adapter; CorDA / LoftQ residuals cannot be rebuilt: one
    line each, nothing written."""
    base = tiny_model("llama3")
    ad = tmp_path / "ad"
    _trained(base, ad, "pissa", torch.zeros((1, 2), dtype=torch.long))
    with pytest.raises(UserError, match="init_lora_weights='pissa' .* can only be merged with weight 1"):
        merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(tmp_path / "m"), weights=[0.5]))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa_fast"}))
    with pytest.raises(UserError, match="expected 'pissa' or 'pissa_niter_<iterations>'"):
        merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(tmp_path / "m")))
    for init in ("corda", "loftq"):
        (ad / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
        with pytest.raises(UserError, match=rf"init_lora_weights='{init}' trained on a changed base"):
            merge(MergeOptions(base=str(base), adapters=[str(ad)], out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_gguf_lora_of_a_pissa_adapter_is_refused(tiny_model, tmp_path):
    """`exporter gguf --adapter` of a PiSSA adapter: llama.cpp adds B @ A to the unchanged base, the top-r part then
    counted twice; one line, exit 2, nothing written (before: a GGUF LoRA that changed every answer)."""
    import subprocess
    import sys

    base = tiny_model("llama3")
    ad = tmp_path / "ad"
    _trained(base, ad, "pissa_niter_4", torch.zeros((1, 2), dtype=torch.long))
    r = subprocess.run([sys.executable, "-m", "exporter", "gguf", str(base), "--adapter", str(ad), "--out",
                        str(tmp_path / "g")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {ad / 'adapter_config.json'}: init_lora_weights 'pissa_niter_4' trains against the base minus its "
        "top-r part, but llama.cpp adds B @ A to the unchanged base; merge first (exporter merge), or convert the "
        "adapter's pissa_converted/"
    ], r.stderr
    assert not (tmp_path / "g").exists()
