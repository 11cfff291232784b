"""Tokenizer export into GGUF: SentencePiece and byte-level BPE vocabularies, special ids, EOG tokens, template.

The BPE pre-tokenizer name (`tokenizer.ggml.pre`) selects the regex llama.cpp splits text with before merging.
llama.cpp's converter finds it by hashing the tokenization of a check string and looking the hash up in a table
of known released models, which fails for any retrained or resized vocabulary. We identify it by what decides
the behaviour instead: the Split regex in tokenizer.json (plus `ignore_merges`, which llama.cpp ties to the
name) compared with the regex each llama.cpp pre-tokenizer implements. Tests check the two agree on real vocabs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from exporter.converters import gguf_arch

from exporter.config import read_json
from exporter.errors import UserError
from exporter.hf_dir import adds_special

log = logging.getLogger(__name__)

# The original (tokenizer.json) regexes of the pre-tokenizers llama.cpp implements that our families use.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_DIGITS = r"\p{N}"  # a Digits(individual_digits) pre-tokenizer step: every digit alone (StarCoder, Granite)

SPM_USER_SPACE = "\u2581"
EOS_TOKEN_IDS = "tokenizer.ggml.eos_token_ids"


@dataclass
class Vocab:
    """Everything the GGUF tokenizer section holds."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str | bytes]
    toktypes: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    add_other: dict[str, bool] = field(default_factory=dict)  # add_sep_token etc. as the tokenizer files say
    rstrip: bool = False  # some added token eats the whitespace on its right (Phi-3)
    notes: list[str] = field(default_factory=list)
    # tokenizer_config.json's named chat templates ([{"name": "default", ...}, {"name": "tool_use", ...}]): name ->
    # template, in the file's order
    named_templates: dict[str, str] = field(default_factory=dict)
    # tokenizer.ggml.eos_token_ids: every id that ends generation (eos first), as Ollama's converter writes
    # generation_config's eos_token_id list; Ollama's Go engine stops on eos + these, and reads no eot/eom
    eos_ids: list[int] = field(default_factory=list)

    def token_id(self, text: str) -> int | None:
        for i, t in enumerate(self.tokens):
            if (t.decode("utf-8", "replace") if isinstance(t, bytes) else t) == text:
                return i
        return None


