"""kill -9 in the middle of a run, then a re-run: same manifest and bytes as a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog, Manifest
from skyferry.config import PipelineConfig, get_settings
from skyferry.topology import load_topology
from tests.helpers.sf_data import replica_digest, write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

ROOT = Path(__file__).resolve().parents[2]


def _manifests() -> list[Manifest]:
    return Catalog(load_topology().catalog_store()).manifests("crash")


def _comparable(m: Manifest) -> dict[str, object]:
    return m.model_dump(exclude={"created_at", "partition_date"}, mode="json")


def test_kill_9_then_rerun_matches_a_clean_run(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 12_000, seed=11)
    config = PipelineConfig(source=str(src), dataset="crash", chunk_size="40KB",
                            transforms=["tests.helpers.sf_faults:block_on_sixth_chunk"])

    # 1. the clean run, in its own data directory
    clean_home = tmp_path / "clean"
    monkeypatch.setenv("SKYFERRY_HOME", str(clean_home))
    get_settings.cache_clear()
    clean = run_pipeline(config)
    assert clean.status == "completed" and clean.chunks_processed >= 8
    (clean_manifest,) = _manifests()

    # 2. a run in a child process, killed with SIGKILL while chunk 6 is being processed
    crash_home = tmp_path / "crash"
    marker = tmp_path / "blocked"
    log = tmp_path / "child.log"
    env = dict(os.environ, SKYFERRY_HOME=str(crash_home), SF_BLOCK_MARKER=str(marker),
               SKYFERRY_MAX_IN_FLIGHT="2", PREFECT_API_URL="")
    env.pop("PREFECT_API_URL")
    child = subprocess.Popen([sys.executable, "-m", "tests.helpers.sf_run",
                              config.model_dump_json()], env=env, start_new_session=True, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=log.open("wb"))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert child.poll() is None, ("the child run ended before it reached chunk 6:\n"
                                      + log.read_text(errors="replace")[-3000:])
        assert time.monotonic() < deadline, "the child never reached chunk 6"
        try:
            child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    # chunks 0-3 were stored before chunk 6 began (2 in flight); the flow journals each one
    # when it collects it, which can come after the next chunk took its slot
    pending = crash_home / "catalog" / "pending"
    while len(list(pending.rglob("chunk-*.json"))) < 4:
        assert child.poll() is None and time.monotonic() < deadline, "chunks 0-3 never journaled"
        try:
            child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    monkeypatch.setenv("SKYFERRY_HOME", str(crash_home))
    get_settings.cache_clear()
    assert _manifests() == []  # nothing visible after the crash
    journal = list(pending.rglob("chunk-*.json"))
    assert len(journal) >= 4

    # 3. the re-run resumes: it skips the journaled chunks and commits
    rerun = run_pipeline(config)
    assert rerun.status == "completed", rerun.error
    assert rerun.batch_id == clean.batch_id
    assert rerun.chunks_skipped == len(journal)
    assert rerun.chunks_skipped + rerun.chunks_processed == clean.chunks_processed
    (crash_manifest,) = _manifests()
    assert _comparable(crash_manifest) == _comparable(clean_manifest)
    for chunk in crash_manifest.chunks:
        for replica in chunk.verified:
            assert replica_digest(crash_home, replica.node, chunk.key) == chunk.digest
            assert replica_digest(clean_home, replica.node, chunk.key) == chunk.digest
    assert not list((crash_home / "catalog" / "pending").rglob("*.json"))
