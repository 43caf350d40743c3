"""Per-stage metrics and the flow's result."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from skyferry.models import BatchLineage
from skyferry.stages import STAGES, Stage

__all__ = ["MEASURABLE_S", "PipelineResult", "StageMetrics", "StageRecorder", "STAGES",
           "rate_text"]

Status = Literal["completed", "failed", "up_to_date", "already_committed"]

# A stage busy for less than this moved its bytes in no time one can measure: it gets no
# MB/s (a byte count over a busy time near zero is noise: a pass-through, a tiny write).
MEASURABLE_S = 0.05


def rate_text(mb_s: float | None) -> str:
    """An MB/s figure as shown: a dash where there is none."""
    return "-" if mb_s is None else f"{mb_s:.1f}"


class StageMetrics(BaseModel):
    items: int = 0
    failed_items: int = 0
    bytes: int = 0
    duration_s: float = Field(0.0, description="Summed busy time of the stage's tasks")
    mb_s: float | None = Field(
        None, description="bytes over busy time; none when the stage moved no bytes, or was "
                          f"busy for less than {MEASURABLE_S} s")
    success_rate: float = 1.0
    retries: int = 0
    # distribution
    replica_success_rate: float | None = None
    cross_cloud_transfers: int | None = None
    node_failures_handled: int | None = None
    # storage
    by_cloud: dict[str, int] | None = None
    by_node: dict[str, int] | None = None


class PipelineResult(BaseModel):
    status: Status
    dataset: str
    batch_id: str | None = None
    manifest_key: str | None = None
    snapshot: str | None = Field(default=None, description="the id of the dataset's snapshot "
                                 "that the commit made")
    lineage: BatchLineage | None = Field(default=None, description="where the committed "
                                         "batch came from (its snapshot records it too)")
    tables: list[str] = Field(default_factory=list, description="tables the snapshot was "
                              "published as (PipelineConfig.tables)")
    tables_skipped: list[str] = Field(default_factory=list, description="why a table was not")
    flow_run_id: str | None = None
    duration_s: float = 0.0
    chunks_processed: int = 0
    chunks_skipped: int = 0
    rows_in: int = 0
    rows_stored: int = 0
    rows_rejected: int = 0
    rows_added: int = Field(default=0, description="rows the transforms added")
    rows_dropped: int = Field(default=0, description="rows the transforms dropped")
    bytes_in: int = 0
    bytes_stored: int = 0
    stages: dict[str, StageMetrics] = Field(default_factory=dict)
    node_failures_handled: int = 0
    down_nodes: list[str] = Field(default_factory=list)
    down_reasons: dict[str, str] = Field(default_factory=dict)
    skipped_files: list[str] = Field(
        default_factory=list, description="hidden or marker files a folder listing passed over")
    odd_files: dict[str, str] = Field(
        default_factory=dict, description="files that could not be taken (empty, a dangling "
        "or directory symlink, a name that is not UTF-8), each with why; --strict fails on them")
    chunks_at_risk: list[int] = Field(
        default_factory=list, description="chunks whose replicas are all in one cloud (a run "
        "with min_clouds 1): losing that cloud loses them")
    bytes_written: int = Field(default=0, description="bytes written to the nodes: each "
                               "verified replica's")
    egress_usd: float = Field(default=0.0, description="what the bytes the run moved cost "
                              "in egress, at the topology's price table")
    planned_bytes_written: int | None = Field(default=None, description="what the run's "
                                              "plan said it would write (skyferry plan)")
    planned_egress_usd: float | None = None
    planned_eta_s: float | None = Field(default=None, description="the plan's ETA, from the "
                                        "last runs' rates; none before any run")
    children: int = Field(default=0, description="cloud-share child runs started on the "
                          "clouds' work pools (0: the chunks were moved in-process)")
    utilization: dict[str, float] = Field(
        default_factory=dict, description="busy worker-seconds ÷ (workers × distribution "
        "wall time), per work pool and under 'all'")
    distribution_wall_s: float = Field(default=0.0, description="from the first child's "
                                       "start to the last unit's end (children only)")
    child_mb_s: list[float] = Field(default_factory=list, description="each child's rate "
                                    "while busy: its chunks' source MB ÷ its busy seconds")
    units_stolen: int = Field(default=0, description="units a child took from another "
                              "cloud's queue")
    units_retaken: int = Field(default=0, description="units taken again after their "
                               "holder's claim expired")
    error: str | None = None
    error_stage: Stage | None = None
    error_type: str | None = Field(default=None, description="the type of the error's cause")


@dataclass
class _Acc:
    items: int = 0
    failed: int = 0
    bytes: int = 0
    busy: float = 0.0
    retries: int = 0


@dataclass
class StageRecorder:
    """Thread-safe accumulator the flow feeds as tasks finish."""

    acc: dict[str, _Acc] = field(default_factory=lambda: {s: _Acc() for s in STAGES})
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, stage: Stage, *, nbytes: int, seconds: float, attempts: int = 1,
               ok: bool = True) -> None:
        with self._lock:
            a = self.acc[stage]
            a.items += 1
            a.failed += 0 if ok else 1
            a.bytes += nbytes
            a.busy += seconds
            a.retries += max(0, attempts - 1)

    def snapshot(self) -> dict[str, list[float]]:
        """The raw accumulators, JSON-ready, so a child run can hand them to its parent."""
        with self._lock:
            return {s: [a.items, a.failed, a.bytes, a.busy, a.retries]
                    for s, a in self.acc.items()}

    def merge(self, snapshot: dict[str, list[float]]) -> None:
        """Add another recorder's :meth:`snapshot` (a child run's) to this one."""
        with self._lock:
            for stage, (items, failed, nbytes, busy, retries) in snapshot.items():
                a = self.acc.setdefault(stage, _Acc())
                a.items += int(items)
                a.failed += int(failed)
                a.bytes += int(nbytes)
                a.busy += float(busy)
                a.retries += int(retries)

    def metrics(self) -> dict[str, StageMetrics]:
        out = {}
        for stage, a in self.acc.items():
            rate = (a.items - a.failed) / a.items if a.items else 1.0
            mb_s = round(a.bytes / 1e6 / a.busy, 2) if a.bytes and a.busy >= MEASURABLE_S \
                else None
            out[stage] = StageMetrics(items=a.items, failed_items=a.failed, bytes=a.bytes,
                                      duration_s=round(a.busy, 4), mb_s=mb_s,
                                      success_rate=round(rate, 4), retries=a.retries)
        return out
