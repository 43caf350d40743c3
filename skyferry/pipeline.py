"""The per-run context and the plain functions behind each stage's tasks.

Tasks in ``tasks/`` are thin wrappers over these; they can be tested without Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from skyferry import __version__
from skyferry.config import PipelineConfig, Settings, get_settings
from skyferry.errors import (
    BatchNotFoundError,
    InsufficientNodesError,
    SourceChangedError,
    TopologyError,
    UnsafeKeyError,
    mark_stage,
)
from skyferry.hashing import content_hash
from skyferry.ingest import iter_part_bytes, plan_chunks, read_chunk, with_headers
from skyferry.listing import list_source_files, source_cloud
from skyferry.manifest import BatchPlan, Catalog, Lineage, Manifest
from skyferry.memory import tune_allocator
from skyferry.metrics import PipelineResult, StageRecorder
from skyferry.models import ChunkPlan, IngestedChunk, ProcessedChunk, SourceFile, StoredChunk
from skyferry.placement import NodeHealth, Placer
from skyferry.processing import Transform, load_transforms, process_parts
from skyferry.replication import ReplicaWriter
from skyferry.schema import Schema, load_schema
from skyferry.storage import Store, safe_key
from skyferry.topology import KNOWN_CLOUDS, Node, Topology, load_topology
from skyferry.versions import grown_from, live_sources

__all__ = [
    "RunContext",
    "attach_plan",
    "build_context",
    "build_plan",
    "distribute_chunk_fn",
    "ingest_chunk_fn",
    "journal_chunk_fn",
    "load_pending_plan",
    "move_chunk_fn",
    "worker_context",
    "new_source_files",
    "probe_nodes_fn",
    "process_chunk_fn",
    "summarize",
]

logger = logging.getLogger("skyferry.pipeline")


@dataclass
class RunContext:
    """What every task of one run shares. Lives in the flow's process; never serialized."""

    config: PipelineConfig
    settings: Settings
    topology: Topology
    catalog: Catalog
    schema: Schema | None
    transforms: list[tuple[str, Transform]]
    source_cloud: str
    health: NodeHealth = field(default_factory=NodeHealth)
    recorder: StageRecorder = field(default_factory=StageRecorder)
    plan: BatchPlan | None = None
    placer: Placer | None = None
    writer: ReplicaWriter | None = None
    skipped_files: list[str] = field(default_factory=list)
    _staged: dict[int, pa.Buffer | bytes] = field(default_factory=dict, repr=False)
    _raw: dict[int, list[bytes]] = field(default_factory=dict, repr=False)
    _progress: dict[int, tuple[IngestedChunk | ProcessedChunk, dict[str, list[float]]]] = (
        field(default_factory=dict, repr=False))
    _staging_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        # The window: chunks whose bytes are in this process at once (what bounds memory)
        self.in_flight = threading.BoundedSemaphore(self.settings.max_in_flight)

    def __hash__(self) -> int:  # tasks may hash their inputs; identity is enough
        return id(self)

    def close(self) -> None:
        """End the run's replica writers: what is still in flight (a hung node's writes) is
        cancelled, so no thread of this run outlives it."""
        if self.writer is not None:
            self.writer.close()

    def stage_raw(self, index: int, pieces: list[bytes]) -> None:
        """Hold an ingested chunk's source bytes until it is processed (bounded by the window)."""
        with self._staging_lock:
            self._raw[index] = pieces

    def raw(self, index: int) -> list[bytes] | None:
        with self._staging_lock:
            return self._raw.get(index)

    def stage(self, index: int, buffer: pa.Buffer | bytes) -> None:
        """Hold a processed chunk until its replicas are written; its source bytes go."""
        with self._staging_lock:
            self._staged[index] = buffer
            self._raw.pop(index, None)

    def staged(self, index: int) -> pa.Buffer | bytes:
        with self._staging_lock:
            return self._staged[index]

    def unstage(self, index: int) -> None:
        with self._staging_lock:
            self._staged.pop(index, None)
            self._raw.pop(index, None)
            self._progress.pop(index, None)

    def keep(self, record: IngestedChunk | ProcessedChunk,
             timings: dict[str, list[float]]) -> None:
        """Remember how far a chunk got (and its stages' timings), so a retry resumes there."""
        with self._staging_lock:
            self._progress[record.plan.index] = (record, dict(timings))

    def progress(self, index: int) -> tuple[IngestedChunk | ProcessedChunk | None,
                                            dict[str, list[float]]]:
        with self._staging_lock:
            record, timings = self._progress.get(index, (None, {}))
            return record, dict(timings)


