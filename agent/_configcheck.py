"""The checks behind `callerid.agent.config`: YAML values to declared types, within bounds.

`build(cls, data)` turns a mapping into the frozen dataclass ``cls``, each field converted by
its type and checked against the bounds in its metadata (``min``/``max`` for numbers, ``text``
(a rule of `TEXT_RULES`) and ``max_len`` for text and paths, ``absolute`` for paths,
``max_items`` for lists, ``check`` for a validator of its own); `describe` words the same
bounds for the generated config file. Whatever the data, the only exception is `ConfigError`,
with a one-line message naming the key. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import yaml

__all__ = ["TEXT_RULES", "ConfigError", "build", "describe", "show", "yaml_problem"]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key and the file."""


def _is_name(text: str) -> bool:
    return text.isprintable() and not any(c.isspace() or c in "/:" for c in text)


# A text rule: its test, and the words `describe` documents it with. "printable" is stricter
# than what the PAM module shows unchanged (pam/codec.c: cid_sanitize turns C0/C1 controls and
# DEL into '?', and an encoded NUL makes the whole reply garbage, so a deny would become the
# module's on_error): str.isprintable() refuses those, lone surrogates (not UTF-8 encodable),
# and every format or separator character but the space.
TEXT_RULES: Final[Mapping[str, tuple[Callable[[str], bool], str]]] = {
    "printable": (str.isprintable, "printable text (no control characters)"),
    "name": (_is_name, "a name without whitespace, control characters, '/' or ':'"),
}

_REPR: Final = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def show(value: Any) -> str:
    """A short one-line repr of anything a YAML file can hold (huge ints, deep lists too)."""
    if isinstance(value, int) and value.bit_length() > 64:  # str() of it may even raise
        return f"<an integer of {value.bit_length()} bits>"
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # pragma: no cover - reprlib bounds depth and size
        return f"<{type(value).__name__}>"


def yaml_problem(exc: BaseException) -> str:
    """What is wrong with a file the YAML library refused, on one line."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _bad(tp: Any, key: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {show(value)}")


def _number(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(tp, key, value)
    if tp is int and not isinstance(value, int):
        raise _bad(tp, key, value)
    if isinstance(value, float) and not math.isfinite(value):
        msg = f"{key}: expected a finite number, got {value}"
        raise ConfigError(msg)
    lo, hi = meta["min"], meta["max"]
    if not lo <= value <= hi:
        msg = f"{key}: {show(value)} is out of range [{lo}, {hi}]"
        raise ConfigError(msg)
    return tp(value)


def _text(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    if not isinstance(value, str):
        raise _bad(tp, key, value)
    if "check" in meta:
        try:
            meta["check"](value)
        except ValueError as exc:
            msg = f"{key}: {exc}"
            raise ConfigError(msg) from exc
        return tp(value)
    if not value and tp is Path:
        raise _bad(tp, key, value)
    if not value and meta["text"] == "name":
        msg = f"{key}: empty"
        raise ConfigError(msg)
    test, words = TEXT_RULES[meta["text"]]
    if not test(value):
        msg = f"{key}: {show(value)} is not {words}"
        raise ConfigError(msg)
    if meta.get("absolute") and not value.startswith("/"):
        msg = f"{key}: must be an absolute path, got {show(value)}"
        raise ConfigError(msg)
    # a path's bound is the kernel's, in bytes (printable text has no lone surrogate to encode)
    size, unit = (len(value.encode()), "bytes") if tp is Path else (len(value), "characters")
    if size > meta["max_len"]:
        msg = f"{key}: longer than {meta['max_len']} {unit}"
        raise ConfigError(msg)
    return tp(value)


def _convert(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise _bad(tp, key, value)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0], key, meta)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(tp, key, value)
        if len(value) > meta["max_items"]:
            msg = f"{key}: more than {meta['max_items']} entries"
            raise ConfigError(msg)
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _bad(tp, key, value)
        return build(tp, value, key + ".")
    return _scalar(value, tp, key, meta)


def _scalar(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(tp, key, value)
    if tp is int or tp is float:
        return _number(value, tp, key, meta)
    if tp is str or tp is Path:
        return _text(value, tp, key, meta)
    raise _bad(tp, key, value)  # pragma: no cover - a declaration this loader does not know


def _show_key(key: str) -> str:
    return key if _is_name(key) and len(key) <= 64 else show(key)


def build(cls: Any, data: Mapping[Any, Any], prefix: str = "") -> Any:
    """``cls(**data)``, every value converted and checked; ConfigError names the bad key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if not isinstance(name, str):
            msg = f"{prefix}{show(name)}: keys must be strings"
            raise ConfigError(msg)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        msg = f"unknown key {prefix}{_show_key(unknown[0])} (known here: {known})"
        raise ConfigError(msg)
    kwargs = {
        name: _convert(value, hints[name], prefix + name, fields[name].metadata)
        for name, value in data.items()
    }
    return cls(**kwargs)


def describe(tp: Any, meta: Mapping[str, Any]) -> str | None:
    """The bounds of one option in words, for the generated file; None when it has none."""
    if "min" in meta:
        return f"Range: {meta['min']} .. {meta['max']}."
    if "text" not in meta:
        return None
    words = TEXT_RULES[meta["text"]][1]
    if Path in (typing.get_args(tp) or (tp,)):
        kind = "An absolute path" if meta.get("absolute") else "A path"
        return f"{kind}: {words}, at most {meta['max_len']} bytes."
    one = f"{words}, at most {meta['max_len']} characters"
    if "max_items" in meta:
        return f"At most {meta['max_items']} entries, each {one}."
    return one[0].upper() + one[1:] + "."
