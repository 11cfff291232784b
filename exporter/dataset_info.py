"""LLaMA-Factory's `dataset_info.json`: its entries (`spec`, with LF's defaults) and the rows of the files or hub
datasets they name (`read_rows`: json, jsonl, csv, parquet, arrow, txt, a folder of them, or the Hugging Face hub),
each row tagged with the file and row it came from, read as `datasets` reads them for LLaMA-Factory (a txt line is a
row {"text": line}; an empty or NA CSV cell is null; a folder's files in `os.listdir` order; `split` slices a local
file's one split, "train"). Turning rows into conversations is `exporter.data`'s part.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter.config import did_you_mean, read_json, read_text
from exporter.errors import UserError

INFO_NAME = "dataset_info.json"
# LLaMA-Factory's FILEEXT2TYPE: the `datasets` builder each file extension is read with
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
              ".txt": "text"}  # fmt: skip
# pandas' default NA strings: `datasets` reads a CSV through pandas, so such a cell is null (LF then drops a row whose
# answer is null, and a null input adds nothing to the prompt)
CSV_NULLS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})  # fmt: skip
# `datasets`' split spec (ReadInstruction): name[from:to] with optional % units and rounding, parts joined by "+"
_SPLIT_PART = re.compile(
    r"^(?P<split>\w+(\.\w+)*)(\[((?P<from>-?[\d_]+)(?P<from_pct>%)?)?:((?P<to>-?[\d_]+)(?P<to_pct>%)?)?\])?"
    r"(\((?P<rounding>[^)]*)\))?$"
)
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None}
SHAREGPT_COLUMNS = {"messages": "conversations"}
COMMON_COLUMNS = {"system": None, "tools": None, "chosen": None, "rejected": None, "kto_tag": None}
UNSUPPORTED_COLUMNS = ("images", "videos", "audios")
TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# a proxy may reach the hub where its host does not resolve here: no reachability probe then
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
# entry keys that change nothing for a local, text-only, single-split load
_IGNORED_ENTRY_KEYS = {"ms_hub_url", "om_hub_url", "file_sha1", "description"}
_ENTRY_KEYS = {
    "file_name", "hf_hub_url", "script_url", "formatting", "ranking", "subset", "split", "folder",
    "num_samples", "revision", "columns", "tags", *_IGNORED_ENTRY_KEYS,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One `dataset_info.json` entry with LLaMA-Factory's defaults applied."""

    name: str
    load_from: str  # "file" or "hf_hub"
    source: str  # local path or hub id
    formatting: str = "alpaca"
    columns: dict[str, str | None] = dataclasses.field(default_factory=dict)
    explicit: frozenset[str] = frozenset()  # columns named in dataset_info.json (must exist in the data)
    tags: dict[str, str | None] = dataclasses.field(default_factory=dict)
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    revision: str | None = None
    num_samples: int | None = None
    ranking: bool = False


def read_info(dataset_dir: Path) -> dict[str, Any]:
    """The parsed `dataset_info.json` of `dataset_dir`."""
    path = Path(dataset_dir) / INFO_NAME
    if str(dataset_dir).startswith("REMOTE:") or str(dataset_dir) == "ONLINE":
        raise UserError(
            f"dataset_dir {dataset_dir}: LLaMA-Factory's hub registries (REMOTE:<repo>, a {INFO_NAME} on the "
            f"hub; ONLINE, each dataset a hub id) are not supported: put a {INFO_NAME} in a local folder (hub "
            "datasets go in it as hf_hub_url entries) and give that folder"
        )
    if not path.is_file():
        raise UserError(f"dataset_dir {dataset_dir}: no {INFO_NAME} (expected LLaMA-Factory's dataset registry)")
    info = read_json(path)
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected an object mapping dataset names to entries")
    return info


def _inside(file_name: str, name: str, where: str) -> str:
    """A `file_name` relative to dataset_dir that stays inside it (no absolute path, no `..` above it)."""
    norm = os.path.normpath(file_name)
    if os.path.isabs(file_name) or norm == ".." or norm.startswith(".." + os.sep):
        raise UserError(
            f"{where}: dataset {name!r}: file_name {file_name!r} points outside dataset_dir; give a path inside it "
            "(copy or link the file there)"
        )
    return norm


