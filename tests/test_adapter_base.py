"""An adapter meets a base (merge, gguf --adapter, export): one trained on another base is refused in one line naming
both, even when every tensor shape fits (the llama3 and qwen2 fixtures have the same shapes). The evidence is what the
adapter carries: the tokenizer `exporter train` saves beside it (a different vocabulary is a definite mismatch) and
the base fingerprint in its manifest (model_type, architectures, sizes, vocabulary; its weights digest and a differing
`base_model_name_or_path` are only notes: a fine-tune of the same model, paths that moved). PEFT adapters from
elsewhere (neither) keep working.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_lora

from exporter import adapter as adapter_mod
from exporter import hf_dir
from exporter.errors import UserError
from exporter.merge import MergeOptions, merge

TARGETS = ["q_proj", "down_proj"]


def _trained(base: Path, out: Path, fingerprint: bool = False) -> Path:
    """An adapter as `exporter train` leaves it: PEFT's files, the base's tokenizer and (optionally) the manifest's
    base fingerprint."""
    random_lora(base, out, r=4, lora_alpha=8, target_modules=TARGETS)
    hf_dir.copy_tokenizer(base, out)
    settings = {adapter_mod.FINGERPRINT_KEY: adapter_mod.base_fingerprint(base)} if fingerprint else {}
    doc = {"stage": "train", "settings": settings, "outputs": []}
    (out / "exporter_manifest.json").write_text(json.dumps(doc), encoding="utf-8")
    return out


def _copy_base(src: Path, out: Path, **config: object) -> Path:
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return out


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *map(str, args)], capture_output=True, text=True)


def _one_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stdout + r.stderr
    return lines[0]


def test_adapter_of_another_base_is_refused_by_merge_gguf_and_export(tiny_model, tmp_path):
    """A Llama-3 adapter (tokenizer beside it, as train writes it) on the shape-identical Qwen2 fixture: exit 2, the
    one line names the adapter and the base, nothing is written (before: Qwen2 weights with a Llama-3 tokenizer)."""
    llama, qwen = tiny_model("llama3"), tiny_model("qwen2")
    ad = _trained(llama, tmp_path / "ad")
    out = tmp_path / "out"
    line = _one_error(_cli("merge", "--base", qwen, "--adapter", ad, "--out", out))
    assert f"adapter {ad} was trained on another base than {qwen}" in line and "tokenizer" in line, line
    line = _one_error(_cli("gguf", qwen, "--adapter", ad, "--out", out))
    assert f"adapter {ad} was trained on another base than {qwen}" in line, line
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"model_name_or_path: {qwen}\nadapter_name_or_path: {ad}\nexport_dir: {out}\n")
    line = _one_error(_cli("export", cfg))
    assert "was trained on another base" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "export.yaml"]


def test_recorded_fingerprint_refuses_other_models(tiny_model, tmp_path):
    """With the manifest's fingerprint, another model_type, architecture or size is a refusal even when the vocabulary
    is the same; the very base at another path passes silently; other weights of the same layout are a note."""
    llama = tiny_model("llama3")
    ad = _trained(llama, tmp_path / "ad", fingerprint=True)
    (ad / "tokenizer.json").unlink()  # the fingerprint alone decides
    (ad / "tokenizer_config.json").unlink()
    check = adapter_mod.check_base
    other = _copy_base(llama, tmp_path / "mistral", model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(UserError, match=rf"adapter x was trained on another base than {other} .*model_type llama"):
        check(ad, other, "x")
    deeper = _copy_base(llama, tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(UserError, match="num_hidden_layers 2, the base has 3"):
        check(ad, deeper, "x")
    moved = shutil.copytree(llama, tmp_path / "elsewhere" / "renamed")
    assert check(ad, moved, "x") is None  # same weights: even the differing path says nothing
    tuned = shutil.copytree(llama, tmp_path / "tuned")
    weights = tuned / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 1  # a bit of the first tensor: another fine-tune, same layout
    weights.write_bytes(bytes(data))
    note = check(ad, tuned, "x")
    assert note is not None and note.startswith(f"note: the weights of {tuned} are not the ones adapter x"), note


def test_adapter_tokenizer_must_hold_the_base_vocabulary(tiny_model, tmp_path):
    """The adapter's tokenizer may add tokens (resized vocabulary) but every base token keeps its id."""
    qwen = tiny_model("qwen2")
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    doc = json.loads((qwen / "tokenizer.json").read_text())
    top = max(t["id"] for t in doc["added_tokens"])
    doc["added_tokens"].append({**doc["added_tokens"][-1], "id": top + 1, "content": "<|new|>"})
    (ad / "tokenizer.json").write_text(json.dumps(doc))
    assert adapter_mod.check_base(ad, qwen, "x") is None
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (ad / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=rf"token {re.escape(repr(a))} is id 300 in the base, id 301 in the adapter's"):
        adapter_mod.check_base(ad, qwen, "x")


