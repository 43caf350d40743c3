"""Work that flows, on a real ``prefect server`` with two process workers on each of two pools.

The parent starts a ``cloud-share`` child per online worker; the children claim the batch's
units as they go. Checked through the server's REST API (what the UI shows) and on the
nodes' disks: every chunk stored once, one commit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.deployments.test_server import children, stored_once
from tests.helpers import sf_servers
from tests.helpers.sf_data import write_ml_csv
from tests.helpers.sf_prefect import PrefectServer, Process, wait_for

pytestmark = [pytest.mark.server, pytest.mark.integration]

PARENT = "multicloud-pipeline/scheduled-ingest"
POOLS = ("aws-pool", "gcp-pool")  # azure-pool has no worker: its cloud takes no child
SLOW = "tests.helpers.sf_transforms:two_seconds_per_block"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    work = tmp_path_factory.mktemp("prefect-scale-out")
    server = PrefectServer(work, {
        "SKYFERRY_HOME": str(work / "skyferry-home"),
        "SKYFERRY_RETRY_DELAYS": "[0.5, 0.5]",
        "SKYFERRY_CHECKOUT": str(sf_servers.ROOT),
        "SKYFERRY_SOURCE": str(work / "unused-source"),
        "SKYFERRY_DATASET": "unused",
        # one chunk in flight a child: the batch lasts long enough for every child to start
        "SKYFERRY_MAX_IN_FLIGHT": "1",
    })
    try:
        server.start()
        server.cli("python", "deployments/setup_local.py")
        server.cli("prefect", "--no-prompt", "deploy", "--all")
        for pool in POOLS:
            for n in (1, 2):
                start_worker(server, pool, n)
                wait_for(f"{n} online workers in {pool}",
                         lambda p=pool, k=n: server.online_workers(p) >= k, 90)
        yield server
    finally:
        server.stop()


def start_worker(server: PrefectServer, pool: str, n: int) -> Process:
    name = f"worker-{pool}-{n}"
    worker = Process(name, [str(server.env["PATH"].split(":")[0] + "/prefect"), "worker",
                            "start", "--pool", pool, "--type", "process", "--name", name],
                     server.env, server.work / f"{name}.log").start()
    server.processes.append(worker)
    return worker


def start_run(server: PrefectServer, name: str, config: dict[str, Any]) -> tuple[Process, str]:
    """``prefect deployment run PARENT --watch`` in the background; it and its run's id."""
    run = server.spawn(name, "prefect", "deployment", "run", PARENT, "--param",
                       f"config={json.dumps(config)}", "--watch", "--watch-interval", "1")
    match = wait_for("the flow run's id", lambda: re.search(
        r"UUID:\s*([0-9a-f-]{36})", run.output()), 120)
    return run, match.group(1)


def most_in_flight(kids: list[dict[str, Any]]) -> int:
    """The most children that were running at one moment, from their start and end times."""
    edges = []
    for kid in kids:
        if kid["start_time"] and kid["end_time"]:
            edges.append((datetime.fromisoformat(kid["start_time"]), 1))
            edges.append((datetime.fromisoformat(kid["end_time"]), -1))
    running = best = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        best = max(best, running)
    return best


def placement_of(server: PrefectServer, parent: dict[str, Any]) -> str:
    artifacts = server.post("/artifacts/filter", {
        "flow_runs": {"id": {"any_": [parent["id"]]}}, "limit": 50})
    return next(a["data"] for a in artifacts if a["type"] == "markdown")


