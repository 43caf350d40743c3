"""The live progress artifact of a ``multicloud-pipeline`` run.

The parent creates it; whoever moves chunks (the parent's in-process children, or child runs on
other work pools) updates it. Progress is counted from the pending journal, so concurrent child
runs on different machines agree on it. Besides the percentage, the artifact's metadata carries
the live fields ``skyferry status`` shows: stage, chunks, throughput, ETA and node health.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from skyferry.manifest import BatchPlan, Catalog
from skyferry.placement import NodeHealth

__all__ = ["LiveStatus", "create_live_status", "PROGRESS_DESCRIPTION"]

logger = logging.getLogger("skyferry.live")

PROGRESS_DESCRIPTION = "chunks stored"


def create_live_status(plan: BatchPlan, done: int) -> UUID | None:
    """The parent's progress artifact, at ``done`` of the plan's chunks."""
    total = len(plan.chunks)
    artifact: Any = create_progress_artifact(progress=100.0 * done / max(total, 1),
                                    description=f"{PROGRESS_DESCRIPTION}: {done} of {total}")
    return artifact if isinstance(artifact, UUID) else None


class LiveStatus:
    """Updates one progress artifact, at most once per ``interval_s`` (each is an API call)."""

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
        self._last = 0.0
        self._lock = threading.Lock()

    def fields(self, stage: str) -> dict[str, str]:
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

    def update(self, stage: str, *, force: bool = False) -> None:
        """Publish the live fields, unless the last update was under ``interval_s`` ago."""
        if self.artifact_id is None:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last < self.interval_s:
                return
            self._last = now
        try:
            fields = self.fields(stage)
            done, total = int(fields["chunks_done"]), int(fields["chunks_total"])
            with get_client(sync_client=True) as client:
                client.update_artifact(self.artifact_id, ArtifactUpdate(
                    data=round(100.0 * done / max(total, 1), 2),
                    description=f"{PROGRESS_DESCRIPTION}: {done} of {total} · {stage} · "
                                f"{fields['mb_s']} MB/s",
                    metadata_=fields,
                ))
        except Exception as exc:  # progress is for people; it never fails a run
            logger.warning("could not update the progress artifact: %s", exc)
