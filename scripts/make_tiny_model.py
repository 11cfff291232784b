#!/usr/bin/env python
"""Build small random-init, deterministic HF models of the chat families exporter supports (test fixtures).

    python scripts/make_tiny_model.py FAMILY OUT [--size tiny|bench] [--seed N] [--real-vocab] [--force]

Each output is a complete HF dir: config.json, model.safetensors (bench: 4 shards + index), a fast tokenizer
(tokenizer.json, tokenizer_config.json with the chat template, special_tokens_map.json, chat_template.jinja;
SentencePiece families also ship tokenizer.model) and generation_config.json with the family's end-of-turn ids.

Tokenizers are trained here on `data/corpus/*.txt` (SentencePiece BPE with byte fallback, or byte-level BPE with
the family's pre-tokenizer regex); `--real-vocab` instead rebuilds the family's real vocabulary from the
llama.cpp sdist named by $EXPORTER_LLAMA_SRC. Weights never come from torch's global RNG: every tensor is drawn
from its own generator seeded by (seed, tensor name), so two builds give identical bytes.
Importable: `make(family, out, size="tiny", seed=0, real_vocab=False) -> Path`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "data" / "corpus"
FAMILIES = (
    "llama2",
    "llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "phi3",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "mistral_nemo",
    "glm4",
    "granite",
    "olmo2",
    "smollm3",
    "gemma",
    "qwen2_moe",
    "ernie4_5",
    "cohere",
    "ernie4_5_moe",
    "cohere2",
)

# Llama 3 / Qwen2 pre-tokenizer regexes, as published in those models' tokenizer.json files.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's tekken (Nemo, Small 3) as its tokenizer.json has it
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# byte-level BPE styles: (split regex, or None for GPT-2's ByteLevel regex after single digits; NFC; ignore_merges)
BPE_STYLES: dict[str, tuple[str | None, bool, bool]] = {
    "llama3": (LLAMA3_REGEX, False, False),  # also OLMo 2 (cl100k)
    "qwen2": (QWEN2_REGEX, True, False),
    "tekken": (TEKKEN_REGEX, False, True),
    "glm4": (LLAMA3_REGEX, False, True),
    "starcoder": (None, False, False),  # Granite
}

_QWEN25_ADDED = [  # (content, special) in Qwen2.5's order; <tool_call> tags are added but not special
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
_QWEN3_EXTRA = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]
_LLAMA3_ADDED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 8)]
_PHI3_ADDED = [  # appended after the SentencePiece vocab, as in Phi-3 (ids 32000..32010 there)
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
_NEMO_HEAD = [  # tekken's control tokens at ids 0.. (Nemo has 1000 of them, <SPECIAL_n> up to 999)
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "<pad>",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
] + [f"<SPECIAL_{i}>" for i in range(14, 20)]
_GLM4_ADDED = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
]
_GRANITE_HEAD = ["<|end_of_text|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>"]
_GRANITE_ADDED = ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"]
_SMOLLM3_ADDED = [  # at Llama 3's reserved ids 128000.. (SmolLM3 reuses Llama 3's vocabulary)
    ("<|begin_of_text|>", True),
    ("<|end_of_text|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
]
_COHERE_HEAD = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>"]
_COHERE_ADDED = ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                 "<|SYSTEM_TOKEN|>"]  # fmt: skip
_MISTRAL_CONTROL = [
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """What a family's fixture looks like: architecture, tokenizer kind, special tokens, ids, dtype."""

    name: str
    template: str  # exporter template name
    arch: str  # HF architecture class
    tokenizer_class: str
    kind: str  # "spm" (SentencePiece BPE, byte fallback) or "bpe" (byte-level BPE)
    spm_head: tuple[str, ...] = ()  # pieces at ids 0.. (SentencePiece control/unk, or BPE special tokens)
    added: tuple[tuple[str, bool], ...] = ()  # tokens appended after the trained vocab: (content, special)
    bos: str | None = None
    eos: str = ""
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    gen_eos: tuple[str, ...] = ()  # generation_config eos_token_id, in the real model's order
    dtype: str = "bfloat16"
    tie: bool = False
    vocab_multiple: int = 1  # pad the embedding rows to a multiple of this (Qwen/Phi-3 pad theirs)
    spm_dummy_prefix: bool = True
    rstrip: tuple[str, ...] = ()  # added tokens that eat the whitespace on their right (Phi-3's)
    real_vocab: str = ""  # ggml-vocab-<name>.gguf
    trained_size: int = 1600
    config_eos_list: bool = False  # config.json eos_token_id is the generation list (else the tokenizer's eos)
    bpe_style: str = "qwen2"  # key of BPE_STYLES
    real_template: str = ""  # published Jinja in the llama.cpp sdist's models/templates (else exporter's family)
    layers: int | None = None  # tiny-size layer count when the family needs more than two (SmolLM3's NoPE layer)