def build_context(config: PipelineConfig, settings: Settings | None = None) -> RunContext:
    """Load and check the topology, schema and transforms; raises typed config errors."""
    settings = settings or get_settings()
    if settings.tune_malloc:
        tune_allocator()
    safe_key(config.dataset)  # a dataset name is the first level of every key
    if "/" in config.dataset:
        raise UnsafeKeyError(f"dataset name {config.dataset!r} must not contain '/'",
                             key=config.dataset)
    if config.batch_id is not None:
        safe_key(f"batch={config.batch_id}")
        if "/" in config.batch_id:
            raise UnsafeKeyError(f"batch id {config.batch_id!r} must not contain '/'",
                                 key=config.batch_id)
    topology = load_topology(config.topology)
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
    return RunContext(
        config=config,
        settings=settings,
        topology=topology,
        catalog=Catalog(topology.catalog_store()),
        schema=schema,
        transforms=load_transforms(config.transforms),
        source_cloud=cloud,
    )


def probe_nodes_fn(ctx: RunContext) -> dict[str, float | None]:
    """Write/read/delete a sentinel on every node with a timeout; mark health.

    Nodes already marked down (by the parent run, or an earlier share) are not probed again.
    """
    timeout = ctx.settings.probe_timeout_s
    latencies: dict[str, float | None] = {}
    nodes = list(ctx.topology.nodes)
    pool = ThreadPoolExecutor(max_workers=max(1, len(nodes)))
    known_down = set(ctx.health.down_nodes())  # handed over by a parent: not probed again
    # a node whose store cannot even be set up fails its probe like one that does not answer
    stores: dict[str, Store] = {}  # filled as each node's store is set up, to stop a hung probe
    futures = {n.name: pool.submit(_probe, n, stores) for n in nodes
               if n.enabled and n.name not in known_down}
    for node in nodes:
        if not node.enabled:
            ctx.health.mark(node.name, "down", "disabled in the topology")
            latencies[node.name] = None
            continue
        if node.name in known_down:
            latencies[node.name] = None
            continue
        try:
            latency = futures[node.name].result(timeout=timeout)
        except FutureTimeout:
            ctx.health.mark(node.name, "down", f"probe timed out after {timeout}s")
            latencies[node.name] = None
            if node.name in stores:
                stores[node.name].cancel()
            continue
        except Exception as exc:
            ctx.health.mark(node.name, "down", f"probe failed: {type(exc).__name__}: {exc}")
            latencies[node.name] = None
            continue
        ctx.health.mark(node.name, "healthy")
        ctx.health.latency_s[node.name] = latency
        latencies[node.name] = latency
    pool.shutdown(wait=False, cancel_futures=True)
    return latencies


def _probe(node: Node, stores: dict[str, Store]) -> float:
    store = stores[node.name] = node.store()
    return store.probe()


def new_source_files(ctx: RunContext) -> list[SourceFile]:
    """List the source and keep the files that are new or changed since their last commit.

    A changed file that only grew (see :mod:`skyferry.versions`) is taken from where its
    committed version ended; any other change is ingested whole and supersedes the earlier
    version.
    """
    listing = list_source_files(ctx.config.source, ctx.config.source_options)
    ctx.skipped_files = listing.skipped
    manifests = ctx.catalog.manifests(ctx.config.dataset)
    live = live_sources(manifests)
    fresh = []
    for file in listing.files:
        earlier = live.get(file.url)
        if earlier is None:
            fresh.append(file)
            continue
        if (earlier.file.size, earlier.file.fingerprint) == (file.size, file.fingerprint):
            continue
        extends = grown_from(file, earlier, manifests, ctx.config.format,
                             ctx.config.source_options)
        fresh.append(file.model_copy(update={"extends": extends}))
        if not extends:
            logger.warning("%s changed; its new version supersedes the committed one",
                           file.url)
    logger.info("%d of %d source files are new or changed", len(fresh), len(listing.files))
    return fresh


