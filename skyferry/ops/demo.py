"""A synthetic ML training set: float features, a category, a label, and a few bad rows."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

__all__ = ["BAD_ROWS", "generate_dataset"]

logger = logging.getLogger("skyferry.ops.demo")

FEATURES = 8
CATEGORIES = ["cat", "dog", "bird", "fish", "horse"]
BAD_ROWS = [
    b"999999991,1.0,2.0,3.0\n",                                       # too few columns
    b"999999992,not-a-number,0,0,0,0,0,0,0,dog,1\n",                  # bad float
    b"999999993,0,0,0,0,0,0,0,0,dog,7\n",                             # label not in {0,1}
    b"999999994,0,0,0,0,0,0,0,0,unicorn,1\n",                         # unknown category
    b'999999995,0,0,0,0,0,0,0,0,"dog",1,extra\n',                     # too many columns
]


def _table(rng: np.random.Generator, start: int, rows: int) -> pa.Table:
    columns: dict[str, object] = {"id": np.arange(start, start + rows, dtype=np.int64)}
    weights = rng.normal(size=FEATURES)
    features = rng.normal(size=(rows, FEATURES)).round(6)
    for i in range(FEATURES):
        columns[f"f{i}"] = features[:, i]
    columns["category"] = np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), rows)]
    columns["label"] = (features @ weights > 0).astype(np.int64)
    return pa.table(columns)


def generate_dataset(target: Path, *, total_bytes: int, files: int = 4,
                     seed: int = 7) -> list[Path]:
    """Write ``files`` CSV files of about ``total_bytes`` in all; the last holds bad rows."""
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows_per_file = max(1, total_bytes // files // 100)  # about 100 bytes a row
    written = []
    next_id = 0
    for n in range(files):
        path = target / f"train-{n:04d}.csv"
        with pacsv.CSVWriter(path, _table(rng, 0, 1).schema) as writer:
            remaining = rows_per_file
            while remaining:
                batch = min(remaining, 200_000)
                writer.write_table(_table(rng, next_id, batch))
                next_id += batch
                remaining -= batch
        if n == files - 1:
            with open(path, "ab") as fh:
                fh.writelines(BAD_ROWS)
        written.append(path)
    logger.info("generated %d files, %d bytes", len(written), sum(p.stat().st_size
                                                                   for p in written))
    return written
