"""Safe outputs: one writer per output path, written into `<out>.tmp-*`, fsynced and renamed when complete.

- `claim(out)` holds `<parent>/.<name>.exporter-lock` for the whole run: a second run writing the same path exits 2
  naming the holder's pid and command; under the lock, temporary dirs of killed runs for that path are named and
  removed.
- `check_target(out, force, inputs)` never lets an output replace or mix into what is not ours: it must be absent,
  an empty dir, or (with force) an exporter output (it holds `exporter_manifest.json`), and never an input;
  `occupant(out)` is that classification, for stages that write into a dir rather than replace it.
- `atomic_dir` / `atomic_file` write beside the target and rename; a crash or error leaves nothing final-looking,
  a full disk is one line saying how much space was needed; outputs follow the umask (not tempfile's 0700/0600, nor
  safetensors' 0600). `scratch_dir` is a work dir for intermediates of an output (export's merge before quantizing),
  named as its temporaries, so a killed run's is removed the same way.
- `leftover(name)` / `lock_name(name)`: the only names these write beside an output, so that what they left behind
  is recognised by its exact name and nothing else is ever taken for it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import UserError
from exporter.manifest import MANIFEST_NAME as MARKER  # every output dir we write holds one

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_held: dict[Path, int] = {}  # claimed output path -> nesting depth in this process
_FULL = (errno.ENOSPC, errno.EDQUOT)
# `<out>.tmp-<pid>-<tempfile's 8 random characters>` (mkdtemp/mkstemp) and `<out>.old-<pid>` (`_replace`)
_LEFTOVER = re.compile(r"(?P<out>.+)\.(?:tmp-(?P<pid>\d+)-[a-z0-9_]{8}|old-(?P<old>\d+))")
_LOCK = ".exporter-lock"


def leftover(name: str) -> tuple[str, int] | None:
    """(output name, writer's pid) when `name` is a temporary this module writes beside an output, else None."""
    m = _LEFTOVER.fullmatch(name)
    return (m["out"], int(m["pid"] or m["old"])) if m else None


def lock_name(name: str) -> str:
    """The lock file `claim` holds beside the output `name`."""
    return f".{name}{_LOCK}"


def locked(name: str) -> str | None:
    """The output whose lock file `name` is (`lock_name`), else None."""
    inner = name.removeprefix(".").removesuffix(_LOCK)
    return inner if inner and len(name) == len(inner) + 1 + len(_LOCK) else None


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _key(out: Path) -> Path:
    return out.parent.resolve() / out.name


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def overlapping(out: Path | str, inputs: Sequence[Path | str]) -> Path | str | None:
    """The first existing input that `out` is, lies inside or holds, else None."""
    where = _key(Path(out))
    return next((inp for inp in inputs if Path(inp).exists() and _overlaps(where, Path(inp).resolve())), None)


def check_target(out: Path, force: bool, inputs: Sequence[Path | str] = ()) -> None:
    """Refuse an output that overlaps an input, an existing output without `force`, and anything not ours."""
    out = Path(out)
    inp = overlapping(out, inputs)
    if inp is not None:
        raise UserError(
            f"output {out} overlaps the input {inp} (it would replace or write into it); choose an output "
            "path outside the inputs"
        )
    found = occupant(out)
    if found == "none" and not out.is_symlink():
        return  # absent, or an empty dir (replaced)
    if not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if found != "ours":
        raise UserError(
            f"{out} exists and is not an exporter output (no {MARKER} in it); not replacing it: remove it yourself "
            "or choose another output path"
        )


def occupant(out: Path) -> str:
    """What is at `out` (a symlink counts as what it points to): "none" (nothing, or an empty dir), "ours" (a dir
    holding the exporter marker) or "other" (a file, a dangling link, a user's dir)."""
    if not out.exists():
        return "other" if out.is_symlink() else "none"
    if not out.is_dir():
        return "other"
    if (out / MARKER).is_file():
        return "ours"
    return "other" if any(out.iterdir()) else "none"


def check_free_space(where: Path, needed_bytes: int) -> None:
    """Fail before writing when the disk under `where` cannot hold `needed_bytes` (+5%)."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.05:
        raise UserError(f"not enough free disk under {probe}: need about {_gib(needed_bytes)}, {_gib(free)} free")


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` when it is one a user fixes (disk full, read-only, no permission), else None.

    Libraries wrap write errors (safetensors' SafetensorError, torch's RuntimeError): the chain and the text count."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (*_FULL, errno.EROFS, errno.EACCES, errno.EPERM):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    if "No space left on device" in text or "StorageFull" in text:
        return OSError(errno.ENOSPC, "No space left on device")
    return None


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out.parent}: {err.strerror}") from None


def _remove_stale(out: Path, only_dead: bool) -> None:
    """Remove `<out>.tmp-*` / `<out>.old-*` left by killed runs (all of them while `out` is claimed)."""
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        found = leftover(p.name)
        if found is None or found[0] != out.name or (only_dead and _alive(found[1])):
            continue
        size = _size(p)
        _discard(p)
        print(f"note: removed {p} ({_gib(size)}), left behind by an interrupted run", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    text = " ".join(shlex.quote(a) for a in argv)
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def claim(out: Path | str) -> Iterator[None]:
    """Be the only writer of `out` while the block runs (re-entrant in one process); clean up killed runs' temps."""
    out = Path(out)
    _make_parent(out)
    key = _key(out)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = out.parent / lock_name(out.name)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"cannot write into {out.parent}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "pid unknown"
            os.close(fd)
            raise UserError(
                f"{out} is being written by another exporter run ({holder}); wait for it to finish or choose "
                "another output path"
            ) from None
        try:  # a finishing holder may have removed the file we opened: lock the one at the path now
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {_command()}\n".encode(), 0)
    _held[key] = 1
    try:
        _remove_stale(out, only_dead=False)
        yield
    finally:
        del _held[key]
        lock.unlink(missing_ok=True)
        os.close(fd)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, out)


