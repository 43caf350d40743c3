"""A run's peak memory does not grow with the chunk size: a chunk streams through in blocks.

The same 520 MB of binary data is run with 64 MB and 512 MB chunks, each in its own
``skyferry run`` process; each process's peak resident memory (VmHWM) is sampled until it
exits. Marked slow (`make test-slow`): each run writes three replicas of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000


def _peak_rss_mb(source: Path, chunk: str, home: Path) -> tuple[float, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
               SKYFERRY_DURABLE_WRITES="false", PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "skyferry.cli", "run", str(source), "--dataset", "m",
         "--chunk-size", chunk, "--json"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    peak_kb = 0
    while True:
        try:
            out, _ = child.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
    assert child.returncode == 0
    return peak_kb / 1024, json.loads(out)


def test_peak_memory_does_not_grow_with_the_chunk_size(tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    rng = np.random.default_rng(3)
    with open(source, "wb") as fh:
        for _ in range(13):
            fh.write(rng.bytes(40 * MB))
    small, small_run = _peak_rss_mb(source, "64MB", tmp_path / "small")
    large, large_run = _peak_rss_mb(source, "512MB", tmp_path / "large")
    assert small_run["status"] == large_run["status"] == "completed"
    assert (small_run["chunks_processed"], large_run["chunks_processed"]) == (9, 2)
    assert small_run["bytes_stored"] == large_run["bytes_stored"] == 520 * MB
    print(f"peak RSS: {small:.0f} MB with 64 MB chunks, {large:.0f} MB with 512 MB chunks")  # noqa: T201
    # a whole 512 MB chunk in memory would add 448 MB over the 64 MB run: it adds nothing
    assert large < small + 64, (small, large)
