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

from exporter.config import read_json, read_json_object
from exporter.errors import UserError

# Why a model that needs its own Python (auto_map, pickled objects) is refused, and trust_remote_code does nothing.
NO_MODEL_CODE = "exporter never runs code from a model"

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
# Files that hold a vocabulary (a tokenizer_config.json alone does not), besides `*.tiktoken`.
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def has_tokenizer(model_dir: Path) -> bool:
    """Whether `model_dir` carries a tokenizer of its own (an adapter dir from training does)."""
    return any((model_dir / f).is_file() for f in _CORE)


def tokenizer_source(base: Path, adapter_dirs: list[Path]) -> Path:
    """Where a merge's tokenizer comes from: the last adapter dir that carries one (training writes its template and
    added tokens there), else the base."""
    return next((a for a in reversed(adapter_dirs) if has_tokenizer(a)), base)


def check_readable(model_dir: Path) -> None:
    """Every weights header and text file of an HF model or adapter dir parses: a truncated or corrupt safetensors
    file, a JSON / Jinja / merges file that is not UTF-8 (or not a JSON object), or a `chat_template` of another
    type than transformers reads, is one line naming it, before a loader would raise its own traceback."""
    from exporter.config import read_text
    from exporter.safetensors_file import read_header

    for f in sorted(model_dir.glob("*.safetensors")):
        read_header(f)
    for name in _CHECKED_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".json"):
            read_text(path)
        elif name in ("tokenizer_config.json", "chat_template.json"):
            saved_chat_template(read_json_object(path), path)
        else:
            read_json_object(path)


def quant_method(model_dir: Path) -> str | None:
    """How `model_dir` was saved quantized (its config.json `quantization_config`: gptq, awq, bitsandbytes ...), None
    for a 16/32-bit model."""
    doc = read_json(model_dir / "config.json", optional=True)
    qc = doc.get("quantization_config") if isinstance(doc, dict) else None
    if not qc:
        return None
    return str(qc.get("quant_method", "unknown method")) if isinstance(qc, dict) else "unknown method"


def saved_chat_template(cfg: dict[str, Any], path: Path) -> str | None:
    """The `chat_template` of a tokenizer_config.json / chat_template.json (`path`, for the message): a string, or
    the "default" one of a list of {name, template} (transformers' named templates); None when there is none.
    Another type is a UserError, not a model without a template."""
    ct = cfg.get("chat_template")
    if ct is None or isinstance(ct, str):
        return ct
    if isinstance(ct, list) and all(
        isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("template"), str) for d in ct
    ):
        return next((d["template"] for d in ct if d["name"] == "default"), None)
    shown = json.dumps(ct)
    raise UserError(f"{path}: chat_template is {shown if len(shown) <= 60 else shown[:57] + '...'}; expected a "
                    "string or a list of {name, template}")  # fmt: skip


def tokenizer_dir(model_dir: Path, adapter: Path | None) -> Path:
    """Where a model's tokenizer is loaded from: the adapter dir when it has one (the training template and any
    added tokens live there), else the model dir."""
    return adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model_dir


def load_tokenizer(tok_dir: Path, sentencepiece_prefix: bool = False) -> Any:
    """The transformers tokenizer in `tok_dir`, never running code shipped with it: one line naming the dir when it
    cannot load (tokenizer files missing, a tokenizer class that only the dir's own code defines). With
    `sentencepiece_prefix`, SentencePiece's "▁" prefix as training and llama.cpp use it (`spm.load_tokenizer`)."""
    from transformers import AutoTokenizer

    from exporter import spm

    try:
        if sentencepiece_prefix:
            return spm.load_tokenizer(tok_dir, trust_remote_code=False)
        return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    except Exception as e:  # any loader failure on these files is a fault of the dir
        code = _auto_map(tok_dir, "AutoTokenizer")
        if code:
            raise UserError(f"model {tok_dir}: its tokenizer is the code shipped with it (auto_map: {code}), and "
                            f"{NO_MODEL_CODE}") from None  # fmt: skip
        vocabulary = any((tok_dir / f).is_file() for f in _VOCABULARY_FILES) or any(tok_dir.glob("*.tiktoken"))
        why = _reason(e) if vocabulary else "no tokenizer.json or tokenizer.model"
        raise UserError(f"model {tok_dir}: cannot load its tokenizer ({why})") from None


