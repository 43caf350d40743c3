"""What a run will move and cost, before it runs (``skyferry plan``), and what it did.

A plan lists the source and cuts its chunks as a run would, places each chunk's replicas
with the nodes' health as probed now, and splits the chunks over the clouds that compute
(the source's cloud when the run is not deployed; every pool's cloud, by bytes, when it
is). Then, per route (source cloud → worker cloud → node cloud), it adds up the bytes, the
requests and the egress at the topology's price table. It writes nothing.

The bytes a worker writes are the chunk's bytes for binary input, which is stored as it
is read: those routes are exact. For input that is converted, the stored size is the
source's size times the stored-to-read ratio of the dataset's last runs (1.0 before any),
and the plan says so. The ETA is the source's bytes over the median rate (source bytes per
second of wall time) of the last runs the catalog recorded, of this dataset if it has any;
with none, a plan has no ETA and says why.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from datetime import UTC, date, datetime

from pydantic import BaseModel, Field

from skyferry.commit.manifest import Catalog
from skyferry.distribute.claims import assign_shares
from skyferry.distribute.probe import probe_nodes
from skyferry.errors import EgressBudgetError
from skyferry.ingest.read import plan_chunks
from skyferry.models import ChunkPlan, SourceFile, StoredChunk
from skyferry.run.batch import new_source_files
from skyferry.run.context import RunSetup, new_placer
from skyferry.storage import PART_SIZE, safe_key
from skyferry.topology import Topology

__all__ = ["CostPlan", "Route", "RunRecord", "STALE_PRICES_DAYS", "actual_costs",
           "check_budget", "cost_plan", "plan_for", "record_run", "recent_runs"]

logger = logging.getLogger("skyferry.costs")

STALE_PRICES_DAYS = 90
RUNS_KEPT = 20  # run records a dataset keeps in the catalog; a plan reads the last 5
RATE_RUNS = 5


class Route(BaseModel):
    """Bytes over one hop of a route: ``read`` (source → worker) or ``write`` (worker →
    a node in ``node_cloud``)."""

    hop: str
    source_cloud: str
    worker_cloud: str
    node_cloud: str | None = None
    bytes: int = 0
    requests: int = 0
    egress_usd: float = 0.0
    requests_usd: float = 0.0

    @property
    def name(self) -> str:
        return " → ".join(c for c in (self.source_cloud, self.worker_cloud,
                                      self.node_cloud or "") if c)


class RunRecord(BaseModel):
    """A committed run's measured rate, kept in the catalog for the next plans' ETA."""

    dataset: str
    batch_id: str
    at: str
    bytes_in: int
    bytes_stored: int
    wall_s: float
    workers: int = 1

    @property
    def rate(self) -> float:
        """Source bytes per second of the run's wall time."""
        return self.bytes_in / self.wall_s if self.wall_s > 0 else 0.0


class CostPlan(BaseModel):
    """What a run of ``source`` into ``dataset`` would move and cost."""

    dataset: str
    source: str
    files: int
    bytes: int
    chunks: int
    replicas: int
    deployed: bool = Field(description="planned on every pool's cloud, not the source's")
    routes: list[Route] = Field(default_factory=list)
    stored_bytes_exact: bool = Field(description="whether the written bytes are known "
                                     "(binary input), not estimated from earlier runs")
    stored_ratio: float = 1.0
    egress_usd: float = 0.0
    requests_usd: float = 0.0
    storage_usd_per_month: float = 0.0
    eta_s: float | None = None
    eta_basis: str = ""
    min_clouds: int = 1
    spans_min_clouds: bool = True
    down_nodes: dict[str, str] = Field(default_factory=dict)
    prices_version: str = ""
    prices_effective: str | None = None
    warnings: list[str] = Field(default_factory=list)

    @property
    def total_usd(self) -> float:
        return self.egress_usd + self.requests_usd


def _requests(nbytes: int, part: int) -> int:
    """Requests to write ``nbytes`` as one object: one put, or a multipart's parts plus its
    start and completion."""
    return 1 if nbytes <= part else math.ceil(nbytes / part) + 2


