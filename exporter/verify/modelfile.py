"""Check 7, modelfile: what `ollama create -f Modelfile` does with each Modelfile before any model runs.

Ollama's `parser.CreateRequest` (ollama/ollama parser/parser.go, v0.33) resolves `FROM` and `ADAPTER` relative to the
Modelfile's folder (`~` is the home folder, `/...` absolute). A FROM that names no file is taken as a model name
(`req.From`), so `FROM ./model-f16.gguf` after the GGUF was moved makes `ollama create` fail to pull a model of that
name; a missing ADAPTER is an error. Every PARAMETER goes through `api.FormatParams` (api/types.go): a name that is
not an `api.Options` field (`repetition_penalty`, transformers' name) is "unknown parameter", a value that Go's
`strconv.ParseInt` / `ParseFloat(s, 32)` / `ParseBool` refuses is "invalid int value"; a few deprecated names are
skipped with a warning. A `num_ctx` above the GGUF's context length is cut to it (llm/server.go), a warning here.
A FROM that is a file must be a GGUF verify checked (the same file, or one with the same bytes), and the one its
`Modelfile.<type>` name says: `ollama create` imports whatever file FROM names, so a FROM edited to another type's
GGUF, or left at a stale copy from an earlier export, would ship numbers no other row looked at.
"""

from __future__ import annotations

import filecmp
import math
import os
import re
from pathlib import Path

from exporter.verify.artifacts import GGUFInfo, Modelfile
from exporter.verify.report import Check

# api.Options (and its Runner) JSON names -> the Go kind FormatParams parses the value as
OPTION_KINDS = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
                     "main_gpu", "num_thread", "draft_num_predict"), "int"),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"), "float"),
    "use_mmap": "bool",
    "stop": "list",
}  # fmt: skip
# parser.go deprecatedParameters: skipped with "warning: parameter X is deprecated"
DEPRECATED = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
              "mirostat_tau", "mirostat_eta")  # fmt: skip
# names users bring from transformers / OpenAI / llama.cpp, and Ollama's own
_HINTS = {"repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict", "max_tokens": "num_predict",
          "n_predict": "num_predict", "n_ctx": "num_ctx", "context_length": "num_ctx", "stop_sequences": "stop",
          "top-k": "top_k", "top-p": "top_p", "repeat_last_n_tokens": "repeat_last_n"}  # fmt: skip

_INT = re.compile(r"[+-]?[0-9]+")
_DEC = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_HEX = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+(\.[0-9a-fA-F]*)?|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+")
_SPECIAL = re.compile(r"[+-]?(inf|infinity)|nan", re.IGNORECASE)
_BOOLS = ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False")
_F32_MAX_ROUNDED = 3.4028235677973366e38  # past this ParseFloat(s, 32) gives ErrRange


def go_value_error(kind: str, value: str) -> str | None:
    """Why Go's strconv refuses `value` as `kind` the way api.FormatParams parses it, or None."""
    if kind == "int":
        if _INT.fullmatch(value) and -(2**63) <= int(value) < 2**63:
            return None
        return "not a whole number Go's strconv.ParseInt reads"
    if kind == "float":
        if _SPECIAL.fullmatch(value):
            return None
        if "_" in value:  # Go: an underscore only between digits (or after a 0x prefix)
            digits = "0123456789abcdefABCDEF" if value.lstrip("+-")[:2].lower() == "0x" else "0123456789"
            padded = f" {value} "
            for i, c in enumerate(padded):
                if c == "_" and not (padded[i - 1] in digits + "xX" and padded[i + 1] in digits):
                    return "not a number Go's strconv.ParseFloat reads"
            value = value.replace("_", "")
        if _DEC.fullmatch(value):
            number = float(value)
        elif _HEX.fullmatch(value):
            sign = -1.0 if value.startswith("-") else 1.0
            number = sign * float.fromhex(value.lstrip("+-"))
        else:
            return "not a number Go's strconv.ParseFloat reads"
        return None if math.isfinite(number) and abs(number) < _F32_MAX_ROUNDED else "out of float32 range"
    if kind == "bool":
        return None if value in _BOOLS else "not a boolean Go's strconv.ParseBool reads (true/false/1/0)"
    return None


def resolve(value: str, modelfile: Path) -> Path:
    """Where Ollama's expandPath looks for a FROM/ADAPTER `value` of `modelfile`."""
    if value.startswith(("/", "\\")):
        return Path(value)
    if value.startswith("~"):
        return Path(os.path.expanduser(value))
    return modelfile.parent / value


def looks_like_path(value: str) -> bool:
    """A FROM value meant as a file: Ollama model names do not start with . / ~ \\ or end in a weights suffix."""
    return value.startswith((".", "/", "~", "\\")) or value.lower().endswith((".gguf", ".bin", ".safetensors"))


