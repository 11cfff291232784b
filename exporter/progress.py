"""The one progress bar: rich on stderr, with elapsed time and ETA.

Off when `show` is false (e.g. ranks other than 0) or EXPORTER_NO_PROGRESS=1. When stderr is not a terminal, rich
draws nothing live and prints the final line once at the end (none when `transient`). With EXPORTER_PROGRESS_FILE
set (the web board sets it for the commands it runs), the bar's state is also kept in that file as JSON (`what`,
`unit`, `done`, `total`, `elapsed_s`, `eta_s`), replaced at most twice a second and at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROGRESS_FILE = "EXPORTER_PROGRESS_FILE"


@contextmanager
def progress(
    what: str, unit: str, total: int, *, done: int = 0, show: bool = True, transient: bool = False, **fields: Any
) -> Iterator[Callable[..., None]]:
    """A bar for `total` steps of `what`; yields `advance(n=1, **fields)`. `unit` is a rich format string and may
    name `fields` (e.g. "loss {task.fields[loss]}")."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit)] if unit else []
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    off = not show or os.environ.get("EXPORTER_NO_PROGRESS") == "1"
    file = os.environ.get(PROGRESS_FILE) if show else None
    state = _State(Path(file), what, unit if "{" not in unit else "steps", total, done) if file else None
    with Progress(*columns, console=Console(stderr=True), transient=transient, disable=off) as bar:
        task = bar.add_task(what, total=total, completed=done, **fields)

        def advance(n: int = 1, **f: Any) -> None:
            bar.update(task, advance=n, **f)
            if state is not None:
                state.advance(n)

        yield advance
    if state is not None:
        state.write()


class _State:
    """The bar's state in a JSON file another process reads (the web board's Evaluate tab shows its ETA)."""

    def __init__(self, path: Path, what: str, unit: str, total: int, done: int) -> None:
        self.path, self.what, self.unit, self.total = path, what, unit, total
        self.first = self.done = done
        self.start = self.last = time.monotonic()
        self.write()

    def advance(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last >= 0.5:
            self.write()

    def write(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        doc = {"what": self.what, "unit": self.unit, "done": self.done, "total": self.total,
               "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 3)}  # fmt: skip
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:  # a progress display never stops the work
            tmp.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any] | None:
    """What `progress` last wrote to `path` (None when nothing yet, or unreadable)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
