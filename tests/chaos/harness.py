"""The chaos suite's scenarios, and a checker in the spirit of Jepsen's set checker.

Each scenario runs in a fresh data directory against six nodes in three clouds: in each
cloud one node on a real local server (moto, the GCS emulator, Azurite), reached through a
:class:`~tests.helpers.sf_chaos.FaultProxy`, and one local folder behind the fault-injecting
``faulty://`` store. A multi-chunk CSV run starts; once some chunks are stored, the fault is
injected; the run ends; the faults heal; ``repair`` runs; then the checker compares what
was acknowledged (the committed manifests) with what the export returns:

- **lost**: rows of committed batches that the export cannot return;
- **unexpected**: rows the export returns that no source held;
- **under-replicated**: committed chunks with fewer than W verified replicas (spanning
  ``min_clouds`` clouds) at commit, or fewer than R replicas that hash right after repair,
  read straight from the servers and folders.

It also measures the time from the fault to the failure detector's ``down``, and the run's
time against a clean run's.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3
import fsspec
import pyarrow.parquet as pq

from tests.helpers import sf_servers
from tests.helpers.sf_chaos import FaultProxy, set_faults
from tests.helpers.sf_data import write_ml_csv

__all__ = ["SCENARIOS", "SHORT", "ChaosEnv", "Outcome", "render", "run_scenario"]

FILES, ROWS_PER_FILE, CHUNK = 4, 25_000, "160KB"
CLOUDS = {"aws": "s3", "gcp": "gs", "azure": "az"}
SERVER_NODE = {"aws": "s3-node", "gcp": "gcs-node", "azure": "az-node"}
LOCAL_NODE = {"aws": "aws-local", "gcp": "gcp-local", "azure": "azure-local"}


@dataclass
class Outcome:
    name: str
    outcome: str  # committed, refused (no batch committed, as expected), failed
    detection_s: float | None
    slowdown: float | None
    lost: int
    unexpected: int
    under_replicated: int
    committed_chunks: int = 0
    notes: list[str] = field(default_factory=list)


class ChaosEnv:
    """The three servers, a fault proxy in front of each, and a fresh home per scenario."""

    def __init__(self, servers: dict[str, sf_servers.Server], root: Path) -> None:
        self.servers = servers
        self.cloud_env = sf_servers.CloudEnv(servers)
        self.root = root
        self.proxies = {p: FaultProxy(s.port) for p, s in servers.items()}
        self.baseline_s: float | None = None
        self.count = 0

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()

    def fresh(self, name: str, *, max_writes: int | None = None,
              rows: int = ROWS_PER_FILE) -> Scenario:
        self.count += 1
        home = self.root / f"{self.count:02d}-{name}"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        for server in self.servers.values():  # a killed server from the last scenario
            if server.proc is None or server.proc.poll() is not None:
                server.start()
        return Scenario(self, name, home, bucket=f"chaos{self.count:02d}",
                        max_writes=max_writes, rows=rows)


class Scenario:
    """One scenario's home, topology, source and the handles to fault its nodes."""

    def __init__(self, env: ChaosEnv, name: str, home: Path, bucket: str, *,
                 max_writes: int | None = None, rows: int = ROWS_PER_FILE) -> None:
        self.env, self.name, self.home, self.bucket = env, name, home, bucket
        # nodes whose server was killed: the emulators keep nothing across a restart, so
        # their data is lost, and repair is told so (`skyferry repair --lost NODE`)
        self.lost: set[str] = set()
        self.source = home / "source"
        self.ids: dict[str, set[int]] = {}
        for i in range(FILES):
            path = self.source / f"part-{i}.csv"
            write_ml_csv(path, rows, seed=100 + i, start_id=i * rows)
            self.ids[path.name] = set(range(i * rows, (i + 1) * rows))
        for proxy in env.proxies.values():
            proxy.heal()
        lines = [f'catalog: "{home}/catalog"', "source_cloud: aws", "source_region: r1",
                 "nodes:"]
        for cloud, protocol in CLOUDS.items():
            env.cloud_env.make_bucket(protocol, bucket)
            options = dict(env.cloud_env.options(protocol))
            proxy = env.proxies[protocol].endpoint
            if protocol == "az":
                options["connection_string"] = str(options["connection_string"]).replace(
                    env.servers["az"].endpoint, proxy)
            else:
                options["endpoint_url"] = proxy
            opts = json.dumps({k: str(v) for k, v in options.items()})
            cap = f", max_writes: {max_writes}" if max_writes else ""
            lines.append(f'  - {{name: {SERVER_NODE[cloud]}, cloud: {cloud}, region: r1, '
                         f'url: "{protocol}://{bucket}/data", timeout_s: 5, '
                         f'storage_options: {opts}{cap}}}')
            local = home / "nodes" / LOCAL_NODE[cloud]
            local.mkdir(parents=True)
            set_faults(local)
            lines.append(f'  - {{name: {LOCAL_NODE[cloud]}, cloud: {cloud}, region: r2, '
                         f'url: "faulty://{local}"}}')
        self.topology = home / "topology.yaml"
        self.topology.write_text("\n".join(lines) + "\n")

    # faults ---------------------------------------------------------------------------
    def local(self, cloud: str, **faults: Any) -> None:
        set_faults(self.home / "nodes" / LOCAL_NODE[cloud], **faults)

    def server(self, cloud: str) -> sf_servers.Server:
        return self.env.servers[CLOUDS[cloud]]

    def proxy(self, cloud: str) -> FaultProxy:
        return self.env.proxies[CLOUDS[cloud]]

    def heal(self) -> None:
        for cloud in CLOUDS:
            self.local(cloud)
            self.proxy(cloud).heal()
            server = self.server(cloud)
            if server.proc is not None and server.proc.poll() is None:
                server.signal(signal.SIGCONT)
            else:
                server.start()

    # reading straight from the places, not through skyferry ------------------------------
    def raw(self, node: str, key: str) -> bytes | None:
        for cloud in CLOUDS:
            if node == LOCAL_NODE[cloud]:
                path = self.home / "nodes" / node / key
                return path.read_bytes() if path.is_file() else None
            if node == SERVER_NODE[cloud]:
                protocol = CLOUDS[cloud]
                fs = fsspec.filesystem(protocol, **self.env.cloud_env.options(protocol),
                                       skip_instance_cache=True)
                try:
                    return bytes(fs.cat_file(f"{self.bucket}/data/{key}"))
                except FileNotFoundError:
                    return None
        raise KeyError(node)


