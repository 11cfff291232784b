"""Atomic outputs: write into `<out>.tmp-*`, fsync, rename when complete; a crash leaves nothing final-looking."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import UserError


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing output unless `force`."""
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")


def check_free_space(where: Path, needed_bytes: int) -> None:
    """Fail before writing when the disk under `where` cannot hold `needed_bytes` (+5%)."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.05:
        raise UserError(
            f"not enough free disk under {probe}: need about {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free"
        )


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_dir(out: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling dir; on success it is fsynced and renamed to `out`, on failure removed."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: Path | str, force: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file path; renamed to `out` on success, removed on failure."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
