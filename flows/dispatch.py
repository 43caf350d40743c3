"""Start ``cloud-share`` child runs on the clouds' work pools, and see them through.

Not deployed, the parent runs the chunks itself (see :func:`run_in_process`). Deployed, the
parent posts the batch's units on its claim board (:mod:`skyferry.distribute.claims`) and
starts one child run of each cloud's deployment (``cloud-share/<cloud>-share``) per online
worker of its pool, at most the pool's concurrency limit, with ``run_deployment(timeout=0)``.
The children claim units as they go, so a slow pool takes fewer and a free one takes more;
the parent only watches them through the API:

- a cloud whose pool has no online worker, or has no share deployment, gets no child;
- a child still waiting for a worker after ``child_start_timeout_s`` is cancelled, and its
  pool gets no more children;
- a child that ends failed, crashed or cancelled gives its units back (or lets their claims
  expire); the others take them;
- when units are free and no chunk was stored for a claim's life with no child waiting to
  start (every child ended, or their workers died), new children are started on the pools
  left;
- once every unit is done, a child still running after ``claim_ttl_s`` (its worker died with
  it) is cancelled.

Each child is created with an idempotency key (this parent run, its attempt, the cloud and
the launch's number). On a busy API server a create can time out after the server made the
run; the client's retry then gets that same run back instead of a second child.

When no pool is left, the parent moves the chunks still unjournaled in-process itself: a run
never waits on a dead pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import StateType, WorkerStatus
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Cancelled

from flows.chunks import move_chunks
from flows.cloud_share import cloud_share
from flows.common import event
from flows.live import LiveStatus
from flows.runners import make_task_runner, uses_processes
from flows.shares import ShareReport, share_deployment
from skyferry.distribute.claims import UNIT_BYTES, ClaimBoard, assign_shares, cut_units
from skyferry.models import ChunkPlan
from skyferry.run.context import BatchRun

__all__ = ["Dispatched", "dispatch_to_pools", "run_in_process", "POLL_S"]

POLL_S = 1.0  # how often the parent reads its children's states and the claim board
UNITS_PER_CHILD = 32  # units are cut so that each child can take at least this many
MAX_LAUNCH_ROUNDS = 3  # children started again after a stall, at most this many times


@dataclass
class Dispatched:
    """What moving a batch's chunks took: the children's reports, the workers each pool had,
    and the wall time from the first child's start to the last unit's end."""

    reports: list[ShareReport]
    children: int = 0
    workers: dict[str, int] = field(default_factory=dict)  # pool -> workers counted
    wall_s: float = 0.0

    def utilization(self) -> dict[str, float]:
        """Busy worker-seconds ÷ (workers × wall), per pool and under ``all``."""
        if not self.children or self.wall_s <= 0:
            return {}
        busy: dict[str, float] = {}
        for report in self.reports:
            busy[report.ran_on] = busy.get(report.ran_on, 0.0) + report.busy_s
        out = {pool: round(busy.get(pool, 0.0) / (n * self.wall_s), 3)
               for pool, n in self.workers.items() if n}
        out["all"] = round(sum(busy.values()) / (sum(self.workers.values()) * self.wall_s), 3)
        return out


def _child_parameters(run: BatchRun, cloud: str, chunks: list[int] | None, pool: str | None,
                      live: LiveStatus) -> dict[str, Any]:
    return {
        "config": run.config.model_dump(mode="json"),
        "batch_id": run.plan.batch_id,
        "cloud": cloud,
        "chunks": chunks,
        "pool": pool,
        "progress_artifact": str(live.artifact_id) if live.artifact_id else None,
        "started_at": live.started_at,
        "done_at_start": live.done_at_start,
    }


def run_in_process(run: BatchRun, todo: list[ChunkPlan], live: LiveStatus) -> list[ShareReport]:
    """Run the chunks in this flow run, in one window of ``max_in_flight`` chunks.

    With a thread runner the chunks' tasks run in the parent itself: a child flow run costs
    the API a second or more per run on a small machine, and buys nothing in one process.
    With a process-based runner (Dask) the chunks run in one ``cloud-share`` subflow that
    carries that runner; its metrics come back in its report. A failure fails the run.
    """
    if not todo:
        return []
    if not uses_processes(run.setup.settings):
        move_chunks(todo, run, live)  # journals each chunk; metrics land in run.setup
        return []
    with get_client(sync_client=True) as client:  # the API this run reports to
        api_env = {"PREFECT_API_URL": str(client.api_url)}
    auth = get_current_settings().api.auth_string  # a local API's password (flows/local_api.py)
    if auth is not None:
        api_env["PREFECT_API_AUTH_STRING"] = auth.get_secret_value()
    child = cloud_share.with_options(task_runner=make_task_runner(run.setup.settings, api_env))
    down = run.setup.down_reasons()
    report: ShareReport = child(**{
        **_child_parameters(run, "all", [c.index for c in todo], None, live),
        "known_down": down})
    return [report]


def _pool_slots(client: SyncPrefectClient, pool: str) -> tuple[int, str]:
    """How many children ``pool`` can run at once: its online workers, at most its
    concurrency limit; 0 with why when it can take none."""
    try:
        work_pool = client.read_work_pool(pool)
        workers = client.read_workers_for_work_pool(pool)
    except ObjectNotFound:
        return 0, f"work pool {pool} does not exist"
    online = sum(1 for w in workers if w.status == WorkerStatus.ONLINE)
    if not online:
        return 0, f"work pool {pool} has no online worker"
    limit = work_pool.concurrency_limit
    if work_pool.is_paused or limit == 0:
        return 0, f"work pool {pool} is paused or has a concurrency limit of 0"
    slots = online if limit is None else min(online, limit)
    return slots, f"{online} online worker(s)" + (f", concurrency limit {limit}"
                                                 if limit is not None else "")


def _deployment_exists(client: SyncPrefectClient, name: str) -> bool:
    try:
        client.read_deployment_by_name(name)
    except ObjectNotFound:
        return False
    return True


def _child_key(batch_id: str, cloud: str, launch: int) -> str:
    """One key per child this parent run creates: a retried create returns the same run."""
    return f"{flow_run.id}/{flow_run.run_count}/{batch_id}/{cloud}/{launch}"


@dataclass
class _Child:
    cloud: str
    pool: str
    created: float
    running: bool = False


def _unit_bytes(run: BatchRun, todo: list[ChunkPlan], slots: dict[str, int]) -> int | dict[
        str, int]:
    """Units small enough that each child can take several (``flow``); or (``fixed``) one
    share per child of its cloud's bytes."""
    if run.config.work_units == "fixed":
        shares = assign_shares(todo, run.setup.topology, slots)
        sizes = {c.index: c.size for c in todo}
        return {cloud: max(1, -(-sum(sizes[i] for i in indices) // slots[cloud]))
                for cloud, indices in shares.items()}
    total = sum(c.size for c in todo)
    return max(1, min(UNIT_BYTES, total // (UNITS_PER_CHILD * sum(slots.values()))))


_ENDED = (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)


def dispatch_to_pools(run: BatchRun, todo: list[ChunkPlan], live: LiveStatus) -> Dispatched:
    """Post the batch's units and run children on the clouds' pools until every unit is done."""
    logger = get_run_logger()
    plan = run.plan
    topology = run.setup.topology
    timeout, ttl = run.config.child_start_timeout_s, run.config.claim_ttl_s
    where = event(run.config, "distribution", plan.batch_id)
    children: dict[UUID, _Child] = {}
    launched: set[UUID] = set()
    with get_client(sync_client=True) as client:
        slots: dict[str, int] = {}
        for cloud in topology.clouds:
            pool = topology.pool_for(cloud)
            n, why = _pool_slots(client, pool)
            if n and not _deployment_exists(client, share_deployment(cloud)):
                n, why = 0, f"deployment {share_deployment(cloud)} does not exist"
            logger.info("%s: pool %s %s", cloud, pool, f"takes {n} children ({why})" if n
                        else f"is out: {why}", extra=where)
            if n:
                slots[cloud] = n
        if not todo or not slots:
            if todo:
                logger.warning("no work pool can take %d chunks; running them in-process",
                               len(todo), extra=where)
            return Dispatched(run_in_process(run, todo, live))
        workers = {topology.pool_for(c): n for c, n in slots.items()}
        board = ClaimBoard(run.catalog.store, plan.dataset, plan.batch_id)
        units = board.post(cut_units(todo, topology, slots,
                                     _unit_bytes(run, todo, slots)))
        live.claims = board
        logger.info("batch %s: %d units (%s) of up to %d bytes on the claim board",
                    plan.batch_id, len(units), run.config.work_units,
                    max(u.bytes for u in units), extra=where)
        started = time.monotonic()
        launches = 0

        def launch_round() -> None:
            nonlocal launches
            for cloud, n in sorted(slots.items()):
                pool = topology.pool_for(cloud)
                for _ in range(n):
                    launches += 1
                    child_run: Any = run_deployment(
                        share_deployment(cloud), timeout=0, as_subflow=True,
                        idempotency_key=_child_key(plan.batch_id, cloud, launches),
                        parameters=_child_parameters(run, cloud, None, pool, live),
                        flow_run_name=f"{plan.dataset}-{plan.batch_id[:8]}-{cloud}-{launches}",
                        tags=["skyferry", f"cloud:{cloud}"],
                    )
                    children[child_run.id] = _Child(cloud, pool, time.monotonic())
                    launched.add(child_run.id)
                    logger.info("%s child %d → %s (child run %s)", cloud, launches, pool,
                                child_run.id, extra=where)

        launch_round()
        rounds = 1
        progress = [0, time.monotonic()]  # chunks journaled, and when that last changed
        done_at: float | None = None
        while children:
            time.sleep(POLL_S)
            for run_id in list(children):
                child = children[run_id]
                state = client.read_flow_run(run_id).state
                kind = state.type if state else StateType.SCHEDULED
                child.running = kind == StateType.RUNNING
                if kind in _ENDED:
                    children.pop(run_id)
                    log = logger.info if kind == StateType.COMPLETED else logger.warning
                    log("%s child run %s ended %s on %s", child.cloud, run_id,
                        kind.value.lower(), child.pool, extra=where)
                elif (kind in (StateType.SCHEDULED, StateType.PENDING)
                      and time.monotonic() - child.created > timeout):
                    client.set_flow_run_state(run_id, Cancelled(
                        message=f"no worker of {child.pool} picked it up in {timeout:.0f}s"),
                        force=True)
                    children.pop(run_id)
                    slots.pop(child.cloud, None)
                    logger.warning("%s child run %s was not picked up by %s in %.0fs; the "
                                   "pool gets no more children", child.cloud, run_id,
                                   child.pool, timeout, extra=where)
            live.update("distribution")
            journaled = run.catalog.done_indices(plan.dataset, plan.batch_id)
            board_now, _ = board.state(journaled)
            now = time.monotonic()
            if not board_now.free and not board_now.held:  # every unit is done
                done_at = done_at or now
                for run_id, child in list(children.items()):
                    if child.running and now - done_at > ttl:
                        client.set_flow_run_state(run_id, Cancelled(
                            message="every unit of the batch is done; this child did not "
                                    f"end within the claim's life ({ttl:.0f}s)"), force=True)
                        children.pop(run_id)
                        logger.warning("%s child run %s on %s is stuck (its worker is gone?); "
                                       "cancelled", child.cloud, run_id, child.pool,
                                       extra=where)
                continue
            if len(journaled) != progress[0]:  # a chunk was stored since the last look
                progress[:] = [len(journaled), now]
            waiting = any(not c.running for c in children.values())
            # free units are only a stall when nothing moves: busy children leave units free
            stalled = bool(board_now.free) and not waiting and (
                not children or now - progress[1] > ttl)
            if stalled and slots and rounds < MAX_LAUNCH_ROUNDS:
                logger.warning("%d units are free and no child takes them; starting children "
                               "again", len(board_now.free), extra=where)
                launch_round()
                rounds += 1
                progress[1] = now
            elif stalled:
                by_index = {c.index: c for c in todo}
                left = [by_index[i] for u in units if u.index in board_now.free
                        for i in u.chunks if i not in journaled]
                logger.warning("no work pool takes the %d chunks left; running them "
                               "in-process", len(left), extra=where)
                run_in_process(run, left, live)
                progress[1] = time.monotonic()
        wall = (done_at or time.monotonic()) - started
    reports = []
    for raw in run.catalog.notes(plan.dataset, plan.batch_id):  # each child's ShareReport
        report = ShareReport.model_validate_json(raw)
        if report.flow_run_id and UUID(report.flow_run_id) in launched:
            reports.append(report)
    return Dispatched(reports, children=len(launched), workers=workers,
                      wall_s=round(wall, 3))
