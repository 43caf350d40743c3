"""The ``multicloud-pipeline`` flow: plan a batch, move its chunks, commit.

The parent probes the nodes, lists the source and plans the batch (chunks and replica
placement), journaling the plan. Then:

- deployed (``dispatch=auto`` in a deployment run, or ``dispatch=deployments``): it posts
  the chunks as units on a claim board and starts ``cloud-share`` children on every cloud's
  work pool, one per online worker, through ``run_deployment``; the children claim units as
  they go (:mod:`flows.dispatch`);
- otherwise in-process: the parent runs the chunks' tasks itself in one window of chunks in
  flight (with a Dask runner, in one ``cloud-share`` subflow that carries it).

When every chunk is journaled the parent commits the manifest.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, SettingsContext, get_settings_context
from prefect.exceptions import MissingResult
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.alerts import emit_budget_refused, emit_run_alerts
from flows.common import emit_node_events, event, ref
from flows.dispatch import Dispatched, dispatch_to_pools, run_in_process
from flows.ephemeral import guard_ephemeral_api, run_settings
from flows.live import LiveStatus, create_live_status
from flows.shares import ShareReport
from skyferry.commit.lease import DatasetLease
from skyferry.config import PipelineConfig, Settings, get_settings
from skyferry.errors import (
    EgressBudgetError,
    PlacementError,
    SkyferryError,
    StageError,
    failing_as,
)
from skyferry.memory import tune_allocator
from skyferry.metrics import PipelineResult
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.ops.costs import CostPlan, RunRecord, actual_costs, check_budget, plan_for, record_run
from skyferry.ops.report import placement_markdown, stage_breakdown
from skyferry.run.batch import check_batch_reuse, summarize
from skyferry.run.context import BatchRun, RunSetup, open_run
from skyferry.secrets import install_scrubber
from tasks._common import with_retries
from tasks.commit import commit_manifest, publish_snapshot_tables
from tasks.distribute import probe_nodes
from tasks.ingest import list_new_files, plan_batch

__all__ = ["multicloud_pipeline", "run_pipeline"]



@flow(name="multicloud-pipeline", log_prints=False, validate_parameters=True)
def multicloud_pipeline(config: PipelineConfig) -> PipelineResult:
    """Ingest a source, process it, store every chunk on R nodes (W verified), commit."""
    started = time.perf_counter()
    guard_ephemeral_api()  # the API's server ends with this process, even on SIGKILL
    batch = config.batch_id or "unplanned"
    with failing_as("setup", dataset=config.dataset, batch_id=batch):
        setup = open_run(config)
    emit_node_events(setup)
    logger = get_run_logger()
    with failing_as("setup", dataset=config.dataset, batch_id=batch):
        latencies = probe_nodes(ref(setup))
        logger.info("nodes: %s", {n: ("down" if v is None else f"{v * 1000:.1f} ms")
                                  for n, v in latencies.items()})
        lease = DatasetLease(setup.catalog.store, config.dataset,
                             on_wait=lambda holder: logger.warning(
                                 "dataset %s is being run by another run (pid %s on %s); "
                                 "waiting for it to end", config.dataset, holder.get("pid"),
                                 holder.get("host")))
    # the lease's taking and release are setup's; the batch's stages raise their own
    with failing_as("setup", dataset=config.dataset, batch_id=batch), lease:
        result = _run_batch(setup, started)
    if flow_run.id:
        _RETURNED[str(flow_run.id)] = result
    return result


# What each run of this process returned. The reply to a run's Completed can be lost on a
# busy API (a timeout after the server set it); the client's retry then gets back the
# server's Completed, which carries no result, and run_pipeline reads the result here.
_RETURNED: dict[str, PipelineResult] = {}


def _run_batch(setup: RunSetup, started: float) -> PipelineResult:
    """List, plan, move and commit, while this run holds the dataset's lease."""
    logger = get_run_logger()
    config = setup.config
    batch = config.batch_id or "unplanned"
    with failing_as("ingestion", dataset=config.dataset, batch_id=batch):  # the listing
        if config.batch_id is not None:  # committed before, or by the run this one waited for
            for manifest in setup.catalog.manifests(config.dataset):
                if manifest.batch_id == config.batch_id:
                    check_batch_reuse(setup, manifest)
                    logger.info("batch %s is already committed; nothing to do",
                                config.batch_id)
                    return PipelineResult(status="already_committed", dataset=config.dataset,
                                          batch_id=config.batch_id,
                                          chunks_skipped=len(manifest.chunks),
                                          duration_s=round(time.perf_counter() - started, 3))
        listing = with_retries(list_new_files)(ref(setup))
    if not listing.files:
        logger.info("no new or changed files under %s", config.source)
        return PipelineResult(status="up_to_date", dataset=config.dataset,
                              skipped_files=list(listing.skipped),
                              odd_files=dict(listing.odd),
                              duration_s=round(time.perf_counter() - started, 3))
    costs: CostPlan | None = None
    with failing_as("ingestion", dataset=config.dataset, batch_id=batch):  # before any write
        try:
            costs = plan_for(setup, deployed=_dispatched(config), files=listing.files,
                             probe=False)
        except PlacementError:  # planning the batch raises it again, as distribution's
            logger.warning("the run's cost cannot be planned: its chunks cannot be placed")
    if costs is not None:
        logger.info("plan: %d chunks, %d bytes to write, egress $%.4f, ETA %s",
                    costs.chunks, sum(r.bytes for r in costs.routes if r.hop == "write"),
                    costs.egress_usd, "unknown" if costs.eta_s is None
                    else f"{costs.eta_s:.1f} s")
        with failing_as("setup", dataset=config.dataset, batch_id=batch):
            try:
                check_budget(costs, config.max_egress_usd)
            except EgressBudgetError as exc:
                emit_budget_refused(config, exc.planned_usd, exc.limit_usd)
                raise
    # planning the chunks; placing them raises as distribution's
    with failing_as("ingestion", dataset=config.dataset, batch_id=batch):
        run = with_retries(plan_batch)(ref(setup), ref(listing.files))
    try:
        return _move_and_commit(run, listing.skipped, started, listing.odd, costs)
    finally:
        run.close()


