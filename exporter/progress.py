"""The one progress bar: rich on stderr, with elapsed time and ETA.

Off when `show` is false (e.g. ranks other than 0) or EXPORTER_NO_PROGRESS=1. When stderr is not a terminal, rich
draws nothing live and prints the final line once at the end (none when `transient`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


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
    with Progress(*columns, console=Console(stderr=True), transient=transient, disable=off) as bar:
        task = bar.add_task(what, total=total, completed=done, **fields)
        yield lambda n=1, **f: bar.update(task, advance=n, **f)
