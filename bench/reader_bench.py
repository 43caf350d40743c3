"""The training reader against ``pyarrow.dataset`` over the same verified chunk files.

Commits a CSV dataset of BENCH_ROWS rows (default 2,000,000) in 16 MB chunks without Prefect,
warms the reader's cache, then reads the epoch through the reader (shuffled, each chunk hashed
when opened) and through ``pyarrow.dataset`` (in file order), at two batch sizes; and times
the first batch after a resume. Run with ``.venv/bin/python bench/reader_bench.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="skyferry-reader-bench-"))
os.environ["SKYFERRY_HOME"] = str(ROOT / "home")
os.environ["SKYFERRY_DURABLE_WRITES"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> None:
    import pyarrow.dataset as ds

    from skyferry.read.reader import ReaderConfig, TrainingReader, chunk_files
    from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

    rows = int(os.environ.get("BENCH_ROWS", "2000000"))
    write_ml_csv(ROOT / "src" / "a.csv", rows, seed=1)
    commit_without_prefect(ROOT / "src", "train", chunk_size="16MB")
    cache = ROOT / "cache"
    files, _ = chunk_files("train", cache_dir=cache)
    for batch in (256, 4096):
        reader = TrainingReader(ReaderConfig("train", batch_size=batch, seed=1, cache_dir=cache))
        started = time.perf_counter()
        read = sum(b.num_rows for b in reader)
        sky = time.perf_counter() - started
        started = time.perf_counter()
        base_rows = sum(b.num_rows for b in
                        ds.dataset(files, format="parquet").to_batches(batch_size=batch))
        base = time.perf_counter() - started
        say(f"batch {batch}: reader {read / sky:,.0f} rows/s, pyarrow.dataset "
            f"{base_rows / base:,.0f} rows/s, reader_ratio_to_pyarrow {base / sky:.3f} "
            f"({reader.report.cache_hits} chunks from the cache)")
    reader = TrainingReader(ReaderConfig("train", batch_size=256, seed=1, cache_dir=cache))
    batches = iter(reader)
    for _ in range(100):
        next(batches)
    state = reader.state_dict()
    started = time.perf_counter()
    again = TrainingReader(ReaderConfig("train", batch_size=256, seed=1, cache_dir=cache))
    again.load_state_dict(state)
    next(iter(again))
    say(f"first batch after a resume: {(time.perf_counter() - started) * 1000:.0f} ms "
        f"(state: {state})")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
