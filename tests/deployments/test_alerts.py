"""Alerts reach a person: on a real ``prefect server``, ``deployments/setup_local.py
--alert-url`` creates the webhook block and the automations of deployments/alerts.yaml; a
failed run and a node marked down each post a message to a local HTTP receiver, naming the
dataset and the node."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import sf_servers
from tests.helpers.sf_data import write_ml_csv
from tests.helpers.sf_prefect import ROOT, PrefectServer, wait_for

pytestmark = [pytest.mark.server, pytest.mark.integration]

DEADLINE_S = 30.0


class Receiver:
    """An HTTP server on loopback that keeps every POST's JSON body, with when it came."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.messages.append((time.monotonic(), json.loads(body or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        return [str(m.get("text", "")) for _, m in self.messages]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def alerting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrefectServer,
                                                                        Receiver, Path]]:
    work = tmp_path_factory.mktemp("alerts")
    receiver = Receiver()
    server = PrefectServer(work, {"SKYFERRY_HOME": str(work / "home"),
                                  "SKYFERRY_RETRY_DELAYS": "[0.2]"})
    try:
        server.start()
        server.cli("python", "deployments/setup_local.py", "--alert-url", receiver.url)
        yield server, receiver, work
    finally:
        server.stop()
        receiver.close()


def run(server: PrefectServer, config: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "tests.helpers.sf_run", json.dumps(config)],
                          cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip(), done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_setup_creates_the_alert_automations_without_the_url_in_the_clear(
        alerting: tuple[PrefectServer, Receiver, Path]) -> None:
    server, receiver, _ = alerting
    names = {a["name"] for a in server.post("/automations/filter", {})}
    assert {"skyferry-run-failed", "skyferry-node-down", "skyferry-repair-left-damage",
            "skyferry-chunks-at-risk", "skyferry-egress-exceeded"} <= names
    blocks = server.post("/block_documents/filter", {"include_secrets": False})
    (block,) = [b for b in blocks if b["name"] == "skyferry-alerts"]
    assert receiver.url not in json.dumps(block)


def test_a_failed_run_and_a_node_down_reach_the_receiver_within_30_s(
        alerting: tuple[PrefectServer, Receiver, Path]) -> None:
    server, receiver, work = alerting
    failed = run(server, {"source": str(work / "no-such-source"), "dataset": "nightly"})
    assert failed["status"] == "failed"
    ended = time.monotonic()
    got = wait_for("the failed run's message", lambda: [
        (at, t) for at, t in zip([a for a, _ in receiver.messages], receiver.texts(),
                                 strict=True) if "nightly" in t and "failed" in t], DEADLINE_S)
    assert got[0][0] - ended <= DEADLINE_S
    assert "skyferry status nightly" in got[0][1]

    source = work / "src"
    write_ml_csv(source / "a.csv", 300, seed=3)
    dead = sf_servers.free_port()  # nothing listens there: the node refuses every call
    nodes = [f'  - {{name: local-{i}, cloud: aws, region: us-east-1, url: "{work}/n{i}"}}'
             for i in range(3)]
    nodes.append(f'  - {{name: far-away, cloud: gcp, region: us-east1, url: "s3://gone/data", '
                 f'timeout_s: 2, storage_options: {{endpoint_url: "http://127.0.0.1:{dead}", '
                 f'key: "k", secret: "s"}}}}')
    topology = work / "topology.yaml"
    topology.write_text(f'catalog: "{work}/catalog"\nnodes:\n' + "\n".join(nodes) + "\n")
    before = len(receiver.messages)
    result = run(server, {"source": str(source), "dataset": "hourly", "topology": str(topology),
                          "replicas": 3, "quorum": 2, "min_clouds": 1})
    assert result["status"] == "completed", result.get("error")
    ended = time.monotonic()
    down = wait_for("the node-down message", lambda: [
        (at, m.get("text", "")) for at, m in receiver.messages[before:]
        if "far-away" in str(m.get("text", ""))], DEADLINE_S)
    assert down[0][0] - ended <= DEADLINE_S
    assert "hourly" in down[0][1] and "skyferry repair hourly --node far-away" in down[0][1]
    # far-away was gcp's only node: every replica is in aws, so the batch is at risk
    assert result["chunks_at_risk"]
    risk = wait_for("the at-risk message", lambda: [
        m.get("text", "") for _, m in receiver.messages[before:]
        if "at risk" in str(m.get("text", ""))], DEADLINE_S)
    assert f"batch {result['batch_id']} of hourly" in risk[0]
    assert f"skyferry repair hourly --batch {result['batch_id']}" in risk[0]


def test_a_run_refused_for_its_egress_budget_is_an_alert(
        alerting: tuple[PrefectServer, Receiver, Path]) -> None:
    server, receiver, work = alerting
    source = work / "budget-src"
    write_ml_csv(source / "a.csv", 300, seed=4)
    nodes = [f'  - {{name: {c}-{i}, cloud: {c}, region: r1, url: "{work}/b-{c}-{i}"}}'
             for c in ("aws", "gcp") for i in range(2)]
    topology = work / "budget.yaml"
    topology.write_text(f'catalog: "{work}/budget-catalog"\nnodes:\n' + "\n".join(nodes)
                        + "\nlinks:\n  - {from: aws, to: gcp, latency_ms: 30, "
                          "egress_usd_per_gb: 0.09}\n")
    before = len(receiver.messages)
    result = run(server, {"source": str(source), "dataset": "costly", "topology": str(topology),
                          "replicas": 3, "quorum": 2, "min_clouds": 2,
                          "max_egress_usd": 1e-9})
    assert result["status"] == "failed" and "EgressBudgetError" in str(result.get("error_type"))
    ended = time.monotonic()
    found = wait_for("the egress message", lambda: [
        (at, m.get("text", "")) for at, m in receiver.messages[before:]
        if "egress" in str(m.get("text", "")) and "costly" in str(m.get("text", ""))],
        DEADLINE_S)
    assert found[0][0] - ended <= DEADLINE_S
    assert "so the run was refused" in found[0][1] and "skyferry plan" in found[0][1]


def test_a_repair_that_leaves_damage_is_an_alert(
        alerting: tuple[PrefectServer, Receiver, Path]) -> None:
    server, receiver, work = alerting
    source = work / "damaged-src"
    write_ml_csv(source / "a.csv", 300, seed=5)
    nodes = [f'  - {{name: d-{i}, cloud: aws, region: r1, url: "{work}/d-{i}"}}'
             for i in range(3)]
    topology = work / "damaged.yaml"
    topology.write_text(f'catalog: "{work}/d-catalog"\nnodes:\n' + "\n".join(nodes) + "\n")
    result = run(server, {"source": str(source), "dataset": "fragile", "topology": str(topology),
                          "replicas": 3, "quorum": 3, "min_clouds": 1})
    assert result["status"] == "completed", result.get("error")
    for replica in (work / f"d-{i}" for i in range(3)):  # every copy of every chunk gone
        for path in replica.rglob("*.parquet"):
            path.unlink()
    before = len(receiver.messages)
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from flows.verify_and_repair import verify_and_repair;"
         " verify_and_repair(dataset='fragile', repair=True, topology=sys.argv[1])",
         str(topology)], cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "ReplicasAtRiskError" in done.stderr
    ended = time.monotonic()
    found = wait_for("the damage message", lambda: [
        (at, m.get("text", "")) for at, m in receiver.messages[before:]
        if "damage left in fragile" in str(m.get("text", ""))], DEADLINE_S)
    assert found[0][0] - ended <= DEADLINE_S
    assert "skyferry repair fragile" in found[0][1]
