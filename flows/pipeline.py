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

import logging
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, SettingsContext, get_settings_context
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.credentials import resolve_credentials_with_blocks
from flows.dispatch import dispatch_to_pools, run_in_process
from flows.ephemeral import run_settings
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
from tasks.store import commit_manifest

__all__ = ["multicloud_pipeline", "run_pipeline"]



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
    with SettingsContext(profile=get_settings_context().profile, settings=run_settings()):
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
