"""The live progress artifact of a ``multicloud-pipeline`` run.

The parent creates it; whoever moves chunks (the parent's in-process children, or child runs on
other work pools) updates it. Progress is counted from the pending journal, so concurrent child
runs on different machines agree on it. Besides the percentage, the artifact's metadata carries
the live fields ``skyferry status`` shows: stage, chunks, throughput, ETA and node health.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactUpdate

from skyferry.commit.manifest import BatchPlan, Catalog
from skyferry.distribute.claims import ClaimBoard
from skyferry.distribute.placement import NodeHealth
from skyferry.errors import StorageError
from skyferry.stages import Stage

__all__ = ["LiveStatus", "create_live_status", "PROGRESS_DESCRIPTION"]

logger = logging.getLogger("skyferry.live")

PROGRESS_DESCRIPTION = "chunks stored"
PUBLISH_TIMEOUT_S = 10.0  # a progress publish that takes longer is given up


def create_live_status(plan: BatchPlan, done: int) -> UUID | None:
    """The parent's progress artifact, at ``done`` of the plan's chunks."""
    total = len(plan.chunks)
    artifact: Any = create_progress_artifact(progress=100.0 * done / max(total, 1),
                                    description=f"{PROGRESS_DESCRIPTION}: {done} of {total}")
    return artifact if isinstance(artifact, UUID) else None


class LiveStatus:
    """Publishes one progress artifact, at most once per ``interval_s`` (each is an API call).

    ``update`` only notes the stage and wakes a publisher thread: the caller (the loop that
    hands out chunks) never waits on the API, which can be slow to answer when busy. A
    forced update stops the publisher and publishes in the caller: the last word is in the
    artifact when it returns. Use it as a context manager so the publisher
    always stops.
    """

    def __init__(self, artifact_id: UUID | None, catalog: Catalog, plan: BatchPlan, *,
                 started_at: float, done_at_start: int, health: NodeHealth,
                 interval_s: float = 1.0) -> None:
        self.artifact_id = artifact_id
        self.catalog = catalog
        self.plan = plan
        self.started_at = started_at
        self.done_at_start = done_at_start
        self.health = health
        self.interval_s = interval_s
        self._sizes = {c.index: c.size for c in plan.chunks}
        self.claims: ClaimBoard | None = None  # the batch's claim board, once posted
        self._stage: Stage = "ingestion"
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fields(self, stage: Stage) -> dict[str, str]:
        """The live fields, computed from the journal."""
        done = self.catalog.done_indices(self.plan.dataset, self.plan.batch_id)
        total = len(self.plan.chunks)
        nbytes = sum(self._sizes.get(i, 0) for i in done)
        elapsed = max(time.time() - self.started_at, 1e-6)
        moved = len(done) - self.done_at_start
        rate = nbytes / elapsed if moved > 0 else 0.0
        eta = elapsed / moved * (total - len(done)) if moved > 0 else None
        down = self.health.down_nodes()
        healthy = sorted(n for n in self.health.states if n not in down)
        return {
            **self._claim_fields(done),
            "stage": stage,
            "chunks_done": str(len(done)),
            "chunks_total": str(total),
            "bytes_done": str(nbytes),
            "mb_s": f"{rate / 1e6:.2f}",
            "eta_s": "" if eta is None else f"{eta:.1f}",
            "nodes_healthy": ",".join(healthy),
            "nodes_down": ",".join(down),
            "batch": self.plan.batch_id,
            "dataset": self.plan.dataset,
            "started_at": f"{self.started_at:.3f}",
        }

    def _claim_fields(self, journaled: set[int]) -> dict[str, str]:
        """Units done, held, free, stolen and taken again, when children claim them."""
        if self.claims is None:
            return {}
        try:
            state, _ = self.claims.state(journaled)
        except StorageError as exc:  # progress is for people: the rest is still shown
            logger.warning("could not read the claim board: %s", exc)
            return {}
        return {"units_done": str(len(state.done)), "units_held": str(len(state.held)),
                "units_free": str(len(state.free)), "units_stolen": str(len(state.stolen)),
                "units_retaken": str(len(state.retaken))}

    def update(self, stage: Stage, *, force: bool = False) -> None:
        """Note ``stage`` for the next publish; ``force`` publishes now, and for the last time."""
        if self.artifact_id is None:
            return
        self._stage = stage
        if force:
            self.close()
            self._publish(stage)
            return
        with self._lock:
            if self._stop.is_set():
                return
            if self._thread is None:
                # the caller's context: its settings (the API) and its flow run
                context = contextvars.copy_context()
                self._thread = threading.Thread(target=context.run, args=(self._publisher,),
                                                name="skyferry-live-status", daemon=True)
                self._thread.start()
        self._wake.set()

    def close(self) -> None:
        """Stop the publisher thread (after the publish it may be making)."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        self._wake.set()
        if thread is not None:
            thread.join()

    def _publisher(self) -> None:
        # its own client: the run's client is not this thread's to enter and leave
        with get_client(sync_client=True,
                        httpx_settings={"timeout": PUBLISH_TIMEOUT_S}) as client:
            while True:
                self._wake.wait()
                if self._stop.is_set():
                    return
                self._wake.clear()
                self._publish(self._stage, client)
                # at most one publish per interval; a stop ends the wait at once
                if self._stop.wait(self.interval_s):
                    return

    def _publish(self, stage: Stage, client: SyncPrefectClient | None = None) -> None:
        try:
            fields = self.fields(stage)
            done, total = int(fields["chunks_done"]), int(fields["chunks_total"])
            units = ("" if "units_done" not in fields else
                     f" · units {fields['units_done']} done, {fields['units_held']} claimed, "
                     f"{fields['units_stolen']} stolen, {fields['units_retaken']} taken again")
            update = ArtifactUpdate(
                data=round(100.0 * done / max(total, 1), 2),
                description=f"{PROGRESS_DESCRIPTION}: {done} of {total} · {stage} · "
                            f"{fields['mb_s']} MB/s{units}",
                metadata_=fields,
            )
            assert self.artifact_id is not None
            if client is not None:
                client.update_artifact(self.artifact_id, update)
            else:
                with get_client(sync_client=True) as own:
                    own.update_artifact(self.artifact_id, update)
        except Exception as exc:  # progress is for people; it never fails a run
            logger.warning("could not update the progress artifact: %s", exc)
