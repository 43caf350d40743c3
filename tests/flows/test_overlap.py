"""Two runs of one dataset that overlap: the second waits for the first, then finds nothing
left to do; one manifest, no stray journal, no false failure. A run whose holder of the
dataset was killed takes over and finishes its batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from skyferry.ops.export import DatasetReader
from skyferry.topology import load_topology
from tests.helpers.sf_data import write_ml_csv

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PYTHONPATH=str(ROOT), SF_HELD=str(tmp_path / "held"),
               SF_RELEASE=str(tmp_path / "release"), PREFECT_LOGGING_LEVEL="WARNING")
    os.mkfifo(tmp_path / "held")
    os.mkfifo(tmp_path / "release")
    return env


def _start(src: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "skyferry.cli", "run", str(src), "--dataset", "o",
         "--chunk-size", "20KB", "--json", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)  # its own group: a kill takes its ephemeral API too


def _wait_for_line(stream: IO[str], text: str) -> str:
    seen = []
    for line in stream:  # blocks until the process writes a line
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"{text!r} never printed: {''.join(seen)[-2000:]}")


def _wait_until_held(tmp_path: Path) -> None:
    with open(tmp_path / "held") as held:  # returns once the run holds on its 2nd chunk
        assert held.read() == "held\n"


def _pending(tmp_path: Path) -> list[str]:
    pending = tmp_path / "home" / "catalog" / "pending"
    return sorted(str(p.relative_to(pending)) for p in pending.rglob("*") if p.is_file()) \
        if pending.exists() else []


def _stored(tmp_path: Path) -> tuple[int, int]:
    """Manifests committed, and rows a reader sees, in the runs' data directory."""
    topology = load_topology().model_copy(update={"catalog": str(tmp_path / "home" /
                                                                 "catalog")})
    nodes = [n.model_copy(update={"url": str(tmp_path / "home" / "nodes" / n.name)})
             for n in topology.nodes]
    topology = topology.model_copy(update={"nodes": nodes})
    reader = DatasetReader("o", topology=topology)
    return len(reader.manifests()), reader.read_table().num_rows


def test_a_second_run_waits_for_the_first(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 3000, seed=4)
    env = _env(tmp_path)
    first = _start(src, env, "--transform", "tests.helpers.sf_faults:hold_on_second_chunk")
    _wait_until_held(tmp_path)
    second = _start(src, env)
    assert second.stderr is not None
    line = _wait_for_line(second.stderr, "is being run by another run")
    assert f"pid {first.pid}" in line
    with open(tmp_path / "release", "w") as release:
        release.write("go\n")
    out1, err1 = first.communicate(timeout=240)
    out2, err2 = second.communicate(timeout=240)
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + err2[-2000:]
    assert json.loads(out1)["status"] == "completed"
    assert json.loads(out2)["status"] == "up_to_date"
    assert _stored(tmp_path) == (1, 3000)
    assert _pending(tmp_path) == []


def test_a_run_takes_over_from_a_killed_holder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 3000, seed=4)
    env = _env(tmp_path)
    first = _start(src, env, "--transform", "tests.helpers.sf_faults:hold_on_second_chunk")
    _wait_until_held(tmp_path)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert any(p.endswith("lease.json") for p in _pending(tmp_path))
    # the same batch
    second = _start(src, env, "--transform", "tests.helpers.sf_faults:hold_on_second_chunk")
    _wait_until_held(tmp_path)
    with open(tmp_path / "release", "w") as release:
        release.write("go\n")
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err[-2000:]
    assert json.loads(out)["status"] == "completed"
    assert _stored(tmp_path) == (1, 3000)
    assert _pending(tmp_path) == []
