from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from skyferry.errors import FormatError, SchemaError, TransformError
from skyferry.models import ChunkPart
from skyferry.process.schema import Schema
from skyferry.process.transform import load_transforms
from tests.helpers.sf_data import process_parts

SCHEMA = Schema.model_validate({"columns": {
    "id": {"type": "int64", "nullable": False},
    "f0": {"type": "float64", "min": -10, "max": 10},
    "f1": {"type": "float64"},
    "label": {"type": "int64", "allowed": [0, 1]},
}})
CSV = (b"id,f0,f1,label\n"
       b"1,0.5,1.0,0\n"
       b"2,-0.5,2.0,1\n"
       b"3,oops,3.0,1\n"          # not a float
       b"4,0.1,4.0\n"             # too few columns
       b"5,0.2,5.0,7\n"           # label not allowed
       b"6,99,6.0,1\n"            # f0 above max
       b",0.3,7.0,0\n"            # id null
       b"8,0.4,8.0,1\n")
PART = ChunkPart(source="file:///data/train.csv", start=0, end=len(CSV))


def _run(data: bytes, schema: Schema | None, transforms: list[str] = ()):  # type: ignore[no-untyped-def]
    buffer, out = process_parts([(PART, data, b"")], "csv", schema, load_transforms(transforms),
                                "test")
    return pq.read_table(io.BytesIO(buffer.to_pybytes())), out


def test_invalid_rows_are_rejected_with_reasons_and_none_is_lost() -> None:
    table, out = _run(CSV, SCHEMA)
    assert table.column("id").to_pylist() == [1, 2, 8]
    assert out.rows_in == 8
    assert out.rows_in == table.num_rows + out.rows_rejected
    reasons = sorted(r["reason"] for r in out.rejects)
    assert any("'f0'" in r and "not float64" in r for r in reasons)
    assert any("expected 4 columns, found 3" in r for r in reasons)
    assert any("'label' is not one of" in r for r in reasons)
    assert any("'f0' is above 10" in r for r in reasons)
    assert any("'id' is null" in r for r in reasons)
    assert all(r["source"] == PART.source for r in out.rejects)
    assert str(table.schema.field("f0").type) == "double"


def test_without_a_schema_only_malformed_rows_are_rejected() -> None:
    table, out = _run(CSV, None)
    assert table.num_rows == 7 and out.rows_rejected == 1


def test_header_is_prepended_for_a_later_part() -> None:
    body = b"9,0.9,9.0,1\n"
    buffer, out = process_parts([(PART, body, b"id,f0,f1,label\n")], "csv", SCHEMA, [], "t")
    table = pq.read_table(io.BytesIO(buffer.to_pybytes()))
    assert table.to_pylist() == [{"id": 9, "f0": 0.9, "f1": 9.0, "label": 1}]


@pytest.mark.parametrize("header", [
    b'\xef\xbb\xbf"id","f 0",label\r\n',          # BOM, quoted names, CRLF
    b'id,"f, ""0""\nnew",label\n',                # a quoted name with a comma, quotes, newline
])
def test_a_later_part_gets_the_names_the_first_part_gets(header: bytes) -> None:
    """Chunk 0 is parsed with its header inline; a later chunk with the header's names."""
    first, _ = process_parts([(PART, header + b"1,0.5,0\n", b"")], "csv", None, [], "t")
    later, _ = process_parts([(PART, b"2,0.25,1\n", header)], "csv", None, [], "t")
    names = pq.read_table(io.BytesIO(first.to_pybytes())).column_names
    table = pq.read_table(io.BytesIO(later.to_pybytes()))
    assert table.column_names == names and len(names) == 3
    assert table.to_pylist() == [dict(zip(names, [2, 0.25, 1], strict=True))]


def test_a_header_that_is_not_utf8_is_a_format_error_naming_the_file() -> None:
    with pytest.raises(FormatError, match="train.csv"):
        process_parts([(PART, b"2,0.25,1\n", b"id,\xff\xfe,label\n")], "csv", None, [], "t")


def test_transforms_apply_and_dropped_rows_are_counted() -> None:
    table, out = _run(CSV, SCHEMA, ["tests.helpers.sf_transforms:add_feature_sum",
                                    "tests.helpers.sf_transforms:drop_negative_f0"])
    assert table.column("id").to_pylist() == [1, 8]
    assert table.column("feature_sum").to_pylist() == pytest.approx([1.5, 8.4])
    assert (out.rows_added, out.rows_dropped) == (0, 1)
    assert out.rows_in - out.rows_dropped == table.num_rows + out.rows_rejected
    assert not any("transform" in r["reason"] for r in out.rejects)


