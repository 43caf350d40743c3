"""The live progress artifact is published off the chunk loop, and the publisher always stops.

Also: the Prefect settings a run gets on an ephemeral API, and on a real one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from prefect import flow
from prefect.artifacts import create_progress_artifact
from prefect.context import SettingsContext, get_settings_context
from prefect.server.services.perpetual_services import get_enabled_perpetual_services
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED,
    PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS,
    PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE,
    Settings,
    temporary_settings,
)

from flows.ephemeral import (
    EPHEMERAL_RECORDER_BATCH,
    EPHEMERAL_STARTUP_TIMEOUT_S,
    EVENT_VACUUM_STAMPS,
    run_settings,
)
from flows.live import LiveStatus
from skyferry.commit.manifest import BatchPlan, Catalog
from skyferry.distribute.placement import NodeHealth
from skyferry.models import ReplicaRecord, StoredChunk
from skyferry.storage import Store
from tests.helpers.sf_data import small_plan

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _plan(n: int) -> BatchPlan:
    return small_plan("live", n, date="2026-11-23")


def _journal(catalog: Catalog, plan: BatchPlan, i: int) -> None:
    c = plan.chunks[i]
    catalog.record_chunk(plan, StoredChunk(
        index=i, key=plan.key(c), format="binary", digest=f"{i:064d}", size=10,
        source_digest="0" * 64, rows_in=0, rows_out=0, rows_rejected=0, rejects_key=None,
        parts=c.parts, replicas=(ReplicaRecord(node="n1", cloud="aws", state="verified"),
                                 ReplicaRecord(node="n2", cloud="gcp", state="verified"))))


def _artifact(artifact_id: UUID) -> tuple[float, dict[str, str]]:
    response = httpx.get(f"{PREFECT_API_URL.value()}/artifacts/{artifact_id}", timeout=30)
    response.raise_for_status()
    body = response.json()
    return float(body["data"]), body["metadata_"] or {}


@flow(name="live-artifact")
def _new_artifact(total: int) -> UUID:
    artifact = create_progress_artifact(progress=0.0, description=f"chunks stored: 0 of {total}")
    assert isinstance(artifact, UUID)
    return artifact


def _publishers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "skyferry-live-status" and t.is_alive()]


def test_progress_is_published_by_a_thread_that_stops_and_a_forced_update_is_final(
        tmp_path: Path) -> None:
    plan = _plan(4)
    catalog = Catalog(Store(str(tmp_path / "catalog"), name="catalog"))
    artifact = _new_artifact(4)
    before = _publishers()
    with LiveStatus(artifact, catalog, plan, started_at=time.time(), done_at_start=0,
                    health=NodeHealth(), interval_s=0.05) as live:
        _journal(catalog, plan, 0)
        _journal(catalog, plan, 1)
        live.update("distribution")
        assert len(_publishers()) == len(before) + 1
        # the publisher's write lands on the server: poll the API for it, bounded
        deadline = time.monotonic() + 30
        while _artifact(artifact)[0] != 50.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        data, fields = _artifact(artifact)
        assert data == 50.0
        assert fields["chunks_done"] == "2" and fields["stage"] == "distribution"
        _journal(catalog, plan, 2)
        _journal(catalog, plan, 3)
        live.update("storage", force=True)  # in the caller: done when it returns
        assert _artifact(artifact)[0] == 100.0
        assert len(_publishers()) == len(before)
        live.update("distribution")  # after the last word: ignored, no new thread
        assert len(_publishers()) == len(before)
    assert _artifact(artifact)[1]["stage"] == "storage"


def test_the_publisher_stops_when_the_block_fails(tmp_path: Path) -> None:
    plan = _plan(2)
    catalog = Catalog(Store(str(tmp_path / "catalog"), name="catalog"))
    artifact = _new_artifact(2)
    before = _publishers()
    with pytest.raises(RuntimeError, match="a chunk failed"):
        with LiveStatus(artifact, catalog, plan, started_at=time.time(), done_at_start=0,
                        health=NodeHealth()) as live:
            live.update("distribution")
            raise RuntimeError("a chunk failed")
    assert _publishers() == before


@pytest.fixture
def api_home(tmp_path: Path) -> Path:
    """A PREFECT_HOME of the test's own: where the ephemeral API's database would live."""
    return tmp_path / "prefect-home"


def test_an_ephemeral_api_gets_no_heartbeats_and_batched_task_run_records(
        api_home: Path) -> None:
    with temporary_settings(updates={PREFECT_HOME: api_home},
                            restore_defaults={PREFECT_API_URL}):
        settings = run_settings()
    assert settings.flows.heartbeat_frequency is None
    recorder = settings.server.services.task_run_recorder
    assert (recorder.batch_size, recorder.flush_interval) == (EPHEMERAL_RECORDER_BATCH, 1.0)
    env = settings.to_environment_variables(exclude_unset=True)  # what the server process gets
    assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == \
        str(EPHEMERAL_RECORDER_BATCH)
    # read in this process, when the API is started
    with SettingsContext(profile=get_settings_context().profile, settings=settings):
        assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == \
            EPHEMERAL_STARTUP_TIMEOUT_S


def test_an_operators_recorder_batch_is_kept_and_a_real_server_is_left_alone(
        api_home: Path) -> None:
    with temporary_settings(updates={PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE: 7,
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 9,
                                     PREFECT_HOME: api_home},
                            restore_defaults={PREFECT_API_URL}):
        ours = run_settings()
    assert ours.server.services.task_run_recorder.batch_size == 7
    assert ours.server.ephemeral.startup_timeout_seconds == 9
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api",
                                     PREFECT_HOME: api_home}) as current:
        settings = run_settings()
    assert settings.flows.heartbeat_frequency == current.flows.heartbeat_frequency
    assert settings.flows.heartbeat_frequency is not None
    assert settings.server.services.task_run_recorder.batch_size == 1


def _api_vacuums_events(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether an ephemeral API started with ``settings`` schedules the event vacuum.

    Read the way the API's process reads them: from the environment it is started with.
    """
    with monkeypatch.context() as env:
        for key, value in settings.to_environment_variables(exclude_unset=True).items():
            env.setenv(key, value)
        with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
            names = {s.function.__name__
                     for s in get_enabled_perpetual_services(ephemeral=True)}
    return "schedule_event_vacuum_tasks" in names


