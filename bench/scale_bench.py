"""Scale-out figures for ``make bench``: children on a real ``prefect server``, work that flows.

Setup: one moto server holds four nodes (two buckets labelled aws, two labelled gcp) and the
workers reach it through a :class:`FaultProxy` per pool that caps each connection's
bandwidth, so the network, not this machine's two cores, bounds a worker. Each pool has two
process workers; a worker finds its pool's proxy in ``AWS_ENDPOINT_URL`` (the topology names
no endpoint), as a worker in a farther cloud meets a slower path. The parent runs outside the
pools (``dispatch: deployments``), so the pools' concurrency limits set how many children
run. The source is random bytes (binary chunks): the CPU work per byte is a hash and copies.
The server keeps its state in PostgreSQL when it is installed, as Prefect's docs advise for
many workers; on SQLite its write lock stalls every client for up to a minute at a time.

- ``utilization_skewed``: gcp's proxy at a third of aws's bandwidth, two workers a pool, the
  units flowing: busy worker-seconds ÷ (4 workers × the distribution's wall time), and
  ``wall_to_ideal_skewed``: that wall time ÷ the ideal, the batch's bytes ÷ the sum of each
  child's own rate (its bytes ÷ its busy seconds). ``utilization_skewed_fixed`` is the same
  setup with one fixed share per child (``work_units: fixed``), measured beside it in
  counterbalanced pairs.
- ``scale_efficiency``: both proxies at the same bandwidth; a run's throughput (the batch's
  bytes ÷ the run's duration) with 4 workers ÷ 4 × its throughput with 1 (aws-pool limited
  to 1, gcp-pool to 0), in counterbalanced pairs.

Chunks are 256 KB, so that the slow pool's last chunk is a small part of a run; the nodes'
``timeout_s`` is 120 s, as an operator sets it for a slow path.

Environment: BENCH_SCALE_MIB (the batch, default 160: a child's start-up of 6-8 s is then a
small part of a run), BENCH_SCALE_KBS (aws's bandwidth per connection in KB/s, default 128),
BENCH_SCALE_PAIRS (default 2), BENCH_DIR.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.helpers

from bench.measure import Side, abba  # noqa: E402
from tests.helpers import sf_postgres, sf_servers  # noqa: E402
from tests.helpers.sf_chaos import FaultProxy  # noqa: E402
from tests.helpers.sf_prefect import BIN, ROOT, PrefectServer, Process, wait_for  # noqa: E402

MIB = 1 << 20
SIZE = int(os.environ.get("BENCH_SCALE_MIB", "160")) * MIB
FAST = float(os.environ.get("BENCH_SCALE_KBS", "128")) * 1000
PAIRS = int(os.environ.get("BENCH_SCALE_PAIRS", "2"))  # a pair of each part is ~17 min
POOLS = {"aws": "aws-pool", "gcp": "gcp-pool"}

RUN_PARENT = """
import sys
from flows.pipeline import run_pipeline
from skyferry.config import PipelineConfig
result = run_pipeline(PipelineConfig.model_validate_json(sys.argv[1]))
print("RESULT " + result.model_dump_json())
"""


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Cluster:
    """moto, a proxy per pool, a Prefect server with the deployments, two workers a pool."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.moto = sf_servers.moto(root / "logs")
        self.proxies: dict[str, FaultProxy] = {}
        self.server: PrefectServer | None = None
        self.postgres: sf_postgres.PostgresServer | None = None
        self.runs = 0

    def start(self) -> None:
        self.moto.start()
        self.proxies = {cloud: FaultProxy(self.moto.port) for cloud in POOLS}
        import fsspec

        s3 = fsspec.filesystem("s3", key=sf_servers.S3_KEY, secret=sf_servers.S3_SECRET,
                               endpoint_url=self.moto.endpoint, skip_instance_cache=True)
        home = self.root / "home"
        nodes = []
        for cloud, region in (("aws", "us-east-1"), ("gcp", "us-east1")):
            for n in (1, 2):
                s3.mkdir(f"{cloud}-{n}")
                nodes.append(f'  - {{name: {cloud}-node-{n}, cloud: {cloud}, region: {region}, '
                             f'url: "s3://{cloud}-{n}/data", work_pool: {POOLS[cloud]}, '
                             f'timeout_s: 120}}')
        self.topology = self.root / "topology.yaml"
        self.topology.write_text(f'catalog: "{home}/catalog"\nnodes:\n' + "\n".join(nodes)
                                 + "\n")
        creds = {"AWS_ACCESS_KEY_ID": sf_servers.S3_KEY,
                 "AWS_SECRET_ACCESS_KEY": sf_servers.S3_SECRET,
                 "AWS_DEFAULT_REGION": "us-east-1", "PREFECT_LOGGING_LEVEL": "WARNING"}
        if sf_postgres.available():  # Prefect's database for many workers
            self.postgres = sf_postgres.PostgresServer(self.root / "postgres").start()
        else:
            say("PostgreSQL is not installed: Prefect's server runs on SQLite, whose write "
                "lock stalls runs with this many workers")
        self.server = PrefectServer(self.root / "prefect", {
            **creds, "SKYFERRY_HOME": str(home), "SKYFERRY_CHECKOUT": str(ROOT),
            "SKYFERRY_SOURCE": str(self.root / "unused"), "SKYFERRY_DATASET": "unused"},
            database=self.postgres.url if self.postgres else None)
        (self.root / "prefect").mkdir(parents=True, exist_ok=True)
        self.server.start()
        self.server.cli("python", "deployments/setup_local.py")
        self.server.cli("prefect", "--no-prompt", "deploy", "--all")
        for cloud, pool in POOLS.items():
            for n in (1, 2):
                name = f"worker-{pool}-{n}"
                env = {**self.server.env, "AWS_ENDPOINT_URL": self.proxies[cloud].endpoint}
                worker = Process(name, [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                                        "--type", "process", "--name", name], env,
                                 self.server.work / f"{name}.log").start()
                self.server.processes.append(worker)
                wait_for(f"{n} online workers in {pool}",
                         lambda p=pool, k=n: self.server.online_workers(p) >= k, 120)
        self.source = self.root / "source" / "blob.bin"
        self.source.parent.mkdir(parents=True, exist_ok=True)
        self.source.write_bytes(os.urandom(SIZE))

    def limit(self, pool: str, n: int) -> None:
        assert self.server is not None
        response = self.server.client.patch(f"/work_pools/{pool}",
                                            json={"concurrency_limit": n})
        response.raise_for_status()

    def run(self, work_units: str) -> dict[str, Any]:
        """One batch of the source as a new dataset; the run's result."""
        assert self.server is not None
        self.runs += 1
        config = {"source": str(self.source), "dataset": f"scale-{self.runs}",
                  "chunk_size": "256KB", "topology": str(self.topology), "replicas": 3,
                  "quorum": 3, "dispatch": "deployments", "work_units": work_units}
        env = {**self.server.env, "AWS_ENDPOINT_URL": self.proxies["aws"].endpoint}
        done = subprocess.run([sys.executable, "-c", RUN_PARENT, json.dumps(config)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=3600)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"the run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(line[7:])
        if result["status"] != "completed":
            raise RuntimeError(f"the run did not commit: {result.get('error')}")
        say(f"  run {self.runs} ({work_units}): {result['duration_s']:.1f} s, distribution "
            f"{result['distribution_wall_s']:.1f} s, {result['children']} children, "
            f"utilization {result['utilization']}, child MB/s {result['child_mb_s']}, "
            f"stolen {result['units_stolen']}")
        self.timeline(config["dataset"])
        return result

    def timeline(self, dataset: str) -> None:
        """Each flow run of the batch: when it was created, started and ended (s from the first)."""
        assert self.server is not None
        runs = self.server.post("/flow_runs/filter", {"flow_runs": {"name": {"like_": dataset}},
                                                      "sort": "EXPECTED_START_TIME_ASC"})
        if not runs:
            return
        from datetime import datetime

        def at(stamp: str | None) -> float | None:
            return datetime.fromisoformat(stamp).timestamp() if stamp else None

        zero = min(at(r["created"]) or 0.0 for r in runs)
        for r in sorted(runs, key=lambda r: r["created"]):
            marks = [at(r["created"]), at(r["start_time"]), at(r["end_time"])]
            shown = ["-" if m is None else f"{m - zero:6.1f}" for m in marks]
            say(f"    {r['name']:<40} created {shown[0]} started {shown[1]} ended {shown[2]} "
                f"{r['state_type']}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        for proxy in self.proxies.values():
            proxy.close()
        self.moto.stop()
        if self.postgres is not None:
            self.postgres.stop()


def main() -> dict[str, Any]:
    root = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="skyferry-scale-"))
    root = root / "scale"
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root)
    figures: dict[str, Any] = {}
    sides: dict[str, Any] = {}
    try:
        cluster.start()
        say(f"scale: {SIZE / MIB:.0f} MiB a batch, aws {FAST / 1000:.0f} KB/s a connection")

        # work that flows against fixed shares, gcp's path a third of aws's
        for cloud in POOLS:
            cluster.limit(POOLS[cloud], 2)
        cluster.proxies["aws"].bandwidth = FAST
        cluster.proxies["gcp"].bandwidth = FAST / 3
        found: dict[str, list[dict[str, Any]]] = {"flow": [], "fixed": []}

        def skewed(units: str) -> None:
            found[units].append(cluster.run(units))

        flow, fixed = abba(("units that flow", lambda: skewed("flow")),
                           ("fixed shares", lambda: skewed("fixed")), PAIRS)

        def utilization(kind: str) -> list[float]:
            return [r["utilization"]["all"] for r in found[kind]]

        def to_ideal(kind: str) -> list[float]:
            return [r["distribution_wall_s"] / (SIZE / 1e6 / sum(r["child_mb_s"]))
                    for r in found[kind]]

        for kind in ("flow", "fixed"):
            say(f"{kind}: utilization {utilization(kind)}; wall ÷ ideal "
                f"{[round(x, 3) for x in to_ideal(kind)]}; stolen "
                f"{[r['units_stolen'] for r in found[kind]]}")
        figures["utilization_skewed"] = round(statistics.median(utilization("flow")), 3)
        figures["utilization_skewed_fixed"] = round(statistics.median(utilization("fixed")), 3)
        figures["wall_to_ideal_skewed"] = round(statistics.median(to_ideal("flow")), 3)
        figures["wall_to_ideal_skewed_fixed"] = round(statistics.median(to_ideal("fixed")), 3)
        sides["utilization_skewed"] = {s.name: s.summary() for s in (flow, fixed)}

        # 4 workers against 1, every path at aws's bandwidth
        cluster.proxies["gcp"].bandwidth = FAST
        durations: dict[int, list[float]] = {1: [], 4: []}

        def scaled(workers: int) -> None:
            cluster.limit("aws-pool", 1 if workers == 1 else 2)
            cluster.limit("gcp-pool", 0 if workers == 1 else 2)
            durations[workers].append(cluster.run("flow")["duration_s"])

        one, four = Side("1 worker"), Side("4 workers")
        for i in range(PAIRS):
            for side, n in ((one, 1), (four, 4)) if i % 2 == 0 else ((four, 4), (one, 1)):
                side.run(lambda n=n: scaled(n))
        ratios = [d1 / (4 * d4) for d1, d4 in zip(durations[1], durations[4], strict=True)]
        say(f"scale: 1 worker {durations[1]} s, 4 workers {durations[4]} s; efficiency "
            f"{[round(r, 3) for r in ratios]}")
        figures["scale_efficiency"] = round(statistics.median(ratios), 3)
        sides["scale_efficiency"] = {s.name: s.summary() for s in (one, four)}
    finally:
        cluster.stop()
    figures["sides"] = sides
    return figures


if __name__ == "__main__":
    start = time.perf_counter()
    out = main()
    say(json.dumps(out, sort_keys=True))
    say(f"{time.perf_counter() - start:.0f} s")
