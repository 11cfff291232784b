"""`exporter merge` against PEFT: adapters are built with PEFT itself, merged by ours and by `merge_and_unload()`.

Per tensor: ours is within 1 ulp (of the output dtype) of PEFT's merge, and at least as close as PEFT's to PEFT's
merge done in float64. Per model: the merged model's logits equal PEFT-with-adapter logits.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exporter.merge import MergeOptions, merge

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MANT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_MIN_EXP = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}
# max |logit difference| / max |logit| allowed between the merged model and PEFT-with-adapter, per dtype
_LOGIT_TOL = {torch.bfloat16: 0.03, torch.float16: 0.004, torch.float32: 1e-4}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (x given in float64)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** _MIN_EXP[dtype])))
    return torch.pow(2.0, e - _MANT[dtype])


def _load_base(base: Path, dtype: torch.dtype, vocab: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


def _make_adapter(base: Path, out: Path, seed: int, vocab: int | None = None, **lora) -> Path:
    """A PEFT adapter with random non-zero B (and perturbed DoRA magnitudes / saved modules), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = _load_base(base, torch.float32, vocab)
    lora.setdefault("r", 8)
    lora.setdefault("lora_alpha", 16)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    if vocab is not None:  # training with new tokens writes the resized tokenizer next to the adapter
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        tok.add_tokens([f"<new_tok_{i}>" for i in range(vocab - len(tok))])
        tok.save_pretrained(out)
    return out


def _peft_models(base: Path, adapters: list[Path], weights: list[float], dtype: torch.dtype, vocab=None):
    """(PEFT merge_and_unload in dtype, applied adapter by adapter) and a forward function of PEFT-with-adapters."""
    from peft import PeftModel

    def scaled(model, path, w):
        pm = PeftModel.from_pretrained(model, path)
        for module in pm.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                for k in module.scaling:
                    module.scaling[k] *= w
        return pm

    merged = _load_base(base, dtype, vocab)
    for path, w in zip(adapters, weights, strict=True):
        merged = scaled(merged, path, w).merge_and_unload()
    return merged


def _peft_logits(base: Path, adapters: list[Path], weights: list[float], ids: torch.Tensor, vocab=None):
    """Logits of the unmerged PEFT model in float32 (stacked adapters: all active at once)."""
    from peft import PeftModel

    model = _load_base(base, torch.float32, vocab)
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        pm.load_adapter(path, adapter_name=f"a{i}")
    pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    for module in pm.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            for k in module.scaling:
                module.scaling[k] *= weights[int(k[1:])]
    with torch.no_grad():
        return pm(ids).logits.float()


