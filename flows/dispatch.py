"""Hand each cloud's share of a batch to a ``cloud-share`` child run, and see them through.

Not deployed, the parent runs the chunks itself (see :func:`run_in_process`). Deployed, the
children are child runs of the clouds' deployments (``cloud-share/<cloud>-share``), created
together with ``run_deployment(timeout=0)`` and then watched through the API:

- a cloud whose pool has no online worker, or has no share deployment, gets no share;
- a child still waiting for a worker after ``child_start_timeout_s`` is cancelled;
- a child that ends failed, crashed or cancelled marks its pool as failing.

Each child is created with an idempotency key (this parent run, its attempt, the cloud and
the launch's number). On a busy API server a create can time out after the server made the
run; the client's retry then gets that same run back instead of a second child with the
same share.

The unfinished chunks of such a share (per the journal) go to the clouds that are left. When
no pool is left, the parent runs them in-process itself: a run never waits on a dead pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
from flows.shares import ShareReport, assign_shares, share_deployment
from skyferry.models import ChunkPlan
from skyferry.run.context import BatchRun

__all__ = ["dispatch_to_pools", "run_in_process", "POLL_S"]

POLL_S = 1.0  # how often the parent reads its children's states


def _child_parameters(run: BatchRun, cloud: str, chunks: list[int], pool: str | None,
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


def _pool_is_live(client: SyncPrefectClient, pool: str) -> tuple[bool, str]:
    try:
        workers = client.read_workers_for_work_pool(pool)
    except ObjectNotFound:
        return False, f"work pool {pool} does not exist"
    online = [w for w in workers if w.status == WorkerStatus.ONLINE]
    if not online:
        return False, f"work pool {pool} has no online worker"
    return True, f"{len(online)} online worker(s)"


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
    chunks: list[int]
    created: float


def dispatch_to_pools(run: BatchRun, todo: list[ChunkPlan],
                      live: LiveStatus) -> list[ShareReport]:
    """Run the shares on the clouds' work pools, concurrently, reassigning dead pools' work."""
    logger = get_run_logger()
    plan = run.plan
    assert plan is not None
    by_index = {c.index: c for c in plan.chunks}
    timeout = run.config.child_start_timeout_s
    reports: list[ShareReport] = []
    children: dict[UUID, _Child] = {}
    launched: set[UUID] = set()
    where = event(run.config, "distribution", plan.batch_id)
    with get_client(sync_client=True) as client:
        usable: set[str] = set()
        for cloud in run.setup.topology.clouds:
            pool = run.setup.topology.pool_for(cloud)
            ok, why = _pool_is_live(client, pool)
            if ok and not _deployment_exists(client, share_deployment(cloud)):
                ok, why = False, f"deployment {share_deployment(cloud)} does not exist"
            logger.info("%s: pool %s %s", cloud, pool, "is live" if ok else f"is out: {why}",
                        extra=where)
            if ok:
                usable.add(cloud)

        launches = 0

        def launch(chunks: list[ChunkPlan]) -> None:
            nonlocal launches
            if not chunks:
                return
            if not usable:
                logger.warning("no work pool can take %d chunks; running them in-process",
                               len(chunks), extra=where)
                reports.extend(run_in_process(run, chunks, live))
                return
            for cloud, indices in assign_shares(chunks, run.setup.topology, usable).items():
                pool = run.setup.topology.pool_for(cloud)
                launches += 1
                child_run: Any = run_deployment(
                    share_deployment(cloud), timeout=0, as_subflow=True,
                    idempotency_key=_child_key(plan.batch_id, cloud, launches),
                    parameters=_child_parameters(run, cloud, indices, pool, live),
                    flow_run_name=f"{plan.dataset}-{plan.batch_id[:8]}-{cloud}",
                    tags=["skyferry", f"cloud:{cloud}"],
                )
                children[child_run.id] = _Child(cloud, pool, indices, time.monotonic())
                launched.add(child_run.id)
                logger.info("%s share: %d chunks → %s (child run %s)", cloud, len(indices),
                            pool, child_run.id, extra=where)

        def reassign(run_id: UUID, why: str) -> None:
            child = children.pop(run_id)
            usable.discard(child.cloud)
            done = run.catalog.done_indices(plan.dataset, plan.batch_id)
            left = [by_index[i] for i in child.chunks if i not in done]
            logger.warning("%s share (child run %s) %s; reassigning %d unfinished chunks",
                           child.cloud, run_id, why, len(left),
                           extra=where)
            launch(left)

        launch(todo)
        while children:
            time.sleep(POLL_S)
            for run_id in list(children):
                child = children[run_id]
                state = client.read_flow_run(run_id).state
                kind = state.type if state else StateType.SCHEDULED
                if kind == StateType.COMPLETED:
                    children.pop(run_id)
                    logger.info("%s share completed on %s", child.cloud, child.pool,
                                extra=where)
                elif kind in (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED):
                    reassign(run_id, f"ended {kind.value.lower()} on {child.pool}")
                elif (kind == StateType.SCHEDULED
                      and time.monotonic() - child.created > timeout):
                    client.set_flow_run_state(run_id, Cancelled(
                        message=f"no worker of {child.pool} picked it up in {timeout:.0f}s"),
                        force=True)
                    reassign(run_id, f"was not picked up by {child.pool} in {timeout:.0f}s")
            live.update("distribution")
    for raw in run.catalog.notes(plan.dataset, plan.batch_id):  # each child's ShareReport
        report = ShareReport.model_validate_json(raw)
        if report.flow_run_id and UUID(report.flow_run_id) in launched:
            reports.append(report)
    return reports
