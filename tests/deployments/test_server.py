"""The operator's path on a real ``prefect server``: pools, ``deploy --all``, workers, runs.

One server and one process worker per cloud pool for the module. Each case triggers the
scheduled-ingest deployment with ``prefect deployment run ... --watch``, as an operator would,
and checks what happened through the server's REST API (what the UI shows).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import blake3
import pytest

from skyferry.commit.manifest import Catalog
from skyferry.storage import Store
from tests.helpers import sf_servers
from tests.helpers.sf_data import write_ml_csv
from tests.helpers.sf_prefect import BIN, ROOT, PrefectServer, wait_for
from tests.helpers.sf_proxy import RefusingProxy, chunk_upload, refusing_topology

pytestmark = [pytest.mark.server, pytest.mark.integration]

POOLS = {"aws": "aws-pool", "gcp": "gcp-pool", "azure": "azure-pool"}
PARENT = "multicloud-pipeline/scheduled-ingest"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    work = tmp_path_factory.mktemp("prefect-server")
    home = work / "skyferry-home"
    source = work / "scheduled-source"
    source.mkdir()
    write_ml_csv(source / "part-0.csv", 500, seed=1)
    server = PrefectServer(work, {
        "SKYFERRY_HOME": str(home),
        "SKYFERRY_RETRY_DELAYS": "[0.5, 0.5]",
        "SKYFERRY_CHECKOUT": str(sf_servers.ROOT),
        "SKYFERRY_SOURCE": str(source),
        "SKYFERRY_DATASET": "scheduled",
    })
    try:
        server.start()
        server.cli("python", "deployments/setup_local.py")
        server.cli("prefect", "--no-prompt", "deploy", "--all")
        # One at a time: each worker writes its pool's job template as it starts, and three
        # at once can hold the server's SQLite lock past a client's timeout.
        for pool in POOLS.values():
            server.start_worker(pool)
            wait_for(f"an online worker in {pool}", lambda p=pool: server.online_workers(p), 90)
        yield server
    finally:
        server.stop()


def run_deployment(server: PrefectServer, config: dict[str, Any]) -> dict[str, Any]:
    """``prefect deployment run PARENT --param config=... --watch``; the parent's flow run."""
    done = server.cli("prefect", "deployment", "run", PARENT, "--param",
                      f"config={json.dumps(config)}", "--watch", "--watch-interval", "1",
                      timeout=600)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
    assert match, done.stdout
    return dict(server.get(f"/flow_runs/{match.group(1)}"))


def children(server: PrefectServer, parent: dict[str, Any]) -> list[dict[str, Any]]:
    task_runs = server.post("/task_runs/filter", {
        "flow_runs": {"id": {"any_": [parent["id"]]}}, "limit": 200})
    ids = [t["id"] for t in task_runs]
    if not ids:
        return []
    return list(server.post("/flow_runs/filter", {
        "flow_runs": {"parent_task_run_id": {"any_": ids}}, "limit": 200}))


def source_dir(tmp_path: Path, rows: int, seed: int) -> tuple[Path, int]:
    source = tmp_path / "source"
    source.mkdir()
    return source, write_ml_csv(source / "train.csv", rows, seed=seed)


def manifest_of(server: PrefectServer, dataset: str) -> Any:
    catalog = Catalog(Store(server.env["SKYFERRY_HOME"] + "/catalog", name="catalog"))
    return catalog.manifest(dataset)


def stored_once(server: PrefectServer, dataset: str) -> Any:
    """The dataset's manifest, after checking that the nodes hold each of its chunks on
    exactly its verified replicas and nothing else: no chunk stored twice or left over."""
    manifest = manifest_of(server, dataset)
    nodes = Path(server.env["SKYFERRY_HOME"]) / "nodes"
    on_disk = sorted((str(p.relative_to(nodes)).split("/", 1)[0],
                      str(p.relative_to(nodes)).split("/", 1)[1])
                     for p in nodes.glob(f"*/{dataset}/**/chunk-*") if p.is_file())
    expected = sorted((r.node, c.key) for c in manifest.chunks for r in c.verified)
    assert on_disk == expected
    assert len({c.index for c in manifest.chunks}) == len(manifest.chunks)
    return manifest


