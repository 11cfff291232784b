"""Safe outputs: one writer per output path, written into `<out>.tmp-*`, fsynced and renamed when complete.

- `claim(out)` holds `<parent>/.<name>.exporter-lock` for the whole run (of the path `out` resolves to, so a symlink
  and its target share one lock): a second run writing the same path exits 2 naming the holder's pid and command;
  under the lock, what killed runs left for that path is named and removed, or put back (`settle`). An output name
  too long for the temporary names beside it is refused first (`check_name`).
- `check_target(out, force, inputs)` never lets an output replace or mix into what is not ours: it must be absent,
  an empty dir, or (with force) an exporter output (it holds `exporter_manifest.json`), and never an input;
  `occupant(out)` is that classification, for stages that write into a dir rather than replace it.
- `atomic_dir` / `atomic_file` write beside the target and rename (the files, their dirs and the rename fsynced); a
  crash or error leaves nothing final-looking, a full disk is one line saying how much space was needed; outputs
  follow the umask (not tempfile's 0700/0600, nor safetensors' 0600). `scratch_dir` is a work dir for intermediates
  of an output (export's merge before quantizing), named as its temporaries, so a killed run's is removed the same
  way.
- `leftover(name)` / `lock_name(name)`: the only names these write beside an output, so that what they left behind
  is recognised by its exact name and nothing else is ever taken for it: every temporary carries `-<pid>-<8 random
  characters>` (`tag()`), a mark a user's `backup.old-1` or `ckpt.tmp-2024` does not have. A previous output moved
  aside by `_replace` (`<out>.old-<tag>`) is put back, never removed, when a killed run left `<out>` missing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
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
# errors a user fixes (`os_error`): a full disk, a file-size limit (`ulimit -f`), a name too long, no permission
_USER_ERRNOS = (*_FULL, errno.EFBIG, errno.ENAMETOOLONG, errno.EROFS, errno.EACCES, errno.EPERM)
# the mark of every temporary name: the writer's pid and 8 random characters (tempfile's, or `tag()`'s)
TAG = r"(?P<pid>\d+)-[a-z0-9_]{8}"
# `<out>.tmp-<tag>` (mkdtemp/mkstemp) and `<out>.old-<tag>` (a previous output moved aside by `_replace`)
_LEFTOVER = re.compile(rf"(?P<out>.+)\.(?P<kind>tmp|old)-{TAG}")
_LOCK = ".exporter-lock"
_TAG_LEN = 1 + 7 + 1 + 8  # "-<pid>-<8 random>" with pid_max's 7 digits
_LONGEST = len(".tmp") + _TAG_LEN  # the longest suffix a temporary adds to the output's name


def tag() -> str:
    """`<this pid>-<8 random characters>`: the mark that makes a name one we write (`TAG`)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def leftover(name: str) -> tuple[str, int] | None:
    """(output name, writer's pid) when `name` is a temporary this module writes beside an output, else None."""
    m = _LEFTOVER.fullmatch(name)
    return (m["out"], int(m["pid"])) if m else None


def lock_name(name: str) -> str:
    """The lock file `claim` holds beside the output `name`."""
    return f".{name}{_LOCK}"


def locked(name: str) -> str | None:
    """The output whose lock file `name` is (`lock_name`), else None."""
    inner = name.removeprefix(".").removesuffix(_LOCK)
    return inner if inner and len(name) == len(inner) + 1 + len(_LOCK) else None


def _fsync_tree(path: Path) -> None:
    """fsync every file under `path` (or the file), then every dir under it: a new file's name is in its dir, which
    fsync(2) of the file does not write out."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    dirs = [] if path.is_file() else [*(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink()), path]
    for p in paths:
        _fsync(p)
    for d in dirs:
        _fsync(d)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL or not path.is_dir():  # a file system that cannot sync a dir: nothing to do
            raise
    finally:
        os.close(fd)


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{int(n)} bytes"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)


def _key(out: Path) -> Path:
    """The path `out` stands for: a symlink's target, so that every spelling of one output takes one lock."""
    return out.resolve() if out.is_symlink() else out.parent.resolve() / out.name


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def overlapping(out: Path | str, inputs: Sequence[Path | str]) -> Path | str | None:
    """The first existing input that `out` is, lies inside or holds, else None."""
    where = _key(Path(out))
    return next((inp for inp in inputs if Path(inp).exists() and _overlaps(where, Path(inp).resolve())), None)


def check_inputs(out: Path | str, inputs: Sequence[Path | str], what: str = "output") -> None:
    """Refuse an output (`what`: how the user named it) that is, holds or lies inside an existing input."""
    inp = overlapping(out, inputs)
    if inp is not None:
        raise UserError(
            f"{what} {out} overlaps the input {inp} (it would replace or write into it); choose an output "
            "path outside the inputs"
        )


