"""The ``cloud-share`` child flow: chunks of a planned batch, moved on one cloud's pool.

The parent (``multicloud-pipeline``) plans a batch and journals the plan. Deployed, it posts
the batch's units on the claim board (:mod:`skyferry.distribute.claims`) and starts a child
per live worker of each cloud's pool (``run_deployment``); each child claims a unit, moves
its chunks (:mod:`flows.chunks`), journals each one, and claims the next, until no unit is
left. In-process (a Dask runner), one child is handed the chunks themselves. Either way the
journal is the only thing a child shares with the parent, so it can run on another machine.
"""

from __future__ import annotations

import os
import socket
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
from skyferry.distribute.claims import BoardState, Claim, ClaimBoard
from skyferry.distribute.probe import probe_nodes
from skyferry.errors import failing_as
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.run.context import BatchRun, load_batch, open_run
from tasks import distribute

__all__ = ["cloud_share"]


@flow(name=CHILD_FLOW, log_prints=False, validate_parameters=True,
      task_runner=SettingsTaskRunner())  # type: ignore[arg-type]
def cloud_share(config: PipelineConfig, batch_id: str, cloud: str,
                chunks: list[int] | None = None, pool: str | None = None,
                progress_artifact: str | None = None,
                started_at: float | None = None, done_at_start: int = 0,
                known_down: dict[str, str] | None = None) -> ShareReport:
    """Ingest, process and distribute chunks of a planned batch: ``chunks``, or (None) the
    units this child claims on the batch's claim board, its own cloud's first.

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


def _move_share(run: BatchRun, cloud: str, chunks: list[int] | None, pool: str | None,
                progress_artifact: str | None, started_at: float | None,
                done_at_start: int) -> ShareReport:
    logger = get_run_logger()
    setup, plan = run.setup, run.plan
    with failing_as("setup", dataset=plan.dataset, batch_id=plan.batch_id):
        if uses_processes(setup.settings):  # the flow's own process; the cluster gets chunks
            probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
        else:
            distribute.probe_nodes(ref(setup))
    where = pool or "in-process"
    run_id = str(flow_run.id) if flow_run.id else None
    report = ShareReport(cloud=cloud, ran_on=where, flow_run_id=run_id)
    with LiveStatus(UUID(progress_artifact) if progress_artifact else None, run.catalog,
                    plan, started_at=started_at or time.time(), done_at_start=done_at_start,
                    health=setup.health) as live:
        if chunks is None:
            _claim_and_move(run, cloud, live, report)
        else:
            done = run.catalog.done_indices(plan.dataset, plan.batch_id)
            by_index = {c.index: c for c in plan.chunks}
            todo = [by_index[i] for i in chunks if i not in done]
            logger.info("%s share of batch %s: %d chunks, %d to do, on %s", cloud,
                        plan.batch_id, len(chunks), len(todo), where,
                        extra=event(run.config, "ingestion", plan.batch_id))
            began = time.monotonic()
            report.chunks = list(chunks)
            report.stored = [c.index for c in move_chunks(todo, run, live)]
            report.busy_s = round(time.monotonic() - began, 3)
        # the report first: the parent reads it once every unit is done, and a last publish
        # to a busy API can take as long as a claim's life
        report.stages = setup.recorder.snapshot()
        report.down_reasons = setup.down_reasons()
        run.catalog.save_note(plan.dataset, plan.batch_id, f"share-{cloud}-{run_id or 'local'}",
                              report.model_dump_json().encode())
        live.update("distribution", force=True)
    return report


def _claim_and_move(run: BatchRun, cloud: str, live: LiveStatus, report: ShareReport) -> None:
    """Claim units and move their chunks until every unit is done.

    A unit is claimed whenever the chunk window has room, so the window stays full across
    units; a unit is finished once each of its chunks is journaled. While other children
    hold the last units this child waits, and takes any whose claim expires (its holder
    stopped renewing it): a dead worker's units are moved again.
    """
    logger = get_run_logger()
    plan = run.plan
    board = ClaimBoard(run.catalog.store, plan.dataset, plan.batch_id)
    live.claims = board
    by_index = {c.index: c for c in plan.chunks}
    owner = report.flow_run_id or f"{socket.gethostname()}:{os.getpid()}"
    ttl = run.config.claim_ttl_s
    fixed = run.config.work_units == "fixed"
    where = event(run.config, "distribution", plan.batch_id)
    holding: dict[int, tuple[Claim, set[int]]] = {}  # unit -> its claim, chunks not stored
    unit_of: dict[int, int] = {}
    last: list[BoardState] = []

    def finish(claim: Claim) -> None:
        holding.pop(claim.unit.index, None)
        if claim.lost:  # another child has it now; its chunks are journaled either way
            return
        with failing_as("distribution", dataset=plan.dataset, batch_id=plan.batch_id):
            claim.finish()
        report.units.append(claim.unit.index)
        report.units_stolen += claim.stolen
        report.units_retaken += claim.retaken

    def refill() -> list[ChunkPlan]:
        while True:  # until a unit with chunks to move, or none is free
            with failing_as("distribution", dataset=plan.dataset, batch_id=plan.batch_id):
                journaled = run.catalog.done_indices(plan.dataset, plan.batch_id)
                claim, state = board.claim(owner, cloud, ttl, journaled, steal=not fixed)
            last[:] = [state]
            if claim is None:
                return []
            unit = claim.unit
            logger.info("%s child claimed unit %d (%d chunks%s%s) of batch %s", cloud,
                        unit.index, len(unit.chunks),
                        f", from {unit.cloud}'s queue" if claim.stolen else "",
                        f", attempt {claim.attempt + 1}" if claim.retaken else "",
                        plan.batch_id, extra=where)
            todo = [by_index[i] for i in unit.chunks if i not in journaled]
            report.chunks.extend(unit.chunks)
            holding[unit.index] = (claim, {c.index for c in todo})
            unit_of.update((c.index, unit.index) for c in todo)
            if todo:
                return todo
            finish(claim)  # its chunks were journaled by the child that held it before

    def on_stored(chunk: StoredChunk) -> None:
        report.stored.append(chunk.index)
        held = holding.get(unit_of.get(chunk.index, -1))
        if held is not None:
            held[1].discard(chunk.index)
            if not held[1]:
                finish(held[0])

    while True:
        began = time.monotonic()
        try:
            move_chunks([], run, live, refill=refill, on_stored=on_stored)
        except BaseException:
            for claim, _ in list(holding.values()):
                claim.release()  # the next child takes them at once
            raise
        report.busy_s = round(report.busy_s + time.monotonic() - began, 3)
        state = last[0]
        if not state.held and (not state.free or fixed):
            return  # every unit is done, or (fixed) every unit this child may take
        # others hold the rest: look again when the first claim could expire, or sooner
        time.sleep(min(max(0.2, (state.next_expiry or 0) - time.time()), ttl / 6, 2.0))
