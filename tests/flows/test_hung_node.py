"""A node whose server hangs mid-run (SIGSTOP) costs the run seconds, and leaves no thread
and no process behind: its backend calls are cancelled, not abandoned.

Two S3 nodes on the test suite's moto server and three local folders; moto is stopped while
the second chunk is processed, and continued only after the checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.pipeline import run_pipeline
from skyferry.config import PipelineConfig
from tests.helpers import sf_servers
from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.clouds,
              pytest.mark.usefixtures("prefect_harness")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stoppable_s3(clouds: sf_servers.CloudEnv, home: Path, tmp_path: Path) -> Iterator[Path]:
    """A topology with two S3 nodes on moto; moto is continued (SIGCONT) at the end."""
    s3 = clouds.options("s3")
    nodes = []
    for name in ("s3-a", "s3-b"):
        clouds.make_bucket("s3", name)
        nodes.append({"name": name, "cloud": "aws", "region": "r", "url": f"s3://{name}/d",
                      "timeout_s": 2, "storage_options": s3})
    for name, cloud in (("local-aws", "aws"), ("local-gcp", "gcp"), ("local-az", "azure")):
        nodes.append({"name": name, "cloud": cloud, "region": "r",
                      "url": str(home / "nodes" / name)})
    path = tmp_path / "topo.yaml"
    path.write_text(json.dumps({"catalog": str(home / "catalog"), "nodes": nodes}))
    assert clouds.s3.proc is not None
    try:
        yield path
    finally:
        clouds.s3.signal(signal.SIGCONT)


def _replica_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith("skyferry-replica") and t.is_alive()]


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "train.csv"
    write_ml_csv(src, 30_000, seed=8)
    return src


def test_no_replica_writer_outlives_a_run_whose_node_hung(
        clouds: sf_servers.CloudEnv, stoppable_s3: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import sf_faults

    sf_faults.reset()
    assert clouds.s3.proc is not None
    monkeypatch.setenv("SF_SIGNAL_PID", str(clouds.s3.proc.pid))
    monkeypatch.setenv("SF_SIGNAL", "SIGSTOP")
    result = run_pipeline(PipelineConfig(
        source=str(_source(tmp_path)), dataset="hung", topology=str(stoppable_s3),
        chunk_size="200KB", transforms=["tests.helpers.sf_faults:signal_server_on_second_chunk"]))
    assert result.status == "completed", result.error
    assert {"s3-a", "s3-b"} <= set(result.down_nodes)
    assert _replica_threads() == []


def test_the_command_exits_once_the_run_ends(clouds: sf_servers.CloudEnv, stoppable_s3: Path,
                                             tmp_path: Path) -> None:
    assert clouds.s3.proc is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PYTHONPATH=str(ROOT), SF_SIGNAL_PID=str(clouds.s3.proc.pid),
               SF_SIGNAL="SIGSTOP")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "skyferry.cli", "run", str(_source(tmp_path)), "--dataset",
         "hung-cli", "--topology", str(stoppable_s3), "--chunk-size", "200KB", "--json",
         "--transform", "tests.helpers.sf_faults:signal_server_on_second_chunk"],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and {"s3-a", "s3-b"} <= set(result["down_nodes"])
    print(f"skyferry run with a hung node exited after {took:.1f} s")  # noqa: T201