def _plan_fingerprint(plan: BatchPlan) -> str:
    body = plan.model_dump(mode="json", by_alias=True,
                           exclude={"created_at", "partition_date", "batch_id"})
    for chunk in body["chunks"]:
        chunk.pop("nodes", None)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def build_plan(ctx: RunContext, files: list[SourceFile]) -> tuple[BatchPlan, bool]:
    """Plan the batch's chunks and replica placement, or resume a journaled plan.

    Returns the plan and whether it was resumed.
    """
    config = ctx.config
    chunks = plan_chunks(files, config.format, config.chunk_size, config.source_options)
    now = datetime.now(UTC)
    draft = BatchPlan(
        dataset=config.dataset,
        batch_id=config.batch_id or "pending",
        partition_date=now.strftime("%Y-%m-%d"),
        created_at=now.isoformat(timespec="seconds"),
        replicas=config.replicas,
        quorum=config.quorum,
        source_cloud=ctx.source_cloud,
        lineage=Lineage(
            sources=files,
            code_version=__version__,
            schema=ctx.schema.model_dump() if ctx.schema else None,
            transforms=list(config.transforms),
            format=config.format,
            chunk_size=config.chunk_size,
        ),
        chunks=chunks,
    )
    fingerprint = _plan_fingerprint(draft)
    batch_id = config.batch_id or fingerprint[:16]
    pending = ctx.catalog.load_plan(config.dataset, batch_id)
    if pending is not None and _plan_fingerprint(pending) == fingerprint:
        logger.info("resuming batch %s of %s", batch_id, config.dataset)
        attach_plan(ctx, pending)
        return pending, True
    if pending is not None:
        logger.warning("batch %s had a different plan; starting it again", batch_id)
        ctx.catalog.drop_pending(config.dataset, batch_id)
    placer = _placer(ctx)
    nodes = placer.plan([c.size for c in chunks], ctx.health, config.quorum)
    placed = [c.model_copy(update={"nodes": tuple(n)}) for c, n in zip(chunks, nodes,
                                                                        strict=True)]
    plan = draft.model_copy(update={"batch_id": batch_id, "chunks": placed})
    ctx.catalog.save_plan(plan)
    ctx.plan, ctx.placer = plan, placer
    ctx.writer = ReplicaWriter(ctx.topology, ctx.health, placer, ctx.source_cloud)
    return plan, False


def _placer(ctx: RunContext) -> Placer:
    region = (ctx.topology.source_region if ctx.source_cloud == ctx.topology.source_cloud
              else None)
    return Placer(ctx.topology, ctx.source_cloud, region, ctx.config.replicas)


def attach_plan(ctx: RunContext, plan: BatchPlan) -> None:
    """Take up a journaled plan (a resumed batch, or a child run's share of one)."""
    placer = _placer(ctx)
    for chunk in plan.chunks:  # restore the byte load the original placement made
        for name in chunk.nodes:
            placer.load[name] = placer.load.get(name, 0) + chunk.size
    ctx.plan, ctx.placer = plan, placer
    ctx.writer = ReplicaWriter(ctx.topology, ctx.health, placer, ctx.source_cloud)


def load_pending_plan(ctx: RunContext, batch_id: str) -> BatchPlan:
    """The journaled plan of ``batch_id``, attached to ``ctx``; a typed error when gone."""
    plan = ctx.catalog.load_plan(ctx.config.dataset, batch_id)
    if plan is None:
        raise BatchNotFoundError(
            f"no pending plan for batch {batch_id} of {ctx.config.dataset!r} in "
            f"{ctx.catalog.store.url}: it was committed or dropped",
            dataset=ctx.config.dataset, batch_id=batch_id)
    attach_plan(ctx, plan)
    return plan


def ingest_chunk_fn(chunk: ChunkPlan, ctx: RunContext) -> IngestedChunk:
    pieces, digest = read_chunk(chunk, ctx.config.source_options)
    ctx.stage_raw(chunk.index, pieces)
    parts = tuple(content_hash(p) for p in pieces) if len(pieces) > 1 else ()
    return IngestedChunk(plan=chunk, source_digest=digest, bytes_read=chunk.size,
                         part_digests=parts)


def _source_pieces(ingested: IngestedChunk, ctx: RunContext) -> list[bytes]:
    """The bytes ingest hashed; read again (and checked) only if this context lacks them."""
    chunk = ingested.plan
    pieces = ctx.raw(chunk.index)
    if pieces is not None:
        return pieces
    pieces, digest = read_chunk(chunk, ctx.config.source_options)
    if digest != ingested.source_digest:
        raise SourceChangedError(
            f"chunk {chunk.index} of {chunk.parts[0].source} changed since ingest",
            url=chunk.parts[0].source)
    return pieces