def _move_and_commit(run: BatchRun, skipped_files: list[str], started: float,
                     odd_files: dict[str, str], costs: CostPlan | None) -> PipelineResult:
    logger = get_run_logger()
    config, plan = run.config, run.plan
    done = run.catalog.done_chunks(plan.dataset, plan.batch_id) if run.resumed else {}
    todo = [c for c in plan.chunks if c.index not in done]
    logger.info("batch %s: %d chunks, %d to do, %d already stored", plan.batch_id,
                len(plan.chunks), len(todo), len(done),
                extra=event(config, "ingestion", plan.batch_id))
    with failing_as("distribution", dataset=config.dataset, batch_id=plan.batch_id):
        progress = create_live_status(plan, len(done))
        with LiveStatus(progress, run.catalog, plan, started_at=time.time(),
                        done_at_start=len(done), health=run.setup.health) as live:
            if _dispatched(config):
                moved = dispatch_to_pools(run, todo, live)
            else:
                moved = Dispatched(run_in_process(run, todo, live))
            reports = moved.reports
            with failing_as("storage", dataset=config.dataset, batch_id=plan.batch_id):
                new = _collect(run, todo, reports)
                live.update("storage", force=True)
    with failing_as("storage", dataset=config.dataset, batch_id=plan.batch_id):
        manifest, key, snapshot = with_retries(commit_manifest)(
            ref(run), ref(list(done.values()) + new))
    result = summarize(run, manifest, key, new, len(done), started, skipped_files, odd_files,
                       snapshot)
    result.flow_run_id = str(flow_run.id) if flow_run.id else None
    result.children, result.utilization = moved.children, moved.utilization()
    result.distribution_wall_s = moved.wall_s
    sizes = {c.index: c.size for c in run.plan.chunks}
    result.child_mb_s = [round(sum(sizes[i] for i in r.stored) / r.busy_s / 1e6, 3)
                         for r in reports if r.busy_s > 0 and moved.children]
    result.units_stolen = sum(r.units_stolen for r in reports)
    result.units_retaken = sum(r.units_retaken for r in reports)
    _planned_against_actual(run, result, costs, new, reports)
    if config.tables and snapshot:
        try:
            tables = publish_snapshot_tables(ref(run), snapshot)
            result.tables, result.tables_skipped = tables.published, tables.skipped
        except SkyferryError as exc:  # the batch is committed: the tables wait for the next
            logger.warning("snapshot %s was not published as tables: %s", snapshot, exc)
            result.tables_skipped = [str(exc)]
    publish_artifacts(result)
    emit_run_alerts(result)
    logger.info("committed %s: %d chunks, %d rows stored, %d rejected", key,
                len(manifest.chunks), result.rows_stored, result.rows_rejected,
                extra=event(config, "storage", plan.batch_id))
    return result


