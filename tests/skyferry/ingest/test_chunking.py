from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skyferry.ingest.chunking import binary_segments, pack_segments, text_segments
from skyferry.ingest.listing import list_source
from skyferry.ingest.read import plan_chunks, plan_file

TRICKY_ROWS = [
    ["id", "text", "value"],
    ["1", "plain", "1.5"],
    ["2", "has a\nnewline inside", "2.5"],
    ["3", 'quote "inside" and, comma', "3.5"],
    ["4", "multi\n\nline\r\nwith crlf", "4.5"],
    ["5", "", "5.5"],
    ["6", "last", "6.5"],
]


def _csv_bytes(rows: list[list[str]], *, crlf: bool, bom: bool) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n" if crlf else "\n").writerows(rows)
    data = buf.getvalue().encode()
    return (b"\xef\xbb\xbf" + data) if bom else data


def _reader(data: bytes):  # type: ignore[no-untyped-def]
    return lambda start, end: data[start:end]


def _records(segment: bytes, header: bytes) -> list[list[str]]:
    text = (header + segment).decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text, newline="")))[1:]


def test_binary_segments_match_the_seed_example() -> None:
    assert binary_segments(250, 100) == [(0, 100), (100, 200), (200, 250)]
    plans = pack_segments([("f", "binary", 0, [(s, e, ()) for s, e in
                                                binary_segments(250, 100)])], 100)
    assert [p.size for p in plans] == [100, 100, 50]


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("bom", [False, True])
def test_csv_segments_keep_records_whole_at_every_chunk_size(crlf: bool, bom: bool) -> None:
    data = _csv_bytes(TRICKY_ROWS, crlf=crlf, bom=bom)
    expected = TRICKY_ROWS[1:]
    for chunk_size in range(1, len(data) + 2):
        segments, header_end = text_segments(_reader(data), len(data), chunk_size,
                                             quoted=True, header=True)
        assert segments[0][0] == 0 and segments[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in zip(segments, segments[1:], strict=False))
        header = data[:header_end]
        assert header.decode("utf-8-sig").strip() == "id,text,value"
        got = []
        for start, end in segments:
            seg = data[start:end]
            rows = _records(seg[header_end:] if start == 0 else seg, header)
            assert rows, f"segment {start}:{end} at chunk size {chunk_size} holds no record"
            got.extend(rows)
        assert got == expected, f"chunk size {chunk_size}"


def test_csv_segments_respect_the_chunk_size_when_records_fit() -> None:
    rows = [["a", "b"]] + [[str(i), "x" * 10] for i in range(200)]
    data = _csv_bytes(rows, crlf=False, bom=False)
    segments, _ = text_segments(_reader(data), len(data), 100, quoted=True, header=True)
    assert len(segments) > 20
    assert all(end - start <= 100 for start, end in segments)
    assert all(data[end - 1:end] == b"\n" for _, end in segments)


def test_a_quoted_newline_is_never_a_boundary() -> None:
    body = '"' + "line\n" * 50 + '"'
    data = _csv_bytes([["k", "v"], ["1", body.strip('"')], ["2", "z"]], crlf=False, bom=False)
    segments, _ = text_segments(_reader(data), len(data), 16, quoted=True, header=True)
    assert len(segments) == 2  # the long quoted record, then record 2
    assert _records(data[segments[1][0]:], b"k,v\n") == [["2", "z"]]


def test_jsonl_segments_split_on_newlines() -> None:
    lines = [json.dumps({"i": i, "s": "x" * (i % 7)}) for i in range(100)]
    data = ("\n".join(lines) + "\n").encode()
    for chunk_size in (1, 10, 64, 1000, len(data)):
        segments, header_end = text_segments(_reader(data), len(data), chunk_size,
                                             quoted=False, header=False)
        assert header_end == 0
        got = [json.loads(line) for s, e in segments for line in data[s:e].splitlines()]
        assert [g["i"] for g in got] == list(range(100))


def test_small_files_are_packed_into_one_chunk(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"f{i:02d}.bin").write_bytes(bytes([i]) * 10)
    files = list_source(str(tmp_path))
    plans = plan_chunks(files, "auto", 100)
    assert [p.size for p in plans] == [100, 100, 100]
    assert [len(p.parts) for p in plans] == [10, 10, 10]
    assert sum(p.size for p in plans) == 300


def test_parquet_plans_follow_row_groups(tmp_path: Path) -> None:
    table = pa.table({"x": list(range(10_000)), "y": [float(i) for i in range(10_000)]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=1000)
    (file,) = list_source(str(path))
    _, fmt, _, segments = plan_file(file, "auto", 1)
    assert fmt == "parquet"
    assert [s[2] for s in segments] == [(i,) for i in range(10)]
    plans = plan_chunks([file], "auto", 10**9)
    assert len(plans) == 1 and plans[0].parts[0].row_groups == tuple(range(10))
