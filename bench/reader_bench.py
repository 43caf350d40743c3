"""The training reader's figures for ``make bench`` (or run alone).

A CSV dataset of BENCH_READER_ROWS rows (default 1,000,000) is committed in 8 MB chunks
without Prefect, then read in batches of 1,024, each figure from BENCH_PAIRS (5)
counterbalanced pairs (bench/measure.py):
- ``reader_throughput_ratio_to_pyarrow``: the reader on its cached Parquet files
  (``decoded=False``: shuffled, each chunk hashed when opened) against ``pyarrow.dataset``
  reading the same Parquet files in order;
- ``reader_throughput_ratio_to_pyarrow_shuffled``: the same, pyarrow also taking the rows in
  the reader's shuffled blocks (what the shuffle costs);
- ``reader_decoded_throughput_ratio_to_ipc``: the reader on its decoded Arrow copies against
  ``pyarrow.dataset(format="ipc")`` plus ``take`` in a shuffled order on the same files;
- ``reader_throughput_ratio_to_mosaic``: one epoch through a torch ``DataLoader`` (2 workers,
  tensors) from a cold cache, every hash checked, against MosaicML Streaming doing the same
  from a remote folder, in its own environment (``.venv-mosaic``, which ``make bench`` makes);
- ``resume_first_batch_ms``: from making a reader and loading a state to its first batch;
- ``reader_pin_throughput_ratio``: a decoded epoch with the reader's snapshot pinned (the pin
  written at open and renewed every 0.1 s) over the same epoch without a pin, over
  BENCH_PIN_PAIRS (41) pairs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import Side, abba, skyferry_home  # noqa: E402

BATCH = 1024
PAIRS = int(os.environ.get("BENCH_PAIRS", "5"))
# an epoch is ~0.07 s, and runs of the same epoch differ by up to 8%: the pin's figure
# takes more pairs, so that its median is the pin's cost and not one outlier's
PIN_PAIRS = int(os.environ.get("BENCH_PIN_PAIRS", "41"))


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="skyferry-reader-bench-"))
    try:
        with skyferry_home(root / "home"):
            return _figures(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _figures(root: Path) -> dict[str, Any]:
    import pyarrow.dataset as ds

    from skyferry.read.plan import BLOCK_ROWS
    from skyferry.read.reader import ReaderConfig, TrainingReader, chunk_files
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

    def parquet_peer() -> None:
        for batch in ds.dataset(files, format="parquet").to_batches(batch_size=BATCH):
            del batch

    def read_all(**options: Any) -> Callable[[], None]:
        def go() -> None:
            for batch in reader(**options):
                del batch
        return go

    # the first epoch makes the decoded copies (the Parquet files are cached already)
    read_all()()
    arrow = sorted(cache.glob("*.arrow"))
    decoded = sum(p.stat().st_size for p in arrow)
    parquet = sum(p.stat().st_size for p in cache.glob("*.chunk"))
    figures["decoded_cache_size_ratio"] = round(decoded / parquet, 2)

    def shuffled(paths: list[Any], fmt: str) -> Callable[[], None]:
        """pyarrow over the same files, shuffled as the reader shuffles: the files in a
        shuffled order, each file's rows in blocks of BLOCK_ROWS taken in a shuffled order
        (``take``), then cut into batches."""
        def go() -> None:
            rng = np.random.default_rng(1)
            for i in rng.permutation(len(paths)):
                table = ds.dataset(str(paths[i]), format=fmt).to_table()
                for at in range(0, table.num_rows, BLOCK_ROWS):
                    block = table.slice(at, BLOCK_ROWS)
                    taken = block.take(rng.permutation(block.num_rows))
                    for cut in range(0, taken.num_rows, BATCH):
                        taken.slice(cut, BATCH)
        return go

    for name, peer, options, what in (
            ("reader_throughput_ratio_to_pyarrow", parquet_peer, {"decoded": False},
             "the reader on its cached Parquet files (decoded=False), shuffled, each chunk "
             "hashed when opened, over pyarrow.dataset reading the same files in order"),
            ("reader_throughput_ratio_to_pyarrow_shuffled", shuffled(files, "parquet"),
             {"decoded": False}, "the same, pyarrow taking the rows in the reader's shuffled "
             "blocks of 4,096 as well: the shuffle's share of the figure above"),
            ("reader_decoded_throughput_ratio_to_ipc", shuffled(arrow, "ipc"), {},
             "the reader on its decoded Arrow copies over pyarrow.dataset(format='ipc') "
             "plus take in blocks of 4,096 rows, shuffled as the reader shuffles, on the same "
             "files")):
        peer_side, sky_side = abba(("pyarrow", peer), ("reader", read_all(**options)), PAIRS)
        value = round(peer_side.median / sky_side.median, 3)  # rows/s: the same rows each
        figures[name] = value
        figures.setdefault("sides", {})[name] = {"reader": sky_side.summary(),
                                                 "pyarrow": peer_side.summary()}
        target = "; target >= 0.9" if name == "reader_throughput_ratio_to_pyarrow" else ""
        say(f"{name:<38} {value}  ({what}; {rows:,} rows in {len(manifest.chunks)} chunks"
            f"{target})")
        say(f"    {sky_side.line()}")
        say(f"    {peer_side.line()}")
    figures["reader_rows_s"] = round(rows / sky_side.median)

    # a pin renewed every 0.1 s (a third of its 0.3 s life) against none
    bare, pinned = abba(("no pin", read_all(pin_ttl_s=None)),
                        ("pin", read_all(pin_ttl_s=0.3)), PIN_PAIRS)
    figures["reader_pin_throughput_ratio"] = round(bare.median / pinned.median, 3)
    figures["sides"]["reader_pin_throughput_ratio"] = {"pin": pinned.summary(),
                                                       "no pin": bare.summary()}
    say(f"reader_pin_throughput_ratio {figures['reader_pin_throughput_ratio']}  (a decoded "
        "epoch with the snapshot pinned, the pin written at open to the catalog and "
        "renewed every 0.1 s, over the same epoch without a pin; target >= 0.98)")
    say(f"    {pinned.line()}")
    say(f"    {bare.line()}")

    # the first batch after a resume
    first = reader()
    batches = iter(first)
    for _ in range(min(100, rows // BATCH // 2)):  # into the epoch
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

    figures["reader_throughput_ratio_to_mosaic"] = _mosaic(root, files, figures)
    return figures


def _mosaic(root: Path, files: list[str], figures: dict[str, Any]) -> float | None:
    """skyferry's PyTorch front end against MosaicML Streaming, both through a torch
    DataLoader (batches of 1,024 as tensors, 2 workers), each from its remote copy into a cold
    cache with every hash checked; in counterbalanced pairs, each side in a process of its
    own. MosaicML runs in its own environment (``.venv-mosaic``, made by ``make bench``): its
    numpy pin (< 2.2) cannot live beside skyferry's."""
    import json
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    here = Path(__file__).resolve().parent
    python = here.parent / ".venv-mosaic" / "bin" / "python"
    if not python.exists():
        say("reader_throughput_ratio_to_mosaic n/a (no .venv-mosaic: `make bench` makes it)")
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        say("reader_throughput_ratio_to_mosaic n/a (torch is not installed: `make bench` "
            "installs it)")
        return None
    rows = root / "rows.parquet"
    pq.write_table(pa.concat_tables(pq.read_table(f) for f in files), rows)
    mds = root / "mds"
    subprocess.run([str(python), str(here / "mosaic_read.py"), "write", str(rows), str(mds)],
                   check=True, capture_output=True)
    runs = iter(range(1_000))
    seconds: dict[str, list[float]] = {"mosaic": [], "reader": []}

    def side(name: str, args: list[str]) -> Callable[[], None]:
        def go() -> None:
            cache = root / f"cold-{next(runs)}"
            done = subprocess.run([*args, str(cache), str(BATCH)], capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(" / ".join(done.stderr.strip().splitlines()[-3:]))
            seconds[name].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
            shutil.rmtree(cache, ignore_errors=True)
        return go

    try:
        abba(("mosaic", side("mosaic", [str(python), str(here / "mosaic_read.py"), "read",
                                        str(mds)])),
             ("reader", side("reader", [sys.executable, str(here / "reader_loader.py"),
                                        "train"])), PAIRS)
    except RuntimeError as exc:
        say(f"reader_throughput_ratio_to_mosaic n/a (a read failed: {exc})")
        return None
    mosaic, reader = Side("MosaicML Streaming", seconds["mosaic"]), Side(
        "skyferry reader", seconds["reader"])
    value = round(mosaic.median / reader.median, 3)
    figures.setdefault("sides", {})["reader_throughput_ratio_to_mosaic"] = {
        "reader": reader.summary(), "mosaic": mosaic.summary()}
    say(f"reader_throughput_ratio_to_mosaic {value}  (one epoch through a torch DataLoader, "
        "2 workers, batches of 1,024 as tensors, cold caches, every hash checked; the "
        "epoch's own seconds, not the interpreters' start)")
    say(f"    {reader.line()}")
    say(f"    {mosaic.line()}")
    return value


if __name__ == "__main__":
    import json

    say(json.dumps(main(), sort_keys=True))
