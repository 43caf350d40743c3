"""The ``multicloud-pipeline`` flow: plan a batch, hand each cloud its share, commit.

The parent probes the nodes, lists the source and plans the batch (chunks and replica
placement), journaling the plan. It splits the chunks into one share per cloud
(:func:`skyferry.shares.assign_shares`) and runs each share as a ``cloud-share`` child flow:

- deployed (``dispatch=auto`` in a deployment run, or ``dispatch=deployments``): through
  ``run_deployment`` on that cloud's work pool, all children at once;
- otherwise in-process: the parent runs the chunks' tasks itself in one window of chunks in
  flight (with a Dask runner, in one ``cloud-share`` subflow that carries it).

A pool with no live worker, a child no worker picks up in ``child_start_timeout_s``, or a
child that fails, gets its unfinished chunks reassigned to the other pools. When every chunk
is journaled the parent commits the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext, SettingsContext, get_settings_context
from prefect.runtime import flow_run
from prefect.settings import Settings as PrefectSettings
from prefect.settings import get_current_settings
from prefect.settings.models.server.services import ServerServicesDBVacuumSettings
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.credentials import resolve_credentials_with_blocks
from flows.dispatch import dispatch_to_pools, run_in_process
from flows.live import LiveStatus, create_live_status
from flows.share import event, ref, stage_error
from skyferry.config import PipelineConfig, Settings, get_settings
from skyferry.errors import SkyferryError, StageError
from skyferry.lease import DatasetLease
from skyferry.memory import tune_allocator
from skyferry.metrics import PipelineResult
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.pipeline import RunContext, build_context, summarize
from skyferry.report import placement_markdown, stage_breakdown
from skyferry.secrets import install_scrubber
from skyferry.shares import ShareReport
from tasks._common import with_retries
from tasks.distribute import probe_nodes
from tasks.ingest import list_new_files, plan_batch
from tasks.store import COMMIT_TASK, commit_manifest

__all__ = ["multicloud_pipeline", "run_pipeline", "settle_ephemeral_api"]

EPHEMERAL_RECORDER_BATCH = 100  # task-run events per database write, ephemeral API only
SETTLE_POLL_S = 0.1  # how often settle_ephemeral_api asks the API
EVENT_VACUUM_STAMPS = "skyferry-event-vacuum.json"  # in PREFECT_HOME
EPHEMERAL_STARTUP_TIMEOUT_S = 120  # how long an ephemeral API may take to start


@flow(name="multicloud-pipeline", log_prints=False, validate_parameters=True)
def multicloud_pipeline(config: PipelineConfig) -> PipelineResult:
    """Ingest a source, process it, store every chunk on R nodes (W verified), commit."""
    started = time.perf_counter()
    resolve_credentials_with_blocks()
    try:
        ctx = build_context(config)
    except SkyferryError as exc:
        raise StageError(str(exc), stage="setup", batch_id=config.batch_id or "unplanned",
                         dataset=config.dataset) from exc
    try:
        return _run_batch(config, ctx, started)
    finally:
        ctx.close()


def _run_batch(config: PipelineConfig, ctx: RunContext, started: float) -> PipelineResult:
    logger = get_run_logger()
    stage = "ingestion"
    try:
        latencies = probe_nodes(ref(ctx))
        logger.info("nodes: %s", {n: ("down" if v is None else f"{v * 1000:.1f} ms")
                                  for n, v in latencies.items()})
        lease = DatasetLease(ctx.catalog.store, config.dataset,
                             on_wait=lambda holder: logger.warning(
                                 "dataset %s is being run by another run (pid %s on %s); "
                                 "waiting for it to end", config.dataset, holder.get("pid"),
                                 holder.get("host")))
        with lease:
            return _plan_and_move(config, ctx, started)
    except StageError:
        raise
    except Exception as exc:
        raise stage_error(stage, ctx, exc) from exc


def _plan_and_move(config: PipelineConfig, ctx: RunContext, started: float) -> PipelineResult:
    """List, plan, move and commit, while this run holds the dataset's lease."""
    logger = get_run_logger()
    stage = "ingestion"
    try:
        if config.batch_id is not None:  # committed before, or by the run this one waited for
            for manifest in ctx.catalog.manifests(config.dataset):
                if manifest.batch_id == config.batch_id:
                    logger.info("batch %s is already committed; nothing to do", config.batch_id)
                    return PipelineResult(status="already_committed", dataset=config.dataset,
                                          batch_id=config.batch_id,
                                          chunks_skipped=len(manifest.chunks),
                                          duration_s=round(time.perf_counter() - started, 3))
        files = with_retries(list_new_files)(ref(ctx))
        if not files:
            logger.info("no new or changed files under %s", config.source)
            return PipelineResult(status="up_to_date", dataset=config.dataset,
                                  skipped_files=list(ctx.skipped_files),
                                  duration_s=round(time.perf_counter() - started, 3))
        plan, resumed = with_retries(plan_batch)(ref(ctx), ref(files))
        done = ctx.catalog.done_chunks(plan.dataset, plan.batch_id) if resumed else {}
        todo = [c for c in plan.chunks if c.index not in done]
        logger.info("batch %s: %d chunks, %d to do, %d already stored", plan.batch_id,
                    len(plan.chunks), len(todo), len(done), extra=event(ctx, "ingestion"))
        progress = create_live_status(plan, len(done))
        stage = "distribution"
        with LiveStatus(progress, ctx.catalog, plan, started_at=time.time(),
                        done_at_start=len(done), health=ctx.health) as live:
            if config.dispatch == "deployments" or (config.dispatch == "auto" and _deployed()):
                reports = dispatch_to_pools(ctx, todo, live)
            else:
                reports = run_in_process(ctx, todo, live)
            stage = "storage"
            new = _collect(ctx, todo, reports)
            live.update("storage", force=True)
        commit = with_retries(commit_manifest)
        manifest, key = commit(ref(ctx), ref(list(done.values()) + new))
    except StageError:
        raise
    except Exception as exc:
        raise stage_error(stage, ctx, exc) from exc
    result = summarize(ctx, manifest, key, new, len(done), started)
    result.flow_run_id = str(flow_run.id) if flow_run.id else None
    publish_artifacts(result)
    logger.info("committed %s: %d chunks, %d rows stored, %d rejected", key,
                len(manifest.chunks), result.rows_stored, result.rows_rejected,
                extra=event(ctx, "storage"))
    return result


