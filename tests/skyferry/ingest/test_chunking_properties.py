"""Property: the rows stored and the rows rejected never depend on the chunk size.

For generated CSV and JSONL (quotes anywhere, CRLF, a BOM, empty and long fields, malformed
rows), the planner's chunks are processed one by one, as the pipeline does, and the stored
rows and the rejected texts are compared with those of the whole file in one chunk.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyferry.hashing import content_hash
from skyferry.ingest import chunking
from skyferry.ingest.listing import list_source
from skyferry.ingest.read import SourceStream, plan_chunks
from tests.helpers.sf_data import process_parts

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# Field text: quotes, commas, CR and LF are what move record boundaries.
_CHARS = st.sampled_from(list('ab ,"\r\n') + ["é", "x" * 40])
_RAW_FIELD = st.lists(_CHARS, max_size=6).map("".join)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


@st.composite
def csv_files(draw: Any) -> bytes:
    """A CSV file: a header of 3 columns, then rows that may be quoted, unquoted or broken."""
    lines = ["id,text,value"]
    for i in range(draw(st.integers(1, 12))):
        style = draw(st.sampled_from(["clean", "quoted", "raw", "stray", "short", "long",
                                      "not-utf8"]))
        text = draw(_RAW_FIELD)
        if style == "clean":
            cells = [str(i), text.replace('"', "").replace(",", "").replace("\r", "")
                     .replace("\n", ""), "1.5"]
        elif style == "quoted":
            cells = [str(i), _quote(text), "2"]
        elif style == "raw":  # whatever the generator drew, quotes and line ends included
            cells = [str(i), text, "3"]
        elif style == "stray":  # a quote inside an unquoted field opens nothing
            cells = [str(i), 'a"' + text.replace(",", ""), "5"]
        elif style == "not-utf8":  # a byte that is not UTF-8 (\xff, by surrogateescape)
            cells = [str(i), "caf\udcff", "6"]
        elif style == "short":
            cells = [str(i)]
        else:
            cells = [str(i), _quote("y" * draw(st.integers(200, 3000))), "4"]
        lines.append(",".join(cells))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    body = newline.join(lines) + draw(st.sampled_from([newline, ""]))
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + body).encode("utf-8", "surrogateescape")


@st.composite
def jsonl_files(draw: Any) -> bytes:
    lines = []
    for i in range(draw(st.integers(1, 12))):
        style = draw(st.sampled_from(["object", "quoted", "broken", "blank", "long"]))
        if style == "object":
            lines.append(json.dumps({"id": i, "v": draw(_RAW_FIELD)}))
        elif style == "quoted":
            lines.append(json.dumps({"id": i, "v": '"' + draw(_RAW_FIELD) + '"'}))
        elif style == "broken":
            lines.append('{"id": ' + str(i) + ', "v": "unterminated')
        elif style == "blank":
            lines.append("")
        else:
            lines.append(json.dumps({"id": i, "v": "z" * draw(st.integers(200, 3000))}))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    first = json.dumps({"id": -1, "v": "first"})  # a file starts with an object
    return (newline.join([first, *lines]) + draw(st.sampled_from([newline, ""]))).encode()


def _value(value: Any) -> str:
    """A value as a reader sees it once chunks typed apart are unified (2 and 2.0 alike)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def _outcome(path: Path, chunk_size: int, block: int) -> tuple[Counter[str], Counter[str]]:
    """Stored rows (as JSON) and rejected texts of the file processed at ``chunk_size``,
    streamed in blocks of ``block`` bytes."""
    (file,) = list_source(str(path))
    stored: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for plan in plan_chunks([file], "auto", chunk_size):
        stream = SourceStream(plan, None, block)
        blocks = [(b.part, b.data, b.header, b.offset) for b in stream]
        assert stream.digest == content_hash(b"".join(
            path.read_bytes()[p.start:p.end] for p in plan.parts))
        buffer, out = process_parts(blocks, plan.format, None, [], "t")
        table = pq.read_table(pa.BufferReader(buffer))
        assert table.num_rows == sum(out.part_rows)
        for row in table.to_pylist():
            stored[json.dumps({k: _value(v) for k, v in row.items() if v is not None},
                              sort_keys=True)] += 1
        for reject in out.rejects:
            rejected[str(reject["text"]).strip("\r\n")] += int(reject.get("count", 1))
    return stored, rejected


def _same_at_every_chunk_size(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        whole = _outcome(path, len(data) + 1, len(data) + 1)
        sizes = sorted({1, 2, 3, 5, 8, 13, 40, 100, 500, len(data) // 2 or 1, len(data)})
        for chunk_size in sizes:
            assert _outcome(path, chunk_size, 1 << 20) == whole, f"chunk size {chunk_size}"
        for block in (1, 7, 64, len(data) // 3 or 1):  # one chunk, streamed in small blocks
            assert _outcome(path, len(data) + 1, block) == whole, f"block size {block}"


@PROPERTY
@given(csv_files())
def test_csv_rows_do_not_depend_on_the_chunk_size(data: bytes) -> None:
    _same_at_every_chunk_size(data, ".csv")


@PROPERTY
@given(jsonl_files())
def test_jsonl_rows_do_not_depend_on_the_chunk_size(data: bytes) -> None:
    _same_at_every_chunk_size(data, ".jsonl")


def test_a_quote_inside_an_unquoted_field_opens_nothing(tmp_path: Path) -> None:
    """The issue's input: `1,ab"c,1`, then quoted multi-line fields; 39 records at any size."""
    rows = ['1,ab"c,1'] + [f'{i},"multi\nline {i}",{i}' for i in range(2, 40)]
    path = tmp_path / "q.csv"
    path.write_bytes(("id,text,value\n" + "\n".join(rows) + "\n").encode())
    for chunk_size, block in ((100, 1 << 20), (37, 1 << 20), (10**6, 1 << 20), (10**6, 37),
                              (10**6, 5)):
        stored, rejected = _outcome(path, chunk_size, block)
        assert sum(stored.values()) == 39 and not rejected, (chunk_size, block)


def _record_ends(window: bytes) -> set[int]:
    """Every record end of ``window`` by the exact scan (pyarrow's reading of records)."""
    ends, at = {0}, 0
    while (match := chunking._CSV_RECORD.match(window, at)) is not None and match.end() > at:
        at = match.end()
        ends.add(at)
    return ends


@PROPERTY
@given(csv_files(), st.integers(min_value=1, max_value=2_000))
def test_a_cut_by_counting_quotes_is_a_record_end_of_the_exact_scan(data: bytes,
                                                                    length: int) -> None:
    window = data[:length]
    fast = chunking._csv_last_end_by_parity(window, 0)
    if fast is not None:
        assert fast in _record_ends(window)
        exact = chunking._CSV_RECORDS.match(window, 0, len(window))
        assert exact is not None and fast <= exact.end()
    # the search from the window's end, in tails that start small and double, finds the
    # same end as one search of the whole window
    default = chunking._TAIL
    try:
        for tail in (1, 3, 64):
            chunking._TAIL = tail
            assert chunking._csv_last_end_by_parity(window, 0) == fast, tail
    finally:
        chunking._TAIL = default