SPECS: dict[str, Family] = {
    "llama2": Family(
        "llama2",
        "llama-2",
        "LlamaForCausalLM",
        "LlamaTokenizer",
        "spm",
        spm_head=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("</s>",),
        dtype="float16",
        real_vocab="llama-spm",
    ),
    "llama3": Family(
        "llama3",
        "llama-3.1",
        "LlamaForCausalLM",
        "PreTrainedTokenizerFast",
        "bpe",
        added=tuple((t, True) for t in _LLAMA3_ADDED),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        add_bos=True,
        gen_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        config_eos_list=True,
        real_vocab="llama-bpe",
        bpe_style="llama3",
    ),
    "mistral": Family(
        "mistral",
        "mistral-nemo",
        "MistralForCausalLM",
        "LlamaTokenizer",
        "spm",
        spm_head=("<unk>", "<s>", "</s>", *_MISTRAL_CONTROL),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("</s>",),
        real_vocab="llama-spm",
    ),
    "qwen2": Family(
        "qwen2",
        "qwen-2.5",
        "Qwen2ForCausalLM",
        "Qwen2Tokenizer",
        "bpe",
        added=tuple(_QWEN25_ADDED),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        gen_eos=("<|im_end|>", "<|endoftext|>"),
        tie=True,
        vocab_multiple=128,
        real_vocab="qwen2",
    ),
    "qwen3": Family(
        "qwen3",
        "qwen-3",
        "Qwen3ForCausalLM",
        "Qwen2Tokenizer",
        "bpe",
        added=tuple(_QWEN25_ADDED + _QWEN3_EXTRA),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        gen_eos=("<|im_end|>", "<|endoftext|>"),
        tie=True,
        vocab_multiple=128,
        real_vocab="qwen2",
    ),
    "gemma3": Family(
        "gemma3",
        "gemma-3",
        "Gemma3ForCausalLM",
        "GemmaTokenizer",
        "spm",
        spm_head=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("<eos>", "<end_of_turn>"),
        config_eos_list=True,
        tie=True,
        spm_dummy_prefix=False,
        real_vocab="gemma-4",
    ),
    "phi3": Family(
        "phi3",
        "phi-3",
        "Phi3ForCausalLM",
        "LlamaTokenizer",
        "spm",
        spm_head=("<unk>", "<s>", "</s>"),
        added=tuple((t, True) for t in _PHI3_ADDED),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("<|end|>", "<|assistant|>", "<|endoftext|>"),
        vocab_multiple=64,
        rstrip=("</s>", *(t for t in _PHI3_ADDED if t != "<|endoftext|>")),
        real_vocab="phi-3",
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        "qwen-3",
        "Qwen3MoeForCausalLM",
        "Qwen2Tokenizer",
        "bpe",
        added=tuple(_QWEN25_ADDED + _QWEN3_EXTRA),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        gen_eos=("<|im_end|>", "<|endoftext|>"),
        vocab_multiple=128,
        real_template="Qwen-Qwen3-0.6B.jinja",
    ),
    "mixtral": Family(
        "mixtral",
        "mistral-nemo",
        "MixtralForCausalLM",
        "LlamaTokenizer",
        "spm",
        spm_head=("<unk>", "<s>", "</s>", *_MISTRAL_CONTROL),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("</s>",),
        real_vocab="llama-spm",
    ),
    "gemma2": Family(
        "gemma2",
        "gemma-3",
        "Gemma2ForCausalLM",
        "GemmaTokenizer",
        "spm",
        spm_head=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("<eos>", "<end_of_turn>"),
        tie=True,
        spm_dummy_prefix=False,
        real_template="google-gemma-2-2b-it.jinja",
    ),
    "mistral_nemo": Family(
        "mistral_nemo",
        "mistral-nemo",
        "MistralForCausalLM",
        "PreTrainedTokenizerFast",
        "bpe",
        spm_head=tuple(_NEMO_HEAD),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("</s>",),
        bpe_style="tekken",
        real_template="mistralai-Mistral-Nemo-Instruct-2407.jinja",
    ),
    "glm4": Family(
        "glm4",
        "glm-4",
        "Glm4ForCausalLM",
        "PreTrainedTokenizerFast",
        "bpe",
        added=tuple((t, True) for t in _GLM4_ADDED),
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        gen_eos=("<|endoftext|>", "<|user|>", "<|observation|>"),
        config_eos_list=True,
        bpe_style="glm4",
        real_template="GLM-4.6.jinja",
    ),
    "granite": Family(
        "granite",
        "human-assistant",
        "GraniteForCausalLM",
        "PreTrainedTokenizerFast",
        "bpe",
        spm_head=tuple(_GRANITE_HEAD),
        added=tuple((t, True) for t in _GRANITE_ADDED),
        bos="<|end_of_text|>",
        eos="<|end_of_text|>",
        pad="<|end_of_text|>",
        unk="<|end_of_text|>",
        gen_eos=("<|end_of_text|>",),
        tie=True,
        bpe_style="starcoder",
        real_template="ibm-granite-granite-3.3-2B-Instruct.jinja",
    ),
    "olmo2": Family(
        "olmo2",
        "human-assistant",
        "Olmo2ForCausalLM",
        "PreTrainedTokenizerFast",
        "bpe",
        added=(("<|endoftext|>", True), ("<|pad|>", True)),
        eos="<|endoftext|>",
        pad="<|pad|>",
        gen_eos=("<|endoftext|>",),
        bpe_style="llama3",
    ),
    "smollm3": Family(
        "smollm3",
        "qwen-3",
        "SmolLM3ForCausalLM",
        "PreTrainedTokenizerFast",
        "bpe",
        added=tuple(_SMOLLM3_ADDED),
        bos="<|begin_of_text|>",
        eos="<|im_end|>",
        pad="<|end_of_text|>",
        gen_eos=("<|im_end|>",),
        tie=True,
        bpe_style="llama3",
        real_template="HuggingFaceTB-SmolLM3-3B.jinja",
        layers=4,
    ),
    "qwen2_moe": Family(  # Qwen1.5-MoE / Qwen2-57B-A14B: ChatML, a shared expert beside the routed ones
        "qwen2_moe",
        "qwen-2.5",
        "Qwen2MoeForCausalLM",
        "Qwen2Tokenizer",
        "bpe",
        added=tuple(_QWEN25_ADDED),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        gen_eos=("<|im_end|>", "<|endoftext|>"),
        vocab_multiple=128,
    ),
    "ernie4_5": Family(  # ERNIE-4.5-0.3B: a SentencePiece vocabulary, tied embeddings (no ERNIE Jinja to reuse here)
        "ernie4_5",
        "human-assistant",
        "Ernie4_5ForCausalLM",
        "LlamaTokenizer",
        "spm",
        spm_head=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        add_bos=True,
        gen_eos=("</s>",),
        tie=True,
    ),
    "cohere": Family(  # Command-R / Aya-23: StarCoder-style byte-level BPE, specials at ids 0.., turn tokens appended
        "cohere",
        "human-assistant",
        "CohereForCausalLM",
        "PreTrainedTokenizerFast",
        "bpe",
        spm_head=tuple(_COHERE_HEAD),
        added=tuple((t, True) for t in _COHERE_ADDED),
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        pad="<PAD>",
        unk="<UNK>",
        add_bos=True,
        gen_eos=("<|END_OF_TURN_TOKEN|>",),
        tie=True,
        bpe_style="starcoder",
    ),
}

