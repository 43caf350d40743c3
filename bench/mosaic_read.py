"""Run in MosaicML Streaming's own environment (``.venv-mosaic``: it needs numpy < 2.2, which
skyferry's does not allow): write the rows of a Parquet file as MDS shards with xxh64 hashes,
then read them once through ``StreamingDataset`` with the hashes checked and its shuffle on.
Prints one JSON line: the rows read and the rows per second of the read alone.

Usage: mosaic_read.py ROWS.parquet OUT_DIR BATCH_SIZE
"""

from __future__ import annotations

import json
import sys
import time

import pyarrow.parquet as pq
from streaming import MDSWriter, StreamingDataset


def main() -> None:
    rows_path, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    table = pq.read_table(rows_path)
    columns = {"id": "int64", "f0": "float64", "f1": "float64", "category": "str",
               "label": "int64"}
    with MDSWriter(out=out, columns=columns, hashes=["xxh64"]) as writer:
        for row in table.to_pylist():
            writer.write(row)
    dataset = StreamingDataset(local=out, validate_hash="xxh64", batch_size=batch,
                               shuffle=True, shuffle_seed=1)
    started = time.perf_counter()
    count = sum(1 for _ in dataset)
    seconds = time.perf_counter() - started
    sys.stdout.write(json.dumps({"rows": count, "rows_s": count / seconds}) + "\n")


if __name__ == "__main__":
    main()
