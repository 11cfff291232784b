"""Long stages run as subprocesses of the real CLI (`python -m exporter VERB ...`), so the board stays responsive,
a crash is that command's own one-line error, and what the board runs is exactly what a user could type.

A `Job` is one such process: its combined output goes to a log file the board tails, its progress bar's state
(done, total, ETA) to a JSON file beside it (EXPORTER_PROGRESS_FILE); `stop()` ends its whole process
group (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.progress import PROGRESS_FILE

# what the board shows for a command (the user's own `exporter` on PATH runs the same code)
DISPLAY = "exporter"


def command_line(argv: list[str]) -> str:
    """The command a user would type for `argv` (the arguments after `exporter`)."""
    return shlex.join([DISPLAY, *argv])


@dataclass
class Job:
    """One running (or finished) CLI command."""

    argv: list[str]
    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)
    stopped: bool = False  # stop() was asked

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 10.0) -> None:
        """End the command and everything it started (its own process group)."""
        self.stopped = True
        if not self.running():
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if self.wait(grace) is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait()

    def follow(self, every: float = 1.0) -> Iterator[float]:
        """Yield the seconds since start every `every` seconds while the command runs."""
        while self.running():
            yield time.time() - self.started
            time.sleep(every)

    def output(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def progress(self) -> dict[str, Any] | None:
        """The command's progress bar as it last wrote it (`exporter.progress`: done, total, elapsed_s, eta_s)."""
        from exporter.progress import read

        return read(progress_file(self.log))

    def error_line(self) -> str:
        """The command's one-line error (`error: ...`), else the last line it printed."""
        lines = [ln.strip() for ln in self.output().splitlines() if ln.strip()]
        for ln in reversed(lines):
            if ln.startswith("error:"):
                return ln
        return lines[-1] if lines else f"exit code {self.returncode}"


def progress_file(log: Path) -> Path:
    """Where a job's command keeps its progress bar's state (beside its log)."""
    return log.with_name(log.name + ".progress.json")


def make_dir(runs_dir: Path) -> None:
    """The dir the board writes its configs and logs in; UserError (one line) when it cannot be made."""
    from exporter.errors import UserError

    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--runs-dir {runs_dir}: cannot write the board's runs there: {e.strerror or e}") from None


def start(argv: list[str], log_dir: Path | None = None, env: dict[str, str] | None = None) -> Job:
    """Run `exporter ARGV...` with this Python in a new process group; output (stdout and stderr) to a log file."""
    log_dir = Path(log_dir or tempfile.gettempdir())
    make_dir(log_dir)
    fd, log_name = tempfile.mkstemp(prefix=f"exporter-{argv[0]}-", suffix=".log", dir=log_dir)
    child_env = {**os.environ, "EXPORTER_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1",
                 PROGRESS_FILE: str(progress_file(Path(log_name))), **(env or {})}  # fmt: skip
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", *argv], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, env=child_env,
        )  # fmt: skip
    return Job(argv, proc, Path(log_name))
