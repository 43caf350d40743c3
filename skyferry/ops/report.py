"""What operators look at: the stage breakdown (with its bottleneck) and the placement summary.

Plain functions over a :class:`~skyferry.metrics.PipelineResult`; the flow turns them into
Prefect artifacts, and the CLI prints them.
"""

from __future__ import annotations

from typing import Any

from skyferry.metrics import STAGES, PipelineResult, rate_text

__all__ = ["ADVICE", "BOTTLENECK_SHARE", "placement_markdown", "stage_breakdown"]

BOTTLENECK_SHARE = 0.30
ADVICE = {
    "ingestion": "Reads bound the run: put compute near the source (its cloud's work pool), "
                 "or raise --chunk-size so each ranged read carries more.",
    "processing": "Decoding and encoding bound the run: give it more cores "
                  "(SKYFERRY_MAX_WORKERS, or a Dask/Ray task runner on a larger machine), "
                  "or pass a --schema so pyarrow skips type inference.",
    "distribution": "Replica writes bound the run: the slowest node sets the pace; check "
                    "`skyferry nodes` latencies, or place replicas on nearer nodes.",
    "storage": "Commits bound the run: use fewer, larger chunks so the journal and the "
               "manifest have less to record.",
}


def stage_breakdown(result: PipelineResult) -> list[dict[str, Any]]:
    """One row per stage: time, share of busy time, bytes, MB/s, success, bottleneck."""
    busy = sum(result.stages[s].duration_s for s in STAGES if s in result.stages) or 1.0
    rows = []
    for stage in STAGES:
        m = result.stages.get(stage)
        if m is None:
            continue
        share = m.duration_s / busy
        bottleneck = share > BOTTLENECK_SHARE
        rows.append({
            "stage": stage,
            "busy_s": round(m.duration_s, 2),
            "share": f"{share:.0%}",
            "MB": round(m.bytes / 1e6, 1),
            "MB_s": rate_text(m.mb_s),
            "success_rate": f"{m.success_rate:.1%}",
            "retries": m.retries,
            "bottleneck": "yes" if bottleneck else "",
            "recommendation": ADVICE[stage] if bottleneck else "",
        })
    return rows


def placement_markdown(result: PipelineResult) -> str:
    storage = result.stages.get("storage")
    dist = result.stages.get("distribution")
    lines = [f"# Placement of {result.dataset} batch `{result.batch_id}`", ""]
    if result.snapshot:
        lines += [f"Committed in snapshot `{result.snapshot}` of {result.dataset}.", ""]
    lines += ["| node | replicas |", "| --- | ---: |"]
    for node, count in ((storage.by_node if storage else None) or {}).items():
        lines.append(f"| {node} | {count} |")
    lines += ["", "| cloud | replicas |", "| --- | ---: |"]
    for cloud, count in ((storage.by_cloud if storage else None) or {}).items():
        lines.append(f"| {cloud} | {count} |")
    lines += [
        "",
        f"- cross-cloud transfers: **{dist.cross_cloud_transfers if dist else 0}**",
        f"- replica success rate: **{(dist.replica_success_rate or 0) if dist else 0:.1%}**",
        f"- node failures handled: **{result.node_failures_handled}**",
        f"- nodes down: {', '.join(result.down_nodes) or 'none'}",
        f"- rows: {result.rows_in} in, {result.rows_added} added and {result.rows_dropped} "
        f"dropped by transforms, {result.rows_stored} stored, "
        f"**{result.rows_rejected} rejected**",
    ]
    if result.planned_bytes_written is not None:
        eta = ("no ETA (no earlier run)" if result.planned_eta_s is None
               else f"{result.planned_eta_s:.1f} s")
        lines.append(
            f"- planned against actual: {result.planned_bytes_written:,} against "
            f"{result.bytes_written:,} bytes written; egress ${result.planned_egress_usd:.4f} "
            f"against ${result.egress_usd:.4f}; time {eta} against {result.duration_s:.1f} s")
    if result.children:
        pools = ", ".join(f"{pool} {value:.2f}" for pool, value in
                          sorted(result.utilization.items()) if pool != "all")
        lines.append(
            f"- {result.children} child runs; utilization "
            f"{result.utilization.get('all', 0.0):.2f} ({pools}); units stolen "
            f"{result.units_stolen}, taken again after an expired claim {result.units_retaken}")
    for table in result.tables:
        lines.append(f"- published as {table}")
    if result.lineage is not None:
        lineage = result.lineage
        lines.append(f"- lineage: {len(lineage.sources)} source files, "
                     f"{len(lineage.chunk_digests)} chunks, transforms: "
                     f"{', '.join(lineage.transforms) or 'none'}, skyferry "
                     f"{lineage.code_version}")
    return "\n".join(lines) + "\n"
