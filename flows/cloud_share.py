"""The ``cloud-share`` child flow: one cloud's share of a planned batch.

The parent (``multicloud-pipeline``) plans a batch and journals the plan; each child takes the
chunk indices it was handed, moves them (:mod:`flows.chunks`), and journals every stored
chunk. When deployed, a child runs on its cloud's work pool (``run_deployment``); otherwise
it runs in-process as a subflow. Either way the journal is the only thing it shares with
the parent, so it can run on another machine.
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.chunks import move_chunks
from flows.common import emit_node_events, event, ref
from flows.live import LiveStatus
from flows.runners import SettingsTaskRunner, uses_processes
from flows.shares import CHILD_FLOW, ShareReport
from skyferry.config import PipelineConfig
from skyferry.distribute.probe import probe_nodes
from skyferry.errors import failing_as
from skyferry.run.context import BatchRun, load_batch, open_run
from tasks import distribute

__all__ = ["cloud_share"]


@flow(name=CHILD_FLOW, log_prints=False, validate_parameters=True,
      task_runner=SettingsTaskRunner())  # type: ignore[arg-type]
def cloud_share(config: PipelineConfig, batch_id: str, cloud: str, chunks: list[int],
                pool: str | None = None, progress_artifact: str | None = None,
                started_at: float | None = None, done_at_start: int = 0,
                known_down: dict[str, str] | None = None) -> ShareReport:
    """Ingest, process and distribute the chunks ``chunks`` of a planned batch.

    ``known_down`` are nodes an earlier in-process share found down, with why; they are
    avoided without being probed again. A child on another pool probes every node itself.
    """
    with failing_as("setup", dataset=config.dataset, batch_id=batch_id):
        setup = open_run(config)
    emit_node_events(setup)
    for node, reason in (known_down or {}).items():
        setup.health.mark(node, "down", reason)
    with failing_as("setup", dataset=config.dataset, batch_id=batch_id):
        run = load_batch(setup, batch_id)
    try:
        return _move_share(run, cloud, chunks, pool, progress_artifact, started_at,
                           done_at_start)
    finally:
        run.close()


def _move_share(run: BatchRun, cloud: str, chunks: list[int], pool: str | None,
                progress_artifact: str | None, started_at: float | None,
                done_at_start: int) -> ShareReport:
    logger = get_run_logger()
    setup, plan = run.setup, run.plan
    with failing_as("setup", dataset=plan.dataset, batch_id=plan.batch_id):
        if uses_processes(setup.settings):  # the flow's own process; the cluster gets chunks
            probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
        else:
            distribute.probe_nodes(ref(setup))
        done = run.catalog.done_indices(plan.dataset, plan.batch_id)
    by_index = {c.index: c for c in plan.chunks}
    todo = [by_index[i] for i in chunks if i not in done]
    where = pool or "in-process"
    logger.info("%s share of batch %s: %d chunks, %d to do, on %s", cloud, plan.batch_id,
                len(chunks), len(todo), where,
                extra=event(run.config, "ingestion", plan.batch_id))
    with LiveStatus(UUID(progress_artifact) if progress_artifact else None, run.catalog,
                    plan, started_at=started_at or time.time(), done_at_start=done_at_start,
                    health=setup.health) as live:
        stored = move_chunks(todo, run, live)
        live.update("distribution", force=True)
    run_id = str(flow_run.id) if flow_run.id else None
    report = ShareReport(
        cloud=cloud, ran_on=where, flow_run_id=run_id, chunks=list(chunks),
        stored=[c.index for c in stored], stages=setup.recorder.snapshot(),
        down_reasons=setup.down_reasons(),
    )
    run.catalog.save_note(plan.dataset, plan.batch_id, f"share-{cloud}-{run_id or 'local'}",
                          report.model_dump_json().encode())
    return report