class _DownTimes(logging.Handler):
    """When each node was first reported down (or suspect), from the run's own log."""

    def __init__(self) -> None:
        super().__init__()
        self.down: dict[str, float] = {}
        self.suspect: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("node ") and " is now down" in message:
            self.down.setdefault(message.split()[1], time.monotonic())
        if message.startswith("node ") and " is now suspect" in message:
            self.suspect.setdefault(message.split()[1], time.monotonic())


def _when_stored(scenario: Scenario, dataset: str, chunks: int, act: Callable[[], None],
                 done: threading.Event, fired: list[float]) -> threading.Thread:
    """Run ``act`` once ``chunks`` chunks of the run are journaled."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.topology import load_topology

    catalog = open_catalog(load_topology(str(scenario.topology)))

    def wait() -> None:
        while not done.is_set():
            plans = [p for p, _ in catalog.pending_plans() if p.dataset == dataset]
            if plans and len(catalog.done_indices(dataset, plans[0].batch_id)) >= chunks:
                fired.append(time.monotonic())
                act()
                return
            done.wait(0.05)

    thread = threading.Thread(target=wait, daemon=True, name="chaos-fault")
    thread.start()
    return thread


def _run(scenario: Scenario, dataset: str, *, in_flight: int | None = None
         ) -> tuple[str, float, Any]:
    import os

    from flows.pipeline import run_pipeline
    from skyferry.config import PipelineConfig, get_settings

    before = os.environ.get("SKYFERRY_MAX_IN_FLIGHT")
    if in_flight is not None:
        os.environ["SKYFERRY_MAX_IN_FLIGHT"] = str(in_flight)
    get_settings.cache_clear()
    started = time.monotonic()
    try:
        result = run_pipeline(PipelineConfig(source=str(scenario.source), dataset=dataset,
                                             topology=str(scenario.topology),
                                             chunk_size=CHUNK))
    finally:
        if before is None:
            os.environ.pop("SKYFERRY_MAX_IN_FLIGHT", None)
        else:
            os.environ["SKYFERRY_MAX_IN_FLIGHT"] = before
        get_settings.cache_clear()
    return result.status, time.monotonic() - started, result


def _check(scenario: Scenario, dataset: str, outcome: Outcome) -> None:
    """Heal, repair, then compare what was acknowledged with what can be read."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.ops.export import export_dataset
    from skyferry.ops.repair import repair_dataset
    from skyferry.topology import load_topology

    topology = load_topology(str(scenario.topology))
    catalog = open_catalog(topology)
    committed = catalog.manifests(dataset)
    outcome.committed_chunks = sum(len(m.chunks) for m in committed)
    for manifest in committed:  # at commit: W verified replicas across min_clouds clouds
        for chunk in manifest.chunks:
            verified = chunk.verified
            if (len(verified) < manifest.write_quorum
                    or len({r.cloud for r in verified}) < manifest.min_clouds):
                outcome.under_replicated += 1
    scenario.heal()
    if not committed:
        return
    report = repair_dataset(topology, dataset, deep=True, max_node_share=1.0,
                            probe_timeout_s=10, lost=scenario.lost)
    if scenario.lost:
        outcome.notes.append(f"repair --lost {' '.join(sorted(scenario.lost))}: the "
                             "emulator keeps no data across a SIGKILL")
    if not report.complete:
        outcome.notes.append("repair incomplete: " + "; ".join(
            report.unrecoverable + report.short + report.copies_failed)[:300])
    if report.found.unreachable:
        outcome.notes.append(f"repair could not check: {report.found.unreachable}"[:300])
    acknowledged: set[int] = set()
    for manifest in committed:
        for source in manifest.lineage.sources:
            acknowledged |= scenario.ids[source.url.rsplit("/", 1)[-1]]
    out = scenario.home / "export.parquet"
    export_dataset(dataset, out, topology=topology)
    exported = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    every = set().union(*scenario.ids.values())
    outcome.lost = len(acknowledged - set(exported))
    outcome.unexpected = len(set(exported) - every) + (len(exported) - len(set(exported)))
    for manifest in catalog.manifests(dataset):  # after repair: R copies that hash right
        for chunk in manifest.chunks:
            good = sum(1 for r in chunk.verified
                       if (data := scenario.raw(r.node, chunk.key)) is not None
                       and blake3.blake3(data).hexdigest() == chunk.digest)
            if good < manifest.replication_factor:
                outcome.under_replicated += 1
                outcome.notes.append(
                    f"chunk {chunk.index}: {good} good of "
                    f"{[r.node for r in chunk.verified]} after repair")


