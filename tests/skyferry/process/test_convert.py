"""Exact values: every good value stored exactly, every bad one a reject with its row.

Property tests over int64 extremes, floats (subnormals, 1/3), timestamps with offsets and
nanoseconds, decimals and nulls, with malformed values mixed in, through CSV and JSONL.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyferry.models import ChunkPart
from skyferry.process.schema import Schema
from tests.helpers.sf_data import process_parts

SCHEMA = Schema.model_validate({"columns": {
    "n": {"type": "int64"},
    "x": {"type": "float64"},
    "t": {"type": "timestamp", "unit": "ns"},
    "d": {"type": "decimal", "precision": 30, "scale": 4},
}})
INT64 = 2**63 - 1
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

ints = st.one_of(st.sampled_from([INT64, -INT64 - 1, 2**53 + 1, -(2**53) - 1, 0]),
                 st.integers(-INT64 - 1, INT64))
floats = st.one_of(st.sampled_from([1 / 3, 5e-324, 2.2250738585072014e-308, 1.5e-12, -0.0,
                                    1.7976931348623157e308]),
                   st.floats(allow_nan=False, allow_infinity=False))
# nanoseconds since the epoch within timestamp[ns]'s years, and an offset in minutes
stamps = st.tuples(st.integers(-(2**62), 2**62), st.integers(-14 * 60, 14 * 60))
decimals = st.decimals(min_value=Decimal("-1e25"), max_value=Decimal("1e25"), places=4,
                       allow_nan=False, allow_infinity=False)
BAD = {"n": ["abc", "1.5", str(2**63), str(-(2**63) - 1), "1e3"],
       "x": ["1/3", "1e400", "0x10", "one"],
       "t": ["2024-13-01", "yesterday", "2024-01-01T25:00"],
       "d": ["1.00005", "1e30", "x"]}


def _iso(ns: int, offset_min: int) -> str:
    """``ns`` since the epoch written in the zone ``offset_min`` from UTC, to the ns."""
    seconds, frac = divmod(ns, 10**9)
    zone = dt.timezone(dt.timedelta(minutes=offset_min))
    local = (EPOCH + dt.timedelta(seconds=seconds)).astimezone(zone)
    sign = "+" if offset_min >= 0 else "-"
    hours, minutes = divmod(abs(offset_min), 60)
    spelled = "Z" if offset_min == 0 else f"{sign}{hours:02d}:{minutes:02d}"
    return f"{local:%Y-%m-%dT%H:%M:%S}.{frac:09d}{spelled}"


@st.composite
def rows(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """(rows as written, the stored rows expected, the 1-based rows expected rejected)."""
    written, expected, rejected = [], [], []
    for i in range(draw(st.integers(1, 25))):
        good = {"n": draw(st.none() | ints), "x": draw(st.none() | floats),
                "t": draw(st.none() | stamps), "d": draw(st.none() | decimals)}
        row = {"n": good["n"], "x": good["x"], "d": good["d"],
               "t": None if good["t"] is None else _iso(*good["t"])}
        broken = draw(st.none() | st.sampled_from(sorted(BAD)))
        if broken is not None:
            row[broken] = draw(st.sampled_from(BAD[broken]))
            rejected.append(i + 1)
        else:
            expected.append({"n": good["n"], "x": good["x"], "d": good["d"],
                             "t": None if good["t"] is None else good["t"][0]})
        written.append(row)
    return written, expected, rejected


def _csv(written: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["n", "x", "t", "d"])
    for row in written:
        writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else str(v))
                         for v in (row["n"], row["x"], row["t"], row["d"])])
    return out.getvalue().encode()


def _jsonl(written: list[dict[str, Any]]) -> bytes:
    lines = []
    for row in written:
        value = dict(row)
        if isinstance(value["d"], Decimal):  # a JSON number is a double: decimals as text
            value["d"] = str(value["d"])
        lines.append(json.dumps(value))
    return ("\n".join(lines) + "\n").encode()


def _stored(data: bytes, fmt: str) -> tuple[list[dict[str, Any]], list[int]]:
    part = ChunkPart(source=f"file:///src/a.{fmt}", start=0, end=len(data))
    buffer, out = process_parts([(part, data, b"")], fmt, SCHEMA, [], "test")
    table = pq.read_table(pa.BufferReader(buffer))
    assert out.rows_in == table.num_rows + out.rows_rejected
    stored = [{"n": r["n"], "x": r["x"], "d": r["d"],
               "t": None if r["t"] is None else r["t"]}
              for r in table.to_pylist()] if table.num_rows else []
    if table.num_rows:
        nanos = table.column("t").cast(pa.int64()).to_pylist()
        for row, ns in zip(stored, nanos, strict=True):
            row["t"] = ns
    return stored, sorted(r["row"] for r in out.rejects)


def _same(stored: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(stored) == len(expected)
    for got, want in zip(stored, expected, strict=True):
        assert got["n"] == want["n"]
        assert got["t"] == want["t"]
        assert got["d"] == want["d"]
        if want["x"] is None:
            assert got["x"] is None
        else:  # the same double, bit for bit (the sign of zero included)
            assert got["x"].hex() == want["x"].hex()


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_csv_values_are_stored_exactly_or_rejected_with_their_row(
        case: tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]) -> None:
    written, expected, rejected = case
    stored, rows_rejected = _stored(_csv(written), "csv")
    _same(stored, expected)
    assert rows_rejected == rejected


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_jsonl_values_are_stored_exactly_or_rejected_with_their_row(
        case: tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]) -> None:
    written, expected, rejected = case
    stored, rows_rejected = _stored(_jsonl(written), "jsonl")
    _same(stored, expected)
    assert rows_rejected == rejected


def test_the_issues_int64_values_are_kept_and_the_bad_one_rejected() -> None:
    data = b"n\n9007199254740993\nabc\n1234567890123456789\n"
    schema = Schema.model_validate({"columns": {"n": {"type": "int64"}}})
    part = ChunkPart(source="file:///src/a.csv", start=0, end=len(data))
    buffer, out = process_parts([(part, data, b"")], "csv", schema, [], "test")
    assert pq.read_table(pa.BufferReader(buffer)).column("n").to_pylist() == [
        9007199254740993, 1234567890123456789]
    (reject,) = out.rejects
    assert reject["row"] == 2 and "'abc' is not int64" in reject["reason"]


def test_timestamps_with_mixed_offsets_and_separators_are_normalised_to_utc() -> None:
    data = (b"t\n2024-01-01T00:00:00+05:00\n2024-01-01 00:00:00Z\n2024-01-01 00:00:00\n"
            b"2024-01-01\n2024-01-01T00:00:00.123456789Z\n")
    schema = Schema.model_validate({"columns": {"t": {"type": "timestamp"}}})
    part = ChunkPart(source="file:///src/a.csv", start=0, end=len(data))
    buffer, out = process_parts([(part, data, b"")], "csv", schema, [], "test")
    table = pq.read_table(pa.BufferReader(buffer))
    assert str(table.schema.field("t").type) == "timestamp[us, tz=UTC]"
    assert [v.isoformat() for v in table.column("t").to_pylist()] == [
        "2023-12-31T19:00:00+00:00", "2024-01-01T00:00:00+00:00",
        "2024-01-01T00:00:00+00:00", "2024-01-01T00:00:00+00:00"]
    (reject,) = out.rejects  # nanoseconds in a column of microseconds: not truncated
    assert reject["row"] == 5 and "finer than the column's unit (us)" in reject["reason"]


def test_a_constraint_reject_names_its_row() -> None:
    data = b"n\n1\nx\n7\n2\n"
    schema = Schema.model_validate({"columns": {"n": {"type": "int64", "max": 5}}})
    part = ChunkPart(source="file:///src/a.csv", start=0, end=len(data))
    _, out = process_parts([(part, data, b"")], "csv", schema, [], "test")
    assert sorted((r["row"], r["reason"]) for r in out.rejects) == [
        (2, "column 'n': 'x' is not int64"), (3, "column 'n' is above 5.0")]