def _deployed() -> bool:
    """Whether this run was started from a deployment.

    Read from the run itself: ``prefect.runtime.deployment.id`` fetches the run from the API
    (with a new client) whenever it has no deployment.
    """
    run = FlowRunContext.get()
    return run is not None and run.flow_run is not None and run.flow_run.deployment_id is not None


def _collect(ctx: RunContext, todo: list[ChunkPlan],
             reports: list[ShareReport]) -> list[StoredChunk]:
    """The chunks the children journaled; merge their metrics and node health into ``ctx``."""
    assert ctx.plan is not None
    journal = ctx.catalog.done_chunks(ctx.plan.dataset, ctx.plan.batch_id)
    missing = [c.index for c in todo if c.index not in journal]
    if missing:
        raise StageError(
            f"{len(missing)} chunks of batch {ctx.plan.batch_id} were not stored by any "
            f"child run: {missing[:20]}", stage="distribution", batch_id=ctx.plan.batch_id,
            dataset=ctx.config.dataset)
    for report in reports:
        ctx.recorder.merge(report.stages)
        for node, reason in report.down_reasons.items():
            if ctx.health.healthy(node):  # keep the first reason a node was found down
                ctx.health.mark(node, "down", reason)
    return [journal[c.index] for c in todo]


def publish_artifacts(result: PipelineResult) -> None:
    """The stage breakdown (bottleneck flagged) and the placement summary, in the Prefect UI."""
    slug = "".join(c if c.isalnum() else "-" for c in result.dataset.lower()).strip("-")
    create_table_artifact(table=stage_breakdown(result), key=f"{slug}-stage-breakdown",
                          description=f"Stages of {result.dataset} batch {result.batch_id}")
    create_markdown_artifact(markdown=placement_markdown(result), key=f"{slug}-placement",
                             description=f"Where the replicas of batch {result.batch_id} went")