def _split_regexes(pre: dict | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers", []) for r in _split_regexes(p)]
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return [pat.get("Regex") or pat.get("String") or ""]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return [_GPT2_REGEX]
    if pre.get("type") == "Digits":
        return [_DIGITS if pre.get("individual_digits") else r"\p{N}+"]
    return []


def bpe_pre_name(tokenizer_json: dict, where: Path) -> str:
    """The llama.cpp pre-tokenizer that splits text exactly like this tokenizer.json."""
    regexes = _split_regexes(tokenizer_json.get("pre_tokenizer"))
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges"))
    if regexes == [_LLAMA3_REGEX]:
        # llama.cpp: "llama-bpe" = Llama 3 regex with merges ignored for whole-word hits; "smaug-bpe" = same regex
        return "llama-bpe" if ignore_merges else "smaug-bpe"
    if regexes == [_QWEN2_REGEX] and not ignore_merges:
        return "qwen2"
    if regexes == [_GPT2_REGEX] and not ignore_merges:
        return "gpt-2"
    if regexes == [_TEKKEN_REGEX] and ignore_merges:  # llama.cpp's "tekken" always ignores merges
        return "tekken"
    if regexes == [_DIGITS, _GPT2_REGEX] and not ignore_merges:
        return "starcoder"
    raise UserError(
        f"{where}: byte-level BPE pre-tokenizer {regexes!r} (ignore_merges={ignore_merges}) is not one llama.cpp "
        "implements for the supported families (Llama 3, Qwen2, GPT-2, tekken, StarCoder regexes)"
    )


# Normalizers llama.cpp's byte-level BPE leaves out without changing the tokens of ordinary (NFC) text: Qwen's NFC
# (llama.cpp's converter accepts it too), and an empty Sequence as some tokenizer.json files carry.
_HARMLESS_NORMALIZERS = ("NFC",)


def _knobs(tokenizer_json: dict) -> list[tuple[str, Any]]:
    """(key, value) of each tokenizer.json setting that changes byte-level BPE tokens and that no llama.cpp
    pre-tokenizer applies: a ByteLevel pre-tokenizer's `add_prefix_space: true`, a normalizer other than NFC."""
    out: list[tuple[str, Any]] = []

    def pre(node: Any, key: str) -> None:
        if not isinstance(node, dict):
            return
        if node.get("type") == "Sequence":
            for i, sub in enumerate(node.get("pretokenizers") or []):
                pre(sub, f"{key}.pretokenizers[{i}]")
        elif node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
            out.append((f"{key}.add_prefix_space", node["add_prefix_space"]))

    def norm(node: Any, key: str) -> None:
        if node is None:
            return
        if isinstance(node, dict) and node.get("type") == "Sequence":
            for i, sub in enumerate(node.get("normalizers") or []):
                norm(sub, f"{key}.normalizers[{i}]")
        elif not (isinstance(node, dict) and node.get("type") in _HARMLESS_NORMALIZERS):
            out.append((key, node.get("type", node) if isinstance(node, dict) else node))

    pre(tokenizer_json.get("pre_tokenizer"), "pre_tokenizer")
    norm(tokenizer_json.get("normalizer"), "normalizer")
    return out


def check_bpe_knobs(model_dir: Path, tokenizer_json: dict, pre: str) -> None:
    """Refuse a byte-level BPE tokenizer whose normalizer or ByteLevel `add_prefix_space` changes its tokens in
    transformers while llama.cpp's pre-tokenizer `pre` ignores it (the GGUF would tokenize every prompt otherwise).
    What counts is the tokenizer transformers builds: some classes (Qwen2Tokenizer, LlamaTokenizer) rebuild their
    normalizer and pre-tokenizer from their own code and tokenizer_config.json, so a knob of tokenizer.json they
    drop is no difference, and `add_prefix_space` in tokenizer_config.json can be one."""
    path = model_dir / "tokenizer.json"
    config = model_dir / "tokenizer_config.json"
    if not _knobs(tokenizer_json) and not read_json(config, optional=True).get("add_prefix_space"):
        return  # nothing to look at: no need to load transformers' tokenizer
    import json

    from exporter.hf_dir import load_tokenizer

    backend = getattr(load_tokenizer(model_dir), "backend_tokenizer", None)
    effective = _knobs(json.loads(backend.to_str())) if backend is not None else _knobs(tokenizer_json)
    if not effective:
        return
    key, value = effective[0]
    in_file = dict(_knobs(tokenizer_json))
    from_config = key not in in_file and "add_prefix_space" in key  # the class took it from tokenizer_config.json
    where, what = (config, "add_prefix_space") if from_config else (path, key)
    shown = json.dumps(in_file.get(key, value))
    raise UserError(
        f"{where}: {what} is {shown}, which transformers applies and llama.cpp's byte-level BPE pre-tokenizer "
        f"{pre!r} does not (the GGUF would tokenize text differently); expected "
        + ("add_prefix_space false" if "add_prefix_space" in key else "no normalizer, or NFC")
    )


def _looks_special(text: str) -> bool:
    """Added tokens that are control tokens even when a tokenizer forgot to flag them special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _bpe_vocab(model_dir: Path, vocab_size: int, tokenizer: Any, pre_names: dict[str, str]) -> Vocab:
    tj = read_json(model_dir / "tokenizer.json", optional=True)
    pre = bpe_pre_name(tj, model_dir / "tokenizer.json")
    pre = pre_names.get(pre, pre)
    check_bpe_knobs(model_dir, tj, pre)
    reverse = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(reverse) >= vocab_size:
        raise UserError(f"{model_dir}: tokenizer has id {max(reverse)} but config vocab_size is {vocab_size}")
    decoder = tokenizer.get_added_tokens_decoder()
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if i in decoder:
            if not decoder[i].normalized:  # llama.cpp matches added tokens pre-normalized
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False).ids, skip_special_tokens=False)
            if decoder[i].special or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace(SPM_USER_SPACE, " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return Vocab("gpt2", pre, tokens, types)


def _spm_model_vocab(model_dir: Path, vocab_size: int | None, fixed_added_types: bool) -> Vocab:
    """Vocabulary from a SentencePiece `tokenizer.model`, with HF added tokens laid over it."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    vocab_size = vocab_size or sp.vocab_size()
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    for text, i in read_json(model_dir / "added_tokens.json", optional=True).items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, gguf.TokenType.USER_DEFINED
    decoder = read_json(model_dir / "tokenizer_config.json", optional=True).get("added_tokens_decoder", {})
    overlays = [(int(i), d) for i, d in decoder.items()]
    if fixed_added_types:  # Phi-3: tokenizer.json's added tokens too, and only the `special` flag decides
        added = read_json(model_dir / "tokenizer.json", optional=True).get("added_tokens", [])
        overlays += [(int(d["id"]), d) for d in added]
    for i, d in overlays:
        if i >= vocab_size:
            continue
        text = d["content"]
        if d.get("special") or (not fixed_added_types and _looks_special(text)):
            types[i] = gguf.TokenType.CONTROL
        else:
            if not fixed_added_types:
                text = text.replace(SPM_USER_SPACE, " ")
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
    return Vocab("llama", "default", tokens, types, scores)


def _spm_json_vocab(model_dir: Path, tokenizer_json: dict) -> Vocab:
    """SentencePiece-style BPE (byte fallback, ▁ spaces) that only ships tokenizer.json.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged piece has the highest score; HF's BPE
    merges the pair of lowest merge rank. Scoring each piece -rank of the merge that makes it gives the same
    tokenization (gguf-py's LlamaHfVocab gives every piece the same score, which tokenizes differently).
    """
    hf = gguf.LlamaHfVocab(model_dir)
    merges = tokenizer_json.get("model", {}).get("merges") or []
    rank: dict[str, int] = {}
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, i)
    unmerged = -float(len(merges) + 1)
    tokens, scores, types = [], [], []
    for text, score, ttype in hf.all_tokens():
        piece = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        if ttype == gguf.TokenType.NORMAL:
            score = -float(rank[piece]) if piece in rank else (0.0 if len(piece) == 1 else unmerged)
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))
    return Vocab("llama", "default", tokens, types, scores)


