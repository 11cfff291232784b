"""The verify report: check results, the `report.json` document, JUnit XML and the rich table.

`report.json` schema (`"schema": "exporter.verify/1"`)::

    {
      "schema": "exporter.verify/1",
      "passed": true,                 # false when any check has status "fail"
      "created": "2026-11-24T08:00:00Z",
      "seconds": 12.3,                # wall time of the whole verify run
      "artifacts": {                  # what was checked (absolute paths; null / [] when not given)
        "base": str|null, "adapter": str|null, "merged": str|null,
        "ggufs": [str], "modelfiles": [str], "data": str|null, "text": str|null,
        "template": str|null          # chat-template family the export was trained with
      },
      "thresholds": {"f16": 0.001, "q8_0": 0.005, ...},   # max relative perplexity difference per type
      "kld_thresholds": {"f16": 0.0005, ...},             # max mean KL divergence (nats/token) per type
      "top1_thresholds": {"f16": 0.99, ...},              # min top-1 agreement (near-ties excused) per type
      "summary": {"pass": int, "fail": int, "skip": int, "warn": int},
      "checks": [
        {
          "check": "template" | "stops" | "metadata" | "modelfile" | "weights" | "tokenizer" | "perplexity" | "chat"
                   | "accuracy",
          "target": str,              # which artifact (a file name, "merged", "adapter", "Modelfile.q8_0" ...)
          "status": "pass" | "fail" | "skip" | "warn",   # warn: a difference the export states (a Modelfile
                                                        # TEMPLATE cannot trim like the Jinja ...) or a limit of
                                                        # llama.cpp/Ollama no file can fix; not a fail
          "detail": str,              # one line: the cause of a failure, the reason of a skip, or a summary
          "metrics": {...}            # check-specific numbers, see below
        }, ...
      ],
      "versions": {"python": ..., "torch": ..., "llama-cpp-python": ...}
    }

Metrics per check: template {conversations, compared}; stops {eot_tokens, eot_ids, ...};
metadata {context_length, hf_context_length, add_bos_token, hf_adds_bos, hf_rope_type}; modelfile {parameters};
weights {reference (the float GGUF compared with), tensors, worst (the tensor nearest its bound), worst_rel_error};
tokenizer {texts, mismatches, pre}; perplexity {ppl, ref_ppl, rel_diff, threshold, type, kld, kld_limit, top1,
near_ties (share of tokens whose top-1 differs at a near-tie of the reference), top1_limit, tokens; a limit null: none};
chat {prompts, exact, first_divergence: [int|null per prompt], hf_tokens, gguf_tokens, answers};
accuracy (with --eval) {accuracy, ref_accuracy, task, questions, n_shot; GGUFs: agreement, allowed_drop, type}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

from exporter.atomic import atomic_file, file_in_the_way
from exporter.errors import UserError

Status = Literal["pass", "fail", "skip", "warn"]
SCHEMA = "exporter.verify/1"


@dataclasses.dataclass
class Check:
    """One check on one artifact."""

    check: str
    target: str
    status: Status
    detail: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    """Everything verify found; `passed` is false when any check failed."""

    checks: list[Check]
    artifacts: dict[str, Any]
    thresholds: dict[str, float]
    seconds: float = 0.0
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    kld_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    top1_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def summary(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in ("pass", "fail", "skip", "warn")}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(self.seconds, 3),
            "artifacts": self.artifacts,
            "thresholds": self.thresholds,
            "kld_thresholds": self.kld_thresholds,
            "top1_thresholds": self.top1_thresholds,
            "summary": self.summary(),
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "versions": self.versions,
        }


def _strict(x: Any) -> Any:
    """`x` with non-finite floats as the strings "nan", "inf", "-inf" (JSON has no NaN; a bare NaN is invalid)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_strict(v) for v in x]
    return x


_JUNIT_SUITE = '<testsuite name="exporter verify"'


def _is_ours(path: Path) -> bool:
    """Whether the file at `path` is a report an earlier verify wrote (report.json or its JUnit XML)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    return _JUNIT_SUITE in head or f'"schema": "{SCHEMA}"' in head  # write_json puts the schema first


def check_output(path: Path, option: str) -> None:
    """Before verify runs: `path` (for `option`, --report or --junit) may be new or a report of an earlier verify,
    which is replaced; never a model, a Modelfile or any other file of the user's."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file path")
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise UserError(f"{option} {path}: {blocker} is a file, not a directory; give a path in a directory")
    if (path.exists() or path.is_symlink()) and not _is_ours(path):
        raise UserError(
            f"{option} {path} exists and is not a report of exporter verify; not replacing it: choose another path"
        )


def write_json(report: Report, path: Path) -> None:
    """Write `report.json` atomically, strict JSON (non-finite numbers as strings)."""
    doc = _strict(report.to_json())
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str, allow_nan=False) + "\n", "utf-8")


def write_junit(report: Report, path: Path) -> None:
    """JUnit XML: one testcase per check (classname = check kind, name = target)."""
    s = report.summary()
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuite name="exporter verify" tests="{len(report.checks)}" failures="{s["fail"]}" '
        f'skipped="{s["skip"]}" time="{report.seconds:.3f}">',
    ]
    for c in report.checks:
        lines.append(f"  <testcase classname={quoteattr('verify.' + c.check)} name={quoteattr(c.target)}>")
        if c.status == "fail":
            metrics = escape(json.dumps(_strict(c.metrics), default=str))
            lines.append(f"    <failure message={quoteattr(c.detail)}>{metrics}</failure>")
        elif c.status == "skip":
            lines.append(f"    <skipped message={quoteattr(c.detail)}/>")
        elif c.status == "warn":
            lines.append(f"    <system-out>{escape('warning: ' + c.detail)}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", "utf-8")


def print_table(report: Report) -> None:
    """The rich table of all checks, failures in red, then one verdict line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    colors = {"pass": "green", "fail": "bold red", "skip": "yellow", "warn": "magenta"}
    table = Table(title="exporter verify", show_lines=False)
    table.add_column("check")
    table.add_column("target")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        table.add_row(escape(c.check), escape(c.target), f"[{colors[c.status]}]{c.status.upper()}[/]", escape(c.detail))
    console = Console()
    console.print(table)
    s = report.summary()
    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    warned = f", {s['warn']} with stated differences" if s["warn"] else ""
    console.print(
        f"{verdict}: {s['pass']} passed, {s['fail']} failed, {s['skip']} skipped{warned} in {report.seconds:.1f} s"
    )
