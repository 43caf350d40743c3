"""Every export format reads back equal to the stored table: no value rounded or cut."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from skyferry.errors import ConfigError
from skyferry.ops.export import DatasetReader, export_dataset
from tests.helpers.sf_data import commit_without_prefect

UTC = dt.UTC
TABLE = pa.table({
    "i": pa.array([2**63 - 1, -(2**63), 2**53 + 1, None], pa.int64()),
    "f": pa.array([1.5e-12, 1 / 3, 5e-324, float("nan")], pa.float64()),
    "t": pa.array([dt.datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC),
                   dt.datetime(1900, 6, 1, 12, tzinfo=UTC), None,
                   dt.datetime(2262, 1, 1, tzinfo=UTC)], pa.timestamp("us", "UTC")),
    "n": pa.array([1_700_000_000_123_456_789, 1, None, -5], pa.int64()).cast(
        pa.timestamp("ns")),
    "d": pa.array([Decimal("12345678901234567890.1234"), Decimal("-0.0001"), None,
                   Decimal("0")], pa.decimal128(30, 4)),
    "tags": pa.array([[1, 2], [], None, [3]], pa.list_(pa.field("element", pa.int64()))),
    "s": pa.array(["a", "é,\"q\"\n", None, ""]),
})


@pytest.fixture
def stored(home: Path, tmp_path: Path) -> pa.Table:
    src = tmp_path / "src" / "a.parquet"
    src.parent.mkdir()
    pq.write_table(TABLE, src)
    commit_without_prefect(src.parent, "exact")
    return DatasetReader("exact").read_table()


def _same(a: pa.Table, b: pa.Table) -> None:
    """Equal tables, NaN equal to NaN and every double bit for bit."""
    assert a.schema.equals(b.schema)
    for name in a.column_names:
        left, right = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name == "f":
            left, right = [x.hex() for x in left], [x.hex() for x in right]
        assert left == right, name


def test_the_stored_table_is_the_source(stored: pa.Table) -> None:
    _same(stored, TABLE)


def test_jsonl_reads_back_to_the_same_values(stored: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    export_dataset("exact", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["i"] for r in rows] == stored.column("i").to_pylist()
    floats = [r["f"] for r in rows]
    assert [x.hex() for x in floats[:3]] == [x.hex() for x in stored.column("f").to_pylist()[:3]]
    assert floats[3] != floats[3]  # NaN
    assert [None if v is None else dt.datetime.fromisoformat(v) for v in
            (r["t"] for r in rows)] == stored.column("t").to_pylist()
    assert [r["n"] for r in rows] == ["2023-11-14T22:13:20.123456789",
                                      "1970-01-01T00:00:00.000000001", None,
                                      "1969-12-31T23:59:59.999999995"]
    assert [None if v is None else Decimal(v) for v in (r["d"] for r in rows)] == \
        stored.column("d").to_pylist()
    assert [r["tags"] for r in rows] == stored.column("tags").to_pylist()
    assert [r["s"] for r in rows] == stored.column("s").to_pylist()


def test_csv_keeps_every_scalar_and_writes_nested_columns_as_json(
        stored: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    export_dataset("exact", out)
    back = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(
        column_types={"i": pa.int64(), "f": pa.float64(), "t": pa.timestamp("us", "UTC"),
                      "n": pa.timestamp("ns"), "d": pa.decimal128(30, 4),
                      "tags": pa.string(), "s": pa.string()},
        strings_can_be_null=True, quoted_strings_can_be_null=False))
    for name in ("i", "t", "n", "d"):
        assert back.column(name).to_pylist() == stored.column(name).to_pylist(), name
    assert [x.hex() for x in back.column("f").to_pylist()[:3]] == \
        [x.hex() for x in stored.column("f").to_pylist()[:3]]
    assert [None if v is None else json.loads(v) for v in back.column("tags").to_pylist()] \
        == stored.column("tags").to_pylist()


def test_parquet_is_the_stored_table(stored: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    export_dataset("exact", out)
    _same(pq.read_table(out), stored)


def test_an_unknown_export_name_is_refused_before_writing(stored: pa.Table,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x\.txt.*must end in \.parquet"):
        export_dataset("exact", tmp_path / "x.txt")
    assert list(tmp_path.glob("*x.txt*")) == []
