"""Snapshot figures for ``make bench`` (or run alone): a long log, read as users read it.

BENCH_SNAPSHOTS (default 10,000) batches of one small CSV file each are committed to one
dataset through the code a run uses, without Prefect (tests/helpers/sf_data.py), so the log
holds as many snapshots. Then, each from BENCH_PAIRS (5) runs:
- ``log_ms``: ``skyferry log`` in process (the newest 20 snapshots: the listing, their
  entries and their parents');
- ``reader_open_ms``: making a ``TrainingReader`` on a tagged snapshot near the end and
  planning its epoch: the snapshot resolved and pinned, its batches' manifests read from
  their packs and checked against it, the plan made, the pin released;
- ``reader_open_cold_ms``: the same just after every manifest pack went stale (a repair's
  rewrite does that): the manifests read one by one, and the packs made again;
- ``gc_dry_run_s``: ``skyferry gc --dry-run``: the whole log weighed against a policy that
  keeps the last 100 snapshots.
The CLI's own start (Python, its imports) is timed apart, as ``log_cli_ms``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import Side, skyferry_home  # noqa: E402

PAIRS = int(os.environ.get("BENCH_PAIRS", "5"))


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> dict[str, Any]:
    root = Path(os.environ.get("BENCH_SNAPSHOT_DIR") or
                tempfile.mkdtemp(prefix="skyferry-snapshot-bench-"))
    try:
        with skyferry_home(root / "home"):
            return _figures(root)
    finally:
        if not os.environ.get("BENCH_SNAPSHOT_DIR"):
            shutil.rmtree(root, ignore_errors=True)


def _commit_history(root: Path, count: int) -> list[float]:
    """``count`` one-file batches of dataset ``snap``, committed one after another (a
    history already there is kept: BENCH_SNAPSHOT_DIR reuses it)."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.commit.snapshots import SnapshotLog
    from skyferry.topology import load_topology
    from tests.helpers.sf_data import commit_without_prefect

    have = len(SnapshotLog(open_catalog(load_topology()), "snap").sequence())
    took = []
    for i in range(have, count):
        folder = root / "src" / f"b{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "part.csv").write_text(f"id,x\n{i},{i % 7}\n{i + count},{i % 5}\n")
        began = time.perf_counter()
        commit_without_prefect(folder, "snap")
        took.append(time.perf_counter() - began)
        shutil.rmtree(folder)
        if i % 1000 == 999:
            say(f"  {i + 1:,} batches committed")
    return took


def _figures(root: Path) -> dict[str, Any]:
    from skyferry.commit.manifest import open_catalog
    from skyferry.commit.retention import Retention, RetentionPolicy
    from skyferry.commit.snapshots import SnapshotLog
    from skyferry.ops.gc import collect_garbage
    from skyferry.ops.history import dataset_log
    from skyferry.read.reader import ReaderConfig, TrainingReader
    from skyferry.topology import load_topology

    count = int(os.environ.get("BENCH_SNAPSHOTS", "10000"))
    began = time.perf_counter()
    commits = _commit_history(root, count)
    committed_s = time.perf_counter() - began
    topology = load_topology()
    log = SnapshotLog(open_catalog(topology), "snap")
    if "near-end" not in log.tags():
        log.tag("near-end", str(count - 10))
    Retention(log).set_policy(RetentionPolicy(keep_last=100))

    def open_reader() -> None:
        reader = TrainingReader(ReaderConfig(dataset="snap", snapshot="near-end",
                                             cache_dir=root / "cache"))
        assert reader.plan.rows == 2 * (count - 9)
        reader.close()

    def cli_log() -> None:
        subprocess.run([sys.executable, "-m", "skyferry.cli", "log", "snap"], check=True,
                       stdout=subprocess.DEVNULL)

    def cli_start() -> None:
        subprocess.run([sys.executable, "-m", "skyferry.cli", "--help"], check=True,
                       stdout=subprocess.DEVNULL)

    def stale_packs() -> None:
        catalog = open_catalog(topology)
        with catalog.rewriting("snap"):  # as a rewrite of a manifest does
            pass

    names = ("log", "open", "open cold", "gc", "cli log", "cli start")
    sides = {name: Side(name) for name in names}
    for _ in range(PAIRS):
        sides["log"].run(lambda: dataset_log(topology, "snap"))
        stale_packs()
        sides["open cold"].run(open_reader)
        sides["open"].run(open_reader)
        sides["gc"].run(lambda: collect_garbage(topology, grace_s=86_400, dry_run=True))
        sides["cli log"].run(cli_log)
        sides["cli start"].run(cli_start)
    figures: dict[str, Any] = {
        "snapshots": count,
        "log_ms": round(sides["log"].median * 1000, 1),
        "reader_open_ms": round(sides["open"].median * 1000, 1),
        "reader_open_cold_ms": round(sides["open cold"].median * 1000, 1),
        "gc_dry_run_s": round(sides["gc"].median, 2),
        "log_cli_ms": round(sides["cli log"].median * 1000),
        "cli_start_ms": round(sides["cli start"].median * 1000),
    }
    if commits:
        window = max(1, min(50, len(commits) // 4))
        figures["commit_s_first"] = round(sorted(commits[:window])[window // 2], 3)
        figures["commit_s_last"] = round(sorted(commits[-window:])[window // 2], 3)
        figures["history_committed_s"] = round(committed_s)
    figures["sides"] = {f"snapshot_{k}": {"this": s.summary()} for k, s in sides.items()}
    for name, side in sides.items():
        say(f"{name}: {side.min * 1000:.1f}/{side.median * 1000:.1f}/{side.max * 1000:.1f} ms")
    return figures


if __name__ == "__main__":
    found = main()
    found.pop("sides")
    say(str(found))