def _reason(e: BaseException) -> str:
    """A loader's error message on one line, cut to a readable length."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _auto_map(model_dir: Path, key: str) -> str | None:
    """The class `key` (AutoTokenizer, AutoConfig, ...) names in the dir's `auto_map` (config.json, or
    tokenizer_config.json for AutoTokenizer): code shipped with the model; None when there is none."""
    for name in ("tokenizer_config.json", "config.json"):
        auto = read_json_object(model_dir / name, optional=True).get("auto_map")
        ref = auto.get(key) if isinstance(auto, dict) else None
        ref = next((r for r in reversed(ref) if r), None) if isinstance(ref, list) else ref
        if isinstance(ref, str):
            return ref
    return None


def pickle_refused(model_dir: Path) -> UserError:
    """The refusal of a model whose pickled weights need more than plain tensors to unpickle."""
    return UserError(f"model {model_dir}: refusing to load its pickled weights: they need more than plain tensors to "
                     f"unpickle, and {NO_MODEL_CODE}; convert them to safetensors where they were made")  # fmt: skip


def check_loadable(model_dir: Path, tok_dir: Path | None = None, model: bool = True, tokenizer: bool = True) -> None:
    """Before any work, with no code from the dir run: `check_readable` (also of `tok_dir`), then that the
    tokenizer in `tok_dir` (default `model_dir`) loads (`load_tokenizer`), and with `model`, that transformers can
    build the model without the dir's code (config.json) and that its weights are safetensors or pickles of plain
    tensors. `model=False` (merge, which streams safetensors itself and copies a remote-code model's *.py along):
    the tokenizer only, and a tokenizer.json is read as the merge reads it, by the tokenizers library.
    `tokenizer=False`: the caller loads it next through `load_tokenizer` (a large vocabulary takes a second or two
    to load: not twice)."""
    tok_dir = tok_dir or model_dir
    for d in dict.fromkeys((model_dir, tok_dir)):
        check_readable(d)
    if model:
        _check_model_code(model_dir)
        _check_pickles(model_dir)
    if not tokenizer:
        return
    if model or not (tok_dir / "tokenizer.json").is_file():
        load_tokenizer(tok_dir)
        return
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception as e:  # the library's message for a malformed file
        raise UserError(f"{tok_dir / 'tokenizer.json'}: not a tokenizer ({_reason(e)})") from None


def _check_model_code(model_dir: Path) -> None:
    """config.json names a model transformers has, not one that only the dir's own code defines."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # any loader failure on config.json is a fault of the dir
        code = _auto_map(model_dir, "AutoConfig") or _auto_map(model_dir, "AutoModelForCausalLM")
        if code:
            raise UserError(f"model {model_dir}: its architecture is the code shipped with it (auto_map: {code}), "
                            f"and {NO_MODEL_CODE}") from None  # fmt: skip
        raise UserError(f"{model_dir / 'config.json'}: transformers cannot load it ({_reason(e)})") from None


def _check_pickles(model_dir: Path) -> None:
    """pytorch_model*.bin weights (what transformers loads when there is no safetensors file) unpickle to plain
    tensors (torch's weights_only, memory-mapped: nothing is read into memory, no code runs)."""
    import pickle
    import zipfile

    import torch

    if any(model_dir.glob("*.safetensors")):
        return
    for f in sorted(model_dir.glob("pytorch_model*.bin")):
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except pickle.UnpicklingError:
            raise pickle_refused(model_dir) from None
        except (OSError, RuntimeError, EOFError) as e:
            raise UserError(f"{f}: not a PyTorch weights file ({_reason(e)})") from None


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
        gen = read_json_object(src)
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
