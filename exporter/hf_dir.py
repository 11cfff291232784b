"""An exported Hugging Face model dir, finished the same way by train, merge and quantize (and train's checkpoints):
the tokenizer files copied verbatim from their source (no re-save drift), `generation_config.json` from the source
model, the chat template written into both (`templates.write_into`: tokenizer_config.json, chat_template.jinja, and
every end-of-turn id in `eos_token_id`), then the manifest. Also what a tokenizer does on encode (`adds_bos`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from exporter.config import read_json
from exporter.errors import UserError

# Files that make up a tokenizer (and its chat template) in an HF dir, besides `*.tiktoken`.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "tokenizer.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
# Files a loader reads as text (JSON must parse): checked before loading, so their faults are one line.
_CHECKED_FILES = ("config.json", "generation_config.json", "adapter_config.json", "model.safetensors.index.json",
                  *(f for f in TOKENIZER_FILES if f.endswith((".json", ".txt", ".jinja"))))  # fmt: skip
_CORE = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")  # one of these makes a dir a tokenizer source


def has_tokenizer(model_dir: Path) -> bool:
    """Whether `model_dir` carries a tokenizer of its own (an adapter dir from training does)."""
    return any((model_dir / f).is_file() for f in _CORE)


def check_readable(model_dir: Path) -> None:
    """Every weights header and text file of an HF model or adapter dir parses: a truncated or corrupt safetensors
    file, or a JSON / Jinja / merges file that is not UTF-8 (or not JSON), is one line naming it, before a loader
    would raise its own traceback."""
    from exporter.config import read_text
    from exporter.safetensors_file import read_header

    for f in sorted(model_dir.glob("*.safetensors")):
        read_header(f)
    for name in _CHECKED_FILES:
        if (model_dir / name).is_file():
            (read_json if name.endswith(".json") else read_text)(model_dir / name)


def vocabulary(model_dir: Path) -> dict[str, int] | None:
    """Token -> id of the tokenizer in `model_dir` (added tokens included), read from tokenizer.json, else
    vocab.json + added_tokens.json, else tokenizer.model (SentencePiece); None when there is none of them."""
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        doc = read_json(tj)
        model = doc.get("model") or {}
        raw = model.get("vocab") or {}
        if isinstance(raw, list):  # Unigram: [piece, score] in id order
            vocab = {str(p[0]): i for i, p in enumerate(raw)}
        else:
            vocab = {str(t): int(i) for t, i in raw.items()}
        vocab.update({str(t["content"]): int(t["id"]) for t in doc.get("added_tokens") or []})
        return vocab or None
    if (model_dir / "vocab.json").is_file():
        vocab = {str(t): int(i) for t, i in read_json(model_dir / "vocab.json").items()}
        return vocab | _added_tokens(model_dir)
    sp = model_dir / "tokenizer.model"
    if sp.is_file():
        try:
            import sentencepiece
        except ImportError:
            return None
        try:
            proc = sentencepiece.SentencePieceProcessor(model_file=str(sp))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{sp}: not a SentencePiece model ({e})") from None
        vocab = {proc.id_to_piece(i): i for i in range(proc.get_piece_size())}
        return vocab | _added_tokens(model_dir)
    return None


def _added_tokens(model_dir: Path) -> dict[str, int]:
    """Tokens added beside a vocab.json or tokenizer.model: added_tokens.json and tokenizer_config.json's
    `added_tokens_decoder` (where transformers keeps them; Phi-3's 64, Mistral's control tokens)."""
    added = {str(t): int(i) for t, i in read_json(model_dir / "added_tokens.json", optional=True).items()}
    decoder = read_json(model_dir / "tokenizer_config.json", optional=True).get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for i, t in decoder.items():
            if isinstance(t, dict) and isinstance(t.get("content"), str) and str(i).isdigit():
                added[t["content"]] = int(i)
    return added


def tokenizer_files(model_dir: Path) -> list[str]:
    """Names of the tokenizer files present in `model_dir`."""
    names = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()] + [p.name for p in model_dir.glob("*.tiktoken")]
    return list(dict.fromkeys(names))


def copy_tokenizer(src: Path, out: Path) -> None:
    """Replace the tokenizer files in `out` (a library's re-saved copies) with `src`'s, byte for byte, then give a
    SentencePiece tokenizer back the "▁" prefix transformers 5 drops (`spm.fix_dir`: the ids llama.cpp will use)."""
    from exporter import spm

    names = tokenizer_files(src)
    if not any(n in names for n in _CORE):
        raise UserError(f"{src}: no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)")
    for name in (*TOKENIZER_FILES, *(p.name for p in out.glob("*.tiktoken"))):
        (out / name).unlink(missing_ok=True)
    for name in names:
        shutil.copyfile(src / name, out / name)
    spm.fix_dir(out)


def write_generation_config(model_dir: Path, out: Path) -> None:
    """`model_dir`'s generation_config.json, else one with the bos/eos/pad ids of its config.json."""
    src = model_dir / "generation_config.json"
    if src.is_file():
        gen = read_json(src)
    else:
        config = read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
        text = config.get("text_config") or {}
        gen = {k: config.get(k, text.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        gen = {k: v for k, v in gen.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def finish(
    out: Path,
    tpl: Any,
    model_dir: Path,
    tokenizer_dir: Path | None = None,
    stage: str | None = None,
    inputs: dict[str, Path | str] | None = None,
    settings: dict[str, Any] | None = None,
    strict: bool = True,
) -> list[str]:
    """Complete an exported dir whose weights are written: tokenizer from `tokenizer_dir` (None: already in place),
    generation_config from `model_dir`, the chat template `tpl` (None: none to write), and the manifest of `stage`.
    Returns the template problems `templates.write_into` let pass (`strict=False`: a template nobody asked for)."""
    from exporter import manifest, templates

    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    write_generation_config(model_dir, out)
    warnings = templates.write_into(out, tpl, strict=strict) if tpl is not None else []
    if stage is not None:
        manifest.write(out, stage, inputs=inputs or {}, settings=settings)
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# What a tokenizer does on encode


def adds_special(encode: Callable[[str, bool], Sequence[int]], bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """(prepends BOS, appends EOS) for `encode(text, add_special_tokens)`: what encoding with special tokens adds
    to the same text encoded without them."""
    ids, bare = list(encode("Hello world", True)), list(encode("Hello world", False))
    added = len(ids) > len(bare)
    return (bos is not None and added and ids[0] == bos), (eos is not None and added and ids[-1] == eos)


def adds_bos(tokenizer: Any) -> bool:
    """Whether a transformers tokenizer prepends its BOS token when encoding with special tokens (the default)."""
    return adds_special(
        lambda text, special: tokenizer(text, add_special_tokens=special)["input_ids"],
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )[0]