def _run_settings() -> PrefectSettings:
    """The current Prefect settings, adjusted for an ephemeral API (no ``PREFECT_API_URL``).

    An ephemeral API lives and dies with this process, so:

    - no flow-run heartbeats: nothing can watch them, and Prefect's heartbeat thread, which
      sleeps in 1 s steps, held up the end of every run by up to a second (0.7 s of a 1.1 s
      run of 1 MiB, measured);
    - the server records task-run events in batches (up to ``EPHEMERAL_RECORDER_BATCH`` per
      write, at least once a second) instead of one database transaction per event. That
      halved the server's CPU per chunk task (64 empty chunks: 2.0–2.8 s before, 0.9–1.5 s
      after, measured), CPU the chunks' own work needs on a small machine. Set either
      setting and yours is kept;
    - its event vacuum runs at most once per loop (:func:`_pace_event_vacuum`);
    - it has ``EPHEMERAL_STARTUP_TIMEOUT_S`` to start, not Prefect's 20 s: on a new database
      it first builds its schema, and the first start here took 21-22 s in a benchmark with
      the cloud servers running (a start timed out at 20 s once). Set
      ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` and yours is kept.

    Against a real server the settings are the server's and the heartbeats stay. A copy,
    not ``temporary_settings``: that rebuilds every settings model from the environment.
    """
    current = get_current_settings()
    if current.api.url:
        return current
    flows = current.flows.model_copy(update={"heartbeat_frequency": None})
    services = current.server.services
    recorder = services.task_run_recorder
    ours = {"batch_size": EPHEMERAL_RECORDER_BATCH, "flush_interval": 1.0}
    recorder = recorder.model_copy(
        update={k: v for k, v in ours.items() if k not in recorder.model_fields_set})
    vacuum = _pace_event_vacuum(current)
    ephemeral = current.server.ephemeral
    if "startup_timeout_seconds" not in ephemeral.model_fields_set:
        ephemeral = ephemeral.model_copy(
            update={"startup_timeout_seconds": EPHEMERAL_STARTUP_TIMEOUT_S})
    services = services.model_copy(update={"task_run_recorder": recorder, "db_vacuum": vacuum})
    server = current.server.model_copy(update={"ephemeral": ephemeral, "services": services})
    return current.model_copy(update={"flows": flows, "server": server})