# Gemma 1 / CodeGemma: Gemma 2's tokenizer and published template (Gemma 1.1 has the same)
SPECS["gemma"] = dataclasses.replace(SPECS["gemma2"], name="gemma", arch="GemmaForCausalLM")
# ERNIE-4.5-21B-A3B: ERNIE 4.5's tokenizer; a dense first layer, then routed experts beside shared ones
SPECS["ernie4_5_moe"] = dataclasses.replace(SPECS["ernie4_5"], name="ernie4_5_moe", arch="Ernie4_5_MoeForCausalLM")
# Command R7B / Command A: Command-R's tokenizer; three sliding-window layers with RoPE, then a global one without
SPECS["cohere2"] = dataclasses.replace(SPECS["cohere"], name="cohere2", arch="Cohere2ForCausalLM", layers=4)

SIZES = {
    # tiny: a few MB; every row count a multiple of 256 so K-quants apply.
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64),
    # bench: ~0.9B parameters (with a trained vocab), 4 shards.
    "bench": dict(hidden=2048, intermediate=5632, layers=20, heads=16, kv_heads=4, head_dim=128),
}


def corpus_text() -> str:
    """The shipped training corpus (English, Chinese, code, emoji), files in name order."""
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no corpus files under {CORPUS_DIR}")
    return "".join(f.read_text(encoding="utf-8") for f in files)


def chat_template(name: str) -> str:
    """The HF chat template of one of exporter's template families."""
    from exporter.templates import load_template

    return load_template(name).jinja


def family_template(fam: Family) -> str:
    """The fixture's chat template: the model's published Jinja from the llama.cpp sdist where the family has one,
    else exporter's family of that name."""
    if not fam.real_template:
        return chat_template(fam.template)
    path = llama_src() / "vendor" / "llama.cpp" / "models" / "templates" / fam.real_template
    if not path.is_file():
        raise FileNotFoundError(f"{fam.name}: published template {path} not found")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def _train_spm(fam: Family, work: Path) -> Path:
    """Train a SentencePiece BPE model with byte fallback, the family's control pieces at the lowest ids."""
    import sentencepiece as spm

    lines = [ln for ln in corpus_text().splitlines() if ln.strip()]
    ids = {p: i for i, p in enumerate(fam.spm_head)}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=fam.trained_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=fam.spm_dummy_prefix,
        normalization_rule_name="identity",
        unk_id=ids[fam.unk],
        bos_id=ids[fam.bos],
        eos_id=ids[fam.eos] if fam.eos in ids else ids["</s>"],
        pad_id=ids.get(fam.pad, -1) if fam.pad else -1,
        unk_piece=fam.unk,
        bos_piece=fam.bos,
        eos_piece=fam.eos if fam.eos in ids else "</s>",
        pad_piece=fam.pad or "<pad>",
        control_symbols=[p for p in fam.spm_head if p not in (fam.unk, fam.bos, fam.eos, fam.pad, "</s>")],
        num_threads=1,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    model = work / "tokenizer.model"
    model.write_bytes(buf.getvalue())
    return model


