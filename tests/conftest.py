"""Shared fixtures: one Prefect test harness per session, and an isolated data directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# A short retry backoff (read when a task is called), and a quiet Prefect (before it loads).
os.environ.setdefault("SKYFERRY_RETRY_DELAYS", "[0.05, 0.05]")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A command run by a test uses Prefect's ephemeral API, which ends with it: a local API
# (flows/local_api.py) would outlive the test. tests/flows/test_local_api.py runs that one.
os.environ.setdefault("SKYFERRY_PREFECT_API", "ephemeral")
# gcsfs probes for hierarchical namespaces over gRPC, which the GCS emulator lacks: each call
# would wait ~55 s. Must be set before gcsfs is imported (shared/EMULATORS.md).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from skyferry.config import get_settings  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty SKYFERRY_HOME: the default topology's nodes and catalog live here."""
    root = tmp_path / "home"
    monkeypatch.setenv("SKYFERRY_HOME", str(root))
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """moto (S3), gcp-storage-emulator (GCS) and Azurite (Azure Blob), once per session."""
    from tests.helpers import sf_servers

    logs = tmp_path_factory.mktemp("server-logs")
    started = {
        "s3": sf_servers.moto(logs),
        "gs": sf_servers.gcs(logs),
        "az": sf_servers.azurite(logs, tmp_path_factory.mktemp("azurite")),
    }
    try:
        for server in started.values():
            server.start()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def clouds(servers: dict[str, Any]) -> Iterator[Any]:
    """Fresh buckets/containers on every server for one test, and a way to reach them."""
    from tests.helpers import sf_servers

    env = sf_servers.CloudEnv(servers)
    env.reset()
    yield env