def _follow_umask(path: Path) -> None:
    """Give a written file, or every file and dir under a written dir, the mode the umask gives a new one (0644/0755
    under 022; executables keep their x bits): tempfile makes 0600/0700, safetensors' save_file 0600."""
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        full = 0o777 if p.is_dir() or mode & 0o111 else 0o666
        if stat.S_IMODE(mode) != full & ~_UMASK:
            os.chmod(p, full & ~_UMASK)


def _disk_full(out: Path, tmp: Path, need: int | None, err: OSError) -> UserError:
    written = _size(tmp)
    _discard(tmp)
    free = shutil.disk_usage(out.parent).free
    total = f"about {_gib(need)} needed in all" if need else f"more than the {_gib(written)} written so far needed"
    return UserError(
        f"disk full under {out.parent} while writing {out} ({err.strerror}): {_gib(written)} written, {total}, "
        f"{_gib(free)} free now; the partial output was removed"
    )


@contextmanager
def _committed(tmp: Path, out: Path, need: int | None) -> Iterator[Path]:
    """Yield `tmp`; then fsync it and rename it to `out`, or on any error remove it (a full disk, a read-only or
    forbidden path as one line)."""
    try:
        yield tmp
        _follow_umask(tmp)
        _fsync_tree(tmp)
        _replace(tmp, out)
    except BaseException as e:
        err = os_error(e)
        if err is not None and err.errno in _FULL:
            raise _disk_full(out, tmp, need, err) from None
        _discard(tmp)
        if err is not None:
            raise UserError(f"cannot write {err.filename or out}: {err.strerror}") from None
        raise


def _temp_prefix(out: Path) -> str:
    """The start of the name of every temporary written beside `out` (`leftover` recognises it)."""
    return f"{out.name}.tmp-{os.getpid()}-"


@contextmanager
def scratch_dir(out: Path | str) -> Iterator[Path]:
    """A work dir beside `out` for its intermediates while `out` is claimed, removed on exit; named as `out`'s
    temporaries, so one a killed run left behind is removed by the next run writing `out`."""
    out = Path(out)
    with claim(out):
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
        try:
            yield tmp
        finally:
            _discard(tmp)


@contextmanager
def atomic_dir(
    out: Path | str, force: bool = False, inputs: Sequence[Path | str] = (), need: int | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling dir; on success it is fsynced and renamed to `out`, on failure removed.

    `need` (bytes, when known) goes into the message should the disk fill up."""
    out = Path(out)
    with claim(out):
        check_target(out, force, inputs)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
        with _committed(tmp, out, need) as t:
            yield t


@contextmanager
def atomic_file(out: Path | str, force: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file path; renamed to `out` on success, removed on failure."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; expected a file path")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    _make_parent(out)
    _remove_stale(out, only_dead=True)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent)
    except OSError as err:
        raise UserError(f"cannot write into {out.parent}: {err.strerror}") from None
    os.close(fd)
    with _committed(Path(name), out, None) as t:
        yield t