def _is_spm_json(tj: dict) -> bool:
    model = tj.get("model", {})
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback"))
        and (tj.get("decoder") or {}).get("type") != "ByteLevel"
    )


def _hf_adds(model_dir: Path, tokenizer: Any, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether transformers' tokenizer prepends BOS / appends EOS on plain encode — what add_bos/add_eos must say.

    Read from the files the way transformers 5 does (without importing it, and torch with it): add_bos_token or
    add_eos_token in tokenizer_config.json replace tokenizer.json's post-processor (an unset one counts as false);
    otherwise that post-processor decides.
    """
    config = read_json(model_dir / "tokenizer_config.json", optional=True)
    bos, eos = special_ids.get("bos"), special_ids.get("eos")
    if "add_bos_token" in config or "add_eos_token" in config or tokenizer is None:
        add_bos = bool(config.get("add_bos_token")) and bos is not None
        add_eos = bool(config.get("add_eos_token")) and eos is not None
        return add_bos, add_eos
    return adds_special(lambda text, special: tokenizer.encode(text, add_special_tokens=special).ids, bos, eos)


def build_vocab(model_dir: Path, hp: dict[str, Any], arch: gguf_arch.Arch, eot_tokens: list[str]) -> Vocab:
    """Read the model's tokenizer into a Vocab, with every end-of-turn token of the template made an EOG id."""
    from tokenizers import Tokenizer

    arch_name = arch.name
    tj = read_json(model_dir / "tokenizer.json", optional=True)
    try:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json")) if tj else None
    except Exception as e:  # the Rust library raises its own exception types
        raise UserError(f"{model_dir / 'tokenizer.json'}: the tokenizers library cannot load it ({e})") from None
    vocab_size = hp.get("vocab_size")
    if vocab_size is None and tokenizer is not None:
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    has_spm_model = (model_dir / "tokenizer.model").is_file()
    spm_archs = ("llama", "gemma", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "ernie4_5", "ernie4_5-moe")
    if has_spm_model and arch_name in spm_archs:
        vocab = _spm_model_vocab(model_dir, vocab_size, fixed_added_types=arch_name == "phi3")
    elif tj and _is_spm_json(tj):
        vocab = _spm_json_vocab(model_dir, tj)
    elif tj:
        vocab = _bpe_vocab(model_dir, vocab_size, tokenizer, arch.pre_names)
    else:
        raise UserError(f"{model_dir}: no tokenizer.json or tokenizer.model; cannot export the vocabulary")
    if vocab.model == "llama" and arch_name in ("gemma", "gemma2", "gemma3"):
        vocab.add_space_prefix = False
    elif vocab.model == "llama" and arch_name in ("llama", "ernie4_5", "ernie4_5-moe"):
        prefix = read_json(model_dir / "tokenizer_config.json", optional=True).get("add_prefix_space")
        if prefix is not None:
            vocab.add_space_prefix = bool(prefix)

    special = gguf.SpecialVocab(
        model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens) if vocab.model == "llama" else None
    )
    if vocab.model == "gpt2":
        if not special.merges:
            raise UserError(f"{model_dir / 'tokenizer.json'}: byte-level BPE without merges")
        vocab.merges = special.merges
    vocab.special_ids = dict(special.special_token_ids)
    for kind, text in arch.special_tokens.items():  # e.g. GLM-4's bos/unk, as llama.cpp's converter sets them
        if (tid := vocab.token_id(text)) is not None:
            vocab.special_ids[kind] = tid
    vocab.add_bos, vocab.add_eos = _hf_adds(model_dir, tokenizer, vocab.special_ids)
    vocab.add_other = {k: v for k, v in special.add_special_token.items() if k not in ("bos", "eos")}
    for kind, hf_value in (("bos", vocab.add_bos), ("eos", vocab.add_eos)):
        ours = special.add_special_token.get(kind)
        if ours is not None and ours != hf_value:
            vocab.notes.append(f"add_{kind}_token: tokenizer files say {ours}, HF tokenizer behaviour says {hf_value}")

    vocab.rstrip = any(a.get("rstrip") for a in tj.get("added_tokens", []))
    _set_eog(vocab, eot_tokens, model_dir)
    vocab.named_templates = named_templates(model_dir)
    return vocab