class _Tally:
    """Routes, and storage per month, added up chunk by chunk at the topology's prices."""

    def __init__(self, topology: Topology, source_cloud: str, block_size: int) -> None:
        self.topology, self.source_cloud, self.block_size = topology, source_cloud, block_size
        self.region = (topology.source_region if source_cloud == topology.source_cloud
                       else None)
        self.nodes = {n.name: n for n in topology.nodes}
        self.routes: dict[tuple[str, str, str | None], Route] = {}
        self.storage = 0.0

    def route(self, hop: str, worker: str, node_cloud: str | None) -> Route:
        key = (hop, worker, node_cloud)
        if key not in self.routes:
            self.routes[key] = Route(hop=hop, source_cloud=self.source_cloud,
                                     worker_cloud=worker, node_cloud=node_cloud)
        return self.routes[key]

    def add(self, read: int, stored: int, worker: str, names: Sequence[str]) -> set[str]:
        """A chunk of ``read`` source bytes, stored as ``stored`` bytes on ``names``; the
        clouds it is stored in."""
        prices = self.topology.prices
        hop = self.route("read", worker, None)
        hop.bytes += read
        gets = max(1, math.ceil(read / self.block_size))
        hop.requests += gets
        hop.requests_usd += gets * prices.get_usd_per_1000.get(self.source_cloud, 0.0) / 1000
        hop.egress_usd += read / 1e9 * self.topology.egress_usd_per_gb(
            self.source_cloud, self.region, worker, None)
        clouds = set()
        for name in names:
            node = self.nodes[name]
            clouds.add(node.cloud)
            hop = self.route("write", worker, node.cloud)
            hop.bytes += stored
            puts = _requests(stored, PART_SIZE)
            hop.requests += puts
            hop.requests_usd += puts * prices.put_usd_per_1000.get(node.cloud, 0.0) / 1000
            near = self.region if worker == self.source_cloud else None  # worker's region
            hop.egress_usd += stored / 1e9 * self.topology.egress_usd_per_gb(
                worker, near, node.cloud, node.region)
            self.storage += stored / 1e9 * node.storage_usd_per_gb_month
        return clouds

    def sorted_routes(self) -> list[Route]:
        for route in self.routes.values():
            route.egress_usd = round(route.egress_usd, 6)
            route.requests_usd = round(route.requests_usd, 6)
        return sorted(self.routes.values(),
                      key=lambda r: (r.hop, r.worker_cloud, r.node_cloud or ""))

    @property
    def egress_usd(self) -> float:
        return round(sum(r.egress_usd for r in self.routes.values()), 6)

    @property
    def requests_usd(self) -> float:
        return round(sum(r.requests_usd for r in self.routes.values()), 6)


def cost_plan(topology: Topology, catalog: Catalog, *, dataset: str, source: str,
              source_cloud: str, files: int, chunks: Sequence[ChunkPlan],
              placement: Sequence[Sequence[str]], replicas: int, min_clouds: int,
              binary: bool, deployed: bool, block_size: int,
              down_nodes: dict[str, str] | None = None,
              today: date | None = None) -> CostPlan:
    """The plan of chunks ``chunks`` placed on ``placement`` (node names per chunk)."""
    runs = recent_runs(catalog, dataset)
    ratio = 1.0
    if not binary:
        read = sum(r.bytes_in for r in runs)
        ratio = sum(r.bytes_stored for r in runs) / read if read else 1.0
    worker_of: dict[int, str] = {}
    if deployed:
        placed = [c.model_copy(update={"nodes": tuple(p)})
                  for c, p in zip(chunks, placement, strict=True)]
        for cloud, indices in assign_shares(placed, topology, topology.clouds).items():
            worker_of.update(dict.fromkeys(indices, cloud))
    tally = _Tally(topology, source_cloud, block_size)
    clouds_ok = True
    for chunk, names in zip(chunks, placement, strict=True):
        stored = chunk.size if binary else round(chunk.size * ratio)
        clouds = tally.add(chunk.size, stored, worker_of.get(chunk.index, source_cloud), names)
        clouds_ok = clouds_ok and len(clouds) >= min_clouds
    prices = topology.prices
    plan = CostPlan(
        dataset=dataset, source=source, files=files, bytes=sum(c.size for c in chunks),
        chunks=len(chunks), replicas=replicas, deployed=deployed,
        routes=tally.sorted_routes(), stored_bytes_exact=binary, stored_ratio=round(ratio, 4),
        egress_usd=tally.egress_usd, requests_usd=tally.requests_usd,
        storage_usd_per_month=round(tally.storage, 6), min_clouds=min_clouds,
        spans_min_clouds=clouds_ok, down_nodes=dict(down_nodes or {}),
        prices_version=prices.version,
        prices_effective=prices.effective.isoformat() if prices.effective else None,
    )
    _eta(plan, runs, catalog)
    today = today or datetime.now(UTC).date()
    if prices.effective is None:
        plan.warnings.append("the topology's price table has no effective date (prices: "
                             "effective:); its prices may be out of date")
    elif (today - prices.effective).days > STALE_PRICES_DAYS:
        plan.warnings.append(
            f"the price table {prices.version} took effect on {prices.effective}, "
            f"{(today - prices.effective).days} days ago (more than {STALE_PRICES_DAYS}): "
            "check the clouds' current prices and update the topology's prices")
    if not binary:
        plan.warnings.append(
            "the written bytes are estimated: input that is converted is stored at "
            f"{ratio:.2f}× its size, " + ("the ratio of the dataset's last runs" if runs
                                           else "as no run of it is recorded yet"))
    if not clouds_ok:
        plan.warnings.append(f"some chunks' replicas cannot span {min_clouds} clouds with "
                             "the nodes that are up")
    return plan