def check_target(out: Path, force: bool, inputs: Sequence[Path | str] = ()) -> None:
    """Refuse an output that overlaps an input, an existing output without `force`, and anything not ours."""
    out = Path(out)
    check_inputs(out, inputs)
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
        if isinstance(seen, OSError) and seen.errno in _USER_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    if "No space left on device" in text or "StorageFull" in text:
        return OSError(errno.ENOSPC, "No space left on device")
    if "File too large" in text:  # safetensors' SafetensorError wraps EFBIG as text
        return OSError(errno.EFBIG, "File too large")
    return None


def os_error_text(err: OSError, what: str = "writing an output") -> str:
    """`err` as the one line a user reads: the file (or `what`), the reason, and for a file-size limit which one."""
    limit = " (over the file-size limit of this process: ulimit -f)" if err.errno == errno.EFBIG else ""
    return f"{err.filename or what}: {err.strerror}{limit}"


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing parent of `path` that is not a directory (so `path` cannot be created), else None."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _make_parent(out: Path) -> None:
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise UserError(f"cannot create {out.parent}: {blocker} is a file, not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out.parent}: {err.strerror}") from None


def check_name(out: Path | str) -> None:
    """Refuse, before any work, an output whose name leaves no room for the temporary names written beside it."""
    out = Path(out)
    probe = out.parent
    while not probe.is_dir() and probe != probe.parent:
        probe = probe.parent
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    limit = name_max - _LONGEST
    if len(os.fsencode(out.name)) > limit:
        raise UserError(
            f"output name {out.name[:30]}... is {len(os.fsencode(out.name))} bytes long; the temporary names written "
            f"beside it (<name>.tmp-<pid>-<8 characters>) need it to be at most {limit} bytes (the file system "
            f"allows {name_max}): choose a shorter name"
        )


def settle(out: Path, only_dead: bool = False) -> None:
    """Clean up what killed runs left beside `out` (all of them while `out` is claimed, else dead writers'): remove
    `<out>.tmp-<tag>`; a `<out>.old-<tag>` is the previous output moved aside by `_replace`: put back when `out` is
    missing (the run was killed between its two renames), else removed (killed while removing it)."""
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    found = []
    for p in siblings:
        m = _LEFTOVER.fullmatch(p.name)
        if m and m["out"] == out.name and not (only_dead and _alive(int(m["pid"]))):
            found.append((p, m["kind"]))
    olds = sorted((p for p, kind in found if kind == "old"), key=lambda p: p.lstat().st_ctime)
    if olds and not (out.exists() or out.is_symlink()):
        back = olds.pop()  # the latest moved aside
        os.replace(back, out)
        print(f"note: put {out} back from {back.name}: the previous output, which an interrupted run had moved "
              "aside to replace it", file=sys.stderr)  # fmt: skip
    for p in [p for p, kind in found if kind == "tmp"] + olds:
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
    check_name(out)
    _make_parent(out)
    key = _key(out)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = key.parent / lock_name(key.name)  # beside what `out` stands for: one lock for every spelling of it
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
        settle(out, only_dead=False)
        yield
    finally:
        del _held[key]
        lock.unlink(missing_ok=True)
        os.close(fd)


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`: a file in one atomic rename; a dir over an existing `out` in two, the previous one
    moved aside as `<out>.old-<tag>` in between (`settle` puts it back should a kill land there)."""
    if tmp.is_dir() and (out.exists() or out.is_symlink()):
        old = out.with_name(f"{out.name}.old-{tag()}")
        os.replace(out, old)
        os.replace(tmp, out)
        _discard(old)
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
    total = f", about {_gib(need)} needed in all" if need else ""
    return UserError(
        f"disk full under {out.parent} while writing {out} ({err.strerror}): {_gib(written)} written{total}, "
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
        _fsync(out.parent)  # the rename itself: a crash (power loss) must not undo it once the run said it wrote `out`
    except BaseException as e:
        err = os_error(e)
        if err is not None and err.errno in _FULL:
            raise _disk_full(out, tmp, need, err) from None
        _discard(tmp)
        if err is not None:
            raise UserError(f"cannot write {os_error_text(err, str(out))}") from None
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
    check_name(out)
    _make_parent(out)
    settle(out, only_dead=True)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent)
    except OSError as err:
        raise UserError(f"cannot write into {out.parent}: {err.strerror}") from None
    os.close(fd)
    with _committed(Path(name), out, None) as t:
        yield t