def test_a_deployment_run_fans_out_to_every_clouds_pool(server: PrefectServer,
                                                       tmp_path: Path) -> None:
    source, rows = source_dir(tmp_path, 6_000, seed=2)
    # two seconds a block: the first child to start cannot take every unit before the others
    config = {"source": str(source), "dataset": "fanout", "chunk_size": "48KB",
              "transforms": ["tests.helpers.sf_transforms:two_seconds_per_block"]}
    # the operator's two terminals: the run, watched; and `skyferry status` on it
    run = server.spawn("fanout-run", "prefect", "deployment", "run", PARENT, "--param",
                       f"config={json.dumps(config)}", "--watch", "--watch-interval", "1")
    run_id = wait_for("the flow run's id", lambda: re.search(
        r"UUID:\s*([0-9a-f-]{36})", run.output()), 120).group(1)
    status = server.spawn("fanout-status", "skyferry", "status", run_id, "--interval", "0.5")
    assert run.wait(timeout=600) == 0, run.output()
    assert status.wait(timeout=120) == 0, status.output()
    parent = server.get(f"/flow_runs/{run_id}")
    assert parent["state_type"] == "COMPLETED", parent["state"]
    lines = status.output().splitlines()
    # while it ran: the children were working on their shares (one line per change)
    assert any(re.search(r" Running · distribution · (\d+)% ", x) and
               not re.search(r" 100% ", x) for x in lines), lines
    screen = status.output()
    assert "Completed" in screen and "100%" in screen and "cloud shares" in screen
    assert parent["work_pool_name"] == "aws-pool"
    kids = children(server, parent)
    assert {k["parameters"]["cloud"] for k in kids} == set(POOLS)
    for kid in kids:
        assert kid["state_type"] == "COMPLETED", (kid["name"], kid["state"])
        assert kid["work_pool_name"] == POOLS[kid["parameters"]["cloud"]]
    # the children claimed the chunks as they went: each is stored once, all are committed
    assert all(k["parameters"]["chunks"] is None for k in kids)
    manifest = stored_once(server, "fanout")
    assert manifest.rows_stored + manifest.rows_rejected == rows
    # the operator's artifacts are on the parent's run
    artifacts = server.post("/artifacts/filter", {
        "flow_runs": {"id": {"any_": [parent["id"]]}}, "limit": 50})
    by_type = {a["type"]: a for a in artifacts}
    assert by_type["progress"]["data"] == 100.0
    assert by_type["progress"]["metadata_"]["chunks_done"] == str(len(manifest.chunks))
    assert by_type["table"]["key"] == "fanout-stage-breakdown"
    assert by_type["markdown"]["key"] == "fanout-placement"
    table = by_type["table"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["stage"] for row in table} >= {"ingestion", "processing", "distribution"}
    # the hourly schedule produced scheduled runs of the ingestion deployment
    deployment = server.get("/deployments/name/" + PARENT)
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 * * * *"
    scheduled = wait_for("scheduled runs of the hourly schedule", lambda: server.post(
        "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}},
                              "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}), 60)
    assert all(r["parameters"]["config"]["dataset"] == "scheduled" for r in scheduled)


def creates_a_run_of_a_deployment(method: str, path: str) -> bool:
    return method == "POST" and path.split("?")[0].endswith("/create_flow_run")


RUN_PARENT = """
import sys
from flows.pipeline import multicloud_pipeline
from skyferry.config import PipelineConfig
result = multicloud_pipeline(PipelineConfig.model_validate_json(sys.argv[1]))
print("flow run", result.flow_run_id, result.status)
"""


def test_a_lost_reply_to_a_childs_creation_makes_no_second_child(server: PrefectServer,
                                                                 tmp_path: Path) -> None:
    """The server made the child run, but its reply was lost: the client's retry of the same
    create must get that run back, not make a second child with the same share."""
    source, rows = source_dir(tmp_path, 6_000, seed=5)
    config = {"source": str(source), "dataset": "lost-reply", "chunk_size": "48KB",
              "dispatch": "deployments"}
    with RefusingProxy(server.api, creates_a_run_of_a_deployment, times=1,
                       fault="lose-reply") as proxy:
        done = subprocess.run(
            [sys.executable, "-c", RUN_PARENT, json.dumps(config)], cwd=ROOT, timeout=600,
            env={**server.env, "PREFECT_API_URL": proxy.endpoint + "/api"},
            capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(proxy.refused) == 1, proxy.refused  # one reply was lost
    match = re.search(r"flow run ([0-9a-f-]{36}) completed", done.stdout)
    assert match, done.stdout
    parent = server.get(f"/flow_runs/{match.group(1)}")
    kids = children(server, parent)
    assert sorted(k["parameters"]["cloud"] for k in kids) == sorted(POOLS), [
        k["name"] for k in kids]
    assert all(k["state_type"] == "COMPLETED" for k in kids)
    manifest = stored_once(server, "lost-reply")
    assert manifest.rows_stored + manifest.rows_rejected == rows


def test_a_cancelled_child_that_is_started_again_moves_nothing(server: PrefectServer,
                                                              tmp_path: Path) -> None:
    """The parent cancels a child no worker took in time and hands its chunks to another pool.
    The design relies on Prefect never running that child afterwards: a worker's Pending is
    refused for a cancelled run, and the run's executor skips it (checked here)."""
    source, _ = source_dir(tmp_path, 600, seed=6)
    share = server.get("/deployments/name/cloud-share/gcp-share")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # no worker fetches it first
    child = server.post(f"/deployments/{share['id']}/create_flow_run", {
        "parameters": {"config": {"source": str(source), "dataset": "late-child"},
                       "batch_id": "0123456789abcdef", "cloud": "gcp", "chunks": [0],
                       "pool": "gcp-pool"},
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}})
    reason = "no worker of gcp-pool picked it up in 120s"
    server.post(f"/flow_runs/{child['id']}/set_state", {"force": True, "state": {
        "type": "CANCELLED", "message": reason}})
    # a worker that fetched it before the cancel proposes Pending: refused
    pending = server.post(f"/flow_runs/{child['id']}/set_state", {"state": {"type": "PENDING"}})
    assert pending["status"] == "ABORT", pending
    # and started by hand, the run is skipped
    done = subprocess.run([str(BIN / "prefect"), "flow-run", "execute", child["id"]],
                          env=server.env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    run = server.get(f"/flow_runs/{child['id']}")
    assert run["state_type"] == "CANCELLED" and run["state"]["message"] == reason, (
        run["state"], done.stdout[-2000:], done.stderr[-2000:])
    catalog = Catalog(Store(server.env["SKYFERRY_HOME"] + "/catalog", name="catalog"))
    assert not list(catalog.store.list("pending/late-child"))  # no chunk, no share report


def test_a_refused_write_shows_as_a_retried_task_run(server: PrefectServer, tmp_path: Path,
                                                    clouds: sf_servers.CloudEnv) -> None:
    clouds.make_bucket("s3", "refusing")
    source, rows = source_dir(tmp_path, 3_000, seed=3)
    home = Path(server.env["SKYFERRY_HOME"])
    with RefusingProxy(clouds.s3.endpoint, chunk_upload, times=1) as proxy:
        topology = refusing_topology(tmp_path / "refusing.yaml", home, proxy.endpoint)
        parent = run_deployment(server, {
            "source": str(source), "dataset": "retried", "chunk_size": "64KB",
            "topology": str(topology), "replicas": 3, "quorum": 3})
    assert parent["state_type"] == "COMPLETED", parent["state"]
    assert len(proxy.refused) == 1
    kids = children(server, parent)
    assert kids and all(k["state_type"] == "COMPLETED" for k in kids)
    writes = server.post("/task_runs/filter", {
        "flow_runs": {"id": {"any_": [k["id"] for k in kids]}},
        "task_runs": {"name": {"like_": "move-chunk"}}, "limit": 200})
    # the refused write, and any other chunk whose write to that node was in flight when
    # the refusal marked it down (3 nodes, quorum 3: it has nowhere else to go), retried
    retried = [t for t in writes if t["run_count"] > 1]
    assert retried and all(t["state_type"] == "COMPLETED" for t in retried)
    assert all(t["state_type"] == "COMPLETED" for t in writes)
    manifest = manifest_of(server, "retried")
    assert manifest.rows_stored + manifest.rows_rejected == rows
    assert all(len(c.verified) == 3 for c in manifest.chunks)


def test_a_pool_whose_worker_died_gets_its_share_reassigned(server: PrefectServer,
                                                           tmp_path: Path) -> None:
    source, rows = source_dir(tmp_path, 6_000, seed=4)
    server.workers["gcp-pool"].kill(signal.SIGKILL)
    try:
        parent = run_deployment(server, {"source": str(source), "dataset": "reassigned",
                                         "chunk_size": "48KB", "child_start_timeout_s": 15})
    finally:
        server.start_worker("gcp-pool")
    assert parent["state_type"] == "COMPLETED", parent["state"]
    kids = children(server, parent)
    completed = [k for k in kids if k["state_type"] == "COMPLETED"]
    assert completed and all(k["work_pool_name"] in ("aws-pool", "azure-pool")
                             for k in completed)
    # a gcp child, if one was dispatched before the worker was seen offline, was cancelled
    assert all(k["state_type"] == "CANCELLED" for k in kids if k["work_pool_name"] == "gcp-pool")
    logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [parent["id"]]}},
                                        "limit": 200})
    text = "\n".join(entry["message"] for entry in logs)
    assert re.search(r"gcp: pool gcp-pool is out|gcp child run .* was not picked up", text), text
    manifest = stored_once(server, "reassigned")
    assert manifest.rows_stored + manifest.rows_rejected == rows


