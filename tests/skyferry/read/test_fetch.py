"""A mapped cache file: hashed a block at a time, and its pages let go of once read."""

from __future__ import annotations

import random
from pathlib import Path

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from skyferry.read.fetch import Mapped


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            inside = line.endswith(str(path))
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def test_a_mapped_file_hashes_its_bytes_and_keeps_none_of_its_pages(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(80 << 20)  # more than one hashing block
    path = tmp_path / "copy.arrow"
    path.write_bytes(data)
    mapped = Mapped(path)
    assert mapped.digest() == (blake3.blake3(data).hexdigest(), len(data))
    assert _resident_kb(path) <= 8  # every hashed page let go of (a partial page may stay)

    # columns read zero-copy from the file, then let go of: the bytes are still the file's
    values = pa.Array.from_buffers(pa.uint8(), len(data), [None, mapped.buffer])
    assert pc.sum(values.slice(0, 8 << 20)).as_py() == sum(data[:8 << 20])
    assert _resident_kb(path) >= 8 << 10  # 8 MiB read: resident
    mapped.release_arrays(pa.record_batch([values.slice(0, 8 << 20)], names=["b"]))
    assert _resident_kb(path) <= 8
    assert values.slice(len(data) - 4, 4).to_pylist() == list(data[-4:])
    mapped.close()  # arrays still point into it: unmapped when they are gone
    assert values[0].as_py() == data[0]


def test_an_empty_file_is_no_copy_of_anything(tmp_path: Path) -> None:
    path = tmp_path / "empty.chunk"
    path.write_bytes(b"")
    with Mapped(path) as mapped:
        assert mapped.digest() == (blake3.blake3(b"").hexdigest(), 0)
        assert mapped.buffer.size == 0