def _spm_tokenizer(fam: Family, work: Path):
    """A transformers fast tokenizer converted from a freshly trained SentencePiece model."""
    import transformers
    from tokenizers import AddedToken, decoders, normalizers

    _train_spm(fam, work)
    cls = getattr(transformers, fam.tokenizer_class)
    kwargs = {"bos_token": fam.bos, "eos_token": fam.eos, "unk_token": fam.unk, "add_bos_token": fam.add_bos}
    if fam.tokenizer_class == "LlamaTokenizer":
        kwargs["legacy"] = False  # as the hub's Llama 2 / Mistral / Phi-3 tokenizer_config.json say
    if fam.pad:
        kwargs["pad_token"] = fam.pad
    if fam.tokenizer_class == "GemmaTokenizer":
        kwargs["extra_special_tokens"] = []
    if fam.added:  # Phi-3: eos/pad live in the added tokens; convert first, then add them.
        kwargs["eos_token"] = "</s>"
        kwargs.pop("pad_token", None)
    tok = cls.from_pretrained(str(work), **kwargs)
    # control pieces (ids 0..) are special added tokens, as in the hub's tokenizer.json files
    head = [AddedToken(t, special=True, normalized=False, rstrip=t in fam.rstrip) for t in fam.spm_head]
    tok.add_tokens(head, special_tokens=True)
    if fam.name == "phi3":
        # transformers loads Phi-3 with the generic backend, which keeps tokenizer.json as written; the hub's
        # Phi-3 tokenizer.json prepends "▁" with a normalizer (like sentencepiece and llama.cpp), not Metaspace.
        bt = tok.backend_tokenizer
        bt.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        bt.pre_tokenizer = None
        bt.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    if fam.added:  # Phi-3: every added token but <|endoftext|> eats the whitespace on its right
        tok.add_tokens([AddedToken(t, special=s, rstrip=t in fam.rstrip, normalized=False) for t, s in fam.added])
        tok.eos_token = fam.eos
        tok.pad_token = fam.pad
    return tok


def _bpe_tokenizer(fam: Family):
    """A byte-level BPE tokenizer trained with the family's pre-tokenizer, special tokens at ids 0.. (`spm_head`,
    as tekken and StarCoder have them) and appended (`added`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    regex, nfc, _ = BPE_STYLES[fam.bpe_style]
    tk = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    if nfc:
        tk.normalizer = normalizers.NFC()
    if regex is None:  # StarCoder: single digits, then GPT-2's regex
        steps = [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    else:
        steps = [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=fam.trained_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in fam.spm_head],
        show_progress=False,
    )
    lines = corpus_text().splitlines(keepends=True)
    tk.train_from_iterator(lines, trainer=trainer)
    tk.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in fam.added if not s])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in fam.added if s])
    # add_tokens/add_special_tokens insert in call order; restore the family's order by rebuilding ids.
    return _reorder_added(tk, fam, processors)


def _reorder_added(tk, fam: Family, processors):
    """Re-serialise so added tokens get consecutive ids in the family's published order."""
    from tokenizers import Tokenizer

    data = json.loads(tk.to_str())
    vocab = data["model"]["vocab"]
    base = len(vocab)
    data["model"]["ignore_merges"] = BPE_STYLES[fam.bpe_style][2]
    tokens = [(vocab[t], t, True) for t in fam.spm_head] + [(base + i, t, s) for i, (t, s) in enumerate(fam.added)]
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": s}
        for i, t, s in tokens
    ]  # fmt: skip
    tk = Tokenizer.from_str(json.dumps(data))
    if fam.add_bos:
        bos_id = tk.token_to_id(fam.bos)
        tk.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{fam.bos}:0 $A:0",
                    pair=f"{fam.bos}:0 $A:0 {fam.bos}:1 $B:1",
                    special_tokens=[(fam.bos, bos_id)],
                ),
            ]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def _wrap_bpe(fam: Family, tk):
    import transformers

    cls = getattr(transformers, fam.tokenizer_class)
    kwargs = {"tokenizer_object": tk, "eos_token": fam.eos, "bos_token": fam.bos, "add_bos_token": fam.add_bos}
    if fam.pad:
        kwargs["pad_token"] = fam.pad
    if fam.unk:
        kwargs["unk_token"] = fam.unk
    if fam.tokenizer_class == "Qwen2Tokenizer":
        kwargs.update(unk_token=None, errors="replace", split_special_tokens=False)
    return cls(**kwargs)


