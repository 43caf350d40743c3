"""A real ``prefect server`` and process workers for the deployment suite, stopped by PID.

Everything the tests check goes through the server's REST API, the way the UI reads it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.sf_servers import ROOT, free_port

BIN = Path(sys.executable).parent


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)  # polling the API for a state; not a stand-in for synchronisation


class Process:
    """A child process in its own group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path,
                 cwd: Path = ROOT) -> None:
        self.name, self.cmd, self.env, self.log, self.cwd = name, cmd, env, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=self.env, cwd=self.cwd)
        return self

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class PrefectServer:
    """``prefect server start`` on a free loopback port, with its own PREFECT_HOME."""

    def __init__(self, work: Path, extra_env: dict[str, str], database: str | None = None
                 ) -> None:
        """``database``: a SQLAlchemy URL (PostgreSQL's, see sf_postgres); SQLite in the
        server's home by default."""
        self.port = free_port()
        self.work = work
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            **extra_env,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        self.env.pop("PREFECT_API_KEY", None)
        if database is not None:
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
        self.processes: list[Process] = []
        self.workers: dict[str, Process] = {}
        self.client = httpx.Client(base_url=self.api, timeout=30)

    def start(self, timeout: float = 120) -> None:
        server = Process("server", [str(BIN / "prefect"), "server", "start", "--host",
                                    "127.0.0.1", "--port", str(self.port)],
                         self.env, self.work / "server.log").start()
        self.processes.append(server)

        def healthy() -> bool:
            if not server.alive:
                raise AssertionError(f"prefect server exited; see {server.log}")
            try:
                return self.client.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the Prefect server's /api/health", healthy, timeout)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a command (``prefect ...``, ``python ...``) against the server; check its exit."""
        exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
        done = subprocess.run([exe, *args[1:]], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def spawn(self, name: str, *args: str) -> Process:
        """Start a command (``prefect ...``, ``skyferry ...``) in the background; logs to a file."""
        exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
        process = Process(name, [exe, *args[1:]], self.env, self.work / f"{name}.log").start()
        self.processes.append(process)
        return process

    def start_worker(self, pool: str) -> Process:
        worker = Process(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool",
                                            pool, "--type", "process"],
                         self.env, self.work / f"worker-{pool}.log").start()
        self.processes.append(worker)
        self.workers[pool] = worker
        return worker

    def online_workers(self, pool: str) -> int:
        """Online workers of ``pool``; 0 while the server is too busy to answer in time."""
        try:
            response = self.client.post(f"/work_pools/{pool}/workers/filter", json={})
        except httpx.TimeoutException:
            return 0
        response.raise_for_status()
        return sum(1 for w in response.json() if w["status"] == "ONLINE")

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One REST call. A 503 is the server's "database is locked" (SQLite under load): the
        request was rolled back, so it is sent again after ``Retry-After``, as Prefect's own
        client does, for up to a minute."""
        deadline = time.monotonic() + 60
        while True:
            response = self.client.request(method, path, json=body)
            if response.status_code != 503 or time.monotonic() > deadline:
                response.raise_for_status()
                return response.json()
            time.sleep(float(response.headers.get("Retry-After") or 1))  # the server's ask

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._send("POST", path, body)

    def get(self, path: str) -> Any:
        return self._send("GET", path)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.client.close()