def test_an_ephemeral_api_vacuums_events_once_per_loop_not_once_per_run(
        api_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with temporary_settings(updates={PREFECT_HOME: api_home},
                            restore_defaults={PREFECT_API_URL}) as current:
        first, second = run_settings(), run_settings()
    loop_s = current.server.services.db_vacuum.loop_seconds
    stamps = json.loads((api_home / EVENT_VACUUM_STAMPS).read_text())
    assert len(stamps) == 1 and abs(time.time() - next(iter(stamps.values()))) < loop_s
    # the first run's API vacuums; the next one, within the loop, does not
    assert _api_vacuums_events(first, monkeypatch)
    assert not _api_vacuums_events(second, monkeypatch)
    # once the last vacuum is a loop old, the next run's API vacuums again, and says when
    (key, last), = stamps.items()
    (api_home / EVENT_VACUUM_STAMPS).write_text(json.dumps({key: last - loop_s - 1}))
    with temporary_settings(updates={PREFECT_HOME: api_home},
                            restore_defaults={PREFECT_API_URL}):
        third = run_settings()
    assert _api_vacuums_events(third, monkeypatch)
    assert json.loads((api_home / EVENT_VACUUM_STAMPS).read_text())[key] >= last


def test_an_operators_vacuum_setting_is_kept(api_home: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with temporary_settings(updates={PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED: "events",
                                     PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS: 60,
                                     PREFECT_HOME: api_home},
                            restore_defaults={PREFECT_API_URL}):
        runs = [run_settings() for _ in range(2)]
    assert all(_api_vacuums_events(s, monkeypatch) for s in runs)


def test_an_unwritable_prefect_home_leaves_the_vacuum_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with temporary_settings(updates={PREFECT_HOME: blocker / "prefect-home"},
                            restore_defaults={PREFECT_API_URL}):
        runs = [run_settings() for _ in range(2)]
    assert all(_api_vacuums_events(s, monkeypatch) for s in runs)
