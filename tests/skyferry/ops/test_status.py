"""``skyferry status`` as a person sees it: rendered from the Prefect API by rich."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flows.pipeline import run_pipeline
from skyferry.cli import app
from skyferry.config import PipelineConfig
from skyferry.ops.status import fetch_status, render_status, status_line
from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _topology_without_azure(tmp_path: Path) -> Path:
    text = resources.files("skyferry").joinpath("default_topology.yaml").read_text()
    line = next(x for x in text.splitlines() if "name: azure-node-1" in x)
    path = tmp_path / "no-azure.yaml"
    path.write_text(text.replace(line, line.replace("work_pool: azure-pool",
                                                    "work_pool: azure-pool, enabled: false")))
    return path


def test_the_dashboard_shows_a_finished_run(home: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    source = tmp_path / "train.csv"
    write_ml_csv(source, 4_000, seed=9)
    result = run_pipeline(PipelineConfig(source=str(source), dataset="watched",
                                         chunk_size="64KB",
                                         topology=str(_topology_without_azure(tmp_path))))
    assert result.status == "completed", result.error
    chunks = result.chunks_processed
    with get_client(sync_client=True) as client:
        status = fetch_status(client._client, result.flow_run_id)
    assert status.final and status.state == "COMPLETED"
    assert status.live["chunks_done"] == status.live["chunks_total"] == str(chunks)
    console = Console(record=True, width=120, color_system=None)
    console.print(render_status(status))
    screen = console.export_text()
    assert "Completed" in screen and "committed" in screen
    assert f"100%  ·  {chunks} of {chunks} chunks" in screen
    for node in ("aws-node-1", "aws-node-2", "gcp-node-1", "gcp-node-2"):
        assert f"● {node}" in screen
    assert "✖ azure-node-1 (down)" in screen
    # not deployed: the chunks ran in the run itself, one move-chunk task each, no child runs
    assert status.children == []
    assert set(status.task_states) == {"COMPLETED"}
    assert status.task_states["COMPLETED"] >= chunks
    assert f"{status.task_states['COMPLETED']} completed" in screen
    assert status_line(status).startswith(f"{status.name} Completed · committed · 100% · "
                                          f"{chunks}/{chunks} chunks")


def test_status_command_prints_the_newest_run(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "train.csv"
    write_ml_csv(source, 500, seed=10)
    result = run_pipeline(PipelineConfig(source=str(source), dataset="newest"))
    assert result.status == "completed"
    out = CliRunner().invoke(app, ["status", "--once"], env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.output
    assert result.flow_run_id in out.output and "Completed" in out.output
    missing = CliRunner().invoke(app, ["status", "00000000-0000-0000-0000-000000000000"])
    assert missing.exit_code == 2
    assert "no flow run 00000000-0000-0000-0000-000000000000" in missing.output
