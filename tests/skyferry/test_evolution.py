"""Batches whose columns are added, dropped and change type (nested too): every reader
returns the same rows, through the one schema resolved from the chunks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyferry.errors import SchemaEvolutionError
from skyferry.evolution import conform, resolve, wider
from skyferry.ops.export import DatasetReader, export_dataset
from skyferry.process.encode import fit, widen
from skyferry.read.reader import ReaderConfig, TrainingReader, read_to_file
from tests.helpers.sf_data import commit_drifted, commit_without_prefect


@pytest.fixture
def drifted(home: Path, tmp_path: Path) -> tuple[str, dict[int, dict[str, Any]]]:
    return "drift", commit_drifted(tmp_path / "src", "drift")


def _by_id(table: pa.Table) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in table.to_pylist()}


def test_every_reader_returns_the_same_rows_through_one_schema(
        drifted: tuple[str, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    dataset, expected = drifted
    reader = DatasetReader(dataset)
    schema = reader.schema()
    assert {f.name: str(f.type) for f in schema} == {
        "id": "int64", "a": "string", "tags": "string", "gone": "string", "new": "double"}
    assert _by_id(reader.read_table()) == expected

    export_dataset(dataset, tmp_path / "out.parquet")
    assert _by_id(pq.read_table(tmp_path / "out.parquet")) == expected
    export_dataset(dataset, tmp_path / "out.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {r["id"]: r for r in lines} == expected

    training = TrainingReader(ReaderConfig(dataset, batch_size=7))
    batches = list(training)
    assert all(b.schema.equals(schema) for b in batches)
    assert _by_id(pa.concat_tables(batches)) == expected
    rows, _ = read_to_file(ReaderConfig(dataset, batch_size=7), tmp_path / "read.parquet")
    assert rows == len(expected)
    assert _by_id(pq.read_table(tmp_path / "read.parquet")) == expected


def test_a_big_integer_meeting_a_float_column_is_a_typed_error_not_a_rounding() -> None:
    """A chunk whose manifest entry does not say it holds such integers (one committed
    before entries said so): the conversion is refused, never rounded."""
    ints = pa.table({"x": pa.array([2**53 + 1], pa.int64())})
    floats = pa.table({"x": pa.array([0.5])})
    schema = resolve([ints.schema, floats.schema])
    assert schema.field("x").type == pa.float64()
    assert conform(pa.table({"x": pa.array([2**53], pa.int64())}), schema).column(
        "x").to_pylist() == [float(2**53)]
    with pytest.raises(SchemaEvolutionError, match="'x'"):
        conform(ints, schema)


BIG = [2**53 + 1, -(2**63), 2**63 - 1]


def _exact_text(table: pa.Table) -> dict[int, Any]:
    return {r["id"]: r["x"] for r in table.to_pylist()}


@pytest.mark.parametrize("within", [False, True], ids=["across batches", "within a chunk"])
def test_integers_no_double_holds_meeting_floats_read_back_exactly_as_text(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, within: bool) -> None:
    """Integers beyond 2^53 in one batch (or one block of a chunk), floats in another: the
    column is text, every value in its exact spelling, through every reader."""
    from skyferry.config import get_settings

    monkeypatch.setenv("SKYFERRY_BLOCK_SIZE", str(64 << 10))
    get_settings.cache_clear()
    src = tmp_path / "src"
    src.mkdir()
    pad = "p" * 60  # rows of about 100 bytes: the file spans several 64 KiB blocks
    ints = [{"id": i, "x": BIG[i % 3], "pad": pad} for i in range(2000)]
    floats = [{"id": i, "x": i + 0.5, "pad": pad} for i in range(2000, 4000)]
    expected = {r["id"]: str(r["x"]) for r in ints + floats}
    if within:
        (src / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ints + floats))
        commit_without_prefect(src, "big")
    else:
        for n, rows in enumerate((ints, floats)):
            (src / f"b{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            commit_without_prefect(src, "big")
    reader = DatasetReader("big")
    assert reader.schema().field("x").type == pa.string()
    assert _exact_text(reader.read_table()) == expected
    export_dataset("big", tmp_path / "out.parquet")
    assert _exact_text(pq.read_table(tmp_path / "out.parquet")) == expected
    training = TrainingReader(ReaderConfig("big", batch_size=500))
    assert _exact_text(pa.concat_tables(list(training))) == expected


TYPES = [pa.int32(), pa.int64(), pa.float64(), pa.string(), pa.bool_(),
         pa.timestamp("us", "UTC"), pa.timestamp("ns", "UTC"), pa.decimal128(10, 2),
         pa.decimal128(20, 5), pa.list_(pa.int64()), pa.list_(pa.string()),
         pa.struct([("k", pa.int64())]), pa.null()]
VALUES: dict[str, Any] = {
    "int32": 7, "int64": 2**40, "double": 0.25, "string": "t", "bool": True,
    "timestamp[us, tz=UTC]": 1_700_000_000_000_000,
    "timestamp[ns, tz=UTC]": 1_700_000_000_000_000_001,
    "decimal128(10, 2)": "12.25", "decimal128(20, 5)": "-1.00001",
    "list<item: int64>": [1, 2], "list<item: string>": ["a"],
    "struct<k: int64>": {"k": 3}, "null": None}


def _column(kind: pa.DataType) -> pa.Array:
    value = VALUES[str(kind)]
    if pa.types.is_timestamp(kind):
        return pa.array([value, None], pa.int64()).cast(kind)
    if pa.types.is_decimal(kind):
        from decimal import Decimal
        return pa.array([Decimal(value), None], kind)
    return pa.array([value, None], kind)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from(TYPES),
                                min_size=1), min_size=1, max_size=4))
def test_any_drift_resolves_to_a_schema_every_chunk_fits(
        chunks: list[dict[str, pa.DataType]]) -> None:
    tables = [pa.table({name: _column(kind) for name, kind in columns.items()})
              for columns in chunks]
    schema = resolve(t.schema for t in tables)
    for table in tables:
        fitted = conform(table, schema)
        assert fitted.schema.equals(schema) and fitted.num_rows == 2
        for name in schema.names:
            column = fitted.column(name)
            assert column[1].as_py() is None  # nulls stay null
            if name not in table.column_names:
                assert column.null_count == 2  # a column the chunk lacks reads as nulls
            elif table.column(name).type == schema.field(name).type:
                assert column.equals(table.column(name))  # the same type: the same values
            else:
                assert column[0].is_valid == table.column(name)[0].is_valid  # nothing lost
                assert wider(table.column(name).type, schema.field(name).type) == \
                    schema.field(name).type


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from(TYPES),
                                min_size=1), min_size=1, max_size=4))
def test_a_chunk_widened_block_by_block_stores_what_the_dataset_reads(
        blocks: list[dict[str, pa.DataType]]) -> None:
    """Whether drift meets inside one chunk (its blocks) or across chunks, the columns and
    the values come out the same: the chunk's writer and the readers share one rule."""
    tables = [pa.table({name: _column(kind) for name, kind in columns.items()})
              for columns in blocks]
    columns = tables[0].schema
    for table in tables[1:]:
        columns = widen(columns, table)
    schema = resolve(t.schema for t in tables)
    assert [(f.name, f.type) for f in columns] == [(f.name, f.type) for f in schema]
    for table in tables:
        stored = fit(table, columns)
        assert stored is not None
        assert stored.cast(schema).equals(conform(table, schema))
