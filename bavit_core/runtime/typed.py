"""Typed reading of the JSON files bavit writes (a run's config.json, finetune.json, ...).

A dataclass describes each section; :func:`typed_kwargs` checks every value a file gives
against the field's annotation, so a hand-edited ``"input_h": "384"`` is one error naming
the file and the key instead of a ``TypeError`` deep inside the model. Unknown keys are
left alone (newer files may carry more); missing keys take the dataclass's defaults.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path

from .errors import InputFileError
from .fileio import parse_json_file

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
          tuple: "a list", list: "a list", dict: "an object"}


_ABSENT = object()


class FieldTypeError(TypeError):
    """A value of the wrong type (or none) under ``key`` (a dotted path such as ``model.input_h``)."""

    def __init__(self, key: str, value, expected: str):
        self.key, self.value, self.expected = key, value, expected
        if value is _ABSENT:
            super().__init__(f"'{key}' is missing")
            return
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        super().__init__(f"'{key}' is {shown} ({_kind(value)}), expected {expected}")


def _kind(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", type(None): "null", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _allowed(annotation) -> tuple:
    """The plain types an annotation admits (``int | None`` → (int, NoneType))."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) for t in _allowed(a))
    if origin is not None:
        return (origin,)
    return (annotation,)


def _fits(value, allowed: tuple) -> bool:
    for t in allowed:
        if t is type(None) and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t is int and type(value) is int:
            return True
        if t is float and type(value) in (int, float) and math.isfinite(value):
            return True
        if t is str and isinstance(value, str):
            return True
        if t in (tuple, list) and isinstance(value, (list, tuple)):
            return True
        if t is dict and isinstance(value, dict):
            return True
        if t not in _NAMES:  # a type no JSON value has (a nested class): not checked here
            return True
    return False


def typed_kwargs(cls, doc, section: str) -> dict:
    """The keyword arguments of dataclass ``cls`` that ``doc`` (a JSON object) gives, each
    checked against its field's type (lists become tuples where the field is a tuple).
    Raises :class:`FieldTypeError` naming ``section.key``."""
    if not isinstance(doc, dict):
        raise FieldTypeError(section, doc, "an object")
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in doc:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FieldTypeError(f"{section}.{f.name}" if section else f.name, _ABSENT, "a value")
            continue
        v = doc[f.name]
        allowed = _allowed(hints[f.name])
        if not _fits(v, allowed):
            expected = " or ".join(dict.fromkeys(_NAMES.get(t, t.__name__) for t in allowed))
            raise FieldTypeError(f"{section}.{f.name}" if section else f.name, v, expected)
        out[f.name] = tuple(v) if tuple in allowed and isinstance(v, list) else v
    return out


def load_typed(cls, doc, path: str | os.PathLike, section: str):
    """``cls(**typed_kwargs(...))``; a wrong type is an :class:`InputFileError` on ``path``."""
    try:
        return cls(**typed_kwargs(cls, doc, section))
    except FieldTypeError as exc:
        raise InputFileError(path, f"wrong value in the file: {exc}") from None


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON file of ours whose top level is an object; anything else is one clean error."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, f"{what} missing")
    try:
        doc = parse_json_file(p)
    except InputFileError as exc:
        raise InputFileError(p, f"unreadable {what} ({exc.problem})") from None
    except OSError as exc:
        raise InputFileError(p, f"unreadable {what} ({exc.strerror})") from None
    if not isinstance(doc, dict):
        raise InputFileError(p, f"unreadable {what} (not a JSON object)")
    return doc


METRIC_FLAGS = ("best", "selected")  # the true/false columns of a run's metrics.jsonl


def check_metric_rows(rows: list, path: str | os.PathLike) -> None:
    """A run's metrics.jsonl rows (train's and finetune's): objects with an integer
    ``epoch`` >= 0, true/false in :data:`METRIC_FLAGS`, a number (NaN allowed) or null in
    every other column. The first wrong value is an error naming its line and key."""
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise InputFileError(path, f"line {n} is {_kind(r)}, expected a JSON object")
        if type(r.get("epoch")) is not int or r["epoch"] < 0:
            raise InputFileError(path, f"line {n}: 'epoch' is {r.get('epoch')!r}, expected an integer >= 0")
        for k, v in r.items():
            flag = k in METRIC_FLAGS
            if not (isinstance(v, bool) if flag else (v is None or type(v) in (int, float))):
                raise InputFileError(path, f"line {n}: {FieldTypeError(k, v, 'true or false' if flag else 'a number')}")
