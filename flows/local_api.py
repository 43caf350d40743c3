"""A local Prefect API that the first run starts and later runs reuse.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server in every process that
runs a flow, and stops it at exit: each ``skyferry run`` pays for its start (5–15 s on a
small machine). With ``SKYFERRY_PREFECT_API=local`` (the default) the first run starts
one server for its ``PREFECT_HOME`` instead, in a process of its own, and later runs use
it. The server:

- listens on a free port of 127.0.0.1 and asks every request but ``/health`` for a random
  password, kept only in ``PREFECT_HOME/skyferry-api.json`` (mode 0600) and in the
  environment of the processes that use it;
- serves Prefect's API as the temporary server does (the same database, the same
  services; no UI): run ``prefect server start`` for the UI;
- exits once nobody has used it for ``SKYFERRY_PREFECT_API_IDLE_S`` seconds (no request
  for that long, and no open connection), or on ``skyferry api stop``.

A ``PREFECT_API_URL`` always wins: that server is used as before.
``SKYFERRY_PREFECT_API=ephemeral`` gives Prefect's own temporary server per process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import prefect
from prefect.settings import Settings as PrefectSettings
from pydantic import SecretStr

from skyferry.errors import ConfigError

__all__ = ["LocalApi", "STATE_FILE", "ensure_local_api", "find_local_api", "pointed_at",
           "stop_local_api"]

STATE_FILE = "skyferry-api.json"  # in PREFECT_HOME: where the server is, and its password
LOCK_FILE = "skyferry-api.lock"
LOG_FILE = "skyferry-api.log"
USER = "skyferry"  # the user name of the API's basic auth
MODULE = "flows.local_api"  # the server's command line names it: how a stale pid is told apart
START_POLL_S = 0.1  # how often a starting client asks the new server whether it is up
IDLE_CHECK_S = 1.0  # how often the server looks at its own idleness

log = logging.getLogger("skyferry.run")


@dataclass(frozen=True)
class LocalApi:
    """A running local API: where it is, and how to authenticate to it."""

    url: str  # ends in /api, as PREFECT_API_URL does
    pid: int
    auth_string: str  # "user:password"; never logged
    started: float

    def environment(self) -> dict[str, str]:
        """The variables that point a child process (a Dask worker, say) at this API."""
        return {"PREFECT_API_URL": self.url, "PREFECT_API_AUTH_STRING": self.auth_string}


def pointed_at(settings: PrefectSettings, local: LocalApi) -> PrefectSettings:
    """``settings`` as a client of ``local``."""
    api = settings.api.model_copy(update={"url": local.url,
                                           "auth_string": SecretStr(local.auth_string)})
    return settings.model_copy(update={"api": api})


def _state_path(home: Path) -> Path:
    return home / STATE_FILE


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(_state_path(home).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _ours(pid: int) -> bool:
    """Whether ``pid`` is a local API server (by its command line, not its number alone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return MODULE.encode() in fh.read()
    except OSError:
        return False


def _answers(state: dict[str, Any], timeout: float = 5.0) -> bool:
    """Whether the server of ``state`` answers with its password, on this Prefect version."""
    try:
        reply = httpx.get(f"{state['url']}/admin/version", timeout=timeout,
                          auth=tuple(str(state["auth"]).split(":", 1)))  # type: ignore[arg-type]
    except (httpx.HTTPError, KeyError):
        return False
    return reply.status_code == 200 and reply.json() == prefect.__version__


def find_local_api(home: Path) -> LocalApi | None:
    """The local API of ``home`` (a ``PREFECT_HOME``) if one runs and answers, else None."""
    state = _read_state(home)
    if state is None or not isinstance(state.get("pid"), int) or not _ours(state["pid"]):
        return None
    if state.get("python") != sys.executable or not _answers(state):
        return None
    return LocalApi(url=state["url"], pid=state["pid"], auth_string=state["auth"],
                    started=float(state.get("started", 0.0)))


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One process at a time checks for, starts or stops the server of ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_local_api(settings: PrefectSettings, idle_s: float,
                     timeout_s: float = 120.0) -> LocalApi:
    """The local API of ``settings.home``: the running one, or one started now.

    ``settings`` are the server's (its database, its services' settings); they reach the
    new process as environment variables, as Prefect passes them to its temporary server.
    Raises ``ConfigError`` naming the log file when the server does not come up.
    """
    home = Path(settings.home)
    with _locked(home):
        found = find_local_api(home)
        if found is not None:
            return found
        _stop_stale(home)
        return _start(settings, idle_s, timeout_s)


def _stop_stale(home: Path) -> None:
    """A server of ``home`` that does not answer as it should (another Prefect version or
    Python, a lost password) is stopped, by its pid once its command line says it is one."""
    state = _read_state(home)
    if state and isinstance(state.get("pid"), int) and _ours(state["pid"]):
        _terminate(state["pid"])
    _state_path(home).unlink(missing_ok=True)


def _terminate(pid: int, timeout_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while _ours(pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for another process to exit: nothing to join
        if not _ours(pid):
            return


def _start(settings: PrefectSettings, idle_s: float, timeout_s: float) -> LocalApi:
    home = Path(settings.home)
    auth = f"{USER}:{secrets.token_urlsafe(24)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(settings.to_environment_variables(exclude_unset=True))
    for key in [k for k in env if k.startswith("PREFECT_API_")]:
        del env[key]  # the server is not a client of another API
    env["PREFECT_SERVER_API_AUTH_STRING"] = auth  # in its environment, not its command line
    env["PREFECT_HOME"] = str(home)
    root = str(Path(__file__).resolve().parent.parent)  # flows/ importable from anywhere
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(home / LOG_FILE, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--home", str(home), "--idle", str(idle_s)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # it outlives this process, and its terminal's signals
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        state = _read_state(home)
        if state and state.get("pid") == proc.pid and _answers({**state, "auth": auth}, 1.0):
            log.info("started Prefect's local API at %s (pid %d; it stops after %.0f s idle)",
                     state["url"], proc.pid, idle_s)
            return LocalApi(url=state["url"], pid=proc.pid, auth_string=auth,
                            started=float(state["started"]))
        time.sleep(START_POLL_S)  # polling a starting server's health: nothing to wait on
    if proc.poll() is None:
        _terminate(proc.pid)
    raise ConfigError(f"Prefect's local API did not start within {timeout_s:.0f} s "
                      f"(exit code {proc.poll()}); see {home / LOG_FILE}, or set "
                      "PREFECT_API_URL to a running `prefect server`", source=str(home))


def stop_local_api(home: Path) -> int | None:
    """Stop the local API of ``home``; return the pid it had, or None if none ran."""
    with _locked(home):
        state = _read_state(home)
        pid = state.get("pid") if state else None
        if not isinstance(pid, int) or not _ours(pid):
            _state_path(home).unlink(missing_ok=True)
            return None
        _terminate(pid)
        _state_path(home).unlink(missing_ok=True)
        return pid


# --- the server's own process ----------------------------------------------------------
class _Activity:
    """An ASGI wrapper that knows when the API was last used, and by how many at once."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.open = 0
        self.last = time.monotonic()
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        with self._lock:
            self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self.open -= 1
                self.last = time.monotonic()

    def touch(self) -> None:
        with self._lock:
            self.last = time.monotonic()

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self.open else time.monotonic() - self.last


def _write_state(home: Path, state: dict[str, Any]) -> None:
    path = _state_path(home)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, path)


def serve(home: Path, idle_s: float) -> None:
    """Run the API until it has been idle for ``idle_s`` seconds, or a SIGTERM."""
    import uvicorn
    from prefect.server.api.server import create_app

    auth = os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    if not auth:
        raise SystemExit("PREFECT_SERVER_API_AUTH_STRING is not set")
    activity = _Activity(create_app(ephemeral=True, final=True))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(activity, log_level="error", lifespan="on"))

    def watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(IDLE_CHECK_S / 10)  # uvicorn sets a flag, no event: the clock starts
        activity.touch()  # once the API serves, not while it migrates its database
        while not server.should_exit:
            if activity.idle_for() >= idle_s:
                server.should_exit = True
                return
            time.sleep(IDLE_CHECK_S)

    _write_state(home, {"pid": os.getpid(), "url": f"http://127.0.0.1:{port}/api",
                        "auth": auth, "python": sys.executable, "prefect": prefect.__version__,
                        "started": time.time(), "idle_s": idle_s})
    threading.Thread(target=watch, name="idle-exit", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        state = _read_state(home)
        if state and state.get("pid") == os.getpid():
            _state_path(home).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="skyferry's local Prefect API server")
    parser.add_argument("--home", type=Path, required=True, help="PREFECT_HOME")
    parser.add_argument("--idle", type=float, required=True, help="exit after this idle time")
    args = parser.parse_args(argv)
    serve(args.home, args.idle)


if __name__ == "__main__":
    main()