def _ours(out: Path) -> dict[str, torch.Tensor]:
    index = out / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        with safe_open(out / f, "pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    return tensors


def _saved(model, names: set[str], where: Path) -> dict[str, torch.Tensor]:
    """The model's tensors under the checkpoint's `names`: transformers 5 fuses MoE experts in memory and
    save_pretrained writes them back one per expert, as released checkpoints (and our merge of them) have them."""
    sd = model.state_dict()
    if names <= set(sd):
        return sd
    model.save_pretrained(where)
    return _ours(where)


def fused_checkpoint(model: Path, out: Path) -> Path:
    """`model` saved as transformers 5 holds it, experts fused (save_original_format=False), tokenizer alongside."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model).save_pretrained(out, save_original_format=False)
    for f in model.iterdir():
        if not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def _check_tensors(ours, peft32_sd, peft_sd, ref_sd, dtype):
    """Every tensor: dtype and shape; within 1 ulp of PEFT's float32 merge rounded to `dtype`; no farther from the
    float64 merge than PEFT's own merge in `dtype` (which rounds twice: the delta, then the sum)."""
    for name, mine in ours.items():
        assert mine.dtype == dtype, name
        assert mine.shape == peft_sd[name].shape, name
        a, b = mine.double(), peft32_sd[name].to(dtype).double()
        ulp = torch.maximum(_ulp(a, dtype), _ulp(b, dtype))
        worst = ((a - b).abs() / ulp).max().item()
        assert worst <= 1.0, f"{name}: {worst:.2f} ulp from PEFT's merge"
        ref, native = ref_sd[name].double(), peft_sd[name].double()
        ours_err, peft_err = (a - ref).abs().sum().item(), (native - ref).abs().sum().item()
        assert ours_err <= peft_err * (1 + 1e-9) + 1e-30, f"{name}: farther from float64 ({ours_err} > {peft_err})"


def _check_logits(out: Path, base: Path, adapters, weights, dtype, vocab=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    n = vocab or json.loads((base / "config.json").read_text()).get("vocab_size", 256)
    ids = torch.randint(0, min(n, 4000), (2, 12))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    with torch.no_grad():
        mine = model(ids).logits.float()
    ref = _peft_logits(base, adapters, weights, ids, vocab)
    rel = ((mine - ref).abs().max() / ref.abs().max()).item()
    assert rel <= _LOGIT_TOL[dtype], f"logits differ from PEFT-with-adapter by {rel:.2e} (relative)"
    return mine, ref


def _run_case(base, tmp_path, variants, dtype_name, weights=None, vocab=None, shard=None, template=None):
    """Build adapters, merge with ours and PEFT, compare tensors and logits. Returns our output dir."""
    dtype = DT[dtype_name]
    adapters = [_make_adapter(base, tmp_path / f"ad{i}", seed=10 + i, vocab=vocab, **v) for i, v in enumerate(variants)]
    weights = weights or [1.0] * len(adapters)
    out = tmp_path / "merged"
    kwargs = {"max_shard_size": shard} if shard else {}
    merge(
        MergeOptions(
            base=base, adapters=adapters, weights=weights, out=out, dtype=dtype_name, template=template, **kwargs
        )
    )
    ours = _ours(out)
    peft_sd, peft32_sd, ref_sd = (
        _saved(_peft_models(base, adapters, weights, dt, vocab), set(ours), tmp_path / str(dt).replace("torch.", ""))
        for dt in (dtype, torch.float32, torch.float64)
    )
    assert set(ours) <= set(peft_sd), set(ours) - set(peft_sd)
    _check_tensors(ours, peft32_sd, peft_sd, ref_sd, dtype)
    _check_logits(out, base, adapters, weights, dtype, vocab)
    return out


PHI3 = dict(target_modules=ALL_LINEAR, use_rslora=True, r=16, lora_alpha=8, modules_to_save=["norm", "lm_head"])
CASES = [
    # (family, [LoraConfig kwargs per adapter], output dtype, weights)
    ("llama3", [dict(target_modules="all-linear")], "bf16", None),
    ("qwen3", [dict(target_modules="all-linear", use_dora=True)], "bf16", None),
    ("mistral", [dict(target_modules=["q_proj", "v_proj", "embed_tokens"])], "fp16", None),
    ("qwen2", [dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)], "bf16", None),
    (
        "phi3",
        [PHI3],
        "fp32",
        None,
    ),
    (
        "llama2",
        [
            dict(target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 32}),
            dict(target_modules=["q_proj", "o_proj"], r=4),
        ],
        "fp32",
        [0.5, 1.5],
    ),
    # MoE experts: PEFT parameter LoRA on transformers 5's fused 3-D experts; the checkpoints keep one tensor per
    # expert (Qwen3-MoE gate_proj/up_proj/down_proj, Mixtral w1/w3/w2 under block_sparse_moe)
    ("qwen3_moe", [dict(target_modules="all-linear", target_parameters=EXPERTS)], "bf16", None),
    (  # two adapters (PEFT wants the same parameters targeted by both), one parameter: no ParamWrapper nesting
        "mixtral",
        [
            dict(target_modules=["q_proj", "o_proj"], target_parameters=["mlp.experts.down_proj"], use_rslora=True),
            dict(target_modules=["v_proj"], target_parameters=["mlp.experts.down_proj"], r=4, lora_alpha=16),
        ],
        "fp16",
        [1.0, 0.5],
    ),
    ("gemma2", [dict(target_modules="all-linear", use_dora=True)], "bf16", None),
    ("mistral_nemo", [dict(target_modules="all-linear")], "fp16", None),  # head_dim != hidden / heads
    (  # fused gate_up; lora_bias on the q/k/v biases
        "glm4",
        [dict(target_modules="all-linear"), dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)],
        "bf16",
        None,
    ),
    ("granite", [dict(target_modules="all-linear", modules_to_save=["lm_head"])], "bf16", None),  # tied: unties
    ("olmo2", [dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"])], "bf16", None),
    ("smollm3", [dict(target_modules="all-linear")], "bf16", None),
]


@pytest.mark.parametrize(
    "family,variants,dtype,weights", CASES, ids=[c[0] + ("-bias" if c[1][0].get("lora_bias") else "") for c in CASES]
)
def test_merge_equals_peft(tiny_model, tmp_path, family, variants, dtype, weights):
    out = _run_case(tiny_model(family), tmp_path, variants, dtype, weights)  # the model's own template, derived or not
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == str(DT[dtype]).removeprefix("torch.")
    manifest = json.loads((out / "exporter_manifest.json").read_text())
    assert manifest["stage"] == "merge" and manifest["outputs"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_expert_checkpoint_equals_peft(family, tiny_model, tmp_path):
    """A checkpoint that keeps transformers 5's fused experts (3-D gate_up_proj / down_proj): the experts' LoRA lands
    on the fused tensors themselves, equal to PEFT's merge."""
    base = fused_checkpoint(tiny_model(family), tmp_path / "fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in _ours(base)
    variant = dict(target_modules=["q_proj"], target_parameters=EXPERTS)
    _run_case(base, tmp_path, [variant], "fp32")  # fp32: bf16 may flip a routing choice


def test_dora_on_embeddings_and_sharding(tiny_model, tmp_path):
    """DoRA on the embedding (norm over vocab columns: the whole-tensor path) and small shards with an index."""
    v = dict(target_modules=["embed_tokens", "q_proj", "down_proj"], use_dora=True)
    out = _run_case(tiny_model("llama3"), tmp_path, [v], "fp32", shard="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "family,variant",
    [
        ("qwen2", dict(target_modules=["lm_head", "q_proj"])),
        ("gemma3", dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"])),
    ],
    ids=["qwen2-lm_head-lora", "gemma3-saved-embed"],
)
def test_tied_embeddings_untie(tiny_model, tmp_path, family, variant, capfd):
    """A change to lm_head or embed_tokens of a tied model: both tensors written, tie_word_embeddings false."""
    base = tiny_model(family)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(base).get_text_config().tie_word_embeddings
    ad = _make_adapter(base, tmp_path / "ad", seed=3, **variant)
    out = tmp_path / "merged"
    merge(MergeOptions(base=base, adapters=[ad], out=out, dtype="fp32"))
    assert "tie_word_embeddings" in capfd.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    ours = _ours(out)
    embed = next(k for k in ours if k.endswith("embed_tokens.weight"))
    assert "lm_head.weight" in ours
    base_model = _load_base(base, torch.float32)
    # the untouched side keeps the base's (shared) weights exactly
    untouched = embed if "lm_head" in variant["target_modules"] else "lm_head.weight"
    assert torch.equal(ours[untouched], base_model.get_input_embeddings().weight.detach())
    # the touched side equals PEFT's merge of that module
    peft_sd = _peft_models(base, [ad], [1.0], torch.float32).state_dict()
    touched = "lm_head.weight" if untouched == embed else embed
    ref_sd = _peft_models(base, [ad], [1.0], torch.float64).state_dict()
    _check_tensors({touched: ours[touched]}, peft_sd, peft_sd, ref_sd, torch.float32)
    _check_logits(out, base, [ad], [1.0], torch.float32)


def test_resized_vocab_tokenizer_from_adapter(tiny_model, tmp_path):
    """An adapter trained with new tokens: embeddings of the adapter's size, the adapter's tokenizer."""
    base = tiny_model("qwen2")
    n = json.loads((base / "config.json").read_text())["vocab_size"]
    vocab = n + 8
    out = _run_case(
        base,
        tmp_path,
        [dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])],
        "bf16",
        vocab=vocab,
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size")) == vocab
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == vocab


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_conv1d(tiny_model, tmp_path, dora):
    """GPT-2 style Conv1D weights (stored in x out): PEFT's fan_in_fan_out layout, with and without DoRA."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    qwen = tiny_model("qwen2")
    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(qwen))
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(base)
    for f in qwen.iterdir():  # the qwen fixture's tokenizer (ChatML template)
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")):
            shutil.copy2(f, base / f.name)
    v = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=dora)
    _run_case(base, tmp_path, [v], "fp32", template="qwen-2.5")


def test_output_files_and_template(tiny_model, tmp_path):
    """Tokenizer, chat template (adapter's wins) and generation_config eos include the template's end-of-turn."""
    from transformers import AutoTokenizer

    from exporter import templates

    base = tiny_model("qwen3")
    ad = _make_adapter(base, tmp_path / "ad", seed=5, target_modules=["q_proj"])
    base_tok = AutoTokenizer.from_pretrained(base)
    base_tok.save_pretrained(ad)  # training writes its tokenizer and template next to the adapter
    out = tmp_path / "merged"
    merge(MergeOptions(base=base, adapters=[ad], out=out))
    tpl = templates.resolve(ad, None)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tpl.jinja
    assert (out / "chat_template.jinja").read_text() == tpl.jinja
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = [eos] if isinstance(eos, int) else eos
    for t in tpl.eot_tokens:
        assert tok.convert_tokens_to_ids(t) in eos
    # default dtype: the base's
    base_st = _ours(base)
    for k, t in _ours(out).items():
        assert t.dtype == base_st[k].dtype, k


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "merge", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_bad_inputs_cli(tiny_model, tmp_path):
    """Each bad input: exit 2, one clear line naming the problem, nothing at --out."""
    llama = tiny_model("llama3")
    ad = _make_adapter(llama, tmp_path / "ad", seed=7, target_modules=["q_proj", "down_proj"])

    def bad(adapter: Path, pattern: str, base: Path = llama) -> None:
        out = tmp_path / "out"
        r = _cli("--base", str(base), "--adapter", str(adapter), "--out", str(out))
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert re.search(pattern, lines[0]), lines[0]
        assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))

    from safetensors.torch import load_file, save_file

    # adapter for another base (narrower input): names the tensor and both shapes
    other = tmp_path / "other"
    shutil.copytree(ad, other)
    sd = load_file(other / "adapter_model.safetensors")
    key = next(k for k in sd if "layers.0.self_attn.q_proj.lora_A" in k)
    sd[key] = sd[key][:, :64].contiguous()
    save_file(sd, other / "adapter_model.safetensors")
    bad(other, r"another base: tensor model\.layers\.0\.self_attn\.q_proj\.weight is \[\d+, \d+\] .*\[\d+, 64\]")
    # target module absent from the base
    gone = tmp_path / "gone"
    shutil.copytree(ad, gone)
    cfg = json.loads((gone / "adapter_config.json").read_text())
    sd = load_file(gone / "adapter_model.safetensors")
    sd = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.nope_proj"): v for k, v in sd.items()}
    save_file(sd, gone / "adapter_model.safetensors")
    bad(gone, r"target module model\.layers\.0\.self_attn\.nope_proj\.weight is absent")
    # non-finite values after merge: names the tensor
    inf = tmp_path / "inf"
    shutil.copytree(ad, inf)
    sd = load_file(inf / "adapter_model.safetensors")
    key = next(k for k in sd if "layers.1.mlp.down_proj.lora_B" in k)
    sd[key][0, 0] = float("inf")
    save_file(sd, inf / "adapter_model.safetensors")
    bad(inf, r"tensor model\.layers\.1\.mlp\.down_proj\.weight: non-finite")
    # truncated adapter safetensors
    trunc = tmp_path / "trunc"
    shutil.copytree(ad, trunc)
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad(trunc, r"truncated safetensors")
    # truncated base shard
    tb = tmp_path / "tbase"
    shutil.copytree(llama, tb)
    shard = sorted(tb.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    bad(ad, r"truncated safetensors", base=tb)
    # corrupt header
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ad, corrupt)
    raw = bytearray((corrupt / "adapter_model.safetensors").read_bytes())
    raw[8:16] = b"\xff" * 8
    (corrupt / "adapter_model.safetensors").write_bytes(bytes(raw))
    bad(corrupt, r"corrupt safetensors")
    # missing adapter_config.json
    nocfg = tmp_path / "nocfg"
    shutil.copytree(ad, nocfg)
    (nocfg / "adapter_config.json").unlink()
    bad(nocfg, r"missing adapter_config\.json")
    assert cfg  # the config we copied was a real PEFT config


def test_refuses_existing_out(tiny_model, tmp_path):
    base = tiny_model("llama3")
    ad = _make_adapter(base, tmp_path / "ad", seed=9, target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = _cli("--base", str(base), "--adapter", str(ad), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and (out / "keep").exists()
    r = _cli("--base", str(base), "--adapter", str(ad), "--out", str(out), "--force")  # not ours: never replaced
    assert r.returncode == 2 and "not an exporter output" in r.stderr and (out / "keep").exists()
    (out / "keep").unlink()
    merge(MergeOptions(base=base, adapters=[ad], out=out))  # an empty dir is fine
    merge(MergeOptions(base=base, adapters=[ad], out=out, force=True))  # our own output is replaced with --force
    assert (out / "config.json").exists()


def test_weight_scales_lora_and_interpolates_saved_modules(tiny_model, tmp_path):
    """--weight w: LoRA deltas scaled by w (PEFT with scaling * w); a saved module becomes W + w * (saved - W)."""
    from safetensors.torch import load_file

    base = tiny_model("mistral")
    ad = _make_adapter(base, tmp_path / "ad", seed=11, target_modules=["q_proj"], modules_to_save=["norm"])
    out = tmp_path / "merged"
    merge(MergeOptions(base=base, adapters=[ad], weights=[0.25], out=out, dtype="fp32"))
    ours = _ours(out)
    lora = {k: v for k, v in ours.items() if "norm" not in k}
    peft32 = _peft_models(base, [ad], [0.25], torch.float32).state_dict()
    ref = _peft_models(base, [ad], [0.25], torch.float64).state_dict()
    _check_tensors(lora, peft32, peft32, ref, torch.float32)
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(ad / "adapter_model.safetensors").items()}
    base_sd = _load_base(base, torch.float64).state_dict()
    norms = [k for k in ours if k.endswith("norm.weight")]
    assert norms and all(k in saved for k in norms)
    for k in norms:
        want = (base_sd[k] + 0.25 * (saved[k].double() - base_sd[k])).float()
        assert torch.allclose(ours[k], want, rtol=0, atol=1e-6), k
        assert not torch.equal(ours[k], saved[k].float())


def test_bin_adapter_same_as_safetensors(tiny_model, tmp_path):
    """adapter_model.bin (older PEFT saves) merges to the same bytes as adapter_model.safetensors."""
    from safetensors.torch import load_file

    base = tiny_model("llama2")
    st = _make_adapter(base, tmp_path / "st", seed=4, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    binad = shutil.copytree(st, tmp_path / "bin")
    torch.save(load_file(binad / "adapter_model.safetensors"), binad / "adapter_model.bin")
    (binad / "adapter_model.safetensors").unlink()
    merge(MergeOptions(base=base, adapters=[st], out=tmp_path / "a"))
    merge(MergeOptions(base=base, adapters=[binad], out=tmp_path / "b"))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_shard_plan_and_names_match_huggingface_hub():
    """--max-shard-size reads sizes as huggingface_hub does (GB = 10^9, GiB = 2^30), and the tensors go into shards
    as its `split_torch_state_dict_into_shards` puts them (a shard filled exactly to the limit is not split),
    named model-00001-of-0000N.safetensors (model.safetensors alone)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from huggingface_hub.serialization._base import parse_size_to_int

    from exporter.shards import PlannedTensor, parse_size, plan_shards, shard_names

    for size in ("2GB", "500MB", "300KB", "5TB"):
        assert parse_size(size) == parse_size_to_int(size), size
    assert parse_size("1GiB") == 2**30 and parse_size("500MiB") == 500 * 2**20
    # float32: 400+600 bytes, 800+200, 500+500 fill 1000-byte shards exactly; 1000 alone fills the last one
    state = {f"t{i}": torch.zeros(n) for i, n in enumerate([100, 150, 200, 50, 125, 125, 250])}
    for limit in (1000, 10_000):
        ours = plan_shards([PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in state.items()], limit)
        ref = split_torch_state_dict_into_shards(
            state, max_shard_size=limit, filename_pattern="model{suffix}.safetensors"
        )
        got = {name: [t.name for t in shard] for name, shard in zip(shard_names(len(ours)), ours, strict=True)}
        assert got == ref.filename_to_tensors, limit
