"""A run's context, in two frozen parts: what is known before planning, and the planned batch.

:class:`RunSetup` holds the checked configuration, the topology, the catalog, the schema and
the transforms, plus the run's node health, stage metrics and window of chunks in flight.
:class:`BatchRun` adds what planning decided: the plan, the placer and the replica writer.
Neither is serialized: a process of its own (a Dask worker) rebuilds them with
:func:`worker_run`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from skyferry.commit.manifest import BatchPlan, Catalog, open_catalog
from skyferry.config import PipelineConfig, Settings, get_settings
from skyferry.crypto import Keyring, run_keyring
from skyferry.distribute.access import mark_nodes
from skyferry.distribute.detector import DetectorConfig, FailureDetector
from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.distribute.replication import ReplicaWriter
from skyferry.errors import (
    BatchNotFoundError,
    InsufficientNodesError,
    TopologyError,
    UnsafeKeyError,
)
from skyferry.ingest.listing import source_cloud
from skyferry.memory import tune_allocator
from skyferry.metrics import StageRecorder
from skyferry.process.schema import Schema, load_schema
from skyferry.process.transform import Transform, load_transforms
from skyferry.storage import safe_key
from skyferry.topology import KNOWN_CLOUDS, Topology, load_topology

__all__ = ["BatchRun", "RunSetup", "load_batch", "new_placer", "open_batch", "open_run",
           "resume_batch", "worker_run"]


@dataclass(frozen=True, eq=False)
class RunSetup:
    """What every step of one run shares before the batch is planned."""

    config: PipelineConfig
    settings: Settings
    topology: Topology
    catalog: Catalog
    schema: Schema | None
    transforms: tuple[tuple[str, Transform], ...]
    source_cloud: str
    keyring: Keyring | None = None  # set: every chunk is encrypted with a key it wraps
    health: NodeHealth = field(default_factory=NodeHealth)
    recorder: StageRecorder = field(default_factory=StageRecorder)
    # The window: chunks whose bytes are in this process at once (what bounds memory).
    window: threading.BoundedSemaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window",
                           threading.BoundedSemaphore(self.settings.max_in_flight))

    def down_reasons(self) -> dict[str, str]:
        """The nodes this run holds down, with why."""
        return {n: self.health.reasons.get(n, "") for n in self.health.down_nodes()}


@dataclass(frozen=True, eq=False)
class BatchRun:
    """A planned batch: the run's setup, the plan, and the writer of its chunks' replicas."""

    setup: RunSetup
    plan: BatchPlan
    placer: Placer
    writer: ReplicaWriter
    detector: FailureDetector | None = None
    resumed: bool = False

    @property
    def config(self) -> PipelineConfig:
        return self.setup.config

    @property
    def catalog(self) -> Catalog:
        return self.setup.catalog

    def close(self) -> None:
        """End the replica writer: a hung node's writes still in flight are cancelled, so no
        thread of this run outlives it. Stop the failure detector."""
        if self.detector is not None:
            self.detector.stop()
        self.writer.close()


def open_run(config: PipelineConfig, settings: Settings | None = None) -> RunSetup:
    """Load and check the topology, schema and transforms; raises typed config errors."""
    settings = settings or get_settings()
    if settings.tune_malloc:
        tune_allocator()
    safe_key(config.dataset)  # a dataset name is the first level of every key
    if "/" in config.dataset:
        raise UnsafeKeyError(f"dataset name {config.dataset!r} must not contain '/'",
                             key=config.dataset)
    if config.dataset == "manifests" or config.dataset.startswith("_"):
        raise UnsafeKeyError(f"dataset name {config.dataset!r} is reserved: nodes keep "
                             "manifest copies under manifests/, probes under _probe/ and "
                             "their identity under _skyferry/",
                             key=config.dataset)
    if config.batch_id is not None:
        safe_key(f"batch={config.batch_id}")
        if "/" in config.batch_id:
            raise UnsafeKeyError(f"batch id {config.batch_id!r} must not contain '/'",
                                 key=config.batch_id)
    topology = load_topology(config.topology, settings=settings)
    names = [n.name for n in topology.nodes]
    if config.replicas > len(names):  # a node that is down still counts: it gets a hint
        raise InsufficientNodesError(
            f"{config.replicas} replicas asked for, but the topology "
            f"{config.topology or '(embedded default)'} has only {len(names)} nodes "
            f"({', '.join(names)}): each replica needs a node of its own",
            healthy=len(names), required=config.replicas)
    schema = load_schema(config.schema_path) if config.schema_path else None
    cloud = config.source_cloud or source_cloud(config.source, topology.source_cloud)
    known = KNOWN_CLOUDS | set(topology.clouds)
    if cloud not in known:
        raise TopologyError(f"unknown source cloud {cloud!r}; the known clouds are "
                            f"{', '.join(sorted(known))}", source=config.topology)
    return RunSetup(
        config=config,
        settings=settings,
        keyring=run_keyring(config.encrypt, config.master_keys, topology.encryption),
        topology=topology,
        catalog=open_catalog(topology),
        schema=schema,
        transforms=tuple(load_transforms(config.transforms)),
        source_cloud=cloud,
    )


def new_placer(setup: RunSetup) -> Placer:
    """The placer of this run's replicas: network-aware from the source's cloud and region."""
    region = (setup.topology.source_region if setup.source_cloud == setup.topology.source_cloud
              else None)
    return Placer(setup.topology, setup.source_cloud, region, setup.config.replicas)


def open_batch(setup: RunSetup, plan: BatchPlan, placer: Placer, *,
               resumed: bool = False) -> BatchRun:
    """The batch ``plan`` placed with ``placer``, ready to move its chunks, with the nodes
    watched by a failure detector until :meth:`BatchRun.close`."""
    writer = ReplicaWriter(setup.topology, setup.health, placer, setup.source_cloud)
    mark_nodes(setup.topology, setup.health.healthy, setup.catalog)
    detector = None
    if setup.settings.probe_interval_s > 0:
        detector = FailureDetector(
            setup.topology.nodes, setup.health,
            DetectorConfig(interval_s=setup.settings.probe_interval_s)).start()
    return BatchRun(setup=setup, plan=plan, placer=placer, writer=writer, detector=detector,
                    resumed=resumed)


def resume_batch(setup: RunSetup, plan: BatchPlan) -> BatchRun:
    """Take up a journaled plan (a resumed batch, or a child run's share of one)."""
    placer = new_placer(setup)
    for chunk in plan.chunks:  # restore the byte load the original placement made
        for name in chunk.nodes:
            placer.load[name] = placer.load.get(name, 0) + chunk.size
    return open_batch(setup, plan, placer, resumed=True)


def load_batch(setup: RunSetup, batch_id: str) -> BatchRun:
    """The journaled plan of ``batch_id``, taken up; a typed error when it is gone."""
    plan = setup.catalog.load_plan(setup.config.dataset, batch_id)
    if plan is None:
        raise BatchNotFoundError(
            f"no pending plan for batch {batch_id} of {setup.config.dataset!r} in "
            f"{setup.catalog.store.url}: it was committed or dropped",
            dataset=setup.config.dataset, batch_id=batch_id)
    return resume_batch(setup, plan)


# One batch per (config, batch) in each worker process of a process-based task runner.
_WORKER_RUNS: dict[tuple[str, str], BatchRun] = {}
_WORKER_LOCK = threading.Lock()


def worker_run(config_json: str, batch_id: str,
               known_down: dict[str, str] | None = None) -> BatchRun:
    """The run's batch, rebuilt once per worker process from the config and the journal.

    A task on a Dask worker process gets only serializable arguments; it finds the topology,
    schema, transforms and plan here. Node health is the worker's own from then on.
    """
    key = (config_json, batch_id)
    with _WORKER_LOCK:
        run = _WORKER_RUNS.get(key)
        if run is None:
            setup = open_run(PipelineConfig.model_validate_json(config_json))
            for node, reason in (known_down or {}).items():
                setup.health.mark(node, "down", reason)
            run = load_batch(setup, batch_id)
            for old in _WORKER_RUNS.values():  # one run at a time per worker
                old.close()
            _WORKER_RUNS.clear()
            _WORKER_RUNS[key] = run
        return run
