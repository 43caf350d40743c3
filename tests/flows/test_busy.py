"""Busy is not down: skyferry's own slowness (a heavy transform, a saturated machine) is
never held against a node. Each run must commit with no node marked down and three verified
replicas of every chunk, each of which reads back to the chunk's digest."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Manifest
from skyferry.config import PipelineConfig
from tests.helpers.sf_data import replica_digest, write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _all_replicas_good(home: Path, manifest: Manifest) -> None:
    for chunk in manifest.chunks:
        assert len(chunk.verified) == 3, chunk
        for replica in chunk.verified:
            assert replica_digest(home, replica.node, chunk.key) == chunk.digest


def test_a_transform_slower_than_the_nodes_timeout_marks_no_node_down(
        home: Path, tmp_path: Path, committed: Callable[[str], list[Manifest]]) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 2000, seed=5)
    write_ml_csv(src / "b.csv", 2000, seed=6, start_id=2000)
    result = run_pipeline(PipelineConfig(
        source=str(src), dataset="slow",
        transforms=["tests.helpers.sf_transforms:sleep_per_block"]))
    assert result.status == "completed", result.error
    assert result.down_nodes == [] and result.node_failures_handled == 0
    (manifest,) = committed("slow")
    assert sum(c.rows_out for c in manifest.chunks) == 4000
    _all_replicas_good(home, manifest)


@pytest.fixture
def cpu_hog() -> Iterator[list[int]]:
    """Both cores saturated by other processes for the test's length; stopped by PID."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    try:
        yield [p.pid for p in hogs]
    finally:
        for proc in hogs:
            proc.kill()
            proc.wait()


def _wide_csv(path: Path, rows: int, columns: int, *, seed: int) -> None:
    """A CSV of ``columns`` float features: slow to parse, so a loaded machine takes seconds
    a block."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = rng.normal(size=(rows, columns)).round(5)
    header = ",".join(f"c{i}" for i in range(columns))
    np.savetxt(path, values, delimiter=",", fmt="%.5f", header=header, comments="")


def test_a_run_on_a_saturated_machine_marks_no_node_down(
        home: Path, tmp_path: Path, cpu_hog: list[int],
        committed: Callable[[str], list[Manifest]]) -> None:
    src = tmp_path / "src"
    for i in range(2):
        _wide_csv(src / f"part-{i}.csv", 1000, 2000, seed=i)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="hogged"))
    assert all(Path(f"/proc/{pid}").exists() for pid in cpu_hog)  # still hogging at the end
    assert result.status == "completed", result.error
    assert result.down_nodes == [] and result.node_failures_handled == 0
    (manifest,) = committed("hogged")
    assert sum(c.rows_out for c in manifest.chunks) == 2000
    _all_replicas_good(home, manifest)