def spec(name: str, info: dict[str, Any], dataset_dir: Path) -> DatasetSpec:
    """The `DatasetSpec` for `name` from a parsed dataset_info.json (LLaMA-Factory's defaults and rules)."""
    where = f"{Path(dataset_dir) / INFO_NAME}"
    if name not in info:
        raise UserError(f"dataset {name!r} is not defined in {where}{did_you_mean(name, info)}")
    entry = info[name]
    if not isinstance(entry, dict):
        raise UserError(f"{where}: entry {name!r} must be an object")
    for key in entry:
        if key not in _ENTRY_KEYS:
            raise UserError(f"{where}: dataset {name!r}: unknown key {key!r}{did_you_mean(key, _ENTRY_KEYS)}")
    if "hf_hub_url" in entry:
        load_from, source = "hf_hub", str(entry["hf_hub_url"])
    elif "file_name" in entry:
        load_from, source = "file", str(Path(dataset_dir) / _inside(str(entry["file_name"]), name, where))
    elif "script_url" in entry:
        raise UserError(f"{where}: dataset {name!r} uses script_url; loading scripts is not supported")
    elif "ms_hub_url" in entry or "om_hub_url" in entry:
        raise UserError(
            f"{where}: dataset {name!r} only has a ModelScope/Modelers hub url; give file_name or hf_hub_url"
        )
    else:
        raise UserError(f"{where}: dataset {name!r} needs file_name or hf_hub_url")
    formatting = entry.get("formatting", "alpaca")
    if formatting == "openai":  # LF 0.9.5's converter adds Nemotron's "detailed thinking off" to every system prompt
        raise UserError(
            f"{where}: dataset {name!r}: formatting openai (LLaMA-Factory's converter for Nemotron data, which adds "
            '"detailed thinking off" to the system prompt) is not supported; OpenAI-style messages train as '
            '"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": {"role_tag": "role", '
            '"content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}'
        )
    if formatting not in ("alpaca", "sharegpt"):
        raise UserError(f"{where}: dataset {name!r}: formatting must be alpaca or sharegpt, got {formatting!r}")
    own = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    columns: dict[str, str | None] = {**COMMON_COLUMNS, **own}
    explicit: set[str] = set()
    if "columns" in entry:
        given = entry["columns"]
        if not isinstance(given, dict):
            raise UserError(f"{where}: dataset {name!r}: columns must be an object")
        allowed = set(columns)
        for key in given:
            if key in UNSUPPORTED_COLUMNS:
                raise UserError(f"{where}: dataset {name!r}: column {key!r} (multimodal/preference) is not supported")
            if key not in allowed:
                raise UserError(
                    f"{where}: dataset {name!r}: unknown column key {key!r} for {formatting} formatting"
                    f"{did_you_mean(key, allowed)}"
                )
        # LLaMA-Factory: once `columns` is given, every column not named in it is unset
        columns = {k: given.get(k) for k in columns}
        explicit = {k for k, v in given.items() if v}
    tags = dict(TAGS)
    if formatting == "sharegpt" and "tags" in entry:
        given = entry["tags"]
        if not isinstance(given, dict):
            raise UserError(f"{where}: dataset {name!r}: tags must be an object")
        for key in given:
            if key not in TAGS:
                raise UserError(f"{where}: dataset {name!r}: unknown tag {key!r}{did_you_mean(key, TAGS)}")
        tags = {k: given.get(k) for k in TAGS}  # same rule as columns
        for key in ("role_tag", "content_tag", "user_tag", "assistant_tag"):
            if not tags[key]:
                tags[key] = TAGS[key]
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise UserError(f"{where}: dataset {name!r}: ranking must be true or false, got {ranking!r}")
    if ranking and not (columns["chosen"] and columns["rejected"]):
        raise UserError(
            f"{where}: dataset {name!r} is a ranking dataset: name its answer columns, e.g. "
            '"columns": {"chosen": "chosen", "rejected": "rejected"} (LLaMA-Factory\'s dpo_en_demo entry)'
        )
    num = entry.get("num_samples")
    if num is not None and (not isinstance(num, int) or num <= 0):
        raise UserError(f"{where}: dataset {name!r}: num_samples must be a positive integer, got {num!r}")
    return DatasetSpec(
        name=name, load_from=load_from, source=source, formatting=formatting, columns=columns,
        explicit=frozenset(explicit), tags=tags, subset=entry.get("subset"), split=str(entry.get("split", "train")),
        folder=entry.get("folder"), revision=entry.get("revision"), num_samples=num, ranking=ranking,
    )  # fmt: skip


