"""A batch from end to end, around its chunks: find what is new, plan, journal, commit.

The chunks themselves walk :mod:`skyferry.run.chunk`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from datetime import UTC, datetime

from skyferry import __version__
from skyferry.commit.manifest import BatchPlan, Lineage, Manifest
from skyferry.commit.names import Names, dataset_names
from skyferry.commit.snapshots import SnapshotLog, lineage_of
from skyferry.errors import BatchIdReusedError, ConfigError, SourceError, failing_as
from skyferry.ingest.listing import Listing, list_source_files
from skyferry.ingest.read import plan_chunks
from skyferry.ingest.versions import SourceIndex, grown_from, source_index
from skyferry.metrics import PipelineResult
from skyferry.models import SourceFile, StoredChunk
from skyferry.run.context import BatchRun, RunSetup, new_placer, open_batch, resume_batch
from skyferry.storage import safe_key

__all__ = ["commit_batch", "journal_chunk", "new_source_files", "plan_batch", "summarize"]

logger = logging.getLogger("skyferry.run")


def new_source_files(setup: RunSetup) -> Listing:
    """List the source and keep the files that are new or changed since their last commit.

    A changed file that only grew (see :mod:`skyferry.ingest.versions`) is taken from where
    its committed version ended; any other change is ingested whole and supersedes the
    earlier version. ``skipped`` holds the files the listing passed over.
    """
    config = setup.config
    listing = list_source_files(config.source, config.source_options)
    if listing.odd and config.strict:
        url, why = next(iter(listing.odd.items()))
        raise SourceError(
            f"{len(listing.odd)} source files cannot be taken, and the run is strict: "
            + "; ".join(f"{u}: {w}" for u, w in list(listing.odd.items())[:10]),
            url=url)
    names = _source_names(setup)
    name = names.of if names is not None else (lambda url: url)
    index = source_index(setup.catalog, config.dataset)
    index.prefetch(name(f.url) for f in listing.files)
    fresh = []
    for file in listing.files:
        found = index.lookup(name(file.url))
        if found is None:
            fresh.append(file)
            continue
        earlier, committed = found
        if (earlier.file.size, earlier.file.fingerprint) == (file.size, file.fingerprint):
            continue
        extends = grown_from(file, earlier, committed, config.format, config.source_options)
        fresh.append(file.model_copy(update={"extends": extends}))
        if not extends:
            logger.warning("%s changed; its new version supersedes the committed one",
                           file.url)
    logger.info("%d of %d source files are new or changed", len(fresh), len(listing.files))
    return Listing(files=fresh, skipped=list(listing.skipped), odd=dict(listing.odd))


def check_batch_reuse(setup: RunSetup, manifest: Manifest) -> None:
    """A run named a batch id that is committed: that is a re-run only when the source
    lists every file the batch holds and nothing new or changed besides. Otherwise it is a
    :class:`BatchIdReusedError`, not a quiet "already committed"."""
    config = setup.config
    names = _source_names(setup)
    name = names.of if names is not None else (lambda url: url)
    held = {f.url for f in manifest.lineage.sources}
    listed = {name(f.url) for f in list_source_files(config.source, config.source_options).files}
    fresh = {name(f.url) for f in new_source_files(setup).files} - held
    missing = held - listed
    if not missing and not fresh:
        return
    what = (f"{len(missing)} of its files are not under {config.source} (such as "
            f"{sorted(missing)[0]})" if missing else
            f"{config.source} has {len(fresh)} new or changed files it does not hold (such as "
            f"{sorted(fresh)[0]})")
    raise BatchIdReusedError(
        f"batch {manifest.batch_id} of {config.dataset!r} is committed, and {what}: give this "
        "listing a new --batch-id, or none", dataset=config.dataset,
        batch_id=manifest.batch_id)


def _plan_fingerprint(plan: BatchPlan) -> str:
    body = plan.model_dump(mode="json", by_alias=True,
                           exclude={"created_at", "partition_date", "batch_id"})
    for chunk in body["chunks"]:
        chunk.pop("nodes", None)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def plan_batch(setup: RunSetup, files: list[SourceFile]) -> BatchRun:
    """Plan the batch's chunks and replica placement and journal the plan, or take up the
    journaled plan of the same batch (``resumed``)."""
    config = setup.config
    chunks = plan_chunks(files, config.format, config.chunk_size, config.source_options)
    now = datetime.now(UTC)
    draft = BatchPlan(
        dataset=config.dataset,
        batch_id=config.batch_id or "pending",
        partition_date=now.strftime("%Y-%m-%d"),
        created_at=now.isoformat(timespec="seconds"),
        replicas=config.replicas,
        quorum=config.quorum,
        min_clouds=min(config.min_clouds, len(setup.topology.clouds)),
        source_cloud=setup.source_cloud,
        lineage=Lineage(
            sources=files,
            code_version=__version__,
            schema=setup.schema.model_dump() if setup.schema else None,
            transforms=list(config.transforms),
            format=config.format,
            chunk_size=config.chunk_size,
        ),
        chunks=chunks,
    )
    fingerprint = _plan_fingerprint(draft)
    batch_id = config.batch_id or fingerprint[:16]
    pending = setup.catalog.load_plan(config.dataset, batch_id)
    if pending is not None and _plan_fingerprint(pending) == fingerprint:
        logger.info("resuming batch %s of %s", batch_id, config.dataset)
        return resume_batch(setup, pending)
    if pending is not None:
        logger.warning("batch %s had a different plan; starting it again", batch_id)
        setup.catalog.drop_pending(config.dataset, batch_id)
    placer = new_placer(setup)
    with failing_as("distribution", dataset=config.dataset, batch_id=batch_id):  # placement
        nodes = placer.plan([c.size for c in chunks], setup.health, config.quorum,
                            draft.min_clouds)
    placed = [c.model_copy(update={"nodes": tuple(n)}) for c, n in zip(chunks, nodes,
                                                                        strict=True)]
    plan = draft.model_copy(update={"batch_id": batch_id, "chunks": placed})
    setup.catalog.save_plan(plan)
    return open_batch(setup, plan, placer)


def journal_chunk(run: BatchRun, stored: StoredChunk) -> None:
    """Record a chunk whose replicas verified, so a re-run after a crash skips it."""
    started = time.perf_counter()
    written = run.catalog.record_chunk(run.plan, stored)
    run.setup.recorder.record("storage", nbytes=written,
                              seconds=time.perf_counter() - started)


def commit_batch(run: BatchRun, chunks: list[StoredChunk]
                 ) -> tuple[Manifest, str, str | None]:
    """Write the batch's manifest atomically (the commit), append the dataset's snapshot
    that holds it, then drop its journal. Returns the manifest, its key and the snapshot's
    id."""
    started = time.perf_counter()
    manifest = Manifest.from_plan(run.plan, chunks)
    if run.setup.keyring is not None:  # no manifest copy names a source file
        manifest = _with_sealed_names(run, manifest)
    down = [n for n, state in run.setup.health.states.items() if state == "down"]
    # the sources' versions go into the index before the commit point, so the index never
    # lacks a committed batch (a version whose batch did not commit is not live)
    SourceIndex(run.catalog, run.plan.dataset).record(manifest)
    key = run.catalog.commit(manifest, down=down)
    log = SnapshotLog(run.catalog, manifest.dataset, down=down)
    snapshot = log.append("commit", add=[manifest],
                          base=lambda: run.catalog.manifests(manifest.dataset)) or log.head()
    run.catalog.drop_pending(run.plan.dataset, run.plan.batch_id)
    run.setup.recorder.record("storage", nbytes=len(manifest.to_json()),
                              seconds=time.perf_counter() - started)
    return manifest, key, snapshot.id if snapshot else None


def _with_sealed_names(run: BatchRun, manifest: Manifest) -> Manifest:
    assert run.setup.keyring is not None
    names = dataset_names(run.catalog.store, manifest.dataset, run.setup.keyring, create=True)
    assert names is not None
    sources, chunks, freed, sealed = names.seal(manifest.lineage.sources, manifest.chunks,
                                                manifest.freed, manifest.batch_id)
    return manifest.model_copy(update={
        "lineage": manifest.lineage.model_copy(update={"sources": sources}),
        "chunks": chunks, "freed": freed, "sealed_names": sealed})


def _source_names(setup: RunSetup) -> Names | None:
    """An encrypted dataset's names key; a typed error when the run and the dataset disagree
    on encryption (the same file would have two names, and be taken twice)."""
    config = setup.config
    names = (dataset_names(setup.catalog.store, config.dataset, setup.keyring, create=False)
             if setup.keyring is not None else None)
    encrypted = names is not None or (
        setup.keyring is None and setup.catalog.store.exists(
            safe_key("keys", config.dataset, "names.json")))
    if setup.keyring is not None and names is None and setup.catalog.manifests(config.dataset):
        raise ConfigError(f"dataset {config.dataset!r} was written without encryption: "
                          "encrypt a new dataset (or run this one without --encrypt)",
                          source=config.dataset)
    if setup.keyring is None and encrypted:
        raise ConfigError(f"dataset {config.dataset!r} is encrypted: run it with --encrypt "
                          "and its --keys (or the topology's encryption section)",
                          source=config.dataset)
    return names


def summarize(run: BatchRun, manifest: Manifest, key: str, new: list[StoredChunk],
              skipped: int, started: float, skipped_files: list[str],
              odd_files: dict[str, str] | None = None,
              snapshot: str | None = None) -> PipelineResult:
    """The run's result: the manifest's counts, the stages' metrics, where replicas went."""
    setup = run.setup
    stages = setup.recorder.metrics()
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
        cross += sum(1 for r in chunk.verified if r.cloud != setup.source_cloud)
    attempts = verified + failures
    dist = stages["distribution"]
    dist.replica_success_rate = round(verified / attempts, 4) if attempts else 1.0
    dist.cross_cloud_transfers = cross
    dist.node_failures_handled = failures
    stages["storage"].by_cloud = dict(sorted(by_cloud.items()))
    stages["storage"].by_node = dict(sorted(by_node.items()))
    return PipelineResult(
        status="completed", dataset=manifest.dataset, batch_id=manifest.batch_id,
        manifest_key=key, snapshot=snapshot, lineage=lineage_of(manifest),
        duration_s=round(time.perf_counter() - started, 3),
        chunks_processed=len(new), chunks_skipped=skipped, rows_in=manifest.rows_in,
        rows_stored=manifest.rows_stored, rows_rejected=manifest.rows_rejected,
        rows_added=manifest.rows_added, rows_dropped=manifest.rows_dropped,
        bytes_in=sum(s.size - s.extends for s in manifest.lineage.sources),
        bytes_stored=manifest.bytes_stored, stages=stages, node_failures_handled=failures,
        down_nodes=setup.health.down_nodes(), skipped_files=list(skipped_files),
        odd_files=dict(odd_files or {}),
        down_reasons=setup.down_reasons(), chunks_at_risk=list(manifest.chunks_at_risk),
    )