def run_scenario(env: ChaosEnv, name: str) -> Outcome:
    """Run one named scenario (see :data:`SCENARIOS`) and check it."""
    return SCENARIOS[name](env)


def _faulted(name: str, fault: Callable[[Scenario], None], *, after: int = 3,
             expect: str = "committed", then: Callable[[Scenario], None] | None = None,
             detect: str | None = None, as_state: str = "down", queued: bool = False,
             rows: int = ROWS_PER_FILE) -> Callable[[ChaosEnv], Outcome]:
    """A scenario: ``fault`` once ``after`` chunks are stored while the run writes;
    ``then`` after the run (before healing); ``detect``: the node whose detection (as
    ``as_state``) is timed. ``queued``: each server node takes one write at a time while
    8 chunks are in flight, so several chunks wait for each node. ``rows``: per source
    file, so that the run lasts long enough after the fault to see it."""

    def scenario_run(env: ChaosEnv) -> Outcome:
        scenario = env.fresh(name, max_writes=1 if queued else None, rows=rows)
        dataset = "chaos"
        timer = _DownTimes()
        logging.getLogger("skyferry.distribute").addHandler(timer)
        done, fired = threading.Event(), list[float]()
        thread = _when_stored(scenario, dataset, after, lambda: fault(scenario), done, fired)
        began = time.monotonic()
        try:
            status, seconds, result = _run(scenario, dataset,
                                           in_flight=8 if queued else None)
        finally:
            done.set()
            thread.join(10)
            logging.getLogger("skyferry.distribute").removeHandler(timer)
        if then is not None:
            then(scenario)
        outcome = Outcome(
            name=name, outcome="committed" if status == "completed" else "failed",
            detection_s=None, slowdown=round(seconds / env.baseline_s, 2)
            if env.baseline_s else None, lost=0, unexpected=0, under_replicated=0)
        if expect == "refused" and status != "completed":
            outcome.outcome = "refused"
        if status != "completed":
            outcome.notes.append(f"{result.error_type}: {(result.error or '')[:200]}")
        if fired:
            outcome.notes.append(f"the fault came {fired[0] - began:.1f}s into a "
                                 f"{seconds:.1f}s run")
        seen = timer.down if as_state == "down" else timer.suspect
        if detect and fired and detect in seen:
            outcome.detection_s = round(seen[detect] - fired[0], 2)
        elif detect:
            outcome.notes.append(f"{detect} was never reported {as_state}"
                                 + ("" if fired else " (the fault never fired)"))
        if detect and as_state == "suspect" and detect in timer.down:
            outcome.notes.append(f"{detect} was reported down, not only suspect")
        elif detect and as_state == "suspect":
            outcome.notes.append(f"{detect}: suspect, never down (detection is to suspect)")
        _check(scenario, dataset, outcome)
        return outcome

    return scenario_run