def _context_length(path: Path) -> int | None:
    from exporter.converters.gguf_read import read_kv
    from exporter.errors import UserError

    if not path.is_file() or path.suffix.lower() != ".gguf":
        return None
    try:
        kv = read_kv(path)
    except UserError:
        return None
    n = kv.get(f"{kv.get('general.architecture')}.context_length")
    return int(n) if n is not None else None


def named_type(mf: Modelfile) -> str | None:
    """The GGUF file type a `Modelfile.<type>` name says (`Modelfile.q4_k_m`: q4_k_m; the gguf stage's names), else
    None."""
    from gguf import LlamaFileType

    kind = mf.path.name.partition(".")[2].lower()
    types = {t.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower() for t in LlamaFileType}
    return kind if kind in types else None


def from_problem(value: str, target: Path, mf: Modelfile, ggufs: list[GGUFInfo]) -> tuple[str, str]:
    """("fail" | "warn" | "pass", one line) for a FROM that resolves to the file `target`: which verified GGUF it is
    (the same file, or the same bytes), and whether that is the type the Modelfile's name says."""
    match, how = None, ""
    for g in ggufs:
        if g.path.exists() and os.path.samefile(target, g.path):
            match, how = g, "the same file"
            break
    else:
        size = target.stat().st_size
        for g in ggufs:
            if g.path.exists() and g.path.stat().st_size == size and filecmp.cmp(target, g.path, shallow=False):
                match, how = g, "the same bytes"
                break
    want = named_type(mf)
    if match is None:
        if not ggufs:
            return "warn", f"FROM {value} ({target}) was not verified: give it with --gguf to check what Ollama runs"
        names = ", ".join(g.path.name for g in ggufs)
        return "fail", (
            f"FROM {value} is {target}, none of the GGUFs verified here ({names}): `ollama create` would import a "
            "file no other row checked"
        )
    if want is not None and match.file_type != want:
        return "fail", (
            f"FROM {value} is {match.path.name} ({how}), a {match.file_type} GGUF, but the Modelfile's name says "
            f"{want}: Ollama would run the {match.file_type} file"
        )
    return "pass", f"FROM {value} is the verified {match.path.name} ({how})"


def check_modelfile(mf: Modelfile, ggufs: list[GGUFInfo] | None = None) -> Check:
    """One row per Modelfile: FROM/ADAPTER resolve to files, a FROM file is one of `ggufs` (the GGUFs verify
    checks; None: not compared) of the type the Modelfile's name says, every PARAMETER is one `ollama create`
    accepts."""
    path = mf.path
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    ctx: int | None = None
    for value in mf.froms:
        target = resolve(value, path)
        if target.exists():
            ctx = _context_length(target) if ctx is None else ctx
            # with ADAPTER, FROM is the base model the adapter applies to, not an export of this run
            if ggufs is not None and target.is_file() and not mf.adapters:
                status, line = from_problem(value, target, mf, ggufs)
                {"fail": problems, "warn": warnings, "pass": notes}[status].append(line)
        elif looks_like_path(value):
            problems.append(
                f"FROM {value}: no such file ({target}; Ollama resolves it from the Modelfile's folder), so "
                f"`ollama create` takes {value!r} as a model name and fails"
            )
        else:
            warnings.append(f"FROM {value} is no file beside the Modelfile: Ollama takes it as a model name")
    for value in mf.adapters:
        if not resolve(value, path).exists():
            problems.append(f"ADAPTER {value}: no such file ({resolve(value, path)}); `ollama create` fails")
    for name, value in mf.parameters:
        if name in DEPRECATED:
            warnings.append(f"PARAMETER {name} is deprecated: Ollama ignores it")
            continue
        kind = OPTION_KINDS.get(name)
        if kind is None:
            hint = (
                _HINTS.get(name) or _HINTS.get(name.lower()) or (name.lower() if name.lower() in OPTION_KINDS else None)
            )
            problems.append(
                f"PARAMETER {name}: `ollama create` refuses it (unknown parameter)"
                + (f"; Ollama's name is {hint}" if hint else "")
            )
            continue
        why = go_value_error(kind, value)
        if why is not None:
            problems.append(f"PARAMETER {name} {value}: {why}; `ollama create` refuses it (invalid {kind} value)")
        elif name == "num_ctx" and ctx is not None and int(value) > ctx:
            warnings.append(
                f"PARAMETER num_ctx {value} is above the GGUF's context_length {ctx}: Ollama cuts it to {ctx}"
            )
    status = "fail" if problems else "warn" if warnings else "pass"
    detail = "; ".join(problems + warnings) or "; ".join(
        [*notes, "FROM and every PARAMETER as `ollama create` reads them"]
    )
    return Check("modelfile", path.name, status, detail, {"parameters": len(mf.parameters)})


def check_modelfiles(mfs: list[Modelfile], ggufs: list[GGUFInfo] | None = None) -> list[Check]:
    """A `modelfile` row per Modelfile (`ggufs`: the GGUFs verified, which a FROM file must be one of)."""
    return [check_modelfile(mf, ggufs) for mf in mfs]
