"""SentencePiece dummy prefix as SentencePiece and llama.cpp apply it, for transformers 5 tokenizers.

SentencePiece (and llama.cpp, which serves the exported GGUF) turns every text into "▁" + text with spaces as "▁":
" Hi" becomes "▁▁Hi", and llama.cpp starts every piece of text after a control token ("[INST]Hi", "<|user|>Hi")
afresh, with its own "▁". transformers 5 rebuilds Llama 2 / Mistral v0.x / Phi-3 tokenizers with
`Metaspace(prepend_scheme="first")`, which adds "▁" only to the first piece and never before a space, so a model
would be trained on one tokenization and served with another. The fix is the normalizer these models' own
tokenizer.json files had before (Prepend "▁", then every space to "▁"), applied to each piece between added tokens:
`fix_tokenizer` changes a loaded tokenizer in memory (training uses it), `fix_dir` rewrites an exported dir so that
`AutoTokenizer` loads it that way (the generic fast class keeps tokenizer.json as written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the class name transformers 4 and 5 both load from tokenizer.json without rebuilding its pipeline
GENERIC_CLASS = "PreTrainedTokenizerFast"


def drifts(backend: Any) -> bool:
    """Whether a `tokenizers.Tokenizer` adds SentencePiece's "▁" the transformers-5 way (first piece only, never
    before a space) instead of SentencePiece's."""
    from tokenizers import pre_tokenizers

    pre = backend.pre_tokenizer
    return (
        isinstance(pre, pre_tokenizers.Metaspace)
        and pre.prepend_scheme in ("first", "always")
        and not pre.split
        and json.loads(backend.model.__getstate__()).get("byte_fallback", False)
    )


def fix_tokenizer(tokenizer: Any) -> bool:
    """Make a loaded transformers tokenizer add "▁" like SentencePiece and llama.cpp (in place); True if changed."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    if not drifts(backend):
        return False
    mark = backend.pre_tokenizer.replacement
    steps = [normalizers.Prepend(mark), normalizers.Replace(" ", mark)]
    if backend.normalizer is not None:
        steps.insert(0, backend.normalizer)
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    return True


def load_tokenizer(model_dir: Path | str, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained` with SentencePiece's prefix (the tokenization the exported model sees)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    if getattr(tokenizer, "is_fast", False):
        fix_tokenizer(tokenizer)
    return tokenizer


def fix_dir(out_dir: Path | str) -> bool:
    """Rewrite an HF dir's tokenizer.json (and its class in tokenizer_config.json) so transformers tokenizes like
    SentencePiece and llama.cpp; True if the files changed. Dirs without tokenizer.json are left alone."""
    from transformers import AutoTokenizer

    from exporter.atomic import atomic_file
    from exporter.errors import UserError

    out_dir = Path(out_dir)
    if not (out_dir / "tokenizer.json").is_file():
        return False
    model = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8")).get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False  # not SentencePiece-style (byte-level BPE, Unigram, WordPiece): nothing to restore
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False) or not fix_tokenizer(tokenizer):
        return False
    with atomic_file(out_dir / "tokenizer.json") as tmp:
        tokenizer.backend_tokenizer.save(str(tmp))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["tokenizer_class"] = GENERIC_CLASS
    with atomic_file(cfg_path) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if drifts(AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False).backend_tokenizer):
        raise UserError(f"{out_dir}: the tokenizer still drops SentencePiece's '▁' prefix after rewriting it")
    return True