def test_two_workers_per_pool_run_a_child_each_and_units_flow(server: PrefectServer,
                                                              tmp_path: Path) -> None:
    rows = write_ml_csv(tmp_path / "source" / "train.csv", 120_000, seed=11)
    run, run_id = start_run(server, "flow-run", {
        "source": str(tmp_path / "source"), "dataset": "flowing", "chunk_size": "100KB",
        "transforms": [SLOW]})
    assert run.wait(timeout=600) == 0, run.output()
    parent = server.get(f"/flow_runs/{run_id}")
    assert parent["state_type"] == "COMPLETED", parent["state"]
    kids = children(server, parent)
    assert sorted(k["work_pool_name"] for k in kids) == sorted(2 * POOLS)
    assert all(k["state_type"] == "COMPLETED" for k in kids), [k["state"] for k in kids]
    assert most_in_flight(kids) >= 4, [(k["name"], k["start_time"], k["end_time"])
                                       for k in kids]
    manifest = stored_once(server, "flowing")
    assert manifest.rows_stored + manifest.rows_rejected == rows
    placement = placement_of(server, parent)
    match = re.search(r"4 child runs; utilization (\d\.\d\d) \(aws-pool (\d\.\d\d), "
                      r"gcp-pool (\d\.\d\d)\)", placement)
    assert match, placement
    assert all(0 < float(v) <= 1 for v in match.groups())


def claims_held(home: Path, dataset: str) -> list[dict[str, Any]]:
    """The claims on the board now, newest attempt first (a finished unit's too)."""
    held = []
    for path in sorted(home.glob(f"catalog/pending/{dataset}/batch=*/claims/unit-*.json"),
                       reverse=True):
        try:
            held.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # finished and dropped, or being replaced
            continue
    return [c for c in held if c.get("expires_at", 0) > time.time()]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_worker_killed_holding_claims_loses_them_to_the_others(server: PrefectServer,
                                                                 tmp_path: Path) -> None:
    ttl = 6.0
    home = Path(server.env["SKYFERRY_HOME"])
    rows = write_ml_csv(tmp_path / "source" / "train.csv", 120_000, seed=12)
    run, run_id = start_run(server, "kill-run", {
        "source": str(tmp_path / "source"), "dataset": "killed", "chunk_size": "100KB",
        "transforms": [SLOW], "claim_ttl_s": ttl})
    workers = {p.proc.pid: p for p in server.processes
               if p.name.startswith("worker-") and p.alive and p.proc is not None}
    # the worker that runs the parent is spared: this test kills a child's machine
    parent_pid = wait_for("the parent's process", lambda: server.get(
        f"/flow_runs/{run_id}").get("infrastructure_pid"), 120)
    workers.pop(parent_of(int(str(parent_pid).rsplit(":", 1)[-1])), None)

    def a_holder_on_a_worker() -> tuple[int, int] | None:
        for claim in claims_held(home, "killed"):
            pid = int(claim["pid"])
            try:
                worker = parent_of(pid)
            except (OSError, ValueError):
                continue
            if worker in workers:
                return pid, worker
        return None

    holder, worker = wait_for("a claim held by a child on a worker", a_holder_on_a_worker, 240,
                              every=0.2)
    os.kill(holder, signal.SIGKILL)  # the machine goes: its worker and the child it ran
    workers[worker].kill(signal.SIGKILL)
    killed_at = time.time()
    assert run.wait(timeout=600) == 0, run.output()
    parent = server.get(f"/flow_runs/{run_id}")
    assert parent["state_type"] == "COMPLETED", parent["state"]
    manifest = stored_once(server, "killed")
    assert manifest.rows_stored + manifest.rows_rejected == rows
    kids = children(server, parent)
    logs = server.post("/logs/filter", {"logs": {"flow_run_id": {
        "any_": [k["id"] for k in kids]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
    retaken = [entry for entry in logs
               if re.search(r"claimed unit \d+ .*attempt 2", entry["message"])]
    assert retaken, [entry["message"] for entry in logs]
    first = datetime.fromisoformat(retaken[0]["timestamp"]).timestamp()
    assert first - killed_at <= ttl + 5, (first - killed_at, ttl)
    assert re.search(r"taken again after an expired claim [1-9]", placement_of(server, parent))
    # the killed worker's child never ended by itself: the parent cancelled it
    assert sorted(k["state_type"] for k in kids).count("CANCELLED") >= 1