def test_rows_a_transform_adds_are_counted() -> None:
    table, out = _run(CSV, SCHEMA, ["tests.helpers.sf_transforms:duplicate_rows",
                                    "tests.helpers.sf_transforms:drop_negative_f0"])
    assert (out.rows_added, out.rows_dropped) == (table.num_rows // 2 + 1, 2)
    assert out.rows_in + out.rows_added - out.rows_dropped == table.num_rows + out.rows_rejected


def test_bad_transforms_are_typed_errors() -> None:
    with pytest.raises(TransformError, match="cannot import"):
        load_transforms(["no_such_module_xyz:fn"])
    with pytest.raises(TransformError, match="returned int"):
        _run(CSV, SCHEMA, ["tests.helpers.sf_transforms:not_a_frame"])


def test_missing_schema_column_names_the_file() -> None:
    with pytest.raises(SchemaError, match="train.csv lacks schema columns"):
        _run(b"id,f0\n1,0.5\n", SCHEMA)


def test_jsonl_bad_lines_are_rejected() -> None:
    data = b'{"a": 1}\n{"a": 2\n{"a": 3}\n[1]\n'
    part = ChunkPart(source="file:///x.jsonl", start=0, end=len(data))
    buffer, out = process_parts([(part, data, b"")], "jsonl", None, [], "t")
    table = pq.read_table(io.BytesIO(buffer.to_pybytes()))
    assert table.column("a").to_pylist() == [1, 3]
    assert out.rows_in == 4 and out.rows_rejected == 2


@pytest.mark.parametrize("columns", [1, 2, 3])
def test_quoted_newlines_decode_to_whole_values(columns: int) -> None:
    import csv as pycsv

    rows = [[f"c{i}" for i in range(columns)]]
    for n in range(4):
        rows.append([f"v{n}\nline two" if i == n % columns else f"{n}{i}"
                     for i in range(columns)])
    buf = io.StringIO()
    pycsv.writer(buf, lineterminator="\n").writerows(rows)
    data = buf.getvalue().encode()
    part = ChunkPart(source="file:///q.csv", start=0, end=len(data))
    buffer, out = process_parts([(part, data, b"")], "csv", None, [], "t")
    table = pq.read_table(io.BytesIO(buffer.to_pybytes()))
    assert out.rows_rejected == 0
    assert [[str(v) for v in r.values()] for r in table.to_pylist()] == rows[1:]


def test_invalid_utf8_in_a_csv_is_rejected_by_row_naming_the_column() -> None:
    data = b"id,name\n1,ok\n2,bad \xff\xfe\n3,fine\n"
    for schema in (None, Schema.model_validate({"columns": {"id": {"type": "int64"},
                                                            "name": {"type": "string"}}})):
        table, out = _run(data, schema)
        assert table.column("name").to_pylist() == ["ok", "fine"]
        assert str(table.schema.field("name").type) == "string"
        (reject,) = out.rejects
        assert reject["reason"] == "column 'name': invalid UTF-8" and reject["row"] == 2
        assert out.rows_in == 3


def test_invalid_utf8_in_a_typed_column_is_a_reject() -> None:
    schema = Schema.model_validate({"columns": {"id": {"type": "int64"}}})
    table, out = _run(b"id,name\n1,a\n\xff,b\n3,c\n", schema)
    assert table.column("id").to_pylist() == [1, 3] and out.rows_rejected == 1


def test_jsonl_with_mixed_types_keeps_every_row_as_text() -> None:
    part = ChunkPart(source="file:///data/m.jsonl", start=0, end=10)
    data = b'{"a": 1, "b": "x"}\n{"a": "two", "b": "y"}\n{"a": true, "b": "z"}\n'
    buffer, out = process_parts([(part, data, b"")], "jsonl", None, [], "t")
    table = pq.read_table(io.BytesIO(buffer.to_pybytes()))
    assert table.column("a").to_pylist() == ["1", "two", "true"] and not out.rejects


def test_an_undecodable_part_is_a_format_error_naming_the_file() -> None:
    part = ChunkPart(source="file:///data/odd.parquet", start=0, end=4, row_groups=(0,))
    with pytest.raises(FormatError, match="odd.parquet"):
        process_parts([(part, b"PAR1", b"")], "parquet", None, [], "t")


@pytest.mark.parametrize("schema", [None, SCHEMA])
def test_a_csv_of_blank_lines_holds_no_rows(schema: Schema | None) -> None:
    for data in (b"\n", b"\r\n\n  \n"):
        part = ChunkPart(source="file:///data/blank.csv", start=0, end=len(data))
        buffer, out = process_parts([(part, data, b"")], "csv", schema, [], "t")
        assert pq.read_table(io.BytesIO(buffer.to_pybytes())).num_rows == 0
        assert (out.rows_in, out.rows_rejected) == (0, 0)
