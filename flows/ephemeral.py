"""Prefect's ephemeral API, as skyferry runs it when no ``PREFECT_API_URL`` is set.

:func:`run_settings` adjusts the settings of a run for an API that lives and dies with this
process; :func:`settle_ephemeral_api` waits, before the process exits, until that API has
recorded a run's task runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import Settings as PrefectSettings
from prefect.settings import get_current_settings
from prefect.settings.models.server.services import ServerServicesDBVacuumSettings

from flows.local_api import ensure_local_api, pointed_at
from skyferry.config import Settings, get_settings
from skyferry.metrics import PipelineResult
from skyferry.secrets import register
from tasks.commit import COMMIT_TASK

__all__ = ["EPHEMERAL_RECORDER_BATCH", "EPHEMERAL_STARTUP_TIMEOUT_S", "EVENT_VACUUM_STAMPS",
           "guard_ephemeral_api", "run_settings", "settle_ephemeral_api"]

EPHEMERAL_RECORDER_BATCH = 100  # task-run events per database write, ephemeral API only
SETTLE_POLL_S = 0.1  # how often settle_ephemeral_api asks the API
EVENT_VACUUM_STAMPS = "skyferry-event-vacuum.json"  # in PREFECT_HOME
EPHEMERAL_STARTUP_TIMEOUT_S = 120  # how long an ephemeral API may take to start


def run_settings(settings: Settings | None = None) -> PrefectSettings:
    """The Prefect settings of a run: the current ones when ``PREFECT_API_URL`` is set;
    otherwise pointed at the local API that later runs reuse (``SKYFERRY_PREFECT_API=local``,
    flows/local_api.py, started now if none runs), or left to Prefect's ephemeral API.

    A local or ephemeral API is the run's alone, or lives and dies with this process, so:

    - no flow-run heartbeats: nothing can watch them, and Prefect's heartbeat thread, which
      sleeps in 1 s steps, holds up the end of every run by up to a second;
    - the server records task-run events in batches (up to ``EPHEMERAL_RECORDER_BATCH`` per
      write, at least once a second) instead of one database transaction per event: about
      half the server's CPU per task, CPU the chunks need on a small machine. Set either
      setting and yours is kept;
    - an ephemeral API's event vacuum runs at most once per loop (:func:`_pace_event_vacuum`);
    - it has ``EPHEMERAL_STARTUP_TIMEOUT_S`` to start, not Prefect's 20 s: on a new database
      it first builds its schema, which can take longer. Set
      ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` and yours is kept.

    The local API starts with these settings (its database, recorder and vacuum). Against
    a real server the settings are the server's and the heartbeats stay. A copy, not
    ``temporary_settings``: that rebuilds every settings model from the environment.
    """
    sky = settings or get_settings()
    current = get_current_settings()
    if current.api.url:
        return current
    flows = current.flows.model_copy(update={"heartbeat_frequency": None})
    services = current.server.services
    recorder = services.task_run_recorder
    ours = {"batch_size": EPHEMERAL_RECORDER_BATCH, "flush_interval": 1.0}
    recorder = recorder.model_copy(
        update={k: v for k, v in ours.items() if k not in recorder.model_fields_set})
    # a local API lives on: its vacuum runs as a long-lived server's does
    vacuum = current.server.services.db_vacuum if sky.prefect_api == "local" \
        else _pace_event_vacuum(current)
    ephemeral = current.server.ephemeral
    if "startup_timeout_seconds" not in ephemeral.model_fields_set:
        ephemeral = ephemeral.model_copy(
            update={"startup_timeout_seconds": EPHEMERAL_STARTUP_TIMEOUT_S})
    services = services.model_copy(update={"task_run_recorder": recorder, "db_vacuum": vacuum})
    server = current.server.model_copy(update={"ephemeral": ephemeral, "services": services})
    adjusted = current.model_copy(update={"flows": flows, "server": server})
    if sky.prefect_api != "local":
        return adjusted
    local = ensure_local_api(adjusted, sky.prefect_api_idle_s,
                             timeout_s=ephemeral.startup_timeout_seconds)
    register([local.auth_string, local.auth_string.split(":", 1)[1]])  # scrubbed from logs
    return pointed_at(adjusted, local)


def _pace_event_vacuum(current: PrefectSettings) -> ServerServicesDBVacuumSettings:
    """The API's vacuum settings: its event vacuum at most once per ``loop_seconds``.

    A long-lived Prefect server deletes expired events once per ``db_vacuum.loop_seconds``
    (an hour by default), but an ephemeral API is a new server in every process, and it
    vacuums as it starts: each ``skyferry run`` would pay for it, and the run's first write
    would wait behind it. So the vacuum runs in an ephemeral API only
    when the last one that was let run, on the same database, is ``loop_seconds`` old; the
    time is kept in ``EVENT_VACUUM_STAMPS`` in ``PREFECT_HOME``. An operator who sets
    ``PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED`` keeps their setting.
    """
    vacuum = current.server.services.db_vacuum
    types = vacuum.enabled_vacuum_types
    if "enabled" in vacuum.model_fields_set or "events" not in types:
        return vacuum
    path = current.home / EVENT_VACUUM_STAMPS  # with the API's database, not the data
    url = current.server.database.connection_url  # may hold a password: kept hashed
    database = hashlib.sha256(
        (url.get_secret_value() if url else str(current.home)).encode()).hexdigest()[:16]
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        stamps = {}
    stamps = stamps if isinstance(stamps, dict) else {}
    now = time.time()
    last = stamps.get(database)
    if isinstance(last, (int, float)) and 0 <= now - last < vacuum.loop_seconds:
        # The other types run only on a long-lived server; an empty set cannot reach the
        # API's process (its environment reads "" as the default), so "orphans" stands in.
        return vacuum.model_copy(update={"enabled": (types - {"events"}) or {"orphans"}})
    stamps[database] = now
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, path)
    except OSError as exc:  # the vacuum runs now and next time: slower, never wrong
        logging.getLogger("skyferry.run").warning(
            "could not record the API's event vacuum in %s: %s", path, exc)
    return vacuum


def settle_ephemeral_api(result: PipelineResult, timeout_s: float = 10.0) -> bool:
    """Wait (at most ``timeout_s``) until an ephemeral API has recorded the run's task runs.

    Call it before a process that ran flows on an ephemeral API exits. That API records
    task-run states from the runs' events, in batches (see :func:`run_settings`), and it
    stops when the process exits: a batch still queued then is lost from the local run
    history, and Prefect prints each one as an error with a traceback. The recorder takes
    events in order, so once the run's last task (``commit-manifest`` in a committed run) is
    recorded final and no task run is left unfinished, every earlier one is recorded too.

    Returns whether that holds. When this process started no ephemeral API (a
    ``PREFECT_API_URL``, or the local API of flows/local_api.py) it returns at once: that
    server outlives this process.
    """
    if get_current_settings().api.url or not result.flow_run_id or not _ephemeral_running():
        return True
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(result.flow_run_id)]))
    unfinished = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[
        StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED,
        StateType.CANCELLING])))
    last = TaskRunFilter(name=TaskRunFilterName(like_=COMMIT_TASK)) \
        if result.status == "completed" else None
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            settled = not client.read_task_runs(flow_run_filter=runs,
                                                task_run_filter=unfinished, limit=1)
            if settled:
                recorded = client.read_task_runs(flow_run_filter=runs, task_run_filter=last,
                                                 limit=1)
                settled = bool(recorded) and all(r.state is not None and r.state.is_final()
                                                 for r in recorded)
            if settled or time.monotonic() >= deadline:
                return settled
            time.sleep(SETTLE_POLL_S)


def _ephemeral_running() -> bool:
    """Whether this process started an ephemeral API that still runs."""
    module = sys.modules.get("prefect.server.api.server")  # not imported: none was started
    servers = getattr(getattr(module, "SubprocessASGIServer", None), "_instances", {})
    return any(server.running for server in servers.values())  # module half-imported: none


# The guard: a small process that holds the read end of a pipe whose write end only this
# process holds. However this process ends (SIGKILL included), the kernel closes the write
# end, the guard's read returns, and it stops the API server, checked by its command line
# first. A normal exit stops the server itself (Prefect's atexit), and the guard finds none.
_GUARD = """
import os, signal, sys, time
pid = int(sys.argv[1])
sys.stdin.buffer.read()
def ours():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"prefect.server.api.server:create_app" in fh.read()
    except OSError:
        return False
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
    if not ours():
        break
    os.kill(pid, sig)
    end = time.monotonic() + wait
    while ours() and time.monotonic() < end:
        time.sleep(0.05)
"""
_guarded: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
_guard_lock = threading.Lock()


def guard_ephemeral_api() -> None:
    """Make the ephemeral API's server process end with this one, however this one ends.

    Prefect stops the server it started at a normal exit; a process killed with SIGKILL
    runs no exit handler, and its server would outlive it. Call it once the API is up (a
    flow is running); it returns at once against a real server, or when already guarded.
    """
    if get_current_settings().api.url or not sys.platform.startswith("linux"):
        return
    # Prefect's server code (~2 s to import) is loaded only where an ephemeral API runs.
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        process = server.server_process
        if process is None or process.poll() is not None:
            continue
        with _guard_lock:
            if process.pid in _guarded:
                continue
            read, write = os.pipe()  # both ends are not inherited by other children
            try:
                guard = subprocess.Popen([sys.executable, "-c", _GUARD, str(process.pid)],
                                         stdin=read, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            finally:
                os.close(read)
            _guarded[process.pid] = (guard, write)  # the write end stays open until exit
