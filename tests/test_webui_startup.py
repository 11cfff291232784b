"""`exporter webui` startup checks: a bad or busy --port and a --runs-dir that cannot hold runs are one line, exit 2,
before Gradio starts (they were tracebacks, or a FileExistsError at the first Start)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")


def _webui(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "exporter", "webui", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=os.environ, timeout=120)


def test_bad_port_and_runs_dir_are_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        cases = {
            ("--port", str(port)): f"error: cannot listen on 127.0.0.1:{port}: Address already in use",
            ("--port", "70000"): "error: --port 70000: expected 1-65535",
            ("--port", "18642", "--runs-dir", "afile"): "error: --runs-dir afile: not a directory",
            ("--port", "18642", "--runs-dir", "afile/sub"): "error: --runs-dir afile/sub: ",
        }
        for args, says in cases.items():
            r = _webui(*args, cwd=tmp_path)
            lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
            assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(says), (args, r.stdout, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_runs_dir_that_became_a_file_is_one_line_at_start(tmp_path: Path) -> None:
    """A --runs-dir replaced by a file while the board runs: Start says so in one line (it was a FileExistsError
    traceback and a generic error in the page)."""
    from webui_helpers import train_form

    from exporter.errors import UserError
    from exporter.webui import train_tab

    (tmp_path / "runs").write_text("x")
    args = train_tab.train_args({"model": "m", **train_form(tmp_path, tmp_path / "o")})
    with pytest.raises(UserError, match=r"^--runs-dir .*runs: cannot write the board's runs there: File exists$"):
        train_tab.start({**args, "model_name_or_path": str(tmp_path)}, tmp_path / "runs")
