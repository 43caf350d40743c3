"""The Ray task runner: chunk tasks on a Ray cluster started as processes, a worker killed."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from tests.helpers.sf_clusters import run_with_a_worker_killed
from tests.helpers.sf_prefect import BIN, Process, wait_for
from tests.helpers.sf_servers import ROOT, free_port

pytestmark = [pytest.mark.ray, pytest.mark.integration,
              pytest.mark.usefixtures("prefect_harness")]


def listening(port: int) -> bool:
    """Whether the head's GCS accepts connections (before that, ray.init waits minutes)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def test_a_batch_commits_once_on_a_ray_cluster_whose_worker_is_killed(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray start --head` and a second `ray start` node, as an operator starts them; the
    worker process running a chunk task dies in the middle of a chunk, and Ray runs the task
    again."""
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "SKYFERRY_HOME": str(home), "SF_KILL_MARKER": str(tmp_path / "killed"),
           "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    import ray

    common = ["--num-cpus", "1", "--block", "--disable-usage-stats",
              "--node-ip-address", "127.0.0.1"]
    # its sockets live under --temp-dir, whose paths must fit AF_UNIX's 107 bytes
    temp = tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp")
    procs = [Process("ray-head", [str(BIN / "ray"), "start", "--head", "--port", str(port),
                                  "--include-dashboard", "false", "--temp-dir", temp,
                                  *common], env, tmp_path / "head.log").start()]
    try:
        wait_for("the Ray head's GCS", lambda: listening(port) or not procs[0].alive, 120)
        assert procs[0].alive, procs[0].output()[-3000:]
        procs.append(Process("ray-worker", [str(BIN / "ray"), "start", "--address", address,
                                            *common], env, tmp_path / "worker.log").start())
        ray.init(address=address, logging_level="ERROR")
        try:
            wait_for("a second Ray node", lambda: alive_nodes() >= 2, 120, every=1)
        finally:
            ray.shutdown()
        run_with_a_worker_killed(home, tmp_path, monkeypatch, "ray", address, "ray-killed",
                                 seed=14)
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(temp, ignore_errors=True)