# ---------------------------------------------------------------- reading rows


def _files(path: Path, name: str) -> list[Path]:
    """The data files of a `file_name`: the file, or a folder's files in `os.listdir` order (LLaMA-Factory hands that
    list to `datasets` as it is: its rows come in that order, which `max_samples` and `val_size` see)."""
    kinds = ".json/.jsonl/.csv/.parquet/.arrow/.txt"
    if path.is_dir():
        files = [p for p in (path / n for n in os.listdir(path)) if p.is_file() and p.suffix.lower() in FILE_TYPES]
        if not files:
            raise UserError(f"dataset {name!r}: directory {path} holds no {kinds} files")
        types = {FILE_TYPES[p.suffix.lower()] for p in files}
        if len(types) > 1:
            raise UserError(f"dataset {name!r}: directory {path} mixes file types ({', '.join(sorted(types))})")
        return files
    if not path.is_file():
        raise UserError(f"dataset {name!r}: file {path} not found")
    if path.suffix.lower() not in FILE_TYPES:
        raise UserError(f"dataset {name!r}: {path}: unsupported file type (expected {kinds.replace('/', ', ')})")
    return [path]


def _read_json(path: Path) -> list[tuple[str, Any]]:
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array, in a .jsonl file too (`datasets` falls back to json.load)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return [(f"{path} row {i + 1}", r) for i, r in enumerate(rows)]
    if stripped.startswith("{"):  # one object, on one line or several, is one row; else JSON lines
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            return [(f"{path} row 1", row)]
    out = []  # JSON lines (also accepted for .json, as `datasets` does), split at \n only as pyarrow's reader does
    for n, line in enumerate(text.split("\n"), 1):  # (U+2028 or U+0085 inside a string is valid JSON)
        if not line.strip():
            continue
        try:
            out.append((f"{path} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    null = CSV_NULLS.__contains__
    return [(f"{path} row {i + 1}", {k: None if isinstance(v, str) and null(v) else v for k, v in r.items()})
            for i, r in enumerate(reader)]  # fmt: skip


def _read_txt(path: Path) -> list[tuple[str, Any]]:
    """`datasets`' text builder: each line a row {"text": line} (a line ends at \\n, \\r\\n or \\r; an empty line is an
    empty row; a final line break ends the last line)."""
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [(f"{path} line {i + 1}", {"text": line}) for i, line in enumerate(lines)]


def _pyarrow(path: Path, what: str) -> Any:
    try:
        import pyarrow
    except ImportError:
        raise UserError(f"{path}: reading {what} needs the pyarrow package (pip install pyarrow)") from None
    return pyarrow


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    _pyarrow(path, "parquet")
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    return [(f"{path} row {i + 1}", r) for i, r in enumerate(rows)]


def _read_arrow(path: Path) -> list[tuple[str, Any]]:
    """An Arrow IPC stream (what `Dataset.save_to_disk` writes) or file, as `datasets`' arrow builder opens it."""
    pa = _pyarrow(path, "arrow")
    try:
        raw = path.read_bytes()
        try:
            table = pa.ipc.open_stream(raw).read_all()
        except (OSError, pa.ArrowInvalid):
            table = pa.ipc.open_file(raw).read_all()
    except Exception as e:
        raise UserError(f"{path}: not a readable Arrow file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    return [(f"{path} row {i + 1}", r) for i, r in enumerate(table.to_pylist())]


_READERS = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet, "arrow": _read_arrow, "text": _read_txt}


def _split(rows: list[tuple[str, Any]], sp: DatasetSpec) -> list[tuple[str, Any]]:
    """The rows `split` selects from a local file's one split, "train", as `datasets` reads `train[:100]`,
    `train[10%:90%]`, `train[:50%](pct1_dropremainder)` or `train[:10]+train[-10:]`."""
    out: list[tuple[str, Any]] = []
    n = len(rows)
    for part in sp.split.split("+"):  # no spaces around "+": datasets refuses " train"
        m = _SPLIT_PART.match(part)
        if not m:
            raise UserError(f"dataset {sp.name!r}: split {sp.split!r} is not a split (e.g. train, train[:100], "
                            "train[10%:])")  # fmt: skip
        pct = bool(m["from_pct"] or m["to_pct"])
        rounding = m["rounding"] or "closest"
        bad = None
        if m["split"] != "train":
            bad = f"names split {m['split']!r}: a local file has one split, 'train'"
        elif m["rounding"] is not None and (not pct or rounding not in ("closest", "pct1_dropremainder")):
            bad = "has a rounding other than (closest) or (pct1_dropremainder) on a percent slice"
        elif pct and any(m[k] is not None and abs(int(m[k])) > 100 for k in ("from", "to")):
            bad = "has a percent boundary beyond 100"
        elif pct and rounding == "pct1_dropremainder" and n < 100:
            bad = "rounds by pct1_dropremainder on fewer than 100 rows (always empty)"
        if bad:
            raise UserError(f"dataset {sp.name!r} ({sp.source}): split {sp.split!r} {bad}")

        def bound(key: str, default: int, m: re.Match[str] = m, pct: bool = pct, rounding: str = rounding) -> int:
            if m[key] is None:
                return default
            v = int(m[key])
            if pct:
                v = v * (n // 100) if rounding == "pct1_dropremainder" else int(round(v * n / 100.0))
            return min(max(n + v, 0) if v < 0 else v, n)

        out += rows[bound("from", 0) : bound("to", n)]
    return out


def _hub_reachable() -> bool:
    """Whether the hub's host takes a connection within a few seconds (offline mode, or a proxy, are taken as they
    are): without a network huggingface_hub retries each request five times over ~23 s, logging each try."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=3).close()
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's and datasets' offline mode while `offline`: a cached dataset still loads, a missing one fails
    at once."""
    import datasets
    from huggingface_hub import constants

    mods = [m for m in (constants, datasets.config) if offline and hasattr(m, "HF_HUB_OFFLINE")]
    saved = [m.HF_HUB_OFFLINE for m in mods]
    for m in mods:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, v in zip(mods, saved, strict=True):
            m.HF_HUB_OFFLINE = v


@contextlib.contextmanager
def _loggers_down(names: tuple[str, ...]) -> Iterator[None]:
    """These libraries' log lines (retries, cache notes) off while loading: the outcome is said in one line."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _read_hub(sp: DatasetSpec) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"dataset {sp.name!r} comes from the hub ({sp.source}); install the `datasets` package, or download it "
            "and point file_name at the local file"
        ) from None
    reachable = _hub_reachable()
    try:
        with _hub_offline(not reachable), _loggers_down(("huggingface_hub", "datasets", "fsspec")):
            ds = datasets.load_dataset(sp.source, name=sp.subset, data_dir=sp.folder, split=sp.split,
                                       revision=sp.revision)  # fmt: skip
    except Exception as e:  # offline, missing repo, bad split: one clear line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = "" if reachable else "the hub is unreachable and it is not in the local cache: "
        raise UserError(
            f"dataset {sp.name!r}: loading {sp.source!r} from the Hugging Face hub failed ({why}{first})"
        ) from None
    return [(f"{sp.source} row {i + 1}", r) for i, r in enumerate(ds)]


def read_rows(sp: DatasetSpec) -> list[tuple[str, Any]]:
    """All rows of a dataset as (where, row) pairs."""
    if sp.load_from == "hf_hub":
        return _read_hub(sp)
    rows: list[tuple[str, Any]] = []
    for f in _files(Path(sp.source), sp.name):
        rows += _READERS[FILE_TYPES[f.suffix.lower()]](f)
    return rows if sp.split == "train" else _split(rows, sp)
