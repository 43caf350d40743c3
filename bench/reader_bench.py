"""The training reader's figures for ``make bench`` (or run alone).

A CSV dataset of BENCH_READER_ROWS rows (default 1,000,000) is committed in 8 MB chunks
without Prefect. Then, each figure a ratio from this run:
- ``reader_ratio_to_pyarrow``: rows per second through the reader (shuffled, each chunk's
  decoded copy hashed when opened, warm cache) against ``pyarrow.dataset`` reading the same
  verified Parquet files in order; batches of 1,024; the median of five alternating pairs;
  ``reader_ratio_parquet_cache`` the same with no decoded copies (``decoded=False``), and
  ``reader_first_epoch_ratio_to_pyarrow`` the epoch that makes them;
- ``reader_ratio_to_mosaic``: the same rows written to MosaicML Streaming's MDS format (with
  xxh64 shard hashes) and read through its ``StreamingDataset`` with the hashes checked and
  its shuffle on, in its own environment (``.venv-mosaic``, which ``make bench`` makes);
- ``egress_bytes_local``: bytes read across clouds by a reader, with a cold cache, in a cloud
  that holds a replica of every chunk;
- ``resume_first_batch_ms``: from making a reader and loading a state to its first batch.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH = 1024
PAIRS = 5


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="skyferry-reader-bench-"))
    saved = {k: os.environ.get(k) for k in ("SKYFERRY_HOME", "SKYFERRY_DURABLE_WRITES")}
    os.environ["SKYFERRY_HOME"] = str(root / "home")
    os.environ["SKYFERRY_DURABLE_WRITES"] = "false"
    from skyferry.config import get_settings

    get_settings.cache_clear()
    try:
        return _figures(root)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        shutil.rmtree(root, ignore_errors=True)


def _figures(root: Path) -> dict[str, Any]:
    import pyarrow.dataset as ds

    from skyferry.commit.manifest import open_catalog
    from skyferry.read.reader import ReaderConfig, TrainingReader, chunk_files
    from skyferry.topology import load_topology
    from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

    rows = int(os.environ.get("BENCH_READER_ROWS", "1000000"))
    write_ml_csv(root / "src" / "a.csv", rows, seed=1)
    manifest = commit_without_prefect(root / "src", "train", chunk_size="8MB")
    cache = root / "cache"
    files, _ = chunk_files("train", cache_dir=cache)
    figures: dict[str, Any] = {}

    def reader(**options: Any) -> TrainingReader:
        options.setdefault("cache_dir", cache)
        return TrainingReader(ReaderConfig("train", batch_size=BATCH, seed=1, **options))

    def baseline() -> float:
        started = time.perf_counter()
        base = sum(b.num_rows for b in ds.dataset(files, format="parquet").to_batches(
            batch_size=BATCH))
        return base / (time.perf_counter() - started)

    def timed(**options: Any) -> float:
        started = time.perf_counter()
        read = sum(b.num_rows for b in reader(**options))
        return read / (time.perf_counter() - started)

    # the first epoch makes the decoded copies (the Parquet files are cached already)
    first = timed()
    figures["reader_first_epoch_ratio_to_pyarrow"] = round(first / baseline(), 3)
    decoded = sum(p.stat().st_size for p in cache.glob("*.arrow"))
    parquet = sum(p.stat().st_size for p in cache.glob("*.chunk"))
    figures["decoded_cache_size_ratio"] = round(decoded / parquet, 2)
    for name, options in (("reader_ratio_to_pyarrow", {}),
                          ("reader_ratio_parquet_cache", {"decoded": False})):
        ratios, sky_rates, base_rates = [], [], []
        for _ in range(PAIRS):
            sky_rates.append(timed(**options))
            base_rates.append(baseline())
            ratios.append(sky_rates[-1] / base_rates[-1])
        figures[name] = round(statistics.median(ratios), 3)
        if not options:
            figures["reader_rows_s"] = round(statistics.median(sky_rates))
        say(f"{name:<26} {figures[name]}  (median of {PAIRS} pairs; reader "
            f"{statistics.median(sky_rates):,.0f} rows/s, pyarrow.dataset "
            f"{statistics.median(base_rates):,.0f} rows/s; {rows:,} rows in "
            f"{len(manifest.chunks)} chunks{'' if options else '; target >= 0.9'})")
    say(f"reader_first_epoch_ratio_to_pyarrow {figures['reader_first_epoch_ratio_to_pyarrow']}"
        f"  (the epoch that makes the decoded copies, {decoded / 1e6:.1f} MB: "
        f"{figures['decoded_cache_size_ratio']}x the Parquet files)")

    # a reader in a cloud that holds a replica of every chunk, cold cache
    clouds = {n.name: n.cloud for n in load_topology().nodes}
    held = [{clouds[r.node] for r in c.verified} for c in manifest.chunks]
    local = sorted(set.intersection(*held)) if held else []
    if local:
        cold = reader(cloud=local[0], cache_dir=root / "cold")
        sum(b.num_rows for b in cold)
        figures["egress_bytes_local"] = cold.report.cross_cloud_bytes
        say(f"egress_bytes_local      {figures['egress_bytes_local']}  (a reader in "
            f"{local[0]}, cold cache: {dict(cold.report.bytes_from)}; target 0)")
    else:
        figures["egress_bytes_local"] = None
        say("egress_bytes_local      n/a (no cloud holds a replica of every chunk)")
    open_catalog(load_topology())  # the catalog is still there for the resume below

    # the first batch after a resume
    first = reader()
    batches = iter(first)
    for _ in range(100):
        next(batches)
    state = first.state_dict()
    batches.close()  # its threads stop working ahead
    first.close()
    started = time.perf_counter()
    again = reader()
    again.load_state_dict(state)
    resumed = iter(again)
    next(resumed)
    figures["resume_first_batch_ms"] = round((time.perf_counter() - started) * 1000, 1)
    resumed.close()
    again.close()
    say(f"resume_first_batch_ms   {figures['resume_first_batch_ms']}  (a new reader, the "
        "state loaded, its first batch)")

    figures["reader_ratio_to_mosaic"] = _mosaic(root, files, figures["reader_rows_s"])
    return figures


def _mosaic(root: Path, files: list[str], reader_rows_s: float) -> float | None:
    """MosaicML Streaming in its own environment (``.venv-mosaic``, made by ``make bench``):
    its numpy pin (< 2.2) cannot live beside skyferry's."""
    import json
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    python = Path(__file__).resolve().parent.parent / ".venv-mosaic" / "bin" / "python"
    if not python.exists():
        say("reader_ratio_to_mosaic  n/a (no .venv-mosaic: `make bench` makes it)")
        return None
    rows = root / "rows.parquet"
    pq.write_table(pa.concat_tables(pq.read_table(f) for f in files), rows)
    done = subprocess.run([str(python), str(Path(__file__).with_name("mosaic_read.py")),
                           str(rows), str(root / "mds"), str(BATCH)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " / ".join(done.stderr.strip().splitlines()[-3:])
        say(f"reader_ratio_to_mosaic  n/a (the MosaicML read failed: {tail})")
        return None
    mosaic = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = round(reader_rows_s / mosaic["rows_s"], 3)
    say(f"reader_ratio_to_mosaic  {ratio}  (StreamingDataset {mosaic['rows_s']:,.0f} rows/s "
        f"over {mosaic['rows']:,} rows, xxh64 hashes checked, shuffled; target >= 1)")
    return ratio


if __name__ == "__main__":
    import json

    say(json.dumps(main(), sort_keys=True))
