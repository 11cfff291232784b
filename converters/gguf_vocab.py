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
    if has_spm_model and arch_name in ("llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3"):
        vocab = _spm_model_vocab(model_dir, vocab_size, fixed_added_types=arch_name == "phi3")
    elif tj and _is_spm_json(tj):
        vocab = _spm_json_vocab(model_dir, tj)
    elif tj:
        vocab = _bpe_vocab(model_dir, vocab_size, tokenizer, arch.pre_names)
    else:
        raise UserError(f"{model_dir}: no tokenizer.json or tokenizer.model; cannot export the vocabulary")
    if vocab.model == "llama" and arch_name in ("gemma2", "gemma3"):
        vocab.add_space_prefix = False
    elif vocab.model == "llama" and arch_name == "llama":
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


def _set_eog(vocab: Vocab, eot_tokens: list[str], model_dir: Path) -> None:
    """Make each end-of-turn token an EOG id: eos already is; the first other one is eot, the next eom. Then the
    ids generation_config stops on, where a slot is left (a template's own Jinja may not say that a turn can end
    with, e.g., GLM-4's <|observation|>); one that does not fit is noted."""
    eos = vocab.special_ids.get("eos")
    extra: list[int] = []
    for text in eot_tokens:
        tid = vocab.token_id(text)
        if tid is None:
            raise UserError(f"{model_dir}: end-of-turn token {text!r} of the chat template is not in the vocabulary")
        if vocab.toktypes[tid] not in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            vocab.notes.append(f"end-of-turn token {text!r} (id {tid}) was a normal token; typed CONTROL")
            vocab.toktypes[tid] = gguf.TokenType.CONTROL
        if tid != eos and tid not in extra:
            extra.append(tid)
    if eos is None and extra:
        vocab.special_ids["eos"] = extra.pop(0)
    slots = ["eot", "eom"]
    for tid in extra:
        for slot in list(slots):
            slots.remove(slot)
            if vocab.special_ids.get(slot) in (None, tid):
                vocab.special_ids[slot] = tid
                break
        else:
            raise UserError(
                f"{model_dir}: the template ends turns with more tokens than GGUF can mark as end-of-generation "
                f"(eos, eot, eom): {eot_tokens}"
            )
    for tid in _generation_eos(model_dir, len(vocab.tokens)):
        free = [k for k in ("eos", "eot", "eom") if vocab.special_ids.get(k) is None and (k == "eos" or k in slots)]
        if tid in (vocab.special_ids.get(k) for k in ("eos", "eot", "eom")):
            continue
        if not free or vocab.toktypes[tid] not in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            why = "no eos/eot/eom slot left" if free == [] else "an ordinary token"
            vocab.notes.append(f"generation_config eos id {tid} ({vocab.tokens[tid]!r}) not made EOG: {why}")
            continue
        vocab.special_ids[free[0]] = tid


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