def actual_costs(topology: Topology, source_cloud: str, chunks: Sequence[StoredChunk],
                 worker_of: dict[int, str], block_size: int) -> tuple[list[Route], float]:
    """What a run moved: each stored chunk's source bytes to the cloud that processed it
    (``worker_of``; else the source's), and its bytes to each verified replica; with the
    egress in all."""
    tally = _Tally(topology, source_cloud, block_size)
    for chunk in chunks:
        tally.add(sum(p.size for p in chunk.parts), chunk.size,
                  worker_of.get(chunk.index, source_cloud), [r.node for r in chunk.verified])
    return tally.sorted_routes(), tally.egress_usd


def plan_for(setup: RunSetup, *, deployed: bool, files: list[SourceFile] | None = None,
             probe: bool = True) -> CostPlan:
    """The plan of a run of ``setup``'s config: its new or changed files (or ``files``),
    cut and placed as the run would, with the nodes probed now. Writes nothing but the
    probes' sentinels."""
    config, topology = setup.config, setup.topology
    if probe:
        probe_nodes(topology, setup.health, setup.settings.probe_timeout_s)
    if files is None:
        files = new_source_files(setup).files
    chunks = plan_chunks(files, config.format, config.chunk_size, config.source_options)
    min_clouds = min(config.min_clouds, len(topology.clouds))
    placement = (new_placer(setup).plan([c.size for c in chunks], setup.health,
                                        config.quorum, min_clouds) if chunks else [])
    return cost_plan(
        topology, setup.catalog, dataset=config.dataset, source=config.source,
        source_cloud=setup.source_cloud, files=len(files), chunks=chunks,
        placement=placement, replicas=config.replicas, min_clouds=min_clouds,
        binary=all(c.format == "binary" for c in chunks), deployed=deployed,
        block_size=setup.settings.block_size, down_nodes=setup.down_reasons())


def check_budget(plan: CostPlan, limit_usd: float | None) -> None:
    """Refuse a run whose planned egress is over ``limit_usd``."""
    if limit_usd is not None and plan.egress_usd > limit_usd:
        worst = max(plan.routes, key=lambda r: r.egress_usd)
        raise EgressBudgetError(
            f"the run of {plan.source} into {plan.dataset} plans ${plan.egress_usd:.4f} of "
            f"egress, over the limit of ${limit_usd:.4f} (most on {worst.name}, "
            f"{worst.hop}: ${worst.egress_usd:.4f}); nothing was written",
            planned_usd=plan.egress_usd, limit_usd=limit_usd)


def _eta(plan: CostPlan, runs: list[RunRecord], catalog: Catalog) -> None:
    basis = runs
    scope = f"the last {len(runs)} runs of {plan.dataset}"
    if not basis:
        basis = recent_runs(catalog, None)
        scope = f"the last {len(basis)} runs of any dataset in this catalog"
    rates = [r.rate for r in basis if r.rate > 0]
    if not rates:
        plan.eta_basis = ("no run is recorded in this catalog yet: run a small batch first, "
                          "and later plans estimate from it")
        return
    rate = statistics.median(rates)
    plan.eta_s = round(plan.bytes / rate, 2)
    plan.eta_basis = (f"the median rate of {scope}: {rate / 1e6:.1f} MB/s of source bytes "
                      f"(from {min(rates) / 1e6:.1f} to {max(rates) / 1e6:.1f})")


def _runs_prefix(dataset: str) -> str:
    return safe_key("runs", dataset)


def record_run(catalog: Catalog, record: RunRecord) -> None:
    """Keep a committed run's rate for later plans; the dataset keeps its last 20."""
    prefix = _runs_prefix(record.dataset)
    stamp = record.at.replace(":", "").replace("-", "")
    catalog.store.put(f"{prefix}/{stamp}-{record.batch_id}.json",
                      record.model_dump_json().encode())
    names = sorted(n for n in catalog.store.names(prefix) if n.endswith(".json"))
    for name in names[:-RUNS_KEPT]:
        catalog.store.delete(f"{prefix}/{name}")


def recent_runs(catalog: Catalog, dataset: str | None, limit: int = RATE_RUNS
                ) -> list[RunRecord]:
    """The newest run records of ``dataset`` (None: of every dataset), newest first."""
    datasets = [dataset] if dataset else [
        n for n in catalog.store.names("runs") if not n.startswith(".")]
    found: list[tuple[str, str]] = []
    for name in datasets:
        prefix = _runs_prefix(name)
        found += [(n, f"{prefix}/{n}") for n in catalog.store.names(prefix)
                  if n.endswith(".json") and not n.startswith(".tmp-")]
    records = []
    for _, key in sorted(found, reverse=True)[:limit]:
        try:
            records.append(RunRecord.model_validate_json(catalog.store.get(key)))
        except (ValueError, OSError) as exc:  # a damaged record only loses an estimate
            logger.warning("run record %s cannot be read: %s", key, exc)
    return records
