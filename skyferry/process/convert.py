"""Exact conversion of a decoded column to its schema type.

Every value is stored exactly, or its row is rejected with the reason: a value is never
rounded, truncated or wrapped on its way in. Arrow's checked casts do the work, per column
when every value converts, and otherwise on halves of the column until each value that does
not convert is found (so a chunk with a few bad values costs a few casts more, not a cast
per value). No value passes through float64 on its way to an integer or a decimal.

The rules, which docs/schema.md states for users:

- text is trimmed of surrounding whitespace; empty text is null;
- ``int64``: an optional sign and digits, or a whole number written with a zero fraction
  (``12.0``); beyond ±(2^63 - 1) is out of range; a float converts only when it is whole
  and exact;
- ``float64``: any decimal or exponent spelling, ``inf`` and ``nan``; a finite spelling that
  overflows to infinity is rejected; an integer converts only when the double holds it
  exactly (|n| <= 2^53);
- ``decimal``: the value must fit the precision and scale with nothing rounded;
- ``timestamp``: ISO 8601 (``T`` or a space between date and time, a date alone, fractions
  of a second down to the column's ``unit``), with a zone offset (``Z``, ``+05:00``,
  ``+0500``, ``+05``) or without one, which is read as UTC; stored in UTC;
- ``bool``: ``true``/``false``/``1``/``0`` in any case;
- ``string``: text as it is; other values in their JSON spelling.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["convert_column", "spelled"]

_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)
# a zone offset after a time of day (a date alone ends in "-01", which is no zone)
_ZONE = r"[Tt ]\d{2}:\d{2}(:\d{2}([.,]\d+)?)?([Zz]|[+-]\d{2}(:?\d{2})?)$"
_DIGITS = r"^[+-]?\d+$"
_INFINITE = r"^[+-]?(?i:inf|infinity)$"


def convert_column(values: pa.Array | pa.ChunkedArray, target: pa.DataType, name: str,
                   kind: str) -> tuple[pa.Array, dict[int, str]]:
    """``values`` as ``target``, with a null where a value does not convert exactly, and
    the reason for each such position. ``kind`` is the schema's name of the type."""
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if array.type == target:
        return array, {}
    if pa.types.is_string(target):
        return spelled(array), {}
    text = pa.types.is_string(array.type) or pa.types.is_large_string(array.type)
    if text:
        array = _prepared(array, target)
    if text and pa.types.is_timestamp(target) and target.tz is not None:
        zoned = pc.match_substring_regex(array, _ZONE)
        with_zone = pc.if_else(zoned, array, pa.nulls(len(array), array.type))
        without = pc.if_else(zoned, pa.nulls(len(array), array.type), array)
        converted, bad = _checked(with_zone, target)
        naive, bad_naive = _checked(without, pa.timestamp(target.unit))
        bad += bad_naive
        converted = pc.coalesce(converted, naive.cast(target))
    else:
        converted, bad = _checked(array, target)
    if text and pa.types.is_floating(target):
        bad += _overflowed(array, converted)
        if bad:
            converted = _without(converted, bad)
    return converted, {i: _reason(array[i].as_py(), target, name, kind) for i in sorted(bad)}


def _prepared(array: pa.Array, target: pa.DataType) -> pa.Array:
    """Text trimmed, empty text null, and a whole number's zero fraction dropped for an
    integer column."""
    trimmed = pc.utf8_trim_whitespace(array)
    trimmed = pc.if_else(pc.equal(trimmed, ""), pa.nulls(len(trimmed), trimmed.type), trimmed)
    if pa.types.is_integer(target):
        trimmed = pc.replace_substring_regex(trimmed, r"^([+-]?\d+)\.0*$", r"\1")
    return trimmed


def _checked(array: pa.Array, target: pa.DataType) -> tuple[pa.Array, list[int]]:
    """A checked cast; the positions of the values it refuses are nulls, and listed."""
    try:
        return pc.cast(array, target), []
    except _CAST_ERRORS:
        pass
    bad: list[int] = []

    def search(start: int, length: int) -> None:
        try:
            pc.cast(array.slice(start, length), target)
            return
        except _CAST_ERRORS:
            pass
        if length == 1:
            bad.append(start)
            return
        half = length // 2
        search(start, half)
        search(start + half, length - half)

    search(0, len(array))
    return pc.cast(_without(array, bad), target), bad


def _without(array: pa.Array, positions: list[int]) -> pa.Array:
    mask = np.zeros(len(array), dtype=bool)
    mask[positions] = True
    return pc.if_else(pa.array(mask), pa.nulls(len(array), array.type), array)


def _overflowed(text: pa.Array, converted: pa.Array) -> list[int]:
    """Positions whose finite spelling became an infinity."""
    infinite = pc.fill_null(pc.is_inf(converted), False)
    if not pc.any(infinite).as_py():
        return []
    spelled = pc.fill_null(pc.match_substring_regex(text, _INFINITE), False)
    overflow = pc.and_(infinite, pc.invert(spelled))
    return [int(i) for i in pc.indices_nonzero(overflow).to_pylist()]


def _reason(value: Any, target: pa.DataType, name: str, kind: str) -> str:
    shown = repr(value)
    if isinstance(value, str) and pa.types.is_integer(target) and _matches(value, _DIGITS):
        return f"column {name!r}: {shown} is out of the int64 range"
    if pa.types.is_floating(target) and isinstance(value, str):
        try:
            if abs(float(value)) == float("inf"):
                return f"column {name!r}: {shown} overflows float64"
        except ValueError:
            pass
    if pa.types.is_floating(target) and isinstance(value, int):
        return f"column {name!r}: {shown} cannot be held exactly by float64"
    if pa.types.is_integer(target) and isinstance(value, float):
        return f"column {name!r}: {shown} is not a whole number within int64"
    if pa.types.is_decimal(target):
        return (f"column {name!r}: {shown} does not fit decimal({target.precision}, "
                f"{target.scale}) exactly")
    if pa.types.is_timestamp(target) and target.unit != "ns" and _finer(value, target):
        return (f"column {name!r}: {shown} is finer than the column's unit "
                f"({target.unit}); set `unit: ns` to keep it")
    return f"column {name!r}: {shown} is not {kind}"


def _matches(value: str, pattern: str) -> bool:
    return bool(pc.match_substring_regex(pa.array([value]), pattern)[0].as_py())


def _finer(value: Any, target: pa.DataType) -> bool:
    """Whether ``value`` converts at nanoseconds, though not at ``target``'s unit."""
    fine = pa.timestamp("ns", target.tz)
    try:
        if isinstance(value, str):
            zoned = _matches(value, _ZONE)
            pc.cast(pa.array([value]), fine if zoned or target.tz is None else
                    pa.timestamp("ns"))
        else:
            pa.array([value]).cast(fine)
    except _CAST_ERRORS:
        return False
    return True


def spelled(array: pa.Array) -> pa.Array:
    """Text as it is; other values in their JSON spelling (``1``, ``true``, ``{"a": 2}``)."""
    if pa.types.is_string(array.type):
        return array
    if pa.types.is_large_string(array.type) or pa.types.is_binary(array.type):
        return pc.cast(array, pa.string())
    if pa.types.is_nested(array.type):
        return pa.array([None if v is None else json.dumps(v, default=str)
                         for v in array.to_pylist()], type=pa.string())
    try:
        return pc.cast(array, pa.string())
    except _CAST_ERRORS:
        return pa.array([None if v is None else json.dumps(v, default=str)
                         for v in array.to_pylist()], type=pa.string())