def _real_vocab_tokenizer(fam: Family, work: Path):
    """The family's real vocabulary, rebuilt from llama.cpp's ggml-vocab-*.gguf by transformers' GGUF tokenizer
    conversion (its reader; gguf-py's takes ~30 s per vocabulary), wrapped in the family's tokenizer class.

    Tokens the vocabulary lacks are supplied as the family has them: Gemma 3's turn markers take ids 105/106
    (Gemma 4's `<|turn>`/`<turn|>`), Qwen3's think/tool-response tags take the first padding slots after
    Qwen2.5's vocabulary (151665..151668, as in Qwen3), Mistral's control tokens are appended.
    """
    import transformers
    from tokenizers import AddedToken, Tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    gguf = llama_src() / "vendor" / "llama.cpp" / "models" / f"ggml-vocab-{fam.real_vocab}.gguf"
    if not gguf.is_file():
        raise FileNotFoundError(f"--real-vocab: {gguf} not found")
    arch, tdict, _ = get_gguf_tokenizer(str(gguf))
    tokens, types = list(tdict["tokens"]), list(tdict["token_type"])
    renames: dict[int, tuple[str, int]] = {}
    if fam.real_vocab == "gemma-4":
        renames = {105: ("<start_of_turn>", 3), 106: ("<end_of_turn>", 3)}
    elif fam.real_vocab in ("llama-bpe", "qwen2"):
        # the vocabulary file predates Llama 3.1 / Qwen2.5 / Qwen3 / SmolLM3: name their tokens at their real ids
        base = 128000 if fam.real_vocab == "llama-bpe" else 151643
        renames = {base + i: (t, 3 if special else 4) for i, (t, special) in enumerate(fam.added)}
    for i, (t, ty) in renames.items():
        if tokens[i] != t:
            if fam.real_vocab != "gemma-4" and not (tokens[i].startswith("[PAD") or "reserved" in tokens[i]):
                raise ValueError(f"real vocabulary {gguf.name}: id {i} is {tokens[i]!r}, expected a free slot")
            tokens[i], types[i] = t, ty
    tdict = {**tdict, "tokens": tokens, "token_type": types}
    if fam.kind == "spm":
        gemma = fam.real_vocab == "gemma-4"
        _write_spm_model(tdict, work / "tokenizer.model", len(tokens) if gemma else 32000, gemma)
    backend, _ = convert_gguf_tokenizer(arch, tdict)
    data = json.loads(backend.to_str())
    # class defaults (GPT-2's <|endoftext|>) out; Phi-3's whitespace-eating tokens as the family has them
    data["added_tokens"] = [
        {**a, "rstrip": a["content"] in fam.rstrip} for a in data["added_tokens"] if a["id"] < len(tokens)
    ]
    backend = Tokenizer.from_str(json.dumps(data))
    cls = getattr(transformers, fam.tokenizer_class)
    kwargs = {"tokenizer_object": backend, "bos_token": fam.bos, "eos_token": fam.eos, "add_bos_token": fam.add_bos}
    kwargs["unk_token"] = fam.unk  # None for byte-level BPE (else a default <|endoftext|> gets added)
    if fam.pad:
        kwargs["pad_token"] = fam.pad
    if fam.tokenizer_class == "LlamaTokenizer":
        kwargs["legacy"] = False
    if fam.tokenizer_class == "Qwen2Tokenizer":
        kwargs.update(unk_token=None, errors="replace", split_special_tokens=False)
    tok = cls(**kwargs)
    missing = [t for t in (*fam.spm_head, *(t for t, _ in fam.added)) if t not in tok.get_vocab()]
    if missing:  # Mistral's [INST] & co. (not in Llama 2's vocabulary)
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tok


def _write_spm_model(tdict: dict, path: Path, limit: int, gemma: bool = False) -> None:
    """A sentencepiece `tokenizer.model` (BPE, byte fallback) holding the GGUF's first `limit` pieces, as the hub's
    Llama 2 / Phi-3 / Gemma 3 repos ship it (Phi-3's added tokens live outside it).

    Gemma: no dummy prefix; whitespace-only pieces respelled with "▁"; the file's scores carry no merge order
    (the token order does), so each normal piece scores -id."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    n = min(limit, len(tdict["tokens"]))
    unk, bos, eos = tdict.get("unk_token_id", 0), tdict["bos_token_id"], 1 if gemma else 2
    forced = {unk: 2, bos: 3, eos: 3}
    seen: set[str] = set()
    rows = zip(tdict["tokens"][:n], tdict["scores"][:n], tdict["token_type"][:n], strict=True)
    for i, (t, score, ty) in enumerate(rows):
        ty = forced.get(i, int(ty))  # GGUF and sentencepiece number their token types alike
        if gemma:
            t = "▁" * len(t) if " " in t and not t.strip() else t
            score = -i if ty == 1 else 0.0
        if t in seen:  # sentencepiece refuses duplicate pieces
            t, ty = f"<unused-dup-{i}>", 5
        seen.add(t)
        p = m.pieces.add()
        p.piece, p.score, p.type = t, float(score), ty
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id = unk, bos, eos
    ts.pad_id = tdict.get("pad_token_id", -1) if gemma else -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = (m.pieces[i].piece for i in (unk, bos, eos))
    if ts.pad_id >= 0:
        ts.pad_piece = m.pieces[ts.pad_id].piece
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = not gemma
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    path.write_bytes(m.SerializeToString())


def llama_src() -> Path:
    """The llama-cpp-python sdist named by $EXPORTER_LLAMA_SRC."""
    src = os.environ.get("EXPORTER_LLAMA_SRC")
    if not src:
        raise FileNotFoundError("--real-vocab needs EXPORTER_LLAMA_SRC (the llama-cpp-python sdist directory)")
    return Path(src)


def build_tokenizer(fam: Family, work: Path, real_vocab: bool):
    """The family's transformers tokenizer (trained here, or the real vocabulary)."""
    if real_vocab:
        return _real_vocab_tokenizer(fam, work)
    if fam.kind == "spm":
        return _spm_tokenizer(fam, work)
    return _wrap_bpe(fam, _bpe_tokenizer(fam))


