"""Run in MosaicML Streaming's own environment (``.venv-mosaic``: it needs numpy < 2.2, which
skyferry's does not allow).

    mosaic_read.py write ROWS.parquet MDS_DIR     # the rows as MDS shards, xxh64 hashes
    mosaic_read.py read MDS_DIR CACHE_DIR BATCH   # one epoch through a torch DataLoader

``read`` treats MDS_DIR as the remote: every shard is copied into the cold CACHE_DIR and its
hash checked, then read shuffled through ``DataLoader(batch_size=BATCH, num_workers=2)``,
which makes the same tensors as skyferry's front end. Prints one JSON line: the rows and the
seconds of the epoch.
"""

from __future__ import annotations

import json
import sys
import time

COLUMNS = {"id": "int64", "f0": "float64", "f1": "float64", "category": "str",
           "label": "int64"}


def write(rows_path: str, out: str) -> None:
    import pyarrow.parquet as pq
    from streaming import MDSWriter

    table = pq.read_table(rows_path)
    with MDSWriter(out=out, columns=COLUMNS, hashes=["xxh64"]) as writer:
        for row in table.to_pylist():
            writer.write(row)


def read(remote: str, local: str, batch: int) -> None:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    started = time.perf_counter()
    dataset = StreamingDataset(remote=remote, local=local, validate_hash="xxh64",
                               batch_size=batch, shuffle=True, shuffle_seed=1)
    rows = 0
    for tensors in DataLoader(dataset, batch_size=batch, num_workers=2):
        rows += len(tensors["id"])
    seconds = time.perf_counter() - started
    sys.stdout.write(json.dumps({"rows": rows, "seconds": seconds}) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    else:
        read(sys.argv[2], sys.argv[3], int(sys.argv[4]))