def named_templates(model_dir: Path) -> dict[str, str]:
    """The named chat templates of tokenizer_config.json (`chat_template` as a list of {name, template}), name ->
    template; names as gguf-py's `add_chat_template` writes them (other characters than letters and digits: `_`)."""
    ct = read_json(model_dir / "tokenizer_config.json", optional=True).get("chat_template")
    out: dict[str, str] = {}
    for item in ct if isinstance(ct, list) else ():
        if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str):
            name = "".join(c if c.isascii() and c.isalnum() else "_" for c in item["name"])
            if name:
                out.setdefault(name, item["template"])
    return out


def _generation_eos(model_dir: Path, n_tokens: int) -> list[int]:
    """The ids generation_config.json's `eos_token_id` stops on (GLM-4's <|observation|>, Phi-3's <|assistant|>)."""
    ids = read_json(model_dir / "generation_config.json", optional=True).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    return [i for i in ids if isinstance(i, int) and 0 <= i < n_tokens]


# Token texts llama.cpp ends generation on whatever the metadata says (llama-vocab.cpp, "maintain a list of tokens
# that cause end-of-generation"): a generation_config eos id among them needs no eot/eom slot.
_LLAMA_CPP_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})  # fmt: skip


def _text(vocab: Vocab, tid: int) -> str:
    t = vocab.tokens[tid]
    return t.decode("utf-8", "replace") if isinstance(t, bytes) else t