EMIT_RECOVERED = """
import sys
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
node, dataset = sys.argv[1], sys.argv[2]
emit_event(event="skyferry.node.recovered",
           resource={"prefect.resource.id": f"skyferry.node.{node}",
                     "prefect.resource.name": node},
           payload={"state": "healthy", "reason": "answered every probe for 5 s",
                    "dataset": dataset})
EventsWorker.drain_all()
"""


def test_a_recovered_node_starts_verify_and_repair(server: PrefectServer,
                                                   tmp_path: Path) -> None:
    """prefect.yaml's automation: a run's skyferry.node.recovered event starts the
    node-recovered-repair deployment, whose run brings the node's batches back to R."""
    source, _ = source_dir(tmp_path, 3_000, seed=6)
    parent = run_deployment(server, {"source": str(source), "dataset": "healed",
                                     "chunk_size": "48KB"})
    assert parent["state_type"] == "COMPLETED", parent["state"]
    manifest = manifest_of(server, "healed")
    home = Path(server.env["SKYFERRY_HOME"])
    chunk = manifest.chunks[0]
    node = chunk.verified[0].node
    (home / "nodes" / node / chunk.key).unlink()  # what the node lost while it was away
    server.cli("python", "-c", EMIT_RECOVERED, node, "healed")
    deployment = server.get("/deployments/name/verify-and-repair/node-recovered-repair")

    def finished() -> list[dict[str, Any]]:
        runs = server.post("/flow_runs/filter", {
            "deployments": {"id": {"any_": [deployment["id"]]}}, "limit": 50})
        return [r for r in runs if r["parameters"].get("dataset") == "healed"
                and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]

    (run,) = wait_for("a repair run started by the automation", finished, 240)
    assert run["parameters"]["node"] == node and run["parameters"]["repair"] is True
    assert run["state_type"] == "COMPLETED", run["state"]
    repaired = manifest_of(server, "healed").chunks[0]
    assert len(repaired.verified) == 3
    for replica in repaired.verified:  # hashed off the disk
        path = home / "nodes" / replica.node / chunk.key
        assert blake3.blake3(path.read_bytes()).hexdigest() == chunk.digest
