"""``skyferry profile``: the spread over runs, the bottleneck, and a real PNG chart."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from skyferry.cli import app
from skyferry.commit.manifest import Catalog
from skyferry.metrics import PipelineResult, StageMetrics
from skyferry.ops.profile import profile_results, write_chart
from skyferry.storage import Store


def _result(ingest: float, process: float, dist: float) -> PipelineResult:
    stages = {"ingestion": StageMetrics(duration_s=ingest), "processing":
              StageMetrics(duration_s=process), "distribution": StageMetrics(duration_s=dist),
              "storage": StageMetrics(duration_s=0.0)}
    return PipelineResult(status="completed", dataset="d", duration_s=ingest + process + dist,
                          stages=stages, bytes_in=10, chunks_processed=2)


def test_spread_and_bottleneck_are_computed_from_the_runs(tmp_path: Path) -> None:
    report = profile_results([_result(1, 6, 3), _result(1, 8, 1), _result(2, 7, 1)])
    by = {s.stage: s for s in report.stages}
    assert by["processing"].busy_s == [6, 8, 7]
    assert by["processing"].mean_s == pytest.approx(7.0)
    assert by["processing"].stdev_s == pytest.approx(1.0)
    assert by["processing"].mean_share == pytest.approx((0.6 + 0.8 + 0.7) / 3)
    assert report.bottlenecks == ["processing"]  # distribution is 17% on average
    assert "more cores" in report.recommendations["processing"]
    png = write_chart(report, tmp_path / "chart.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1210, 495)


def test_no_completed_run_is_an_error() -> None:
    failed = PipelineResult(status="failed", dataset="d", error="x", error_stage="ingestion")
    with pytest.raises(ValueError, match="no completed run"):
        profile_results([failed])


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
def test_profile_command_runs_n_times_and_cleans_up(home: Path, tmp_path: Path) -> None:
    chart = tmp_path / "p.png"
    out = CliRunner().invoke(app, ["profile", "-n", "2", "--size", "2MB", "--chunk-size",
                                   "512KiB", "--chart", str(chart)], env={"COLUMNS": "150"})
    assert out.exit_code == 0, out.output
    assert out.output.count(": completed in ") == 2
    assert "stage breakdown over 2 runs" in out.output and "wall clock" in out.output
    with Image.open(chart) as image:
        assert image.format == "PNG"
    assert Catalog(Store(f"{home}/catalog", name="catalog")).datasets() == []
    assert not any((home / "nodes").rglob("*.parquet"))