def test_foreign_adapter_merges_with_at_most_a_note(tiny_model, tmp_path, capfd):
    """A PEFT adapter without tokenizer or manifest merges as before; a base_model_name_or_path naming another model
    is one note line, one naming the same model (a hub cache path, a local copy) none."""
    qwen = tiny_model("qwen2")
    ad = random_lora(qwen, tmp_path / "ad", r=4, lora_alpha=8, target_modules=TARGETS)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someorg/other-model"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    merge(MergeOptions(base=str(qwen), adapters=[str(ad)], out=str(tmp_path / "m")))
    notes = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("note: adapter")]
    assert notes == [f"note: adapter {ad} was trained on someorg/other-model (adapter_config.json); using the base "
                     f"{qwen}"], notes  # fmt: skip
    cfg["base_model_name_or_path"] = "/hub/models--someorg--qwen2/snapshots/abc123"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_mod.check_base(ad, qwen, "x") is None


def test_vocabulary_reader_agrees_across_tokenizer_files(tiny_model, tmp_path):
    """tokenizer.model (SentencePiece) and the tokenizer.json built from it give the same ids; so do vocab.json and
    tokenizer.json of a BPE vocabulary."""
    llama2 = tiny_model("llama2")
    spm_only = tmp_path / "spm"
    spm_only.mkdir()
    shutil.copy(llama2 / "tokenizer.model", spm_only)
    assert hf_dir.vocabulary(spm_only) == hf_dir.vocabulary(llama2)
    qwen = tiny_model("qwen2")
    doc = json.loads((qwen / "tokenizer.json").read_text())
    plain = tmp_path / "bpe"
    plain.mkdir()
    (plain / "vocab.json").write_text(json.dumps(doc["model"]["vocab"]))
    (plain / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in doc["added_tokens"]}))
    assert hf_dir.vocabulary(plain) == hf_dir.vocabulary(qwen)
    assert hf_dir.vocabulary(tmp_path) is None


@pytest.mark.parametrize("family", ["phi3", "mistral"])
def test_same_base_without_tokenizer_json_is_no_other_base(tiny_model, tmp_path, family):
    """A copy of the base without tokenizer.json is the same model: tokenizer.model plus the tokens transformers keeps
    in tokenizer_config.json's `added_tokens_decoder` (Phi-3's, Mistral's control tokens) is the same vocabulary, and an
    adapter trained on either copy merges into the other (it was refused: 'the base's vocabulary differs from the one
    recorded'). An adapter without a tokenizer is still checked against the recorded vocabulary."""
    base = tiny_model(family)
    spm_only = shutil.copytree(base, tmp_path / "spm")
    (spm_only / "tokenizer.json").unlink()
    assert hf_dir.vocabulary(spm_only) == hf_dir.vocabulary(base)
    for trained_on, merged_into in ((spm_only, base), (base, spm_only)):
        ad = _trained(trained_on, tmp_path / f"ad-{trained_on.name}", fingerprint=True)
        note = adapter_mod.check_base(ad, merged_into, str(ad))  # at most the note that the path differs
        assert note is None or note.startswith("note: adapter"), note
    bare = _trained(base, tmp_path / "bare", fingerprint=True)
    for name in hf_dir.tokenizer_files(bare):
        (bare / name).unlink()
    other = _copy_base(base, tmp_path / "other")
    doc = json.loads((other / "tokenizer.json").read_text())
    doc["added_tokens"][0]["content"] = "<|renamed|>"
    (other / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="the base's vocabulary differs from the one recorded"):
        adapter_mod.check_base(bare, other, str(bare))
