from __future__ import annotations

from skyferry.metrics import PipelineResult, StageMetrics
from skyferry.ops.report import placement_markdown, stage_breakdown


def _result() -> PipelineResult:
    return PipelineResult(
        status="completed", dataset="train", batch_id="b1", rows_in=10, rows_stored=9,
        rows_rejected=1, node_failures_handled=2, down_nodes=["azure-node-1"],
        stages={
            "ingestion": StageMetrics(items=4, bytes=4_000_000, duration_s=1.0, mb_s=4.0),
            "processing": StageMetrics(items=4, bytes=4_000_000, duration_s=6.0, mb_s=0.7),
            "distribution": StageMetrics(items=4, bytes=12_000_000, duration_s=2.5, mb_s=4.8,
                                         replica_success_rate=0.8, cross_cloud_transfers=4),
            "storage": StageMetrics(items=5, bytes=4_000_000, duration_s=0.5, mb_s=8.0,
                                    by_cloud={"aws": 8, "gcp": 4},
                                    by_node={"aws-node-1": 4, "aws-node-2": 4, "gcp-node-1": 4}),
        })


def test_the_stage_over_30_percent_is_flagged_with_advice() -> None:
    rows = {r["stage"]: r for r in stage_breakdown(_result())}
    assert rows["processing"]["share"] == "60%" and rows["processing"]["bottleneck"] == "yes"
    assert "cores" in rows["processing"]["recommendation"]
    assert rows["distribution"]["share"] == "25%" and rows["distribution"]["bottleneck"] == ""
    assert rows["ingestion"]["recommendation"] == ""


def test_placement_summary_lists_nodes_clouds_and_failures() -> None:
    text = placement_markdown(_result())
    assert "| aws-node-2 | 4 |" in text and "| gcp | 4 |" in text
    assert "cross-cloud transfers: **4**" in text
    assert "node failures handled: **2**" in text and "azure-node-1" in text
    assert "**1 rejected**" in text
