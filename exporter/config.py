"""Config loading: a YAML file plus `key=value` overrides into a dataclass; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from exporter.errors import UserError

T = TypeVar("T")


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_overrides(items: typing.Sequence[str]) -> dict[str, Any]:
    """`["a=1", "b=x,y"]` -> `{"a": 1, "b": "x,y"}`; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def scalar_texts(path: Path | str) -> dict[str, str]:
    """The source text of each plain (unquoted) scalar value of a YAML file's top-level mapping (`0123`, not 83;
    `Yes`, not true), for keys that take a string."""
    try:
        node = yaml.compose(read_text(path), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: v.value for k, v in node.value
            if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode) and v.style is None}  # fmt: skip


def read_text(path: Path | str) -> str:
    """A UTF-8 text file; other bytes are a UserError naming the file, byte offset and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return decode(raw, str(path))


def decode(raw: bytes, where: str) -> str:
    """UTF-8 text, a leading BOM dropped (as pandas and Notepad's readers do); other bytes are a UserError naming
    `where`, the byte offset and line."""
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = raw.count(b"\n", 0, at) + 1
        raise UserError(
            f"{where}: not UTF-8 text: byte {at} (line {line}) is {raw[at : at + 1]!r}; save the file as UTF-8"
        ) from None


def read_json(path: Path | str, optional: bool = False) -> Any:
    """Parsed JSON of a file; malformed JSON is a UserError naming the file, line and column. `optional`: a missing
    file reads as {}."""
    path = Path(path)
    if optional and not path.is_file():
        return {}
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_json_object(path: Path | str, optional: bool = False) -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object (an HF config or tokenizer file): anything else is a
    UserError naming the file."""
    data = read_json(path, optional)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_yaml(path: Path | str) -> dict[str, Any]:
    """A YAML mapping from `path`, with a clear error when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise UserError(f"{path}: not valid YAML{where}: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: {name}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(name, v, inner, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {name} must be a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: {name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{where}: {name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{where}: {name} must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {name} must be a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list, bool, int, float)):  # YAML read 0123 as 83, Yes as true: not the text
            quote = " (quote it)" if not isinstance(value, (dict, list)) else ""
            raise UserError(f"{where}: {name} must be a string, got {value!r}{quote}")
        return str(value)
    if hint is Path:
        return Path(str(value))
    return value


def build(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Instantiate dataclass `cls` from `data`; unknown keys and wrong types raise UserError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(key, fields)}")
        kwargs[key] = _coerce(key, value, hints[key], where)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"{where}: missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def load(cls: type[T], path: Path | str | None, overrides: typing.Sequence[str] = ()) -> T:
    """Dataclass `cls` from the YAML file at `path` (optional) with `key=value` overrides applied on top."""
    data = read_yaml(path) if path is not None else {}
    data.update(parse_overrides(overrides))
    return build(cls, data, where=str(path) if path is not None else "config")