# ---------------------------------------------------------------------------------------------------------------
# Model


def _config(fam: Family, size: str, vocab_size: int, ids: dict[str, int | None]):
    """The family's transformers config at the requested size."""
    from transformers import AutoConfig

    s = SIZES[size]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        tie_word_embeddings=fam.tie,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        initializer_range=0.02,
        architectures=[fam.arch],
        dtype=fam.dtype,
    )
    n = fam.name
    if n == "llama2":
        extra = dict(
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        mt = "llama"
    elif n == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        extra = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=rope)
        mt = "llama"
    elif n == "mistral":
        extra = dict(
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        mt = "mistral"
    elif n in ("qwen2", "qwen3"):
        extra = dict(
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        mt = n
        if n == "qwen3":
            extra["attention_bias"] = False
    elif n == "gemma3":
        extra = dict(
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=s["head_dim"],
            sliding_window=512,
            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(s["layers"])],
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
        if s["layers"] == 2:  # exercise both attention kinds in two layers
            extra["layer_types"] = ["sliding_attention", "full_attention"]
        mt = "gemma3_text"
    elif n == "phi3":
        extra = dict(
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            sliding_window=2047,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        mt = "phi3"
    else:
        mt, extra = _config_more(fam, s, common)
    return AutoConfig.for_model(mt, **common, **extra)


def _rope(theta: float, **more) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **more}


def _config_more(fam: Family, s: dict, common: dict) -> tuple[str, dict]:
    """model_type and extra config of the MoE and newer families (`common` is adjusted where a family differs)."""
    n = fam.name
    moe_ff = s["intermediate"] // 2  # a multiple of 256 at both sizes, like the dense one
    if fam.layers and s["layers"] == 2:
        common["num_hidden_layers"] = fam.layers
    if n == "qwen3_moe":
        experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=moe_ff, norm_topk_prob=True)
        extra = dict(max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters=_rope(1e6), **experts)
        return "qwen3_moe", dict(extra, attention_bias=False, use_sliding_window=False, decoder_sparse_step=1)
    if n == "mixtral":
        extra = dict(max_position_embeddings=32768, rms_norm_eps=1e-5, rope_parameters=_rope(1e6))
        return "mixtral", dict(extra, sliding_window=None, num_local_experts=4, num_experts_per_tok=2)
    if n == "gemma2":
        extra = dict(max_position_embeddings=8192, rms_norm_eps=1e-6, rope_parameters=_rope(10000.0))
        extra.update(query_pre_attn_scalar=s["head_dim"], sliding_window=4096, hidden_activation="gelu_pytorch_tanh")
        return "gemma2", dict(extra, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if n == "mistral_nemo":  # head_dim given explicitly and != hidden_size / heads, as in Nemo (5120 / 32 vs 128)
        common["head_dim"] = 2 * s["head_dim"]
        extra = dict(max_position_embeddings=1024000, rms_norm_eps=1e-5, rope_parameters=_rope(1e6))
        return "mistral", dict(extra, sliding_window=None)
    if n == "glm4":  # GLM-4-0414: partial rotary, q/k/v biases, fused gate_up, sandwich norms
        extra = dict(max_position_embeddings=32768, rms_norm_eps=1e-5, attention_bias=True)
        return "glm4", dict(extra, rope_parameters=_rope(10000.0, partial_rotary_factor=0.5))
    if n == "granite":  # Granite 3.x multipliers (granite-3.3-2b's values)
        common.pop("head_dim")
        extra = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_rope(1e7))
        mult = dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22)
        return "granite", dict(extra, **mult, logits_scaling=8.0, attention_bias=False, mlp_bias=False)
    if n == "olmo2":
        common.pop("head_dim")
        extra = dict(max_position_embeddings=4096, rms_norm_eps=1e-6, rope_parameters=_rope(500000.0))
        return "olmo2", dict(extra, attention_bias=False)
    if n == "smollm3":  # every 4th layer without RoPE (NoPE), as SmolLM3-3B
        common.pop("head_dim")
        extra = dict(max_position_embeddings=65536, rms_norm_eps=1e-6, rope_parameters=_rope(5e6))
        return "smollm3", dict(extra, no_rope_layer_interval=4, use_sliding_window=False, attention_bias=False)
    if n == "gemma":  # Gemma 1: Gemma 2 without soft-capping and sliding windows
        extra = dict(max_position_embeddings=8192, rms_norm_eps=1e-6, rope_parameters=_rope(10000.0))
        return "gemma", dict(extra, hidden_activation="gelu_pytorch_tanh", attention_bias=False)
    if n == "qwen2_moe":  # every layer sparse, q/k/v biases, a gated shared expert (Qwen1.5-MoE-A2.7B's layout)
        experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=moe_ff, norm_topk_prob=False)
        extra = dict(max_position_embeddings=8192, rms_norm_eps=1e-6, rope_parameters=_rope(1e6), **experts)
        shared = dict(shared_expert_intermediate_size=s["intermediate"], decoder_sparse_step=1, mlp_only_layers=[])
        return "qwen2_moe", dict(extra, **shared, qkv_bias=True, use_sliding_window=False)
    if n == "ernie4_5":  # interleaved RoPE (rotates adjacent pairs), no biases
        extra = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_rope(500000.0))
        return "ernie4_5", dict(extra, use_bias=False)
    if n == "ernie4_5_moe":  # ERNIE-4.5-21B-A3B's layout: layer 0 dense, the rest sparse with 2 shared experts
        # intermediate / kv heads == moe_intermediate_size * shared experts, as in the 21B model (12288 / 4 == 1536 *
        # 2): llama.cpp's converter writes the shared experts' width as the former
        common["intermediate_size"] = s["kv_heads"] * moe_ff * 2
        experts = dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=moe_ff, moe_num_shared_experts=2)
        extra = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_rope(500000.0), **experts)
        layers = dict(moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1)
        return "ernie4_5_moe", dict(extra, **layers, use_bias=False)
    if n == "cohere":  # LayerNorm without bias, attention and MLP in parallel, logits scaled (Command-R's values)
        common.pop("head_dim")
        extra = dict(max_position_embeddings=8192, layer_norm_eps=1e-5, rope_parameters=_rope(8e6))
        return "cohere", dict(extra, logit_scale=0.0625, use_qk_norm=False, attention_bias=False)
    if n == "cohere2":  # Command R7B's values, but a window the probes' 24 tokens outgrow; rotary_pct as in R7B's
        common.pop("head_dim")  # config.json (transformers ignores it; llama.cpp's converter reads it)
        extra = dict(max_position_embeddings=8192, layer_norm_eps=1e-5, rope_parameters=_rope(50000.0), rotary_pct=1.0)
        return "cohere2", dict(extra, logit_scale=0.25, sliding_window=8, attention_bias=False)
    raise ValueError(n)  # pragma: no cover - FAMILIES is closed