def _pace_event_vacuum(current: PrefectSettings) -> ServerServicesDBVacuumSettings:
    """The API's vacuum settings: its event vacuum at most once per ``loop_seconds``.

    A long-lived Prefect server deletes expired events once per ``db_vacuum.loop_seconds``
    (an hour by default), but an ephemeral API is a new server in every process, and it
    vacuums as it starts: each ``skyferry run`` paid for it, and the run's first write
    waited behind it (a progress artifact took 280-380 ms against 11-29 ms, on an API
    database holding 1,433 task runs; measured). So the vacuum runs in an ephemeral API only
    when the last one that was let run, on the same database, is ``loop_seconds`` old; the
    time is kept in ``EVENT_VACUUM_STAMPS`` in ``PREFECT_HOME``. An operator who sets
    ``PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED`` keeps their setting.
    """
    vacuum = current.server.services.db_vacuum
    types = vacuum.enabled_vacuum_types
    if "enabled" in vacuum.model_fields_set or "events" not in types:
        return vacuum
    path = current.home / EVENT_VACUUM_STAMPS  # with the API's database, not the data
    url = current.server.database.connection_url  # may hold a password: kept hashed
    database = hashlib.sha256(
        (url.get_secret_value() if url else str(current.home)).encode()).hexdigest()[:16]
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        stamps = {}
    stamps = stamps if isinstance(stamps, dict) else {}
    now = time.time()
    last = stamps.get(database)
    if isinstance(last, (int, float)) and 0 <= now - last < vacuum.loop_seconds:
        # The other types run only on a long-lived server; an empty set cannot reach the
        # API's process (its environment reads "" as the default), so "orphans" stands in.
        return vacuum.model_copy(update={"enabled": (types - {"events"}) or {"orphans"}})
    stamps[database] = now
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, path)
    except OSError as exc:  # the vacuum runs now and next time: slower, never wrong
        logging.getLogger("skyferry.pipeline").warning(
            "could not record the API's event vacuum in %s: %s", path, exc)
    return vacuum


def run_pipeline(config: PipelineConfig, settings: Settings | None = None) -> PipelineResult:
    """Run the flow (ephemeral API unless PREFECT_API_URL is set) and return its result.

    A failed run returns ``status="failed"`` with the error and the stage it failed in.
    """
    settings = settings or get_settings()
    if settings.tune_malloc:  # before Prefect starts its threads: see skyferry/memory.py
        tune_allocator()
    install_scrubber()  # no registered secret reaches a log handler, Prefect's API included
    # the parent's own tasks (probe, list, plan, commit) share its context: threads
    runner: Any = ThreadPoolTaskRunner(max_workers=settings.max_workers)
    with SettingsContext(profile=get_settings_context().profile, settings=_run_settings()):
        state = multicloud_pipeline.with_options(task_runner=runner)(config=config,
                                                                     return_state=True)
    try:
        result: PipelineResult = state.result()
        return result
    except StageError as exc:
        logging.getLogger("skyferry.pipeline").error("%s", exc)
        run_id = state.state_details.flow_run_id
        return PipelineResult(status="failed", dataset=config.dataset, batch_id=exc.batch_id,
                              error=str(exc), error_stage=exc.stage,
                              error_type=type(exc.__cause__ or exc).__name__,
                              flow_run_id=str(run_id) if run_id else None)


def settle_ephemeral_api(result: PipelineResult, timeout_s: float = 10.0) -> bool:
    """Wait (at most ``timeout_s``) until an ephemeral API has recorded the run's task runs.

    Call it before a process that ran flows on an ephemeral API exits. That API records
    task-run states from the runs' events, in batches (see :func:`_run_settings`), and it
    stops when the process exits: a batch still queued then is lost from the local run
    history, and Prefect prints each one as an error with a traceback. The recorder takes
    events in order, so once the run's last task (``commit-manifest`` in a committed run) is
    recorded final and no task run is left unfinished, every earlier one is recorded too.

    Returns whether that holds. With ``PREFECT_API_URL`` set it returns at once: a real
    server outlives this process.
    """
    if get_current_settings().api.url or not result.flow_run_id:
        return True
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(result.flow_run_id)]))
    unfinished = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[
        StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED,
        StateType.CANCELLING])))
    last = TaskRunFilter(name=TaskRunFilterName(like_=COMMIT_TASK)) \
        if result.status == "completed" else None
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            settled = not client.read_task_runs(flow_run_filter=runs,
                                                task_run_filter=unfinished, limit=1)
            if settled:
                recorded = client.read_task_runs(flow_run_filter=runs, task_run_filter=last,
                                                 limit=1)
                settled = bool(recorded) and all(r.state is not None and r.state.is_final()
                                                 for r in recorded)
            if settled or time.monotonic() >= deadline:
                return settled
            time.sleep(SETTLE_POLL_S)