def _set_eog(vocab: Vocab, eot_tokens: list[str], model_dir: Path) -> None:
    """Make each end-of-turn token an EOG id. eos already is. eot is the token that ends a chat turn, the template's
    first end-of-turn token even when it is eos (llama.cpp closes an interrupted turn with it, and llguidance ends
    on it): never a pre-training end-of-text token that generation_config also stops on. The template's other
    end-of-turn tokens take eot (when the first is eos) and eom. Then the ids generation_config stops on that
    llama.cpp does not end generation on by their text, where a slot is left (a template's own Jinja may not say
    that a turn can end with, e.g., GLM-4's <|observation|>, Phi-3's <|assistant|>); one that does not fit is noted.
    `eos_ids` (tokenizer.ggml.eos_token_ids, what Ollama's engine stops on besides eos) lists them all."""
    eos = vocab.special_ids.get("eos")
    ids: list[int] = []
    for text in eot_tokens:
        tid = vocab.token_id(text)
        if tid is None:
            raise UserError(f"{model_dir}: end-of-turn token {text!r} of the chat template is not in the vocabulary")
        if vocab.toktypes[tid] not in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            vocab.notes.append(f"end-of-turn token {text!r} (id {tid}) was a normal token; typed CONTROL")
            vocab.toktypes[tid] = gguf.TokenType.CONTROL
        if tid not in ids:
            ids.append(tid)
    extra = [tid for tid in ids if tid != eos]
    if eos is None and extra:
        vocab.special_ids["eos"] = extra.pop(0)
    # eot: the first end-of-turn token; when that is eos and two others remain, eos is eot already by being eos
    eot = ids[0] if ids and (len(extra) < 2 or ids[0] != eos) else None
    if eot is not None and vocab.special_ids.get("eot") in (None, eot):
        vocab.special_ids["eot"] = eot
        extra = [tid for tid in extra if tid != eot]
    slots = [k for k in ("eot", "eom") if vocab.special_ids.get(k) is None]
    for tid in extra:
        if not slots:
            raise UserError(
                f"{model_dir}: the template ends turns with more tokens than GGUF can mark as end-of-generation "
                f"(eos, eot, eom): {eot_tokens}"
            )
        vocab.special_ids[slots.pop(0)] = tid
    declared = {vocab.special_ids.get(k) for k in ("eos", "eot", "eom")} - {None}
    gen_ids: list[int] = []
    for tid in _generation_eos(model_dir, len(vocab.tokens)):
        if tid in declared or tid in gen_ids:
            continue
        if vocab.toktypes[tid] not in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            vocab.notes.append(
                f"generation_config eos id {tid} ({vocab.tokens[tid]!r}) not made EOG: an ordinary token"
            )
            continue
        gen_ids.append(tid)
        if vocab.special_ids.get("eos") is None:
            vocab.special_ids["eos"] = tid
        elif _text(vocab, tid) in _LLAMA_CPP_EOG_TEXTS:
            continue  # EOG in llama.cpp by its text: the eot slot stays the chat turn's, eom stays free
        elif slots and (slots[0] != "eot" or not ids):  # eot only when the template has no end-of-turn token
            vocab.special_ids[slots.pop(0)] = tid
        elif "eom" in slots:
            slots.remove("eom")
            vocab.special_ids["eom"] = tid
        else:
            vocab.notes.append(
                f"generation_config eos id {tid} ({vocab.tokens[tid]!r}) is in tokenizer.ggml.eos_token_ids (Ollama "
                "stops on it) but not EOG for llama.cpp: no eot/eom slot left"
            )
    every = [vocab.special_ids[k] for k in ("eos", "eot", "eom") if vocab.special_ids.get(k) is not None]
    vocab.eos_ids = list(dict.fromkeys([*every, *gen_ids]))
    if len(vocab.eos_ids) < 2:  # eos alone: tokenizer.ggml.eos_token_id says it all
        vocab.eos_ids = []


def write_vocab(w: gguf.GGUFWriter, vocab: Vocab, chat_template: str | None) -> None:
    """Tokenizer keys in llama.cpp's layout."""
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.toktypes)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for kind, tid in vocab.special_ids.items():
        getattr(w, f"add_{kind}_token_id")(tid)
    if vocab.eos_ids:  # gguf-py has no constant or writer method for it (Ollama's convert/ writes this key)
        w.add_array(EOS_TOKEN_IDS, vocab.eos_ids)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        w.add_add_eos_token(vocab.add_eos)
    for kind, value in vocab.add_other.items():
        if (add := getattr(w, f"add_add_{kind}_token", None)) is not None:
            add(value)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template is not None:
        w.add_chat_template(chat_template)
        named = {k: v for k, v in vocab.named_templates.items() if k != "default"}
        if named and vocab.named_templates.get("default", chat_template) == chat_template:  # the model's own set
            # as llama.cpp's converter (gguf-py add_chat_template with the list), the names in the file's order
            for name, template in named.items():
                w.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), template)
            w.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, list(named))