def _clean(env: ChaosEnv) -> Outcome:
    _run(env.fresh("warm-up"), "chaos")  # Prefect's start-up, once, outside the baseline
    scenario = env.fresh("clean")
    status, seconds, _ = _run(scenario, "chaos")
    env.baseline_s = seconds
    outcome = Outcome("clean run", "committed" if status == "completed" else "failed",
                      None, 1.0, 0, 0, 0)
    _check(scenario, "chaos", outcome)
    return outcome


def _kill_server(cloud: str) -> Callable[[Scenario], None]:
    def act(s: Scenario) -> None:
        s.server(cloud).signal(signal.SIGKILL)
        s.lost.add(SERVER_NODE[cloud])
    return act


def _stop_server(cloud: str) -> Callable[[Scenario], None]:
    def act(s: Scenario) -> None:
        s.server(cloud).signal(signal.SIGSTOP)
        threading.Timer(8.0, lambda: s.server(cloud).signal(signal.SIGCONT)).start()
    return act


def _slow(cloud: str) -> Callable[[Scenario], None]:
    def act(s: Scenario) -> None:
        s.proxy(cloud).latency_s = 0.3
        s.proxy(cloud).bandwidth = 2e6
    return act


def _flap(cloud: str) -> Callable[[Scenario], None]:
    def act(s: Scenario) -> None:
        proxy = s.proxy(cloud)

        def flip(n: int) -> None:
            if n == 0:
                return
            proxy.mode = "refuse" if proxy.mode == "pass" else "pass"
            if proxy.mode == "refuse":
                proxy.reset_all()
            threading.Timer(3.0, flip, args=(n - 1,)).start()
        flip(8)
    return act


def _corrupt_after_commit(s: Scenario) -> None:
    """Flip a byte in one committed replica on a local node."""
    for path in sorted((s.home / "nodes").glob("*/chaos/**/*.parquet")):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return


def _lose_cloud(cloud: str) -> Callable[[Scenario], None]:
    def act(s: Scenario) -> None:
        s.server(cloud).signal(signal.SIGKILL)
        s.lost.add(SERVER_NODE[cloud])
        s.local(cloud, down=True)
    return act


def _lose_two_clouds(s: Scenario) -> None:
    for cloud in ("gcp", "azure"):
        s.proxy(cloud).mode = "refuse"
        s.proxy(cloud).reset_all()
        s.local(cloud, down=True)