def _tensor(name: str, shape: tuple[int, ...], seed: int, fam: Family, dtype):
    """One weight, drawn from a generator seeded by (seed, name): independent of build order and other tensors."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    if len(shape) == 1 and "norm" in name:  # RMSNorm scales: 1 + noise (Gemma stores the offset from 1)
        w = torch.randn(shape, generator=g) * 0.05 + (0.0 if fam.name.startswith("gemma") else 1.0)
    elif name.endswith(".bias"):
        w = torch.randn(shape, generator=g) * 0.02
    elif leaf in ("embed_tokens", "lm_head"):
        w = torch.randn(shape, generator=g) * 0.1
    else:
        w = torch.randn(shape, generator=g) * 0.02
    return w.to(dtype)


def _tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the checkpoint's tensors, from a meta-device model (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return _per_expert(shapes, config.model_type)


# transformers 5 holds an MoE layer's experts fused, gate_up (E, 2*ff, hidden) and down (E, hidden, ff); released
# checkpoints (and save_pretrained) keep one tensor per expert: (gate, up, down) names and the router's rename
_EXPERTS = {
    "qwen3_moe": ("mlp.experts.{}.gate_proj", "mlp.experts.{}.up_proj", "mlp.experts.{}.down_proj", None),
    "qwen2_moe": ("mlp.experts.{}.gate_proj", "mlp.experts.{}.up_proj", "mlp.experts.{}.down_proj", None),
    "ernie4_5_moe": (
        "mlp.experts.{}.gate_proj",
        "mlp.experts.{}.up_proj",
        "mlp.experts.{}.down_proj",
        ("mlp.gate.moe_statics.", "mlp.moe_statics."),
    ),
    "mixtral": (
        "block_sparse_moe.experts.{}.w1",
        "block_sparse_moe.experts.{}.w3",
        "block_sparse_moe.experts.{}.w2",
        ("mlp.gate.", "block_sparse_moe.gate."),
    ),
}


def _per_expert(shapes: dict[str, tuple[int, ...]], model_type: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes: fused expert tensors split into one tensor per expert, as released."""
    if model_type not in _EXPERTS:
        return shapes
    gate, up, down, router = _EXPERTS[model_type]
    out = {}
    for name, shape in shapes.items():
        layer, _, leaf = name.rpartition(".mlp.experts.")
        if leaf == "gate_up_proj":
            n, ff2, hidden = shape
            for e in range(n):
                out[f"{layer}.{gate.format(e)}.weight"] = (ff2 // 2, hidden)
                out[f"{layer}.{up.format(e)}.weight"] = (ff2 // 2, hidden)
        elif leaf == "down_proj":
            for e in range(shape[0]):
                out[f"{layer}.{down.format(e)}.weight"] = shape[1:]
        else:
            out[name.replace(*router) if router else name] = shape
    return out


def _write_weights(out: Path, config, fam: Family, seed: int, shards: int, progress) -> int:
    """Write the safetensors file(s) shard by shard; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, fam.dtype)
    shapes = _tensor_shapes(config)
    nbytes = {k: int(torch.Size(s).numel()) * dtype.itemsize for k, s in shapes.items()}
    total = sum(nbytes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for k in shapes:  # contiguous split into `shards` groups of about equal bytes
        groups[min(shards - 1, acc * shards // total)].append(k)
        acc += nbytes[k]
    groups = [g for g in groups if g]
    weight_map = {}
    task = progress.add_task("weights", total=total) if progress else None
    for i, names in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in names:
            tensors[k] = _tensor(k, shapes[k], seed, fam, dtype)
            weight_map[k] = fname
            if progress:
                progress.advance(task, nbytes[k])
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


# ---------------------------------------------------------------------------------------------------------------
# Assembly


def _finish_tokenizer_files(out: Path, tok, fam: Family, template: str) -> None:
    """Chat template in tokenizer_config.json and chat_template.jinja; special_tokens_map.json like the hub's."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for junk in ("is_local", "local_files_only", "vocab_file", "name_or_path"):  # build-machine details
        cfg.pop(junk, None)
    named = {str(v) for v in (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) if v is not None}
    extra = [t for t in cfg.pop("extra_special_tokens", []) if t not in named]
    if extra:
        cfg["extra_special_tokens"] = extra
    if fam.tokenizer_class == "PreTrainedTokenizerFast":  # the name the hub's Llama 3 uses (v5 alias)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # the hub's tokenizer_config.json lists the added tokens (llama.cpp's converter reads them from here)
    cfg["added_tokens_decoder"] = {
        str(i): {
            "content": a.content,
            "lstrip": a.lstrip,
            "normalized": a.normalized,
            "rstrip": a.rstrip,
            "single_word": a.single_word,
            "special": a.special,
        }
        for i, a in sorted(tok.added_tokens_decoder.items())
    }
    cfg["chat_template"] = template
    cfg["add_bos_token"] = fam.add_bos
    cfg.setdefault("add_eos_token", False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(template)
    smap = {k: v for k, v in tok.special_tokens_map.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")


def _sorted_json(path: Path) -> None:
    """Rewrite a JSON file with sorted keys (stable, diff-friendly)."""
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make(
    family: str,
    out: Path | str,
    size: str = "tiny",
    seed: int = 0,
    real_vocab: bool = False,
    force: bool = False,
    progress=None,
    dtype: str | None = None,
) -> Path:
    """Build the fixture for `family` into `out` (atomically) and return `out`; `dtype` overrides the family's."""
    from transformers import GenerationConfig

    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    fam = SPECS[family] if dtype is None else dataclasses.replace(SPECS[family], dtype=dtype)
    from exporter.atomic import atomic_dir

    template = family_template(fam)
    with atomic_dir(out, force) as tmp:
        work = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=tmp))
        tok = build_tokenizer(fam, work, real_vocab)
        tok.chat_template = template
        tok.save_pretrained(str(tmp))
        if (work / "tokenizer.model").is_file():
            shutil.copy(work / "tokenizer.model", tmp / "tokenizer.model")
        shutil.rmtree(work)
        _finish_tokenizer_files(tmp, tok, fam, template)

        ids = {
            "bos": tok.convert_tokens_to_ids(fam.bos) if fam.bos else None,
            "eos": tok.convert_tokens_to_ids(fam.eos),
            "pad": tok.convert_tokens_to_ids(fam.pad) if fam.pad else None,
        }
        if fam.tokenizer_class == "Qwen2Tokenizer":  # Qwen's config.json names <|endoftext|> as bos
            ids["bos"] = tok.convert_tokens_to_ids("<|endoftext|>")
        gen_eos = tok.convert_tokens_to_ids(list(fam.gen_eos))
        unk_is_eos = fam.unk is not None and fam.unk in fam.gen_eos  # Granite: one token for all four
        if None in gen_eos or (tok.unk_token_id is not None and tok.unk_token_id in gen_eos and not unk_is_eos):
            raise ValueError(f"{family}: the tokenizer lacks one of {fam.gen_eos}")
        vocab_size = -(-len(tok) // fam.vocab_multiple) * fam.vocab_multiple
        config = _config(fam, size, vocab_size, ids)
        if fam.config_eos_list:  # Llama 3.1 / Gemma 3 list every end-of-turn id in config.json too
            config.eos_token_id = gen_eos
        config.save_pretrained(str(tmp))
        _sorted_json(tmp / "config.json")
        gen = GenerationConfig(
            bos_token_id=ids["bos"], eos_token_id=gen_eos if len(gen_eos) > 1 else gen_eos[0], pad_token_id=ids["pad"]
        )
        gen.save_pretrained(str(tmp))
        _sorted_json(tmp / "generation_config.json")
        _write_weights(tmp, config, fam, seed, 4 if size == "bench" else 1, progress)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    return Path(out)


def source_hash() -> str:
    """Hash of everything a fixture depends on: this script, the corpus, the template families."""
    h = hashlib.sha256()
    files = [Path(__file__).resolve(), *sorted(CORPUS_DIR.glob("*.txt")), *sorted((ROOT / "templates").glob("*"))]
    files += [ROOT / "exporter" / "templates.py"]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=FAMILIES)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-vocab", action="store_true", help="use the family's real vocabulary (llama.cpp sdist)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="weights dtype (default: the family's)")
    args = ap.parse_args(argv)
    from exporter.quiet import QUANT_LIBRARIES, without_libraries

    without_libraries(QUANT_LIBRARIES)  # else transformers imports torchao (and logs its load failures) for nothing
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from exporter.errors import UserError

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()) as p:
        try:
            out = make(
                args.family, args.out, args.size, args.seed, args.real_vocab, args.force, progress=p, dtype=args.dtype
            )
        except (UserError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
