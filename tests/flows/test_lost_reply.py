"""A run whose API lost the reply to its completion still returns its result.

On a busy server (SQLite holding its lock) the reply to a flow run's Completed can time out
after the server set it; the client's retry then gets back the server's Completed, which
carries no result. The run must still report what it committed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import get_current_settings

from tests.helpers.sf_data import write_ml_csv
from tests.helpers.sf_proxy import RefusingProxy

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def completes_a_flow_run(method: str, path: str) -> bool:
    return method == "POST" and re.search(r"/flow_runs/[0-9a-f-]{36}/set_state$", path) is not None


def test_a_lost_reply_to_the_runs_completion_still_returns_its_result(tmp_path: Path) -> None:
    source = tmp_path / "train.csv"
    rows = write_ml_csv(source, 2_000, seed=21)
    api = str(get_current_settings().api.url)
    with RefusingProxy(api.removesuffix("/api"), completes_a_flow_run, times=1,
                       fault="lose-reply",
                       match_body=lambda body: b'"COMPLETED"' in body) as proxy:
        env = {**os.environ, "PREFECT_API_URL": proxy.endpoint + "/api",
               "SKYFERRY_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
        done = subprocess.run([sys.executable, "-m", "skyferry.cli", "run", str(source),
                               "--dataset", "lost-completion", "--json"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert len(proxy.refused) == 1, proxy.refused  # the Completed reached the server, no reply
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "completed", result
    assert result["rows_stored"] + result["rows_rejected"] == rows
