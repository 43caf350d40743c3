"""``skyferry profile``: the stage breakdown over N runs, with its spread, and a chart.

Plain functions over :class:`~skyferry.metrics.PipelineResult` values; the CLI runs the
pipeline N times and hands the results here.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from skyferry.metrics import STAGES, PipelineResult, rate_text
from skyferry.ops.report import ADVICE, BOTTLENECK_SHARE

__all__ = ["ProfileReport", "StageSpread", "profile_results", "profile_table", "write_chart"]


@dataclass
class StageSpread:
    """One stage over the runs: busy seconds (mean, stdev, min, max), share and MB/s."""

    stage: str
    busy_s: list[float]
    share: list[float]
    mb_s: list[float]

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.busy_s)

    @property
    def stdev_s(self) -> float:
        return statistics.stdev(self.busy_s) if len(self.busy_s) > 1 else 0.0

    @property
    def mean_share(self) -> float:
        return statistics.fmean(self.share)

    @property
    def bottleneck(self) -> bool:
        return self.mean_share > BOTTLENECK_SHARE


@dataclass
class ProfileReport:
    runs: int
    wall_s: list[float]
    stages: list[StageSpread]
    bytes_in: int
    chunks: int
    recommendations: dict[str, str] = field(default_factory=dict)

    @property
    def bottlenecks(self) -> list[str]:
        return [s.stage for s in self.stages if s.bottleneck]


def profile_results(results: list[PipelineResult]) -> ProfileReport:
    """The spread of each stage over completed runs; raises ValueError when there are none."""
    done = [r for r in results if r.status == "completed"]
    if not done:
        raise ValueError("no completed run to profile")
    spreads = []
    for stage in STAGES:
        busy, share, mb_s = [], [], []
        for result in done:
            total = sum(m.duration_s for m in result.stages.values()) or 1.0
            metrics = result.stages.get(stage)
            seconds = metrics.duration_s if metrics else 0.0
            busy.append(seconds)
            share.append(seconds / total)
            if metrics is not None and metrics.mb_s is not None:
                mb_s.append(metrics.mb_s)
        spreads.append(StageSpread(stage, busy, share, mb_s))
    report = ProfileReport(runs=len(done), wall_s=[r.duration_s for r in done], stages=spreads,
                           bytes_in=done[0].bytes_in, chunks=done[0].chunks_processed)
    report.recommendations = {s: ADVICE[s] for s in report.bottlenecks}
    return report


def profile_table(report: ProfileReport) -> Table:
    table = Table(title=f"stage breakdown over {report.runs} runs "
                        f"({report.bytes_in / 1e6:.0f} MB, {report.chunks} chunks each)",
                  title_justify="left")
    for column in ("stage", "busy s (mean ± sd)", "min–max s", "share", "MB/s", "bottleneck"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for s in report.stages:
        table.add_row(s.stage, f"{s.mean_s:.2f} ± {s.stdev_s:.2f}",
                      f"{min(s.busy_s):.2f}–{max(s.busy_s):.2f}", f"{s.mean_share:.0%}",
                      rate_text(statistics.fmean(s.mb_s) if s.mb_s else None),
                      "[bold red]yes[/]" if s.bottleneck else "")
    wall = report.wall_s
    spread = statistics.stdev(wall) if len(wall) > 1 else 0.0
    table.add_section()
    table.add_row("wall clock", f"{statistics.fmean(wall):.2f} ± {spread:.2f}",
                  f"{min(wall):.2f}–{max(wall):.2f}", "", "", "")
    return table


def write_chart(report: ProfileReport, path: Path) -> Path:
    """A PNG: busy seconds per stage in each run (stacked), and the mean with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ingestion": "#4C78A8", "processing": "#F58518", "distribution": "#54A24B",
              "storage": "#B279A2"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    runs = list(range(1, report.runs + 1))
    bottom = [0.0] * report.runs
    for s in report.stages:
        left.bar(runs, s.busy_s, bottom=bottom, color=colors[s.stage], label=s.stage)
        bottom = [b + v for b, v in zip(bottom, s.busy_s, strict=True)]
    left.plot(runs, report.wall_s, "k.--", label="wall clock")
    left.set_xlabel("run")
    left.set_ylabel("seconds (task busy time, summed)")
    left.set_xticks(runs)
    left.set_title("stage time per run")
    left.legend(fontsize=8)
    names = [s.stage for s in report.stages]
    means = [s.mean_s for s in report.stages]
    errors = [s.stdev_s for s in report.stages]
    bars = right.barh(names, means, xerr=errors, capsize=4,
                      color=["#D62728" if s.bottleneck else colors[s.stage]
                             for s in report.stages])
    for bar, s in zip(bars, report.stages, strict=True):
        right.text(bar.get_width() + s.stdev_s, bar.get_y() + bar.get_height() / 2,
                   f"  {s.mean_share:.0%}" + (" bottleneck" if s.bottleneck else ""),
                   va="center", fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("mean busy seconds (± sd); red: over 30% of the time")
    right.set_title("where the time goes")
    right.set_xlim(0, max(m + e for m, e in zip(means, errors, strict=True)) * 1.45 or 1)
    fig.suptitle(f"skyferry profile: {report.runs} runs, {report.bytes_in / 1e6:.0f} MB each")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
