"""The local Prefect API: the first run starts it, later runs reuse it, it exits when idle.

Each test has its own PREFECT_HOME and stops the server it started, by the pid the server
wrote; no server outlives a test.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.context import SettingsContext, get_settings_context
from prefect.settings import get_current_settings

from flows.ephemeral import run_settings
from flows.local_api import (
    MODULE,
    STATE_FILE,
    ensure_local_api,
    find_local_api,
    stop_local_api,
)
from skyferry.config import Settings

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return MODULE.encode() in fh.read()
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)  # polling another process's exit: nothing to join
    return True


@pytest.fixture
def prefect_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "prefect"
    home.mkdir()
    yield home
    stop_local_api(home)  # whatever a test left running


def _cli_env(tmp_path: Path, prefect_home: Path, idle: float = 120) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(SKYFERRY_HOME=str(tmp_path / "home"), PREFECT_HOME=str(prefect_home),
               SKYFERRY_PREFECT_API="local", SKYFERRY_PREFECT_API_IDLE_S=str(idle),
               PREFECT_LOGGING_LEVEL="WARNING")
    return env


def _run(env: dict[str, str], src: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "skyferry.cli", "run", str(src), "--dataset",
                           "tiny", "--json"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_later_runs_reuse_the_server_the_first_run_started(tmp_path: Path,
                                                           prefect_home: Path) -> None:
    env = _cli_env(tmp_path, prefect_home)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("id,x\n1,a\n2,b\n")
    first = _run(env, src)
    state = json.loads((prefect_home / STATE_FILE).read_text())
    assert stat.S_IMODE((prefect_home / STATE_FILE).stat().st_mode) == 0o600
    assert _alive(state["pid"])  # it outlived the command that started it
    (src / "b.csv").write_text("id,x\n3,c\n")
    second = _run(env, src)
    assert json.loads((prefect_home / STATE_FILE).read_text())["pid"] == state["pid"]
    assert first["status"] == second["status"] == "completed"
    assert second["rows_stored"] == 1

    # both runs are in that server's history; it asks for its password, /health does not
    auth = tuple(state["auth"].split(":", 1))
    assert httpx.get(f"{state['url']}/health", timeout=10).status_code == 200
    assert httpx.post(f"{state['url']}/flow_runs/filter", json={},
                      timeout=10).status_code == 401
    runs = httpx.post(f"{state['url']}/flow_runs/filter", json={}, auth=auth,
                      timeout=10).json()
    ids = {r["id"]: r["state_type"] for r in runs}
    assert ids.get(first["flow_run_id"]) == ids.get(second["flow_run_id"]) == "COMPLETED", ids

    # `skyferry api status` finds it, `skyferry api stop` ends it
    status = subprocess.run([sys.executable, "-m", "skyferry.cli", "api", "status", "--json"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout)["pid"] == state["pid"]
    stopped = subprocess.run([sys.executable, "-m", "skyferry.cli", "api", "stop"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and str(state["pid"]) in stopped.stdout
    assert not _alive(state["pid"]) and not (prefect_home / STATE_FILE).exists()
    status = subprocess.run([sys.executable, "-m", "skyferry.cli", "api", "status"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 1 and "no local Prefect API" in status.stdout


def _settings_for(home: Path):  # type: ignore[no-untyped-def]
    current = get_current_settings()
    return current.model_copy(update={"home": home})


def test_a_stale_state_is_not_trusted_and_an_idle_server_exits_by_itself(
        prefect_home: Path) -> None:
    # a state file naming another process (this one): neither trusted nor killed
    (prefect_home / STATE_FILE).write_text(json.dumps({
        "pid": os.getpid(), "url": "http://127.0.0.1:9/api", "auth": "skyferry:x",
        "python": sys.executable, "started": 0}))
    assert find_local_api(prefect_home) is None
    local = ensure_local_api(_settings_for(prefect_home), idle_s=2.0)
    assert local.pid != os.getpid() and _alive(local.pid)
    assert find_local_api(prefect_home) == local  # it answers with its password
    assert httpx.get(f"{local.url}/admin/version", timeout=10).status_code == 401
    # nobody uses it: it exits, and takes its state file with it
    assert _wait_gone(local.pid, timeout=60), "the idle server did not exit"
    assert not (prefect_home / STATE_FILE).exists()
    assert find_local_api(prefect_home) is None


def test_a_server_named_by_prefect_api_url_is_used_and_none_is_started(
        prefect_harness: None, tmp_path: Path) -> None:
    home = tmp_path / "prefect"
    current = get_current_settings()
    assert current.api.url  # the harness's server
    moved = current.model_copy(update={"home": home})
    with SettingsContext(profile=get_settings_context().profile, settings=moved):
        settings = run_settings(Settings(prefect_api="local"))
    assert settings.api.url == current.api.url
    assert not (home / STATE_FILE).exists()
