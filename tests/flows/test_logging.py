"""Structured JSON logs through deployments/logging.yml, read as an operator's shipper would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def test_json_logs_name_the_batch_the_stage_and_the_chunk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 1500, seed=13)
    env = dict(os.environ, SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_LOGGING_LEVEL="INFO",
               PREFECT_LOGGING_SETTINGS_PATH=str(ROOT / "deployments" / "logging.yml"))
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "skyferry.cli", "run", str(src), "--dataset",
                           "logs", "--chunk-size", "20KB", "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    events = []
    for line in done.stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    assert events, done.stderr[-2000:]
    stored = [e for e in events if str(e.get("msg", "")).startswith("chunk %s stored")]
    assert len(stored) == result["chunks_processed"]
    assert {e["batch"] for e in stored} == {result["batch_id"]}
    assert {e["stage"] for e in stored} == {"storage"}
    assert sorted(e["chunk"] for e in stored) == list(range(result["chunks_processed"]))
    assert all(e.get("flow_run_id") for e in stored)