def _kill_the_run(env: ChaosEnv) -> Outcome:
    """The run itself SIGKILLed at a random (seeded) moment, then run again."""
    scenario = env.fresh("run killed")
    rng = random.Random(8)
    env_vars = {"SKYFERRY_HOME": str(scenario.home), "PREFECT_HOME": str(scenario.home /
                                                                          "prefect")}
    import os
    args = ["run", str(scenario.source), "--dataset", "chaos", "--topology",
            str(scenario.topology), "--chunk-size", CHUNK]
    # `skyferry run`, with the faulty:// store registered in the child as it is here
    boot = ("import runpy, sys, tests.helpers.sf_chaos; sys.argv[0] = 'skyferry'; "
            "runpy.run_module('skyferry.cli', run_name='__main__')")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    child_env.update(env_vars, PYTHONPATH=str(sf_servers.ROOT))
    from skyferry.commit.manifest import open_catalog
    from skyferry.topology import load_topology

    catalog = open_catalog(load_topology(str(scenario.topology)))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", boot, *args], env=child_env,
                            cwd=sf_servers.ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # a random moment once it writes: after its first stored chunk, within 2 s
    delay = rng.uniform(0.0, 2.0)
    while proc.poll() is None and not any(
            catalog.done_indices("chaos", p.batch_id) for p, _ in catalog.pending_plans()):
        time.sleep(0.05)
    time.sleep(delay)
    stored = sum(len(catalog.done_indices("chaos", p.batch_id))
                 for p, _ in catalog.pending_plans())
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        notes = [f"SIGKILLed {delay:.1f}s after its first stored chunk, with {stored} "
                 "stored"]
    else:
        notes = ["the run ended before the kill"]
    status, seconds, result = _run(scenario, "chaos")  # again, in this process
    total = time.monotonic() - started
    outcome = Outcome("8 run SIGKILLed, run again",
                      "committed" if status == "completed" else "failed", None,
                      round(total / env.baseline_s, 2) if env.baseline_s else None, 0, 0, 0,
                      notes=notes)
    if status != "completed":
        outcome.notes.append(f"{result.error_type}: {(result.error or '')[:200]}")
    _check(scenario, "chaos", outcome)
    return outcome


SCENARIOS: dict[str, Callable[[ChaosEnv], Outcome]] = {
    "clean": _clean,
    "1 server SIGKILLed": _faulted("1 server SIGKILLed", _kill_server("azure"),
                                   detect="az-node"),
    "2 server hangs, then resumes": _faulted("2 server hangs, then resumes",
                                             _stop_server("aws"), detect="s3-node"),
    # on Azurite: the GCS emulator serves one request at a time, so one throttled upload
    # stalls every other request, probes included, as no real store does
    # four times the rows: a slow node is suspect after two slow probes, 2 to 3 s
    "3 300 ms latency, 2 MB/s": _faulted("3 300 ms latency, 2 MB/s", _slow("azure"),
                                         after=1, detect="az-node", as_state="suspect",
                                         rows=4 * ROWS_PER_FILE),
    "3b the same, with chunks queued per node": _faulted(
        "3b the same, with chunks queued per node", _slow("azure"), after=1,
        detect="az-node", as_state="suspect", queued=True, rows=4 * ROWS_PER_FILE),
    "4 node flaps": _faulted("4 node flaps", _flap("aws"), detect="s3-node"),
    "5 disk full": _faulted("5 disk full", lambda s: s.local("gcp", enospc=True),
                            detect="gcp-local"),
    "6 corrupt on write and after commit": _faulted(
        "6 corrupt on write and after commit", lambda s: s.local("aws", flip_writes=2),
        then=_corrupt_after_commit),
    "7 a whole cloud lost": _faulted("7 a whole cloud lost", _lose_cloud("azure"),
                                     detect="azure-local"),
    "8 run SIGKILLed, run again": _kill_the_run,
    "9 two clouds lost": _faulted("9 two clouds lost", _lose_two_clouds, expect="refused",
                                  detect="gcp-local"),
}
SHORT = ["clean", "5 disk full", "6 corrupt on write and after commit"]


def render(outcomes: list[Outcome]) -> str:
    """The table, then one JSON line."""
    head = ("scenario", "outcome", "detection s", "slowdown", "lost", "unexpected",
            "under-replicated")
    rows = [(o.name, o.outcome, "-" if o.detection_s is None else f"{o.detection_s:.2f}",
             "-" if o.slowdown is None else f"{o.slowdown:.2f}", str(o.lost),
             str(o.unexpected), str(o.under_replicated)) for o in outcomes]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
             for r in [head, *rows]]
    for o in outcomes:
        lines += [f"  {o.name}: {note}" for note in o.notes]
    body = {"scenarios": [{k: v for k, v in asdict(o).items()
                           if k not in ("notes", "committed_chunks")} for o in outcomes]}
    return "\n".join(lines) + "\n" + json.dumps(body)
