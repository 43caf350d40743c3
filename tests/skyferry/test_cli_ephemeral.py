"""``skyferry run`` in its own process on Prefect's ephemeral API, as a person first meets it.

The ephemeral API stops when the command exits. Before it does, every task run of the run
is recorded in the local Prefect database, and nothing is printed about lost events.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.sf_data import write_ml_csv

pytestmark = pytest.mark.integration


def test_a_run_on_the_ephemeral_api_leaves_its_whole_history_and_a_clean_stderr(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 6_000, seed=21)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_LOGGING_LEVEL="WARNING")
    done = subprocess.run(
        [sys.executable, "-m", "skyferry.cli", "run", str(src), "--dataset", "ephemeral",
         "--chunk-size", "4KB", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["chunks_processed"] >= 40
    assert "Traceback" not in done.stderr and "Error flushing" not in done.stderr, \
        done.stderr[-3000:]

    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        states = dict(db.execute(
            "SELECT state_type, count(*) FROM task_run WHERE flow_run_id = ? "
            "GROUP BY state_type", (result["flow_run_id"],)).fetchall())
        names = {name.rsplit("-", 1)[0] for (name,) in db.execute(
            "SELECT name FROM task_run WHERE flow_run_id = ?", (result["flow_run_id"],))}
    # one move-chunk per chunk, plus probe, listing, planning and the commit: all completed
    assert states == {"COMPLETED": result["chunks_processed"] + 4}, states
    assert "commit-manifest" in names and "move-chunk" in names


def test_a_failed_run_prints_its_typed_error_not_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_LOGGING_LEVEL="WARNING")
    missing = tmp_path / "nowhere.csv"
    command = [sys.executable, "-m", "skyferry.cli", "run", str(missing), "--dataset", "d"]
    quiet = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1
    assert quiet.stderr.strip().splitlines() == [
        f"error: SourceNotFoundError: stage ingestion failed for d/batch=unplanned: "
        f"source not found: {missing}"]
    verbose = subprocess.run(command + ["--verbose"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:  # the log keeps it
        logged = [m for (m,) in db.execute("SELECT message FROM log") if "Traceback" in m]
    assert len(logged) >= 2


def test_the_demo_stores_replicas_on_every_node_and_reads_them_back(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_LOGGING_LEVEL="WARNING", COLUMNS="120")
    done = subprocess.run(
        [sys.executable, "-m", "skyferry.cli", "demo", "--size", "3MB", "--chunk-size",
         "256KB"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["rows_rejected"] == 5
    for node in ("aws-node-1", "aws-node-2", "gcp-node-1", "gcp-node-2", "azure-node-1"):
        row = next(line for line in done.stdout.splitlines() if f" {node} " in line)
        assert int(row.split("│")[2]) > 0, row  # chunks on the node
        assert any((tmp_path / "home" / "nodes" / node / "demo-train").rglob("*.parquet"))


def test_a_run_killed_with_sigkill_leaves_no_api_server_behind(tmp_path: Path) -> None:
    """The run's ephemeral API server ends with it, though SIGKILL runs no exit handler."""
    import signal
    import time

    import psutil

    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 40_000, seed=22)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_LOGGING_LEVEL="WARNING")
    run = subprocess.Popen(
        [sys.executable, "-m", "skyferry.cli", "run", str(src), "--dataset", "killed",
         "--chunk-size", "8KB"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    servers: list[psutil.Process] = []
    guards: list[psutil.Process] = []
    deadline = time.monotonic() + 120
    try:
        while not (servers and guards) and time.monotonic() < deadline and run.poll() is None:
            try:
                children = psutil.Process(run.pid).children(recursive=True)
            except psutil.NoSuchProcess:  # the run ended first
                break
            servers = [p for p in children if "prefect.server.api.server:create_app"
                       in " ".join(p.cmdline())]
            guards = [p for p in children if "sys.stdin.buffer.read()" in " ".join(p.cmdline())]
            time.sleep(0.1)
        assert servers and guards and run.poll() is None, "the run's API and guard never started"
        run.send_signal(signal.SIGKILL)
        run.wait()
        gone, alive = psutil.wait_procs(servers + guards, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        for proc in servers + guards:  # only what this test's run started
            if proc.is_running():
                proc.kill()
        if run.poll() is None:
            run.kill()
