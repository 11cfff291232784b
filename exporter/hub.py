"""Model and adapter locations: a local directory, or a Hugging Face hub id downloaded into the HF cache."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name_or_path: str | Path, what: str = "model", cache_dir: str | Path | None = None) -> Path:
    """Local dir for `name_or_path`; a hub id (`owner/name`) is downloaded with huggingface_hub first, into
    `cache_dir` when given (LLaMA-Factory's `cache_dir` key: a hub cache of its own, `models--owner--name/snapshots/`
    as in HF_HUB_CACHE; offline, a snapshot already there is used), else into the HF cache."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what} {p} is a file; expected a directory with config/weights")
        return p
    name = str(name_or_path)
    if not _HUB_ID.match(name):
        raise UserError(f"{what} {name!r}: no such directory (and it is not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, cache_dir=str(Path(cache_dir).expanduser()) if cache_dir else None))
    except Exception as e:  # network, auth, missing repo: all one message for the user
        where = f" into cache_dir {cache_dir}" if cache_dir else ""
        raise UserError(
            f"{what} {name!r}: not a local directory, and fetching it from the Hugging Face hub{where} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None