def _planned_against_actual(run: BatchRun, result: PipelineResult, costs: CostPlan | None,
                            new: list[StoredChunk], reports: list[ShareReport]) -> None:
    """Put the plan beside what the run did, and keep the run's rate for the next plans."""
    setup = run.setup
    clouds = set(setup.topology.clouds)
    worker_of = {i: r.cloud for r in reports if r.cloud in clouds for i in r.stored}
    routes, egress = actual_costs(setup.topology, setup.source_cloud, new, worker_of,
                                  setup.settings.block_size)
    result.bytes_written = sum(r.bytes for r in routes if r.hop == "write")
    result.egress_usd = egress
    if costs is not None:
        result.planned_bytes_written = sum(r.bytes for r in costs.routes if r.hop == "write")
        result.planned_egress_usd = costs.egress_usd
        result.planned_eta_s = costs.eta_s
    if run.resumed or not new:  # a part of a batch says nothing of a whole one's rate
        return
    try:
        record_run(run.catalog, RunRecord(
            dataset=run.plan.dataset, batch_id=run.plan.batch_id,
            at=datetime.now(UTC).isoformat(timespec="seconds"),
            bytes_in=sum(p.size for c in new for p in c.parts),
            bytes_stored=sum(c.size for c in new), wall_s=result.duration_s,
            workers=max(1, len(reports))))
    except SkyferryError as exc:  # the batch is committed: only a later ETA is poorer
        get_run_logger().warning("the run's rate was not recorded: %s", exc)


def _dispatched(config: PipelineConfig) -> bool:
    """Whether the chunks go to child runs on the clouds' work pools."""
    return config.dispatch == "deployments" or (config.dispatch == "auto" and _deployed())


def _deployed() -> bool:
    """Whether this run was started from a deployment.

    Read from the run itself: ``prefect.runtime.deployment.id`` fetches the run from the API
    (with a new client) whenever it has no deployment.
    """
    run = FlowRunContext.get()
    return run is not None and run.flow_run is not None and run.flow_run.deployment_id is not None


def _collect(run: BatchRun, todo: list[ChunkPlan],
             reports: list[ShareReport]) -> list[StoredChunk]:
    """The chunks the children journaled; merge their metrics and node health into the run."""
    plan, setup = run.plan, run.setup
    journal = run.catalog.done_chunks(plan.dataset, plan.batch_id)
    missing = [c.index for c in todo if c.index not in journal]
    if missing:
        raise StageError(
            f"{len(missing)} chunks of batch {plan.batch_id} were not stored by any "
            f"child run: {missing[:20]}", stage="distribution", batch_id=plan.batch_id,
            dataset=plan.dataset)
    for report in reports:
        setup.recorder.merge(report.stages)
        for node, reason in report.down_reasons.items():
            if setup.health.healthy(node):  # keep the first reason a node was found down
                setup.health.mark(node, "down", reason)
    return [journal[c.index] for c in todo]


def publish_artifacts(result: PipelineResult) -> None:
    """The stage breakdown (bottleneck flagged) and the placement summary, in the Prefect UI."""
    slug = "".join(c if c.isalnum() else "-" for c in result.dataset.lower()).strip("-")
    create_table_artifact(table=stage_breakdown(result), key=f"{slug}-stage-breakdown",
                          description=f"Stages of {result.dataset} batch {result.batch_id}")
    create_markdown_artifact(markdown=placement_markdown(result), key=f"{slug}-placement",
                             description=f"Where the replicas of batch {result.batch_id} went")


def run_pipeline(config: PipelineConfig, settings: Settings | None = None) -> PipelineResult:
    """Run the flow (ephemeral API unless PREFECT_API_URL is set) and return its result.

    A failed run returns ``status="failed"`` with the error and the stage it failed in.
    """
    started = time.perf_counter()
    settings = settings or get_settings()
    if settings.tune_malloc:  # before Prefect starts its threads: see skyferry/memory.py
        tune_allocator()
    install_scrubber()  # no registered secret reaches a log handler, Prefect's API included
    # the parent's own tasks (probe, list, plan, commit) share its context: threads
    runner: Any = ThreadPoolTaskRunner(max_workers=settings.max_workers)
    prefect_settings = run_settings(settings)  # starts or finds the local API, if that is used
    with SettingsContext(profile=get_settings_context().profile, settings=prefect_settings):
        state = multicloud_pipeline.with_options(task_runner=runner)(config=config,
                                                                     return_state=True)
    returned = _RETURNED.pop(str(state.state_details.flow_run_id), None)
    try:
        try:
            result: PipelineResult = state.result()
        except MissingResult:
            if returned is None:
                raise
            result = returned
        return result
    except StageError as exc:
        logging.getLogger("skyferry.run").error("%s", exc)
        run_id = state.state_details.flow_run_id
        return PipelineResult(status="failed", dataset=config.dataset, batch_id=exc.batch_id,
                              error=str(exc), error_stage=exc.stage,
                              error_type=type(exc.__cause__ or exc).__name__,
                              flow_run_id=str(run_id) if run_id else None,
                              duration_s=round(time.perf_counter() - started, 3))