def process_chunk_fn(ingested: IngestedChunk, ctx: RunContext) -> ProcessedChunk:
    chunk, plan = ingested.plan, ctx.plan
    assert plan is not None
    pieces = _source_pieces(ingested, ctx)
    if chunk.format == "binary":  # passes through unchanged: its content is its source
        ctx.stage(chunk.index, pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return ProcessedChunk(plan=chunk, source_digest=ingested.source_digest,
                              digest=ingested.source_digest, size=chunk.size, staged=True,
                              rows_in=0, rows_out=0, rows_rejected=0,
                              part_digests=ingested.part_digests)
    options = ctx.config.source_options
    parts = with_headers(chunk, pieces, options)
    where = f"chunk {chunk.index} ({chunk.parts[0].source})"
    buffer, out = process_parts(parts, chunk.format, ctx.schema, ctx.transforms, where, options)
    del parts, pieces
    rejects_key = None
    if out.rejects:
        rejects_key = ctx.catalog.rejects_key(plan.dataset, plan.batch_id, chunk.index)
        ctx.catalog.save_rejects(rejects_key, out.rejects)
    ctx.stage(chunk.index, buffer)
    return ProcessedChunk(
        plan=chunk, source_digest=ingested.source_digest,
        digest=content_hash(buffer), size=buffer.size, staged=True,
        rows_in=out.rows_in, rows_out=sum(out.part_rows), rows_rejected=out.rows_rejected,
        rows_added=out.rows_added, rows_dropped=out.rows_dropped,
        rejects_key=rejects_key, part_digests=ingested.part_digests,
        part_rows=tuple(out.part_rows),
    )


def _processed_bytes(processed: ProcessedChunk, ctx: RunContext) -> bytes | memoryview:
    """The chunk's stored form: staged in memory, or (a context without it) from the source."""
    if processed.staged:
        return memoryview(ctx.staged(processed.plan.index))
    pieces = [data for _, data in iter_part_bytes(processed.plan, ctx.config.source_options)]
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def distribute_chunk_fn(processed: ProcessedChunk, ctx: RunContext,
                        attempt: int = 1) -> StoredChunk:
    """Write the chunk's replicas concurrently and verify them; W of them must verify.

    A retry (``attempt`` > 1) first re-probes the chunk's planned nodes that are down.
    """
    plan, writer = ctx.plan, ctx.writer
    assert plan is not None and writer is not None
    chunk = processed.plan
    if attempt > 1:
        writer.recheck(list(chunk.nodes), ctx.settings.probe_timeout_s)
    data = _processed_bytes(processed, ctx)
    # Staged bytes are immutable and were hashed when staged; bytes read again are checked.
    if not processed.staged and content_hash(data) != processed.digest:
        raise SourceChangedError(f"chunk {chunk.index} source bytes changed before "
                                 "distribution", url=chunk.parts[0].source)
    key = plan.key(chunk)
    outcome = writer.write(chunk.index, key, data, processed.digest, list(chunk.nodes),
                           plan.quorum)
    stored = StoredChunk(
        index=chunk.index, key=key, format=chunk.format, digest=processed.digest,
        size=processed.size, source_digest=processed.source_digest, rows_in=processed.rows_in,
        rows_out=processed.rows_out, rows_rejected=processed.rows_rejected,
        rows_added=processed.rows_added, rows_dropped=processed.rows_dropped,
        rejects_key=processed.rejects_key, parts=chunk.parts,
        part_digests=processed.part_digests, part_rows=processed.part_rows,
        replicas=tuple(outcome.replicas), node_failures=outcome.node_failures,
    )
    ctx.unstage(chunk.index)
    return stored


def journal_chunk_fn(ctx: RunContext, stored: StoredChunk) -> None:
    """Record a chunk whose replicas verified, so a re-run after a crash skips it."""
    assert ctx.plan is not None
    started = time.perf_counter()
    ctx.catalog.record_chunk(ctx.plan, stored)
    ctx.recorder.record("storage", nbytes=stored.size, seconds=time.perf_counter() - started)


def commit_fn(ctx: RunContext, chunks: list[StoredChunk]) -> tuple[Manifest, str]:
    plan = ctx.plan
    assert plan is not None
    manifest = Manifest.from_plan(plan, chunks)
    key = ctx.catalog.commit(manifest)
    ctx.catalog.drop_pending(plan.dataset, plan.batch_id)
    return manifest, key


def summarize(ctx: RunContext, manifest: Manifest, key: str, new: list[StoredChunk],
              skipped: int, started: float) -> PipelineResult:
    stages = ctx.recorder.metrics()
    by_cloud: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    verified = failures = cross = 0
    for chunk in manifest.chunks:
        for replica in chunk.verified:
            by_cloud[replica.cloud] += 1
            by_node[replica.node] += 1
    for chunk in new:
        verified += len(chunk.verified)
        failures += chunk.node_failures
        cross += sum(1 for r in chunk.verified if r.cloud != ctx.source_cloud)
    attempts = verified + failures
    dist = stages["distribution"]
    dist.replica_success_rate = round(verified / attempts, 4) if attempts else 1.0
    dist.cross_cloud_transfers = cross
    dist.node_failures_handled = failures
    stages["storage"].by_cloud = dict(sorted(by_cloud.items()))
    stages["storage"].by_node = dict(sorted(by_node.items()))
    return PipelineResult(
        status="completed", dataset=manifest.dataset, batch_id=manifest.batch_id,
        manifest_key=key, duration_s=round(time.perf_counter() - started, 3),
        chunks_processed=len(new), chunks_skipped=skipped, rows_in=manifest.rows_in,
        rows_stored=manifest.rows_stored, rows_rejected=manifest.rows_rejected,
        rows_added=manifest.rows_added, rows_dropped=manifest.rows_dropped,
        bytes_in=sum(s.size - s.extends for s in manifest.lineage.sources),
        bytes_stored=manifest.bytes_stored, stages=stages, node_failures_handled=failures,
        down_nodes=ctx.health.down_nodes(), skipped_files=list(ctx.skipped_files),
        down_reasons={n: ctx.health.reasons.get(n, "") for n in ctx.health.down_nodes()},
    )


# One context per (config, batch) in each worker process of a process-based task runner.
_WORKER_CONTEXTS: dict[tuple[str, str], RunContext] = {}
_WORKER_LOCK = threading.Lock()


def worker_context(config_json: str, batch_id: str,
                   known_down: dict[str, str] | None = None) -> RunContext:
    """The run's context, rebuilt once per worker process from the config and the journal.

    A task on a Dask worker process gets only serializable arguments; it finds the topology,
    schema, transforms and plan here. Node health is the worker's own from then on.
    """
    key = (config_json, batch_id)
    with _WORKER_LOCK:
        ctx = _WORKER_CONTEXTS.get(key)
        if ctx is None:
            ctx = build_context(PipelineConfig.model_validate_json(config_json))
            load_pending_plan(ctx, batch_id)
            for node, reason in (known_down or {}).items():
                ctx.health.mark(node, "down", reason)
            _WORKER_CONTEXTS.clear()  # one run at a time per worker: drop the last one
            _WORKER_CONTEXTS[key] = ctx
        return ctx


def move_chunk_fn(chunk: ChunkPlan, ctx: RunContext, attempt: int = 1, *,
                  resume: bool = True) -> tuple[StoredChunk, dict[str, list[float]], str]:
    """Ingest, process and distribute one chunk in one call (its bytes stay in this process).

    With ``resume``, a retry starts at the stage that failed: the ingested digest and the
    processed (staged) bytes of the failed attempt are kept in ``ctx`` until the chunk is
    stored. Without it, a failure drops them.

    Returns the stored chunk; per stage, ``[bytes, seconds]`` for the metrics; and the stage
    this attempt started at (where a retry resumed, so where its retries belong).
    """
    with ctx.in_flight:  # a slot of the window, for as long as the chunk's bytes are here
        return _move_chunk(chunk, ctx, attempt, resume)


def _move_chunk(chunk: ChunkPlan, ctx: RunContext, attempt: int,
                resume: bool) -> tuple[StoredChunk, dict[str, list[float]], str]:
    reached, timings = ctx.progress(chunk.index) if resume else (None, {})
    started_at = ("distribution" if isinstance(reached, ProcessedChunk) else
                  "processing" if isinstance(reached, IngestedChunk) else "ingestion")
    stage = started_at
    try:
        if isinstance(reached, ProcessedChunk):
            processed = reached
        else:
            if isinstance(reached, IngestedChunk):
                ingested = reached
            else:
                t0 = time.perf_counter()
                ingested = ingest_chunk_fn(chunk, ctx)
                timings["ingestion"] = [ingested.bytes_read, time.perf_counter() - t0]
                ctx.keep(ingested, timings)
            stage, t1 = "processing", time.perf_counter()
            processed = process_chunk_fn(ingested, ctx)
            timings["processing"] = [ingested.bytes_read, time.perf_counter() - t1]
            ctx.keep(processed, timings)
        stage, t2 = "distribution", time.perf_counter()
        stored = distribute_chunk_fn(processed, ctx, attempt)
        timings["distribution"] = [processed.size * len(stored.verified),
                                   time.perf_counter() - t2]
    except BaseException as exc:
        mark_stage(exc, stage)
        if not resume:
            ctx.unstage(chunk.index)
        raise
    ctx.unstage(chunk.index)
    return stored, timings, started_at
